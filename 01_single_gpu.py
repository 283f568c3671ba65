"""Step 01: a plain training loop on one device (a GPU if there is one, else the CPU).

    python 01_single_gpu.py 50 10      # 50 epochs, checkpoint every 10

Everything later steps add (more processes, more machines) is built around this loop.
"""

import argparse
import os
import sys

import torch
from torch.utils.data import DataLoader

from datautils import (
    DataError,
    accuracy_field,
    count_correct,
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
    parser.add_argument("--batch_size", type=positive_int, default=32, help="default: 32")
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
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no CUDA GPU")
    return args


def make_loaders(train_set, val_set, batch_size):
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=batch_size)
    return train_loader, val_loader


def train_epoch(model, loader, loss_fn, optimizer, device):
    """One pass over the training data. Returns (sum of losses, samples)."""
    model.train()
    total, count = 0.0, 0
    for source, target in loader:
        source, target = source.to(device), target.to(device)
        loss = loss_fn(model(source), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(source)
        count += len(source)
    return total, count


@torch.no_grad()
def evaluate(model, loader, loss_fn, device):
    """Validation as (sum of losses, right predictions, number of samples)."""
    model.eval()
    total, correct, count = 0.0, 0, 0
    for source, target in loader:
        source, target = source.to(device), target.to(device)
        output = model(source)
        total += loss_fn(output, target).item() * len(source)
        correct += count_correct(output, target)
        count += len(source)
    return total, correct, count


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


def main(args, data):
    device = torch.device(args.device)
    train_set, val_set = data
    model, loss_fn = make_model(train_set, args.seed)
    print(task_line(train_set))
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train_loader, val_loader = make_loaders(train_set, val_set, args.batch_size)

    for epoch in range(args.total_epochs):
        train_total, train_count = train_epoch(model, train_loader, loss_fn, optimizer, device)
        val_total, val_correct, val_count = evaluate(model, val_loader, loss_fn, device)
        train_loss = train_total / train_count
        val_loss = val_total / val_count
        val_accuracy = val_correct / val_count
        print(
            f"[{device}] epoch {epoch} | {len(train_loader)} batches of "
            f"{args.batch_size} | train loss {train_loss:.4f} | val loss {val_loss:.4f}"
            + accuracy_field(val_accuracy, train_set)
        )
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.total_epochs:
            save_checkpoint(model, "checkpoint_01.pt")
            print(f"epoch {epoch} | checkpoint saved at checkpoint_01.pt")


if __name__ == "__main__":
    args = parse_args()
    try:  # load (and check) the data before any training starts
        data = load_datasets(args.data_dir, args.seed)
    except DataError as e:
        sys.exit(f"{PROG}: error: {e}")
    main(args, data)
