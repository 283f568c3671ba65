"""What train.py reports while it trains: peak FLOP/s for MFU, memory, metrics.csv, the loss plot.

None of it is needed to train with DDP; it lives here so that train.py reads as the training loop.
"""

import csv
import functools
import resource
import sys
import time

import matplotlib

matplotlib.use("Agg")  # write image files; never open a window
import matplotlib.pyplot as plt
import torch
from model import memory_estimate

# Dense (no sparsity) bf16 tensor-core FLOP/s of one GPU from NVIDIA's datasheets, keyed by the
# exact name torch.cuda.get_device_name() returns. Exact, because names contain each other:
# "NVIDIA L4" is in "NVIDIA L40S", and an H100 NVL is not an H100 SXM. Any other GPU: --peak_flops.
GPU_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,  # the 94 GB card: 1,671 with sparsity
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,  # Grace Hopper: the same Hopper GPU as the H100 SXM
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}
# What the memory estimate leaves out on a GPU, added before saying "fits": the CUDA context
# (kernels, cuBLAS and NCCL state), which lives outside PyTorch's allocator and takes 0.5-1 GB, so
# 1 GB; and the caching allocator's slack, memory it holds in blocks too fragmented to reuse, for
# which 10 % of the estimate is a safe margin in steady training.
CUDA_CONTEXT_BYTES = 1e9
ALLOCATOR_SLACK = 0.10
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


def matmul_flops(dtypes, n, seconds):
    """{dtype: FLOP/s} of an n x n matmul with this process's threads: the best try of each
    within `seconds` (at least one). The dtypes take turns, so that both see the same load from
    other processes, which slows some tries down."""
    mats = {
        d: torch.randn(n, n, dtype=torch.bfloat16 if d == "bf16" else torch.float32) for d in dtypes
    }
    for m in mats.values():
        m @ m  # warm-up
    best, start = dict.fromkeys(dtypes, 0.0), time.perf_counter()
    while True:
        for d, m in mats.items():
            t = time.perf_counter()
            m @ m
            best[d] = max(best[d], 2 * n**3 / (time.perf_counter() - t))
        if time.perf_counter() - start > seconds:
            return best


@functools.cache  # once per process: the MFU peak and the bf16 hint share it
def measure_cpu_matmul_flops(n=1024):
    """{"fp32": FLOP/s, "bf16": FLOP/s} of this CPU, in about half a second. Without bf16
    instructions a bf16 matmul is ~20x slower than fp32 (a full-size one takes seconds), so both
    are first tried on small matrices, and bf16 is measured at full size only if it keeps up."""
    small = matmul_flops(["fp32", "bf16"], 256, seconds=0.02)
    if small["bf16"] < small["fp32"] / 2:
        return {"fp32": matmul_flops(["fp32"], n, seconds=0.4)["fp32"], "bf16": small["bf16"]}
    return matmul_flops(["fp32", "bf16"], n, seconds=0.5)


def measure_cpu_peak_flops(dtype="fp32", n=1024):
    """The CPU's peak for MFU: its fp32 matmul, or for bf16 training the faster of the two paths
    (autocast runs part of the work in fp32), so that a slow bf16 path shows up as a low MFU."""
    speeds = measure_cpu_matmul_flops(n)
    return max(speeds.values()) if dtype == "bf16" else speeds["fp32"]


def peak_flops_per_device(args, device):
    """(FLOP/s of one device for MFU, or None; where the figure comes from)."""
    if args.peak_flops:
        return args.peak_flops, "--peak_flops"
    if device.type == "cpu":
        return measure_cpu_peak_flops(args.dtype), "measured matmul"
    name = torch.cuda.get_device_name(device)
    if name in GPU_PEAK_FLOPS:
        return GPU_PEAK_FLOPS[name], f"{name}, dense bf16 from the datasheet"
    return None, f"{name!r} is not in report.py's table: pass --peak_flops, its dense bf16 FLOP/s"


def bf16_hint(args, device):
    """A line for CPU runs in fp32 (the default) where bf16 matmuls are at least twice as fast.
    fp32 stays the default so that a learner's numbers match the README's on every CPU."""
    if device.type != "cpu" or args.dtype != "fp32":
        return None
    speeds = measure_cpu_matmul_flops()
    ratio = speeds["bf16"] / speeds["fp32"]
    if ratio < 2:
        return None
    return (
        f"note: bf16 matmuls are {ratio:.1f}x faster than fp32 on this CPU: try --dtype bf16 (a "
        "step gains less, as norms and the loss stay fp32, and only if matmuls dominate it)"
    )


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
        need = total * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES
        verdict = (
            "fits"
            if need <= have
            else "does NOT fit: try --activation_checkpointing or a smaller --batch_size"
        )
        lines.append(
            f"  with {CUDA_CONTEXT_BYTES / 1e9:.0f} GB of CUDA context and "
            f"{100 * ALLOCATOR_SLACK:.0f}% allocator slack: {need / 1e9:.1f} GB of this GPU's "
            f"{have / 1e9:.1f} GB: {verdict}"
        )
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
        hint = bf16_hint(args, device)
        if hint:
            print(hint)
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
