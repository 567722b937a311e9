"""GPTQ, LQER, fit-to-size and Hessian collection (tiny shapes, CPU, in-process).

Run:
    python -m pytest -q tests/test_quant.py          # < 1 minute, no data files needed

GPTQ with H = I must equal round to nearest; on correlated inputs its H-weighted error must be
clearly below round to nearest's; a failed Cholesky falls back to round to nearest and says so.
LQER must lower the reconstruction error of the tensors it corrects and its bytes must be in the
artifact. fit_artifact must land at or under the budget by widening the matrix groups' k only.
Hessians count every pass of a looped layer; the tied embedding's Hessian is the final-norm output's.
"""

from __future__ import annotations

import pytest
import torch

from conftest import logits, tg
from artifact_helpers import dequantize_rows, pack_artifact, unpack_artifact, unpack_artifact_full


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d // 4, generator=g)
    mix = torch.randn(d // 4, d, generator=g)
    return z @ mix + 0.05 * torch.randn(n, d, generator=g)  # rank ~d/4 plus a little noise


def h_weighted_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """||(W - Wq) x||^2 summed over inputs: the layer-output error GPTQ minimizes."""
    return float(((w - wq) @ x.T).square().sum())


def test_gptq_with_identity_hessian_equals_round_to_nearest():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    for bits, k in ((6, 12.0), (4, 3.0), (8, 20.0)):
        scale = tg.sdclip_scales(w, bits, k)
        q = tg.gptq_quantize(w, torch.eye(96), scale, bits, damp=0.01, block=32)
        assert torch.equal(q, tg.quantize_rtn(w, scale, bits)), (bits, k)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = correlated_inputs(2048, 128, seed=2)
    H = x.T @ x
    for bits, k in ((6, 12.0), (4, 4.0)):
        scale = tg.sdclip_scales(w, bits, k)
        rtn = dequantize_rows(tg.quantize_rtn(w, scale, bits), scale, torch.float32)
        q = tg.gptq_quantize(w, H, scale, bits, damp=0.01, block=32)
        gptq = dequantize_rows(q, scale, torch.float32)
        r = tg.qmax(bits)
        assert int(q.abs().max()) <= r and q.dtype == torch.int8
        e_rtn, e_gptq = h_weighted_error(w, rtn, x), h_weighted_error(w, gptq, x)
        assert e_gptq < 0.6 * e_rtn, f"bits {bits}: GPTQ {e_gptq:.4g} vs RTN {e_rtn:.4g}"


def test_gptq_block_size_and_act_order_do_not_change_the_grid():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(512, 40, seed=4)
    scale = tg.sdclip_scales(w, 6, 10.0)
    results = [tg.gptq_quantize(w, x.T @ x, scale, 6, 0.01, block) for block in (1, 7, 40, 128)]
    for q in results:  # blocking is an exact reorganisation of the same column updates
        deq = dequantize_rows(q, scale, torch.float32)
        assert abs(h_weighted_error(w, deq, x) - h_weighted_error(w, dequantize_rows(results[0], scale, torch.float32), x)) \
            <= 1e-3 * h_weighted_error(w, deq, x) + 1e-9


def test_gptq_dead_columns_are_zero():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    x = correlated_inputs(256, 32, seed=6)
    x[:, [3, 17]] = 0.0  # inputs that never fire
    q = tg.gptq_quantize(w, x.T @ x, tg.sdclip_scales(w, 6, 12.0), 6, 0.01, 8)
    assert torch.equal(q[:, [3, 17]], torch.zeros(8, 2, dtype=torch.int8))


def test_cholesky_failure_falls_back_to_round_to_nearest_and_is_logged():
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(7))
    state = {"blocks.0.mlp.fc.weight": w}
    lines: list[str] = []
    out = tg.quantize_state(state, tg.QuantSpec(), {"blocks.0.mlp.fc.weight": -torch.eye(64)}, lines.append)
    qt = out["blocks.0.mlp.fc.weight"]
    assert qt.method == "rtn_fallback"
    assert torch.equal(qt.q, tg.quantize_rtn(w, tg.sdclip_scales(w, 6, 11.5), 6))
    assert any("gptq_fallback:blocks.0.mlp.fc.weight" in line and "cholesky" in line for line in lines), lines


def tiny_model(**kw) -> tg.GPT:
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=256, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                         tie_embeddings=True, tied_embed_init_std=0.02, logit_softcap=30.0, rope_base=10000.0,
                         qk_gain_init=1.5, **kw)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_hessians_count_every_pass_of_a_looped_layer_and_the_head_input():
    # No LN scale: every matrix input after an RMS norm has mean square 1 per row, so trace(H) is
    # (passes through the layer) x tokens x width exactly.
    model = tiny_model(num_loops=2, loop_start=1, loop_end=2)
    model.set_looping(True)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    H = tg.collect_hessians(model, [ids, ids], torch.device("cpu"), "fp32")
    tokens = 2 * ids.numel()
    layout = model.layouts[True]
    for layer in range(4):
        passes = layout.count(layer)
        trace = float(torch.trace(H[f"blocks.{layer}.attn.c_q.weight"]))
        assert abs(trace - passes * tokens * 64) < 1e-3 * trace, (layer, passes, trace)
        assert H[f"blocks.{layer}.mlp.proj.weight"].shape == (128, 128)
    assert [layout.count(i) for i in range(4)] == [1, 3, 3, 1]
    # The tied embedding is the LM head: its Hessian is that of the final-norm output.
    hidden = model.hidden(ids)
    expected = 2 * hidden.reshape(-1, 64).T @ hidden.reshape(-1, 64)
    assert torch.allclose(H["tok_emb.weight"], expected, rtol=1e-4, atol=1e-3)
    quantized = {n for n, p in model.named_parameters() if tg.is_quantized(n, p)}
    assert set(H) == quantized, "one Hessian per quantized matrix (the tied embedding's is the head input's)"
    for layer in range(4):  # q, k and v read one input: one Hessian tensor, computed once
        names = [f"blocks.{layer}.attn.c_{x}.weight" for x in "qkv"]
        assert H[names[0]] is H[names[1]] is H[names[2]]
    assert all(m.hessian is None for m in model.modules() if isinstance(m, tg.TappedLinear)), "taps must be disarmed"
    assert model.head_hessian is None


def state_of(model: tg.GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_gptq_state_lowers_the_model_output_error():
    model = tiny_model()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    H = tg.collect_hessians(model, [ids], torch.device("cpu"), "fp32")
    state = state_of(model)
    spec = tg.QuantSpec(bits=(("attn", 4), ("embed", 6), ("mlp", 4)), clip=(("attn", 4.0), ("embed", 10.0), ("mlp", 4.0)))
    with torch.no_grad():
        ref = logits(model, ids)
        errs = {}
        for name, hess in (("rtn", None), ("gptq", H)):
            model.load_state_dict(unpack_artifact(pack_artifact(state, spec, hess)))
            errs[name] = float((logits(model, ids) - ref).square().mean())
    assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.slow
def test_lqer_lowers_the_error_of_the_tensors_it_corrects_and_is_packed():
    model = tiny_model()
    state = state_of(model)
    base = tg.QuantSpec(method="rtn")
    lq = tg.QuantSpec(method="rtn", lqer_rank=4, lqer_top_k=2, lqer_factor_bits=4)
    plain, corrected = tg.quantize_state(state, base), tg.quantize_state(state, lq)
    fixed = [n for n, qt in corrected.items() if isinstance(qt, tg.QuantTensor) and qt.lqer is not None]
    assert len(fixed) == 2
    errors = {n: float((state[n] - qt.dequantize()).norm()) for n, qt in plain.items() if isinstance(qt, tg.QuantTensor)}
    assert sorted(fixed) == sorted(sorted(errors, key=errors.get, reverse=True)[:2]), "the largest errors first"
    for n in fixed:
        after = float((state[n] - corrected[n].dequantize()).norm())
        assert after < errors[n], (n, after, errors[n])
        qa, sa, qb, sb = corrected[n].lqer
        assert qa.shape[1] == qb.shape[0] == 4 and int(qa.abs().max()) <= 7 and int(qb.abs().max()) <= 7
    blob_plain, blob_lq = tg.pack_quantized(plain), tg.pack_quantized(corrected)
    assert len(blob_lq) > len(blob_plain), "LQER factors are stored, so they cost bytes"
    out = unpack_artifact(blob_lq)
    for n in fixed:
        assert torch.equal(out[n], corrected[n].dequantize())


@pytest.mark.slow
def test_fit_artifact_widens_matrix_k_until_it_fits():
    state = state_of(tiny_model())
    spec = tg.QuantSpec(method="rtn")
    full = len(pack_artifact(state, spec))
    budget = int(full * 0.85)
    lines: list[str] = []
    fit = tg.fit_artifact(state, spec, None, budget, {}, lines.append)
    assert fit.fits and len(fit.blob) <= budget
    assert len(fit.attempts) >= 2 and fit.attempts[0]["bytes"] == full
    assert dict(fit.spec.clip)["mlp"] > dict(spec.clip)["mlp"] and dict(fit.spec.clip)["attn"] > dict(spec.clip)["attn"]
    assert dict(fit.spec.clip)["embed"] == dict(spec.clip)["embed"], "the embedding keeps its k"
    assert sum(line.startswith("fit_attempt:") for line in lines) == len(fit.attempts)
    # Already under budget: one attempt, k unchanged.
    easy = tg.fit_artifact(state, spec, None, full, {}, lines.append)
    assert easy.fits and len(easy.attempts) == 1 and easy.spec == spec


def test_fit_stops_with_one_line_when_no_clip_can_widen():
    """k = 0 (each row at its largest magnitude) times any factor is still 0: the size cannot move, so the fit
    stops after one attempt and says why instead of running the factor off to 1e23."""
    state = state_of(tiny_model())
    spec = tg.QuantSpec(method="rtn", clip=(("attn", 0.0), ("embed", 0.0), ("mlp", 0.0)))
    lines: list[str] = []
    fit = tg.fit_artifact(state, spec, None, int(len(pack_artifact(state, spec)) * 0.85), {}, lines.append)
    assert not fit.fits and [a["factor"] for a in fit.attempts] == [1.0] and fit.spec == spec
    stop = [line for line in lines if "fit-to-size stops" in line]
    assert len(stop) == 1 and "MATRIX_CLIP_SIGMAS > 0" in stop[0] and "TARGET_BYTES" in stop[0], lines


def test_fit_stops_once_widening_no_longer_shrinks_the_artifact():
    state = state_of(tiny_model())
    lines: list[str] = []
    fit = tg.fit_artifact(state, tg.QuantSpec(method="rtn"), None, 1000, {}, lines.append)  # below any artifact
    assert not fit.fits and len(fit.attempts) < tg.FIT_MAX_ATTEMPTS
    assert fit.attempts[-1]["bytes"] >= fit.attempts[-2]["bytes"]
    assert sum("no longer shrinks the artifact" in line for line in lines) == 1, lines


def test_lzma_compressor_round_trip_and_deterministic_gptq_pack():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    H = tg.collect_hessians(model, [ids], torch.device("cpu"), "fp32")
    state = state_of(model)
    spec = tg.QuantSpec(compressor="lzma", lqer_rank=2, lqer_top_k=1)
    a = pack_artifact(state, spec, H, meta={"note": "x"})
    assert a == pack_artifact(state, spec, H, meta={"note": "x"}), "same input, same bytes"
    assert a[tg.ARTIFACT_PREFIX.size] == tg.ARTIFACT_COMPRESSOR_IDS["lzma"]
    out, meta = unpack_artifact_full(a)
    assert meta == {"note": "x"}
    ref = tg.quantize_state(state, spec, H)
    for name, qt in ref.items():
        expect = qt.dequantize() if isinstance(qt, tg.QuantTensor) else qt.half().to(qt.dtype)
        assert torch.equal(out[name], expect), name


def test_entropy_estimate_is_close_to_brotli():
    g = torch.Generator().manual_seed(4)
    state = {f"blocks.{i}.mlp.fc.weight": torch.randn(512, 256, generator=g) for i in range(2)}
    quantized = tg.quantize_state(state, tg.QuantSpec(method="rtn"))
    entropy = tg.quant_entropy_bytes(quantized)["mlp"]["entropy_bytes"]
    codes_only = tg.pack_quantized({n: tg.QuantTensor("mlp", 6, qt.q, torch.ones(512).half(), torch.float32, "rtn")
                                    for n, qt in quantized.items()})
    assert entropy <= len(codes_only) <= 1.05 * entropy + 2000


def all_features_model(parallel_mode: str) -> tg.GPT:
    return tiny_model(rope_dims=8, mlp_act="leaky_relu2", ln_scale=True, xsa_last_n=4, skip_gates_enabled=True,
                      smear_gate_enabled=True, sparse_attn_gate_enabled=True, gate_window=8, num_loops=1,
                      loop_start=1, loop_end=2, parallel_mode=parallel_mode, parallel_start_layer=2)


def test_hessians_cover_every_quantized_matrix_with_every_feature():
    model = all_features_model("lanes")
    model.set_looping(True)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = tg.BOS_ID
    H = tg.collect_hessians(model, ids.split(2), torch.device("cpu"), "fp32")
    assert set(H) == {n for n, p in model.named_parameters() if tg.is_quantized(n, p)}
