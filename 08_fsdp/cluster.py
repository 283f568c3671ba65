"""What a job on a cluster needs beyond the training loop (the same file in 05_gpt_ddp/ and
06_llama_ddp/): why a GPU is missing, the process group, and DDP's buckets fixed before the first
step so that a resumed run reduces its gradients exactly as an uninterrupted one."""

import datetime
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def no_gpu_causes():
    """The likely reasons why torch.cuda.is_available() is False, for a one-line error."""
    causes = []
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        causes.append("CUDA_VISIBLE_DEVICES hides every GPU")
    gres = ("SLURM_GPUS", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")
    if "SLURM_JOB_ID" in os.environ and not any(v.startswith(gres) for v in os.environ):
        causes.append("the Slurm job requested no GPUs (sbatch --gpus-per-node=N)")
    if torch.version.cuda is None:
        causes.append(f"this PyTorch ({torch.__version__}) is built without CUDA")
    elif Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi"):
        causes.append(f"the NVIDIA driver may be older than PyTorch's CUDA {torch.version.cuda}")
    return "; ".join(causes) or "no NVIDIA GPU and driver found"


def init_process_group(device, timeout_s):
    """One process group per job: NCCL between GPUs, gloo between CPU processes."""
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    # device_id (NCCL): binds the group to this GPU and creates NCCL's communicator now
    bound = {"device_id": device} if backend == "nccl" else {}
    if sys.platform == "win32":  # PyTorch's Windows builds have no libuv for the TCP store
        os.environ.setdefault("USE_LIBUV", "0")
    # every collective waits this long for the slowest rank, then fails instead of hanging
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=timeout, **bound)


def build_ddp_buckets(model, vocab_size, batch_size, seq_len, device, autocast):
    """Two forward/backward passes on random tokens, gradients zeroed: DDP's final buckets.

    DDP reduces its first backward in one bucket, then regroups the gradients into ~25 MiB buckets
    (torch/nn/parallel/distributed.py). An element's place in a bucket fixes the order in which
    the all-reduce adds the ranks' values (with 3+ ranks, the last bits): done in every run, a
    resumed step is reduced as in the uninterrupted run. The regrouping holds old and new buckets
    at once: done before AdamW has state, that stays under the training peak.
    """
    gen = torch.Generator().manual_seed(0)  # its own generator: the training RNG is untouched
    tokens = torch.randint(vocab_size, (batch_size, seq_len + 1), generator=gen).to(device)
    for _ in range(2):  # the first records the order, the second regroups
        with autocast:
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    model.zero_grad(set_to_none=False)  # in place: .grad stays in the (new) buckets
