"""CPU stand-in for flash-attn-4's `flash_attn/cute/interface.py`, for tests only.

Mirrors upstream Dao-AILab/flash-attention at commit 0251105a (2026-08-15; package flash-attn-4 4.0.0b27) in what
this project calls and what torch.compile sees:
- `_flash_attn_fwd(q, k, v, ..., causal=..., return_lse=...)` is a plain Python function (upstream launches
  CuTe kernels from it) returning FOUR values, `(out, lse, p, row_max)`, as it has since 4.0.0b19 (`p` and
  `row_max` are None unless requested); `lse` is (B, H, T) in fp32, or None without `return_lse`;
- `_flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, ...)` returns
  `(dq, dk, dv)`;
- `flash_attn_func` goes through `FlashAttnFunc`, a torch.autograd.Function returning `(out, lse)`.
Argument lists are cut to what the project passes; the math is a dense causal softmax on the CPU.
"""
from __future__ import annotations

from typing import Optional

import torch


def _scores(q, k, softmax_scale, causal):
    B, T, H, D = q.shape
    kr = k.float().repeat_interleave(H // k.size(2), dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), kr) * softmax_scale
    if causal:
        s = s.masked_fill(torch.ones(T, k.size(1), dtype=torch.bool).triu(1), float("-inf"))
    return s


def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qv: Optional[torch.Tensor] = None,
                    cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None,
                    max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale: Optional[float] = None,
                    causal: bool = False, softcap: Optional[float] = None, window_size_left=None,
                    window_size_right=None, learnable_sink=None, return_lse: bool = False, out=None, lse=None):
    assert cu_seqlens_q is None and qv is None and not softcap, "the stand-in covers dense causal attention only"
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    s = _scores(q, k, scale, causal)
    vr = v.float().repeat_interleave(q.size(2) // v.size(2), dim=2)
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), vr).to(q.dtype).contiguous()  # upstream: torch.empty
    return o, (torch.logsumexp(s, -1).contiguous() if return_lse else None), None, None


def _flash_attn_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                    lse: torch.Tensor, softmax_scale: Optional[float] = None, causal: bool = False,
                    softcap: float = 0.0, window_size_left=None, window_size_right=None, m_block_size: int = 64,
                    n_block_size: int = 128, num_threads: int = 256, pack_gqa: bool = False, deterministic=False,
                    dq=None, dk=None, dv=None, dlse=None, learnable_sink=None):
    H, g = q.size(2), q.size(2) // k.size(2)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    p = torch.exp(_scores(q, k, scale, causal) - lse[..., None])  # from the saved log-sum-exp, as the kernel
    do, vr = dout.float(), v.float().repeat_interleave(g, dim=2)
    ds = p * (torch.einsum("bthd,bshd->bhts", do, vr) - (do * out.float()).sum(-1).transpose(1, 2)[..., None])
    kr = k.float().repeat_interleave(g, dim=2)
    dq_ = torch.einsum("bhts,bshd->bthd", ds, kr) * scale
    dk_ = torch.einsum("bhts,bthd->bshd", ds, q.float()) * scale
    dv_ = torch.einsum("bhts,bthd->bshd", p, do)
    fold = lambda t: t.unflatten(2, (H // g, g)).sum(3)  # noqa: E731  (GQA: a kv head's query heads summed)
    return tuple(t.to(like.dtype).contiguous() for t, like in ((dq_, q), (fold(dk_), k), (fold(dv_), v)))


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale=None, causal=False, return_lse=False):
        out, lse, p, row_max = _flash_attn_fwd(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, ctx.softmax_scale, ctx.causal)
        return dq, dk, dv, None, None, None


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False):
    return FlashAttnFunc.apply(q, k, v, softmax_scale, causal, return_lse)


def flash_attn_varlen_func(*args, **kwargs):
    raise NotImplementedError("the stand-in covers dense causal attention only")
