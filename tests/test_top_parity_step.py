"""One training step of PRESET=record against the leaderboard top's (PR #1855), proven on the CPU in float32: the
same weights (tests/top_harness.py's `pair`), the same batch, then gradients, parameters after one and after two
steps (momentum and Adam moments matter from the second), and the EMA, compared parameter by parameter (the top's
bank slices against our per-layer matrices: `counterparts`).

Configuration. Ours: PRESET=record as shipped, plus COMPILE=0 and MUON_NS_DTYPE=fp32 (or bf16 where stated; `auto`
picks bf16 on a CPU with AMX tiles). The top: its Hyperparameters defaults with the README's run command
(README below: BETA2=0.99 where its default is 0.95, MIN_LR=0.1, WARMDOWN_FRAC=0.85, MATRIX_LR=0.026,
GRAD_CLIP_NORM=0.3, MUON_BACKEND_STEPS=5), at top_harness's CPU shape. Step 0 at LR multiplier 1.0 and step 1 at
0.6, each with the warm-up Muon momentum of its step (0.92, then 0.92 + 0.05/1500).

Patches to the top's script, on top of top_harness's (its BOS_ID, its fused CE off, the FA3 stand-in), each set in
`top_on_cpu` or `run_both` and undone after the run:
1. torch.cuda.Stream, torch.cuda.current_stream and torch.cuda.stream: its Optimizers makes an auxiliary CUDA stream
   and runs the two AdamW steps on it; here stand-ins that do nothing (one CPU stream: the same order, token AdamW,
   scalar AdamW, then Muon).
2. zeropower_via_newtonschulz5 is @torch.compile'd: the eager function it wraps (_torchdynamo_orig_callable), the
   same arithmetic.
3. Every block's mlp.use_fused = False: in training mode its MLP calls a Triton kernel (CUDA only); its own unfused
   branch is the same function, leaky_relu(x @ W1^T, 0.5)^2 @ W2^T, whose autograd derivative is the kernel's
   backward, where(pre > 0, 2 pre, 0.5 pre).
4. fp32 runs only: Tensor.bfloat16 -> Tensor.float while its Muon steps. Its Muon casts every gradient to bf16,
   keeps a bf16 momentum buffer and runs Newton-Schulz in bf16 whatever the parameter dtype; with the cast undone it
   is the same algorithm in float32. The bf16 test runs it unpatched.
No torch.distributed patch: without a process group its Muon._build sets _distributed False, launch_reduce_scatters
returns before any collective, and step updates each bank in place (asserted below).

Its training step is a closure inside train_model (step_fn, lines 3364-3403), and its EMA is inline in the loop
(lines 3469-3473 and 3520-3521): `top_step` and `run_both` repeat them, in their order, for one micro-batch without
autocast. Ours: `our_step` is schedule_step's set_schedule plus train_step's body for one micro-batch.

The optimizer checks feed ours the top's gradients (mapped) before each of our optimizer steps, so they measure the
optimizers alone: where a gradient is within a few Adam eps of zero, g / (sqrt(v) + eps) turns the two backward
passes' float32 noise (~1e-11 there) into up to 2e-4 (measured: blocks.8.attn.q_gain[0], |g| = 1.9e-8, 4.8e-6;
seed 1, blocks.1.resid_mix, 2.1e-4). The gradients are checked on their own, before that substitution.

Differences found (each pinned by a test): our EMA starts from zero with a bias correction, the top's from the
initial weights; the top keeps Muon's momentum in bf16, ours in the gradient dtype. (Two more were found by this
file and fixed: our polar_express Newton-Schulz divided by 1.02 * ||X||_F where the top divides by ||X||_F, now
MUON_NS=polar_express_safe; PRESET=record trained without document isolation.)
Every check also runs a mutant to show it can fail. Skipped, with the reason, where the anchor folder is absent."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from conftest import tg
from reference_muon import momentum_buffer
from top_harness import BOS, SKIP_WITHOUT_TOP, documents, pair, top_hparams

pytestmark = SKIP_WITHOUT_TOP

# The top's README run command where it touches the optimizers (its defaults: BETA2 0.95, MIN_LR 0.0,
# WARMDOWN_FRAC 0.75; the rest restate its defaults).
README = dict(matrix_lr=0.026, beta2=0.99, grad_clip_norm=0.3, muon_backend_steps=5, min_lr=0.1, warmdown_frac=0.85)
ROWS, COLS = 4, 49  # a batch of 4 rows of 48 inputs (the harness's train_seq_len is 64), BOS inside rows
LR_SCALES = (1.0, 0.6)  # step 0 at the peak LR, step 1 in the warmdown: every group's LR must follow

# Gradients, float32: the two scripts order a few reductions differently (as for the logits, LOGIT_ATOL); measured
# 1.7e-8 (step 1) and 3.7e-8 (step 2, looping), both on tok_emb.weight (|g| up to 0.085).
GRAD_ATOL = 1e-6
# Matrices after a step, float32 Newton-Schulz (the top's banks, our same-shape buckets; baddbmm against matmul and
# add): measured 6.7e-8, where a step moves an element by up to ~3e-3 (lr 0.026 x a 64-wide orthogonal update).
MUON_ATOL = 1e-6
# Embedding and scalars after a step, the same gradients into AdamW (the top's fused kernel, our foreach one):
# measured 1.2e-7 (skip_weights: one float32 ulp at |w| ~ 1); q_gain sits at ~5, where an ulp is 4.8e-7.
ADAM_ATOL = 2e-6
# EMA after a step (our shadow plus d^k w0 against the top's): measured 9.5e-7 on blocks.8.attn.q_gain at 5.04 (two
# float32 ulps).
EMA_ATOL = 4e-6
# Newton-Schulz alone, float32, the same input (singular values spread over 1e-3..1): measured 9.8e-7.
NS_ATOL = 1e-5
# bf16 Muon (the top as it runs; ours with MUON_NS_DTYPE=bf16): max over matrices of ||p_ours - p_top|| /
# ||p_top - p_before|| after each step. bf16 rounding of a 5-step Newton-Schulz, and the top's bf16 gradient and
# momentum: measured 5.4e-2 and 4.7e-2 (the top's own bf16 run against its fp32 run: 5.0e-2); with
# MUON_NS=polar_express_safe (the 1.02 safety factor), 1.3e-1.
BF16_STEP_RTOL = 0.08


# ---------------------------------------------------------------------------------------------------------------
# Running both
# ---------------------------------------------------------------------------------------------------------------


class NoStream:
    """torch.cuda.Stream's stand-in (patch 1): one CPU stream, so waiting on one does nothing."""

    def wait_stream(self, other) -> None:
        pass


@contextlib.contextmanager
def top_on_cpu(top, fp32_muon: bool):
    """Patches 1, 2 and (fp32_muon) 4."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "Stream", NoStream)
        mp.setattr(torch.cuda, "current_stream", lambda *a, **k: NoStream())
        mp.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        mp.setattr(top, "zeropower_via_newtonschulz5", top.zeropower_via_newtonschulz5._torchdynamo_orig_callable)
        if fp32_muon:
            bf16_step = top.Muon.step

            def fp32_step(self, *args, **kwargs):
                with pytest.MonkeyPatch.context() as inner:
                    inner.setattr(torch.Tensor, "bfloat16", torch.Tensor.float)
                    return bf16_step(self, *args, **kwargs)

            mp.setattr(top.Muon, "step", fp32_step)
        yield


def top_h(top, **overrides):
    return top_hparams(top, **{**README, **overrides})


def our_h(**env) -> tg.Hyperparameters:
    base = {"PRESET": "record", "COMPILE": "0", "MUON_NS_DTYPE": "fp32"}
    return tg.Hyperparameters.from_env({**base, **{k: str(v) for k, v in env.items()}})


def counterparts(top_model, ours) -> dict[str, tuple[str, tuple]]:
    """Each of our parameters -> (the top's parameter name, index into it); every one of ours exactly once."""
    n = top_model.num_layers
    out = {"tok_emb.weight": ("tok_emb.weight", ()), "skip_weights": ("skip_weights", ()),
           "skip_gates": ("skip_gates", ()), "smear.smear_w": ("smear_gate.weight", (0,)),
           "smear.smear_lambda": ("smear_lambda", (0,))}
    banks = {"attn.c_q.weight": ("qo_bank", 0), "attn.proj.weight": ("qo_bank", n), "attn.c_k.weight": ("kv_bank", 0),
             "attn.c_v.weight": ("kv_bank", n), "mlp.fc.weight": ("mlp_up_bank", 0),
             "mlp.proj.weight": ("mlp_down_bank", 0)}
    for i, block in enumerate(ours.blocks):
        for name, (bank, offset) in banks.items():
            out[f"blocks.{i}.{name}"] = (bank, (offset + i,))
        for name in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.attn_gate_w"):
            out[f"blocks.{i}.{name}"] = (f"blocks.{i}.{name}", ())
        if block.lane_r is not None:
            out[f"blocks.{i}.lane_r"] = ("parallel_resid_lambdas", (i,))
            out[f"blocks.{i}.lane_p"] = ("parallel_post_lambdas", (i,))
    assert set(out) == {name for name, _ in ours.named_parameters()}
    return out


def top_step(top_model, opts, h, x, y, step: int, lr_scale: float) -> dict[str, torch.Tensor]:
    """The top's step_fn for one micro-batch: loss, backward, Muon momentum warm-up, every group's LR =
    base_lr * lr_scale, clip_grad_norm_ over every parameter, Optimizers.step. Returns the gradients before the
    optimizer (by the top's parameter name)."""
    loss = top_model(x.reshape(1, -1), y.reshape(1, -1), cu_seqlens=tg.document_starts(x, BOS), max_seqlen=x.size(1))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in top_model.named_parameters()}
    frac = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
    for group in opts.optimizer_muon.param_groups:
        group["momentum"] = (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
    if h.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in top_model.parameters() if p.requires_grad], h.grad_clip_norm)
    opts.step(distributed=False)
    return grads


def our_step(model, opt, x, y, step: int, lr_scale: float, grads_in: dict[str, torch.Tensor] | None):
    """set_schedule, loss, backward, (grads_in: these gradients instead), Optimizers.step (the clip is inside),
    zero_grad. Returns our own gradients before the optimizer."""
    opt.set_schedule(lr_scale, step)
    model(x, y, cu_seqlens=tg.document_starts(x, BOS)).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    if grads_in is not None:
        for name, p in model.named_parameters():
            p.grad.copy_(grads_in[name])
    opt.step()
    opt.zero_grad()
    return grads


_RUNS: dict[str, list[dict]] = {}


def cached_run(top, **kwargs) -> list[dict]:
    """run_both, once per configuration in this session (several tests read the same run; none changes it)."""
    bound = inspect.signature(run_both).bind(top, **kwargs)
    bound.apply_defaults()
    key = repr(sorted((k, v) for k, v in bound.arguments.items() if k != "top"))
    if key not in _RUNS:
        _RUNS[key] = run_both(top, **kwargs)
    return _RUNS[key]


def run_both(top, *, fp32_muon=True, looping=False, ours_looping=None, seed=0, shared_grads=True,
             top_over=None, ours_env=None) -> list[dict]:
    """Two training steps of both from the same weights and batches. ours_looping: ours looped or not (default: as
    the top). Returns [initial, after step 1, after step 2], each
    {"param"|"grad"|"ema": {our parameter name: (ours, the top's counterpart)}} ("grad", "ema" from step 1)."""
    h_top, h_ours = top_h(top, **(top_over or {})), our_h(**(ours_env or {}))
    top_model, ours = pair(top, seed, doc_isolation=h_ours.doc_isolation)
    for block in top_model.blocks:
        block.mlp.use_fused = False  # patch 3
    top_model.train()
    ours.train()
    top_model.looping_active = looping
    ours.set_looping(looping if ours_looping is None else ours_looping)
    tg.flatten_parameters(ours)  # as run() does before building the optimizers (the EMA's flat path)
    where = counterparts(top_model, ours)
    names = [name for name, _ in ours.named_parameters()]

    def view(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        top_name, index = where[name]
        return tensors[top_name].detach()[index].clone()

    with top_on_cpu(top, fp32_muon):
        top_opts = top.Optimizers(h_top, top_model)
        opt = tg.Optimizers(ours, h_ours)
        top_ema = {name: t.detach().float().clone() for name, t in top_model.state_dict().items()}
        ema = tg.EMA(ours, h_ours.ema_decay)
        top_params = dict(top_model.named_parameters())
        out = [{"param": {name: (p.detach().clone(), view(top_params, name)) for name, p in ours.named_parameters()}}]
        for step, lr_scale in enumerate(LR_SCALES):
            ids = documents(ROWS, COLS, seed=100 + step)
            x, y = ids[:, :-1], ids[:, 1:]
            top_grads = top_step(top_model, top_opts, h_top, x, y, step, lr_scale)
            mapped = {name: view(top_grads, name) for name in names}
            our_grads = our_step(ours, opt, x, y, step, lr_scale, mapped if shared_grads else None)
            with torch.no_grad():
                for name, t in top_model.state_dict().items():
                    top_ema[name].mul_(h_top.ema_decay).add_(t.detach(), alpha=1.0 - h_top.ema_decay)
            ema.update()
            out.append({"grad": {name: (our_grads[name], mapped[name]) for name in names},
                        "param": {name: (p.detach().clone(), view(top_params, name))
                                  for name, p in ours.named_parameters()},
                        "ema": {name: (s.clone(), view(top_ema, name)) for name, s in zip(names, ema.shadow)}})
        out[-1]["optimizers"] = (opt, top_opts)
    return out


def worst(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], group: str | None = None) -> tuple[float, str]:
    """The largest elementwise |ours - top's| over our parameters of `group` (matrix, embed, scalar; None: all)."""
    diffs = [((a - b).abs().max().item(), name) for name, (a, b) in pairs.items()
             if group is None or tg.classify_param(name) == group]
    return max(diffs)


def step_rel_diff(run: list[dict], k: int) -> tuple[float, str]:
    """max over matrices of ||p_ours - p_top|| / ||p_top - p_before|| after step k."""
    return max((((a - b).norm() / (b - run[0]["param"][name][1]).norm()).item(), name)
               for name, (a, b) in run[k]["param"].items() if tg.classify_param(name) == "matrix")


# ---------------------------------------------------------------------------------------------------------------
# The optimizers' settings
# ---------------------------------------------------------------------------------------------------------------

SCHEDULE_KNOBS = ("matrix_lr", "scalar_lr", "tied_embed_lr", "beta1", "beta2", "adam_eps", "muon_wd", "embed_wd",
                  "adam_wd", "muon_momentum", "muon_momentum_warmup_start", "muon_momentum_warmup_steps",
                  "muon_backend_steps", "muon_row_normalize", "grad_clip_norm", "ema_decay", "warmdown_frac", "min_lr",
                  "warmup_steps", "tie_embeddings")


def group_settings(top, top_over=None) -> tuple[dict, dict]:
    """Per our parameter: (optimizer, base LR, weight decay, Adam betas and eps | Muon momentum, Nesterov, steps,
    row normalization, coefficients), ours and the top's counterpart's."""
    h_top, h_ours = top_h(top, **(top_over or {})), our_h()
    top_model, ours = pair(top)
    where = counterparts(top_model, ours)
    with top_on_cpu(top, fp32_muon=True):
        top_opts = top.Optimizers(h_top, top_model)
    opt = tg.Optimizers(ours, h_ours)

    def adam(group, base_lr):
        return ("adamw", base_lr, group["weight_decay"], group["betas"], group["eps"], group["amsgrad"])

    def muon(group, base_lr, nesterov, coeffs):
        return ("muon", base_lr, group["weight_decay"], group["momentum"], nesterov, group["backend_steps"],
                group["row_normalize"], coeffs)

    top_by_id = {}
    for group in top_opts.optimizer_tok.param_groups + top_opts.optimizer_scalar.param_groups:
        top_by_id.update({id(p): adam(group, group["base_lr"]) for p in group["params"]})
    for group in top_opts.optimizer_muon.param_groups:  # its coefficients: _PE_COEFFS, compared below
        top_by_id.update({id(p): muon(group, group["base_lr"], group["nesterov"], "polar_express")
                          for p in group["params"]})
    ours_by_id = {}
    for group in opt.adam.param_groups:
        ours_by_id.update({id(p): adam(group, opt.base_lr[group["name"]]) for p in group["params"]})
    for group in opt.muon.param_groups:  # our Muon is always Nesterov (muon_direction)
        ours_by_id.update({id(p): muon(group, opt.base_lr["matrix"], True, group["ns_coeffs"]) for p in group["params"]})
    top_params = dict(top_model.named_parameters())
    ours_table = {name: ours_by_id[id(p)] for name, p in ours.named_parameters()}
    top_table = {name: top_by_id[id(top_params[where[name][0]])] for name in ours_table}
    knobs = {k: (getattr(h_ours, k), getattr(h_top, k)) for k in SCHEDULE_KNOBS}
    return ours_table, top_table, knobs


def test_optimizer_settings_equal_the_tops(top):
    """Every parameter in the same optimizer with the same LR, weight decay, betas, eps, momentum, Newton-Schulz
    steps, row normalization and coefficients; the same schedule, clip and EMA knobs."""
    ours_table, top_table, knobs = group_settings(top)
    assert ours_table == top_table
    assert {k: v for k, v in knobs.items() if v[0] != v[1]} == {}
    assert tuple(tg.NS_COEFFICIENT_SETS["polar_express"]) == top._PE_COEFFS
    assert {v[0] for v in ours_table.values()} == {"adamw", "muon"}  # both kinds compared


def test_optimizer_settings_check_fails_for_the_tops_script_defaults(top):
    """The mutant: the top's Hyperparameters defaults without its README's overrides."""
    ours_table, top_table, knobs = group_settings(top, top_over=dict(beta2=0.95, min_lr=0.0, warmdown_frac=0.75))
    assert {k for k, v in knobs.items() if v[0] != v[1]} == {"beta2", "min_lr", "warmdown_frac"}
    assert {name for name in ours_table if ours_table[name] != top_table[name]} == {
        name for name, s in ours_table.items() if s[0] == "adamw"}


@pytest.mark.slow
def test_the_tops_muon_runs_single_process_and_keeps_bf16_momentum(top):
    """Its Muon without a process group never calls a collective (so no distributed patch); a precision difference
    pinned: it keeps the momentum of every bank in bf16, we keep it in the gradient's dtype (float32 here)."""
    run = cached_run(top, fp32_muon=False, ours_env={"MUON_NS_DTYPE": "bf16"})
    opt, top_opts = run[-1]["optimizers"]
    muon = top_opts.optimizer_muon
    assert not torch.distributed.is_initialized() and muon._distributed is False and muon._world_size == 1
    assert {muon.state[p]["momentum_buffer"].dtype for p in muon.param_groups[0]["params"]} == {torch.bfloat16}
    assert {momentum_buffer(opt.muon, p).dtype for p in opt.muon.param_groups[0]["params"]} == {torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.slow
def test_gradients_equal_the_tops(top, looping):
    run = cached_run(top, looping=looping)
    for k in (1, 2):
        assert worst(run[k]["grad"]) <= (GRAD_ATOL, "")


@pytest.mark.slow
def test_the_gradient_check_fails_with_depth_recurrence_on_one_side(top):
    """The mutant: our layers looped (17 virtual layers), the top's not (11)."""
    assert worst(cached_run(top, ours_looping=True)[1]["grad"])[0] > 100 * GRAD_ATOL


def test_the_gradient_check_fails_without_document_isolation(top):
    """The mutant: DOC_ISOLATION=0 (attention crosses a BOS inside a row); the top always attends within documents
    (measured: up to 8.7e-3 on tok_emb.weight, matrices 2.4e-3, scalars 1.5e-3)."""
    assert worst(cached_run(top, ours_env={"DOC_ISOLATION": 0})[1]["grad"])[0] > 100 * GRAD_ATOL


# ---------------------------------------------------------------------------------------------------------------
# Parameters after one and two steps
# ---------------------------------------------------------------------------------------------------------------


def assert_params_equal(step: dict) -> None:
    assert worst(step["param"], "matrix")[0] <= MUON_ATOL
    assert max(worst(step["param"], "embed"), worst(step["param"], "scalar"))[0] <= ADAM_ATOL


@pytest.mark.parametrize("looping", [False, True])
def test_parameters_after_two_steps_equal_the_tops(top, looping):
    run = cached_run(top, looping=looping)
    assert_params_equal(run[1])
    assert_params_equal(run[2])


# (our knob, its value, the step from which it shows, the group it moves, and by at least)
PARAM_MUTANTS = [
    ("BETA2", 0.95, 2, "embed", 10 * ADAM_ATOL),  # Adam's first step is g / |g| whatever beta2
    ("GRAD_CLIP_NORM", 0, 2, "matrix", 10 * MUON_ATOL),  # Muon is scale-invariant in one step, not across two
    ("GRAD_CLIP_NORM", 0.5, 1, "embed", 10 * ADAM_ATOL),  # both clip: only Adam's eps sees the scale
    ("MUON_ROW_NORMALIZE", 0, 1, "matrix", 100 * MUON_ATOL),
    ("MUON_MOMENTUM_WARMUP_START", 0.97, 2, "matrix", 100 * MUON_ATOL),  # Nesterov's first step is (1 + mu) g
    ("MUON_WD", 0, 1, "matrix", 100 * MUON_ATOL),
    ("EMBED_WD", 0, 1, "embed", 10 * ADAM_ATOL),
    ("ADAM_WD", 0, 1, "scalar", 100 * ADAM_ATOL),
    ("SCALAR_LR", 0.021, 1, "scalar", 100 * ADAM_ATOL),
    # PR #1514's Newton-Schulz (input norm x 1.02): up to 1.6e-3 after one step (blocks.10.attn.c_v.weight)
    ("MUON_NS", "polar_express_safe", 1, "matrix", 100 * MUON_ATOL),
]


@pytest.mark.parametrize("knob,value,first_step,group,by", PARAM_MUTANTS, ids=[f"{m[0]}={m[1]}" for m in PARAM_MUTANTS])
@pytest.mark.slow
def test_the_parameter_check_fails_for_a_mutant(top, knob, value, first_step, group, by):
    run = cached_run(top, ours_env={knob: value})
    tolerance = MUON_ATOL if group == "matrix" else ADAM_ATOL
    if first_step == 2:
        assert worst(run[1]["param"], group)[0] <= tolerance
    assert worst(run[first_step]["param"], group)[0] > by


def test_newton_schulz_equals_the_tops(top):
    """Both functions on the same stack of momentum-like inputs, float32: equal; PR #1514's form (the input norm
    times 1.02, MUON_NS=polar_express_safe) differs by more than 100 x NS_ATOL (measured 0.134)."""
    g = torch.Generator().manual_seed(3)
    G = torch.randn(6, 32, 64, generator=g) * torch.logspace(-3, 0, 64)  # spread singular values
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "bfloat16", torch.Tensor.float)  # patch 4
        expected = top.zeropower_via_newtonschulz5._torchdynamo_orig_callable(G, steps=5)
    ours = tg.newton_schulz(G, 5, torch.float32, "polar_express")
    safe = tg.newton_schulz(G, 5, torch.float32, "polar_express_safe")
    assert (ours - expected).abs().max().item() <= NS_ATOL
    assert (safe - expected).abs().max().item() > 100 * NS_ATOL


def test_parameters_with_bf16_newton_schulz_agree_with_the_tops(top):
    """The top's Muon as it runs (bf16 gradient, momentum and Newton-Schulz) against ours with MUON_NS_DTYPE=bf16,
    within bf16's rounding (BF16_STEP_RTOL); the Adam groups stay float32 in both."""
    run = cached_run(top, fp32_muon=False, ours_env={"MUON_NS_DTYPE": "bf16"})
    for k in (1, 2):
        assert step_rel_diff(run, k)[0] <= BF16_STEP_RTOL
        assert max(worst(run[k]["param"], "embed"), worst(run[k]["param"], "scalar"))[0] <= ADAM_ATOL


def test_the_bf16_check_fails_with_the_safety_factor(top):
    """The mutant: MUON_NS=polar_express_safe's 1.02 factor stands out of bf16's rounding."""
    run = cached_run(top, fp32_muon=False, ours_env={"MUON_NS_DTYPE": "bf16", "MUON_NS": "polar_express_safe"})
    assert step_rel_diff(run, 1)[0] > BF16_STEP_RTOL


# ---------------------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------------------


def ema_gap(run: list[dict], decay: float, k: int) -> float:
    """max |our shadow + decay^k * w0 - the top's EMA| after step k: ours is (1 - d) * sum_j d^(k-j) w_j from zero,
    the top's the same plus d^k * w0 (it starts from the initial weights)."""
    return max(((s + decay ** k * run[0]["param"][name][1]) - e).abs().max().item()
               for name, (s, e) in run[k]["ema"].items())


def test_ema_differs_from_the_tops_only_by_its_start(top):
    assert our_h().ema_decay == top_h(top).ema_decay == 0.9965
    run = cached_run(top)
    for k in (1, 2):
        assert ema_gap(run, 0.9965, k) <= EMA_ATOL


def test_the_ema_check_fails_for_another_decay(top):
    """The mutant: EMA_DECAY=0.99 in ours."""
    assert ema_gap(cached_run(top, ours_env={"EMA_DECAY": 0.99}), 0.9965, 1) > 100 * EMA_ATOL


@pytest.mark.xfail(strict=True, reason="our EMA starts from zero and divides by 1 - d^k (bias correction, an average "
                                       "of trained weights only); the top's starts from the initial weights, which "
                                       "keep a weight d^k (0.9965^4931 = 3e-8 at the record's step count): after two "
                                       "steps the EMA weights differ by about w_2 - w_0 (measured 3.9e-2)")
def test_ema_weights_equal_the_tops(top):
    run = cached_run(top)
    decay, k = 0.9965, 2
    applied = {name: s / (1 - decay ** k) for name, (s, _) in run[k]["ema"].items()}
    assert max((applied[name] - e).abs().max().item() for name, (_, e) in run[k]["ema"].items()) <= EMA_ATOL
