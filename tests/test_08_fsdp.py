"""Step 08: ZeRO-1 and FSDP2 (08_fsdp/), on CPU ranks over gloo, the tiny preset.

Runs are shared. One launch per world size (1, 2 and 4 ranks, all three at once) computes every
stage for the equality tests and measures memory; four train.py runs at once (2 and 4 ranks,
each uninterrupted and killed) serve the checkpoint tests, the uninterrupted 2-rank one also the
slow-disk, resharding and export tests.
"""

import json
import os
import shutil
import textwrap

import pytest
import torch
from helpers import PYTHON, ROOT, import_step, run, script, start, torchrun, worker_env
from test_05_06_edges import finish

TRAIN, EXPORT = script("08_fsdp/train.py"), script("08_fsdp/export.py")
PREPARE, GENERATE = script("05_gpt_ddp/prepare.py"), script("05_gpt_ddp/generate.py")
STAGES = ("ddp", "zero1", "zero2", "zero3")
STEPS, LR = 3, 1e-3  # the equality runs

M, PAR, CKPT, MEM = import_step("08_fsdp", "model", "parallelize", "checkpoint", "memory")


def plain_model(seed=0, **overrides):
    """08's initial weights on one process, as every stage and world size draws them."""
    with torch.device("meta"):
        model = M.GPT(M.config_for("tiny", dropout=0.0, **overrides))
    PAR.to_empty_keeping_ties(model, torch.device("cpu"))
    PAR.init_weights(model, seed)
    return model


def test_meta_device_init_keeps_the_tie_and_gpts_distribution():
    model = plain_model()
    assert model.head.weight is model.wte.weight  # to_empty alone would untie them
    torch.manual_seed(0)
    reference = M.GPT(M.config_for("tiny", dropout=0.0))  # step 05's init
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.std() == 0:  # biases and LayerNorms: exact
            assert torch.equal(p, q), name
        else:
            assert abs(p.std() / q.std() - 1) < 0.1 and abs(p.mean()) < 0.01, name


# 1. Equality and memory: one launch per world size -------------------------------------------

SHARED_WORKER = (
    textwrap.dedent(
        """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "08_fsdp"))
    import torch, torch.distributed as dist
    from torch.distributed.tensor import DTensor
    import benchmark, checkpoint, memory, parallelize, train
    from model import GPT, config_for

    dist.init_process_group("gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    cfg, cpu = config_for("tiny", dropout=0.0), torch.device("cpu")
    off = torch.autocast("cpu", enabled=False)
    # name: (micro-batches, clip, sync every micro-batch, dtype, stages)
    CONFIGS = {"plain": (1, 0.0, False, "fp32", parallelize.STAGES),
               "accum+clip": (2, 0.05, False, "fp32", parallelize.STAGES),
               "accum+clip, sync every micro-batch": (2, 0.05, True, "fp32", ("zero2", "zero3")),
               "fp16, accum+clip": (2, 0.05, False, "fp16", ("ddp", "zero1"))}

    def batches(step, r, accum):  # rank r's micro-batches of one step: 2 sequences of 32 tokens
        g = torch.Generator().manual_seed(1000 * step + r)
        tokens = [torch.randint(0, 256, (2, 33), generator=g) for _ in range(accum)]
        return [(t[:, :-1], t[:, 1:]) for t in tokens]

    def run(stage, accum, clip, sync_every, dtype, one_process=False):
        with torch.device("meta"):
            model = GPT(cfg)
        if one_process:  # no wrapper, on the combined batch of all ranks
            parallelize.to_empty_keeping_ties(model, cpu)
            parallelize.init_weights(model, 0)
            wrapped = model
        else:
            wrapped = parallelize.parallelize(model, stage, cpu, dtype, 0)
        opt = train.make_optimizer(model, @LR@, 0.1, cpu, "ddp" if one_process else stage)
        params = [p for _, p in model.named_parameters()]
        autocast = torch.autocast("cpu", dtype=torch.float16, enabled=dtype == "fp16")
        scaler = torch.amp.GradScaler("cpu", enabled=dtype == "fp16")
        norms = []
        for s in range(@STEPS@):
            if one_process:
                every = [batches(s, r, accum) for r in range(W)]
                micro = [tuple(torch.cat([every[r][i][k] for r in range(W)]) for k in (0, 1))
                         for i in range(accum)]
            else:
                micro = batches(s, rank, accum)
            # train.py's step
            train.forward_backward(wrapped, micro, autocast, scaler, sync_every)
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=False)
            norms.append(parallelize.global_norm(norm).item())
        full = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
                for n, p in model.named_parameters()}
        return {"weights": full, "norms": norms, "tied": model.head.weight is model.wte.weight}

    result = {}
    if W > 1:
        for name, (*config, stages) in CONFIGS.items():
            result[name] = {stage: run(stage, *config) for stage in stages}
            if rank == 0 and config[3] == "fp32":
                result[name]["one process"] = run("ddp", *config, one_process=True)
        # an optimizer built after a forward holds the root's gathered weights, not the shards
        with torch.device("meta"):
            late = GPT(cfg)
        wrapped = parallelize.parallelize(late, "zero3", cpu, "fp32", 0)
        wrapped(*batches(0, rank, 1)[0])
        opt = parallelize.make_optimizer([{"params": list(late.parameters())}], "zero3", 1e-3,
                                         False)
        result["optimizer after a forward"] = parallelize.check_optimizer_holds_shards(opt,
                                                                                       "zero3")
    # resharding: 2 ranks write a zero3 checkpoint, 4 ranks and 1 load it at other stages
    ckpt_dir = os.path.join(sys.argv[2], "ckpt-000002")
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()

    def whole_state(params, opt):  # every tensor of the state, gathered from all ranks
        state = checkpoint.state_dict(params, opt)
        mine = {f"model.{n}": full(t) for n, t in state["model"].items()}
        for n, s in state["optimizer"].items():  # zero1: the AdamW states of this rank's share
            mine |= {f"optimizer.{n}.{k}": full(t) for k, t in s.items()}
        everyone = [None] * W
        dist.all_gather_object(everyone, mine)
        return {k: v for d in everyone for k, v in d.items()}

    def sharded(stage, seed):
        with torch.device("meta"):
            model = GPT(cfg)
        wrapped = parallelize.parallelize(model, stage, cpu, "fp32", seed)
        params = list(model.named_parameters())
        return wrapped, params, train.make_optimizer(model, 1e-3, 0.1, cpu, stage)

    if W == 2:  # what each stage costs: benchmark.py's collectives of one step
        bcfg = config_for("tiny", n_layer=8, dropout=0.0)
        g = torch.Generator().manual_seed(rank)
        tokens = [torch.randint(0, 256, (8, 65), generator=g) for _ in range(2)]
        micro = [(t[:, :-1], t[:, 1:]) for t in tokens]
        result["costs"] = {}
        for stage, accum, sync in benchmark.RUNS:
            setup = benchmark.setup(stage, bcfg, None)
            benchmark.step(setup, micro[:accum], sync)  # warm-up: DDP's buckets, AdamW's states
            found = benchmark.count(setup, micro[:accum], sync)
            result["costs"][f"{stage} {accum} {sync}"] = (found, benchmark.sent_per_rank(found, W))
        wrapped, params, opt = sharded("zero3", 0)
        for s in range(2):  # AdamW states that are not zeros
            train.forward_backward(wrapped, batches(s, rank, 1), off)
            opt.step()
        checkpoint.write(checkpoint.state_dict(params, opt), [Path(ckpt_dir)], {"step": 2},
                         dist.group.WORLD)
        result["written"] = whole_state(params, opt)
    else:  # wait for the 2 ranks' checkpoint, then load it at two stages
        deadline = time.monotonic() + 300
        while not os.path.isdir(ckpt_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        result["loaded"] = {}
        for stage in ("zero1", "zero3") if W == 4 else ("ddp", "zero3"):
            wrapped, params, opt = sharded(stage, 1)  # other weights, then the checkpoint's
            checkpoint.load(ckpt_dir, params, opt)
            result["loaded"][stage] = whole_state(params, opt)
    mcfg = config_for(memory.MEASURED["preset"], n_layer=memory.MEASURED["n_layer"],
                      dropout=memory.MEASURED["dropout"])
    rows = {stage: memory.measure_stage(stage, mcfg) for stage in parallelize.STAGES}
    everyone = [None] * W
    dist.all_gather_object(everyone, rows)
    result["memory"] = everyone
    if rank == 0:
        torch.save(result, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
    time.sleep(0.1)
    """
    )
    .replace("@LR@", repr(LR))
    .replace("@STEPS@", str(STEPS))
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """{world size: the worker's result} for 1, 2 and 4 ranks, launched at once."""
    tmp = tmp_path_factory.mktemp("shared")
    (tmp / "worker.py").write_text(SHARED_WORKER)
    procs = {}
    for w in (1, 2, 4):
        worker = [tmp / "worker.py", tmp / f"result{w}.pt", tmp]
        procs[w] = start(torchrun("--standalone", f"--nproc_per_node={w}", *worker))
    outputs = finish(procs, timeout=400)
    for w, proc in procs.items():
        assert proc.returncode == 0, outputs[w][-3000:]
    return {w: torch.load(tmp / f"result{w}.pt", weights_only=True) for w in procs}


CONFIGS = ("plain", "accum+clip")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_zero1_equals_ddp_bit_for_bit(shared, world):
    """ZeRO-1 runs DDP's all-reduce and the same elementwise AdamW on each rank's share, then
    copies the updated weights: nothing is summed in another order. fp16 too: GradScaler's
    overflow check sees every gradient on every rank, as in DDP."""
    for config in (*CONFIGS, "fp16, accum+clip"):
        ddp, zero1 = shared[world][config]["ddp"], shared[world][config]["zero1"]
        assert zero1["norms"] == ddp["norms"], config
        for name, w in ddp["weights"].items():
            assert torch.equal(zero1["weights"][name], w), (config, name)


def assert_close_to(run, reference, initial, what):
    """Rounding apart, equal. zero2/zero3 sum the W ranks' gradients in a reduce-scatter instead
    of an all-reduce, and the norm over shards: the same numbers in another order, so each
    gradient and norm agrees to a few units of fp32 rounding (2^-24 relative per addition).
    AdamW divides each gradient by its own running size, so an element whose gradient cancels
    to rounding level across ranks may move differently, by up to lr per step: at most
    2 * steps * lr anywhere. Everywhere else the difference stays at rounding level: per tensor,
    below 1e-3 of how far the weights moved."""
    for a, b in zip(run["norms"], reference["norms"], strict=True):
        assert abs(a - b) <= 1e-6 * b, (what, run["norms"], reference["norms"])
    for name, w in reference["weights"].items():
        diff = run["weights"][name] - w
        moved = (w - initial[name]).norm()
        assert diff.abs().max() <= 2 * STEPS * LR, (what, name, diff.abs().max())
        assert diff.norm() <= 1e-3 * moved, (what, name, diff.norm() / moved)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_zero2_zero3_equal_ddp_and_one_process_up_to_rounding(shared, world):
    initial = {n: p.detach() for n, p in plain_model().named_parameters()}
    for config in CONFIGS:
        runs = shared[world][config]
        for stage in ("zero2", "zero3"):
            assert_close_to(runs[stage], runs["ddp"], initial, (config, stage, "vs ddp"))
            assert_close_to(runs[stage], runs["one process"], initial, (config, stage, "vs 1"))
        # the logged norm is the global one (pytorch/pytorch#170862: a partial norm per rank)
        assert_close_to(runs["ddp"], runs["one process"], initial, (config, "ddp vs 1"))
    # both choices of set_requires_gradient_sync give the same step
    accum = shared[world]["accum+clip"]
    for stage, every in shared[world]["accum+clip, sync every micro-batch"].items():
        assert_close_to(every, accum["ddp"], initial, (stage, "sync every micro-batch"))


@pytest.mark.slow
def test_tied_weights_stay_tied_and_the_optimizer_must_hold_shards(shared):
    for world in (2, 4):
        for config in (*CONFIGS, "accum+clip, sync every micro-batch", "fp16, accum+clip"):
            assert all(r["tied"] for r in shared[world][config].values()), (world, config)
    message = shared[2]["optimizer after a forward"]
    assert message.startswith("the optimizer holds") and "before the first forward" in message


@pytest.mark.slow
def test_memory_per_rank_matches_the_formula_in_every_cell(shared, tmp_path):
    rows = MEM.table({w: shared[w]["memory"] for w in (1, 2, 4)})
    assert {(r[0], r[1]) for r in rows} == {(s, w) for s in STAGES for w in (1, 2, 4)}
    for stage, w, f_between, m_between, f_peak, m_peak, paper in rows:
        assert abs(m_between / f_between - 1) < 0.10, (stage, w, m_between, f_between)
        assert abs(m_peak / f_peak - 1) < 0.10, (stage, w, m_peak, f_peak)
        if stage != "zero2":  # zero2's FSDP keeps a sharded copy too: 4 + 16/W, not 4 + 12/W
            assert abs(m_between / paper - 1) < 0.10, (stage, w, m_between, paper)
    cell = {(r[0], r[1]): r for r in rows}
    # sharding what it says: zero3 between steps falls as 1/W, ddp never
    assert cell["zero3", 4][3] < 0.26 * cell["zero3", 1][3]
    assert cell["ddp", 4][3] == cell["ddp", 1][3]
    MEM.draw(rows, tmp_path / "m.png")  # the README's picture, from these numbers
    assert (tmp_path / "m.png").stat().st_size > 10_000


@pytest.mark.slow
def test_collectives_per_stage_zero3_sends_one_and_a_half_times_ddps_bytes(shared):
    """benchmark.py's counts of one step at 2 ranks, tiny GPT with 8 blocks: zero2 sends what
    ddp sends (a reduce-scatter and an all-gather instead of an all-reduce's two halves), zero3
    gathers each block twice (forward and backward) and the root once: 1.5x."""
    costs = shared[2]["costs"]
    ddp = costs["ddp 1 False"][1]
    assert costs["zero2 1 False"][1] == pytest.approx(ddp, rel=0.01)
    assert costs["zero3 1 False"][1] / ddp == pytest.approx(1.5, abs=0.05)
    assert costs["zero1 1 False"][1] / ddp == pytest.approx(1.5, abs=0.01)  # + the broadcasts
    zero3 = costs["zero3 1 False"][0]
    assert zero3["all-gather"][0] == 2 * 8 + 1 and zero3["reduce-scatter"][0] == 8 + 1
    # the gradient norm: one all-reduce of 100 fp32 partial norms (one per parameter tensor)
    assert zero3["all-reduce"] == [1, 4 * len(list(plain_model(n_layer=8).parameters()))]
    # accumulation: one reduce-scatter per group per step, or per micro-batch if asked
    assert costs["zero3 2 False"][0]["reduce-scatter"][0] == 9
    assert costs["zero3 2 True"][0]["reduce-scatter"][0] == 18
    assert costs["ddp 2 False"][0]["all-reduce"] == costs["ddp 1 False"][0]["all-reduce"]


def test_gpu_plan_uses_step_05s_margins_and_fits_four_24gb_cards_with_zero3(capsys):
    MEM.plan("gpt-1.4b")
    table = capsys.readouterr().out
    # micro-batch 4 (8 with activation checkpointing) on 4 x 24 GB; ddp nowhere on 24 GB
    assert "| zero3 | 4 | 12.1 | 4 / 8 | 8 / 16 | 16 / 32 |" in table
    assert "| ddp | 4 | 32.4 | no |" in table
    report = import_step("08_fsdp", "report")
    a10 = report.GPUS["NVIDIA A10"]  # NCCL's margin grows with the ranks, as in step 05
    assert MEM.need_bytes(0, 4, a10) == sum(b for _, b in report.outside_allocator(4, a10))
    assert MEM.need_bytes(0, 4, a10) > MEM.need_bytes(0, 1, a10)


# 2. Checkpoints: four train.py runs at once ----------------------------------------------------

SAVE_EVERY, RUN_STEPS = 10, 30
TIMEOUT, WRITE_DELAY = 10, 15  # seconds: the collective timeout, and the slowed first write
# Injected by the test, not in the scripts. "slow": rank 0's first DCP write sleeps past the
# collective timeout (one rank's slow disk). "kill": the last rank SIGKILLs itself once the first
# checkpoint is complete (torchrun restarts all ranks). A marker file makes each happen once.
INJECT = """
import os
if "RANK" in os.environ and os.environ.get("INJECT"):
    import pathlib, signal, threading, time
    what, marker = os.environ["INJECT"], pathlib.Path(os.environ["INJECT_MARKER"])
    if what == "slow":
        import torch.distributed.checkpoint as dcp
        real_save = dcp.save

        def slow_save(*args, **kwargs):
            if os.environ["RANK"] == "0" and not marker.exists():
                marker.write_text("slowed")
                time.sleep(float(os.environ["WRITE_DELAY"]))
            return real_save(*args, **kwargs)

        dcp.save = slow_save
    last = int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1
    if what == "kill" and last and not marker.exists():
        out = pathlib.Path(os.environ["INJECT_OUT"])

        def kill_after_the_first_checkpoint():
            while not any(out.glob("ckpt-*")):
                time.sleep(0.01)
            marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=kill_after_the_first_checkpoint, daemon=True).start()
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt08") / "data"
    cmd = [PYTHON, PREPARE, "--tokenizer", "char", "--data_dir", d, "--max_bytes", 100_000]
    run(cmd, timeout=120, check=True)
    return d


def train_args(data_dir, out, steps=RUN_STEPS):
    return ["--preset", "tiny", "--data_dir", data_dir, "--out_dir", out, "--max_steps", steps,
            "--batch_size", 4, "--eval_every", steps, "--eval_batches", 2, "--save_every",
            SAVE_EVERY, "--sample_every", 0, "--log_every", 100, "--timeout", TIMEOUT,
            "--peak_flops", 1e12, "--resume"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """{(ranks, "clean"/"killed"): (output, out_dir)}: zero3, 30 steps, a checkpoint every 10.
    The clean 2-rank run's first writes are slowed past the collective timeout."""
    root = tmp_path_factory.mktemp("runs")
    (root / "inject").mkdir()
    (root / "inject" / "sitecustomize.py").write_text(INJECT)
    procs, outs = {}, {}
    for nproc in (2, 4):
        for kind in ("clean", "killed"):
            out = outs[nproc, kind] = root / f"{kind}{nproc}"
            env = worker_env(PYTHONPATH=f"{root / 'inject'}{os.pathsep}{ROOT}",
                             INJECT_MARKER=root / f"{kind}{nproc}.marker", INJECT_OUT=out,
                             WRITE_DELAY=WRITE_DELAY)  # fmt: skip
            if kind == "killed":
                env["INJECT"] = "kill"
            elif nproc == 2:
                env["INJECT"] = "slow"
            flags = ["--standalone", f"--nproc_per_node={nproc}", "--max-restarts=1"]
            procs[nproc, kind] = start(torchrun(*flags, TRAIN, *train_args(data_dir, out)), env=env)
    outputs = finish(procs, timeout=400)
    for key, proc in procs.items():
        assert proc.returncode == 0, (key, outputs[key][-3000:])
    return {key: (outputs[key], outs[key]) for key in procs}, root


def dcp_state(ckpt_dir):
    """The whole weights and AdamW states of a checkpoint folder, read in this process (from
    the files of all ranks that wrote it: resharding to 1)."""
    model = plain_model()
    opt = torch.optim.AdamW(model.parameters())
    params = list(model.named_parameters())
    CKPT.load(ckpt_dir, params, opt)
    state = CKPT.state_dict(params, opt)
    return {f"model.{n}": t.clone() for n, t in state["model"].items()} | {
        f"optimizer.{n}.{k}": t.clone() for n, s in state["optimizer"].items() for k, t in s.items()
    }


def final_checkpoint(out):
    (ckpt,) = CKPT.checkpoints(out)
    assert ckpt.name == f"ckpt-{RUN_STEPS:06d}"
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_sigkill_and_restart_resume_bit_identical(runs, nproc):
    (outputs, root) = runs
    output, killed = outputs[nproc, "killed"]
    assert (root / f"killed{nproc}.marker").read_text() == "killed"  # the kill really happened
    assert "exitcode: -9" in output and output.count("resuming from") == 1, output[-3000:]
    assert "resuming from" not in outputs[nproc, "clean"][0]
    a, b = (
        dcp_state(final_checkpoint(outputs[nproc, "clean"][1])),
        dcp_state(final_checkpoint(killed)),
    )
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_a_write_slower_than_the_collective_timeout_fails_nothing(runs):
    """Rank 0's first write sleeps past --timeout: the saves' collectives are in their own
    process group, so no training collective waits for rank 0's disk, and the run ends with
    every checkpoint whole (the final one equals the killed-and-resumed run's, tested above)."""
    (outputs, root) = runs
    output, out = outputs[2, "clean"]
    assert (root / "clean2.marker").read_text() == "slowed"  # the delay was really injected
    assert "resuming from" not in output and "Timed out" not in output
    assert f"step {SAVE_EVERY:5d} | saving {out / 'ckpt-000010'}" in output
    assert f"step {RUN_STEPS:5d} | saving {out / f'ckpt-{RUN_STEPS:06d}'}" in output
    assert (out / "best-000030" / "meta.json").is_file()  # the best one: the only evaluation


@pytest.mark.slow
def test_two_rank_checkpoint_loads_on_4_and_1_with_the_full_state(shared):
    """A zero3 checkpoint written by 2 ranks, read by 4 ranks at zero1 and zero3 and by 1 rank
    at ddp and zero3: every weight and AdamW state equals what the 2 ranks held."""
    written = shared[2]["written"]
    assert len(written) > 20
    for w, stages in ((4, ("zero1", "zero3")), (1, ("ddp", "zero3"))):
        for stage in stages:
            loaded = shared[w]["loaded"][stage]
            assert loaded.keys() == written.keys(), (w, stage)
            for k, v in written.items():
                assert torch.equal(loaded[k], v), (w, stage, k)
    fresh = {n: p for n, p in plain_model(seed=1).named_parameters()}
    assert not torch.equal(fresh["wte.weight"], written["model.wte.weight"])  # really loaded


@pytest.mark.slow
def test_resume_on_one_process_announces_the_changes_and_continues(runs, data_dir, tmp_path):
    (outputs, _) = runs
    ckpt = final_checkpoint(outputs[2, "clean"][1])
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(ckpt, out / ckpt.name)
    cmd = [PYTHON, TRAIN, *train_args(data_dir, out, RUN_STEPS + 2), "--stage", "ddp",
           "--log_every", 1, "--weight_decay", 0.05]  # fmt: skip
    result = run(cmd, timeout=200, check=True)
    assert f"resuming from {out / ckpt.name} at step {RUN_STEPS}" in result.stdout
    note = "note: saved with 2 ranks, now 1: the batches differ from an uninterrupted run"
    assert note in result.stdout
    changed = "note: this run's optimizer settings, not the saved ones: weight_decay 0.1 -> 0.05"
    assert changed in result.stdout
    assert f"step {RUN_STEPS + 1:5d} | loss" in result.stdout
    assert [c.name for c in CKPT.checkpoints(out)] == [f"ckpt-{RUN_STEPS + 2:06d}"]


@pytest.mark.slow
def test_export_gives_a_file_that_step_05_generate_completes_from(runs, tmp_path):
    (outputs, _) = runs
    out = outputs[2, "clean"][1]
    output = tmp_path / "ckpt.pt"
    run([PYTHON, EXPORT, "--out_dir", out, "--output", output], timeout=120, check=True)
    exported = torch.load(output, weights_only=True)
    for name, w in dcp_state(final_checkpoint(out)).items():
        if name.startswith("model."):
            assert torch.equal(exported["model"][name[len("model.") :]], w), name
    cmd = [PYTHON, GENERATE, "--checkpoint", output, "--prompt", "def ", "--max_new_tokens", 30,
           "--device", "cpu"]  # fmt: skip
    text = run(cmd, timeout=120, check=True).stdout
    assert text.startswith("def ") and len(text.encode()) > 20


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = plain_model()
    opt = torch.optim.AdamW(model.parameters())
    params = list(model.named_parameters())
    meta = {"step": 10, "world_size": 1, "stage": "ddp"}
    first = tmp_path / "ckpt-000010"
    CKPT.write(CKPT.state_dict(params, opt), [first], meta, None)
    with torch.no_grad():
        for _, p in params:
            p.add_(1.0)

    def crash(*args):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(CKPT.os, "replace", crash)  # dies after writing, before the rename
    with pytest.raises(KeyboardInterrupt):
        CKPT.write(CKPT.state_dict(params, opt), [tmp_path / "ckpt-000020"], meta, None)
    monkeypatch.undo()
    assert (tmp_path / ".ckpt-000020.tmp").is_dir()  # the half-done save
    assert CKPT.checkpoints(tmp_path) == [first]
    restored = plain_model(seed=1)
    CKPT.load(first, list(restored.named_parameters()), torch.optim.AdamW(restored.parameters()))
    for (name, p), q in zip(restored.named_parameters(), plain_model().parameters(), strict=True):
        assert torch.equal(p, q), name
    # the next save clears the temp folder; a best-* folder shares its files
    paths = [tmp_path / "ckpt-000020", tmp_path / "best-000020"]
    CKPT.write(CKPT.state_dict(params, opt), paths, meta, None)
    assert [c.name for c in CKPT.checkpoints(tmp_path)] == ["ckpt-000020"]
    assert not (tmp_path / ".ckpt-000020.tmp").exists()
    (shard,) = paths[1].glob("*.distcp")
    assert shard.stat().st_ino == (paths[0] / shard.name).stat().st_ino  # a hard link


# 3. Bad input ----------------------------------------------------------------------------------


def test_stages_that_cannot_run_stop_in_one_line(data_dir, tmp_path):
    cmd = [PYTHON, TRAIN, "--stage", "zero3", "--data_dir", data_dir, "--out_dir", tmp_path]
    result = run(cmd, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("train.py: error: --stage zero3 shards the training state")
    fp16 = run([*cmd, "--dtype", "fp16"], timeout=60)
    assert fp16.returncode == 2 and fp16.stderr == f"train.py: error: {PAR.NO_FP16}\n"


def test_foreign_or_mismatched_checkpoint_stops_in_one_line(data_dir, tmp_path):
    folder = tmp_path / "ckpt-000010"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"format": "something else"}))
    cmd = [PYTHON, TRAIN, "--stage", "ddp", "--data_dir", data_dir, "--out_dir", tmp_path]
    result = run([*cmd, "--resume"], timeout=60)
    assert result.stderr == (
        f"train.py: error: {folder} is not a checkpoint of 08_fsdp/train.py; "
        "use another --out_dir\n"
    )
    result = run(cmd, timeout=60)
    assert "exists; pass --resume to continue it" in result.stderr
    meta = {"format": CKPT.FORMAT, "step": 10, "preset": "tiny", "config": {"vocab_size": 99}}
    (folder / "meta.json").write_text(json.dumps(meta))
    result = run([*cmd, "--resume", "--preset", "small"], timeout=60)
    assert result.stderr.startswith(
        f"train.py: error: {folder} holds a 'tiny' model (vocabulary 99)"
    )
    assert result.stderr.count("\n") == 1
