"""The activation memory that memory_estimate() predicts (05 and 06 model.py) against a count.

A pack hook of torch.autograd.graph.saved_tensors_hooks sees every tensor autograd saves for
backward. The count takes each storage once (q, k and v are views of one qkv tensor; several
operations save the same input) and leaves out weights: a parameter, or a bf16 copy or transpose
that autocast makes of one, is counted by the estimate's weight lines, not as an activation.

With activation checkpointing, checkpoint() saves each block's input (through our hook) and puts
its own hooks in front of ours inside the block. During backward one block at a time is
recomputed, which saves what that block saves without checkpointing (its input is already there).

CPU and CUDA differ in two places, and the estimate is written for CUDA: a CPU dropout mask is in
the activation's dtype (CUDA: 1 byte), and with attention dropout the CPU falls back to an
attention that keeps the T x T matrix (CUDA's fused kernels keep no mask). The dropout cases
below therefore count each mask as 1 byte per element and switch attention dropout off.
"""

import pytest
import torch
from helpers import load_script

GPT = load_script("05_gpt_ddp/model.py", "gpt05_model_memory")
LLAMA = load_script("06_llama_ddp/model.py", "llama06_model_memory")
B, T = 2, 32  # a micro-batch of 2 sequences of 32 tokens
TOLERANCE = 0.10

# autograd nodes between a parameter and the tensor a matmul saves: a cast, a transpose, a view
WEIGHT_PATH = {"ToCopyBackward0", "TBackward0", "TransposeBackward0", "ViewBackward0"}


def is_weight(t):
    """A parameter, or autocast's bf16 copy of one (possibly transposed)."""
    if t.grad_fn is None:
        return t.requires_grad  # a leaf that needs a gradient: a parameter
    fn = t.grad_fn
    while type(fn).__name__ in WEIGHT_PATH:
        fn = fn.next_functions[0][0]
    return type(fn).__name__ == "AccumulateGrad"


def is_cpu_dropout_mask(t, width):
    """On a CPU a dropout mask is a float tensor of the activation's shape made by no autograd
    node (the other saved tensors without a node are token ids and per-token statistics)."""
    return (
        t.grad_fn is None
        and not t.requires_grad
        and t.is_floating_point()
        and t.numel() == B * T * width
    )


def count_saved(model, bf16, width, masks_as_cuda=False):
    """Bytes saved for backward by one forward of `model`: around the blocks, in each block (the
    first block that saves a storage gets it), each block's input, and the log-probabilities."""
    blocks = model.blocks if hasattr(model, "blocks") else model.layers
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}  # storage address -> (where, bytes)
    where = ["around"]
    inputs = []

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen and not is_weight(t):
            nbytes = storage.nbytes()
            if masks_as_cuda and is_cpu_dropout_mask(t, width):
                nbytes = t.numel()  # CUDA's dropout mask: one bool per element
            name = "log_probs" if type(t.grad_fn).__name__ == "LogSoftmaxBackward0" else where[0]
            seen[key] = (name, nbytes)
        return t

    def enter(i):
        def hook(module, args):
            where[0] = i
            inputs.append(args[0].untyped_storage().nbytes())

        return hook

    hooks = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    hooks += [b.register_forward_hook(lambda *_: where.__setitem__(0, "around")) for b in blocks]
    torch.manual_seed(0)
    idx = torch.randint(0, model.cfg.vocab_size, (B, T + 1))
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            model(idx[:, :-1], idx[:, 1:])
    finally:
        for h in hooks:
            h.remove()

    def total(name):
        return sum(n for w, n in seen.values() if w == name)

    return {
        "around": total("around"),
        "blocks": [total(i) for i in range(len(blocks))],
        "inputs": inputs,
        "log_probs": total("log_probs"),
    }


def measured_activations(model, bf16, width, masks_as_cuda):
    model.activation_checkpointing = False
    plain = count_saved(model, bf16, width, masks_as_cuda)
    model.activation_checkpointing = True
    checkpointed = count_saved(model, bf16, width, masks_as_cuda)
    # inside the blocks checkpoint's hooks came first; around them it saved each block's input
    assert checkpointed["blocks"] == [0] * len(plain["blocks"])
    assert checkpointed["around"] == plain["around"] + sum(plain["inputs"])
    assert checkpointed["log_probs"] == plain["log_probs"]
    recompute = max(b - i for b, i in zip(plain["blocks"], plain["inputs"], strict=True))
    return {
        False: plain["around"] + sum(plain["blocks"]),
        True: checkpointed["around"] + recompute,
        "log_probs": plain["log_probs"],
    }


def gpt(dropout):
    cfg = GPT.GPTConfig(
        vocab_size=128, block_size=T, n_layer=3, n_head=4, n_embd=128, dropout=dropout
    )
    torch.manual_seed(0)
    model = GPT.GPT(cfg)
    for block in model.blocks:
        block.attn.dropout = 0.0  # see the module docstring: CUDA's attention keeps no mask
    return model, cfg.n_layer, cfg.n_embd


def llama():
    cfg = LLAMA.LlamaConfig(
        vocab_size=128, max_seq_len=T, n_layers=3, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=352
    )
    torch.manual_seed(0)
    return LLAMA.Llama(cfg), cfg.n_layers, cfg.dim


CASES = {
    "gpt": (GPT, lambda: gpt(0.0)),
    "gpt-dropout": (GPT, lambda: gpt(0.1)),
    "llama": (LLAMA, llama),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_activation_estimate_is_within_10_percent_of_the_saved_tensors(name, dtype):
    module, build = CASES[name]
    model, n_layers, width = build()
    model.train()
    n_params = module.num_params(model)
    measured = measured_activations(model, dtype == "bf16", width, masks_as_cuda=True)
    for checkpointing in (False, True):
        est = module.memory_estimate(model.cfg, n_params, B, T, dtype, checkpointing)
        got = measured[checkpointing]
        per = B * T * width * n_layers  # bytes per token per unit of width per layer
        assert abs(est["activations"] - got) <= TOLERANCE * got, (
            f"{name} {dtype} checkpointing={checkpointing}: estimate {est['activations']:,} "
            f"bytes ({est['activations'] / per:.1f} per token/width/layer), autograd saved "
            f"{got:,} ({got / per:.1f})"
        )
    # the one vocabulary-sized tensor autograd saves: cross_entropy's fp32 log-probabilities,
    # part of the estimate's "logits + loss"
    assert measured["log_probs"] == B * T * model.cfg.vocab_size * 4


def test_grouped_query_attention_saves_keys_and_values_once():
    """2 KV heads for 4 query heads: repeating k and v to 4 heads before attention would save
    the repeated copies; enable_gqa saves k and v as they are."""
    model, n_layers, width = llama()
    cfg = model.cfg
    head_dim = width // cfg.n_heads
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(B, T, dtype=torch.long))
    # per layer: attention keeps q and its output at all heads, k and v at the KV heads
    assert shapes.count((B, cfg.n_heads, T, head_dim)) == 2 * n_layers
    assert shapes.count((B, cfg.n_kv_heads, T, head_dim)) == 2 * n_layers


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_fp16_is_counted_as_the_two_bytes_it_is_like_bf16(name):
    """--dtype fp16 autocasts to 2-byte halves as bf16 does: the same memory, not fp32's."""
    module, build = CASES[name]
    model, _, _ = build()
    n_params = module.num_params(model)
    for checkpointing in (False, True):
        fp16, bf16, fp32 = (
            module.memory_estimate(model.cfg, n_params, B, T, dtype, checkpointing)
            for dtype in ("fp16", "bf16", "fp32")
        )
        assert fp16 == bf16 != fp32
