"""Data parallelism written by hand, three ways. train.py --impl picks one of them (or torch's DDP).

Every rank holds a full copy of the model and trains on its own slice of the batch. Before
optimizer.step(), every rank's .grad must hold the mean of all ranks' gradients: then every copy
takes the same step and the copies stay equal. That is all DDP promises. The three versions keep
that promise with more and more care about *how many* messages they send and *when*:

    Naive     after backward, one all-reduce per parameter tensor
    Flat      after backward, one all-reduce of all gradients copied into one buffer
    Bucketed  during backward, one all-reduce per bucket, sent as soon as the bucket is full
              (what DDP does)

Read them top to bottom: each class is the previous idea plus one.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn


class HandWrittenDDP(nn.Module):
    """What the three versions share: they wrap the model, start every rank from rank 0's
    weights, and let no_sync() switch communication off for gradient accumulation."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        self.sync = True  # False inside no_sync()
        # Ranks may have built different random weights (another seed, another GPU); copying
        # rank 0's parameters and buffers to everyone makes the copies equal before step 1.
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside this block only add to .grad on this rank; the next backward
        outside it averages the accumulated sum, as DDP's no_sync() does."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def finish_gradient_sync(self):
        """Called after the last backward of a step, before optimizer.step()."""
        raise NotImplementedError


class Naive(HandWrittenDDP):
    def finish_gradient_sync(self):
        # One message per parameter tensor (14 for train.py's model, hundreds for a
        # transformer): every message pays the network's latency once.
        for p in self.module.parameters():
            dist.all_reduce(p.grad)  # the sum over all ranks, written into every rank's p.grad
            p.grad /= self.world_size  # ... and the sum divided by the ranks is the mean


class Flat(HandWrittenDDP):
    def finish_gradient_sync(self):
        # One message for everything: latency is paid once. The price is two copies of all
        # gradients per step, and the message still leaves only after backward has ended.
        grads = [p.grad for p in self.module.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])  # copy 1: gradients -> one buffer
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(chunk.view_as(g))  # copy 2: buffer -> gradients


def assign_buckets(params, bucket_mb):
    """Split `params` into buckets of about bucket_mb MiB, in the order backward produces their
    gradients: the reverse of the order the model registers (and, usually, uses) them.

    A bucket closes as soon as it holds bucket_mb or more, so it may overshoot by one tensor; the
    last bucket takes what is left. DDP follows the same rule (once per dtype and device; this
    sketch assumes one of each)."""
    cap = bucket_mb * 2**20
    buckets, current, size = [], [], 0
    for p in reversed(params):
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= cap:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


class Bucketed(HandWrittenDDP):
    def __init__(self, module, bucket_mb):
        super().__init__(module)
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = assign_buckets(params, bucket_mb)
        self.bucket_buffers = []  # one flat gradient buffer per bucket
        self.bucket_of = {}  # parameter -> index of its bucket
        for i, bucket in enumerate(self.buckets):
            numel = sum(p.numel() for p in bucket)
            buffer = torch.zeros(numel, dtype=params[0].dtype, device=params[0].device)
            offset = 0
            for p in bucket:
                # .grad becomes a view into the bucket: backward accumulates straight into the
                # buffer we send, so there is no copy and no second set of gradients in memory.
                # (That is DDP's gradient_as_bucket_view=True. It is also why the training loop
                # zeroes gradients in place: set_to_none would cut .grad loose from its bucket.)
                p.grad = buffer[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                self.bucket_of[p] = i
                # autograd calls this right after it has added this backward's gradient to p.grad
                p.register_post_accumulate_grad_hook(self._gradient_ready)
            self.bucket_buffers.append(buffer)
        self._new_step()

    def _new_step(self):
        self.missing = [len(bucket) for bucket in self.buckets]  # gradients each bucket awaits
        self.handles = []  # the all-reduces in flight

    def _gradient_ready(self, p):
        if not self.sync:  # inside no_sync(): keep accumulating locally, send nothing
            return
        i = self.bucket_of[p]
        self.missing[i] -= 1
        if self.missing[i] == 0:  # the bucket's last gradient has arrived: send the bucket now
            buffer = self.bucket_buffers[i]
            buffer /= self.world_size  # divide before summing, as DDP does
            # async_op=True returns at once: the all-reduce runs on the backend's own threads
            # (gloo) or stream (NCCL) while autograd goes on computing earlier layers' gradients.
            self.handles.append(dist.all_reduce(buffer, async_op=True))

    def finish_gradient_sync(self):
        # DDP does this at the very end of backward(); here the training loop calls it.
        if len(self.handles) != len(self.buckets):
            raise RuntimeError(
                f"only {len(self.handles)} of {len(self.buckets)} buckets were sent: some "
                "parameter got no gradient (DDP needs find_unused_parameters=True for that)"
            )
        for handle in self.handles:
            handle.wait()  # the averaged gradients are now in the buckets, hence in .grad
        self._new_step()
