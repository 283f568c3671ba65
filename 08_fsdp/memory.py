"""Memory per rank at each stage: the formula, and the bytes a CPU run really holds.

    python 08_fsdp/memory.py                   # measure 1, 2, 4 ranks x 4 stages, draw the picture
    python 08_fsdp/memory.py --plan gpt-1.4b   # the formula for GPUs: 1, 4, 8 GPUs, 24/40/80 GB

The formula (state_bytes) is the ZeRO paper's accounting, fp32 master weights and AdamW, P
parameters, W ranks: ddp 16 P; zero1 4 P + 4 P + 8 P / W; zero2 and zero3 16 P / W between steps.
During a step FSDP also holds what it has gathered and the unsharded gradients not yet
reduce-scattered. At the peak, the backward of the last block: zero2 every weight (kept from
forward until each block's backward), zero3 the root group and that block; the gradients of
that block and of the root's tail (ln_f, an untied head). Or at the very end of backward: the
root gathered with all its gradients. The prefetched next block and the reduce-scatter input
sit in communication buffers, which estimate() adds for GPUs. train.py adds activations
(model.memory_estimate) and prints the estimate.

The measurement counts the storages of the tensors a rank holds (parameters as registered on the
modules and as the optimizer holds them, their .grad, the optimizer's states), each storage once,
at every tensor autograd saves or unpacks during a step, and after it. It leaves out
communication buffers and activations, as the formula does.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import checkpoint
import parallelize
import report
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model import GPT, PRESETS, config_for, memory_estimate, num_params
from torch.distributed.tensor import DTensor

HERE = Path(__file__).resolve().parent
# the measured model: tiny, with 8 blocks so that one block is a small part of the whole
MEASURED = dict(preset="tiny", n_layer=8, dropout=0.0)
WORLD_SIZES = (1, 2, 4)


def group_sizes(model):
    """Parameters of fully_shard's groups: (the root group, the largest block, the root's
    parameters used after the blocks, whose gradients arrive first in backward: ln_f and an
    untied head; a tied head's gradient is complete only once the embedding's is added)."""
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    tail = sum(p.numel() for p in model.ln_f.parameters())
    if not model.cfg.tie_weights:
        tail += model.head.weight.numel()
    return num_params(model) - sum(blocks), max(blocks), tail


def state_bytes(model, stage, world_size, dtype="fp32", accumulating=False):
    """Bytes per rank of parameters, gradients and optimizer states: (between steps, on top at
    the peak of a step), each {term: bytes}. `accumulating`: FSDP without gradient sync in the
    micro-batches before the last keeps every block's unsharded fp32 gradient until then."""
    P, W = num_params(model), world_size
    root, block, tail = group_sizes(model)
    gathered = 2 if dtype == "bf16" else 4  # bytes of a gathered weight and its gradient
    if stage == "ddp":
        return {"parameters": 4 * P, "gradients": 4 * P, "AdamW states": 8 * P}, {}
    if stage == "zero1":
        return {"parameters": 4 * P, "gradients": 4 * P, "AdamW states (1/W)": 8 * P / W}, {}
    between = {
        "parameters (1/W)": 4 * P / W,
        "gradients (1/W)": 4 * P / W,
        "AdamW states (1/W)": 8 * P / W,
    }
    # the peak is in the backward of the last block (zero2: every weight still gathered; zero3:
    # the root and that block; the gradients of the tail and of that block), or at its very end
    # (the root gathered, and all its gradients)
    in_use = P if stage == "zero2" else root + block
    if accumulating:  # every unsharded gradient kept (in fp32) until the last micro-batch
        return between, {"gathered weights": gathered * in_use, "unsharded gradients": 4 * P}
    in_block = in_use + tail + block
    return between, {"gathered weights and unsharded gradients": gathered * max(in_block, 2 * root)}


def paper_bytes(n_params, stage, world_size):
    """The ZeRO paper's bytes per rank (its Figure 1, fp32 weights kept once): what the stage
    keeps replicated and what it divides by W."""
    P, W = n_params, world_size
    return {"ddp": 16 * P, "zero1": 8 * P + 8 * P / W, "zero2": 4 * P + 12 * P / W,
            "zero3": 16 * P / W}[stage]  # fmt: skip


def estimate(model, args, world_size):
    """{term: bytes} per rank at the peak of a step on a GPU: state_bytes plus model.py's
    activations and logits (and autocast's bf16 weight copies for ddp/zero1)."""
    cfg, n = model.cfg, num_params(model)
    accumulating = args.grad_accum > 1 and not args.sync_every_micro_batch
    between, peak = state_bytes(model, args.stage, world_size, args.dtype, accumulating)
    act = memory_estimate(
        cfg, n, args.batch_size, cfg.block_size, args.dtype, args.activation_checkpointing
    )
    terms = {**between, **peak}
    if args.stage not in parallelize.SHARDED:  # FSDP casts the gathered weights instead
        terms["bf16 weight copies (autocast)"] = act["bf16 weight copies (autocast)"]
    else:  # communication buffers: a block's fp32 reduce-scatter input (zero3: and the next
        # block's all-gather, prefetched during backward)
        _, block, _ = group_sizes(model)
        gathered = 2 if args.dtype == "bf16" else 4
        terms["communication buffers"] = (4 + gathered * (args.stage == "zero3")) * block
    terms["activations"] = act["activations"]
    terms["logits + loss"] = act["logits + loss"]
    return terms


def need_bytes(total, world_size, gpu):
    """Step 05's rule (report.fits_line): the estimate plus the allocator's slack and what lives
    outside it (CUDA context, NCCL's buffers, growing with the world size)."""
    outside = sum(b for _, b in report.outside_allocator(world_size, gpu))
    return total * (1 + report.ALLOCATOR_SLACK) + outside


def print_estimate(model, args, world_size, device, gpu=None):
    """The estimate per rank, term by term; on CUDA (or for the Gpu of a plan) whether it fits."""
    terms = estimate(model, args, world_size)
    total = sum(terms.values())
    lines = [f"  {k:40s} {v / 1e9:8.3f} GB" for k, v in terms.items() if v]
    lines.append(f"  {'total (estimate)':40s} {total / 1e9:8.3f} GB per rank")
    if gpu is None and device is not None and device.type == "cuda":
        gpu = report.this_gpu(device)
    if gpu is not None:
        lines.append(report.fits_line(total, world_size, gpu))
    print(f"memory estimate, --stage {args.stage} on {world_size} rank(s):\n" + "\n".join(lines))


def print_plan(args, cfg):
    """train.py --plan: the estimate and the verdict for --plan_world_size ranks of the GPU
    --plan names, on any machine (the model is built on the meta device: no memory)."""
    gpu, error = report.find_gpu(args.plan)
    if gpu is None:
        sys.exit(f"train.py: error: {error}")
    with torch.device("meta"):
        model = GPT(cfg)
    world = args.plan_world_size
    print(
        f"plan: {args.preset}, {num_params(model) / 1e6:.2f}M parameters, {args.dtype}, "
        f"{args.batch_size} batch x {cfg.block_size} context x {args.grad_accum} accum, "
        f"{world} rank(s) on {gpu.name}"
    )
    print_estimate(model, args, world, None, gpu)


# --- measuring on a CPU ----------------------------------------------------------------------


def _storage_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in seen:  # freed storages have size 0
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def held_bytes(model, optimizer):
    """{parameters, gradients, optimizer}: bytes of the storages this rank holds right now."""
    registered = [p for m in model.modules() for p in m._parameters.values() if p is not None]
    held = [p for g in optimizer.param_groups for p in g["params"]]
    states = checkpoint.local_optimizer(optimizer).state.values()
    return {
        "parameters": _storage_bytes(registered + held),
        "gradients": _storage_bytes([p.grad for p in registered + held]),
        "optimizer": _storage_bytes([t for s in states for t in s.values()]),
    }


def measure_stage(stage, cfg, steps=2):
    """(between steps, peak during the last step): held_bytes totals of one rank."""
    with torch.device("meta"):
        model = GPT(cfg)
    wrapped = parallelize.parallelize(model, stage, torch.device("cpu"), "fp32", seed=0)
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    optimizer = parallelize.make_optimizer(groups, stage, 1e-3, fused=False)
    gen = torch.Generator().manual_seed(dist.get_rank())
    samples = []

    def sample(t):
        samples.append(sum(held_bytes(model, optimizer).values()))
        return t

    for _ in range(steps):
        samples.clear()
        x = torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)
        # every tensor autograd saves in forward and unpacks in backward is a moment to look
        with torch.autograd.graph.saved_tensors_hooks(sample, sample):
            wrapped(x, x)[1].backward()
        sample(None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        sample(None)
    return held_bytes(model, optimizer), max(samples)


def _rank_main(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = config_for(MEASURED["preset"], n_layer=MEASURED["n_layer"], dropout=MEASURED["dropout"])
    rows = {stage: measure_stage(stage, cfg) for stage in parallelize.STAGES}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        Path(out).write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


def measure(world_size):
    """[{stage: (between steps {kind: bytes}, peak bytes)} of each rank], from real gloo ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "measured.json"
        mp.spawn(_rank_main, args=(world_size, port, out), nprocs=world_size)
        return json.loads(out.read_text())


def table(measured):
    """Rows (stage, W, formula between, measured between (max rank), formula peak, measured peak,
    paper) in bytes, from {W: measure(W)}."""
    with torch.device("meta"):
        model = GPT(config_for(MEASURED["preset"], n_layer=MEASURED["n_layer"]))
    rows = []
    for stage in parallelize.STAGES:
        for w, ranks in sorted(measured.items()):
            between, peak = state_bytes(model, stage, w)
            f_between = sum(between.values())
            m_between = max(sum(r[stage][0].values()) for r in ranks)
            m_peak = max(r[stage][1] for r in ranks)
            paper = paper_bytes(num_params(model), stage, w)
            rows.append((stage, w, f_between, m_between, f_between + sum(peak.values()), m_peak,
                         paper))  # fmt: skip
    return rows


def draw(rows, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, stage in enumerate(parallelize.STAGES):
        mine = [r for r in rows if r[0] == stage]
        ws = [r[1] for r in mine]
        color = f"C{i}"
        ax.plot(ws, [r[5] / 1e6 for r in mine], "o-", color=color, label=f"{stage}: peak")
        ax.plot(ws, [r[3] / 1e6 for r in mine], "s--", color=color, label=f"{stage}: between steps")
        ax.plot(ws, [r[4] / 1e6 for r in mine], "x", color="k", markersize=8)
    ax.plot([], [], "x", color="k", label="formula (peak)")
    ax.set(xlabel="ranks", ylabel="MB per rank (weights, gradients, AdamW)", xticks=WORLD_SIZES,
           title="measured on CPU ranks: tiny GPT with 8 blocks, fp32")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# the cards of the plan: 24 GB (A10G of a g5.12xlarge, Ampere), 40 GB A100, 80 GB H100 (Hopper:
# NCCL's NVLS buffers above 2 ranks); report.py's table gives their memory and architecture
PLAN_GPUS = ("NVIDIA A10", "NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3")


def largest_batch(model, stage, gpus, gpu, checkpointing, batch_sizes):
    best = None
    for b in batch_sizes:
        args = argparse.Namespace(
            stage=stage, dtype="bf16", batch_size=b, grad_accum=1,
            sync_every_micro_batch=False, activation_checkpointing=checkpointing,
        )  # fmt: skip
        if need_bytes(sum(estimate(model, args, gpus).values()), gpus, gpu) <= gpu.memory:
            best = b
    return best


def plan(preset, batch_sizes=(1, 2, 4, 8, 16, 32)):
    """Print, per stage and GPU count, the per-rank estimate and the largest micro-batch (of
    `batch_sizes`, bf16, context 1,024, without / with activation checkpointing) that fits
    24, 40 and 80 GB by step 05's rule."""
    with torch.device("meta"):
        model = GPT(config_for(preset))
    print(f"{preset}, bf16, context {model.cfg.block_size}: GB per rank at micro-batch 1 with "
          "the margins (Ampere; Hopper adds 2.5 GB above 2 GPUs), and the largest micro-batch "
          "that fits, without / with --activation_checkpointing")  # fmt: skip
    print("| stage | GPUs | GB per rank | 24 GB | 40 GB | 80 GB |")
    print("|---|---|---|---|---|---|")
    for stage in parallelize.STAGES:
        for gpus in (1, 4, 8):
            cells = []
            for name in PLAN_GPUS:
                gpu = report.GPUS[name]
                found = [largest_batch(model, stage, gpus, gpu, c, batch_sizes) for c in (0, 1)]
                cells.append("no" if found == [None, None] else
                             " / ".join("-" if b is None else str(b) for b in found))  # fmt: skip
            args = argparse.Namespace(stage=stage, dtype="bf16", batch_size=1, grad_accum=1,
                                      sync_every_micro_batch=False,
                                      activation_checkpointing=False)  # fmt: skip
            total = sum(estimate(model, args, gpus).values())
            need = need_bytes(total, gpus, report.GPUS[PLAN_GPUS[0]])
            print(f"| {stage} | {gpus} | {need / 1e9:.1f} | " + " | ".join(cells) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=list(PRESETS), help="print the GPU plan of this preset")
    p.add_argument("--json", type=Path, help="also write the measured rows here")
    p.add_argument("--picture", type=Path, default=HERE.parent / "docs/img/08_memory.png")
    args = p.parse_args(argv)
    if args.plan:
        plan(args.plan)
        return
    measured = {w: measure(w) for w in WORLD_SIZES}
    rows = table(measured)
    print("| stage | ranks | between steps: formula | measured | peak: formula | measured | "
          "paper |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for stage, w, fb, mb, fp, mp_, paper in rows:
        between = f"{fb / 1e6:.3f} MB | {mb / 1e6:.3f} MB ({100 * (mb / fb - 1):+.1f}%)"
        peak = f"{fp / 1e6:.3f} MB | {mp_ / 1e6:.3f} MB ({100 * (mp_ / fp - 1):+.1f}%)"
        print(f"| {stage} | {w} | {between} | {peak} | {paper / 1e6:.3f} MB |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "measured": measured}))
    draw(rows, args.picture)
    print(f"picture: {args.picture}")


if __name__ == "__main__":
    sys.exit(main())
