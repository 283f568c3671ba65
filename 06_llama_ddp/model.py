"""A Llama-style decoder, written out in one file.

Compared with the GPT of step 05 four things change, each a few lines below:
  - RMSNorm instead of LayerNorm: rescale by the root-mean-square only, no mean, no bias;
  - rotary position embeddings (RoPE) instead of a learned position table: queries and keys are
    rotated by an angle proportional to their position, so q·k depends on the distance between
    the two tokens;
  - a SwiGLU MLP instead of GELU: silu(x W1) * (x W3), then W2;
  - grouped-query attention (GQA): n_kv_heads <= n_heads, groups of query heads share one
    key/value head, which shrinks the key/value projections (and the KV cache at inference).
No linear layer has a bias.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHECKPOINT_FORMAT = "ddp-tutorial 06_llama_ddp v1"  # tells our checkpoints from any other .pt file


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    max_seq_len: int = 2048  # context length; also the length of the RoPE tables
    n_layers: int = 22
    dim: int = 2048  # model width
    n_heads: int = 32
    n_kv_heads: int = 4  # key/value heads; n_heads must be a multiple of it
    ffn_dim: int = 5632  # hidden width of the SwiGLU MLP
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the input embedding with the output layer


PRESETS = {
    # Trains in seconds on a CPU; its vocabulary is bytes (see make_toy_data.py). Used by the tests.
    "tiny": dict(
        vocab_size=256, max_seq_len=64, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=176
    ),
    # ~40M parameters with a 32k (Llama-2) vocabulary: single-GPU experiments.
    "small": dict(
        vocab_size=32000,
        max_seq_len=1024,
        n_layers=8,
        dim=512,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=1408,
        tie_embeddings=True,
    ),
    # The shape of TinyLlama-1.1B: for parameter counts and memory estimates (1.10B parameters).
    "tinyllama-1.1b": dict(
        vocab_size=32000,
        max_seq_len=2048,
        n_layers=22,
        dim=2048,
        n_heads=32,
        n_kv_heads=4,
        ffn_dim=5632,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses precision in bf16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def rope_tables(head_dim, max_seq_len, theta):
    """cos and sin of the rotation angle of every (position, frequency): two (T, head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + head_dim/2]) of x (B, heads, T, head_dim) by its angle.

    Pairing the two halves (not neighbours, as Meta's code does) is the convention of Hugging Face's
    Llama; both give the same model, only the order of the weights differs.
    """
    T = x.shape[-2]
    cos, sin = cos[:T], sin[:T]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: query heads [g*r, (g+1)*r) all use key/value head g, with r = n_heads // n_kv_heads.
        # enable_gqa does that inside the kernel (torch >= 2.5). The same result as
        # k.repeat_interleave(r, dim=1) (and v), but those copies would be saved for backward:
        # r times the key/value memory.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: a SiLU-activated gate multiplies a second projection, then project back."""

    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # value
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # back to the model width

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # True: keep only each block's input during forward and recompute the rest in backward
        self.activation_checkpointing = False
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # The RoPE tables are buffers so that .to(device) moves them with the model. They are not
        # persistent (not in state_dict, hence not in checkpoints): they follow from the config.
        # DDP broadcasts buffers at each forward of the wrapped model, a collective every rank
        # must join: see train.py for where the wrapped and the unwrapped model are used.
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's trick: shrink the layers that write into the residual stream, one pair per block.
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {T} tokens is longer than max_seq_len {self.cfg.max_seq_len}"
            )
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = layer(x, self.rope_cos, self.rope_sin)
        logits = self.output(self.norm(x))
        if targets is None:
            return logits, None
        # cross-entropy in fp32 even under bf16 autocast (autocast upcasts it)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T); no KV cache, fine for samples."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.max_seq_len :])
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
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return LlamaConfig(**{**PRESETS[preset], **overrides})


def num_params(model):
    """All parameters, counting a tied matrix once."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg, seq_len):
    """Training FLOPs per token (forward + backward), as in the PaLM paper, appendix B.

    6 per parameter that takes part in a matmul (2 forward, 4 backward), plus the attention scores
    and their weighted sum: 12 * n_layers * dim * seq_len. The token embedding is a lookup, not a
    matmul, so it is left out unless it is tied to the output layer (which is counted).
    """
    d, kv_dim = cfg.dim, cfg.n_kv_heads * (cfg.dim // cfg.n_heads)
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * cfg.ffn_dim  # wq, wo; wk, wv; w1, w2, w3
    matmul_params = cfg.n_layers * per_layer + cfg.vocab_size * d  # blocks + output layer
    return 6 * matmul_params + 12 * cfg.n_layers * d * seq_len


def memory_estimate(cfg, n_params, batch_size, seq_len, dtype, activation_checkpointing):
    """GPU memory per rank in bytes at the peak of a training step (the start of backward).

    Activations are the tensors autograd saves for backward, term by term below. The test
    tests/test_memory_estimates.py counts them with torch.autograd.graph.saved_tensors_hooks
    (fp32 and bf16, with and without checkpointing): this is within 1 % of them. Not counted:
    RMSNorm statistics and attention log-sum-exps (< 1 %), the CUDA context and the
    allocator's slack (report.py adds those before it says "fits").
    """
    d, f, V = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    kv = cfg.n_kv_heads * (cfg.dim // cfg.n_heads)  # width of k and v
    half = dtype in ("bf16", "fp16")
    a = 2 if half else 4  # bytes per element of what the matmuls read and write
    per_layer = (
        2 * 8 * d  # each RMSNorm keeps its fp32 input and the normalised x (before the gain)
        # the norm outputs as the matmuls read them: under autocast wq, wk, wv, w1 and w3 each
        # make their own bf16 cast; in fp32 they share one tensor per norm
        + (5 * 2 * d if half else 2 * 4 * d)
        + a * (d + 2 * kv)  # q, k and v after RoPE, kept by attention (k, v not repeated)
        + 2 * a * d  # the attention output, and its (B, T, dim) copy that wo reads
        + 4 * a * f  # SwiGLU: w1's and w3's outputs, silu's output, their product (w2's input)
    )
    around = 8 * d + a * d  # the final RMSNorm's two tensors, and the output layer's input
    if activation_checkpointing:
        # every block keeps only its fp32 input; backward recomputes one block at a time, whose
        # other tensors then exist on top (counted with the logits, which are gone by then:
        # a small overestimate)
        activations = cfg.n_layers * 4 * d + (per_layer - 4 * d) + around
    else:
        activations = cfg.n_layers * per_layer + around
    matmul_weights = cfg.n_layers * (2 * d * d + 2 * d * kv + 3 * d * f) + V * d
    return {
        "parameters (fp32)": 4 * n_params,
        # one copy: each .grad is a view into DDP's buckets (gradient_as_bucket_view)
        "gradients (fp32)": 4 * n_params,
        "AdamW states (fp32 m, v)": 8 * n_params,
        # autocast casts each matmul weight once per forward and keeps it for backward
        "bf16 weight copies (autocast)": 2 * matmul_weights if half else 0,
        "activations": batch_size * seq_len * activations,
        # the logits (train.py holds them through backward), the fp32 log-probabilities that
        # cross_entropy saves, and the two fp32 gradients backward begins with
        "logits + loss": batch_size * seq_len * V * (a + 4 + 4 + 4),
    }
