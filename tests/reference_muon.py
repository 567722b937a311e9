"""The per-matrix reference Muon that train_gpt.py's batched, sharded Muon is tested (and benchmarked) against.

ReferenceMuon updates one matrix at a time: matrix i is computed on rank i % W, the updates travel in one
all-reduce of a flat buffer, and the gradients are expected to be averaged over ranks already (the
DDP-era records' scheme, which the batched Muon replaced). It shares only the Newton-Schulz iteration and
the MuonEq-R row normalization with train_gpt.py (tests/test_optim.py checks those against their formulas),
none of the bucketing, stacking, sharding or compiled graphs it is compared with.

ReferenceOptimizers is train_gpt.Optimizers with ReferenceMuon for the matrices and the reference step:
average every gradient with one all-reduce, clip with torch's clip_grad_norm_, then Muon and AdamW.

momentum_buffer(opt, p) reads p's momentum from either Muon's state; owned(opt, b) lists train_gpt.Muon's
matrices of bucket b that this rank updates.
"""

from __future__ import annotations

import math

import torch

import train_gpt as tg


class ReferenceMuon(torch.optim.Optimizer):
    """Muon one matrix at a time (same hyperparameters and param-group keys as train_gpt.Muon)."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, ns: tg.NewtonSchulz,
                 world: tuple[int, int] = (0, 1)):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=ns.steps, weight_decay=weight_decay,
                                      ns_coeffs=ns.coeffs, row_normalize=ns.row_norm))
        (self.rank, self.world_size), self.ns_dtype = world, ns.dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            ns_dtype = tg.resolve_ns_dtype(self.ns_dtype, params[0].device)
            total = sum(p.numel() for p in params)
            flat = torch.zeros(total, dtype=ns_dtype, device=params[0].device)
            offset = 0
            for i, p in enumerate(params):
                n = p.numel()
                if i % self.world_size == self.rank:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.mul_(mu).add_(p.grad)
                    update = p.grad.add(buf, alpha=mu)  # Nesterov
                    if group["row_normalize"]:
                        update = tg.row_normalize(update)
                    X = tg.newton_schulz(update, group["backend_steps"], ns_dtype, group["ns_coeffs"])
                    X = X * math.sqrt(max(1.0, p.size(0) / p.size(1)))
                    flat[offset: offset + n] = X.reshape(-1)
                offset += n
            if self.world_size > 1:
                tg.all_reduce_(flat)
            offset = 0
            for p in params:
                n = p.numel()
                p.mul_(1.0 - lr * wd)
                p.add_(flat[offset: offset + n].view_as(p).to(p.dtype), alpha=-lr)
                offset += n


class ReferenceOptimizers(tg.Optimizers):
    """train_gpt.Optimizers (same groups, AdamW and schedule) with ReferenceMuon and the reference step."""

    def __init__(self, model: torch.nn.Module, h: tg.Hyperparameters, rank: int = 0, world_size: int = 1):
        super().__init__(model, h, rank, world_size)
        matrices = [p for group in self.muon.param_groups for p in group["params"]]
        ns = tg.NewtonSchulz(h.muon_backend_steps, h.muon_ns, h.muon_row_normalize, h.muon_ns_dtype)
        self.muon = ReferenceMuon(matrices, lr=h.matrix_lr, momentum=h.muon_momentum, weight_decay=h.muon_wd, ns=ns,
                                  world=(rank, world_size))

    @torch.no_grad()
    def step(self, timer: tg.StepTimer | None = None) -> None:
        mark = timer.mark if timer is not None else (lambda phase: None)
        tg.sync_gradients(self.params, self.world_size)
        mark("comm")
        if self.h.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.h.grad_clip_norm)
        self.muon.step()
        self.adam.step()
        mark("optimizer")


def owned(opt: tg.Muon, b: int) -> list[torch.nn.Parameter]:
    """The matrices of bucket b whose update this rank computes (its share; may be short or empty)."""
    ps = opt.buckets[b][1]
    return ps[opt.rank * opt.share[b]: (opt.rank + 1) * opt.share[b]]


def momentum_buffer(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> torch.Tensor | None:
    """p's momentum, or None before the first step or when another rank owns p. train_gpt.Muon keeps one
    stacked buffer per bucket on its first matrix (the rank's share, in order); ReferenceMuon one per matrix."""
    if isinstance(opt, ReferenceMuon):
        return opt.state[p].get("momentum_buffer")
    for b, (_, ps) in enumerate(opt.buckets):
        for i, q in enumerate(owned(opt, b)):
            if q is p:
                buf = opt.state[ps[0]].get("momentum_buffer")
                return None if buf is None else buf[i]
    return None
