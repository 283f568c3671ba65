"""What each stage costs: collectives per optimizer step (calls, bytes) and step time, side by side.

    torchrun --standalone --nproc_per_node=2 08_fsdp/benchmark.py

Every stage trains the same model on the same batches in one run, taking turns, so all see the
same load. The collectives of one step are read from the profiler (the c10d operations DDP,
ZeroRedundancyOptimizer and FSDP call), their bytes from the tensors' shapes. "sent per rank"
is what a ring algorithm sends: (W - 1) / W of the tensor, twice for an all-reduce (a
reduce-scatter, then an all-gather). On a CPU step times only show the shape: gloo's threads
share the cores with the compute, where NCCL on GPUs works beside it.
"""

import argparse
import math
import os
import statistics
import sys
import time

import parallelize
import torch
import torch.distributed as dist
import train
from model import GPT, config_for, num_params
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # silences the profiler's start/stop lines
# c10d operation: (name in the table, index of the input whose size is the whole tensor)
COLLECTIVES = {
    "c10d::allreduce_": ("all-reduce", 0),
    "c10d::_allgather_base_": ("all-gather", 0),
    "c10d::_reduce_scatter_base_": ("reduce-scatter", 1),
    "c10d::broadcast_": ("broadcast", 0),
}
RUNS = [  # (stage, micro-batches per step, --sync_every_micro_batch)
    ("ddp", 1, False), ("zero1", 1, False), ("zero2", 1, False), ("zero3", 1, False),
    ("ddp", 2, False), ("zero3", 2, False), ("zero3", 2, True),
]  # fmt: skip


def numel(shape):
    if shape and isinstance(shape[0], list):  # a list of tensors
        return sum(numel(s) for s in shape)
    return math.prod(shape) if shape else 0


def payload(event, index, gloo_calls):
    """Elements of the collective's whole tensor. The profiler records no shapes for a list of
    tensors (DDP's all-reduce, a broadcast): then the first gloo call after it tells (gloo
    runs it on its own thread)."""
    shapes = event.input_shapes
    n = numel(shapes[index]) if len(shapes) > index else 0
    if n == 0:
        later = [g for g in gloo_calls if g.time_range.start >= event.time_range.start]
        if later:
            gloo_calls.remove(later[0])
            n = numel(later[0].input_shapes[0])
    return n


def setup(stage, cfg, args):
    with torch.device("meta"):
        model = GPT(cfg)
    wrapped = parallelize.parallelize(model, stage, torch.device("cpu"), "fp32", seed=0)
    if isinstance(wrapped, DDP):
        # DDP all-reduces its buckets from C++, out of the profiler's sight; this hook is DDP's
        # own all-reduce (divide by W, sum), issued from Python, where the profiler sees it
        wrapped.register_comm_hook(None, default_hooks.allreduce_hook)
    optimizer = train.make_optimizer(model, 1e-3, 0.1, torch.device("cpu"), stage)
    return model, wrapped, optimizer, [p for p in model.parameters()]


def step(run, batches, sync_every):
    """train.py's optimizer step (fp32, clipping at 1.0), timed."""
    model, wrapped, optimizer, params = run
    off = torch.autocast("cpu", enabled=False)
    t0 = time.perf_counter()
    train.forward_backward(wrapped, batches, off, sync_every=sync_every)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return time.perf_counter() - t0


def count(run, batches, sync_every):
    """{collective: [calls, bytes]} of one optimizer step."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(run, batches, sync_every)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    gloo_calls = [e for e in events if e.name.startswith("gloo:") and e.input_shapes]
    found = {}
    for event in events:
        if event.name in COLLECTIVES:
            name, index = COLLECTIVES[event.name]
            calls_bytes = found.setdefault(name, [0, 0])
            calls_bytes[0] += 1
            calls_bytes[1] += 4 * payload(event, index, gloo_calls)  # fp32
    return found


def sent_per_rank(found, world):
    """Bytes a ring algorithm sends per rank for {collective: [calls, bytes]}: (W - 1) / W of each
    tensor, twice for an all-reduce (a reduce-scatter, then an all-gather)."""
    twice = {"all-reduce": 2}
    return sum(twice.get(k, 1) * (world - 1) / world * b for k, (_, b) in found.items())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per stage (median)")
    p.add_argument("--n_layer", type=int, default=8, help="blocks of the tiny GPT")
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config_for("tiny", n_layer=args.n_layer, dropout=0.0)
    gen = torch.Generator().manual_seed(rank)
    tokens = [torch.randint(0, 256, (8, 65), generator=gen) for _ in range(2)]
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    runs = [setup(stage, cfg, args) for stage, _, _ in RUNS]
    todo = list(zip(runs, RUNS, strict=True))
    for run, (_, accum, sync) in todo:  # warm-up: DDP rebuilds its buckets, AdamW its states
        step(run, batches[:accum], sync)
    counts = [count(run, batches[:accum], sync) for run, (_, accum, sync) in todo]
    times = [[] for _ in RUNS]
    for _ in range(args.steps):  # in turns: every stage sees the same load
        for i, (run, (_, accum, sync)) in enumerate(todo):
            times[i].append(step(run, batches[:accum], sync))
    if rank == 0:
        n = num_params(runs[0][0])
        print(f"tiny GPT, {args.n_layer} blocks, {n / 1e6:.2f}M parameters ({4 * n / 1e6:.2f} MB "
              f"fp32), {world} CPU ranks, micro-batches of 8 x 64 tokens")  # fmt: skip
        print("| stage | all-reduce | all-gather | reduce-scatter | broadcast | sent per rank "
              "| vs ddp | step time |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        base = None
        for (stage, accum, sync), found, ts in zip(RUNS, counts, times, strict=True):
            cells = []
            for name in ("all-reduce", "all-gather", "reduce-scatter", "broadcast"):
                calls, size = found.get(name, (0, 0))
                cells.append(f"{calls} x, {size / 1e6:.2f} MB" if calls else "-")
            sent = sent_per_rank(found, world)
            base = base or sent
            label = stage + (f", {accum} micro-batches" if accum > 1 else "")
            label += ", sync every micro-batch" if sync else ""
            print(f"| {label} | {' | '.join(cells)} | {sent / 1e6:.2f} MB | {sent / base:.2f}x | "
                  f"{1000 * statistics.median(ts):.0f} ms |")  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    time.sleep(0.1)  # gloo's exit abort workaround (docs/gloo_exit_abort.md)


if __name__ == "__main__":
    sys.exit(main())
