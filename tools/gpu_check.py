"""Check the GPU numbers of steps 05 and 06 on one GPU, in under 8 minutes, as one table.

    python tools/gpu_check.py               # on a machine with one CUDA GPU
    python tools/gpu_check.py --cpu         # the same runs with the tiny presets, on a CPU

Each row is a real `torchrun --nproc_per_node=1` run of 05_gpt_ddp/train.py or 06_llama_ddp/train.py
(nccl on a GPU, gloo on a CPU) on token files made here, offline. It compares the peak memory
train.py reports (torch.cuda.max_memory_allocated) with the estimate it printed at start-up, and
reports tokens/s and MFU. Every run is a separate process group with a time limit, stopped as soon
as its metrics.csv holds the steps it needs (so no checkpoint is written): an out-of-memory error
or a hang becomes a row of the table, not the end of the check.

The memory runs take 3 optimizer steps: AdamW allocates its states in the first one, so the peak
of a steady step shows from the second on. On a GPU the table also shows the most memory
nvidia-smi saw in use during the run: the allocator's reserve, the CUDA context and NCCL on top
of what PyTorch allocated, the margins train.py adds before it says "fits".

What it does not measure: it runs one rank, so no NCCL communicator between ranks (its peer
buffers, and on Hopper with more than 2 ranks its NVLS buffers: report.py adds 0.7 GB and 2.5 GB
for those before it says "fits"), no all-reduce, and so no overlap of communication with backward
and no scaling across GPUs.

--budget is a hard limit on the whole check, start-up included: every wait (a run, stopping it,
the GPU emptying, making the data) ends by then, and a run that cannot finish in time is skipped.
nvidia-smi is asked about the GPU the runs use, by its UUID (nvidia-smi numbers GPUs its own way
and ignores CUDA_VISIBLE_DEVICES).

The table is printed, and written to --out and to $OUT/gpu_check.md when $OUT is set, with the
log of every run next to it.
"""

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROG = "gpu_check.py"
STOP_GRACE = 5  # seconds for a run to end after SIGTERM, and again after SIGKILL
RESERVE = 3 * STOP_GRACE  # what stopping a run and one last nvidia-smi call may take
MIN_RUN = 20  # seconds: a run with less time than this left is skipped
NOT_MEASURED = (
    "not measured: one rank per run, so no NCCL between ranks (its peer and NVLS buffers, which "
    "report.py adds before it says fits), no all-reduce, no overlap, no scaling"
)
COLUMNS = [
    "run", "peak allocated", "estimate", "peak / estimate", "GPU memory used (nvidia-smi)",
    "tokens/s", "MFU", "status",
]  # fmt: skip


@dataclass
class Check:
    name: str
    step: str  # "05" or "06"
    args: list  # train.py flags of this run
    steps: int = 3  # optimizer steps to wait for in metrics.csv
    warmup: int = 0  # steps left out of the tokens/s and MFU medians
    timeout: float = 150.0  # seconds, from start to the last step needed


def gpu_checks():
    big = ["--preset", "gpt-1.4b", "--batch_size"]
    gpt2 = ["--preset", "gpt2-124m", "--batch_size", "16"]
    return [
        Check("05 gpt-1.4b bf16, micro-batch 1", "05", [*big, "1"]),
        Check("05 gpt-1.4b bf16, micro-batch 4", "05", [*big, "4"]),
        Check(
            "05 gpt-1.4b bf16, micro-batch 8, checkpointing",
            "05",
            [*big, "8", "--activation_checkpointing"],
        ),
        Check("05 gpt2-124m bf16, batch 16", "05", gpt2, steps=30, warmup=10),
        # torch.compile spends its first steps compiling: a longer limit, a longer warm-up
        Check(
            "05 gpt2-124m bf16, batch 16, --compile",
            "05",
            [*gpt2, "--compile"],
            steps=40,
            warmup=20,
            timeout=300,
        ),
        Check(
            "06 tinyllama-1.1b bf16, batch 4",
            "06",
            ["--preset", "tinyllama-1.1b", "--batch_size", "4"],
        ),
    ]


def cpu_checks():
    """The same runs with the tiny presets in fp32 (no --compile: it needs minutes on a CPU)."""
    tiny = ["--preset", "tiny", "--batch_size"]
    return [
        Check("05 tiny, micro-batch 1", "05", [*tiny, "1"], timeout=60),
        Check("05 tiny, micro-batch 4", "05", [*tiny, "4"], timeout=60),
        Check("05 tiny, batch 16", "05", [*tiny, "16"], steps=8, warmup=3, timeout=60),
        Check("06 tiny, batch 4", "06", [*tiny, "4"], timeout=60),
    ]


def make_data(work, gpu, env, deadline):
    """Token files for both steps from this Python's standard library, one token per byte. On a
    GPU, 05's meta.json then claims GPT-2's vocabulary (50,257) so that gpt-1.4b and gpt2-124m
    have their real sizes; byte ids are valid ids of any larger vocabulary."""
    gpt, llama = work / "gpt_data", work / "llama_data"
    for cmd in [
        [ROOT / "05_gpt_ddp/prepare.py", "--tokenizer", "char", "--data_dir", gpt],
        [ROOT / "06_llama_ddp/make_toy_data.py", "--out_dir", llama],
    ]:
        subprocess.run(
            [sys.executable, *map(str, cmd), "--max_bytes", "2000000" if gpu else "300000"],
            env=env,
            check=True,
            timeout=max(1, min(120, deadline - time.monotonic())),
            stdout=subprocess.DEVNULL,
        )
    if gpu:
        meta = json.loads((gpt / "meta.json").read_text())
        meta["vocab_size"] = 50257
        (gpt / "meta.json").write_text(json.dumps(meta))
    return gpt, llama


def train_command(check, work, data, gpu):
    out_dir = work / "runs" / re.sub(r"\W+", "_", check.name)
    never = "1000000"  # evaluate once at step 0, never save: the run is stopped before
    common = [
        "--out_dir", out_dir, "--device", "cuda" if gpu else "cpu", "--max_steps", never,
        "--eval_every", never, "--eval_batches", "1", "--save_every", never,
        "--sample_every", "0", "--log_every", "1", "--warmup_steps", "10",
    ]  # fmt: skip
    if check.step == "05":
        script, files = ROOT / "05_gpt_ddp/train.py", ["--data_dir", data[0]]
    else:
        llama = data[1]
        script = ROOT / "06_llama_ddp/train.py"
        files = ["--train_file", llama / "train.pkl", "--valid_file", llama / "val.pkl"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    return [str(c) for c in [*torchrun, script, *files, *common, *check.args]], out_dir


def gpu_memory_used_gb(uuid):
    """Memory in use on the GPU of this UUID as nvidia-smi reports it; None without nvidia-smi
    or without a UUID (nvidia-smi's index 0 need not be CUDA's device 0)."""
    if not uuid or not shutil.which("nvidia-smi"):
        return None
    query = ["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", uuid]
    try:
        out = subprocess.run(
            ["nvidia-smi", *query], capture_output=True, text=True, timeout=STOP_GRACE
        ).stdout
        return float(out.strip().splitlines()[0]) * 2**20 / 1e9  # MiB
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def train_rows(out_dir):
    try:
        with open(out_dir / "metrics.csv", newline="") as f:
            return [r for r in csv.DictReader(f) if r["train_loss"]]
    except (FileNotFoundError, KeyError):
        return []


def stop(proc):
    """SIGTERM to the run's process group (torchrun forwards it), SIGKILL after STOP_GRACE s."""
    for sig, grace in [(signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)]:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue


def failure(log_text, returncode):
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    oom = [line for line in lines if "OutOfMemoryError" in line or "out of memory" in line]
    if oom:
        return "out of memory: " + oom[-1][:150]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (
        f"failed (exit {returncode}): "
        + (errors[-1] if errors else lines[-1] if lines else "")[:150]
    )


def measure(check, command, out_dir, log_path, env, timeout, uuid):
    """Run one check and return its table row; a failed run is a row too, never an exception."""
    shutil.rmtree(out_dir, ignore_errors=True)
    row = {"run": check.name}
    used = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        rows = []
        while time.monotonic() < deadline:
            rows = train_rows(out_dir)
            if len(rows) >= check.steps or proc.poll() is not None:
                break
            if (u := gpu_memory_used_gb(uuid)) is not None:
                used.append(u)
            time.sleep(0.5)
        finished = len(rows) >= check.steps
        exited = proc.poll() is not None  # on its own: an error, before the steps we need
        stop(proc)
    log_text = Path(log_path).read_text(errors="replace")
    estimate = re.search(r"total \(estimate\)\s+([\d.]+) GB", log_text)
    if estimate:
        row["estimate"] = float(estimate.group(1))
    if rows:
        row["peak allocated"] = max(float(r["peak_mem_gb"]) for r in rows)
    if used:
        row["GPU memory used (nvidia-smi)"] = max(used)
    if finished:
        timed = [r for r in rows if int(r["step"]) > check.warmup][: check.steps - check.warmup]
        row["tokens/s"] = statistics.median(float(r["tokens_per_s"]) for r in timed)
        mfu = statistics.median(float(r["mfu"]) for r in timed)
        row["MFU"] = None if mfu != mfu else mfu  # nan: no peak known for this GPU
        row["status"] = "ok"
    elif exited:
        row["status"] = failure(log_text, proc.returncode)
    else:
        row["status"] = f"timed out after {timeout:.0f} s ({len(rows)} of {check.steps} steps)"
    if rows and "estimate" in row:
        row["peak / estimate"] = row["peak allocated"] / row["estimate"]
    verdict = re.search(r"allocator slack.*: (fits|does NOT fit)", log_text)  # train.py's, on CUDA
    if verdict:
        row["status"] += f" (train.py said: {verdict.group(1)})"
    return row


def fmt(column, value):
    if value is None:
        return "-"
    if column in ("peak allocated", "estimate", "GPU memory used (nvidia-smi)"):
        return f"{value:.2f} GB"
    if column == "peak / estimate":
        return f"{value:.2f}"
    if column == "tokens/s":
        return f"{value:,.0f}"
    if column == "MFU":
        return f"{100 * value:.1f}%"
    return str(value)


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c, row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def cuda_available(timeout):
    """Asked in a child process too: see describe_machine."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
            capture_output=True,
            text=True,
            timeout=timeout,
        ).stdout
    except subprocess.SubprocessError:
        return False
    return out.strip() == "True"


def wait_for_gpu_to_empty(uuid, timeout):
    """The next run's nvidia-smi reading must not include the last run's memory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = gpu_memory_used_gb(uuid)
        if used is None or used < 1.0:
            return
        time.sleep(0.5)


def describe_machine(gpu, env, timeout):
    """(One line: date, device, PyTorch; the UUID of the GPU the runs use, or None). The GPU is
    asked in a child process, so that this process never holds a CUDA context (it would show in
    nvidia-smi's numbers). CUDA's device 0 is the first of CUDA_VISIBLE_DEVICES: its UUID is how
    nvidia-smi finds the same card."""
    today = datetime.date.today().isoformat()
    if not gpu:
        return f"{today} | {cpu_name()} | torch {importlib.metadata.version('torch')}", None
    code = (
        "import json, torch\n"
        "p = torch.cuda.get_device_properties(0)\n"
        "print(json.dumps([f'{p.name}, {p.total_memory / 1e9:.1f} GB', torch.__version__,"
        " torch.version.cuda, str(p.uuid)]))\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
        )
        device, torch_version, cuda, uuid = json.loads(result.stdout)
    except (subprocess.SubprocessError, ValueError):
        device, torch_version, cuda, uuid = "unknown GPU", "?", "?", None
    if uuid and not uuid.startswith(("GPU-", "MIG-")):
        uuid = "GPU-" + uuid  # nvidia-smi's spelling of the same UUID
    return f"{today} | {device} | torch {torch_version}, CUDA {cuda}", uuid


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument(
        "--cpu", action="store_true", help="tiny presets on the CPU (default without CUDA)"
    )
    p.add_argument("--out", type=Path, help="also write the table to this file")
    p.add_argument(
        "--budget", type=float, default=450, help="seconds for the whole check: a hard limit"
    )
    p.add_argument("--work_dir", type=Path, help="for data and runs (default: a temporary folder)")
    p.add_argument("--only", nargs="+", metavar="TEXT", help="only the runs whose name has TEXT")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    deadline = time.monotonic() + args.budget
    gpu = not args.cpu and cuda_available(timeout=max(1, min(120, args.budget / 4)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not gpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    out_root = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        logs = (out_root or work) / "gpu_check_logs"
        logs.mkdir(parents=True, exist_ok=True)
        mode = "" if gpu else " | CPU mode: tiny presets, fp32, peak = resident set, no --compile"
        machine, uuid = describe_machine(gpu, env, max(1, min(120, deadline - time.monotonic())))
        header = f"gpu_check.py | {machine}{mode}\n\n{NOT_MEASURED}"
        print(header, flush=True)
        try:
            data = make_data(work, gpu, env, deadline)
        except subprocess.SubprocessError as e:
            sys.exit(f"{PROG}: error: making the token files failed: {e}")
        checks = gpu_checks() if gpu else cpu_checks()
        if args.only:
            checks = [c for c in checks if any(text in c.name for text in args.only)]
        rows = []
        for check in checks:
            left = deadline - time.monotonic() - RESERVE
            if left < MIN_RUN:
                row = {"run": check.name, "status": "skipped: out of time (--budget)"}
            else:
                command, out_dir = train_command(check, work, data, gpu)
                log_path = logs / (re.sub(r"\W+", "_", check.name) + ".log")
                timeout = min(check.timeout, left)
                row = measure(check, command, out_dir, log_path, env, timeout, uuid)
                wait_for_gpu_to_empty(uuid, timeout=min(30, deadline - time.monotonic() - RESERVE))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        text = f"{header}\n\n{table(rows)}\n"
    print("\n" + text)
    for path in [args.out, out_root and out_root / "gpu_check.md"]:
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp_path = path.with_name(path.name + ".tmp")
            tmp_path.write_text(text)
            os.replace(tmp_path, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
