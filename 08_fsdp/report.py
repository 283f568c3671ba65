"""What train.py reports while it trains: peak FLOP/s for MFU, memory (and whether it fits a GPU,
also as a --plan for any GPU), passes over the data, metrics.csv, TensorBoard events, the loss plot.

None of it is needed to train with DDP; it lives here so that train.py reads as the training loop.
"""

import csv
import functools
import importlib.util
import re
import resource
import sys
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # write image files; never open a window
import matplotlib.pyplot as plt
import torch
from model import memory_estimate, num_params


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: float  # bytes
    major: int  # CUDA compute capability: 8 Ampere/Ada, 9 Hopper, 10 Blackwell
    bf16_flops: float | None  # dense bf16 tensor-core FLOP/s, None if unknown


# Dense (no sparsity) bf16 tensor-core FLOP/s of one GPU from NVIDIA's datasheets, its memory
# (the datasheet's, in decimal GB: a card reports a little more) and its architecture, keyed by
# the exact name torch.cuda.get_device_name() returns. Exact, because names contain each other:
# "NVIDIA L4" is in "NVIDIA L40S", and an H100 NVL is not an H100 SXM. Any other GPU: --peak_flops.
GPUS = {
    name: Gpu(name, memory_gb * 1e9, major, tflops * 1e12)
    for name, tflops, memory_gb, major in [
        ("NVIDIA H100 80GB HBM3", 989, 80, 9),  # H100 SXM5
        ("NVIDIA H100 PCIe", 756, 80, 9),
        ("NVIDIA H100 NVL", 835, 94, 9),  # 1,671 with sparsity
        ("NVIDIA H200", 989, 141, 9),  # H200 SXM
        ("NVIDIA H200 NVL", 835, 141, 9),
        ("NVIDIA GH200 480GB", 989, 96, 9),  # Grace Hopper: the H100 SXM's GPU, 96 GB of HBM3
        ("NVIDIA B200", 2250, 180, 10),
        ("NVIDIA A100-SXM4-80GB", 312, 80, 8),
        ("NVIDIA A100-SXM4-40GB", 312, 40, 8),
        ("NVIDIA A100-PCIE-40GB", 312, 40, 8),
        ("NVIDIA A100 80GB PCIe", 312, 80, 8),
        ("NVIDIA L40S", 362, 48, 8),
        ("NVIDIA L40", 181, 48, 8),
        ("NVIDIA L4", 121, 24, 8),
        ("NVIDIA A10", 125, 24, 8),
    ]
}
# fp32 matmuls run as TF32 on tensor cores (train.py allows it). Every datasheet above gives TF32
# at half its bf16 rate (H100 SXM: 494.7 against 989.4 dense TFLOP/s), so MFU of an fp32 run is
# measured against half the bf16 figure.
TF32_FRACTION = 0.5
# What the memory estimate leaves out on a GPU, added before saying "fits". Outside PyTorch's
# allocator: the CUDA context (kernels, cuBLAS), 0.5-1 GB, so 1 GB; with 2 ranks or more, NCCL's
# buffers for its peers, 544 MB (2 ranks) to 688 MB (more) per communicator on 4 x A100
# (NVIDIA/nccl#964), so 0.7 GB; and with more than 2 ranks on Hopper or later, NCCL's NVLink
# SHARP (NVLS) buffers: 2.4 GB on 8 x H200 (nvlsTotalSize 2415919104 in NCCL's log,
# vllm-project/vllm#9699), so 2.5 GB. Within the allocator: its slack, memory it holds in blocks
# too fragmented to reuse, for which 10 % of the estimate is a safe margin.
CUDA_CONTEXT_BYTES = 1e9
NCCL_PEER_BYTES = 0.7e9
NCCL_NVLS_BYTES = 2.5e9
ALLOCATOR_SLACK = 0.10
# more passes than this over the training data and repeating it gains little: up to about 4
# epochs, repeated tokens are worth nearly as much as new ones (Muennighoff et al., 2023,
# "Scaling Data-Constrained Language Models"); beyond, the model learns the data by heart
MAX_USEFUL_PASSES = 4
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
    gen = torch.Generator().manual_seed(0)  # not the global generator: training draws from it
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}
    mats = {d: torch.randn(n, n, generator=gen).to(dtype[d]) for d in dtypes}
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


def remeasure_cpu_peak_flops(dtype="fp32", n=1024):
    """The start-up measurement's path timed again, briefly: for when a step beat it."""
    speeds = measure_cpu_matmul_flops(n)
    path = max(speeds, key=speeds.get) if dtype == "bf16" else "fp32"
    return matmul_flops([path], n, seconds=0.1)[path]


def peak_flops_per_device(args, device, gpu=None):
    """(FLOP/s of one device for MFU, or None; where the figure comes from). gpu: a Gpu to plan
    for instead of `device`."""
    if args.peak_flops:
        return args.peak_flops, "--peak_flops"
    if gpu is None and device.type == "cpu":
        return measure_cpu_peak_flops(args.dtype), "measured matmul"
    if gpu is None:
        name = torch.cuda.get_device_name(device)
        gpu = GPUS.get(name, Gpu(name, 0.0, 0, None))
    if gpu.bf16_flops is None:
        return None, (
            f"{gpu.name!r} is not in report.py's table: pass --peak_flops, its dense bf16 "
            "FLOP/s (for --dtype fp32: TF32)"
        )
    if args.dtype == "fp32":
        return (
            gpu.bf16_flops * TF32_FRACTION,
            f"{gpu.name}, dense TF32 (fp32 matmuls) from the datasheet",
        )
    return gpu.bf16_flops, f"{gpu.name}, dense bf16 from the datasheet"


def this_gpu(device):
    """The Gpu of a CUDA device: its real memory, and the table's peak if its name is there."""
    name = torch.cuda.get_device_name(device)
    props = torch.cuda.get_device_properties(device)
    known = GPUS.get(name)
    return Gpu(name, props.total_memory, props.major, known and known.bf16_flops)


def find_gpu(text):
    """The Gpu --plan names: a name of the table, with or without "NVIDIA", in any case, or
    enough of its words to tell it from the others ("H100 80GB"); or a size like "24GB" for any
    other card (planned as Hopper, the larger NCCL margin). None with a message if no match."""

    def words(name):  # "NVIDIA A100-SXM4-80GB": a100, sxm4, 80gb
        return [w for w in re.findall(r"[a-z0-9]+", name.lower()) if w != "nvidia"]

    size = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*gb\s*", text.lower())
    if size:
        return Gpu(f"a {size[1]} GB GPU", float(size[1]) * 1e9, 9, None), None
    wanted = words(text)
    exact = [g for name, g in GPUS.items() if words(name) == wanted]
    matches = exact or [g for name, g in GPUS.items() if wanted and set(wanted) <= set(words(name))]
    if wanted and len(matches) == 1:
        return matches[0], None
    names = ", ".join(g.name for g in matches or GPUS.values())
    which = "is more than one GPU" if matches else "is not a GPU report.py knows"
    return None, f"--plan {text!r} {which}; name one of: {names}; or give its memory, e.g. 24GB"


def outside_allocator(world_size, gpu):
    """[(what, bytes)] a GPU needs beyond PyTorch's allocator, for world_size ranks."""
    parts = [("CUDA context", CUDA_CONTEXT_BYTES)]
    if world_size >= 2:
        parts.append(("NCCL", NCCL_PEER_BYTES))
    if world_size > 2 and gpu.major >= 9:
        parts.append(("NCCL's NVLS buffers", NCCL_NVLS_BYTES))
    return parts


def fits_line(total, world_size, gpu):
    """The verdict: the estimate plus the allocator's slack and what lives outside it."""
    parts = outside_allocator(world_size, gpu)
    need = total * (1 + ALLOCATOR_SLACK) + sum(b for _, b in parts)
    verdict = (
        "fits"
        if need <= gpu.memory
        else "does NOT fit: try --activation_checkpointing or a smaller --batch_size"
    )
    outside = " + ".join(f"{b / 1e9:.1f} GB {what}" for what, b in parts)
    return (
        f"  with {100 * ALLOCATOR_SLACK:.0f}% allocator slack and, at {world_size} rank(s), "
        f"{outside}: {need / 1e9:.1f} GB of the {gpu.memory / 1e9:.1f} GB of {gpu.name}: {verdict}"
    )


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


def print_memory_estimate(cfg, n_params, args, seq_len, device, world_size, gpu=None):
    """The estimate per rank, term by term; on CUDA (or for the Gpu of a plan) whether it fits."""
    est = memory_estimate(
        cfg, n_params, args.batch_size, seq_len, args.dtype, args.activation_checkpointing
    )
    total = sum(est.values())
    lines = [f"  {k:32s} {v / 1e9:8.3f} GB" for k, v in est.items() if v]
    lines.append(f"  {'total (estimate)':32s} {total / 1e9:8.3f} GB per rank")
    if gpu is None and device.type == "cuda":
        gpu = this_gpu(device)
    if gpu is not None:
        lines.append(fits_line(total, world_size, gpu))
    print("memory estimate:\n" + "\n".join(lines))


def print_plan(args, cfg, model_class, seq_len):
    """--plan: what train.py would print about memory and MFU for args.plan_world_size ranks on
    the GPU --plan names, on any machine (the model is built on the meta device: no memory)."""
    gpu, error = find_gpu(args.plan)
    if gpu is None:
        sys.exit(f"train.py: error: {error}")
    with torch.device("meta"):
        n_params = num_params(model_class(cfg))
    world = args.plan_world_size
    print(
        f"plan: {args.preset}, {n_params / 1e6:.2f}M parameters, {args.dtype}, "
        f"{args.batch_size} batch x {seq_len} context x {args.grad_accum} accum, "
        f"{world} rank(s) on {gpu.name}"
    )
    print_memory_estimate(cfg, n_params, args, seq_len, None, world, gpu)
    peak, source = peak_flops_per_device(args, None, gpu)
    peak_text = f"{peak / 1e12:.3f} TFLOP/s" if peak else "unknown"
    print(f"peak per device for MFU: {peak_text} ({source})")


def print_data_passes(name, n_tokens, tokens_per_step, max_steps):
    """How many times the run reads its training data; a warning when repeating it stops paying."""
    passes = tokens_per_step * max_steps / n_tokens
    print(
        f"data: {max_steps:,} steps x {tokens_per_step:,} tokens = {passes:.2f} passes over "
        f"{name} ({n_tokens:,} tokens)"
    )
    if passes > MAX_USEFUL_PASSES:
        print(
            f"warning: {passes:.0f} passes over the same tokens: beyond about "
            f"{MAX_USEFUL_PASSES}, repeating data gains little and the model learns it by heart; "
            "use more data, or fewer --max_steps"
        )


def tensorboard_missing():
    """--tensorboard's one-line error if the tensorboard package is absent, else None."""
    if importlib.util.find_spec("tensorboard") is None:
        return "--tensorboard needs the tensorboard package: pip install tensorboard"
    return None


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
    """Rank 0's record of the run: the printed progress lines, metrics.csv and loss.png/pdf, and
    with --tensorboard the same scalars as TensorBoard events in out_dir/tensorboard/."""

    def __init__(self, args, start_step, tokens_per_step, flops_per_token, world_size, device):
        self.args, self.device, self.world_size = args, device, world_size
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak, self.peak_source = peak_flops_per_device(args, device)
        self.said_why = False  # the note on an MFU above 100 % with a datasheet's peak: once
        peak_text = f"{self.peak / 1e12:.3f} TFLOP/s" if self.peak else "unknown"
        print(f"peak per device for MFU: {peak_text} ({self.peak_source})")
        hint = bf16_hint(args, device)
        if hint:
            print(hint)
        self.path = args.out_dir / "metrics.csv"
        self.title = (
            f"{args.preset}: {world_size} {device.type} rank(s), {tokens_per_step:,} tokens/step"
        )
        self.file, self.writer = open_metrics(self.path, start_step)
        self.events, self.tokens_step = None, None
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: only with the flag

            # a resumed run hides the events after its checkpoint, as metrics.csv drops them
            purge = start_step + 1 if start_step else None
            self.events = SummaryWriter(args.out_dir / "tensorboard", purge_step=purge)

    def write(self, row):
        self.writer.writerow(row)
        self.file.flush()
        if self.events:
            # a step's validation row and training row both hold its tokens: one event of them
            logged, self.tokens_step = self.tokens_step, row["step"]
            for name, value in row.items():
                if name != "step" and not (name == "tokens" and row["step"] == logged):
                    self.events.add_scalar(name, value, row["step"])
            self.events.flush()

    def validation(self, step, val_loss):
        print(f"step {step:5d} | val loss {val_loss:.4f}")
        self.write({"step": step, "tokens": step * self.tokens_per_step, "val_loss": val_loss})

    def mfu(self, flops):
        """MFU of a step that did `flops` FLOP/s on all ranks together. Above 100 % the peak is
        too low: a CPU's, measured at start-up while other processes slowed the matmul down, is
        measured again, and is at least what this step did; a datasheet's or --peak_flops is
        kept, and a note says why the figure is above 100 %."""
        if not self.peak:
            return float("nan")
        per_device = flops / self.world_size
        if per_device > self.peak and self.peak_source == "measured matmul":
            again = remeasure_cpu_peak_flops(self.args.dtype)
            print(
                f"note: a step ran {per_device / 1e12:.3f} TFLOP/s per rank, more than the matmul "
                f"measured at start-up ({self.peak / 1e12:.3f}; other processes slowed it down); "
                f"measured again: {again / 1e12:.3f}; MFU from now on against the larger of the two"
                " and this step"
            )
            self.peak = max(self.peak, again, per_device)
        elif per_device > self.peak and not self.said_why:
            self.said_why = True
            print(
                f"note: MFU above 100%: this run does more FLOP/s than the peak it divides by "
                f"({self.peak_source}); pass the device's real --peak_flops"
            )
        return per_device / self.peak

    def train_step(self, step, loss, lr, grad_norm, seconds, data_seconds):
        tokens_per_s = self.tokens_per_step / seconds
        mfu = self.mfu(self.flops_per_token * tokens_per_s)
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
        if self.events:
            self.events.close()
