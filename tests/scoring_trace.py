"""What the evaluations score and what TTT trains on, observed from outside train_gpt.py for the coverage and
score-before-update tests: recorders install wrappers with a MonkeyPatch (module-level functions and class
attributes are looked up at call time, so a wrapper sees every call) and read the facts off the calls.

Which targets a scoring forward counted is read off autograd: while a recorder scores, EvalContext.target_bytes
returns the targets' bytes as a float64 leaf, so the gradient of the byte total (sums[2]) with respect to it is
the mask the scoring applied (the nats and the target count share that mask), and its `pos` argument names each
target's stream position.

- WindowTrace: score_windows (the plain and sliding evaluations): per scoring forward, the targets it counted.
- LoRATrace: score_lora_batch (phased LoRA TTT): per batch, chunk and document, the nats it scored and whether
  that chunk's loss reached the document's adapters (a nonzero gradient in the step's backward).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import tg


class ScoredMasks:
    """EvalContext.target_bytes wrapped: inside `score`, every call's (target positions, bytes leaf)."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.calls: list | None = None
        real = tg.EvalContext.target_bytes

        def target_bytes(ctx, x, y, pos):
            n_bytes = real(ctx, x, y, pos)
            if self.calls is None:
                return n_bytes
            leaf = n_bytes.detach().to(torch.float64, copy=True).requires_grad_()
            self.calls.append((pos, leaf))
            return leaf

        mp.setattr(tg.EvalContext, "target_bytes", target_bytes)

    def score(self, fn, *args, **kwargs) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """fn's (nats, targets, bytes) sums, detached, and per scoring forward (target positions, counted mask)."""
        self.calls = []
        try:
            sums = fn(*args, **kwargs)
        finally:
            calls, self.calls = self.calls, None
        if not calls:
            return sums, []
        grads = torch.autograd.grad(sums[2], [leaf for _, leaf in calls])
        return sums.detach(), [(pos, g != 0) for (pos, _), g in zip(calls, grads)]


class WindowTrace:
    """`batches`: per score_windows forward, in order, the target indices it counted. score_windows runs under
    enable_grad here (its callers' no_grad would hide the mask); its sums are returned detached."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.batches: list[np.ndarray] = []
        masks = ScoredMasks(mp)
        score = tg.score_windows

        def score_windows(ctx, starts, first):
            with torch.enable_grad():
                sums, forwards = masks.score(score, ctx, starts, first)
            self.batches += [pos[mask].cpu().numpy() for pos, mask in forwards]
            return sums

        mp.setattr(tg, "score_windows", score_windows)

    def targets(self) -> np.ndarray:
        return np.concatenate(self.batches)


@dataclass(frozen=True)
class DocChunk:
    """One document's targets in one chunk of a LoRA batch."""
    batch: int  # the batch's place in this rank's scoring order
    chunk: int  # the document's chunk: its rows scored before, in this batch
    span: tuple[int, int]  # the document's [lo, hi) input positions (tg.ttt_documents)
    nats: float  # the nats its counted targets scored
    learnt: bool  # this chunk's loss reached its adapters (a nonzero gradient)


class LoRATrace:
    """`rows`: every (batch, chunk, document) score_lora_batch scored, in scoring order. A row's document is the
    batch's document that holds all its counted targets (asserted); its nats are tg.lora_nll's output under the
    mask; learnt is read off a gradient hook on that output."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.rows: list[DocChunk] = []
        self.batches = 0
        self.forwards: list | None = None
        masks = ScoredMasks(mp)
        score_batch, nll = tg.score_lora_batch, tg.lora_nll

        def lora_nll(*args, **kwargs):
            out = nll(*args, **kwargs)
            if self.forwards is not None:
                seen = [out.detach(), torch.zeros(out.shape[0], dtype=torch.bool)]
                self.forwards.append(seen)
                if out.requires_grad:
                    def hook(grad, seen=seen):
                        seen[1] = seen[1] | (grad != 0).any(1).cpu()
                    out.register_hook(hook)
            return out

        def score_lora_batch(model, lora, ctx, docs, *args, **kwargs):
            self.forwards = []
            try:
                sums, scored = masks.score(score_batch, model, lora, ctx, docs, *args, **kwargs)
            finally:
                forwards, self.forwards = self.forwards, None
            assert len(scored) == len(forwards), "one byte count per forward"
            chunks: Counter = Counter()
            for (pos, mask), (losses, learnt) in zip(scored, forwards):
                for r in np.flatnonzero(mask.any(1).cpu().numpy()):
                    t = pos[r][mask[r]]
                    span = [s for s in docs if s[0] < int(t.min()) and int(t.max()) <= s[1]]
                    assert len(span) == 1, f"a row's targets {t.tolist()} lie in one of the batch's documents"
                    nats = float((losses[r].double() * mask[r]).sum())
                    self.rows.append(DocChunk(self.batches, chunks[span[0]], span[0], nats, bool(learnt[r])))
                    chunks[span[0]] += 1
            self.batches += 1
            return sums

        mp.setattr(tg, "lora_nll", lora_nll)
        mp.setattr(tg, "score_lora_batch", score_lora_batch)

    def doc_nats(self) -> dict[tuple[int, int], float]:
        """Each document's nats over all its chunks."""
        nats: dict[tuple[int, int], float] = {}
        for row in self.rows:
            nats[row.span] = nats.get(row.span, 0.0) + row.nats
        return nats

    def scoring_order(self) -> list[list[tuple[int, int]]]:
        """Batches in the order they were scored, each its documents in row order (longest first)."""
        return [[row.span for row in self.rows if row.batch == b and row.chunk == 0] for b in range(self.batches)]
