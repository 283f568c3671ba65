"""Checkpoints of train.py: written by rank 0 in the background, read and checked on resume.

Only rank 0 writes, while the other ranks go on into the next step's all-reduce (or the final
barrier) and wait there for it. A write that outlasts the process group's timeout (gigabytes to a
network filesystem) would make them give up, and torchrun would restart everyone into the same
slow save. So a save copies the state to host memory, which takes as long as a copy of the
weights, and a thread writes that copy while training goes on. The copy needs host memory of the
checkpoint's size (12 bytes per parameter: 17 GB at gpt-1.4b), twice while the final save waits
for the one before it.

This file is the same in 05_gpt_ddp and 06_llama_ddp (a test keeps the two equal).
"""

import math
import os
import shutil
import sys
import threading
from pathlib import Path

import torch
from model import CHECKPOINT_FORMAT

PROG = "train.py"
STEP = Path(__file__).resolve().parent.name  # the step folder: 05_gpt_ddp or 06_llama_ddp
# the optimizer settings that only choose a kernel: a change gives the same update up to rounding
KERNEL_CHOICES = {"fused", "foreach", "capturable", "differentiable"}


def fail(message):
    sys.exit(f"{PROG}: error: {message}")


def to_host(obj):
    """obj with every tensor copied to CPU memory: training changes the originals in place while
    the copy is being written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def fsync_folder(folder):
    if os.name == "posix":  # Windows cannot open a folder to fsync it (as in steps 01-04)
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def write_atomically(path, state):
    # temp file, fsync, rename, fsync the folder: no half-written or lost file after a power cut
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)  # flushes f at the end: every byte is with the OS
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_folder(path.parent)


def link_atomically(src, dst):
    """dst becomes a second name of src's file, without writing its bytes again (a copy where the
    filesystem has no hard links). A later os.replace of src leaves dst on the old file."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_folder(dst.parent)


class BackgroundSaver:
    """Rank 0's checkpoint writer: one thread per save, each waiting for the one before."""

    def __init__(self, max_wait):
        self.max_wait = max_wait  # seconds a save may hold up rank 0 (and so every rank)
        self.thread = None
        self.error = None

    def save(self, state, paths, final=False):
        """Write state to paths[0] and make the other paths names of that file. Returns False, and
        saves nothing, if the previous write is still running after max_wait seconds: waiting
        longer would hold the other ranks in their collective up to the timeout. The final save
        never skips: its thread writes after the previous one, and finish() waits for both."""
        if self.thread is not None and not final:
            self.thread.join(self.max_wait)
            if self.thread.is_alive():
                return False
        self.check()
        snapshot, previous = to_host(state), self.thread
        self.thread = threading.Thread(target=self._write, args=(snapshot, paths, previous))
        self.thread.start()
        return True

    def _write(self, snapshot, paths, previous):
        if previous is not None:
            previous.join()
        try:
            write_atomically(paths[0], snapshot)
            for path in paths[1:]:
                link_atomically(paths[0], path)
        except Exception as e:  # disk full, quota, permissions: reported by the main thread
            self.error = f"cannot write checkpoint {paths[0]} ({type(e).__name__}: {e})"

    def check(self):
        if self.error:
            fail(self.error)

    def finish(self):
        """Wait for the last write; call it after the process group is gone, so that no rank
        waits in a collective for rank 0's disk."""
        if self.thread is not None:
            self.thread.join()
        self.check()


def load(path):
    """A checkpoint of this step, memory-mapped on the CPU: the ranks of one node share the
    page cache instead of each holding a copy, and no copy lands on the GPU before its place."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated file, not a zip archive, disallowed pickled objects...
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); move it away to start fresh")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} is not a {STEP} checkpoint; use another --out_dir")
    return ckpt


def load_optimizer(optimizer, saved):
    """The saved AdamW moments, with this run's settings. load_state_dict alone would bring back
    the checkpoint's param groups: its weight_decay, betas and eps, and its fused flag (a
    checkpoint written on CPU would resume unfused on a GPU). Returns the settings that changed."""
    current = optimizer.state_dict()["param_groups"]
    changed = sorted(
        f"{key} {old[key]} -> {new[key]}"
        for old, new in zip(saved["param_groups"], current, strict=True)
        for key in new.keys() - {"params", "lr", *KERNEL_CHOICES}
        if old.get(key) != new[key]
    )
    groups = [
        {**new, "params": old["params"]}
        for old, new in zip(saved["param_groups"], current, strict=True)
    ]
    # load_state_dict moves each state tensor to its parameter's device, and puts AdamW's step
    # counts on the GPU for a fused optimizer, as the groups passed here say
    optimizer.load_state_dict({**saved, "param_groups": groups})
    return changed


def check_ranks_agree(device, ckpt_path, **start):
    """Stop in one line, not a hang, if ranks would resume from different points: ckpt.pt seen
    by some ranks only (per-node disks, a stale network filesystem view after a restart)."""
    import torch.distributed as dist

    low = torch.tensor(list(start.values()), device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        dist.destroy_process_group()
        seen = zip(start, low.tolist(), high.tolist(), strict=True)
        seen = "; ".join(f"{k} {a} on some ranks, {b} on others" for k, a, b in seen if a != b)
        fail(f"ranks disagree on where to resume ({seen}): all must read the same {ckpt_path}")


def best_so_far(ckpt):
    """The lowest validation loss a checkpoint has seen (infinity for a fresh run)."""
    return math.inf if ckpt is None else ckpt.get("best_val_loss", math.inf)
