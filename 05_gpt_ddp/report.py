"""What train.py reports while it trains: peak FLOP/s for MFU, memory, metrics.csv, the loss plot.

None of it is needed to train with DDP; it lives here so that train.py reads as the training loop.
"""

import csv
import resource
import sys
import time

import matplotlib

matplotlib.use("Agg")  # write image files; never open a window
import matplotlib.pyplot as plt
import torch
from model import memory_estimate

# Dense bf16 tensor-core peak FLOP/s from the vendors' datasheets, matched against the CUDA
# device name in this order (first match wins, so "H100 PCIe" before "H100", "L40S" before "L4").
GPU_PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]
METRICS = [
    "step",
    "tokens",
    "train_loss",
    "val_loss",
    "lr",
    "grad_norm",
    "step_ms",
    "data_ms",
    "tokens_per_s",
    "mfu",
    "peak_mem_gb",
]


def measure_cpu_peak_flops(dtype="fp32", n=1024, repeats=10):
    """FLOP/s of an n x n matmul with this process's threads, best of several (other busy
    processes slow some repeats down). For bf16 training both fp32 and bf16 are timed and the
    faster counts: the peak is what the CPU can do, so a slow bf16 path shows up as a low MFU."""
    best = 0.0
    for name in ["fp32", "bf16"] if dtype == "bf16" else ["fp32"]:
        a = torch.randn(n, n, dtype=torch.bfloat16 if name == "bf16" else torch.float32)
        b = torch.randn_like(a)
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
            if time.perf_counter() - start > 1:  # enough on a CPU where this path is slow
                break
    return best


def peak_flops_per_device(args, device):
    if args.peak_flops:
        return args.peak_flops, "--peak_flops"
    if device.type == "cpu":
        return measure_cpu_peak_flops(args.dtype), "measured matmul"
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops, f"{name} bf16 datasheet"
    return None, f"unknown GPU {name!r}: pass --peak_flops"


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # largest resident set of this process: KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


def print_memory_estimate(cfg, n_params, args, seq_len, device):
    est = memory_estimate(
        cfg, n_params, args.batch_size, seq_len, args.dtype, args.activation_checkpointing
    )
    total = sum(est.values())
    lines = [f"  {k:32s} {v / 1e9:8.3f} GB" for k, v in est.items() if v]
    lines.append(f"  {'total (estimate)':32s} {total / 1e9:8.3f} GB per rank")
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
        verdict = "fits" if total < 0.9 * have else "does NOT fit: try --activation_checkpointing"
        lines.append(f"  this GPU has {have / 1e9:.1f} GB: {verdict}")
    print("memory estimate:\n" + "\n".join(lines))


def open_metrics(path, start_step):
    """metrics.csv; a resumed run keeps the rows up to its checkpoint (later ones are redone)."""
    rows = []
    if start_step > 0 and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, METRICS)
    writer.writeheader()
    writer.writerows(rows)
    return f, writer


def plot_losses(metrics_path, out_dir, title):
    with open(metrics_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(7, 4))
    for column, style, label in [
        ("train_loss", "-", "train (rank 0's batches)"),
        ("val_loss", "o-", "validation (all ranks)"),
    ]:
        points = [(int(r["tokens"]), float(r[column])) for r in rows if r[column]]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, alpha=0.8, markersize=3)
    ax.set(xlabel="tokens seen", ylabel="cross-entropy loss (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        fig.savefig(out_dir / f"loss.{suffix}", dpi=120)
    plt.close(fig)


class TrainingLog:
    """Rank 0's record of the run: the printed progress lines, metrics.csv and loss.png/pdf."""

    def __init__(self, args, start_step, tokens_per_step, flops_per_token, world_size, device):
        self.args, self.device = args, device
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        peak, source = peak_flops_per_device(args, device)
        peak_text = f"{peak / 1e12:.3f} TFLOP/s" if peak else "unknown"
        print(f"peak per device for MFU: {peak_text} ({source})")
        # MFU: the FLOP/s of all ranks together against what all their devices could do
        self.peak_all_ranks = peak * world_size if peak else None
        self.path = args.out_dir / "metrics.csv"
        self.title = (
            f"{args.preset}: {world_size} {device.type} rank(s), {tokens_per_step:,} tokens/step"
        )
        self.file, self.writer = open_metrics(self.path, start_step)

    def write(self, row):
        self.writer.writerow(row)
        self.file.flush()

    def validation(self, step, val_loss):
        print(f"step {step:5d} | val loss {val_loss:.4f}")
        self.write({"step": step, "tokens": step * self.tokens_per_step, "val_loss": val_loss})

    def train_step(self, step, loss, lr, grad_norm, seconds, data_seconds):
        tokens_per_s = self.tokens_per_step / seconds
        flops = self.flops_per_token * tokens_per_s
        mfu = flops / self.peak_all_ranks if self.peak_all_ranks else float("nan")
        mem = peak_memory_gb(self.device)
        self.write(
            {
                "step": step,
                "tokens": step * self.tokens_per_step,
                "train_loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "step_ms": 1000 * seconds,
                "data_ms": 1000 * data_seconds,
                "tokens_per_s": tokens_per_s,
                "mfu": mfu,
                "peak_mem_gb": mem,
            }
        )
        if step % self.args.log_every == 0 or step == self.args.max_steps:
            print(
                f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.2f}"
                f" | {1000 * seconds:.0f} ms (data {100 * data_seconds / seconds:.0f}%)"
                f" | {tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | mem {mem:.2f} GB"
            )

    def plot(self):
        plot_losses(self.path, self.args.out_dir, self.title)

    def close(self):
        self.file.close()
