"""Step 06 model: RoPE, grouped-query attention, causality and preset sizes of the Llama in
06_llama_ddp/model.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import load_script

M = load_script("06_llama_ddp/model.py", "llama_model")


def small_config(**overrides):
    return M.config_for("tiny", **overrides)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim, T = 16, 40
    cos, sin = M.rope_tables(head_dim, T, theta=10000.0)
    # the same query vector and the same key vector placed at every position
    q = torch.randn(head_dim).expand(1, 1, T, head_dim)
    k = torch.randn(head_dim).expand(1, 1, T, head_dim)
    scores = (M.apply_rope(q, cos, sin) @ M.apply_rope(k, cos, sin).transpose(-1, -2))[0, 0]
    for m, n, shift in [(3, 1, 5), (10, 10, 17), (0, 7, 30), (20, 2, 9)]:
        torch.testing.assert_close(scores[m + shift, n + shift], scores[m, n], atol=1e-4, rtol=1e-4)
    # ...and RoPE really encodes position: the score changes with the distance
    assert (scores[20, :20] - scores[20, 20]).abs().max() > 0.1
    # a rotation keeps the length of every vector
    torch.testing.assert_close(M.apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def reference_attention(attn, x, cos, sin):
    """Plain multi-head attention written out: softmax(q k^T / sqrt(d) + causal mask) v."""
    B, T, _ = x.shape
    n_heads, hd = attn.n_heads, attn.head_dim
    q = M.apply_rope(attn.wq(x).view(B, T, n_heads, hd).transpose(1, 2), cos, sin)
    k = M.apply_rope(attn.wk(x).view(B, T, n_heads, hd).transpose(1, 2), cos, sin)
    v = attn.wv(x).view(B, T, n_heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    y = F.softmax(scores.masked_fill(future, -float("inf")), dim=-1) @ v
    return attn.wo(y.transpose(1, 2).reshape(B, T, -1))


def test_gqa_with_as_many_kv_heads_as_heads_is_multi_head_attention():
    torch.manual_seed(0)
    cfg = small_config(n_heads=4, n_kv_heads=4)
    attn = M.Attention(cfg)
    cos, sin = M.rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, 12, cfg.dim)
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin))


def test_gqa_equals_multi_head_attention_with_shared_key_value_heads():
    """2 KV heads for 4 query heads = MHA whose key/value heads are copies: 0,0,1,1."""
    torch.manual_seed(0)
    gqa = M.Attention(small_config(n_heads=4, n_kv_heads=2))
    cfg = small_config(n_heads=4, n_kv_heads=4)
    mha = M.Attention(cfg)
    hd = cfg.dim // cfg.n_heads
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            heads = getattr(gqa, name).weight.view(2, hd, cfg.dim)
            getattr(mha, name).weight.copy_(heads.repeat_interleave(2, dim=0).reshape(-1, cfg.dim))
    cos, sin = M.rope_tables(hd, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, 10, cfg.dim)
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin))
    assert gqa.wk.weight.numel() == mha.wk.weight.numel() // 2


def test_enable_gqa_equals_repeating_the_key_value_heads():
    """model.py lets the attention kernel share KV heads (enable_gqa=True) instead of repeating
    them: same outputs and same gradients as the repeat_interleave version it replaced."""
    torch.manual_seed(0)
    cfg = small_config(n_heads=4, n_kv_heads=2)
    attn = M.Attention(cfg)
    cos, sin = M.rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, 12, cfg.dim)

    def repeated(x):
        B, T, _ = x.shape
        q = attn.wq(x).view(B, T, 4, -1).transpose(1, 2)
        k = attn.wk(x).view(B, T, 2, -1).transpose(1, 2)
        v = attn.wv(x).view(B, T, 2, -1).transpose(1, 2)
        q, k = M.apply_rope(q, cos, sin), M.apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attn.wo(y.transpose(1, 2).reshape(B, T, -1))

    outputs, grads = [], []
    for forward in (attn, repeated):
        attn.zero_grad()
        out = forward(x, cos, sin) if forward is attn else forward(x)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([p.grad.clone() for p in attn.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_changing_a_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = M.Llama(small_config()).eval()
    idx = torch.randint(0, 256, (1, 32))
    t = 17
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % 256
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=0)
    assert not torch.allclose(after[:, t:], before[:, t:])


def test_preset_parameter_counts_on_the_meta_device():
    counts = {}
    for preset in M.PRESETS:
        with torch.device("meta"):  # shapes only, no memory
            counts[preset] = M.num_params(M.Llama(M.config_for(preset)))
    # TinyLlama-1.1B's published count is 1,100,048,384
    assert counts["tinyllama-1.1b"] == 1_100_048_384
    assert 10e6 < counts["small"] < 100e6
    assert counts["tiny"] < 1e6


def test_tied_embeddings_are_one_matrix_and_rope_tables_are_not_saved():
    tied = M.Llama(small_config(tie_embeddings=True))
    untied = M.Llama(small_config())
    assert tied.output.weight is tied.tok_embeddings.weight
    assert M.num_params(untied) - M.num_params(tied) == 256 * 64
    keys = untied.state_dict().keys()
    assert not any("rope" in key for key in keys)
    assert "rope_cos" in dict(untied.named_buffers())


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'llama-70b'; choose one of tiny, small"):
        M.config_for("llama-70b")


def test_flops_per_token_counts_every_matmul_weight_once():
    for preset in ("tinyllama-1.1b", "small"):
        cfg = M.config_for(preset)
        with torch.device("meta"):
            n = M.num_params(M.Llama(cfg))
        norms = (2 * cfg.n_layers + 1) * cfg.dim  # RMSNorm gains: not matmuls
        embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim  # a lookup
        assert M.flops_per_token(cfg, seq_len=0) == 6 * (n - norms - embedding)
        assert M.flops_per_token(cfg, 100) - M.flops_per_token(cfg, 0) == (
            12 * cfg.n_layers * cfg.dim * 100
        )


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = M.Llama(small_config())
    idx = torch.randint(0, 256, (2, 16))
    grads = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad()
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)
