"""Step 04: the same DDP training on several machines (nodes), started by torchrun on each.

Type the same commands on every machine; HOST is the name or address of one of them, which every
machine can reach (its port 29500 must be open):

    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1    # restarts then always start clean
    torchrun --nnodes=2 --nproc_per_node=2 --rdzv_id=42 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 --max-restarts=3 04_multinode.py 50 10

New since step 03: two ranks per process. LOCAL_RANK counts the processes on this machine and
picks the GPU; RANK counts all processes of all machines, picks the data shard, and global rank 0
alone reports progress. Every machine reads the snapshot from --snapshot_path: on a disk all
machines share, global rank 0 writes it; with --snapshot_per_node (each machine has its own disk),
local rank 0 of every machine writes its own copy, so every machine can resume.
"""

import argparse
import os
import pickle
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from datautils import (
    DataError,
    accuracy_field,
    count_correct,
    fingerprint,
    load_datasets,
    make_model,
    positive_int,
    task_line,
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
        "--snapshot_path",
        default="snapshot_04.pt",
        help="where to save the snapshot, and resume from if it exists (default: snapshot_04.pt)",
    )
    parser.add_argument(
        "--snapshot_per_node",
        action="store_true",
        help="--snapshot_path is on each machine's own disk: every machine saves its own copy "
        "(default: a disk all machines share, written by global rank 0 only)",
    )
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no CUDA GPU")
    if "LOCAL_RANK" not in os.environ:
        parser.error(
            "start me with torchrun on every machine, e.g. torchrun --nnodes=2 "
            "--nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 " + PROG
        )
    return args


def setup(device):
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
    # Rank, world size and rank 0's address come from the variables torchrun sets.
    dist.init_process_group(backend, device_id=device_id)


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


def save_snapshot(model, optimizer, history, world_size, data_id, path):
    """Everything needed to continue exactly: weights, optimizer state (momentum), epochs done."""
    snapshot = {
        "model": model.module.state_dict(),  # .module: the model inside DDP
        "optimizer": optimizer.state_dict(),
        "epochs_run": len(history),
        # (epoch, world size) of every epoch done: what an elastic job really ran
        "history": history,
        # Who wrote it, so that a snapshot of another step or world size never resumes unnoticed.
        "written_by": PROG,
        "world_size": world_size,
        "data": data_id,  # fingerprint(): a snapshot of other data never resumes unnoticed
    }
    # Write a temp file, then rename it: a crash mid-write never leaves a half-written snapshot.
    # fsync the file before the rename and its folder after: otherwise a lost node or a power cut
    # can leave an empty file under the new name on the network filesystems clusters use.
    # The temp name names the machine, so two machines never write the same temp file.
    tmp = f"{path}.tmp.{socket.gethostname()}"
    with open(tmp, "wb") as f:
        torch.save(snapshot, f)
        os.fsync(f.fileno())  # torch.save has flushed f's buffer to the OS
    os.replace(tmp, path)
    if os.name == "posix":  # Windows cannot open a folder to fsync it
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(folder)
        os.close(folder)


def fail(message):
    """Stop with one line. The process group goes first: NCCL warns about one left at exit."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(f"{PROG}: error: {message}")


def load_snapshot(path, model, optimizer, device, data_id):
    """Restore model and optimizer from a snapshot; returns its history of (epoch, world size)
    and the world size that wrote it."""
    try:
        # weights_only=True: only tensors and plain containers, never code, are unpickled.
        snapshot = torch.load(path, map_location=device, weights_only=True)
        if snapshot["written_by"] != PROG:  # another step's snapshot: another experiment
            fail(
                f"{path} is a snapshot of {snapshot['written_by']}, not of this step; move it "
                "away or pass another --snapshot_path"
            )
        if snapshot["data"] != data_id:  # same shapes, other numbers: another experiment
            fail(
                f"{path} was trained on other data (fingerprint {snapshot['data']}, this data "
                f"{data_id}); move it away or pass another --snapshot_path"
            )
        model.load_state_dict(snapshot["model"])
        optimizer.load_state_dict(snapshot["optimizer"])
        return [tuple(epoch) for epoch in snapshot["history"]], int(snapshot["world_size"])
    except (RuntimeError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
        # A truncated file, another program's file, or a snapshot of a different model.
        fail(
            f"{path} is not a readable snapshot of this model ({type(e).__name__}); move it "
            "away or pass another --snapshot_path"
        )


def same_epoch_everywhere(epochs_run, device):
    """Stop if the processes resumed from different epochs: they would train different numbers of
    epochs and hang at the end. It happens when machines do not share --snapshot_path's disk."""
    earliest = torch.tensor(epochs_run, device=device)
    latest = earliest.clone()
    dist.all_reduce(earliest, op=dist.ReduceOp.MIN)
    dist.all_reduce(latest, op=dist.ReduceOp.MAX)
    if earliest != latest:
        fail(
            f"machines resumed from different epochs ({earliest.item()} to {latest.item()}): "
            "is --snapshot_path on a disk they all share? If each has its own, pass "
            "--snapshot_per_node"
        )


def world_size_note(old, new, epoch, args):
    """The choices made for a new world size, in one line. This script keeps the batch per
    process: the global batch (and so the steps per epoch) follow the world size."""
    return (
        f"Note: world size {old} -> {new} at epoch {epoch}: global batch {old * args.batch_size} "
        f"-> {new * args.batch_size} ({args.batch_size} per process, no accumulation), "
        f"lr {args.lr} unchanged, each epoch's shuffle unchanged"
    )


def main(args, data):
    # torchrun starts this script once per process and tells each one two ranks: LOCAL_RANK
    # among the processes of this machine (0..nproc_per_node-1), which picks this process's GPU,
    # and RANK among all processes of all machines (0..WORLD_SIZE-1), which picks its data shard.
    local_rank = int(os.environ["LOCAL_RANK"])
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else "cpu")
    setup(device)
    # Every rank prints this at once. torchrun runs Python unbuffered (-u), where print() writes
    # the text and its newline separately: one write keeps the ranks' lines apart.
    host = socket.gethostname()
    sys.stdout.write(f"rank {rank} of {world_size} (local rank {local_rank}) on {host}\n")
    # Shared disk: one writer for the whole job. Own disks: one writer per machine.
    is_writer = rank == 0 or (args.snapshot_per_node and local_rank == 0)
    train_set, val_set = data
    model, loss_fn = make_model(train_set, args.seed)
    data_id = fingerprint(train_set, val_set)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    history = []
    if os.path.exists(args.snapshot_path):  # a restart after a failure, or a resubmitted job
        history, saved_world_size = load_snapshot(
            args.snapshot_path, model, optimizer, device, data_id
        )
        if local_rank == 0:  # one line per machine: each read its own file
            print(f"Resuming training from snapshot {args.snapshot_path} at epoch {len(history)}")
        # Allowed (an elastic job that lost or regained a machine), but said: what this script
        # chose for the new world size makes the training differ from an uninterrupted run.
        if rank == 0 and saved_world_size != world_size:
            print(world_size_note(saved_world_size, world_size, len(history), args))
    epochs_run = len(history)
    same_epoch_everywhere(epochs_run, device)
    if rank == 0:  # after a collective: every rank's line above is out by now, none mixes in
        print(task_line(train_set))
    model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    train_loader, val_loader = make_loaders(
        train_set, val_set, args.batch_size, rank, world_size, args.seed
    )

    for epoch in range(epochs_run, args.total_epochs):
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
        history.append((epoch, world_size))
        if is_writer and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.total_epochs):
            save_snapshot(model, optimizer, history, world_size, data_id, args.snapshot_path)
            print(f"epoch {epoch} | snapshot saved at {args.snapshot_path}")
    # Wait until rank 0 has written its last file before anyone tears down (with gloo this also
    # makes a rare abort at exit rarer: see docs/gloo_exit_abort.md).
    dist.barrier()
    dist.destroy_process_group()
    # Workaround (PyTorch 2.13, gloo): give gloo's threads a moment to let go of their last
    # tensors before Python shuts down, or the process can abort after its work is done.
    time.sleep(0.1)


if __name__ == "__main__":
    args = parse_args()
    try:  # load (and check) the data before joining the process group
        data = load_datasets(args.data_dir, args.seed)
    except DataError as e:
        sys.exit(f"{PROG}: error: {e}")
    main(args, data)
