"""Step 02: DistributedDataParallel on one machine, one process per GPU, started by mp.spawn.

    python 02_multigpu_mp_spawn.py 50 10      # one process per GPU, or 2 CPU processes without GPUs

New since step 01: a process group, a DistributedSampler, the DDP wrapper, rank-0-only
printing and saving, and averaging the losses over all processes.
"""

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from datautils import (
    DataError,
    accuracy_field,
    count_correct,
    load_datasets,
    make_model,
    positive_int,
    task_line,
    threads_per_process,
)

PROG = os.path.basename(__file__)


def parse_args():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("total_epochs", type=positive_int, help="how many epochs to train")
    parser.add_argument("save_every", type=positive_int, help="save a checkpoint every N epochs")
    parser.add_argument(
        "--batch_size", type=positive_int, default=32, help="per process; default: 32"
    )
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto (default): CUDA if available, else CPU",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data, weights, shuffling")
    parser.add_argument(
        "--data_dir",
        help="folder with X_train.npy, y_train.npy, X_val.npy, "
        "y_val.npy (default: a synthetic regression task)",
    )
    parser.add_argument(
        "--world_size",
        type=positive_int,
        help="number of processes (default: one per GPU, or 2 on a machine without GPUs)",
    )
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no CUDA GPU")
    n_gpus = torch.cuda.device_count()
    if args.world_size is None:
        args.world_size = n_gpus if args.device == "cuda" else 2
    if args.device == "cuda" and args.world_size > n_gpus:
        parser.error(f"--world_size {args.world_size}, but only {n_gpus} GPU(s) are visible")
    return args


def setup(rank, world_size, device):
    """Join the process group. Every process must call this before any collective operation."""
    if device.type == "cuda":
        # Pick this process's GPU *before* creating the group, or every rank uses GPU 0.
        torch.cuda.set_device(device)
    # NCCL talks GPU to GPU; gloo runs on CPUs (and on Windows, which has no NCCL).
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if sys.platform == "win32":  # PyTorch's Windows builds have no libuv for the TCP store
        os.environ.setdefault("USE_LIBUV", "0")
    # device_id binds the group to this GPU: NCCL connects now, not at the first collective,
    # and barrier() knows which GPU to use. gloo takes none.
    device_id = device if backend == "nccl" else None
    dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)


def make_loaders(train_set, val_set, batch_size, rank, world_size, seed):
    # Each process trains on a different 1/world_size of the data, reshuffled every epoch by
    # sampler.set_epoch(). If the data doesn't split evenly, the sampler repeats a few samples so
    # that every rank runs the same number of steps (a rank with fewer would stall the others).
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, seed=seed)
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler)
    # Validation: every rank takes every world_size-th sample, with no padding, so that no
    # sample is counted twice in the validation loss.
    val_shard = Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = DataLoader(val_shard, batch_size=batch_size)
    return train_loader, val_loader


def train_epoch(model, loader, loss_fn, optimizer, device):
    """One pass over this process's share of the data. Returns (sum of losses, samples)."""
    model.train()
    total, count = 0.0, 0
    for source, target in loader:
        source, target = source.to(device), target.to(device)
        loss = loss_fn(model(source), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over all processes here
        optimizer.step()
        total += loss.item() * len(source)
        count += len(source)
    return total, count


@torch.no_grad()
def evaluate(model, loader, loss_fn, device):
    """Validation on this process's share: (sum of losses, right predictions, samples)."""
    model.eval()
    total, correct, count = 0.0, 0, 0
    for source, target in loader:
        source, target = source.to(device), target.to(device)
        output = model(source)
        total += loss_fn(output, target).item() * len(source)
        correct += count_correct(output, target)
        count += len(source)
    return total, correct, count


def global_mean(total, count, device):
    """Mean over all processes: add up the sums and the counts, then divide. (A mean of per-process
    means would be wrong whenever the processes hold different numbers of samples.)"""
    both = torch.tensor([total, count], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    return (both[0] / both[1]).item()


def save_checkpoint(model, path):
    # Write a temp file, then rename it: a crash mid-write never leaves a half-written checkpoint.
    # fsync the file before the rename and its folder after: otherwise a lost node or a power cut
    # can leave an empty file under the new name on the network filesystems clusters use.
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(model.state_dict(), f)
        os.fsync(f.fileno())  # torch.save has flushed f's buffer to the OS
    os.replace(tmp, path)
    if os.name == "posix":  # Windows cannot open a folder to fsync it
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(folder)
        os.close(folder)


def main(rank, world_size, args, data):
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    setup(rank, world_size, device)
    train_set, val_set = data
    # Built here, in each process: a model handed over by mp.spawn would share its CPU memory
    # between the processes. The same seed gives every process the same initial weights.
    model, loss_fn = make_model(train_set, args.seed)
    if rank == 0:
        print(task_line(train_set))
    model = DDP(model.to(device), device_ids=[rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train_loader, val_loader = make_loaders(
        train_set, val_set, args.batch_size, rank, world_size, args.seed
    )

    for epoch in range(args.total_epochs):
        train_loader.sampler.set_epoch(epoch)  # without this, every epoch has the same order
        train_total, train_count = train_epoch(model, train_loader, loss_fn, optimizer, device)
        val_total, val_correct, val_count = evaluate(model, val_loader, loss_fn, device)
        train_loss = global_mean(train_total, train_count, device)
        val_loss = global_mean(val_total, val_count, device)  # every rank must take part
        val_accuracy = global_mean(val_correct, val_count, device)
        if rank == 0:
            print(
                f"[{device} x {world_size}] epoch {epoch} | {len(train_loader)} batches of "
                f"{args.batch_size} | train loss {train_loss:.4f} | val loss {val_loss:.4f}"
                + accuracy_field(val_accuracy, train_set)
            )
        if rank == 0 and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.total_epochs):
            save_checkpoint(model.module, "checkpoint_02.pt")  # .module: the model inside DDP
            print(f"epoch {epoch} | checkpoint saved at checkpoint_02.pt")
    # Wait until rank 0 has written its last file before anyone tears down (with gloo this also
    # makes a rare abort at exit rarer: see docs/gloo_exit_abort.md).
    dist.barrier()
    dist.destroy_process_group()
    # Workaround (PyTorch 2.13, gloo): give gloo's threads a moment to let go of their last
    # tensors before Python shuts down, or the process can abort after its work is done.
    time.sleep(0.1)


def pick_port():
    """A free TCP port for the process group, so two runs on one machine don't collide."""
    with socket.socket() as s:
        s.bind(("", 0))
        return str(s.getsockname()[1])


if __name__ == "__main__":
    args = parse_args()
    try:  # load (and check) the data once, here, so bad input stops before any process starts
        data = load_datasets(args.data_dir, args.seed)
    except DataError as e:
        sys.exit(f"{PROG}: error: {e}")
    # Rank 0's address and port: every process connects there. Values already set are kept.
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", pick_port())
    # The processes share this machine's cores: without a limit each would start a thread per
    # core, and they would slow each other down (torchrun sets 1 for the same reason).
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(args.world_size)))
    mp.spawn(main, args=(args.world_size, args, data), nprocs=args.world_size)
