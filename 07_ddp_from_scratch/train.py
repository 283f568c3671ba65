"""Train one small model with data parallelism written by hand, or with torch's DDP, and compare.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 07_ddp_from_scratch/train.py \
        --impl naive        # or flat, bucketed (the default), torch

The model is an MLP of 7 Linear layers (1.35 M parameters, 5.2 MiB of fp32 gradients in 14
tensors) that learns a synthetic classification task; batches are drawn from a seeded generator,
so nothing is downloaded. All four implementations end with the same weights, bit for bit, and
the last line prints their fingerprint so you can check.
"""

import argparse
import contextlib
import hashlib
import os
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_by_hand import Bucketed, Flat, Naive, assign_buckets
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

PROG = "train.py"
IMPLS = ["naive", "flat", "bucketed", "torch"]
IN_DIM, WIDTH, HIDDEN_LAYERS, CLASSES = 64, 512, 6, 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--impl", choices=IMPLS, default="bucketed", help="how gradients are averaged")
    p.add_argument("--bucket_mb", type=float, default=1.0, help="bucket size (bucketed, torch)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=32, help="samples per micro-batch per rank")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--log_every", type=int, default=10, help="print every N steps")
    p.add_argument("--seed", type=int, default=0, help="data and initial weights")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    for name in ["steps", "batch_size", "grad_accum", "log_every"]:
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if not args.bucket_mb > 0 or not args.lr > 0:  # `not >` also refuses nan
        p.error("--bucket_mb and --lr must be positive")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu")
    if "LOCAL_RANK" not in os.environ:
        p.error(f"start me with torchrun, e.g. torchrun --standalone --nproc_per_node=2 {PROG}")
    return args


def make_model(seed):
    """64 inputs -> 6 hidden layers of 512 (ReLU) -> 10 classes, in layers fc1 ... fc7. Big
    enough for several 1 MiB buckets, small enough for steps of tens of ms on one CPU core."""
    torch.manual_seed(seed)
    sizes = [IN_DIM] + [WIDTH] * HIDDEN_LAYERS + [CLASSES]
    layers = {}
    for i in range(1, len(sizes)):
        layers[f"fc{i}"] = fc = nn.Linear(sizes[i - 1], sizes[i])
        # He init: PyTorch's default init shrinks the signal at every ReLU; 7 layers then
        # hardly learn
        nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
        nn.init.zeros_(fc.bias)
        if i < len(sizes) - 1:
            layers[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(OrderedDict(layers))


def get_batch(seed, step, micro, rank, world_size, batch_size):
    """This rank's rows of the global batch of (step, micro-batch). The global batch is a pure
    function of (seed, step, micro), so one process can rebuild what all ranks saw together:
    get_batch(seed, step, micro, 0, 1, world_size * batch_size) is the combined batch."""
    rows = np.random.default_rng([seed, step, micro]).standard_normal(
        (world_size * batch_size, IN_DIM), dtype=np.float32
    )
    # the label of a point is the largest of 10 fixed random projections of it
    teacher = np.random.default_rng([seed]).standard_normal((IN_DIM, CLASSES), dtype=np.float32)
    labels = (rows @ teacher).argmax(axis=1)
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    return torch.from_numpy(rows[mine]), torch.from_numpy(labels[mine])


def wrap(model, impl, bucket_mb, device):
    if impl == "naive":
        return Naive(model)
    if impl == "flat":
        return Flat(model)
    if impl == "bucketed":
        return Bucketed(model, bucket_mb)
    # The reference. gradient_as_bucket_view=True: .grad are views into DDP's buckets, as in
    # Bucketed. With bucket_cap_mb given, DDP's first bucket has that size too (left unset, it
    # would be 25 MiB buckets after a first one of 1 MiB).
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)


def train_step(model, optimizer, micro_batches):
    """One optimizer step over the micro-batches; returns this rank's mean loss."""
    n = len(micro_batches)
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        # All micro-batches but the last only accumulate into .grad (DDP: forward too must be
        # inside no_sync; ours only look at the flag in backward, but we keep DDP's usage).
        with model.no_sync() if i < n - 1 else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y) / n  # /n: the gradient of the mean over all n
            loss.backward()
        total += loss.detach()
    if not isinstance(model, DDP):  # DDP has already finished inside the last backward()
        model.finish_gradient_sync()
    optimizer.step()
    # In place, not set_to_none: Bucketed's (and DDP's) .grad are views into their buckets.
    optimizer.zero_grad(set_to_none=False)
    return total


def describe(impl, model, bucket_mb):
    """What will be sent each step: printed at start-up, checked by the tests."""
    params = list(model.parameters())
    if impl == "naive":
        return f"naive: {len(params)} all-reduce calls per step, one per parameter tensor"
    if impl == "flat":
        return "flat: 1 all-reduce call per step, all gradients in one buffer"
    buckets = assign_buckets(params, bucket_mb)
    name = {p: n for n, p in model.named_parameters()}
    n = len(buckets)
    if n > 1:
        head = f"{n} buckets of ~{bucket_mb:g} MiB -> {n} all-reduce calls per step, sent during"
    else:  # the only bucket is complete when backward is: nothing left to overlap with
        head = f"1 bucket of ~{bucket_mb:g} MiB -> 1 all-reduce call per step, sent at the end of"
    lines = [f"{impl}: {head} backward"]
    if impl == "torch":
        lines.append(
            "  (DDP's step 1 sends one bucket of everything after backward; from step 2 on"
        )
        lines.append("   it uses buckets built in the order the gradients arrived: these)")
    for i, bucket in enumerate(buckets):
        mib = sum(p.numel() * p.element_size() for p in bucket) / 2**20
        lines.append(f"  bucket {i}: {mib:.2f} MiB  " + " ".join(name[p] for p in bucket))
    return "\n".join(lines)


def fingerprint(model):
    """A short hash of all weights: equal fingerprints mean equal weights, bit for bit."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def setup(device_name):
    """Join the process group; returns (rank, world_size, device)."""
    # torchrun tells every process who it is: RANK among all processes, LOCAL_RANK on this
    # machine (which GPU to use), WORLD_SIZE in all.
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_name == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # before init_process_group, so NCCL uses this GPU
    else:
        device = torch.device("cpu")
    # NCCL talks GPU to GPU; gloo runs on CPUs. The rest of the code is the same for both.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def teardown():
    dist.barrier()
    dist.destroy_process_group()
    # workaround (PyTorch 2.13, gloo): give gloo's threads a moment to let go of their last
    # tensors before Python shuts down, or the process can abort after its work is done
    time.sleep(0.1)


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup(args.device)
    model = make_model(args.seed).to(device)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(
            f"{world_size} ranks on {device.type} ({dist.get_backend()}) | {n:,} parameters, "
            f"{n * 4 / 2**20:.1f} MiB of fp32 gradients"
        )
        print(describe(args.impl, model, args.bucket_mb))
    model = wrap(model, args.impl, args.bucket_mb, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    t0, logged = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        batches = [
            get_batch(args.seed, step, m, rank, world_size, args.batch_size)
            for m in range(args.grad_accum)
        ]
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        loss = train_step(model, optimizer, batches)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            loss = loss.item()  # waits for the GPU, so the time below is real
            ms = (time.perf_counter() - t0) / (step - logged) * 1000
            print(f"step {step:4d} | loss on rank 0 {loss:.3f} | {ms:.1f} ms/step")
            t0, logged = time.perf_counter(), step

    fp = fingerprint(model)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, fp)  # every rank's copy, to show they are the same
    if rank == 0:
        same = "the same on every rank" if len(set(everyone)) == 1 else f"DIFFER: {everyone}"
        print(f"weights fingerprint {fp} ({same})")
    teardown()


if __name__ == "__main__":
    main()
