"""FUSED_MLP_ENABLED: the MLP's up projection and leaky_relu(., 0.5)^2 as one custom op (PR #1530's kernel, as
PR #1855 trains with it): its PyTorch formula against the unfused MLP, forward and backward, with the TTT
adapter and the calibration tap; its Triton kernel through Triton's CPU interpreter; the op under torch.compile;
and the knob's validation. The compiled runs of main() with the knob on are in test_compiled_flow.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, tg

# (batch dims of x, D, hidden): tile-aligned, ragged in every dimension (M, N, K of 128/128/64 tiles), one token.
SHAPES = [((2, 64), 64, 256), ((3, 43), 48, 200), ((1, 1), 96, 130)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # atol = rtol, on outputs and gradients of magnitude ~1-50


def unfused(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, slope: float = 0.5) -> torch.Tensor:
    h = F.leaky_relu(F.linear(x, w1), slope)
    return F.linear(h * h, w2)


def mlp_inputs(lead: tuple, d: int, hidden: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g)
    w1 = torch.randn(hidden, d, generator=g) / d ** 0.5
    w2 = torch.randn(d, hidden, generator=g) / hidden ** 0.5
    return [t.to(dtype) for t in (x, w1, w2)], torch.randn(*lead, d, generator=g).to(dtype)


def outputs_and_grads(fn, inputs, dy):
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach(), *(t.grad for t in leaves)]


def max_rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((a.float() - b.float()).abs() / (b.float().abs() + 1)).max().item() for a, b in zip(got, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_op_equals_the_unfused_mlp_forward_and_backward(shape, dtype):
    """Measured on the CPU formula: 0 in both dtypes (the same ops in the same order)."""
    inputs, dy = mlp_inputs(*shape, dtype, seed=1)
    op = tg.fused_leaky_relu2_mlp()
    got = outputs_and_grads(lambda x, w1, w2: op(x, w1, w2, 0.5), inputs, dy)
    ref = outputs_and_grads(unfused, inputs, dy)
    assert got[0].shape == ref[0].shape and all(a.dtype == dtype for a in got)
    assert max_rel_err(got, ref) <= TOL[dtype]
    # The check can fail: a slope of 0.01 (plain leaky_relu's default) instead of 0.5.
    mutant = outputs_and_grads(lambda x, w1, w2: op(x, w1, w2, 0.01), inputs, dy)
    assert max_rel_err(mutant, ref) > 10 * TOL[torch.bfloat16]


@pytest.mark.slow
def test_fused_op_under_torch_compile():
    inputs, dy = mlp_inputs((3, 43), 48, 200, torch.float32, seed=2)
    op = tg.fused_leaky_relu2_mlp()
    compiled = torch.compile(lambda x, w1, w2: op(x, w1, w2, 0.5), backend="aot_eager", fullgraph=True)
    got = outputs_and_grads(compiled, inputs, dy)
    assert max_rel_err(got, outputs_and_grads(unfused, inputs, dy)) <= TOL[torch.float32]


def mlp_pair(mlp_act: str = "leaky_relu2", **kw) -> tuple[tg.MLP, tg.MLP]:
    cfg = dict(vocab_size=64, num_layers=1, model_dim=48, num_heads=4, num_kv_heads=2, mlp_mult=4.0,
               tie_embeddings=True, tied_embed_init_std=0.05, logit_softcap=30.0, rope_base=1e4, qk_gain_init=1.5,
               mlp_act=mlp_act, **kw)
    torch.manual_seed(0)
    plain = tg.MLP(tg.ModelConfig(**cfg))
    torch.nn.init.normal_(plain.proj.weight, std=0.05)  # away from its zero init
    fused = tg.MLP(tg.ModelConfig(**cfg, fused_mlp_enabled=True))
    fused.load_state_dict(plain.state_dict())
    assert plain._fused is None and fused._fused is tg.fused_leaky_relu2_mlp()
    return plain, fused


def run_mlp(mlp: tg.MLP, x: torch.Tensor, aux=None) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y = mlp(x, aux)
    y.square().sum().backward()
    return [y.detach(), x.grad, *(p.grad for p in mlp.parameters())]


def test_fused_mlp_module_equals_the_unfused_module():
    """The module's fused path against its unfused linears: outputs and gradients (to x and both weights) agree."""
    plain, fused = mlp_pair()
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(3))
    got, ref = run_mlp(fused, x), run_mlp(plain, x)
    assert len(got) == 4 and max_rel_err(got, ref) <= TOL[torch.float32]


def test_fused_mlp_with_the_ttt_adapter_and_frozen_weights():
    """TTT: the adapter runs beside the op from the MLP's input; the base weights are frozen, and the op's
    backward computes no weight gradients then (only x's, through which the adapters of lower layers train)."""
    plain, fused = mlp_pair()
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(2, 4, 48, generator=g) * 0.1).requires_grad_()
    b = (torch.randn(2, 48, 4, generator=g) * 0.1).requires_grad_()
    slot = tg.LoRASlot(*[None] * 4, mlp=(a, b, 1.0))
    x = torch.randn(2, 9, 48, generator=g)
    grads = []
    for m in (fused, plain):
        def lora_grads(m=m):
            xs = x.clone().requires_grad_()
            y = m(xs, tg.LayerAux(lora=slot))
            return [y.detach(), *torch.autograd.grad(y.square().sum(), [xs, a, b])]

        grads.append(tg.with_frozen(list(m.parameters()), lora_grads))
        assert all(p.grad is None for p in m.parameters())
    assert max_rel_err(grads[0], grads[1]) <= TOL[torch.float32]


def test_fused_mlp_during_calibration_takes_the_unfused_path_and_fills_the_hessians():
    plain, fused = mlp_pair()
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(5))
    for m in (plain, fused):
        m.fc.hessian, m.proj.hessian = torch.zeros(48, 48), torch.zeros(192, 192)
        with torch.no_grad():
            m(x)
    assert torch.equal(fused.fc.hessian, plain.fc.hessian) and fused.proj.hessian.abs().sum() > 0
    assert torch.equal(fused.proj.hessian, plain.proj.hessian)


def test_fused_mlp_knob_flows_to_the_model():
    h = tg.Hyperparameters.from_env({})
    assert h.fused_mlp_enabled and tg.ModelConfig.from_hparams(h).fused_mlp_enabled
    assert tg.Hyperparameters.from_env({"PRESET": "baseline"}).fused_mlp_enabled is False


def test_fused_mlp_with_relu2_is_slope_zero():
    """MLP_ACT=relu2 runs the same op at slope 0: relu(z)^2 forward, 2 relu(z) backward."""
    plain, fused = mlp_pair("relu2")
    assert fused.slope == 0.0
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(4))
    got, ref = run_mlp(fused, x), run_mlp(plain, x)
    assert max_rel_err(got, ref) <= TOL[torch.float32]
    leaky, _ = mlp_pair()  # the mutant: the record's slope on the same weights
    assert max_rel_err(run_mlp(leaky, x), ref) > 100 * TOL[torch.float32]


@pytest.mark.slow
def test_a_fused_mlp_model_compiles_with_the_op_never_called_before():
    """A fresh process: the op is defined in MLP.__init__, never first inside the compiled forward."""
    from test_compiled_flow import compile_model_fresh

    proc = compile_model_fresh("fused_mlp_enabled=True, mlp_act='leaky_relu2'", [])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# Triton 3.9's interpreter handles bfloat16 unlike the GPU twice: tl.dot multiplies the operands' raw uint16 bits
# (triton-lang/triton#11584, unsupported upstream), and fp32 -> bf16 casts truncate (the GPU rounds to nearest
# even). The shim below does what the GPU does (bf16 MMA with fp32 accumulation, RNE casts), so the kernel's bf16
# loads, masks, epilogue rounding and stores are still checked.
TRITON_CHECK = r"""
import sys, torch
import numpy as np
import torch.nn.functional as F
sys.path.insert(0, {root!r})
import triton.language as tl
from triton.runtime import interpreter as ti
import train_gpt as tg

dot = ti.InterpreterBuilder.create_dot
def create_dot(self, a, b, d, *args):
    up = lambda t: ti.TensorHandle(ti._convert_float(t.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                   tl.float32) if t.dtype.scalar == tl.bfloat16 else t
    return dot(self, up(a), up(b), d, *args)
ti.InterpreterBuilder.create_dot = create_dot
cast = ti.InterpreterBuilder.cast_impl
def cast_impl(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        bits = torch.from_numpy(np.asarray(src.data)).to(torch.bfloat16).view(torch.uint16).numpy()
        return ti.TensorHandle(bits, tl.bfloat16)
    return cast(self, src, dst_type)
ti.InterpreterBuilder.cast_impl = cast_impl

tol = {{torch.float32: 1e-5, torch.bfloat16: 1e-2}}
def err(got, ref):
    return ((got.float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()

cases = []
for dtype in (torch.float32, torch.bfloat16):
    for M, D, H in ((130, 96, 200), (128, 64, 128), (1, 32, 64)):  # ragged M, N and K; aligned; one token
        g = torch.Generator().manual_seed(M)
        x = torch.randn(M, D, generator=g).to(dtype)
        w1 = (torch.randn(H, D, generator=g) / D ** 0.5).to(dtype)
        w2 = (torch.randn(D, H, generator=g) / H ** 0.5).to(dtype)
        dy = torch.randn(D, M, generator=g).to(dtype).T  # a non-contiguous output gradient
        # The references in fp32 from the same inputs, rounded once as the kernel rounds.
        pre = (x.float() @ w1.float().T).to(dtype)
        post = (F.leaky_relu(pre.float(), 0.5) ** 2).to(dtype)
        dpre = tg.leaky_relu2_linear_reference(dy.float(), w2.float().T, 0.5, pre.float()).to(dtype)
        cases.append((dtype, x, w1, w2, dy, pre, post, dpre))
# Every reference first: torch's first CPU ops right after the interpreter has run were seen to come out wrong
# (test_gpu_speed_paths.py's fused CE check).
worst = {{}}
for dtype, x, w1, w2, dy, pre, post, dpre in cases:
    z, h = tg.leaky_relu2_linear_triton(x, w1, 0.5)
    d = tg.leaky_relu2_linear_triton(dy, w2.T, 0.5, pre)  # b = W2^T: strided, as the op's backward passes it
    assert z.dtype == h.dtype == d.dtype == dtype
    e = max(err(z, pre), err(h, post), err(d, dpre))
    worst[dtype] = max(worst.get(dtype, 0.0), e)
    assert e <= tol[dtype], (dtype, x.shape, w1.shape, e)
    # The check can fail: slope 0.01 instead of 0.5.
    assert max(err(tg.leaky_relu2_linear_triton(x, w1, 0.01)[1], post),
               err(tg.leaky_relu2_linear_triton(dy, w2.T, 0.01, pre), dpre)) > 10 * tol[torch.bfloat16]
# The whole op with the kernel in place of its CPU formula, against the unfused MLP's autograd.
ref_inputs = []
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(7)
    x, w1, w2 = (torch.randn(2, 65, 48, generator=g), torch.randn(200, 48, generator=g) / 7,
                 torch.randn(48, 200, generator=g) / 14)
    dy = torch.randn(2, 65, 48, generator=g)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w1, w2)]
    h = F.leaky_relu(F.linear(leaves[0], leaves[1]), 0.5)
    y = F.linear(h * h, leaves[2])
    y.backward(dy.to(dtype))
    ref_inputs.append((dtype, x, w1, w2, dy, [y.detach()] + [t.grad for t in leaves]))
calls = []
tg.leaky_relu2_linear_reference = lambda *a: calls.append(1) or tg.leaky_relu2_linear_triton(*a)
op = tg.fused_leaky_relu2_mlp()
for dtype, x, w1, w2, dy, ref in ref_inputs:
    leaves = [t.to(dtype).requires_grad_() for t in (x, w1, w2)]
    y = op(*leaves, 0.5)
    y.backward(dy.to(dtype))
    # Gradients of the weights are sums over 130 rows: error relative to each tensor's largest magnitude.
    e = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            for a, b in zip([y.detach()] + [t.grad for t in leaves], ref))
    worst[str(dtype) + " op"] = e
    assert e <= tol[dtype], (dtype, e)
assert len(calls) == 4, "the op ran the kernel forward and backward"
print("kernels ok", worst)
"""


@pytest.mark.skipif(not tg.importable("triton"), reason="triton is not installed (CUDA builds of torch ship it; the kernel "
                                              "is checked here with Triton's CPU interpreter when it is)")
@pytest.mark.slow
def test_fused_mlp_triton_kernel_equals_the_formula(tmp_path):
    """Triton's interpreter must be on before triton is imported, hence a fresh process."""
    script = tmp_path / "check.py"
    script.write_text(TRITON_CHECK.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and "kernels ok" in proc.stdout, proc.stderr[-3000:]
    print(proc.stdout)
