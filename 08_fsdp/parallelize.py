"""How much of the training state each rank keeps: one function applies the chosen stage.

The stages of Rajbhandari et al. 2020 ("ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models"), with fp32 master weights, AdamW, P parameters and W ranks:

    ddp    every rank holds everything: parameters, gradients, AdamW states  16 P bytes
    zero1  AdamW states sharded: ZeroRedundancyOptimizer over DDP            4 P + 4 P + 8 P / W
    zero2  + gradients sharded: fully_shard(reshard_after_forward=False)     16 P / W between steps
    zero3  + parameters sharded: fully_shard(reshard_after_forward=True)     16 P / W between steps

zero2 gathers the parameters once per step and keeps them until backward; zero3 gathers each
block just before its forward and again before its backward, and frees it after each.
model.py knows nothing of this: everything distributed is here.
"""

import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

STAGES = ("ddp", "zero1", "zero2", "zero3")
SHARDED = ("zero2", "zero3")  # the stages whose parameters are DTensors
# fp16 needs a loss scaler whose overflow check sees every rank's gradients. ddp and zero1 keep
# whole gradients on every rank (step 05's GradScaler); sharded ones need FSDP1's
# ShardedGradScaler, which all-reduces the check but is not written for FSDP2's DTensors.
NO_FP16 = (
    "--dtype fp16 with --stage zero2/zero3 needs a loss scaler for sharded gradients, which "
    "FSDP2 does not have: use --dtype bf16 (Ampere or later), fp32, or --stage zero1"
)


def parallelize(model, stage, device, dtype, seed, compile_blocks=False):
    """Give `model` (built on the meta device: shapes only) real weights on `device`, distributed
    as `stage` says. Returns the model to call in training: DDP(model) for ddp/zero1, `model`
    itself for zero2/zero3 (fully_shard changes the modules in place, names unchanged).

    The order matters, and is torchtitan's (parallelize.py there: tensor parallel, activation
    checkpointing, compile, then data parallel last):
    1. activation checkpointing is a flag of the model (train.py sets it before this);
    2. torch.compile each block in place, so that FSDP's hooks stay outside the compiled code;
    3. the data-parallel wrapper last: DDP and fully_shard must see the final modules.
    The weights are drawn after sharding, each rank filling only its shard (init_weights), so no
    rank ever holds all of them at once.
    """
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    if stage in ("ddp", "zero1"):
        to_empty_keeping_ties(model, device)
        init_weights(model, seed)
        if not dist.is_initialized():  # one process, no torchrun: step 05's plain loop
            return model
        # gradient_as_bucket_view: .grad are views into DDP's buckets, not a second copy
        ddp = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        ddp.broadcast_buffers = False  # GPT has no buffers to keep in step
        return ddp
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(  # bf16 matmuls, fp32 master weights and gradient reduction
        param_dtype=torch.bfloat16 if dtype == "bf16" else None, reduce_dtype=torch.float32
    )
    # one FSDP group per block: its parameters are gathered in one all-gather, its gradients
    # reduce-scattered in one reduce-scatter, and only one or two blocks are whole at a time
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=stage == "zero3", mp_policy=policy)
    # the root group takes what is left: wte, wpe, ln_f and head. A tied head.weight IS
    # wte.weight, and torch 2.13 refuses a parameter shared by two groups, so both stay here.
    # The root is not resharded after forward: backward needs the head first thing.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    model.to_empty(device=device)  # allocates only each rank's shard
    init_weights(model, seed)
    return model


def to_empty_keeping_ties(model, device):
    """model.to_empty(device), which gives each module a new tensor of its own: a weight shared
    by two modules (head.weight IS wte.weight) would silently become two, trained apart. Tie
    them again. (fully_shard's groups keep one sharded parameter for both, so FSDP needs not.)"""
    places = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((module, name))
    model.to_empty(device=device)
    for (first, first_name), *others in places.values():
        for module, name in others:
            setattr(module, name, getattr(first, first_name))


def _local_rows(full, param):
    """The rows of `full` that this rank holds of `param`: FSDP2 shards dim 0 like torch.chunk,
    ranks past the last chunk holding none."""
    if not isinstance(param, DTensor):
        return full
    rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
    chunks = torch.chunk(full, world, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


@torch.no_grad()
def init_weights(model, seed):
    """GPT's initialisation (model.py: GPT.__init__ and _init_weights), drawn one parameter at a
    time on the CPU from a generator seeded by (seed, its index), each rank copying its rows.
    The weights are therefore the same at every stage and world size, and only one whole tensor
    exists on a rank at a time (for gpt-1.4b, the 0.4 GB token embedding)."""
    n_layer = model.cfg.n_layer
    for index, (name, param) in enumerate(model.named_parameters()):  # a tied matrix once
        module = model.get_submodule(name.rpartition(".")[0])
        full = torch.empty(param.shape)
        gen = torch.Generator().manual_seed(seed * 100_003 + index)
        if isinstance(module, torch.nn.LayerNorm):
            full.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            full.zero_()
        else:  # Linear and Embedding weights; the residual projections scaled by depth
            std = (
                0.02 / math.sqrt(2 * n_layer)
                if name.endswith(("proj.weight", "down.weight"))
                else 0.02
            )
            full.normal_(0.0, std, generator=gen)
        local = param.to_local() if isinstance(param, DTensor) else param
        local.copy_(_local_rows(full, param))


def make_optimizer(groups, stage, lr, fused):
    """AdamW over the parameter groups; for zero1 each rank keeps and updates the AdamW states of
    its share of the parameters only, then broadcasts the updated parameters to the others."""
    if stage == "zero1":
        return ZeroRedundancyOptimizer(
            groups, optimizer_class=torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), fused=fused
        )
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


def check_optimizer_holds_shards(optimizer, stage):
    """The optimizer must hold the sharded DTensors. Built after a forward, it would get the
    root's gathered (plain) parameters, which FSDP frees and replaces: those never train
    (pytorch/pytorch#149205). Returns an error message, or None."""
    if stage not in SHARDED:
        return None
    plain = sum(not isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])
    if plain:
        return (
            f"the optimizer holds {plain} unsharded parameter(s): build it after parallelize() "
            "and before the first forward"
        )
    return None


def gradient_sync(model, sync):
    """A context for one micro-batch's forward and backward: with sync=False the gradients only
    accumulate on this rank. DDP decides at forward time (no_sync wraps both); FSDP reads a flag
    in backward. FSDP without sync keeps the whole unsharded gradient of every block until the
    last micro-batch (4 bytes per parameter, not 4 / W): less communication, more memory."""
    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def global_norm(norm):
    """clip_grad_norm_'s result as a plain tensor holding the norm over all ranks' gradients.
    On DTensor gradients it returns a DTensor: in torch 2.13 a replicated one, but earlier
    versions returned each rank's partial norm here, which logged too small a value
    (pytorch/pytorch#170862); full_tensor() is right in both cases."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def named_parameters(model):
    """(name, parameter) of the model as the optimizer holds them: sharded DTensors for
    zero2/zero3 (after an evaluation the root is still gathered, so reshard it first)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return list(getattr(model, "module", model).named_parameters())
