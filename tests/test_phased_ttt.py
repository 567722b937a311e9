"""Phased score-first LoRA TTT (TTT_ENABLED): per-document adapters, phases of global SGD.

Legality is tested by construction: a document's score must not change when any document scored after
it (a later batch or segment, or another row of its own batch) changes, and the checks are shown able
to fail: warm-started adapters and phase SGD do carry information forward to later documents. Scores,
scoring order and which chunks trained are observed by tests/scoring_trace.py's LoRATrace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import eval_ctx, tg
from scoring_trace import LoRATrace
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


def run(val: np.ndarray, phases: int = 2, warm: bool = True, budget: float = 1e9, prefix: int = 8, lines=None,
        lr: float = 1e-2, batch: int = 3):
    model = iso_model(doc_isolation=False, num_loops=0, parallel_mode="off")
    cfg = tg.LoRATTTConfig(rank=4, alpha=8.0, lr=lr, weight_decay=0.1, batch_docs=batch, chunk=8, warm_start_a=warm,
                           prefix_docs=prefix, phases=phases, seed=0)
    sgd = tg.TTTConfig(lr=1e-2, epochs=1, momentum=0.9, chunk_tokens=64, grad_clip=1.0)
    with pytest.MonkeyPatch.context() as mp:
        trace = LoRATrace(mp)
        r, info = tg.eval_ttt_lora(eval_ctx(model, val, fake_luts(96), SEQ), model, cfg, sgd, budget,
                                   (lines if lines is not None else []).append)
    return r, info, trace


def doc_scores(trace: LoRATrace) -> dict[tuple[int, int], float]:
    return trace.doc_nats()


def scoring_order(trace: LoRATrace) -> list[list[tuple[int, int]]]:
    """Batches in the order they were scored (a batch's documents are scored together)."""
    return trace.scoring_order()


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


def test_the_log_says_how_many_phases_were_set_planned_and_run():
    """A prefix of every document puts the last of 3 pauses after the last batch, where it would change no
    score: the log says 3 were set and why one is not planned, not just `2`."""
    lines: list[str] = []
    _, info, _ = run(doc_stream(LENGTHS, 0), phases=3, prefix=len(LENGTHS), lines=lines)
    assert (info["phases_set"], info["phases_planned"], info["phases_run"]) == (3, 2, 2)
    plan = [line for line in lines if line.startswith("ttt_phases:")]
    assert plan == ["ttt_phases:3 boundaries:4,9,14 pauses_planned:2 unplanned_after_last_batch:1"]


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
    for row in trace.rows:
        last_chunk[row.span] = (row.span[1] - row.span[0] - 1) // 8
        learnt.setdefault(row.span, []).append(row.learnt)
    assert len(learnt) == len(LENGTHS)
    for span, flags in learnt.items():
        assert flags == [c < last_chunk[span] for c in range(last_chunk[span] + 1)], span


def test_phase_sgd_trains_only_on_documents_already_scored(monkeypatch):
    """Each pause trains on documents every one of whose targets was scored before it; documents scored
    after the last pause are never trained on; every pause ends with new adapters."""
    val = doc_stream(LENGTHS, 0)
    scored: set[tuple[int, int]] = set()
    calls = []
    real_score, real_sgd = tg.score_lora_batch, tg.PhasedTTT.global_sgd

    def score(model, lora, ctx, docs, *a):
        out = real_score(model, lora, ctx, docs, *a)
        scored.update(docs)
        return out

    def sgd(self, doc_ids):
        calls.append(([self.docs[d] for d in doc_ids], set(scored), self.made))
        real_sgd(self, doc_ids)
        assert self.made == calls[-1][2] + 1  # new adapters after the pause

    monkeypatch.setattr(tg, "score_lora_batch", score)
    monkeypatch.setattr(tg.PhasedTTT, "global_sgd", sgd)
    _, info, _ = run(val)
    assert len(calls) == info["phases_run"] == 2
    assert [len(spans) for spans, _, _ in calls] == [4, 8]  # PHASED_TTT_PREFIX_DOCS 8 in 2 phases, cumulative
    for spans, before, _ in calls:
        assert set(spans) <= before
    assert len(scored) == len(LENGTHS) and not scored <= calls[-1][1]


def test_batches_pauses_and_ranks_follow_the_tops_rules():
    """PR #1855's order: length-sorted batches cut from the shortest, the longest batch first; pause k after
    the batch at which prefix*(k+1)/phases documents are scored, on the first that many in cut order."""
    lengths = np.array([5, 9, 2, 9, 7, 1, 3])
    batches = tg.lora_batches(lengths, 3)
    assert batches == [(1, [0, 4, 1]), (2, [3]), (0, [5, 2, 6])]  # cut [5,2,6] [0,4,1] [3]; equal longest: cut order
    assert tg.phase_bounds(7, 4, 2) == [2, 4] and tg.phase_bounds(7, 100, 2) == [3, 7] and tg.phase_bounds(7, 0, 3) == []
    sizes = [len(b) for _, b in batches]
    assert tg.ttt_schedule([9, 5, 4], sizes, [2, 4], 1) == ([[[0]], [[1]], [[2]]], [1, 2])
    assert tg.phase_documents(batches, 2, 4) == [0, 4, 1, 3] and tg.phase_documents(batches, 1, 2) == [0, 4]
    assert tg.ttt_schedule([9, 5, 4], sizes, [7], 1) == ([[[0, 1, 2]]], [])  # a pause after the last batch: none
    # two ranks: each claims the next batch when it comes free (the least loaded); a pause waits for the batch in
    # flight, so it follows 2 batches although the first finished reached its bound
    assert tg.ttt_schedule([9, 5, 4, 3, 1], [2] * 5, [], 2) == ([[[0, 3], [1, 2, 4]]], [])
    assert tg.ttt_schedule([9, 5, 4, 3, 1], [2] * 5, [2], 2) == ([[[0], [1]], [[2], [3, 4]]], [2])
    assert tg.ttt_schedule([1, 1], [1, 1], [], 3) == ([[[0], [1], []]], [])
    assert tg.ttt_documents(np.array([BOS, 5, 6, BOS, 7, BOS]), 5) == [(0, 3), (3, 5)]
    assert tg.ttt_documents(np.array([4, 5, BOS, 7, 8]), 4) == [(0, 2), (2, 4)]


@pytest.mark.parametrize("world", [2, 3, 8])
def test_at_any_world_size_the_ranks_score_every_document_once_and_pause_together(world, monkeypatch):
    """Each rank of `world` runs eval_ttt_lora alone (collectives stubbed): the ranks' batches cover every
    document exactly once, every rank trains the same documents at the same pauses (8 documents in 2 phases:
    4 then 8, cumulative), and the largest rank's share of the window tokens is within one batch of the mean."""
    val = doc_stream(LENGTHS, 0)
    monkeypatch.setattr(tg, "all_reduce_", lambda t, op="sum": t)
    monkeypatch.setattr(tg, "sync_gradients", lambda params, world_size, average=True: None)
    monkeypatch.setattr(tg, "result_from_sums", lambda sums, t0: None)  # a rank may hold no batch (8 ranks, 7)
    scored, pauses = [], []
    real_sgd = tg.PhasedTTT.global_sgd

    def sgd(self, doc_ids):
        pauses[-1].append(list(doc_ids))
        return real_sgd(self, doc_ids)

    monkeypatch.setattr(tg.PhasedTTT, "global_sgd", sgd)
    model = iso_model(doc_isolation=False, num_loops=0, parallel_mode="off")
    cfg = tg.LoRATTTConfig(rank=4, alpha=8.0, lr=1e-2, weight_decay=0.1, batch_docs=2, chunk=8, warm_start_a=True,
                           prefix_docs=8, phases=2, seed=0)
    sgd_cfg = tg.TTTConfig(lr=1e-2, epochs=1, momentum=0.9, chunk_tokens=64, grad_clip=1.0)
    for rank in range(world):
        pauses.append([])
        with pytest.MonkeyPatch.context() as mp:
            trace = LoRATrace(mp)
            tg.eval_ttt_lora(eval_ctx(model, val, fake_luts(96), SEQ, rank=rank, world_size=world), model, cfg,
                             sgd_cfg, 1e9, lambda line: None)
        scored += [row.span for row in trace.rows if row.chunk == 0]
    docs = tg.ttt_documents(val, len(val) - 1)
    assert sorted(scored) == sorted(docs)
    # the second pause comes at 8 documents scored unless the batches in flight at the first one leave none after
    # (8 ranks claim all 7 batches at once: nothing is scored after a pause, so none runs)
    assert all(p == pauses[0] for p in pauses) and [len(p) for p in pauses[0]] == {2: [4, 8], 3: [4], 8: []}[world]
    lengths = np.array([hi - lo for lo, hi in docs])
    batches = tg.lora_batches(lengths, 2)
    costs = [tg.LoRAWalk.plan(sorted((docs[d] for d in b), key=lambda s: s[0] - s[1]), 8, SEQ).cost()
             for _, b in batches]
    loads = [sum(costs[j] for j in share) for share in tg.ttt_schedule(costs, [2] * len(costs), [], world)[0][0]]
    assert max(loads) - sum(costs) / world <= max(costs)


def test_the_walk_ends_a_last_chunks_window_at_its_documents_end():
    """Documents of 20 and 13 targets, chunks of 8, windows of 10: chunk 1 of the short one (targets 8..12)
    is its last; its window ends at 13, not at the batch's chunk end 16."""
    walk = tg.LoRAWalk.plan([(100, 120), (0, 13)], 8, 10)
    assert walk.rows == [2, 2, 2] and walk.width == [8, 10, 10]  # chunk 2: one document left, still 2 rows
    assert walk.start[1].tolist() == [106, 3] and walk.col[1].tolist() == [2, 5] and walk.n[1].tolist() == [8, 5]
    assert walk.n[2].tolist() == [4, 0] and walk.learn.tolist() == [[True, True], [True, False], [False, False]]
    assert walk.cost() == 2 * 8 + 2 * 10 + 2 * 10
    one = tg.LoRAWalk.plan([(5, 6)], 8, 10)  # one document of one target: a padding row, a window of 3
    assert one.rows == [2] and one.width == [3] and one.n.tolist() == [[1, 0]] and not one.learn.any()


def test_rows_run_in_groups_give_the_same_scores_and_updates(monkeypatch):
    """A chunk's rows in groups (the memory bound on CUDA: lora_rows_per_forward) take the same AdamW step, so
    every document scores as with the whole batch in one forward; groups keep at least 2 rows."""
    assert tg.row_groups(7, 2) == [(0, 2), (2, 4), (4, 7)] and tg.row_groups(5, 64) == [(0, 5)]
    assert tg.row_groups(2, 1) == [(0, 2)] and all(b - a >= 2 for a, b in tg.row_groups(9, 1))
    val = doc_stream(LENGTHS, 0)
    _, _, whole = run(val, batch=7)
    groups = []
    monkeypatch.setattr(tg, "lora_rows_per_forward", lambda ctx, model, lora, cfg: (2, 0.0))
    real = tg.row_groups
    monkeypatch.setattr(tg, "row_groups", lambda k, group: groups.append(real(k, group)) or groups[-1])
    _, _, grouped = run(val, batch=7)
    assert max(len(g) for g in groups) == 3  # 7 rows in 3 forwards
    before, after = doc_scores(whole), doc_scores(grouped)
    assert before.keys() == after.keys() and all(after[s] == pytest.approx(v, abs=1e-5) for s, v in before.items())


def test_past_the_budget_adapters_step_down_and_every_target_is_still_scored():
    """Budget 0: after the first batch LoRA steps every 2nd chunk, after the second none, and no phase runs;
    every target is still scored, and from the third batch on documents score as with TTT_LORA_LR 0."""
    val = doc_stream(LENGTHS, 0)
    lines: list[str] = []
    r, info, trace = run(val, budget=0.0, lines=lines)
    assert info["lora_steps_down"] == [("segment 1 batch 1", 2), ("segment 1 batch 2", 0)]
    assert info["phases_run"] == 0 and r.tokens == len(val) - 1
    assert [line.split()[0] for line in lines if line.startswith("ttt_degrade:")] == [
        "ttt_degrade:lora_every:2", "ttt_degrade:lora_off", "ttt_degrade:phases_off"]
    _, _, frozen = run(val, phases=0, lr=0.0)
    early = {span for b in scoring_order(trace)[:2] for span in b}
    later = {s: v for s, v in doc_scores(trace).items() if s not in early}
    assert later and all(v == pytest.approx(doc_scores(frozen)[s], abs=1e-9) for s, v in later.items())
    assert sum(1 for line in lines if line.startswith("ttt_phased:")) == info["segments"]


@pytest.mark.parametrize("every, steps", [(1, 4), (2, 2), (0, 0)])
def test_the_guards_steps_take_a_lora_step_every_chunk_every_second_or_none(every, steps):
    """Two documents of 40 targets in chunks of 8: 5 chunks, the last never trained on."""
    model = iso_model(doc_isolation=False, num_loops=0, parallel_mode="off")
    cfg = tg.LoRATTTConfig(rank=4, alpha=8.0, lr=1e-2, weight_decay=0.1, batch_docs=2, chunk=8, warm_start_a=True,
                           prefix_docs=0, phases=0, seed=0)
    ctx = eval_ctx(model, doc_stream([40, 40], 3), fake_luts(96), SEQ)
    made = []
    opt_step = torch.optim.AdamW.step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: made.append(1) or opt_step(self, *a, **k))
        tg.score_lora_batch(model, tg.DocLoRA(model, 2, 4, 8.0, 0), ctx, [(0, 40), (40, 80)], cfg, every)
    assert len(made) == steps


def test_every_ttt_knob_is_read_from_the_environment_when_rescoring_an_artifact():
    """EVAL_ONLY takes model knobs from the artifact, evaluation knobs from the environment: a TTT knob
    taken from the artifact would silently re-score with the training run's (usually off) TTT."""
    ttt = {n for n in tg.Hyperparameters.knob_names() if n.startswith(("TTT_", "PHASED_TTT_", "GLOBAL_TTT_"))}
    assert len(ttt) >= 15 and {n.lower() for n in ttt} <= tg.EVAL_ONLY_ENV_KNOBS
