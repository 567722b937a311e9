"""Unit tests of the optimizer and schedule section of train_gpt.py (PARAM_GROUPS, classify_param,
newton_schulz, Muon, Optimizers, lr_scale, muon_momentum_at, training_progress, sync_gradients, EMA)
and of a few deterministic CPU training steps.

Run: python -m pytest -q tests/test_optim.py
"""

from __future__ import annotations

import math

import pytest
import torch

import train_gpt as tg
from reference_muon import ReferenceMuon, momentum_buffer

FP32_NS = tg.NewtonSchulz(5, dtype="fp32")

VOCAB = 64

TINY = {
    "NUM_LOOPS": "0",  # the record's looped span (layers 3..5) does not fit 3 layers
    "MUON_NS_DTYPE": "fp32",  # exact comparisons with fp32 references (auto is bf16 on AMX CPUs)
    "VOCAB_SIZE": str(VOCAB), "NUM_LAYERS": "3", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "MLP_MULT": "2.0", "TRAIN_SEQ_LEN": "16", "EVAL_SEQ_LEN": "16", "QK_GAIN_INIT": "1.5",
    # distinct values for every optimizer knob, so a mixed-up mapping is caught
    "MATRIX_LR": "0.031", "SCALAR_LR": "0.017", "TIED_EMBED_LR": "0.043", "HEAD_LR": "0.0071",
    "MUON_WD": "0.11", "EMBED_WD": "0.07", "ADAM_WD": "0.023",
    "MUON_MOMENTUM": "0.95", "MUON_MOMENTUM_WARMUP_START": "0.85", "MUON_MOMENTUM_WARMUP_STEPS": "100",
    "BETA1": "0.8", "BETA2": "0.97", "ADAM_EPS": "1e-7",
}


def make_hparams(**overrides) -> tg.Hyperparameters:
    env = dict(TINY)
    env.update({k: str(v) for k, v in overrides.items()})
    return tg.Hyperparameters.from_env(env)


def build(h: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    torch.manual_seed(seed)
    return tg.GPT(tg.ModelConfig.from_hparams(h))


def fill_grads(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


MATRIX_NAMES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                "mlp.fc.weight", "mlp.proj.weight")


# ---------------------------------------------------------------- grouping


@pytest.mark.parametrize("tie", ["1", "0"])
def test_every_parameter_in_exactly_one_group(tie):
    h = make_hparams(TIE_EMBEDDINGS=tie)
    model = build(h)
    opt = tg.Optimizers(model, h)
    named = dict(model.named_parameters())
    table_names = [name for name, _, _ in opt.table]
    assert sorted(table_names) == sorted(named)
    assert len(set(table_names)) == len(table_names)
    groups = {name: g for name, g, _ in opt.table}
    for name, _, n in opt.table:
        assert n == named[name].numel()

    expected_matrix = {f"blocks.{i}.{m}" for i in range(h.num_layers) for m in MATRIX_NAMES}
    assert {n for n, g in groups.items() if g == "matrix"} == expected_matrix
    assert groups["tok_emb.weight"] == "embed"
    if tie == "0":
        assert groups["lm_head.weight"] == "head"
    else:
        assert "head" not in groups.values()
    scalars = {n for n, g in groups.items() if g == "scalar"}
    expected_scalar = {"skip_weights", "skip_gates", "smear.smear_w", "smear.smear_lambda"} | {
        f"blocks.{i}.{s}" for i in range(h.num_layers)
        for s in ("resid_mix", "attn_scale", "mlp_scale", "attn.q_gain", "attn.attn_gate_w")}
    assert scalars == expected_scalar

    # Muon holds exactly the 2-D block matrices, by identity
    muon_ids = [id(p) for g in opt.muon.param_groups for p in g["params"]]
    assert sorted(muon_ids) == sorted(id(named[n]) for n in expected_matrix)
    assert all(p.ndim == 2 for g in opt.muon.param_groups for p in g["params"])
    # Muon + AdamW partition model.parameters() with no duplicates
    adam_ids = [id(p) for g in opt.adam.param_groups for p in g["params"]]
    all_ids = muon_ids + adam_ids
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in model.parameters()}
    assert len(all_ids) == len(list(model.parameters()))
    # AdamW groups agree with the table
    for g in opt.adam.param_groups:
        assert {id(p) for p in g["params"]} == {id(named[n]) for n, gg in groups.items() if gg == g["name"]}

    counts = opt.group_counts()
    assert set(counts) == set(tg.PARAM_GROUPS)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["embed"] == VOCAB * 32
    assert counts["head"] == (0 if tie == "1" else VOCAB * 32)
    assert counts["matrix"] == sum(named[n].numel() for n in expected_matrix)


def test_classify_param():
    assert tg.classify_param("tok_emb.weight") == "embed"
    assert tg.classify_param("lm_head.weight") == "head"
    for m in MATRIX_NAMES:
        assert tg.classify_param(f"blocks.7.{m}") == "matrix"
    for s in ("skip_weights", "blocks.0.resid_mix", "blocks.0.attn_scale", "blocks.0.mlp_scale",
              "blocks.0.attn.q_gain"):
        assert tg.classify_param(s) == "scalar"
    assert set(tg.PARAM_GROUPS) == {"matrix", "embed", "head", "scalar"}


@pytest.mark.parametrize("tie", ["1", "0"])
def test_group_lrs_and_weight_decays_match_knobs(tie):
    h = make_hparams(TIE_EMBEDDINGS=tie)
    opt = tg.Optimizers(build(h), h)
    assert len(opt.muon.param_groups) == 1
    mg = opt.muon.param_groups[0]
    assert mg["lr"] == h.matrix_lr == 0.031
    assert mg["weight_decay"] == h.muon_wd == 0.11
    assert mg["momentum"] == h.muon_momentum
    assert mg["backend_steps"] == h.muon_backend_steps
    expected = {"embed": (0.043, 0.07), "scalar": (0.017, 0.023)}
    if tie == "0":
        expected["head"] = (0.0071, 0.07)
    got = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.adam.param_groups}
    assert got == expected
    assert opt.adam.defaults["betas"] == (0.8, 0.97)
    assert opt.adam.defaults["eps"] == 1e-7


def test_set_schedule():
    h = make_hparams(TIE_EMBEDDINGS="0")
    opt = tg.Optimizers(build(h), h)
    base = {"matrix": 0.031, "embed": 0.043, "head": 0.0071, "scalar": 0.017}
    for scale, step, mom in [(0.5, 0, 0.85), (0.25, 50, 0.90), (1.0, 100, 0.95), (0.1, 1000, 0.95), (0.0, 25, 0.875)]:
        opt.set_schedule(scale, step)
        mg = opt.muon.param_groups[0]
        assert mg["lr"] == pytest.approx(base["matrix"] * scale, rel=1e-12, abs=0)
        assert mg["momentum"] == pytest.approx(mom, rel=1e-12)
        for g in opt.adam.param_groups:
            assert g["lr"] == pytest.approx(base[g["name"]] * scale, rel=1e-12, abs=0)
    # set_schedule never compounds: the LR is relative to the base, not to the previous LR
    opt.set_schedule(0.5, 0)
    opt.set_schedule(0.5, 0)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.031 * 0.5)


# ---------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_orthogonalizes(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X = tg.newton_schulz(G, 5, torch.float32)
    assert X.shape == G.shape
    assert X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    # NS5 quintic with the (3.4445, -4.7750, 2.0315) set drives singular values into ~[0.68, 1.2],
    # not exactly 1.
    assert s.min() > 0.5 and s.max() < 1.5, s
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    cos = torch.nn.functional.cosine_similarity(X.flatten(), polar.flatten(), dim=0)
    assert cos > 0.9, cos


def test_newton_schulz_scale_invariant_and_transpose_equivariant():
    G = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    X = tg.newton_schulz(G, 5, torch.float32)
    torch.testing.assert_close(tg.newton_schulz(G * 1000.0, 5, torch.float32), X, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tg.newton_schulz(G.T, 5, torch.float32), X.T, rtol=1e-5, atol=1e-6)
    # zero gradient -> zero update, no NaN
    Z = tg.newton_schulz(torch.zeros(8, 4), 5, torch.float32)
    assert torch.equal(Z, torch.zeros(8, 4))


def test_newton_schulz_manual_iteration():
    G = torch.randn(16, 24, generator=torch.Generator().manual_seed(2))
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)
    for _ in range(3):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(tg.newton_schulz(G, 3, torch.float32), X, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Muon


@pytest.mark.parametrize("impl", [tg.Muon, ReferenceMuon], ids=["batched", "reference"])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_muon_step_matches_formula(shape, impl):
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(shape, generator=gen)
    g1, g2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    lr, mu, wd, steps = 0.05, 0.9, 0.1, 5
    p = torch.nn.Parameter(p0.clone())
    opt = impl([p], lr=lr, momentum=mu, weight_decay=wd, ns=tg.NewtonSchulz(steps, dtype="fp32"))
    scale = math.sqrt(max(1.0, shape[0] / shape[1]))

    p.grad = g1.clone()
    opt.step()
    buf = g1.clone()
    X = tg.newton_schulz(g1 + mu * buf, steps, torch.float32)
    expected = p0 * (1 - lr * wd) - lr * scale * X
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(momentum_buffer(opt, p), buf, rtol=0, atol=0)

    p.grad = g2.clone()
    opt.step()
    buf = mu * buf + g2
    X = tg.newton_schulz(g2 + mu * buf, steps, torch.float32)
    expected = expected * (1 - lr * wd) - lr * scale * X
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(momentum_buffer(opt, p), buf, rtol=1e-6, atol=1e-6)


def test_muon_several_params_in_one_group():
    """The flat buffer packing must put every matrix's update back on that matrix."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(8, 4), (4, 8), (6, 6)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    singles = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    opt = tg.Muon(ps, lr=0.02, momentum=0.95, weight_decay=0.05, ns=FP32_NS)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    for s, g in zip(singles, grads):
        o = tg.Muon([s], lr=0.02, momentum=0.95, weight_decay=0.05, ns=FP32_NS)
        s.grad = g.clone()
        o.step()
    for p, s in zip(ps, singles):
        torch.testing.assert_close(p.detach(), s.detach(), rtol=0, atol=0)


def test_muon_converges_on_quadratic():
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(32, 16, generator=gen) / math.sqrt(32)
    W = torch.nn.Parameter(torch.zeros(32, 16))
    opt = tg.Muon([W], lr=0.02, momentum=0.9, weight_decay=0.0, ns=FP32_NS)

    def loss_fn():
        return (W - target).pow(2).sum()

    initial = loss_fn().item()
    for _ in range(100):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
    final = loss_fn().item()
    assert final < 0.05 * initial, (initial, final)


# ---------------------------------------------------------------- AdamW parity


@pytest.mark.parametrize("group", ["scalar", "embed", "head"])
@pytest.mark.slow
def test_adamw_groups_match_torch_adamw(group):
    h = make_hparams(TIE_EMBEDDINGS="0", GRAD_CLIP_NORM="0")  # Optimizers.step clips; torch's AdamW does not
    model = build(h)
    opt = tg.Optimizers(model, h)
    lr, wd = {"scalar": (h.scalar_lr, h.adam_wd), "embed": (h.tied_embed_lr, h.embed_wd),
              "head": (h.head_lr, h.embed_wd)}[group]
    names = [n for n, g, _ in opt.table if g == group]
    named = dict(model.named_parameters())
    refs = {n: torch.nn.Parameter(named[n].detach().clone()) for n in names}
    # the head starts at zero: give every parameter a non-trivial starting value so decay is visible
    with torch.no_grad():
        for n in names:
            named[n].add_(0.3)
            refs[n].add_(0.3)
    ref_opt = torch.optim.AdamW(list(refs.values()), lr=lr, betas=(h.beta1, h.beta2), eps=h.adam_eps,
                                weight_decay=wd)
    for step in range(3):
        fill_grads(model, seed=10 + step)
        for n in names:
            refs[n].grad = named[n].grad.clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    for n in names:
        torch.testing.assert_close(named[n].detach(), refs[n].detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(named[n].detach(), named[n].detach() * 0)


# ---------------------------------------------------------------- schedules


def test_lr_scale_shape():
    # before the warmdown: 1
    for f in (0.0, 0.1, 0.24, 0.2499):
        assert tg.lr_scale(f, 0.75, 0.1) == 1.0
    # linear during the warmdown: (1 - frac) / warmdown_frac
    for f in (0.4, 0.5, 0.6, 0.8):
        assert tg.lr_scale(f, 0.75, 0.0) == pytest.approx((1 - f) / 0.75, rel=1e-12)
    assert tg.lr_scale(0.5, 0.5, 0.0) == pytest.approx(1.0)
    assert tg.lr_scale(0.75, 0.5, 0.0) == pytest.approx(0.5)
    # the MIN_LR floor near and at the end
    assert tg.lr_scale(0.99, 0.75, 0.1) == pytest.approx(0.1)
    assert tg.lr_scale(1.0, 0.75, 0.1) == pytest.approx(0.1)
    assert tg.lr_scale(1.0, 0.75, 0.0) == 0.0
    # floor only binds when the linear value is below it
    assert tg.lr_scale(0.5, 0.75, 0.1) == pytest.approx(0.5 / 0.75)
    # warmdown_frac = 0: always 1
    for f in (0.0, 0.5, 0.999, 1.0):
        assert tg.lr_scale(f, 0.0, 0.1) == 1.0
    # warmdown_frac = 1: decays from the very start
    assert tg.lr_scale(0.0, 1.0, 0.0) == 1.0
    assert tg.lr_scale(0.01, 1.0, 0.0) == pytest.approx(0.99)
    assert tg.lr_scale(0.5, 1.0, 0.0) == pytest.approx(0.5)


@pytest.mark.parametrize("warmdown", [0.0, 0.087, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("min_lr", [0.0, 0.1])
def test_lr_scale_monotone_and_bounded(warmdown, min_lr):
    """Over a grid of training fractions the multiplier never increases and stays in [MIN_LR, 1].
    The grid contains the warmdown start 1 - WARMDOWN_FRAC exactly (e.g. 0.7 for 0.3)."""
    fracs = [i / 1000 for i in range(1001)]
    values = [tg.lr_scale(f, warmdown, min_lr) for f in fracs]
    for f, v in zip(fracs, values):
        assert min_lr <= v <= 1.0, (f, v)
    for (f0, v0), (f1, v1) in zip(zip(fracs, values), zip(fracs[1:], values[1:])):
        assert v1 <= v0, (f0, v0, f1, v1)


def test_muon_momentum_at():
    assert tg.muon_momentum_at(0, 0.85, 0.95, 100) == 0.85
    assert tg.muon_momentum_at(100, 0.85, 0.95, 100) == pytest.approx(0.95, rel=1e-12)
    assert tg.muon_momentum_at(5000, 0.85, 0.95, 100) == pytest.approx(0.95, rel=1e-12)
    assert tg.muon_momentum_at(50, 0.85, 0.95, 100) == pytest.approx(0.90, rel=1e-12)
    assert tg.muon_momentum_at(25, 0.85, 0.95, 100) == pytest.approx(0.875, rel=1e-12)
    for s in (0, 1, 10, 1000):
        assert tg.muon_momentum_at(s, 0.85, 0.95, 0) == 0.95
    vals = [tg.muon_momentum_at(s, 0.85, 0.95, 100) for s in range(0, 150)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_training_progress():
    assert tg.training_progress(0, 0.0, 100, 600.0) == 0.0
    assert tg.training_progress(25, 10.0, 100, 600.0) == pytest.approx(0.25)  # steps dominate
    assert tg.training_progress(10, 300.0, 100, 600.0) == pytest.approx(0.5)  # time dominates
    assert tg.training_progress(10, 300.0, 100, 0.0) == pytest.approx(0.1)  # no cap: steps only
    assert tg.training_progress(10, 1e9, 100, 0.0) == pytest.approx(0.1)
    assert tg.training_progress(200, 0.0, 100, 600.0) == 1.0  # clipped
    assert tg.training_progress(10, 1200.0, 100, 600.0) == 1.0
    assert tg.training_progress(100, 600.0, 100, 600.0) == 1.0


# ---------------------------------------------------------------- EMA and gradient sync


def test_ema_update_matches_manual_loop():
    """Bias-corrected EMA: shadow_t = d*shadow + (1-d)*w from zero; applied = shadow_t / (1 - d**t)."""
    h = make_hparams()
    model = build(h)
    d = 0.9
    ema = tg.EMA(model, d)
    for s, p in zip(ema.shadow, model.parameters()):
        assert s.dtype == torch.float32 and s.shape == p.shape and not s.any()
        assert s.data_ptr() != p.data_ptr()
    shadow = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update()
        shadow = [d * s + (1 - d) * p.detach().float() for s, p in zip(shadow, model.parameters())]
        for a, b in zip(ema.shadow, shadow):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    fresh = build(h, seed=9)
    ema.apply_to(fresh)
    for s, p in zip(shadow, fresh.parameters()):
        torch.testing.assert_close(p.detach(), s / (1 - d ** 3), rtol=1e-6, atol=1e-7)


def test_ema_after_one_update_is_the_weights_and_without_updates_changes_nothing():
    h = make_hparams()
    model = build(h)
    ema = tg.EMA(model, 0.99)
    untouched = build(h, seed=9)
    before = [p.detach().clone() for p in untouched.parameters()]
    ema.apply_to(untouched)  # no update yet: nothing to average, the model is left as it is
    for p, b in zip(untouched.parameters(), before):
        assert torch.equal(p.detach(), b)
    ema.update()  # one step: the bias-corrected average is exactly the current weights
    ema.apply_to(untouched)
    for p, q in zip(untouched.parameters(), model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_ema_converges_to_constant_weights():
    h = make_hparams()
    model = build(h)
    ema = tg.EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    for _ in range(60):
        ema.update()
    target = build(h, seed=9)
    ema.apply_to(target)
    for s, p, q in zip(ema.shadow, model.parameters(), target.parameters()):
        torch.testing.assert_close(s, p.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-6)


def test_sync_gradients_single_rank_is_noop():
    h = make_hparams()
    model = build(h)
    fill_grads(model, seed=1)
    before = [p.grad.clone() for p in model.parameters()]
    ptrs = [p.grad.data_ptr() for p in model.parameters()]
    params = list(model.parameters())
    params[0].grad = None  # a parameter without a gradient is fine too
    tg.sync_gradients(params, 1)
    assert params[0].grad is None
    for p, b, ptr in list(zip(params, before, ptrs))[1:]:
        assert torch.equal(p.grad, b) and p.grad.data_ptr() == ptr


# ---------------------------------------------------------------- end to end


def run_training(steps: int = 5) -> dict[str, torch.Tensor]:
    h = make_hparams(TIE_EMBEDDINGS="0", GRAD_CLIP_NORM="0.3")
    model = build(h, seed=21)
    opt = tg.Optimizers(model, h)
    gen = torch.Generator().manual_seed(22)
    batches = [(torch.randint(0, VOCAB, (4, 16), generator=gen), torch.randint(0, VOCAB, (4, 16), generator=gen))
               for _ in range(steps)]
    losses = []
    for step, (x, y) in enumerate(batches):
        opt.set_schedule(tg.lr_scale(step / steps, 0.5, 0.1), step)
        loss = model(x, y)
        loss.backward()
        opt.step()  # clips to GRAD_CLIP_NORM itself
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(p.grad is None for p in model.parameters())
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_training_is_deterministic():
    a, b = run_training(), run_training()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training moved every parameter group (the zero-initialized projections included)
    h = make_hparams(TIE_EMBEDDINGS="0")
    init = build(h, seed=21).state_dict()
    for k in ("tok_emb.weight", "lm_head.weight", "blocks.0.attn.proj.weight", "blocks.2.mlp.proj.weight",
              "blocks.1.attn.c_q.weight", "blocks.0.resid_mix", "skip_weights"):
        assert not torch.equal(a[k], init[k]), k


@pytest.mark.slow
def test_training_reduces_loss_on_repeated_batch():
    h = make_hparams(GRAD_CLIP_NORM="0")
    model = build(h, seed=31)
    opt = tg.Optimizers(model, h)
    gen = torch.Generator().manual_seed(32)
    x = torch.randint(0, VOCAB, (4, 16), generator=gen)
    y = torch.randint(0, VOCAB, (4, 16), generator=gen)
    first = None
    for step in range(30):
        opt.set_schedule(1.0, step)
        loss = model(x, y)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        final = model(x, y).item()
    assert first == pytest.approx(math.log(VOCAB), abs=0.05)
    assert final < first - 1.0, (first, final)


# ---------------------------------------------------------------- record-stack Muon options


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_polar_express_orthogonalizes_at_least_as_well_as_classic(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    errs = {}
    for coeffs in ("classic", "polar_express"):
        X = tg.newton_schulz(G, 5, torch.float64, coeffs)
        assert X.shape == G.shape
        sv = torch.linalg.svdvals(X)
        assert sv.min() > 0.5 and sv.max() < 1.5, (coeffs, sv.min(), sv.max())
        errs[coeffs] = (X - polar).norm() / polar.norm()
    assert errs["polar_express"] <= errs["classic"], errs


def test_newton_schulz_steps_beyond_the_table_reuse_its_last_tuple():
    torch.manual_seed(1)
    G = torch.randn(16, 24, dtype=torch.float64)
    table = tg.NS_COEFFICIENT_SETS["polar_express"]
    X = G / (G.norm() * tg.NS_NORM_SAFETY["polar_express"] + tg.NS_EPS)
    for i in range(7):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(tg.newton_schulz(G, 7, torch.float64, "polar_express"), X)


def test_row_normalize_and_muon_eq_r_step():
    torch.manual_seed(2)
    U = torch.randn(6, 10) * torch.arange(1, 7)[:, None]
    R = tg.row_normalize(U)
    torch.testing.assert_close(R.norm(dim=1), torch.ones(6))
    assert torch.equal(tg.row_normalize(torch.zeros(3, 4)), torch.zeros(3, 4))
    p = torch.nn.Parameter(torch.randn(6, 10))
    p0 = p.detach().clone()
    p.grad = U.clone()
    opt = tg.Muon([p], lr=0.1, momentum=0.9, weight_decay=0.0,
                  ns=tg.NewtonSchulz(5, "polar_express", row_norm=True, dtype="fp32"))
    opt.step()
    update = U + 0.9 * U  # Nesterov on the first step: g + mu * buf with buf = g
    expected = p0 - 0.1 * tg.newton_schulz(tg.row_normalize(update), 5, torch.float32, "polar_express")
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_optimizers_pass_the_muon_knobs_through():
    h = make_hparams(MUON_NS="polar_express", MUON_ROW_NORMALIZE="1")
    opt = tg.Optimizers(build(h), h)
    group = opt.muon.param_groups[0]
    assert group["ns_coeffs"] == "polar_express" and group["row_normalize"] is True
    h = make_hparams(MUON_NS="classic", MUON_ROW_NORMALIZE="0")
    group = tg.Optimizers(build(h), h).muon.param_groups[0]
    assert group["ns_coeffs"] == "classic" and group["row_normalize"] is False


def test_warmdown_iters_by_steps_and_by_wallclock_estimate():
    f = tg.lr_scale_iters
    # No wallclock cap: linear over the last N of ITERATIONS steps, floored at MIN_LR.
    assert f(0, 0.0, 1000, 0.0, 200, 0.0) == 1.0
    assert f(800, 0.0, 1000, 0.0, 200, 0.0) == 1.0
    assert f(900, 0.0, 1000, 0.0, 200, 0.0) == 0.5
    assert f(1000, 0.0, 1000, 0.0, 200, 0.0) == 0.0
    assert f(990, 0.0, 1000, 0.0, 200, 0.1) == 0.1
    # Under a 600 s cap at 0.1 s/step the run will end near step 6000 (the naive baseline record's rule:
    # warmdown_ms = iters * step_ms): 4000 warmdown iters are 400 s, so the decay starts at 200 s, long before
    # ITERATIONS=20000.
    assert f(1000, 100.0, 20000, 600.0, 4000, 0.0) == 1.0
    assert abs(f(3000, 300.0, 20000, 600.0, 4000, 0.0) - 0.75) < 1e-12
    assert abs(f(5900, 590.0, 20000, 600.0, 4000, 0.0) - 0.025) < 1e-12
    assert f(6100, 610.0, 20000, 600.0, 4000, 0.0) == 0.0
    # Step 0 has no step time yet: full LR.
    assert f(0, 0.0, 20000, 600.0, 4000, 0.0) == 1.0
