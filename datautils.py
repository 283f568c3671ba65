"""Datasets for steps 01-04. Not a lesson of its own: every step imports the same data.

Two sources:
- a synthetic regression task (default): y = X @ w + noise, so a linear model can learn it and
  the loss visibly goes down;
- your own arrays with --data_dir DIR holding X_train.npy, y_train.npy, X_val.npy, y_val.npy.
  Integer labels mean classification (cross-entropy, accuracy printed), float targets mean
  regression (MSE). Every step prints which one it took, once, before training.

    python datautils.py my_data/      # writes the synthetic task there, to try --data_dir my_data/
"""

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


class DataError(Exception):
    """A problem with the user's data files; the scripts print it as one line and exit."""


def positive_int(text):
    """argparse type for counts that must be at least 1 (epochs, batch size, ...)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def threads_per_process(processes):
    """OMP_NUM_THREADS for `processes` processes that share this machine's cores."""
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use (Linux)
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(1, cores // processes)


def synthetic_data(seed, n_train=2048, n_val=512, n_features=20):
    """Features X ~ N(0, 1) and targets y = X @ w + small noise, the same on every process."""
    g = torch.Generator().manual_seed(seed)
    # Features on different scales (1 down to 0.1), each mattering equally to y: gradient descent
    # learns the small-scale ones slowly, so the loss keeps falling for tens of epochs.
    scale = torch.logspace(0, -1, n_features)
    X = torch.randn(n_train + n_val, n_features, generator=g) * scale
    w = torch.randn(n_features, 1, generator=g) / scale[:, None]
    y = X @ w + 0.1 * torch.randn(n_train + n_val, 1, generator=g)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def _load_array(path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # allow_pickle=False: an .npy file with Python objects inside could run code when loaded.
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not a plain numeric .npy array ({e})") from None


def _check_split(X, y, name):
    if X.ndim != 2:
        raise DataError(f"X_{name}.npy must be 2-D (samples x features), got shape {X.shape}")
    if y.ndim not in (1, 2) or len(y) != len(X):
        raise DataError(
            f"y_{name}.npy must have one row per sample of X_{name}.npy "
            f"({len(X)}), got shape {y.shape}"
        )
    if len(X) == 0:
        raise DataError(f"X_{name}.npy has no samples")
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 2 and y.shape[1] != 1:
        raise DataError(
            f"y_{name}.npy: integer labels must be one class index per sample, shape "
            f"({len(X)},) or ({len(X)}, 1), got {y.shape} (one-hot? save y.argmax(1); "
            "several regression targets? save them as floats)"
        )
    if not np.issubdtype(X.dtype, np.number) or not np.isfinite(X).all():
        raise DataError(f"X_{name}.npy must hold finite numbers (found NaN, inf or non-numbers)")
    if not np.issubdtype(y.dtype, np.number) or not np.isfinite(y).all():
        raise DataError(f"y_{name}.npy must hold finite numbers (found NaN, inf or non-numbers)")


def npy_data(data_dir):
    """Load DIR/{X,y}_{train,val}.npy and check them; raise DataError with a clear message."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data_dir {data_dir}: no such directory")
    arrays = {}
    for name in ("X_train", "y_train", "X_val", "y_val"):
        arrays[name] = _load_array(data_dir / f"{name}.npy")
    _check_split(arrays["X_train"], arrays["y_train"], "train")
    _check_split(arrays["X_val"], arrays["y_val"], "val")
    if arrays["X_val"].shape[1] != arrays["X_train"].shape[1]:
        raise DataError("X_val.npy and X_train.npy have different numbers of features")
    classification = np.issubdtype(arrays["y_train"].dtype, np.integer)
    if classification != np.issubdtype(arrays["y_val"].dtype, np.integer):
        raise DataError("y_train.npy and y_val.npy must both be integer labels or both floats")
    X_train, X_val = (torch.from_numpy(arrays[k]).float() for k in ("X_train", "X_val"))
    if classification:
        y_train, y_val = (
            torch.from_numpy(arrays[k]).long().reshape(-1) for k in ("y_train", "y_val")
        )
        if min(y_train.min(), y_val.min()) < 0:
            raise DataError("class labels in y_train.npy / y_val.npy must be >= 0")
        # The model has one output per class seen in training: a class that only validation has
        # would add an output that never trains, and count as an error on every sample of it.
        unseen = sorted(set(y_val.unique().tolist()) - set(y_train.unique().tolist()))
        if unseen:
            raise DataError(
                f"y_val.npy has class(es) {', '.join(map(str, unseen[:5]))} that y_train.npy "
                "never has: move some of their samples into training, or drop them"
            )
    else:
        y_train, y_val = (torch.from_numpy(arrays[k]).float() for k in ("y_train", "y_val"))
        y_train, y_val = y_train.reshape(len(X_train), -1), y_val.reshape(len(X_val), -1)
    return X_train, y_train, X_val, y_val


def load_datasets(data_dir, seed):
    """Return (train_set, val_set): your .npy files if data_dir is given, else synthetic data."""
    if data_dir is None:
        X_train, y_train, X_val, y_val = synthetic_data(seed)
    else:
        X_train, y_train, X_val, y_val = npy_data(data_dir)
    return TensorDataset(X_train, y_train), TensorDataset(X_val, y_val)


def make_model(train_set, seed):
    """A linear model and loss that match the data, with the same initial weights for a given seed.

    Integer labels: classification, one output per class and cross-entropy.
    Float targets: regression, one output per target column and mean squared error.
    """
    X_train, y_train = train_set.tensors
    torch.manual_seed(seed)
    if y_train.dtype == torch.long:
        n_classes = int(y_train.max()) + 1  # npy_data checked that validation has no other class
        return torch.nn.Linear(X_train.shape[1], n_classes), F.cross_entropy
    return torch.nn.Linear(X_train.shape[1], y_train.shape[1]), F.mse_loss


def task_line(train_set):
    """What the labels made of the task, in the one line every step prints before training."""
    X_train, y_train = train_set.tensors
    features = f"{X_train.shape[1]} features"
    if y_train.dtype == torch.long:
        n_classes = int(y_train.max()) + 1
        return (
            f"task: classification, {features} -> {n_classes} classes (integer labels 0 to "
            f"{n_classes - 1}), cross-entropy loss"
        )
    return f"task: regression, {features} -> {y_train.shape[1]} float target(s), MSE loss"


def count_correct(output, target):
    """How many samples of a batch get their label as the top class; 0 for regression."""
    if target.dtype != torch.long:
        return 0
    return int((output.argmax(1) == target).sum())


def accuracy_field(accuracy, train_set):
    """The end of an epoch line: ' | val accuracy 93.8%' for classification, '' for regression."""
    if train_set.tensors[1].dtype != torch.long:
        return ""
    return f" | val accuracy {accuracy:.1%}"


def fingerprint(train_set, val_set):
    """A short hash of every array, stored in each snapshot, so that a snapshot never resumes on
    other data unnoticed. One pass over data that is already in memory: about 1 s per GB."""
    digest = hashlib.sha256()
    for tensor in (*train_set.tensors, *val_set.tensors):
        digest.update(f"{tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().numpy())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    # Write the synthetic task as the four .npy files that --data_dir reads: the same numbers as
    # the default data, so a step prints the same losses with or without --data_dir.
    parser = argparse.ArgumentParser(
        prog="datautils.py", description="write the synthetic task as .npy files for --data_dir"
    )
    parser.add_argument(
        "data_dir", help="folder for X_train.npy, y_train.npy, X_val.npy, y_val.npy"
    )
    data_dir = Path(parser.parse_args().data_dir)
    paths = [data_dir / f"{name}.npy" for name in ("X_train", "y_train", "X_val", "y_val")]
    for path in paths:
        if path.exists():  # never overwrite arrays that may be someone's real data
            parser.error(f"{path} exists; remove it or choose another folder")
    data_dir.mkdir(parents=True, exist_ok=True)
    for path, array in zip(paths, synthetic_data(seed=0), strict=True):
        np.save(path, array.numpy())
    print(f"wrote {', '.join(path.name for path in paths)} to {data_dir}")
