#!/bin/bash
# Step 04 on a Slurm cluster: one torchrun per node, torchrun starts one training process per GPU.
#
#   sbatch slurm/multinode.sh                      # 2 nodes, 50 epochs, snapshot every 10
#   sbatch --nodes=4 slurm/multinode.sh 100 20     # any node count, any 04_multinode.py arguments
#   sbatch --gpus-per-node=8 slurm/multinode.sh    # GPU cluster: one process per allocated GPU
#
# Submit from the repository root (the job starts in the folder you submit from) with the Python
# environment that has torch activated (sbatch passes your environment on to the job).
#SBATCH --job-name=ddp-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=%x-%j.log
#SBATCH --time=01:00:00
set -euo pipefail
if [ $# -eq 0 ]; then set -- 50 10; fi  # TOTAL_EPOCHS SAVE_EVERY [options of 04_multinode.py]

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

# One process per allocated GPU; on a CPU-only cluster one process per node (it uses all the node's
# cores), unless NPROC_PER_NODE says otherwise (sbatch --export=ALL,NPROC_PER_NODE=4 ...).
nproc_per_node=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

# If the nodes have several network interfaces, name the one they reach each other on, e.g.:
# export GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0
# A restarted torchrun must not reuse the old store address of a worker that died.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST)," \
    "$nproc_per_node processes per node, rendezvous at $head_addr:29500"

# srun starts one torchrun per node (--ntasks-per-node=1 above), each with all the node's GPUs and
# cores (--exclusive: whole nodes, so no other job uses them, nor port 29500). They all meet at the
# head node; --rdzv_id names this job's rendezvous, so nothing else can join it by mistake.
# --max-restarts: if a process dies, every node restarts its processes, which resume from the
# last snapshot.
# --kill-on-bad-exit: a node whose torchrun gives up (restarts spent, or it cannot start at all)
# ends the whole job at once; without it the others would wait for it until torchrun's
# join_timeout (10 minutes).
# bash -c: each node prints its name (so the log shows every node that took part), then runs
# torchrun with the arguments that follow.
srun --kill-on-bad-exit=1 bash -c 'echo "torchrun on $(hostname)"; exec torchrun "$@"' torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$nproc_per_node" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$head_addr:29500" \
    --max-restarts=3 \
    04_multinode.py "$@"
