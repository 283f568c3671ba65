"""Edges of steps 05 and 06 that must hold on a cluster: ranks that would resume from different
points stop in one line, --grad_clip 0 means no clipping, 05's token files are checked, checkpoints
are fsynced, the validation loss is all-reduced, dropout masks differ between steps and ranks, and
DDP keeps one copy of the gradients (no_sync() included) and broadcasts no buffers.

The 2-rank tests run train.py's own main() under torchrun through PROBE, a wrapper that records
what happened inside the run (dropout masks, where .grad lives, DDP's buffer broadcasts)."""

import csv
import json
import os
import re
import subprocess
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, import_step, load_script, start, stop, torchrun, worker_env
from torch.optim.optimizer import register_optimizer_step_pre_hook

STEPS = ["05_gpt_ddp", "06_llama_ddp"]


TRAIN = {folder: import_step(folder, "train") for folder in STEPS}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """05: a char-tokenized corpus (prepare.py); 06: random byte ids in .npy files, and a
    validation stream that 2 ranks x 1 sequence x 16 tokens do not split evenly."""
    root = tmp_path_factory.mktemp("edges")
    prepare = load_script("05_gpt_ddp/prepare.py", "edges_prepare")
    prepare.main(["--tokenizer", "char", "--data_dir", str(root / "05"), "--max_bytes", "60000"])
    (root / "06").mkdir()
    ids = np.random.default_rng(0).integers(0, 256, 20_000)
    np.save(root / "06" / "train.npy", ids)
    np.save(root / "06" / "val.npy", ids[-2000:])
    np.save(root / "06" / "val_uneven.npy", ids[:107])  # 3 steps of 2 x 16 tokens, 10 left over
    return root


def data_args(folder, data, valid="val.npy"):
    if folder == "05_gpt_ddp":
        return ["--data_dir", data / "05"]
    return ["--train_file", data / "06" / "train.npy", "--valid_file", data / "06" / valid]


def tiny_args(folder, data, *extra):
    """A short tiny-preset run: no samples, no MFU measurement, evaluations at 0 and the end."""
    args = ["--preset", "tiny", "--batch_size", 4, *data_args(folder, data), "--eval_batches", 1]
    args += ["--sample_every", 0, "--peak_flops", 1e12, *extra]
    args += ["--seq_len", 32] if folder == "06_llama_ddp" else []
    return [str(a) for a in args]


def exit_message(folder, args):
    """train.main's one-line exit for bad input (what it prints on stderr)."""
    with pytest.raises(SystemExit) as exc:
        TRAIN[folder].main([str(a) for a in args])
    return exc.value.code


def metrics(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def finish(procs, timeout):
    """The output of each process (started together with helpers.start) once all have ended;
    past the deadline all are stopped and the test fails with what they printed."""
    deadline = time.monotonic() + timeout
    try:
        return {
            name: proc.communicate(timeout=max(1, deadline - time.monotonic()))[0]
            for name, proc in procs.items()
        }
    except subprocess.TimeoutExpired:
        for proc in procs.values():
            stop(proc)
        outputs = "\n".join(f"--- {n} ---\n{p.communicate()[0][-2000:]}" for n, p in procs.items())
        raise AssertionError(f"timed out after {timeout}s\n{outputs}") from None
    finally:
        for proc in procs.values():
            stop(proc)


# checkpoints survive a lost node ------------------------------------------------------------


@pytest.mark.parametrize("folder", STEPS)
def test_checkpoint_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(
    folder, tmp_path, monkeypatch
):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):  # which file, and how many of its bytes had reached the OS by then
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt = tmp_path.resolve() / "ckpt.pt"
    TRAIN[folder].checkpoint.write_atomically(ckpt, {"weights": torch.arange(1000)})

    size = ckpt.stat().st_size
    tmp = f"{ckpt}.tmp"
    assert calls[0] == ("fsync", tmp, size)  # the whole file, before the rename
    assert calls[1] == ("replace", tmp, str(ckpt))
    assert calls[2][:2] == ("fsync", str(ckpt.parent)) and len(calls) == 3  # the new name
    assert torch.equal(torch.load(ckpt, weights_only=True)["weights"], torch.arange(1000))


# --grad_clip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", STEPS)
def test_grad_clip_0_means_no_clipping_and_a_clip_bounds_the_gradient_norm(
    folder, data, tmp_path, capsys
):
    """The norm of the gradients optimizer.step() receives: the raw norm (logged in metrics.csv)
    with --grad_clip 0, and exactly the clip when the raw norm is larger."""
    at_step = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        at_step.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    hook = register_optimizer_step_pre_hook(record_norm)
    try:
        for clip in (0, 0.01):
            out = tmp_path / f"clip{clip}"
            args = ["--out_dir", out, "--max_steps", 2, "--grad_clip", clip]
            TRAIN[folder].main(tiny_args(folder, data, *args))
            raw = [float(r["grad_norm"]) for r in metrics(out) if r["grad_norm"]]
            seen, at_step[:] = at_step[:], []
            assert len(seen) == len(raw) == 2 and min(raw) > 0.1, (raw, seen)
            expected = raw if clip == 0 else [clip] * 2
            np.testing.assert_allclose(seen, expected, rtol=1e-4)
    finally:
        hook.remove()
    negative = ["--out_dir", tmp_path / "neg", "--grad_clip", -1, "--max_steps", 1]
    with pytest.raises(SystemExit):  # argparse: usage, then one error line
        TRAIN[folder].main(tiny_args(folder, data, *negative))
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(
        "error: --lr must be positive; --warmup_steps, --sample_every, --seed, --grad_clip >= 0"
    )


# 05's token files ----------------------------------------------------------------------------


def test_05_odd_sized_or_out_of_vocabulary_token_files_give_one_line(data, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (d / name).write_bytes((data / "05" / name).read_bytes())
    args = tiny_args("05_gpt_ddp", data, "--out_dir", tmp_path / "out")
    args[args.index("--data_dir") + 1] = str(d)

    with open(d / "train.bin", "ab") as f:
        f.write(b"\x01")  # half a token: a truncated copy, say
    assert exit_message("05_gpt_ddp", args) == (
        f"train.py: error: {d / 'train.bin'} has an odd size, but holds 2-byte (uint16) token "
        "ids; run prepare.py again"
    )
    (d / "train.bin").write_bytes((data / "05" / "train.bin").read_bytes())

    meta = json.loads((d / "meta.json").read_text())
    assert np.fromfile(d / "train.bin", dtype=np.uint16).max() >= 64  # ASCII letters
    (d / "meta.json").write_text(json.dumps({**meta, "vocab_size": 64}))  # out of step
    assert exit_message("05_gpt_ddp", args) == (
        f"train.py: error: {d / 'train.bin'} has ids past meta.json's vocabulary of 64; "
        "run prepare.py again"
    )
    assert not (tmp_path / "out").exists()  # stopped before any training


# 06 has no dropout -----------------------------------------------------------------------------


def test_06_llama_has_no_dropout_so_no_masks_to_seed():
    """05 seeds its dropout masks per (seed, rank, step); the Llama has no dropout at all: its
    training forward draws no random numbers."""
    train = TRAIN["06_llama_ddp"]
    torch.manual_seed(0)
    model = train.Llama(train.config_for("tiny")).train()
    x = torch.randint(0, 256, (2, 16))
    torch.manual_seed(1)
    first, _ = model(x)
    torch.manual_seed(2)
    second, _ = model(x)
    assert torch.equal(first, second)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())


# ranks that disagree on where to resume ---------------------------------------------------------

RANK_ARGS = """
import os, runpy, sys
# run the script sys.argv[1] with "{rank}" in its arguments replaced by this worker's rank
script = sys.argv[1]
sys.argv = [script] + [a.replace("{rank}", os.environ["RANK"]) for a in sys.argv[2:]]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
def test_a_checkpoint_seen_by_one_rank_only_stops_in_one_line(data, tmp_path):
    """Per-rank --out_dir (per-node disks): rank 0 finds a ckpt.pt of step 1, rank 1 none. Both
    steps' runs at once; each must end with the one line, not a hang nor a collective error."""
    (tmp_path / "rank_args.py").write_text(RANK_ARGS)
    procs = {}
    for folder in STEPS:
        out = tmp_path / folder
        TRAIN[folder].main(tiny_args(folder, data, "--out_dir", out / "rank0", "--max_steps", 1))
        args = tiny_args(
            folder, data, "--out_dir", out / "rank{rank}", "--max_steps", 3, "--resume"
        )
        wrapper = [tmp_path / "rank_args.py", ROOT / folder / "train.py"]
        procs[folder] = start(torchrun("--standalone", "--nproc-per-node=2", *wrapper, *args))
    outputs = finish(procs, timeout=180)  # a hang fails here

    for folder, output in outputs.items():
        assert procs[folder].returncode != 0, output[-3000:]
        disagree = "step 0 on some ranks, 1 on others"
        if folder == "06_llama_ddp":
            disagree += "; loader_position 0 on some ranks, 1 on others"
        expected = {
            f"train.py: error: ranks disagree on where to resume ({disagree}): all must read "
            f"the same {tmp_path / folder / f'rank{rank}' / 'ckpt.pt'}"
            for rank in range(2)
        }
        # the two ranks write to one pipe, so their lines can meet on one line: cut at each message
        errors = re.findall(r"train\.py: error: .*?(?=train\.py: error:|\n|$)", output)
        # every rank prints it; torchrun may stop the second rank before it has printed
        assert errors and set(errors) <= expected and len(errors) <= 2, output[-3000:]
        assert "collective" not in output.lower() and "RuntimeError" not in output, output[-3000:]


# 2-rank runs with probes -------------------------------------------------------------------------

PROBE = '''
"""Run a step's train.py main() on this rank with probes; write what they saw to probe<rank>.json:
the dropout masks of every training forward, where each .grad lay after each no_sync()
micro-step, the buffer broadcasts DDP made after its start, and how much the resident memory
rose in each DDP pre-forward (where DDP regroups its buckets, once), between optimizer steps."""
import contextlib, hashlib, json, os, sys
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.optim.optimizer import register_optimizer_step_post_hook

folder, out, *argv = sys.argv[1:]
sys.path.insert(0, folder)
import train

seen = {"masks": [], "buffer_broadcasts": 0, "memory": []}  # memory: bytes, or "step"
register_optimizer_step_post_hook(lambda *args: seen["memory"].append("step"))

def status(field):  # bytes, from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
events = []  # ("grads", storages after a no_sync() micro-step), ("bucket", storage), in order
real_dropout = F.dropout

def recording_dropout(input, p=0.5, training=True, inplace=False):
    output = real_dropout(input, p, training, inplace)
    if training and p > 0:
        seen["masks"][-1].append(hashlib.sha1((output == 0).numpy().tobytes()).hexdigest())
    return output

F.dropout = recording_dropout  # nn.Dropout calls F.dropout

class ProbedDDP(train.DDP):
    def __init__(self, module, **kwargs):
        super().__init__(module, **kwargs)

        def recording_allreduce(state, bucket):  # DDP's own all-reduce, after noting the bucket
            events.append(("bucket", bucket.buffer().untyped_storage().data_ptr()))
            return default_hooks.allreduce_hook(state, bucket)

        self.register_comm_hook(None, recording_allreduce)
        module.register_forward_pre_hook(
            lambda mod, args: seen["masks"].append([]) if mod.training else None
        )
        broadcast = dist._broadcast_coalesced

        def counting_broadcast(*args, **kwargs):
            seen["buffer_broadcasts"] += 1
            return broadcast(*args, **kwargs)

        dist._broadcast_coalesced = counting_broadcast  # from here on: DDP's start is done

    def _pre_forward(self, *args, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set (VmHWM) starts again from now
        before = status("VmRSS:")
        result = super()._pre_forward(*args, **kwargs)
        seen["memory"].append(status("VmHWM:") - before)
        return result

    @contextlib.contextmanager
    def no_sync(self):
        with super().no_sync():
            yield
        # this micro-step's backward is done: where did autograd put each gradient?
        grads = [p.grad.untyped_storage().data_ptr() for p in self.module.parameters()]
        events.append(("grads", grads))

train.DDP = ProbedDDP
train.main(argv)
# for each no_sync() micro-step: which gradients lay in the buckets that this optimizer step's
# all-reduce then sent (DDP reallocates its buckets once, early in the second step)
seen["grads_in_buckets"] = []
for i, (kind, grads) in enumerate(events):
    if kind == "grads":
        buckets = set()
        for later, storage in events[i + 1 :]:
            if later == "grads":
                break
            buckets.add(storage)
        seen["grads_in_buckets"].append([g in buckets for g in grads])
with open(os.path.join(out, f"probe{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
'''


def start_probed(folder, out, args):
    """Start train.py's main() on 2 ranks under PROBE, with out as its --out_dir."""
    out.mkdir(parents=True)
    (out / "probe.py").write_text(PROBE)
    cmd = torchrun("--standalone", "--nproc-per-node=2", out / "probe.py", ROOT / folder, out)
    # every allocation of 64 kB or more is a fresh mapping, returned at its free: the resident
    # memory follows what is allocated (glibc would otherwise keep freed blocks around)
    return start([*cmd, *args, "--out_dir", out], env=worker_env(MALLOC_MMAP_THRESHOLD_=65536))


# 06 with its "small" preset (40M parameters): large enough that a second copy of the gradients
# (160 MB) stands out of the noise in the peak memory; one sequence of 16 tokens keeps it quick.
SMALL_06 = ["--preset", "small", "--batch_size", 1, "--seq_len", 16, "--max_steps", 2]
SMALL_06 += ["--eval_every", 2, "--eval_batches", 10, "--sample_every", 0, "--peak_flops", 1e12]


@pytest.fixture(scope="module")
def probed(data, tmp_path_factory):
    """Three 2-rank runs, started together (they overlap their start-up waits): 05 and 06 with
    --grad_accum 2, and 06 with --grad_accum 1 for the peak memory. For each: its out_dir, its
    output and each rank's probe record."""
    root = tmp_path_factory.mktemp("probed")
    args_05 = tiny_args("05_gpt_ddp", data, "--max_steps", 2, "--grad_accum", 2)
    args_05 += ["--eval_every", "2", "--eval_batches", "3"]  # the last --eval_batches counts
    small_06 = [str(a) for a in [*SMALL_06, *data_args("06_llama_ddp", data, "val_uneven.npy")]]
    runs = {
        "05_gpt_ddp": ("05_gpt_ddp", args_05),
        "06_llama_ddp": ("06_llama_ddp", [*small_06, "--grad_accum", "2"]),
        "06 accum 1": ("06_llama_ddp", [*small_06, "--grad_accum", "1"]),
    }
    outs = {name: root / name.replace(" ", "_") for name in runs}
    procs = {name: start_probed(folder, outs[name], args) for name, (folder, args) in runs.items()}
    results = {}
    for name, output in finish(procs, timeout=400).items():
        assert procs[name].returncode == 0, f"{name}:\n{output[-3000:]}"
        probes = [json.loads((outs[name] / f"probe{r}.json").read_text()) for r in range(2)]
        (outs[name] / "ckpt.pt").unlink()  # 06 small: 480 MB that no test reads
        results[name] = (outs[name], output, probes)
    return results


def reference_val_loss(folder, data):
    """The mean loss over every validation batch of both ranks, computed here in one process,
    summed per rank then across ranks as the all-reduce does: it must match to the last bit."""
    train = TRAIN[folder]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same matmul kernels, the same roundings
    try:
        torch.manual_seed(1337)  # train.py's default --seed: the weights at step 0
        if folder == "05_gpt_ddp":
            model = train.GPT(train.config_for("tiny", vocab_size=256)).eval()
            val = np.memmap(data / "05" / "val.bin", dtype=np.uint16, mode="r")
            cpu = torch.device("cpu")
            per_rank = [
                [train.get_batch(val, 4, 64, cpu, 1337, train.VAL_STREAM, r, i) for i in range(3)]
                for r in range(2)
            ]
        else:
            model = train.Llama(train.config_for("small")).eval()
            val = torch.from_numpy(np.load(data / "06" / "val_uneven.npy"))
            steps = (len(val) - 1) // (2 * 16)  # 3: whole steps of both ranks; 10 tokens unused
            # window k of 16 (+1 target) tokens; rank r reads windows r, r + 2, r + 4
            windows = [val[k * 16 : k * 16 + 17].view(1, 17) for k in range(2 * steps)]
            per_rank = [[(w[:, :-1], w[:, 1:]) for w in windows[r::2]] for r in range(2)]
        totals = []
        with torch.no_grad():
            for batches in per_rank:
                total = torch.zeros(2)
                for x, y in batches:
                    total += torch.stack([model(x, y)[1], torch.ones(())])
                totals.append(total)
        both = totals[0] + totals[1]
        return (both[0] / both[1]).item(), [(t[0] / t[1]).item() for t in totals]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("folder", STEPS)
def test_validation_loss_is_the_loss_over_every_batch_of_every_rank(folder, data, probed):
    out, _, _ = probed[folder]
    logged = float(metrics(out)[0]["val_loss"])  # step 0
    full, per_rank = reference_val_loss(folder, data)
    assert per_rank[0] != per_rank[1]  # so a rank's own mean would not pass
    assert logged == full, (logged, full, per_rank)


@pytest.mark.slow
@pytest.mark.parametrize("folder", STEPS)
def test_no_sync_gradients_stay_in_ddp_buckets(folder, probed):
    """gradient_as_bucket_view: each .grad is a view into DDP's bucket. After the first optimizer
    step (before it, .grad does not exist yet), the no_sync() micro-step must accumulate into
    those views: a fresh .grad tensor there is a second full copy of the gradients."""
    _, _, probes = probed[folder]
    for probe in probes:
        first_step, *later = probe["grads_in_buckets"]
        assert len(later) == 1 and all(later[0]), [sum(g) / len(g) for g in later]


@pytest.mark.slow
def test_peak_memory_of_gradient_accumulation_holds_no_second_gradient_copy(probed):
    """06 'small', 2 ranks: --grad_accum 2 against --grad_accum 1, same micro-batch. A second
    gradient copy would add the parameter bytes (measured with set_to_none=True: +1.07 of them)."""
    peaks, param_bytes = {}, None
    for name in ("06_llama_ddp", "06 accum 1"):
        out, stdout, _ = probed[name]
        peaks[name] = max(float(r["peak_mem_gb"]) for r in metrics(out) if r["peak_mem_gb"])
        param_bytes = float(re.search(r"([\d.]+)M parameters", stdout)[1]) * 1e6 * 4
    extra = (peaks["06_llama_ddp"] - peaks["06 accum 1"]) * 1e9
    assert extra < 0.25 * param_bytes, (peaks, param_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["06_llama_ddp", "06 accum 1"])
def test_ddp_regroups_its_buckets_before_the_optimizer_has_state(name, probed):
    """DDP regroups its gradient buckets once, in a pre-forward, with the old and the new buckets
    alive together: one extra copy of the gradients (4 bytes per parameter). train.py makes that
    happen before the first optimizer step, while AdamW has no state (8 bytes per parameter), so
    it stays under the training peak; left to DDP it comes in step 2, on top of that state."""
    out, stdout, probes = probed[name]
    param_bytes = float(re.search(r"([\d.]+)M parameters", stdout)[1]) * 1e6 * 4
    for probe in probes:
        events = probe["memory"]
        regroups = [i for i, e in enumerate(events) if e != "step" and e > 0.5 * param_bytes]
        assert len(regroups) == 1, events
        assert regroups[0] < events.index("step"), events
        assert events[regroups[0]] < 1.5 * param_bytes, events


@pytest.mark.slow
def test_dropout_masks_differ_between_steps_micro_steps_and_ranks(probed):
    _, _, probes = probed["05_gpt_ddp"]
    # the first two forwards of each rank are build_ddp_buckets' (random tokens, no step)
    forwards = [tuple(masks) for probe in probes for masks in probe["masks"][2:]]
    assert len(forwards) == 2 * 2 * 2  # ranks x steps x micro-steps
    assert all(len(masks) == 5 for masks in forwards)  # embeddings, 2 per block
    assert len(set(forwards)) == len(forwards)


@pytest.mark.slow
def test_ddp_broadcasts_no_buffers(probed):
    """06's only buffers, the RoPE tables, never change: no broadcast at any step (05's GPT has
    no buffers at all)."""
    for name in ("06_llama_ddp", "06 accum 1"):
        assert [probe["buffer_broadcasts"] for probe in probed[name][2]] == [0, 0]
    assert not list(TRAIN["05_gpt_ddp"].GPT(TRAIN["05_gpt_ddp"].config_for("tiny")).buffers())
