"""Step 07: data parallelism written by hand (07_ddp_from_scratch/), proven equal to torch's DDP.

Most checks share one torchrun of this very file on 2 CPU ranks (the `results` fixture): as a
script it runs `worker()`, which trains every implementation and writes what it saw to JSON.
A second torchrun runs timeline.py, whose traces the overlap test reads.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, load_script, run, torchrun, worker_env

STEP = ROOT / "07_ddp_from_scratch"
IMPLS = ["naive", "flat", "bucketed", "torch"]
STEPS = 3  # optimizer steps per training run in the worker
BATCH = 8  # per rank and micro-batch
TWO_RANKS = ["--standalone", "--nproc_per_node=2"]


def import_step07():
    """train.py does `from ddp_by_hand import ...`; that module is put in sys.modules while
    train.py loads, and any previous entry under that name is restored."""
    saved = sys.modules.get("ddp_by_hand")
    try:
        sys.modules["ddp_by_hand"] = load_script(STEP / "ddp_by_hand.py", "ddp_by_hand")
        return load_script(STEP / "train.py", "step07_train")
    finally:
        if saved is None:
            del sys.modules["ddp_by_hand"]
        else:
            sys.modules["ddp_by_hand"] = saved


# ---- the worker: runs on each rank under torchrun, when this file is run as a script ----------


def worker(out_dir):
    import torch.distributed as dist

    sys.path.insert(0, str(STEP))
    import ddp_by_hand
    import train

    rank, world_size, device = train.setup("cpu")
    calls = []  # one entry per all-reduce call, whoever makes it
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(1)
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # ddp_by_hand looks up dist.all_reduce at every call

    def build(impl, bucket_mb, dtype):
        model = train.make_model(seed=0).to(dtype)
        if rank == 1:  # a different start on rank 1: the wrappers must copy rank 0's weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
        model = train.wrap(model, impl, bucket_mb, device)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def batches(step, accum, rank, world_size, batch_size, dtype):
        micro = [train.get_batch(0, step, m, rank, world_size, batch_size) for m in range(accum)]
        return [(x.to(dtype), y) for x, y in micro]

    def counting_hook(names, ddp_buckets):
        """A DDP communication hook that records each bucket, then does what DDP's default
        does: divide by the world size, all-reduce (counted), hand back the result."""

        def hook(state, bucket):
            ddp_buckets[-1].append([names[p] for p in bucket.parameters()])
            work = dist.all_reduce(bucket.buffer().div_(world_size), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        return hook

    def tiles(bucket, buffer):
        """True if the .grad of the bucket's parameters are views of `buffer` (same memory) that
        cover it end to end without overlap."""
        same_memory = all(
            p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            for p in bucket
        )
        spans = sorted((p.grad.storage_offset(), p.grad.numel()) for p in bucket)
        ends = [0] + [offset + n for offset, n in spans]
        return same_memory and [o for o, _ in spans] == ends[:-1] and ends[-1] == buffer.numel()

    def weights(model):
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    result = {}
    # 1. final weights after STEPS steps, fp32 and fp64, with and without accumulation
    for dtype in [torch.float32, torch.float64]:
        for accum in [1, 2]:
            final = {}
            for impl in IMPLS:
                model, opt = build(impl, 1.0, dtype)
                for step in range(STEPS):
                    train.train_step(model, opt, batches(step, accum, rank, 2, BATCH, dtype))
                final[impl] = weights(model)
            key = f"{str(dtype)[6:]}_accum{accum}"
            result[key] = {
                impl: {
                    "equal_to_torch": torch.equal(final[impl], final["torch"]),
                    "max_diff_to_torch": (final[impl] - final["torch"]).abs().max().item(),
                }
                for impl in IMPLS
            }
            # the same steps in one process, on the combined batch of both ranks
            single = train.make_model(seed=0).to(dtype)
            opt = torch.optim.SGD(single.parameters(), lr=0.01, momentum=0.9)
            for step in range(STEPS):
                for x, y in batches(step, accum, 0, 1, 2 * BATCH, dtype):
                    (torch.nn.functional.cross_entropy(single(x), y) / accum).backward()
                opt.step()
                opt.zero_grad()
            for impl in IMPLS:
                diff = (final[impl] - weights(single)).abs().max().item()
                result[key][impl]["max_diff_to_single"] = diff
                everyone = [torch.empty_like(final[impl]) for _ in range(world_size)]
                dist.all_gather(everyone, final[impl])
                result[key][impl]["same_on_all_ranks"] = torch.equal(*everyone)

    # 2. all-reduce calls: per step, [after micro-batch 1 (inside no_sync), after micro-batch 2's
    # backward, after finish_gradient_sync]; and the buckets DDP reduces, by parameter names
    for impl, bucket_mb in [
        ("naive", 1),
        ("flat", 1),
        ("bucketed", 1),
        ("bucketed", 4),
        ("torch", 1),
        ("torch", 4),
    ]:
        model, opt = build(impl, bucket_mb, torch.float32)
        names = {p: n for n, p in model.named_parameters()}
        ddp_buckets = []
        if impl == "torch":
            model.register_comm_hook(None, counting_hook(names, ddp_buckets))
        counts = []
        for step in range(STEPS):
            ddp_buckets.append([])
            calls.clear()
            seen = []  # calls so far, after each stage of the step
            for i, (x, y) in enumerate(batches(step, 2, rank, 2, BATCH, torch.float32)):
                with model.no_sync() if i == 0 else contextlib.nullcontext():
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                seen.append(len(calls))
            if impl != "torch":
                model.finish_gradient_sync()
            opt.step()
            opt.zero_grad(set_to_none=False)
            seen.append(len(calls))
            counts.append([seen[0], seen[1] - seen[0], seen[2] - seen[1]])
        params = list(model.module.parameters())
        predicted = ddp_by_hand.assign_buckets(params, bucket_mb)
        entry = {
            "counts": counts,
            "n_params": len(params),
            "predicted": [[names[p] for p in bucket] for bucket in predicted],
            "ddp_buckets": ddp_buckets,
        }
        if impl == "bucketed":
            # every .grad lives in its bucket's buffer, and together they tile it exactly
            entry["grads_are_views"] = all(
                tiles(bucket, buffer)
                for bucket, buffer in zip(model.buckets, model.bucket_buffers, strict=True)
            )
            entry["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.bucket_buffers)
            entry["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
        result[f"{impl}_{bucket_mb}"] = entry

    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    train.teardown()


# ---- the tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("step07")
    cmd = torchrun(*TWO_RANKS, __file__, out)
    run(cmd, timeout=240, env=worker_env(), check=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("accum", [1, 2])
def test_hand_written_versions_end_with_exactly_ddps_weights(results, accum):
    # 2 ranks: a + b == b + a in floating point, and halving is exact, so whether a version
    # divides before or after the sum (DDP: before) cannot change a bit.
    for rank in range(2):
        for impl in IMPLS:
            r = results[rank][f"float32_accum{accum}"][impl]
            assert r["equal_to_torch"], (impl, rank, r["max_diff_to_torch"])
            assert r["same_on_all_ranks"], (impl, rank)


@pytest.mark.parametrize("accum", [1, 2])
def test_every_version_equals_one_process_on_the_combined_batch(results, accum):
    """Not bit for bit: one process sums 2 x 8 per-sample gradients in one matmul, two ranks sum
    8 each and then add the two sums, so the rounding differs. In float64 (eps 1.1e-16) with
    weights below 1, such reordering moves a weight by a few eps after 3 steps (measured: 5.6e-17,
    and 6e-8 in float32); a real error moves it by far more than 1e-12 (measured, float64: no
    division by the world size 0.07, one micro-batch lost 0.03, rank 0's half of the data alone
    0.02)."""
    for rank in range(2):
        for impl in IMPLS:
            diff = results[rank][f"float64_accum{accum}"][impl]["max_diff_to_single"]
            assert diff < 1e-12, (impl, rank, diff)
    # and in float32 the same holds within float32's rounding
    for impl in IMPLS:
        assert results[0][f"float32_accum{accum}"][impl]["max_diff_to_single"] < 1e-5


def test_all_reduce_calls_per_step(results):
    """[inside no_sync, during the synced backward, in finish_gradient_sync], for each step."""
    for rank in range(2):
        r = results[rank]
        n_params = r["naive_1"]["n_params"]
        assert n_params == 14
        assert r["naive_1"]["counts"] == [[0, 0, n_params]] * STEPS  # one per tensor, after
        assert r["flat_1"]["counts"] == [[0, 0, 1]] * STEPS  # one, after
        for mb, expected in [(1, 6), (4, 2)]:
            entry = r[f"bucketed_{mb}"]
            assert len(entry["predicted"]) == expected
            # one per bucket, all sent during backward; none inside no_sync
            assert entry["counts"] == [[0, expected, 0]] * STEPS


def test_ddp_reduces_the_buckets_we_predict_from_its_second_step_on(results):
    for rank in range(2):
        for mb in [1, 4]:
            entry = results[rank][f"torch_{mb}"]
            first, *later = entry["ddp_buckets"]
            # step 1: DDP does not trust the registration order yet and sends everything as
            # one bucket, after backward; then it rebuilds by the order gradients arrived
            assert len(first) == 1 and len(first[0]) == 14
            for step_buckets in later:
                assert step_buckets == entry["predicted"], (mb, rank)
            n = len(entry["predicted"])
            assert entry["counts"] == [[0, 1, 0]] + [[0, n, 0]] * (STEPS - 1)


def test_bucketed_gradients_are_views_into_the_buckets(results):
    for rank in range(2):
        for mb in [1, 4]:
            entry = results[rank][f"bucketed_{mb}"]
            assert entry["grads_are_views"]
            assert entry["buffer_bytes"] == entry["param_bytes"]  # one copy of the gradients


def read_trace(path):
    """From a profiler trace: the end of the backward computation, and the start times of the
    all-reduces as sent by the training thread and as run by gloo's threads (µs)."""
    events = [e for e in json.loads(path.read_text())["traceEvents"] if "dur" in e]
    backward_end = max(
        e["ts"] + e["dur"]
        for e in events
        if e["name"].startswith("autograd::engine::evaluate_function")
    )
    sent = sorted(e["ts"] for e in events if e["name"] == "c10d::allreduce_")
    ran = sorted(e["ts"] for e in events if e["name"] == "gloo:all_reduce")
    return backward_end, sent, ran


def test_timeline_shows_all_reduces_overlapping_backward_only_for_bucketed_and_ddp(tmp_path):
    cmd = torchrun(*TWO_RANKS, STEP / "timeline.py", "--steps", 2, "--out_dir", tmp_path)
    out = run(cmd, timeout=240, env=worker_env(), check=True).stdout
    assert (tmp_path / "timeline.png").stat().st_size > 20_000
    assert "| bucketed | 6 |" in out and "| naive | 14 |" in out
    expected = {"naive": 14, "flat": 1, "bucketed": 6, "torch": 6}
    for impl, n in expected.items():
        ran_during_backward = []
        for rank in range(2):
            backward_end, sent, ran = read_trace(tmp_path / f"trace_{impl}_rank{rank}.json")
            assert len(sent) == len(ran) == n, (impl, rank)
            if impl in ("bucketed", "torch"):
                # every bucket is sent from inside backward, the first long before its end
                assert sent[-1] <= backward_end and sent[0] < backward_end, (impl, rank)
            else:
                assert sent[0] > backward_end, (impl, rank)
            ran_during_backward.append(ran[0] < backward_end)
        # gloo's threads really run it meanwhile (on at least one rank: on a busy machine the
        # OS may hold a thread back for the few ms left of the other rank's backward)
        assert any(ran_during_backward) == (impl in ("bucketed", "torch")), impl


def test_start_up_plan_names_the_buckets_in_backward_order():
    train = import_step07()
    model = train.make_model(seed=0)
    assert train.describe("naive", model, 1).startswith("naive: 14 all-reduce calls per step")
    assert train.describe("flat", model, 1).startswith("flat: 1 all-reduce call per step")
    plan = train.describe("bucketed", model, 1).splitlines()
    assert plan[0].startswith("bucketed: 6 buckets of ~1 MiB -> 6 all-reduce calls per step")
    assert plan[1].endswith("fc7.bias fc7.weight fc6.bias fc6.weight")  # last layer first
    assert plan[-1].endswith("fc1.bias fc1.weight")  # the remainder, 0.13 MiB
    assert "DDP's step 1" in train.describe("torch", model, 1)


def test_chapter_command_prints_the_plan_and_all_ranks_end_equal():
    args = ["--steps", 2, "--grad_accum", 2, "--bucket_mb", 4]
    cmd = torchrun(*TWO_RANKS, STEP / "train.py", *args)
    out = run(cmd, timeout=120, env=worker_env(), check=True).stdout
    assert "bucketed: 2 buckets of ~4 MiB -> 2 all-reduce calls per step" in out
    assert "(the same on every rank)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bucket_mb", "0"], "--bucket_mb and --lr must be positive"),
        (["--bucket_mb", "nan"], "--bucket_mb and --lr must be positive"),
        (["--steps", "0"], "--steps must be positive"),
        (["--impl", "magic"], "invalid choice: 'magic'"),
    ],
)
def test_bad_arguments_are_one_line(args, message, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    train = import_step07()
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        exit_info.value.code == 2 and err[-1].startswith("train.py: error:") and message in err[-1]
    )


def test_without_torchrun_it_says_how_to_start_it(monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit):
        import_step07().parse_args([])
    assert "start me with torchrun" in capsys.readouterr().err


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    worker(sys.argv[1])
