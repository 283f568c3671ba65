"""Throughput of train.py on this CPU: 1 rank vs 2 DDP ranks, one thread each, as a Markdown table.

    python 05_gpt_ddp/prepare.py --tokenizer char      # once
    python 05_gpt_ddp/benchmark.py --presets tiny small

The numbers come from each run's metrics.csv (median over the steps after a warm-up). One peak
FLOP/s, measured here with one thread, is passed to every run so that MFU is comparable.

Two processes only run twice as fast as one if the machine really has two free cores: other jobs,
or virtual CPUs that share a physical core, take their part. So the benchmark also runs two
independent single-process trainings at the same time (same work, no DDP): the last column
compares a DDP rank with one of those, which leaves only the cost of DDP itself.
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def measure_peak_flops(n=1024, seconds=3):
    torch.set_num_threads(1)
    a = torch.randn(n, n)
    a @ a
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def train_args(preset, args, peak, out_dir):
    return [
        str(HERE / "train.py"), "--preset", preset, "--data_dir", str(args.data_dir),
        "--out_dir", str(out_dir), "--device", "cpu", "--batch_size", str(args.batch_size),
        "--max_steps", str(args.steps), "--eval_every", str(args.steps), "--eval_batches", "1",
        "--save_every", str(args.steps), "--sample_every", "0", "--peak_flops", str(peak),
    ]  # fmt: skip


def run_all(commands):
    """Start all commands at once and wait for them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in commands]
    if any(p.wait(timeout=3600) for p in procs):
        sys.exit("benchmark.py: error: a training run failed, see the errors above")


def medians(out_dir, warmup):
    with open(out_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train_loss"] and int(r["step"]) > warmup]

    def median(column):
        return statistics.median(float(r[column]) for r in rows)

    return {
        "tokens_per_s": median("tokens_per_s"),
        "mfu": median("mfu"),
        "step_ms": median("step_ms"),
        "data_share": median("data_ms") / median("step_ms"),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--data_dir", type=Path, default=HERE / "data")
    p.add_argument("--batch_size", type=int, default=16, help="per rank")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the medians")
    args = p.parse_args()
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")

    peak = measure_peak_flops()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load} (other processes skew the numbers)")
    print(f"peak for MFU: {peak / 1e9:.1f} GFLOP/s (fp32 matmul, 1 thread)\n")
    print("| preset | ranks | tokens/s (all ranks) | tokens/s per rank | per rank vs 1 rank "
          "| per rank vs 2 independent processes | MFU | step time | data loading |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    with tempfile.TemporaryDirectory() as tmp_root:
        for preset in args.presets:
            tmp = Path(tmp_root) / preset
            run_all([[*torchrun, "--nproc_per_node=1", *train_args(preset, args, peak, tmp / "1")]])
            one = medians(tmp / "1", args.warmup)
            alone = [tmp / f"alone{i}" for i in range(2)]
            run_all([[sys.executable, *train_args(preset, args, peak, d)] for d in alone])
            side_by_side = statistics.mean(medians(d, args.warmup)["tokens_per_s"] for d in alone)
            run_all([[*torchrun, "--nproc_per_node=2", *train_args(preset, args, peak, tmp / "2")]])
            two = medians(tmp / "2", args.warmup)
            for ranks, r in [(1, one), (2, two)]:
                per_rank = r["tokens_per_s"] / ranks
                vs_alone = f"{100 * per_rank / side_by_side:.0f}%" if ranks == 2 else "-"
                print(
                    f"| {preset} | {ranks} | {r['tokens_per_s']:,.0f} | {per_rank:,.0f} | "
                    f"{100 * per_rank / one['tokens_per_s']:.0f}% | {vs_alone} | "
                    f"{100 * r['mfu']:.1f}% | {r['step_ms']:.0f} ms | "
                    f"{100 * r['data_share']:.1f}% |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
