"""A GPT-2-style decoder-only transformer, written out in one file.

Token + learned position embeddings, pre-LayerNorm blocks (attention then MLP, each added back to
a residual stream), causal self-attention through F.scaled_dot_product_attention (flash kernels on
CUDA), GELU MLP, dropout, optional weight tying between the token embedding and the output head.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHECKPOINT_FORMAT = "ddp-tutorial 05_gpt_ddp v1"  # tells our checkpoints from other .pt files


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # context length in tokens
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them)
    tie_weights: bool = True  # output head shares the token embedding matrix


# Plain values, like nanoGPT configs. vocab_size is the GPT-2 tokenizer's; train.py replaces it
# with the vocabulary of the prepared data (rounded up to a multiple of 64 for faster matmuls).
PRESETS = {
    # trains in seconds on a laptop CPU; used by the tests
    "tiny": dict(
        vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.1, bias=True
    ),
    # a small model that still learns real structure on a CPU in minutes
    "small": dict(
        vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=256, dropout=0.1, bias=True
    ),
    # the original GPT-2 small: 124.4M parameters with its 50,257-token vocabulary
    "gpt2-124m": dict(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0
    ),
    # 1.42B parameters: wide, untied output head, no biases
    "gpt-1.4b": dict(
        vocab_size=50304,
        block_size=1024,
        n_layer=24,
        n_head=16,
        n_embd=2048,
        dropout=0.1,
        bias=False,
        tie_weights=False,
    ),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head size): every head attends independently
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # is_causal masks out the future; the fused kernel never materialises the T x T matrix
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.down = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        # pre-LayerNorm: normalise the input of each sub-layer, keep the residual path untouched
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # True: keep only each block's input during forward and recompute the rest in backward
        self.activation_checkpointing = False
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the layers that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(
                f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        # cross-entropy in fp32 even under bf16 autocast (autocast upcasts it)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T); context cropped to block_size."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.block_size :])
            logits = logits[:, -1, :].float()
            if temperature == 0:  # greedy
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def config_for(preset, **overrides):
    if preset not in PRESETS:
        raise KeyError(preset)
    return GPTConfig(**{**PRESETS[preset], **overrides})


def num_params(model):
    """All parameters, counting a tied matrix once."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg, seq_len):
    """Training FLOPs per token (forward + backward), as in the PaLM paper, appendix B.

    6 per parameter that takes part in a matmul (2 forward, 4 backward), plus the attention scores
    and their weighted sum: 12 * n_layer * n_embd * seq_len. Embedding lookups are not matmuls, so
    the position table and an untied token table are left out; a tied table is the output head.
    """
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    per_layer = 12 * d * d  # qkv (3 d^2) + attention output (d^2) + MLP (8 d^2); biases negligible
    matmul_params = L * per_layer + V * d  # blocks + output head
    return 6 * matmul_params + 12 * L * d * seq_len


def memory_estimate(cfg, n_params, batch_size, seq_len, dtype, activation_checkpointing):
    """GPU memory per rank in bytes at the peak of a training step (the start of backward).

    Activations are the tensors autograd saves for backward, term by term below. The test
    tests/test_memory_estimates.py counts them with torch.autograd.graph.saved_tensors_hooks
    (fp32 and bf16, with and without checkpointing): this is within 1 % of them. Where CPU and
    CUDA differ, this is CUDA: a dropout mask is 1 byte per element there (the input's dtype on
    a CPU), and the fused attention kernels keep neither a mask nor the T x T matrix. Not counted:
    LayerNorm statistics and attention log-sum-exps (< 1 %), the CUDA context and the
    allocator's slack (report.py adds those before it says "fits").
    """
    d, V = cfg.n_embd, cfg.vocab_size
    a = 2 if dtype in ("bf16", "fp16") else 4  # bytes per element the matmuls read and write
    mask = 1 if cfg.dropout > 0 else 0  # bytes per element of a dropout mask on CUDA
    per_layer = d * (
        4 + 4  # the inputs of ln1 and ln2: the residual stream, fp32 even under autocast
        + a + a  # the LayerNorm outputs as qkv and up read them (autocast's bf16 casts)
        + 3 * a  # q, k and v, kept by attention
        + a  # the attention output, which is also proj's input (one tensor)
        + 4 * a + 4 * a  # MLP: the input of GELU, and its output (the input of down)
        + 2 * mask  # the two residual dropouts
    )  # fmt: skip
    around = d * (mask + 4 + a)  # embedding dropout; ln_f's input and the head's input
    if activation_checkpointing:
        # every block keeps only its fp32 input; backward recomputes one block at a time, whose
        # other tensors then exist on top (counted with the logits, which are gone by then:
        # a small overestimate)
        activations = cfg.n_layer * 4 * d + (per_layer - 4 * d) + around
    else:
        activations = cfg.n_layer * per_layer + around
    matmul_weights = cfg.n_layer * 12 * d * d + V * d  # the weights autocast casts to bf16
    return {
        "parameters (fp32)": 4 * n_params,
        # one copy: each .grad is a view into DDP's buckets (gradient_as_bucket_view)
        "gradients (fp32)": 4 * n_params,
        "AdamW states (fp32 m, v)": 8 * n_params,
        # autocast casts each matmul weight once per forward and keeps it for backward
        "bf16 weight copies (autocast)": 2 * matmul_weights if a == 2 else 0,
        "activations": batch_size * seq_len * activations,
        # the logits (train.py holds them through backward), the fp32 log-probabilities that
        # cross_entropy saves, and the two fp32 gradients backward begins with
        "logits + loss": batch_size * seq_len * V * (a + 4 + 4 + 4),
    }
