#!/bin/bash
# Step 05 (GPT) on a Slurm cluster: one torchrun per node, one training process per GPU.
#
#   python 05_gpt_ddp/prepare.py --tokenizer gpt2          # once, before: writes 05_gpt_ddp/data/
#   sbatch slurm/gpt.sh                                    # 2 nodes x 8 GPUs, preset gpt2-124m
#   sbatch --nodes=4 --gpus-per-node=8 slurm/gpt.sh --preset gpt-1.4b --activation_checkpointing
#   sbatch --gpus-per-node=0 slurm/gpt.sh --preset tiny    # CPU only: asked for, never by accident
#
# Submit from the repository root (the job starts in the folder you submit from) with the Python
# environment that has torch activated (sbatch passes your environment on to the job).
# Rank 0 writes the checkpoint to --out_dir and every node reads the data from --data_dir: both
# must be on a filesystem that all nodes share.
# Otherwise the same as slurm/multinode.sh, explained there and in the README.
#SBATCH --job-name=ddp-gpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --output=%x-%j.log
#SBATCH --time=24:00:00
set -euo pipefail
# Arguments for train.py; --resume is always added below, so restarts continue.
if [ $# -eq 0 ]; then set -- --preset gpt2-124m; fi

# The first node of the allocation hosts the rendezvous. Ask that node for its own address: its name
# may not resolve the same way everywhere, and 127.x.x.x would point each node at itself.
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=$(echo "$nodes" | head -n 1)
head_addr=$(srun --nodes=1 --ntasks=1 --nodelist="$head_node" hostname --ip-address)
head_addr=${head_addr%% *}  # the first one, if it has several
if [[ "$head_addr" == 127.* && "$SLURM_JOB_NUM_NODES" -gt 1 ]]; then
    echo "error: $head_node resolves to $head_addr (loopback) on itself; fix its /etc/hosts," \
        "or set head_addr to its cluster address (see README, 'Multiple machines')" >&2
    exit 1
fi

# GPUs: the #SBATCH line above asks for 8 per node (sbatch --gpus-per-node=4 ... for nodes with 4),
# torchrun starts one training process per GPU that Slurm gave the node, and they train with
# --device cuda, so a GPU job never falls back to the CPU. A CPU run must be asked for:
# sbatch --gpus-per-node=0 ... (then one process per node, which uses all the node's cores).
# NPROC_PER_NODE overrides either count: sbatch --export=ALL,NPROC_PER_NODE=4 ...
if [ "${SLURM_GPUS_PER_NODE:-}" = 0 ]; then
    device=cpu
    nproc_per_node=${NPROC_PER_NODE:-1}
elif [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
    device=cuda
    nproc_per_node=${NPROC_PER_NODE:-$SLURM_GPUS_ON_NODE}
else
    echo "error: Slurm gave this job no GPUs: ask for them (sbatch --gpus-per-node=N), or" \
        "submit with --gpus-per-node=0 for a CPU run" >&2
    exit 1
fi

# Before any torchrun: PyTorch must see those GPUs on every node. A CPU-only wheel, or one built
# for a newer CUDA than the node's NVIDIA driver, sees none; every training process would then
# stop at start, torchrun restart them 3 times, and the log fill with the same error.
gpu_check='
import socket, sys, warnings
with warnings.catch_warnings(record=True) as caught:  # the driver warning says why, keep it
    warnings.simplefilter("always")
    import torch
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
need = int(sys.argv[1])
if seen < need:
    if seen > 0:
        why = "more processes than GPUs (NPROC_PER_NODE? CUDA_VISIBLE_DEVICES?)"
    elif torch.version.cuda is None:
        why = "this PyTorch is built without CUDA (a CPU-only wheel)"
    else:
        said = [str(w.message).split(". ")[0] for w in caught if "CUDA" in str(w.message)]
        why = (said or [f"is the NVIDIA driver older than its CUDA {torch.version.cuda}?"])[0]
    sys.exit(f"error: PyTorch {torch.__version__} on {socket.gethostname()} sees {seen} GPUs,"
             f" needs {need}: {why}")
'
if [ "$device" = cuda ]; then
    srun --kill-on-bad-exit=1 python -c "$gpu_check" "$nproc_per_node"
fi

# If the nodes have several network interfaces, name the one they reach each other on, e.g.:
# export GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0
# A restarted torchrun must not reuse the old store address of a worker that died.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST)," \
    "$nproc_per_node processes per node on $device, rendezvous at $head_addr:29500"

# srun starts one torchrun per node (--ntasks-per-node=1 above), each with all the node's GPUs and
# cores (--exclusive: whole nodes, so no other job uses them, nor port 29500). They all meet at the
# head node; --rdzv_id names this job's rendezvous, so nothing else can join it by mistake.
# --max-restarts: if a process dies, every node restarts its processes; --resume makes them continue
# from the last checkpoint in --out_dir.
# --kill-on-bad-exit: a node whose torchrun gives up (restarts spent, or it cannot start at all)
# ends the whole job at once; without it the others would wait for it until torchrun's
# join_timeout (10 minutes).
# on_node runs on every node: it asks the node for its own address, checks it as the head's was
# checked, prints it with the node's name (so the log shows every node that took part and the
# address it gave), and passes it to torchrun as --local-addr. The node that gets rendezvous rank 0
# hands its --local-addr to every worker as MASTER_ADDR, the address init_process_group connects
# to; without it that would be its socket.getfqdn(), a name that may not resolve everywhere.
on_node='addr=$(hostname --ip-address); addr=${addr%% *}
if [[ "$addr" == 127.* && "$SLURM_JOB_NUM_NODES" -gt 1 ]]; then
    echo "error: $(hostname) resolves to $addr (loopback) on itself; fix its /etc/hosts" >&2
    exit 1
fi
echo "torchrun on $(hostname) at $addr"
exec torchrun --local-addr="$addr" "$@"'
srun --kill-on-bad-exit=1 bash -c "$on_node" torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$nproc_per_node" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$head_addr:29500" \
    --max-restarts=3 \
    05_gpt_ddp/train.py --resume --device "$device" "$@"
