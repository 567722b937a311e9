"""Unit tests of the model section of train_gpt.py (GPT, Block, CausalSelfAttention, MLP, Rotary).

Run: python -m pytest -q tests/test_model.py

Everything uses tiny CPU shapes (vocab 64-128, 2-5 layers, dim 32-64, 4 heads / 2 KV heads,
sequence 16-32) so the module runs in a few seconds on two cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import logits

VOCAB = 96
SEQ = 24
BATCH = 3

TINY = {
    "VOCAB_SIZE": str(VOCAB), "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "MLP_MULT": "2.0", "TRAIN_SEQ_LEN": "32", "EVAL_SEQ_LEN": "32", "QK_GAIN_INIT": "1.5",
    "LOGIT_SOFTCAP": "30.0", "TIED_EMBED_INIT_STD": "0.005",
    # The record-stack extras are off here, so these tests check the base math; the tests at the end
    # of this module switch them on one by one (and all together for causality).
    "XSA_LAST_N": "0", "SKIP_GATES_ENABLED": "0", "SMEAR_GATE_ENABLED": "0", "SPARSE_ATTN_GATE_ENABLED": "0",
    "NUM_LOOPS": "0", "PARALLEL_MODE": "off",
}


def make_hparams(**overrides: str) -> tg.Hyperparameters:
    env = dict(TINY)
    env.update({k: str(v) for k, v in overrides.items()})
    return tg.Hyperparameters.from_env(env)


def make_cfg(**overrides: str) -> tg.ModelConfig:
    return tg.ModelConfig.from_hparams(make_hparams(**overrides))


def build(seed: int = 0, **overrides: str) -> tg.GPT:
    torch.manual_seed(seed)
    return tg.GPT(make_cfg(**overrides))


def randomize_zero_inits(model: tg.GPT, seed: int = 1, std: float = 0.2) -> tg.GPT:
    """Give the zero-initialized output projections (and an untied head) random weights, so the
    blocks are no longer identities on the residual stream."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for w in (block.attn.proj.weight, block.mlp.proj.weight):
                w.copy_(torch.randn(w.shape, generator=g) * std)
        if model.lm_head is not None:
            model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * std)
        # a larger embedding so the logits are far from uniform
        model.tok_emb.weight.copy_(torch.randn(model.tok_emb.weight.shape, generator=g) * 0.5)
    return model


def batch(seed: int = 0, b: int = BATCH, t: int = SEQ, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (b, t), generator=g)
    y = torch.randint(0, vocab, (b, t), generator=g)
    return x, y


# ---------------------------------------------------------------- shapes and losses


def test_forward_shapes_and_reductions():
    model = randomize_zero_inits(build())
    x, y = batch()
    with torch.no_grad():
        z = logits(model, x)
        loss = model(x, y)
        per_tok = model(x, y, reduction="none")
    assert z.shape == (BATCH, SEQ, VOCAB)
    assert z.dtype == torch.float32
    assert loss.shape == ()
    assert per_tok.shape == (BATCH, SEQ)
    torch.testing.assert_close(per_tok.mean(), loss, rtol=1e-6, atol=1e-6)
    # and the per-token losses are the cross-entropy of the logits
    ref = F.cross_entropy(z.reshape(-1, VOCAB), y.reshape(-1), reduction="none").view(BATCH, SEQ)
    torch.testing.assert_close(per_tok, ref, rtol=1e-6, atol=1e-6)


def test_causality():
    model = randomize_zero_inits(build())
    model.eval()
    x, _ = batch(seed=3)
    t = 10
    x2 = x.clone()
    g = torch.Generator().manual_seed(7)
    x2[:, t + 1:] = (x[:, t + 1:] + torch.randint(1, VOCAB, x[:, t + 1:].shape, generator=g)) % VOCAB
    assert (x2[:, t + 1:] != x[:, t + 1:]).all()
    with torch.no_grad():
        z1, z2 = logits(model, x), logits(model, x2)
    torch.testing.assert_close(z1[:, : t + 1], z2[:, : t + 1], rtol=0.0, atol=1e-6)
    # non-vacuous: the logits where the input changed do change
    assert (z1[:, t + 1] - z2[:, t + 1]).abs().max() > 1e-2
    # and a later position (which sees the change only through attention) changes too
    assert (z1[:, -1] - z2[:, -1]).abs().max() > 1e-2


def test_causality_through_attention_only():
    """Change only token t+1: every later position must change (information flows forward through
    attention) while positions <= t stay put."""
    model = randomize_zero_inits(build(seed=5))
    x, _ = batch(seed=4)
    t = 7
    x2 = x.clone()
    x2[:, t + 1] = (x[:, t + 1] + 1) % VOCAB
    with torch.no_grad():
        z1, z2 = logits(model, x), logits(model, x2)
    torch.testing.assert_close(z1[:, : t + 1], z2[:, : t + 1], rtol=0.0, atol=1e-6)
    diff_after = (z1[:, t + 2:] - z2[:, t + 2:]).abs().amax(dim=(0, 2))
    assert (diff_after > 1e-4).all(), diff_after


def test_initial_loss_is_log_vocab_tied():
    # Tied head, std 0.005, dim 64: at init every block is the identity (zero proj), so the final
    # hidden state h is rms_norm(embedding of the input token) with ||h|| = sqrt(64) = 8. A logit
    # h . e_v is then ~N(0, (8 * 0.005)^2) = N(0, 0.04^2) for v != input token, and for the input
    # token itself h . e = sqrt(dim) * ||e|| ~ sqrt(dim) * sqrt(dim) * std = dim * std = 0.32. The loss is logsumexp(z) - z_target
    # = ln V + O(var/2 = 8e-4) + O(ln(1 + (e^0.32 - 1)/V) = 6e-3) - z_target, and z_target averages to
    # ~0 over 4*32 tokens (std 0.04/sqrt(128) = 4e-3). So |loss - ln V| < 0.03 holds with a wide margin.
    for vocab in (64, 128):
        model = build(seed=11, VOCAB_SIZE=str(vocab))
        x, y = batch(seed=2, b=4, t=32, vocab=vocab)
        with torch.no_grad():
            loss = model(x, y)
        assert abs(loss.item() - math.log(vocab)) < 0.03, (vocab, loss.item(), math.log(vocab))


def test_untied_head_zero_init_gives_exactly_log_vocab():
    model = build(TIE_EMBEDDINGS="0")
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight.shape == (VOCAB, 64)
    assert torch.count_nonzero(model.lm_head.weight) == 0
    x, y = batch()
    with torch.no_grad():
        z = logits(model, x)
        loss = model(x, y)
    assert torch.count_nonzero(z) == 0
    torch.testing.assert_close(loss, torch.tensor(math.log(VOCAB)), rtol=0.0, atol=1e-6)
    # the head is a separate parameter from the embedding
    names = dict(model.named_parameters())
    assert "lm_head.weight" in names
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()


def test_tied_head_uses_embedding():
    model = randomize_zero_inits(build())
    assert model.lm_head is None
    assert "lm_head.weight" not in dict(model.named_parameters())
    x, _ = batch()
    with torch.no_grad():
        h = model.hidden(x)
        z_ref = F.linear(h, model.tok_emb.weight)
        c = model.cfg.logit_softcap
        z_ref = c * torch.tanh(z_ref / c)
        torch.testing.assert_close(logits(model, x), z_ref, rtol=1e-6, atol=1e-6)
        # changing the embedding of a token not in the input changes only that logit column
        unused = sorted(set(range(VOCAB)) - set(x.unique().tolist()))[0]
        before = logits(model, x)
        model.tok_emb.weight[unused] += 1.0
        after = logits(model, x)
    changed = (before - after).abs().amax(dim=(0, 1)) > 0
    assert changed[unused]
    assert changed.sum() == 1


# ---------------------------------------------------------------- softcap


def test_logit_softcap_bounds_logits():
    cap = 5.0
    model = build(TIE_EMBEDDINGS="0", LOGIT_SOFTCAP=str(cap))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 50.0)  # raw logits in the hundreds
    x, _ = batch()
    with torch.no_grad():
        z = logits(model, x)
        raw = F.linear(model.hidden(x), model.lm_head.weight)
    assert raw.abs().max() > 10 * cap  # the cap is really exercised
    assert z.abs().max() <= cap
    assert z.abs().max() > 0.99 * cap
    torch.testing.assert_close(z, cap * torch.tanh(raw / cap), rtol=1e-6, atol=1e-5)


def test_logit_softcap_zero_disables_it():
    model = build(TIE_EMBEDDINGS="0", LOGIT_SOFTCAP="0")
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 50.0)
    x, _ = batch()
    with torch.no_grad():
        z = logits(model, x)
        raw = F.linear(model.hidden(x), model.lm_head.weight)
    assert z.abs().max() > 100.0
    torch.testing.assert_close(z, raw, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- attention reference


def reference_attention(attn: tg.CausalSelfAttention, x: torch.Tensor, rope_base: float) -> torch.Tensor:
    """Plain softmax attention written from the math: per-head RMS-norm of q and k, RoPE that rotates
    the pair (x_i, x_{i+D/2}) by angle -pos * base^(-2i/D) (the script's sign convention: complex
    multiplication by e^{-i theta}; any fixed direction gives the same relative-position scores), a
    per-head query gain, K/V heads repeated for GQA (query head h reads KV head h // (H / H_kv)),
    causal mask and 1/sqrt(D) scaling, then the output projection."""
    B, T, C = x.shape
    H, Hkv = attn.num_heads, attn.num_kv_heads
    D = C // H
    q = (x @ attn.c_q.weight.T).view(B, T, H, D)
    k = (x @ attn.c_k.weight.T).view(B, T, Hkv, D)
    v = (x @ attn.c_v.weight.T).view(B, T, Hkv, D)
    eps = torch.finfo(torch.float32).eps

    def rms(u):
        return u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + eps)

    q, k = rms(q), rms(k)
    half = D // 2
    i = torch.arange(half, dtype=torch.float64)
    theta = rope_base ** (-2.0 * i / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta[None, :]  # (T, D/2)
    cos, sin = ang.cos().float()[None, :, None, :], ang.sin().float()[None, :, None, :]

    def rope(u):
        a, b = u[..., :half], u[..., half:]
        # (a + i b) * (cos - i sin) = (a cos + b sin) + i (b cos - a sin)
        return torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1)

    q, k = rope(q), rope(k)
    q = q * attn.q_gain[None, None, :, None]
    rep = H // Hkv
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    q, k, v = (u.permute(0, 2, 1, 3) for u in (q, k, v))  # (B, H, T, D)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ v  # (B, H, T, D)
    y = y.permute(0, 2, 1, 3).reshape(B, T, C)
    return y @ attn.proj.weight.T


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)])
def test_attention_matches_reference(heads, kv_heads):
    cfg = make_cfg(NUM_HEADS=str(heads), NUM_KV_HEADS=str(kv_heads), ROPE_BASE="10000")
    torch.manual_seed(0)
    attn = tg.CausalSelfAttention(cfg, 0)
    rotary = tg.Rotary(cfg.model_dim // cfg.num_heads, cfg.rope_base, cfg.rope_train_seq_len)
    with torch.no_grad():
        attn.proj.weight.normal_(0.0, 0.2)
        attn.q_gain.copy_(torch.linspace(0.5, 3.0, heads))  # distinct gain per head
    assert attn.c_k.weight.shape == (kv_heads * (64 // heads), 64)
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(1))
    cos, sin = rotary(20, x.device)
    with torch.no_grad():
        got = attn(x, cos, sin)
        ref = reference_attention(attn, x, cfg.rope_base)
    assert got.shape == (2, 20, 64)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_gqa_kv_head_mapping_matters():
    """Sanity check on the reference: a wrong GQA mapping (repeat instead of repeat_interleave)
    would give a different result, so the reference test pins the mapping."""
    cfg = make_cfg(NUM_HEADS="4", NUM_KV_HEADS="2")
    torch.manual_seed(0)
    attn = tg.CausalSelfAttention(cfg, 0)
    with torch.no_grad():
        attn.proj.weight.normal_(0.0, 0.2)
    rotary = tg.Rotary(16, cfg.rope_base, cfg.rope_train_seq_len)
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(2))
    cos, sin = rotary(12, x.device)
    with torch.no_grad():
        got = attn(x, cos, sin)
        # swap the two KV heads' weights: output must change if both KV heads are used
        kv_dim = attn.c_k.weight.shape[0]
        for w in (attn.c_k.weight, attn.c_v.weight):
            w.copy_(torch.cat((w[kv_dim // 2:], w[: kv_dim // 2])))
        swapped = attn(x, cos, sin)
    assert (got - swapped).abs().max() > 1e-3


def test_rotary_tables():
    rot = tg.Rotary(16, 10000.0, 1 << 30)
    cos, sin = rot(8, torch.device("cpu"))
    assert cos.shape == sin.shape == (8, 8)
    inv = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ang = torch.arange(8, dtype=torch.float64)[:, None] * inv[None, :]
    torch.testing.assert_close(cos, ang.cos().float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, ang.sin().float(), rtol=1e-6, atol=1e-6)
    # RoPE is a rotation: it preserves the norm of each head vector
    x = torch.randn(2, 8, 3, 16)
    y = tg.apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated


# ---------------------------------------------------------------- U-Net skips


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5])
def test_skip_weight_count(layers):
    model = build(NUM_LAYERS=str(layers))
    enc = layers // 2
    assert model.skip_weights.shape == (min(enc, layers - enc), 64)
    layout = model.layouts[False]
    assert layout == list(range(layers)) and layout[: len(layout) // 2] == list(range(enc))
    assert torch.equal(model.skip_weights, torch.ones_like(model.skip_weights))
    x, y = batch(t=16)
    with torch.no_grad():
        assert torch.isfinite(model(x, y))


@pytest.mark.parametrize("layers", [3, 4])
def test_skip_weights_affect_output(layers):
    model = randomize_zero_inits(build(NUM_LAYERS=str(layers)))
    x, _ = batch()
    with torch.no_grad():
        z_ones = logits(model, x)
        model.skip_weights.zero_()
        z_zero = logits(model, x)
    assert (z_ones - z_zero).abs().max() > 1e-2


def test_skip_connection_wiring():
    """With 4 layers, decoder block i (i = 0, 1) adds skip_weights[i] * output of encoder block
    (1 - i): check it against an explicit re-implementation of the forward pass."""
    model = randomize_zero_inits(build(NUM_LAYERS="4"))
    with torch.no_grad():
        model.skip_weights.copy_(torch.randn(model.skip_weights.shape))
    x, _ = batch()
    with torch.no_grad():
        h0 = tg.rms_norm(model.tok_emb(x))
        cos, sin = model.rotary(x.size(1), x.device)
        e0 = model.blocks[0](h0, h0, cos, sin)
        e1 = model.blocks[1](e0, h0, cos, sin)
        d0 = model.blocks[2](e1 + model.skip_weights[0] * e1, h0, cos, sin)
        d1 = model.blocks[3](d0 + model.skip_weights[1] * e0, h0, cos, sin)
        torch.testing.assert_close(model.hidden(x), tg.rms_norm(d1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- initialization


def test_initialization():
    model = build(QK_GAIN_INIT="2.75", TIED_EMBED_INIT_STD="0.02", VOCAB_SIZE="128")
    for block in model.blocks:
        mix = block.resid_mix
        assert mix.shape == (2, 64)
        assert torch.equal(mix[0], torch.ones(64)) and torch.equal(mix[1], torch.zeros(64))
        assert torch.equal(block.attn.q_gain, torch.full((4,), 2.75))
        assert torch.count_nonzero(block.attn.proj.weight) == 0
        assert torch.count_nonzero(block.mlp.proj.weight) == 0
        assert torch.equal(block.attn_scale, torch.ones(64))
        assert torch.equal(block.mlp_scale, torch.ones(64))
        # the input matrices are not zero
        for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.fc.weight):
            assert w.std() > 0
    # 128*64 = 8192 samples: the sample std has relative standard error 1/sqrt(2N) ~ 0.8%; allow 5%.
    w = model.tok_emb.weight
    torch.testing.assert_close(w.std().item(), 0.02, rtol=0.05, atol=0.0)
    assert abs(w.mean().item()) < 0.02 * 5 / math.sqrt(w.numel())


def test_blocks_are_identity_at_init():
    """Zero-initialized output projections: each block maps x to x at init (resid_mix = (1, 0))."""
    model = build()
    x = torch.randn(2, 16, 64)
    cos, sin = model.rotary(16, x.device)
    with torch.no_grad():
        for block in model.blocks:
            torch.testing.assert_close(block(x, torch.randn_like(x), cos, sin), x, rtol=0.0, atol=0.0)


# ---------------------------------------------------------------- state and determinism


def test_state_dict_round_trip():
    model = randomize_zero_inits(build(seed=3, TIE_EMBEDDINGS="0"))
    with torch.no_grad():
        for block in model.blocks:
            block.resid_mix.add_(0.1)
            block.attn.q_gain.mul_(1.3)
        model.skip_weights.mul_(0.7)
    fresh = build(seed=99, TIE_EMBEDDINGS="0")
    result = fresh.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x, y = batch()
    with torch.no_grad():
        assert torch.equal(logits(fresh, x), logits(model, x))
        assert torch.equal(fresh(x, y), model(x, y))
    # rotary tables are recomputed, not stored
    assert not any("inv_freq" in k for k in model.state_dict())


def test_same_seed_same_weights():
    a, b = build(seed=123), build(seed=123)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = build(seed=124)
    assert not torch.equal(c.tok_emb.weight, a.tok_emb.weight)


@pytest.mark.parametrize("mult,dim", [(2.5, 64), (2.3, 64), (1.7, 32), (3.0, 32)])
def test_mlp_hidden_width(mult, dim):
    model = build(MODEL_DIM=str(dim), MLP_MULT=str(mult))
    hidden = int(dim * mult)
    for block in model.blocks:
        assert block.mlp.fc.weight.shape == (hidden, dim)
        assert block.mlp.proj.weight.shape == (dim, hidden)


@pytest.mark.parametrize("act,ref_act", [
    ("relu2", lambda h: torch.clamp(h, min=0) ** 2),
    ("leaky_relu2", lambda h: torch.where(h > 0, h, 0.5 * h) ** 2),
])
def test_mlp_activation_matches_its_formula(act, ref_act):
    cfg = make_cfg(MLP_MULT="2.5", MLP_ACT=act, LEAKY_SLOPE="0.5")
    torch.manual_seed(0)
    mlp = tg.MLP(cfg)
    with torch.no_grad():
        mlp.proj.weight.normal_(0.0, 0.1)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref = ref_act(x @ mlp.fc.weight.T) @ mlp.proj.weight.T
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bf16 autocast


def test_bf16_autocast_cpu_forward_backward():
    model = randomize_zero_inits(build(seed=4), std=0.05)
    with torch.no_grad():
        model.tok_emb.weight.normal_(0.0, 0.05)
    x, y = batch(seed=6)
    loss32 = model(x, y)
    loss32.backward()
    g32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with tg.compute_autocast(torch.device("cpu"), "bf16"):
        loss16 = model(x, y)
    assert loss16.dtype == torch.float32  # logits are cast back to fp32 before the loss
    loss16.backward()
    assert torch.isfinite(loss16)
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3); a few rounded matmuls give a loss
    # error well under 1% of ln(96) = 4.56.
    torch.testing.assert_close(loss16.detach(), loss32.detach(), rtol=1e-2, atol=0.0)
    for n, p in model.named_parameters():
        assert p.grad is not None and p.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all(), n
    # the embedding gradient points the same way as in fp32
    g = model.tok_emb.weight.grad.flatten()
    cos = F.cosine_similarity(g, g32["tok_emb.weight"].flatten(), dim=0)
    assert cos > 0.95, cos


def test_compute_autocast_modes():
    cpu = torch.device("cpu")
    assert tg.compute_autocast(cpu, "bf16").fast_dtype == torch.bfloat16
    with tg.compute_autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with tg.compute_autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with tg.compute_autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------- record-stack model options


def test_leaky_relu2_differs_from_relu2_on_negative_inputs():
    torch.manual_seed(0)
    leaky = tg.MLP(make_cfg(MLP_MULT="2.0", MLP_ACT="leaky_relu2"))
    relu = tg.MLP(make_cfg(MLP_MULT="2.0", MLP_ACT="relu2"))
    with torch.no_grad():
        leaky.proj.weight.normal_(0.0, 0.1)
        relu.load_state_dict(leaky.state_dict())
        x = torch.randn(3, 5, 64)
        assert not torch.allclose(relu(x), leaky(x)), "negative inputs must contribute with leaky_relu2"


def test_partial_rope_rotates_only_the_first_dims():
    rot = tg.Rotary(4, 10000.0, 1 << 30)
    cos, sin = rot(6, torch.device("cpu"))
    assert cos.shape == (6, 2)
    x = torch.randn(2, 6, 3, 16)
    y = tg.apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:]), "dims past ROPE_DIMS pass through unchanged"
    assert not torch.allclose(y[:, 1:, :, :4], x[:, 1:, :, :4])
    torch.testing.assert_close(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_dims_at_or_above_head_dim_means_all_and_odd_is_refused():
    full = build(ROPE_DIMS="0")
    assert full.rotary.rope_dims == 16
    assert build(ROPE_DIMS="64").rotary.rope_dims == 16
    assert build(ROPE_DIMS="8").rotary.rope_dims == 8
    for bad in ("3", "2"):
        with pytest.raises(tg.ConfigError, match="ROPE_DIMS"):
            make_hparams(ROPE_DIMS=bad)


def test_ntk_rope_base_scaling():
    assert tg.rope_base_for(2048, 10000.0, 16, 2048) == 10000.0
    assert tg.rope_base_for(1024, 10000.0, 16, 2048) == 10000.0
    scaled = tg.rope_base_for(4096, 10000.0, 16, 2048)
    assert scaled == pytest.approx(10000.0 * 2.0 ** (16 / 14))
    rot = tg.Rotary(16, 10000.0, 8)
    cos_long, _ = rot(16, torch.device("cpu"))
    # 16 positions with a training length of 8: the tables use the scaled base
    inv = (10000.0 * 2.0 ** (16 / 14)) ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(cos_long, (torch.arange(16, dtype=torch.float64)[:, None] * inv).cos().float(),
                               rtol=1e-5, atol=1e-5)


def test_ln_scale_scales_norm_outputs_by_layer():
    on, off = build(LN_SCALE="1"), build(LN_SCALE="0")
    assert [b.norm_scale for b in on.blocks] == pytest.approx([1 / math.sqrt(i + 1) for i in range(4)])
    assert all(b.norm_scale == 1.0 for b in off.blocks)
    randomize_zero_inits(on)
    off.load_state_dict(on.state_dict())
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(logits(on, ids), logits(off, ids))


def test_ortho_init_makes_input_matrices_orthogonal_and_keeps_output_projections_zero():
    model = build(ORTHO_INIT="1", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="4", MLP_MULT="2.0")
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            assert not p.any(), name
        elif name.endswith(tg.ORTHO_INIT_SUFFIXES):
            w = p.detach().double()
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
    plain = build(ORTHO_INIT="0", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="4", MLP_MULT="2.0")
    w = plain.blocks[0].attn.c_q.weight.detach().double()
    assert (w @ w.T - torch.eye(64, dtype=torch.float64)).abs().max() > 0.1


def full_stack_overrides() -> dict[str, str]:
    return dict(XSA_LAST_N="3", SKIP_GATES_ENABLED="1", SMEAR_GATE_ENABLED="1", SPARSE_ATTN_GATE_ENABLED="1",
                ROPE_DIMS="8", LN_SCALE="1", MLP_ACT="leaky_relu2", GATE_WINDOW="8")


def perturb_all(model: tg.GPT, seed: int = 3) -> tg.GPT:
    """Random values for every parameter that starts at an identity value (zero projections, gates,
    lambdas), so every feature really acts on the output."""
    randomize_zero_inits(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("smear", "skip_gates", "attn_gate_w")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_causality_with_every_feature_on():
    model = perturb_all(build(**full_stack_overrides()))
    torch.manual_seed(5)
    ids = torch.randint(2, VOCAB, (2, 24))
    ids[:, 9] = tg.BOS_ID  # a document boundary inside the window
    changed = ids.clone()
    changed[:, 14:] = torch.randint(2, VOCAB, (2, 10))
    with torch.no_grad():
        a, b = logits(model, ids), logits(model, changed)
    torch.testing.assert_close(a[:, :14], b[:, :14], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 14:], b[:, 14:]), "the changed positions must see the change"


@pytest.mark.slow
def test_record_model_parameter_count_matches_the_public_record():
    h = tg.Hyperparameters.from_env({})  # PRESET=record
    torch.manual_seed(0)
    n = sum(p.numel() for p in tg.GPT(tg.ModelConfig.from_hparams(h)).parameters())
    assert abs(n - 35_945_671) / 35_945_671 < 0.005, n


def test_xsa_layers_and_projection():
    for last_n, expected in (("0", []), ("2", [2, 3]), ("11", [0, 1, 2, 3])):
        model = build(XSA_LAST_N=last_n)
        assert [i for i, b in enumerate(model.blocks) if b.attn.use_xsa] == expected
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = tg.exclusive_self_attention(y, v)
    vn = F.normalize(v, dim=-1)
    for h in range(4):  # query head h shares KV head h // 2
        dot = (out[:, :, h] * vn[:, :, h // 2]).sum(-1)
        torch.testing.assert_close(dot, torch.zeros_like(dot), rtol=0, atol=1e-5)
        residual = y[:, :, h] - out[:, :, h]  # what was removed lies along v-hat
        torch.testing.assert_close(residual, (y[:, :, h] * vn[:, :, h // 2]).sum(-1, keepdim=True) * vn[:, :, h // 2])


def test_attention_output_gate_is_half_at_init_and_follows_its_weights():
    cfg_on, cfg_off = make_cfg(SPARSE_ATTN_GATE_ENABLED="1", GATE_WINDOW="8"), make_cfg()
    torch.manual_seed(0)
    on = tg.CausalSelfAttention(cfg_on, 0)
    off = tg.CausalSelfAttention(cfg_off, 0)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k != "attn_gate_w"})
    with torch.no_grad():
        on.proj.weight.normal_(0, 0.2)
        off.proj.weight.copy_(on.proj.weight)
    x = torch.randn(2, 6, 64)
    cos, sin = tg.Rotary(16, 10000.0, 1 << 30)(6, x.device)
    with torch.no_grad():
        torch.testing.assert_close(on(x, cos, sin), 0.5 * off(x, cos, sin), rtol=1e-5, atol=1e-6)
        on.attn_gate_w.fill_(10.0)  # strongly open gates: close to the ungated output
        assert not torch.allclose(on(x, cos, sin), 0.5 * off(x, cos, sin), atol=1e-4)


def test_skip_gates_lerp_between_stream_and_skip():
    model = perturb_all(build(SKIP_GATES_ENABLED="1"))
    plain = build()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "skip_gates"})
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        model.skip_gates.fill_(-30.0)  # sigmoid -> 0: x = w * skip ... differs from the additive skip
        assert not torch.allclose(logits(model, ids), logits(plain, ids))
        model.skip_gates.fill_(30.0)  # sigmoid -> 1: the skip is ignored entirely
        no_skip = build()
        no_skip.load_state_dict(plain.state_dict())
        no_skip.skip_weights.zero_()
        torch.testing.assert_close(logits(model, ids), logits(no_skip, ids), rtol=1e-5, atol=1e-5)


def test_smear_gate_is_identity_at_init_and_never_crosses_bos():
    cfg = make_cfg(SMEAR_GATE_ENABLED="1", GATE_WINDOW="8")
    smear = tg.SmearGate(cfg)
    x = torch.randn(2, 7, 64)
    ids = torch.randint(2, VOCAB, (2, 7))
    ids[:, 4] = tg.BOS_ID
    torch.testing.assert_close(smear(x, ids), x, rtol=0, atol=0)
    with torch.no_grad():
        smear.smear_lambda.fill_(0.7)
        smear.smear_w.normal_()
    y = smear(x, ids)
    x2 = x.clone()
    x2[:, 3] += 5.0  # the token just before the BOS changes
    y2 = smear(x2, ids)
    torch.testing.assert_close(y2[:, 4], y[:, 4], rtol=0, atol=0)  # the BOS position ignores it
    assert not torch.allclose(y2[:, 3], y[:, 3])
    x3 = x.clone()
    x3[:, 1] += 5.0  # a non-BOS position does see its predecessor
    assert not torch.allclose(smear(x3, ids)[:, 2], y[:, 2])


# ---------------------------------------------------------------- depth recurrence and parallel residuals


@pytest.mark.parametrize("args,layout,enc,dec", [
    ((11, 3, 5, 2), [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10],
     [0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10]),  # the record (17 virtual layers)
    ((11, 4, 5, 2), [0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10],
     [0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10]),  # PR #1394 (15 virtual)
    ((11, 4, 5, 1), [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10],
     [0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9, 10]),  # RECUR_LAYERS=4,5 (13 virtual)
    ((6, 2, 2, 0), [0, 1, 2, 3, 4, 5], [0, 1, 2], [3, 4, 5]),  # off
])
def test_layer_layouts(args, layout, enc, dec):
    got = tg.layer_layout(*args)
    assert got == layout and got[: len(got) // 2] == enc and got[len(got) // 2:] == dec


def test_looping_shares_parameters_and_keeps_the_count():
    model = perturb_all(build(NUM_LAYERS="6", NUM_LOOPS="2", LOOP_START="2", LOOP_END="3"))
    n_before = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        plain = logits(model, ids)
        model.set_looping(True)
        looped = logits(model, ids)
    assert sum(p.numel() for p in model.parameters()) == n_before
    assert model.layouts[True] == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert len(list(model.blocks)) == 6  # physical blocks only: the loop reuses the same modules
    assert model.skip_weights.shape[0] == 5  # sized for the looped layout (5 encoder / 5 decoder)
    assert not torch.allclose(plain, looped)
    model.set_looping(False)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), plain)
    assert not build(NUM_LOOPS="0").layouts[True] != list(range(4))


def test_looping_due_by_fraction_or_step():
    h = make_hparams(NUM_LAYERS="6", NUM_LOOPS="1", LOOP_START="2", LOOP_END="3", ENABLE_LOOPING_AT="0.35")
    assert not tg.looping_due(h, 100, 0.34) and tg.looping_due(h, 0, 0.35)
    h = make_hparams(NUM_LAYERS="6", NUM_LOOPS="1", LOOP_START="2", LOOP_END="3", LOOPING_START_STEP="3000")
    assert not tg.looping_due(h, 2999, 0.9) and tg.looping_due(h, 3000, 0.0)
    assert not tg.looping_due(make_hparams(NUM_LOOPS="0"), 10**6, 1.0)


def _lanes_pair() -> tuple[tg.GPT, tg.GPT]:
    """A two-lane model from layer 2 and the sequential model with the same shared weights."""
    par = perturb_all(build(NUM_LAYERS="4", PARALLEL_MODE="lanes", PARALLEL_START_LAYER="2"))
    seq = build(NUM_LAYERS="4", PARALLEL_MODE="off")
    seq.load_state_dict({k: v for k, v in par.state_dict().items() if k in seq.state_dict()})
    return par, seq


def test_lanes_are_sequential_with_unit_routing_a_silent_mlp_and_no_skips():
    par, seq = _lanes_pair()
    assert par.parallel_from[False] == 2 and par.blocks[1].lane_r is None and par.blocks[2].lane_r is not None
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert not torch.allclose(logits(par, ids), logits(seq, ids), atol=1e-4)
        for model in (par, seq):
            model.skip_weights.zero_()  # a skip goes into lane 0 only
            for block in model.blocks[2:]:
                block.mlp.proj.weight.zero_()  # the MLP reads lane 1, before attention wrote to it
        assert not torch.allclose(logits(par, ids), logits(seq, ids), atol=1e-4)  # r = 1.1 as PR #1855's
        for block in par.blocks[2:]:
            block.lane_r.fill_(1.0)  # with every p = 1 both lanes stay equal: x + attn(x)
        torch.testing.assert_close(logits(par, ids), logits(seq, ids), rtol=1e-5, atol=1e-5)


def test_two_lane_tail_never_starts_in_the_encoder():
    model = build(NUM_LAYERS="4", PARALLEL_MODE="lanes", PARALLEL_START_LAYER="0")
    assert model.parallel_from[False] == 2  # the decoder half
    assert build(NUM_LAYERS="4", PARALLEL_MODE="off", PARALLEL_START_LAYER="0").parallel_from[False] == 4
