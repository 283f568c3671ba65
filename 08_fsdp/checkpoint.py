"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shard, in
the background, while training goes on.

A checkpoint is a folder out_dir/ckpt-<step>/ holding DCP's files (one per rank, and .metadata,
which records where every piece of every tensor lies) and meta.json (step, world size, stage,
config, tokenizer, loss scale). It is written as a hidden .ckpt-<step>.tmp/ folder and renamed
once complete, so a crash mid-save leaves a temp folder that nothing reads and the previous
checkpoint whole. best-<step>/ holds the same files for the lowest validation loss so far.

The state is keyed by parameter names, the same at every stage: {"model": {name: weight},
"optimizer": {name: {step, exp_avg, exp_avg_sq}}}. DCP reads any saved layout into any other, so
a checkpoint of 2 ranks at zero3 resumes on 4 ranks, or on 1, at any stage (resharding).

Why in the background: DCP's save ends in collectives (rank 0 gathers what every rank wrote, then
writes .metadata), so they wait for the slowest rank's disk. In the training process group a
write of gigabytes to a network filesystem would outlast the collective timeout. So a save copies
this rank's shard to host memory (DCP's DefaultStager) and a thread writes it, its collectives in
a second process group of its own (gloo, SAVE_TIMEOUT). Not dcp.async_save itself (torch 2.13,
state_dict_saver.py): each call starts a fresh one-thread executor, so a save could begin before
the one before it ends, and the collectives of the two would interleave differently on each rank.
"""

import datetime
import json
import math
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

PROG = "train.py"
FORMAT = "ddp-tutorial 08_fsdp v2"
LATEST, BEST = "ckpt-", "best-"
# how long a save's collectives wait for the slowest rank's disk (not the training's --timeout)
SAVE_TIMEOUT = datetime.timedelta(hours=2)
# the optimizer settings that only choose a kernel: a change gives the same update up to rounding
KERNEL_CHOICES = {"fused", "foreach", "capturable", "differentiable"}
# DCP warns at every save and load of one process that it assumes one process: it is right
warnings.filterwarnings("ignore", "torch.distributed is (disabled, )?unavailable or uninit")


def fail(message):
    sys.exit(f"{PROG}: error: {message}")


def local_optimizer(optimizer):
    """The AdamW that updates this rank's parameters: for zero1, ZeroRedundancyOptimizer's inner
    optimizer over this rank's share; otherwise the optimizer itself."""
    return getattr(optimizer, "optim", optimizer)


def init_optimizer_state(optimizer):
    """Create AdamW's states now (zeros, step 0), as its first step would (torch/optim/adam.py,
    _init_group), so that a checkpoint can be loaded into them before any step."""
    inner = local_optimizer(optimizer)
    for group in inner.param_groups:
        on_device = group["fused"] or group["capturable"]
        for p in group["params"]:
            if not inner.state[p]:
                inner.state[p] = {
                    "step": torch.zeros((), device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }


def state_dict(named_params, optimizer):
    """What DCP saves and loads in place: the parameters and the AdamW states this rank holds
    (for zero1: only those of its own share)."""
    init_optimizer_state(optimizer)
    inner = local_optimizer(optimizer)
    return {
        "model": dict(named_params),
        "optimizer": {name: inner.state[p] for name, p in named_params if p in inner.state},
    }


def optimizer_settings(optimizer):
    """This run's AdamW settings per parameter group (weight decay, betas, eps...), for meta.json:
    DCP restores the moments only, so a resumed run trains with its own settings."""
    return [
        {k: v for k, v in g.items() if k not in {"params", "lr", *KERNEL_CHOICES}}
        for g in optimizer.param_groups
    ]


def changed_settings(saved, current):
    """'key old -> new' for each optimizer setting this run changes against the checkpoint."""
    return sorted(
        f"{key} {old.get(key)} -> {new[key]}"
        for old, new in zip(saved, current, strict=True)
        for key in new
        if json.loads(json.dumps(new[key])) != old.get(key)  # tuples come back as lists
    )


def fsync_folder(path):
    if os.name == "posix":  # Windows cannot open a folder to fsync it
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def checkpoints(out_dir, prefix=LATEST):
    """Complete checkpoints in out_dir, oldest first (temp folders of crashed saves left out)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    return sorted(found, key=lambda p: p.name)


def publish(tmp, final, meta):
    """Rank 0, once every rank's files are in tmp: meta.json, then rename tmp to final, then
    remove the older checkpoints of that kind."""
    with open(tmp / "meta.json", "w") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_folder(tmp)
    if final.exists():  # the same step saved again (a resumed run's last step)
        shutil.rmtree(final)
    os.replace(tmp, final)  # the checkpoint appears whole, or not at all
    fsync_folder(final.parent)
    prefix = final.name[: final.name.index("-") + 1]
    for old in checkpoints(final.parent, prefix):
        if old != final:
            shutil.rmtree(old)


def link_folder(src, dst):
    """dst: a second checkpoint folder of src's files (hard links: no byte written twice)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(f, tmp / f.name)
    meta = json.loads((tmp / "meta.json").read_text())
    (tmp / "meta.json").unlink()  # publish writes it again
    publish(tmp, dst, {k: v for k, v in meta.items() if k != "format"})


def write(snapshot, paths, meta, group):
    """Every rank writes its shard of `snapshot` into paths[0]'s temp folder; rank 0 then
    publishes it and links the other paths (best-*) to its files."""
    final = paths[0]
    tmp = final.with_name(f".{final.name}.tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
    if group is not None:
        dist.barrier(group=group)  # nobody writes into tmp before it is clean
    # each rank writes (and fsyncs) the pieces it holds, replicated ones by one rank only
    dcp.save(snapshot, checkpoint_id=tmp, process_group=group, no_dist=group is None)
    if rank == 0:  # dcp.save returns on rank 0 after it wrote .metadata: every file is there
        publish(tmp, final, meta)
        for other in paths[1:]:
            link_folder(final, other)


class BackgroundSaver:
    """Every rank's checkpoint writer: one thread per save, each waiting for the one before, so
    that all ranks run the saves' collectives in the same order."""

    def __init__(self, max_wait, device):
        self.max_wait = max_wait  # seconds a save may hold up this rank (and so every rank)
        self.device = device  # where the training group's tensors live (NCCL: this GPU)
        self.thread = None
        self.error = None
        self.group = None  # one process: no collectives
        if dist.is_initialized():  # on every rank: the saves' own group, waiting for disks
            self.group = dist.new_group(backend="gloo", timeout=SAVE_TIMEOUT)

    def save(self, state, paths, meta, final=False):
        """Write state (DCP's state dict) to paths (folders) in the background. Returns False, and
        saves nothing, if the previous save is still running on some rank after max_wait seconds.
        The final save never skips: its thread writes after the previous one."""
        if self.thread is not None and not final:
            self.thread.join(self.max_wait)
        if not final and not self.all_done():
            return False
        self.check()
        stager = DefaultStager(StagingOptions(False, False, False, False))
        snapshot = stager.stage(state)  # this rank's shards, copied to host memory
        previous = self.thread
        self.thread = threading.Thread(target=self._write, args=(snapshot, paths, meta, previous))
        self.thread.start()
        return True

    def all_done(self):
        """Whether every rank's previous save has ended: a small all-reduce, no disk in it."""
        done = self.thread is None or not self.thread.is_alive()
        done = torch.tensor([int(done)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    def _write(self, snapshot, paths, meta, previous):
        if previous is not None:
            previous.join()
        try:
            write(snapshot, paths, meta, self.group)
        except Exception as e:  # disk full, quota, permissions: reported by the main thread
            self.error = f"cannot write checkpoint {paths[0]} ({type(e).__name__}: {e})"

    def check(self):
        if self.error:
            fail(self.error)

    def finish(self):
        """Wait for the last save; call it after the training's last collective, so that no rank
        waits in one for a disk."""
        if self.thread is not None:
            self.thread.join()
        self.check()


def read_meta(path, fail=fail):
    """meta.json of the checkpoint folder `path`, or a one-line stop."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        fail(f"cannot read {Path(path) / 'meta.json'} ({type(e).__name__}); move {path} away")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fail(f"{path} is not a checkpoint of 08_fsdp/train.py; use another --out_dir")
    return meta


def load(path, named_params, optimizer):
    """Read the checkpoint into the model's parameters and the optimizer's states, in place:
    each rank reads the pieces of the tensors it holds, however they were saved."""
    single = not dist.is_initialized()  # one process: read without a process group
    dcp.load(state_dict(named_params, optimizer), checkpoint_id=Path(path), no_dist=single)


def best_so_far(meta):
    """The lowest validation loss a checkpoint has seen (infinity for a fresh run)."""
    return math.inf if meta is None else meta.get("best_val_loss", math.inf)


def check_ranks_agree(device, ckpt_path, **start):
    """Stop in one line, not a hang, if ranks would resume from different points: ckpt-* seen
    by some ranks only (per-node disks, a stale network filesystem view after a restart)."""
    low = torch.tensor(list(start.values()), device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        dist.destroy_process_group()
        seen = zip(start, low.tolist(), high.tolist(), strict=True)
        seen = "; ".join(f"{k} {a} on some ranks, {b} on others" for k, a, b in seen if a != b)
        fail(f"ranks disagree on where to resume ({seen}): all must read the same {ckpt_path}")
