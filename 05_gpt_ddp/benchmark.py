"""Throughput of train.py on this CPU: 1 rank vs 2 DDP ranks, one thread each, as a Markdown table.

    python 05_gpt_ddp/prepare.py --tokenizer char      # once
    python 05_gpt_ddp/benchmark.py --presets tiny small --dtypes fp32 bf16

The numbers come from each run's metrics.csv (median over the steps after a warm-up). The peak
FLOP/s for MFU is measured here once per dtype with one thread and passed to every run of that
dtype, so that MFU is comparable (for bf16 the faster of the bf16 and fp32 matmuls, as train.py
does). Memory is rank 0's peak resident set, which includes PyTorch itself (~0.3 GB), next to
train.py's estimate (written for a GPU: on a CPU, attention with dropout keeps the T x T matrix).

Two processes only run twice as fast as one if the machine really has two free cores: other jobs,
or virtual CPUs that share a physical core, take their part. So the benchmark also runs two
independent single-process trainings at the same time (same work, no DDP): the last column
compares a DDP rank with one of those, which leaves only the cost of DDP itself.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from model import GPT, config_for, memory_estimate, num_params

HERE = Path(__file__).resolve().parent


def measure_peak_flops(dtype, n=1024, seconds=3):
    torch.set_num_threads(1)
    a = torch.randn(n, n, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    a @ a
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def estimate_gb(preset, args, dtype):
    """train.py's memory estimate for this run (the vocabulary comes from the prepared data)."""
    vocab = json.loads((args.data_dir / "meta.json").read_text())["vocab_size"]
    cfg = config_for(preset, vocab_size=(vocab + 63) // 64 * 64)
    with torch.device("meta"):  # shapes only
        n_params = num_params(GPT(cfg))
    est = memory_estimate(cfg, n_params, args.batch_size, cfg.block_size, dtype, False)
    return sum(est.values()) / 1e9


def train_args(preset, dtype, args, peak, out_dir):
    return [
        str(HERE / "train.py"), "--preset", preset, "--data_dir", str(args.data_dir),
        "--out_dir", str(out_dir), "--device", "cpu", "--dtype", dtype,
        "--batch_size", str(args.batch_size),
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
        "peak_mem_gb": max(float(r["peak_mem_gb"]) for r in rows),
    }


def benchmark(preset, dtype, args, peak, tmp):
    """1 rank, 2 independent processes, 2 DDP ranks: the two table rows of this preset and dtype."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run_all([[*torchrun, "--nproc_per_node=1", *train_args(preset, dtype, args, peak, tmp / "1")]])
    one = medians(tmp / "1", args.warmup)
    alone = [tmp / f"alone{i}" for i in range(2)]
    run_all([[sys.executable, *train_args(preset, dtype, args, peak, d)] for d in alone])
    side_by_side = statistics.mean(medians(d, args.warmup)["tokens_per_s"] for d in alone)
    run_all([[*torchrun, "--nproc_per_node=2", *train_args(preset, dtype, args, peak, tmp / "2")]])
    two = medians(tmp / "2", args.warmup)
    estimate = estimate_gb(preset, args, dtype)
    rows = []
    for ranks, r in [(1, one), (2, two)]:
        per_rank = r["tokens_per_s"] / ranks
        vs_alone = f"{100 * per_rank / side_by_side:.0f}%" if ranks == 2 else "-"
        rows.append(
            f"| {preset} | {dtype} | {ranks} | {r['tokens_per_s']:,.0f} | {per_rank:,.0f} | "
            f"{100 * per_rank / one['tokens_per_s']:.0f}% | {vs_alone} | {100 * r['mfu']:.1f}% | "
            f"{r['step_ms']:.0f} ms | {100 * r['data_share']:.1f}% | "
            f"{r['peak_mem_gb']:.2f} GB | {estimate:.2f} GB |"
        )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--data_dir", type=Path, default=HERE / "data")
    p.add_argument("--batch_size", type=int, default=16, help="per rank")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the medians")
    args = p.parse_args()
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    if not (args.data_dir / "meta.json").is_file():
        p.error(f"{args.data_dir / 'meta.json'} not found; run prepare.py first")

    matmul = {dtype: measure_peak_flops(dtype) for dtype in ["fp32", "bf16"]}
    # as train.py: bf16 training is measured against the faster of the two matmul paths
    peaks = {"fp32": matmul["fp32"], "bf16": max(matmul.values())}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load} (other processes skew the numbers)")
    print(
        f"matmul 1024x1024, 1 thread: fp32 {matmul['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {matmul['bf16'] / 1e9:.1f} GFLOP/s\n"
    )
    print("| preset | dtype | ranks | tokens/s (all ranks) | tokens/s per rank "
          "| per rank vs 1 rank | per rank vs 2 independent processes | MFU | step time "
          "| data loading | peak memory per rank | estimate |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp_root:
        for preset in args.presets:
            for dtype in args.dtypes:
                tmp = Path(tmp_root) / preset / dtype
                for row in benchmark(preset, dtype, args, peaks[dtype], tmp):
                    print(row, flush=True)


if __name__ == "__main__":
    main()
