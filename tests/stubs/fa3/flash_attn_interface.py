"""CPU stand-in for FlashAttention 3's Python interface, for tests only.

Mirrors upstream `hopper/flash_attn_interface.py` of Dao-AILab/flash-attention at commit 0251105a
(2026-08-15) in everything torch.compile sees:
- `_flash_attn_forward` is a torch.library custom op returning (out, softmax_lse, out_accum, softmax_lse_accum),
  with a registered fake of the same shapes (varlen: out (total_q, H, Dv), lse (H, total_q); dense: out
  (B, T, H, Dv), lse (B, H, T)) and its own autograd registration;
- `_flash_attn_backward` is a custom op mutating dq, dk, dv and returning softmax_d, whose fake has upstream's
  padded shape (varlen: (H, round_multiple(total_q + batch * kBlockM, kBlockM)), batch read from cu_seqlens_q);
- `flash_attn_func` / `flash_attn_varlen_func` go through `FlashAttnFunc` / `FlashAttnVarlenFunc`
  (torch.autograd.Function subclasses) and return `out` only unless return_attn_probs (upstream HEAD).
Upstream's argument lists are cut to what this project passes; the math is SDPA, one cu_seqlens sequence at a
time. Upstream imports its CUDA extension (`flash_attn_3._C`) at import; this file imports nothing extra.
"""
from __future__ import annotations

from typing import Optional

import torch

K_BLOCK_M = 128  # upstream's kBlockM for head dims <= 64 on sm90 (the fake's padding unit)


def round_multiple(x, m):
    return (x + m - 1) // m * m


def _segments(cu: Optional[torch.Tensor], batch: int, seqlen: int) -> list[tuple[int, int]]:
    if cu is None:
        return [(b * seqlen, (b + 1) * seqlen) for b in range(batch)]
    bounds = cu.tolist()
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _flat(t: torch.Tensor, varlen: bool) -> torch.Tensor:
    return t if varlen else t.flatten(0, 1)


@torch.library.custom_op("pgolf_test_fa3::_flash_attn_forward", mutates_args=())
def _flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                        max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                        softmax_scale: Optional[float] = None, causal: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens_q is not None
    assert not varlen or torch.equal(cu_seqlens_q, cu_seqlens_k), "self-attention: the same sequences for q and k"
    batch, seqlen = (1, 0) if varlen else q.shape[:2]
    qf, kf, vf = (_flat(t, varlen) for t in (q, k, v))
    out = torch.zeros(qf.shape[0], qf.shape[1], vf.shape[-1], dtype=q.dtype)
    lse = torch.zeros(qf.shape[1], qf.shape[0], dtype=torch.float32)
    for a, b in _segments(cu_seqlens_q, batch, seqlen):
        qs, ks, vs = (t[a:b].float().transpose(0, 1) for t in (qf, kf, vf))  # (H, L, D)
        g = qs.size(0) // ks.size(0)
        s = qs @ ks.repeat_interleave(g, 0).transpose(1, 2) * softmax_scale
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        lse[:, a:b] = torch.logsumexp(s, -1)
        out[a:b] = (torch.softmax(s, -1) @ vs.repeat_interleave(g, 0)).transpose(0, 1).to(q.dtype)
    if not varlen:
        out, lse = out.view(q.shape[0], seqlen, *out.shape[1:]), lse.view(-1, q.shape[0], seqlen).transpose(0, 1)
    return out, lse.contiguous(), torch.tensor([]), torch.tensor([])


@_flash_attn_forward.register_fake
def _(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
      causal=False):
    if cu_seqlens_q is not None:
        if max_seqlen_q is None:
            raise ValueError("max_seqlen_q must be provided if cu_seqlens_q is provided")
        total_q, num_heads, _ = q.shape
        out = torch.empty((total_q, num_heads, v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.empty((num_heads, total_q), dtype=torch.float32, device=q.device)
    else:
        batch, seqlen, num_heads, _ = q.shape
        out = torch.empty((batch, seqlen, num_heads, v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, num_heads, seqlen), dtype=torch.float32, device=q.device)
    return out, lse, torch.tensor([], device=q.device), torch.tensor([], device=q.device)


@torch.library.custom_op("pgolf_test_fa3::_flash_attn_backward", mutates_args=("dq", "dk", "dv"))
def _flash_attn_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         softmax_lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                         cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: Optional[int],
                         max_seqlen_k: Optional[int], dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                         softmax_scale: float, is_causal: bool) -> torch.Tensor:
    varlen = cu_seqlens_q is not None
    batch, seqlen = (1, 0) if varlen else q.shape[:2]
    qf, kf, vf, of, dof = (_flat(t, varlen) for t in (q, k, v, out, dout))
    dqf, dkf, dvf = (_flat(t, varlen) for t in (dq, dk, dv))
    lse = softmax_lse if varlen else softmax_lse.transpose(0, 1).flatten(1)
    for a, b in _segments(cu_seqlens_q, batch, seqlen):
        qs, ks, vs, o, do = (t[a:b].float().transpose(0, 1) for t in (qf, kf, vf, of, dof))
        g = qs.size(0) // ks.size(0)
        kr, vr = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        s = qs @ kr.transpose(1, 2) * softmax_scale
        if is_causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.exp(s - lse[:, a:b, None])  # the forward's log-sum-exp, as the kernel reads it
        ds = p * (do @ vr.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
        dqf[a:b] = (ds @ kr * softmax_scale).transpose(0, 1).to(dq.dtype)
        dkf[a:b] = (ds.transpose(1, 2) @ qs * softmax_scale).unflatten(0, (-1, g)).sum(1).transpose(0, 1).to(dk.dtype)
        dvf[a:b] = (p.transpose(1, 2) @ do).unflatten(0, (-1, g)).sum(1).transpose(0, 1).to(dv.dtype)
    total_q = qf.shape[0]
    n = batch if not varlen else cu_seqlens_q.shape[0] - 1
    return torch.zeros(q.shape[-2], round_multiple(total_q + n * K_BLOCK_M, K_BLOCK_M), dtype=torch.float32)


@_flash_attn_backward.register_fake
def _(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dq, dk, dv,
      softmax_scale, is_causal):
    if cu_seqlens_q is None:
        batch, seqlen = q.shape[:2]
        return torch.empty((batch, q.shape[-2], round_multiple(seqlen, K_BLOCK_M)), dtype=torch.float32,
                           device=q.device)
    batch = cu_seqlens_q.size(0) - 1  # data-dependent under the compiler, as upstream's fake reads it
    total_q = q.size(0)
    return torch.empty((q.shape[-2], round_multiple(total_q + batch * K_BLOCK_M, K_BLOCK_M)), dtype=torch.float32,
                       device=q.device)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, softmax_lse, _, _ = output
    ctx.save_for_backward(q, k, v, out, softmax_lse)
    ctx.softmax_scale, ctx.causal = inputs[-2], inputs[-1]


def _backward(ctx, dout, *grads):
    q, k, v, out, softmax_lse = ctx.saved_tensors
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attn_backward(dout, q, k, v, out, softmax_lse, None, None, None, None, dq, dk, dv, ctx.softmax_scale,
                         ctx.causal)
    return dq, dk, dv, *((None,) * 6)


_flash_attn_forward.register_autograd(_backward, setup_context=_setup_context)


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, return_softmax=False):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        out, softmax_lse, *rest = _flash_attn_forward(q, k, v, None, None, None, None, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, out, softmax_lse)
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        return (out, softmax_lse) if return_softmax else out

    @staticmethod
    def backward(ctx, dout, *args):
        q, k, v, out, softmax_lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(dout, q, k, v, out, softmax_lse, None, None, None, None, dq, dk, dv, ctx.softmax_scale,
                             ctx.causal)
        return dq, dk, dv, None, None, None


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                return_softmax=False):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        out, softmax_lse, *rest = _flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        return (out, softmax_lse) if return_softmax else out

    @staticmethod
    def backward(ctx, dout, *args):
        q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q,
                             ctx.max_seqlen_k, dq, dk, dv, ctx.softmax_scale, ctx.causal)
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), return_attn_probs=False):
    assert tuple(window_size) == (-1, -1), "the stand-in has no local (windowed) attention"
    return FlashAttnFunc.apply(q, k, v, softmax_scale, causal, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, window_size=(-1, -1), return_attn_probs=False):
    assert tuple(window_size) == (-1, -1), "the stand-in has no local (windowed) attention"
    return FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                     causal, return_attn_probs)

