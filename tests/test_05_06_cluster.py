"""Steps 05 and 06 as a cluster runs them: 4 ranks killed and restarted end bit-identical to an
uninterrupted run, a checkpoint write slower than the collective timeout fails nothing, a crash
during a write leaves the previous checkpoint, and a resume uses this run's optimizer settings.

The 4-rank runs (both steps, killed and uninterrupted, all four at once) share one fixture."""

import contextlib
import csv
import functools
import io
import os
import signal
import threading
import time

import pytest
import torch
from helpers import (
    PYTHON,
    ROOT,
    run,
    script,
    start,
    stop,
    torchrun,
    wait_for,
    worker_env,
    worker_pids,
)
from test_05_06_edges import TRAIN, finish
from torch.optim.optimizer import register_optimizer_step_pre_hook

STEPS = ["05_gpt_ddp", "06_llama_ddp"]
CHECKPOINT = {folder: TRAIN[folder].checkpoint for folder in STEPS}
MAX_STEPS, SAVE_EVERY = 60, 20
TIMEOUT, WRITE_DELAY = 10, 25  # seconds: the collective timeout, and the slowed first write

# Injected by the test, not in the scripts: on rank 0 the first torch.save (the first checkpoint)
# sleeps WRITE_DELAY seconds, well past the collective timeout, and leaves a marker file.
SLOW_SAVE = """
import os
if os.environ.get("RANK") == "0":
    import pathlib, time
    import torch
    real_save, marker = torch.save, pathlib.Path(os.environ["SLOW_SAVE_MARKER"])

    def slow_save(*args, **kwargs):
        if not marker.exists():
            marker.write_text("slowed")
            time.sleep(float(os.environ["SLOW_SAVE_SECONDS"]))
        return real_save(*args, **kwargs)

    torch.save = slow_save
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_data")
    prepare = [PYTHON, script("05_gpt_ddp/prepare.py"), "--tokenizer", "char"]
    run([*prepare, "--data_dir", root / "05", "--max_bytes", 100_000], timeout=120, check=True)
    toy = [PYTHON, script("06_llama_ddp/make_toy_data.py"), "--out_dir", root / "06"]
    run([*toy, "--max_bytes", 100_000], timeout=120, check=True)
    return root


def train_args(folder, data, out):
    """Tiny, fp32, a checkpoint every 20 of 60 steps, one evaluation at the end."""
    if folder == "05_gpt_ddp":
        args = ["--data_dir", data / "05"]
    else:
        args = ["--train_file", data / "06" / "train.pkl", "--valid_file", data / "06" / "val.pkl"]
        args += ["--seq_len", 32]
    args += ["--preset", "tiny", "--batch_size", 4, "--dtype", "fp32", "--max_steps", MAX_STEPS]
    args += ["--save_every", SAVE_EVERY, "--eval_every", MAX_STEPS, "--eval_batches", 2]
    args += ["--sample_every", 0, "--log_every", 20, "--peak_flops", 1e12, "--timeout", TIMEOUT]
    return [*args, "--out_dir", out, "--resume"]


def tensors(path):
    """Every tensor of a checkpoint (weights and AdamW state), by a name."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    found = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for param, state in ckpt["optimizer"]["state"].items():
        found |= {f"optimizer.{param}.{k}": v for k, v in state.items()}
    return found


@pytest.fixture(scope="module")
def four_ranks(data, tmp_path_factory):
    """Per step: an uninterrupted 4-rank run whose first checkpoint write is slowed past the
    collective timeout, and a 4-rank run with one worker SIGKILLed after its first checkpoint
    (torchrun --max-restarts=1 restarts all four). Returns their outputs, folders, kill steps."""
    root = tmp_path_factory.mktemp("four_ranks")
    (root / "inject").mkdir()
    (root / "inject" / "sitecustomize.py").write_text(SLOW_SAVE)
    procs, outs = {}, {}
    for folder in STEPS:
        for kind in ("clean", "crashed"):
            out = outs[folder, kind] = root / folder / kind
            flags = ["--standalone", "--nproc-per-node=4"]
            env = worker_env()
            if kind == "crashed":
                flags.append("--max-restarts=1")
            else:
                env.update(
                    PYTHONPATH=f"{root / 'inject'}{os.pathsep}{ROOT}",
                    SLOW_SAVE_MARKER=str(root / folder / "slowed"),
                    SLOW_SAVE_SECONDS=str(WRITE_DELAY),
                )
            cmd = torchrun(*flags, ROOT / folder / "train.py", *train_args(folder, data, out))
            procs[folder, kind] = start(cmd, env=env)

    killed_at = {}

    def kill_after_first_checkpoint():
        for folder in STEPS:
            proc, ckpt = procs[folder, "crashed"], outs[folder, "crashed"] / "ckpt.pt"
            if folder in killed_at or not ckpt.exists():
                continue
            assert proc.poll() is None, "the run ended before the kill"
            workers = worker_pids(proc.pid)
            if workers:
                killed_at[folder] = torch.load(ckpt, weights_only=True)["step"]
                os.kill(max(workers), signal.SIGKILL)
        return len(killed_at) == len(STEPS)

    try:
        wait_for(kill_after_first_checkpoint, timeout=240, what="the first checkpoints")
    except BaseException:
        for proc in procs.values():
            stop(proc)
        raise
    outputs = finish(procs, timeout=480)
    return outputs, procs, outs, killed_at, root


@pytest.mark.slow
@pytest.mark.parametrize("folder", STEPS)
def test_4_ranks_killed_and_restarted_end_bit_identical(folder, four_ranks):
    outputs, procs, outs, killed_at, _ = four_ranks
    for kind in ("clean", "crashed"):
        assert procs[folder, kind].returncode == 0, outputs[folder, kind][-3000:]
    output = outputs[folder, "crashed"]
    resumed = [line for line in output.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1, output[-3000:]
    assert int(resumed[0].split()[-1]) >= killed_at[folder] > 0
    assert killed_at[folder] < MAX_STEPS

    ends = [
        torch.load(outs[folder, k] / "ckpt.pt", weights_only=True) for k in ("clean", "crashed")
    ]
    assert ends[0]["step"] == ends[1]["step"] == MAX_STEPS
    assert ends[0].get("loader") == ends[1].get("loader")  # 06: the data position
    clean = tensors(outs[folder, "clean"] / "ckpt.pt")
    crashed = tensors(outs[folder, "crashed"] / "ckpt.pt")
    assert clean.keys() == crashed.keys() and len(clean) > 50
    differ = [k for k in clean if not torch.equal(clean[k], crashed[k])]
    assert not differ, f"{len(differ)} of {len(clean)} tensors differ, e.g. {differ[:3]}"
    # the steps redone after the restart replace the killed attempt's rows in metrics.csv
    with open(outs[folder, "crashed"] / "metrics.csv", newline="") as f:
        logged = [int(r["step"]) for r in csv.DictReader(f) if r["train_loss"]]
    assert logged == list(range(1, MAX_STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("folder", STEPS)
def test_a_write_slower_than_the_collective_timeout_fails_nothing(folder, four_ranks):
    """The uninterrupted runs above: rank 0's first checkpoint write took WRITE_DELAY seconds,
    past the TIMEOUT of every collective, while the other ranks went on training; the run ends
    normally with every checkpoint whole."""
    outputs, procs, outs, _, root = four_ranks
    output = outputs[folder, "clean"]
    assert (root / folder / "slowed").read_text() == "slowed"  # the delay was really injected
    assert procs[folder, "clean"].returncode == 0, output[-3000:]
    assert "Timed out" not in output and "Traceback" not in output, output[-3000:]
    final = torch.load(outs[folder, "clean"] / "ckpt.pt", weights_only=True)
    assert final["step"] == MAX_STEPS
    assert output.splitlines()[-1].startswith("done: "), output[-3000:]
    # the evaluation at the end was the best yet: best.pt is the same file, the same step
    best = torch.load(outs[folder, "clean"] / "best.pt", weights_only=True)
    assert best["step"] == MAX_STEPS and best["best_val_loss"] == final["best_val_loss"] < 9


# the background writer on its own ------------------------------------------------------------


class Gate:
    """A torch.save that writes only once the test opens the gate."""

    def __init__(self, monkeypatch, module):
        self.open, self.real = threading.Event(), torch.save
        monkeypatch.setattr(module.torch, "save", self)

    def __call__(self, *args, **kwargs):
        assert self.open.wait(60), "the test never opened the gate"
        return self.real(*args, **kwargs)


def test_a_save_never_waits_longer_than_max_wait_and_the_final_save_is_never_lost(
    tmp_path, monkeypatch
):
    ckpt = CHECKPOINT["05_gpt_ddp"]
    gate = Gate(monkeypatch, ckpt)
    saver = ckpt.BackgroundSaver(max_wait=0.2)
    weights = torch.zeros(3)
    last, best = tmp_path / "ckpt.pt", tmp_path / "best.pt"
    assert saver.save({"step": 1, "w": weights}, [last, best])
    weights += 1  # training goes on: the write must hold the state of the save
    began = time.monotonic()
    assert not saver.save({"step": 2, "w": weights}, [last])  # skipped: the writer is busy
    assert time.monotonic() - began < 30
    assert saver.save({"step": 3, "w": weights}, [last], final=True)  # queued behind it
    gate.open.set()
    saver.finish()
    assert torch.load(last, weights_only=True)["step"] == 3
    first = torch.load(best, weights_only=True)
    assert first["step"] == 1 and torch.equal(first["w"], torch.zeros(3))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_ends_the_run_in_one_line(tmp_path):
    saver = CHECKPOINT["05_gpt_ddp"].BackgroundSaver(max_wait=1)
    saver.save({"step": 1}, [tmp_path / "missing_folder" / "ckpt.pt"], final=True)
    with pytest.raises(SystemExit) as exc:
        saver.finish()
    message = exc.value.code
    assert message.startswith(f"train.py: error: cannot write checkpoint {tmp_path}")
    assert "FileNotFoundError" in message and "\n" not in message


CRASH_DURING_WRITE = """
import pathlib, sys, time
sys.path.insert(0, sys.argv[1])
import checkpoint, torch
out = pathlib.Path(sys.argv[2])
saver = checkpoint.BackgroundSaver(max_wait=60)
first = {"format": checkpoint.CHECKPOINT_FORMAT, "step": 20, "w": torch.zeros(1000)}
saver.save(first, [out / "ckpt.pt"])
saver.finish()
real_save = torch.save

def half_then_hang(obj, f, *args, **kwargs):  # the second write dies half-way through
    real_save(obj, f)
    f.truncate(f.tell() // 2)
    f.flush()
    (out / "writing").touch()
    time.sleep(600)

torch.save = half_then_hang
saver.save({"step": 40, "w": torch.ones(1000)}, [out / "ckpt.pt"])
time.sleep(600)
"""


@pytest.mark.parametrize("folder", STEPS)
def test_a_crash_during_a_write_leaves_the_previous_checkpoint(folder, tmp_path):
    (tmp_path / "crash.py").write_text(CRASH_DURING_WRITE)
    proc = start([PYTHON, tmp_path / "crash.py", ROOT / folder, tmp_path])
    try:
        wait_for(lambda: (tmp_path / "writing").exists() or proc.poll() is not None, 120, "it")
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        stop(proc)
    assert (tmp_path / "ckpt.pt.tmp").stat().st_size > 0  # the half-written one
    saved = CHECKPOINT[folder].load(tmp_path / "ckpt.pt")
    assert saved["step"] == 20 and torch.equal(saved["w"], torch.zeros(1000))


# resume with this run's settings -------------------------------------------------------------


def one_process(folder, data, out, *extra):
    """train_args for train.main() in this process, with the defaults of --save_every and
    --timeout; extra arguments override the others."""
    args = train_args(folder, data, out)
    at = args.index("--save_every")
    args = args[:at] + args[at + 2 : args.index("--timeout")]
    return [str(a) for a in [*args, *extra, "--out_dir", out, "--resume"]]


@pytest.fixture(scope="module", params=STEPS)
def resumed_in_one_process(request, data, tmp_path_factory):
    """train.main() in this process, with the default --save_every: 4 steps, then resumed to 8
    with another --weight_decay and a learning rate so high that the loss rises. Returns the
    step folder, the out_dir and what each of the two runs printed."""
    folder, out = request.param, tmp_path_factory.mktemp("one_process") / "out"
    common = ["--eval_every", 2, "--warmup_steps", 1]
    printed = []
    for extra in (["--max_steps", 4, "--lr", 3e-3], ["--max_steps", 8, "--lr", 1.0]):
        weight_decay = 0.1 if extra[1] == 4 else 0.05
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            args = [*common, *extra, "--weight_decay", weight_decay]
            TRAIN[folder].main(one_process(folder, data, out, *args))
        printed.append(stdout.getvalue())
    return folder, out, printed


def test_a_checkpoint_at_every_evaluation_and_best_pt_at_the_lowest_loss(resumed_in_one_process):
    _, out, (first, resumed) = resumed_in_one_process
    saves = [line for line in first.splitlines() + resumed.splitlines() if "saving" in line]
    both = f"{out / 'ckpt.pt'} and {out / 'best.pt'}"
    assert saves == [  # the loss falls until step 4, then the high learning rate raises it
        *(f"step {s:5d} | saving {both}" for s in (2, 4)),
        *(f"step {s:5d} | saving {out / 'ckpt.pt'}" for s in (6, 8)),
    ], saves
    last, best = (torch.load(out / name, weights_only=True) for name in ("ckpt.pt", "best.pt"))
    assert (last["step"], best["step"]) == (8, 4)
    assert last["best_val_loss"] == best["best_val_loss"]  # the resumed run kept step 4's


def test_a_resume_applies_this_runs_optimizer_settings_and_says_which(resumed_in_one_process):
    _, out, (_, resumed) = resumed_in_one_process
    assert f"resuming from {out / 'ckpt.pt'} at step 4\n" in resumed
    note = "note: this run's optimizer settings, not the saved ones: weight_decay 0.1 -> 0.05\n"
    assert resumed.count(note) == 1, resumed
    groups = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # matrices; biases and norms


# fp16 with loss scaling ------------------------------------------------------------------------


@pytest.mark.parametrize("folder", STEPS)
def test_fp16_overflow_skips_the_step_and_says_so(folder, data, tmp_path, monkeypatch):
    """A loss scale of 2**100 makes every fp16 gradient inf: GradScaler skips optimizer.step()
    and halves the scale, and train.py prints a line for each skipped step."""
    big = functools.partial(torch.amp.GradScaler, init_scale=2.0**100)
    monkeypatch.setattr(TRAIN[folder].torch.amp, "GradScaler", big)
    steps = []
    hook = register_optimizer_step_pre_hook(lambda *args: steps.append(1))
    try:
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            args = ["--dtype", "fp16", "--max_steps", 3, "--eval_every", 3]
            TRAIN[folder].main(one_process(folder, data, tmp_path / "out", *args))
    finally:
        hook.remove()
    skipped = [line for line in stdout.getvalue().splitlines() if "fp16 overflow" in line]
    assert skipped == [
        f"step {s:5d} | fp16 overflow: skipped; loss scale {2.0 ** (100 - s):g}" for s in (1, 2, 3)
    ]
    assert not steps  # the optimizer never stepped


@pytest.mark.parametrize("folder", STEPS)
def test_fp16_clips_the_unscaled_gradients_and_resumes_exactly(folder, data, tmp_path):
    """--dtype fp16 --grad_accum 2 --grad_clip 0.01 in this process: 4 steps at once, and 2 + 2
    with a resume. The optimizer sees the gradients unscaled and clipped, and the resumed run
    ends with the same weights and the same loss scaler state."""
    seen = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    common = ["--dtype", "fp16", "--grad_accum", 2, "--grad_clip", 0.01, "--eval_every", 2]
    hook = register_optimizer_step_pre_hook(record_norm)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            for out, steps in (("once", 4), ("resumed", 2), ("resumed", 4)):
                args = one_process(folder, data, tmp_path / out, *common, "--max_steps", steps)
                TRAIN[folder].main(args)
    finally:
        hook.remove()
    assert len(seen) == 8 and all(abs(n - 0.01) < 1e-5 for n in seen), seen
    once, resumed = (
        torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("once", "resumed")
    )
    assert once["scaler"] == resumed["scaler"] and once["scaler"]["_growth_tracker"] == 4
    for name, tensor in once["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


# --device cuda without a GPU -------------------------------------------------------------------


@pytest.mark.parametrize("folder", STEPS)
def test_device_cuda_without_a_gpu_stops_in_one_line_with_the_likely_causes(folder, data):
    """A Slurm job that asked for no GPUs, with CUDA hidden (as every test here runs)."""
    env = {k: v for k, v in worker_env(SLURM_JOB_ID=1).items() if not k.startswith("SLURM_GPUS")}
    cmd = [PYTHON, ROOT / folder / "train.py", "--device", "cuda"]
    result = run(cmd, timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.splitlines()[-1]
    assert line.startswith(
        "train.py: error: --device cuda, but PyTorch sees no GPU: CUDA_VISIBLE_DEVICES hides every "
        "GPU; the Slurm job requested no GPUs (sbatch --gpus-per-node=N); "
    ) and line.endswith("; or use --device cpu"), line
    # a CPU-only wheel says so; a CUDA wheel on a machine without a GPU (pip's default on Linux)
    # has nothing more to say, or points at the driver where one is installed
    without_cuda = f"this PyTorch ({torch.__version__}) is built without CUDA"
    assert (without_cuda in line) == (torch.version.cuda is None), line


@pytest.mark.parametrize("folder", STEPS)
def test_a_cuda_build_with_a_driver_but_no_gpu_points_at_the_driver(folder, monkeypatch, capsys):
    train = TRAIN[folder]
    monkeypatch.setattr(train.torch.version, "cuda", "12.8")
    monkeypatch.setattr(train.cluster.shutil, "which", lambda name: f"/usr/bin/{name}")
    for var in [v for v in os.environ if v.startswith(("SLURM_", "CUDA_VISIBLE_DEVICES"))]:
        monkeypatch.delenv(var)
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cuda"])
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(  # argparse's prog here: pytest
            "error: --device cuda, but PyTorch sees no GPU: the NVIDIA driver may be older "
            "than PyTorch's CUDA 12.8; or use --device cpu"
        )
    )
