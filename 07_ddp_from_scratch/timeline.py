"""Time the four implementations side by side, and draw one profiled step of each: when every
rank computes its backward pass and when its all-reduces run, on one time axis.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 07_ddp_from_scratch/timeline.py

Writes out_dir/timeline.png and the raw profiles out_dir/trace_<impl>_rank<r>.json (open them in
https://ui.perfetto.dev or chrome://tracing), and prints a table of step times.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write image files; never open a window
import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function
from train import IMPLS, get_batch, make_model, setup, teardown, train_step, wrap

HERE = Path(__file__).resolve().parent
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # silences the profiler's "profiler_start" lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="timeline.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bucket_mb", type=float, default=1.0, help="bucket size (bucketed, torch)")
    p.add_argument("--batch_size", type=int, default=32, help="samples per rank")
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    p.add_argument("--out_dir", type=Path, default=HERE / "out", help="picture and traces")
    p.add_argument("--plot", type=Path, help="picture path (default: out_dir/timeline.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0 or not args.bucket_mb > 0:
        p.error("--steps, --batch_size and --bucket_mb must be positive")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu")
    if "LOCAL_RANK" not in os.environ:
        p.error("start me with torchrun, e.g. torchrun --standalone --nproc_per_node=2 timeline.py")
    return args


def timed_steps(models, batches, device):
    """Median step time (ms) of every implementation. The steps are taken in turns (naive,
    flat, bucketed, torch, naive, ...), so that a slow moment of a busy machine hits all four
    alike, and each starts behind a barrier, so that all ranks start it together."""
    times = {impl: [] for impl in models}
    for batch in batches:
        for impl, (model, optimizer) in models.items():
            dist.barrier()
            t0 = time.perf_counter()
            train_step(model, optimizer, [batch])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[impl].append((time.perf_counter() - t0) * 1000)
    return {impl: statistics.median(ms) for impl, ms in times.items()}


def profile_one_step(model, optimizer, batch, trace_path, device):
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    dist.barrier()
    with profile(activities=activities) as prof:
        with record_function("step"):
            train_step(model, optimizer, [batch])
            if device.type == "cuda":
                torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_path))


def read_spans(trace_path, on_gpu):
    """The times (ms) the picture and the table show, from a trace the profiler wrote:
    backward   the autograd engine's work on the training thread ("evaluate_function" events):
               the backward ops on a CPU, their launches on a GPU
    compute    what the picture draws in blue: backward on a CPU; every non-NCCL kernel on a GPU
    sent       when the training thread handed each all-reduce to the backend (c10d::allreduce_)
    allreduce  when the backend ran it: gloo on its own threads, NCCL in its own kernels
    step       our record_function around the whole step"""
    events = [e for e in json.loads(Path(trace_path).read_text())["traceEvents"] if "dur" in e]
    spans = {"step": None, "backward": [], "compute": [], "sent": [], "allreduce": []}
    for e in events:
        name, span = e["name"], (e["ts"] / 1000, (e["ts"] + e["dur"]) / 1000, e["tid"])
        if name == "step":
            spans["step"] = span[:2]
        elif name == "c10d::allreduce_":
            spans["sent"].append(span[0])
        elif name.startswith("autograd::engine::evaluate_function"):
            spans["backward"].append(span)
            if not on_gpu:
                spans["compute"].append(span)
        elif on_gpu and e.get("cat") == "kernel":
            spans["allreduce" if "nccl" in name.lower() else "compute"].append(span)
        elif not on_gpu and name == "gloo:all_reduce":
            spans["allreduce"].append(span)
    return spans


def summary(spans):
    """Numbers for the table, in ms from the moment the training thread finished backward: when
    the first all-reduce was sent, when the backend began to run it, when the last one was done."""
    backward_end = max(end for _, end, _ in spans["backward"])
    return {
        "n": len(spans["sent"]),
        "sent": min(spans["sent"]) - backward_end,
        "runs": min(start for start, _, _ in spans["allreduce"]) - backward_end,
        "done": max(end for _, end, _ in spans["allreduce"]) - backward_end,
    }


def draw(all_spans, step_ms, path, compute_label):
    """One panel per implementation; per rank a row of computation (compute_label) and a row of
    all-reduces (a sub-row per backend thread; a tick where each was sent). Every panel starts
    at its own step, and all share one time scale."""
    n_ranks = len(all_spans)
    fig, axes = plt.subplots(len(IMPLS), 1, figsize=(10, 1.2 + 1.5 * len(IMPLS)), sharex=True)
    for ax, impl in zip(axes, IMPLS, strict=True):
        origin = min(per_rank[impl]["step"][0] for per_rank in all_spans)
        labels = []
        for rank, per_rank in enumerate(all_spans):
            spans = per_rank[impl]
            row = 2 * (n_ranks - 1 - rank)  # rank 0 on top
            bars = [(s - origin, e - s) for s, e, _ in spans["compute"]]
            ax.broken_barh(bars, (row + 1.1, 0.8), color="tab:blue")
            threads = sorted({t for _, _, t in spans["allreduce"]})
            height = 0.8 / len(threads)
            for s, e, t in spans["allreduce"]:
                y = row + 0.1 + threads.index(t) * height
                ax.broken_barh([(s - origin, e - s)], (y, height), color="tab:orange", ec="black")
            sent = [t - origin for t in spans["sent"]]
            ax.plot(sent, [row + 0.95] * len(sent), "k|", markersize=12)
            start, end = spans["step"]
            ax.plot([start - origin, end - origin], [row + 2] * 2, color="gray", lw=1)
            labels += [
                (row + 0.5, f"rank {rank} all-reduce"),
                (row + 1.5, f"rank {rank} {compute_label}"),
            ]
        t = summary(all_spans[0][impl])
        ax.set_title(
            f"{impl}: {t['n']} all-reduce(s); rank 0 sends the first {t['sent']:+.1f} ms from "
            f"the end of its backward | step {step_ms[impl]:.1f} ms (median)",
            fontsize=9,
            loc="left",
        )
        ax.set_yticks([y for y, _ in labels], [text for _, text in labels], fontsize=8)
        ax.set_ylim(0, 2 * n_ranks + 0.2)
    axes[-1].set_xlabel(
        "ms since the first rank began the profiled step (grey line: the step; |: all-reduce sent)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)  # never a half-written picture
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup(args.device)
    models = {}
    for impl in IMPLS:  # four copies of the same model, one per implementation
        model = wrap(make_model(args.seed).to(device), impl, args.bucket_mb, device)
        models[impl] = model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [
        get_batch(args.seed, step, 0, rank, world_size, args.batch_size)
        for step in range(args.steps + 3)
    ]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    # Two warm-up steps each, not timed: DDP builds its real buckets after its first step.
    timed_steps(models, batches[:2], device)
    step_ms = timed_steps(models, batches[2:-1], device)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    spans = {}
    for impl, (model, optimizer) in models.items():
        trace = args.out_dir / f"trace_{impl}_rank{rank}.json"
        profile_one_step(model, optimizer, batches[-1], trace, device)
        spans[impl] = read_spans(trace, device.type == "cuda")
    all_spans = [None] * world_size
    dist.all_gather_object(all_spans, spans)  # rank 0 draws every rank's spans
    if rank == 0:
        plot = args.plot or args.out_dir / "timeline.png"
        draw(all_spans, step_ms, plot, "GPU kernels" if device.type == "cuda" else "backward")
        print(
            f"{world_size} ranks on {device.type}, buckets of {args.bucket_mb:g} MiB; step time: "
            f"median of {args.steps} steps each, taken in turns; the rest: rank 0's profiled "
            "step, in ms from the end of its backward computation"
        )
        print("| impl | all-reduces | first sent | first running | last done | step time |")
        print("|---|---|---|---|---|---|")
        for impl in IMPLS:
            t = summary(spans[impl])
            print(
                f"| {impl} | {t['n']} | {t['sent']:+.1f} ms | {t['runs']:+.1f} ms | "
                f"{t['done']:+.1f} ms | {step_ms[impl]:.1f} ms |"
            )
        traces = os.path.relpath(args.out_dir / "trace_<impl>_rank<r>.json")
        print(f"picture: {os.path.relpath(plot)}; traces: {traces}")
    teardown()


if __name__ == "__main__":
    main()
