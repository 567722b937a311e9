"""Phased score-first LoRA TTT (PHASED_TTT_ENABLED): per-document adapters, phases of global SGD.

Legality is tested by construction: a document's score must not change when any document scored after
it (a later batch or segment, or another row of its own batch) changes, and the checks are shown able
to fail: warm-started adapters and phase SGD do carry information forward to later documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import eval_ctx, tg
from test_doc_isolation import iso_model
from test_eval import fake_luts

BOS = tg.BOS_ID
SEQ = 32


def doc_stream(lengths: list[int], seed: int) -> np.ndarray:
    """BOS + tokens per document, plus one final BOS so the last document's last target exists."""
    rng = np.random.default_rng(seed)
    parts = [np.concatenate(([BOS], rng.integers(2, 96, n - 1))) for n in lengths] + [np.array([BOS])]
    return np.concatenate(parts).astype(np.uint16)


LENGTHS = [24, 9, 40, 17, 31, 12, 8, 18, 36, 21, 14, 8, 27, 11]


def run(val: np.ndarray, phases: int = 2, warm: bool = True, budget: float = 1e9, prefix: int = 8, lines=None):
    model = iso_model(doc_isolation=False, num_loops=0, parallel_mode="off")
    cfg = tg.LoRATTTConfig(rank=4, alpha=8.0, lr=1e-2, weight_decay=0.1, batch_docs=3, chunk=8, warm_start_a=warm,
                           prefix_docs=prefix, phases=phases, seed=0)
    sgd = tg.TTTConfig(lr=1e-2, epochs=1, momentum=0.9, chunk_tokens=64, grad_clip=1.0)
    trace: list = []
    r, info = tg.eval_ttt_lora(eval_ctx(model, val, fake_luts(96), SEQ), model, cfg, sgd, budget,
                               (lines if lines is not None else []).append, trace)
    return r, info, trace


def doc_scores(trace) -> dict[tuple[int, int], float]:
    scores: dict[tuple[int, int], float] = {}
    for _, docs, _ in trace:
        for span, nats in docs:
            scores[span] = scores.get(span, 0.0) + nats
    return scores


def scoring_order(trace) -> list[list[tuple[int, int]]]:
    """Batches in the order they were scored (a batch's documents are scored together)."""
    batches: list[list[tuple[int, int]]] = []
    for chunk, docs, _ in trace:
        if chunk == 0:
            batches.append([span for span, _ in docs])
    return batches


def rewrite(val: np.ndarray, spans, seed: int) -> np.ndarray:
    """New tokens for the given documents, same lengths and BOS positions."""
    out = val.copy()
    rng = np.random.default_rng(seed)
    for lo, hi in spans:
        out[lo + 1: hi] = rng.integers(2, 96, hi - lo - 1)
    return out


def test_every_target_is_scored_once_with_the_plain_evals_bytes():
    val = doc_stream(LENGTHS, 0)
    r, info, _ = run(val)
    plain = tg.eval_windows(eval_ctx(iso_model(doc_isolation=False), val, fake_luts(96), SEQ), SEQ)
    assert (r.tokens, r.bytes) == (plain.tokens, plain.bytes) == (len(val) - 1, plain.bytes)
    assert info["documents"] == len(LENGTHS) and info["phases_run"] == 2 and info["segments"] == 3


@pytest.mark.parametrize("target", [1, 4])
def test_a_documents_score_ignores_every_document_scored_after_it_or_beside_it(target):
    val = doc_stream(LENGTHS, 0)
    _, _, trace = run(val)
    batches = scoring_order(trace)
    mine = batches[target]
    doc = mine[0]
    later = [s for b in batches[target + 1:] for s in b] + mine[1:]
    before = doc_scores(trace)
    _, _, trace2 = run(rewrite(val, later, seed=7))
    after = doc_scores(trace2)
    for span in [s for b in batches[:target] for s in b] + [doc]:
        assert after[span] == pytest.approx(before[span], abs=1e-9, rel=1e-9), span
    assert any(abs(after[s] - before[s]) > 1e-6 for s in later), "the rewrite changed nothing"


def test_earlier_documents_do_reach_later_scores_through_warm_a_and_phases():
    """The check above can fail: what was learnt from earlier documents changes later scores."""
    val = doc_stream(LENGTHS, 0)
    _, _, trace = run(val)
    batches = scoring_order(trace)
    first = batches[0]
    _, _, trace2 = run(rewrite(val, first, seed=9))
    before, after = doc_scores(trace), doc_scores(trace2)
    assert any(abs(after[s] - before[s]) > 1e-7 for b in batches[1:] for s in b)


def test_each_documents_last_chunk_is_never_trained_on():
    val = doc_stream(LENGTHS, 0)
    _, _, trace = run(val)
    last_chunk = {}
    learnt: dict[tuple[int, int], list[bool]] = {}
    for chunk, docs, learn in trace:
        for r, (span, _) in enumerate(docs):
            last_chunk[span] = (span[1] - span[0] - 1) // 8
            learnt.setdefault(span, []).append(bool(learn[r]))
    for span, flags in learnt.items():
        assert flags == [c < last_chunk[span] for c in range(len(flags))], span


def test_phase_sgd_trains_only_on_documents_already_scored(monkeypatch):
    val = doc_stream(LENGTHS, 0)
    scored_through = {"hi": 0}
    calls = []
    real_score = tg.score_lora_batch

    def score(model, lora, ctx, docs, *a):
        scored_through["hi"] = max([scored_through["hi"]] + [hi for _, hi in docs])
        return real_score(model, lora, ctx, docs, *a)

    real_train = tg.ttt_train_chunk

    def train(ctx, params, opt, lo, hi, *a):
        calls.append((lo, hi, scored_through["hi"]))
        return real_train(ctx, params, opt, lo, hi, *a)

    monkeypatch.setattr(tg, "score_lora_batch", score)
    monkeypatch.setattr(tg, "ttt_train_chunk", train)
    _, info, _ = run(val)
    assert calls and info["phases_run"] == 2
    # trains on tokens[lo:hi+1]: every target up to hi was scored before (documents are scored in full)
    assert all(hi <= through for _, hi, through in calls), calls
    assert max(hi for _, hi, _ in calls) < len(val) - 1  # the last segment is never trained on


def test_segments_split_the_prefix_into_phases_then_the_rest():
    assert tg.phase_segments(10, 6, 3) == [(0, 2), (2, 4), (4, 6), (6, 10)]
    assert tg.phase_segments(10, 0, 3) == [(0, 10)]
    assert tg.phase_segments(4, 2500, 3) == [(0, 1), (1, 2), (2, 4)]
    assert tg.phase_segments(5, 8, 0) == [(0, 5)]
    assert tg.ttt_documents(np.array([BOS, 5, 6, BOS, 7, BOS]), 5) == [(0, 3), (3, 5)]
    assert tg.ttt_documents(np.array([4, 5, BOS, 7, 8]), 4) == [(0, 2), (2, 4)]


def test_past_the_budget_adapters_stop_training_and_every_target_is_still_scored():
    val = doc_stream(LENGTHS, 0)
    lines: list[str] = []
    r, info, trace = run(val, budget=0.0, lines=lines)
    assert info["lora_stopped_at_segment"] == 0 and info["phases_run"] == 0
    assert r.tokens == len(val) - 1
    assert any(line.startswith("ttt_degrade:lora_and_phases_off") for line in lines)
    assert sum(1 for line in lines if line.startswith("ttt_phased:")) == info["segments"]


def test_phased_ttt_needs_ttt_enabled():
    with pytest.raises(tg.ConfigError, match="PHASED_TTT_ENABLED=1 is not allowed with TTT_ENABLED=0"):
        tg.Hyperparameters.from_env({"PRESET": "smoke", "PHASED_TTT_ENABLED": "1", "TTT_ENABLED": "0"})


def test_every_ttt_knob_is_read_from_the_environment_when_rescoring_an_artifact():
    """EVAL_ONLY takes model knobs from the artifact, evaluation knobs from the environment: a TTT knob
    taken from the artifact would silently re-score with the training run's (usually off) TTT."""
    ttt = {n for n in tg.Hyperparameters.knob_names() if n.startswith(("TTT_", "PHASED_TTT_", "GLOBAL_TTT_"))}
    assert len(ttt) >= 17 and {n.lower() for n in ttt} <= tg.EVAL_ONLY_ENV_KNOBS
