"""PRESET=record's phased score-first LoRA TTT (eval_ttt_lora) against the leaderboard top's (PR #1855,
eval_val_ttt_phased), on the CPU in float32: the same weights (tests/top_harness.py's `pair`, looping on as both
evaluate), the same validation stream (synthetic documents of distinct lengths, BOS-separated, one stream), the
same knobs at a small size, world size 1. Compared per document: nats summed over its targets (also per chunk)
and its scored-target count.

Configuration. The top: its Hyperparameters defaults plus the README's TTT overrides (TTT_BETA2=0.99,
TTT_WEIGHT_DECAY=0.5, PHASED_TTT_NUM_PHASES=3, GLOBAL_TTT_MOMENTUM=0.9), scaled down: EVAL_SEQ_LEN =
TTT_EVAL_SEQ_LEN = 64, TTT_CHUNK_SIZE 16, TTT_LORA_RANK 8, TTT_BATCH_SIZE 8 (4 in the phased run),
GLOBAL_TTT_CHUNK_TOKENS 128, PHASED_TTT_PREFIX_DOCS 0 (phases off) or 12 of 24 documents; TTT_LORA_LR 3e-3 and
GLOBAL_TTT_LR 0.01 (30x and 10x the record's) so that a few 16-token chunks move the weights measurably. Ours:
Hyperparameters.from_env({"PRESET": "record", "COMPILE": "0", ...the same sizes...}); every other TTT knob at our
default, asserted equal to the top's (test_the_ttt_knobs_left_at_their_defaults_are_the_tops). The top's phases
are off with PHASED_TTT_PREFIX_DOCS=0 (its PHASED_TTT_NUM_PHASES is at least 1), ours the same way.

How the top is run: eval_val_ttt_phased(h, model, cpu, val_data, forward_ttt_train) as its main calls it, with
forward_ttt_train = its model's eager forward_ttt (its main passes torch.compile(dynamic=True) of the same call);
val_data a namespace with its ValidationData's fields (val_tokens, caseops_enabled False, val_bytes None, byte
tables: tests/test_eval.py's fake_luts). Its /tmp counters are keyed by a fresh RUN_ID and removed afterwards.
Its global SGD alone: train_val_ttt_global_sgd_distributed(h, cpu, None, model, tokens).

Patches to the top's script, only what cannot run on a CPU (on top of top_harness's: BOS_ID, its fused CE off, the
FA3 stand-in):
1. Every block's mlp.use_fused = False, on each model built for a run (`models`; discarded afterwards): its global
   SGD runs the model in training mode, where its MLP calls a Triton kernel (CUDA only); its own unfused branch is
   the same function (tests/test_top_parity_step.py). Its LoRA scoring runs in eval mode, where it is unused.
No other patch: its `torch.autocast(device_type="cuda", dtype=torch.bfloat16)` disables itself where CUDA is absent
(torch warns, filtered here), so everything runs in float32; AdamW(fused=True) has a CPU kernel; every
torch.distributed call is behind `dist.is_initialized()`; its `log` prints (captured by pytest).

Observation hooks on the top (each calls the original and changes nothing; undone after each run):
`_build_ttt_global_batches` and `_claim_next_batch` are wrapped to know which batch of documents is being scored;
`_accumulate_bpb` is wrapped to also call the original once per batch row with fresh accumulators (per-document
nats, targets and bytes by its own code); `train_val_ttt_global_sgd_distributed` is wrapped to record the tokens
each phase trains on.

Setup on both sides (not a CPU patch): LoRA's A. The top draws every A from torch's global RNG (per batch row), ours
from DocLoRA's generator seeded with SEED, so equal values exist only by copying: BatchedTTTLoRA.__init__ and
DocLoRA.__init__ are wrapped to set every adapter's A to the same values (`canonical_a`), every document row alike.
(Equal rows make the row a document lands in irrelevant; each side still carries or re-draws A as it does: the
top's re-draws, after a phase and for a batch of another size, become these values again.)

The count run (test-only): tg.lora_nll returns ones (and the phase SGD is skipped), so our per-document trace sums
the mask our scoring applies, i.e. each document's scored-target count.

Results (float32; nats are per-document sums over up to 128 targets of ~4.6 nats each):
- Agrees. LoRA TTT with phases off, 16 documents in 2 full batches of 8 (one-chunk documents, documents longer
  than EVAL_SEQ_LEN): every document's nats, chunk by chunk, equal the top's to NATS_ATOL (measured 5.7e-6 per
  document, 8.8e-6 per chunk), but for the last chunk of the 2 documents of difference 2; both O adapters read the
  attention's input (the top's: its block's normalized input n, what Q, K, V read). Both score each document's
  targets once (per-document counts equal, total tokens and bytes equal), the same batches in the same order with
  one adapter set. With a partial batch, the 8 documents scored from fresh adapters on both sides agree (but
  difference 2). The global SGD on the same tokens, for documents that never cross a 64-token boundary of a chunk,
  two phases through one PhasedTTT (a new SGD optimizer, momentum zero, for each phase on both sides): parameters
  equal to SGD_ATOL (measured 1.5e-8, moves of 1.5e-3); the top skips each phase's last chunk, ours trains it at
  the cosine's LR 0. Mutants: TTT_LORA_LR 4e-3 against 3e-3 moves documents by up to 1.6 nats; our O adapter fed
  the attention output y (what the output projection reads, as ours did before) by up to 1.40 (96 targets; 1.06
  on 128, 0.02 on 17; 0 for one-chunk documents); GLOBAL_TTT_LR x1.5 moves the parameters by 9.3e-4; one SGD
  optimizer kept across the two phases (momentum carried) by 1.4e-3.
- Difference 2, the last chunk's window: for a partial last chunk, the top ends the window at the document's end,
  ours at the batch's chunk end (the longest document's), so past EVAL_SEQ_LEN ours gives that chunk's targets
  fewer context tokens (here 10 and 1): 6.1e-3 and 2.0e-2 nats (documents of 70 and 111 targets).
- Difference 3, batches: the top sorts by length ascending, cuts batches of TTT_BATCH_SIZE from the shortest and
  scores the longest batch first, so its partial batch is the longest documents, scored first with a new adapter
  set (new A); ours cuts from the longest, so its partial batch is the shortest, scored last with A carried over:
  1.9e-3 to 0.10 nats on those. The same batches when the count is a multiple of TTT_BATCH_SIZE (distinct
  lengths).
- Global SGD. Difference 4: a document across a 64-token boundary of a chunk is cut there by ours (rows of
  EVAL_SEQ_LEN), by the top only every EVAL_SEQ_LEN tokens from its own start (_build_cu_seqlens): parameters
  differ by 1.3e-4. Difference 5: inside a document longer than 64, the top's SmearGate mixes the token before
  each 64-token cut into the next (it resets only at BOS), ours starts a row: 2.4e-5, 1.5e-8 with the SmearGates
  off.
- Difference 7, phases: the top's phase k starts once it has scored prefix*k/phases documents in its own order
  (longest batches first) and trains on every document scored so far (cumulative), in ascending length order,
  each with the next document's BOS (a doubled BOS between documents), and then builds new adapters (new A); ours
  splits the prefix in stream order, trains on that segment's stream only and keeps A. End to end, 24 documents,
  prefix 12 in 3 phases: 23 of 24 documents differ, by up to 0.74 nats (0.11 already on first chunks).
(Differences 1, ours' O adapter reading the attention output, and 6, ours keeping one SGD optimizer across phases,
are fixed in train_gpt.py; each is now a mutant above.)
The per-document check and the global SGD check each run mutants to show they can fail. Skipped, with the reason,
where the anchor folder is absent.
Runtime: ~32 s on 2 shared CPU cores (importing both scripts included), most of it the phased and LoRA runs.
"""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import eval_ctx, tg
from test_eval import fake_luts
from test_top_parity_step import counterparts
from top_harness import BOS, SKIP_WITHOUT_TOP, VOCAB, pair, top_hparams

pytestmark = [SKIP_WITHOUT_TOP, pytest.mark.filterwarnings("ignore:CUDA is not available")]

CPU = torch.device("cpu")
SEQ, CHUNK, RANK = 64, 16, 8
LORA_LR, GLOBAL_LR, SGD_CHUNK = 3e-3, 0.01, 128
# Per-document nats (sums over up to 128 targets, ~4.6 nats each): the two forwards order a few float32 reductions
# differently (top_harness.LOGIT_ATOL); measured 5.7e-6 (8.8e-6 per chunk), where the mutants move them by up to 1.6
# (TTT_LORA_LR 4e-3 against 3e-3) and 1.4 (our O adapter fed the attention output).
NATS_ATOL = 1e-4
# Parameters after the global SGD (float32): measured 1.5e-8, where the SGD moves them by up to 1.5e-3 (2.8e-3 on
# the long documents) and the mutants by 9.3e-4 (GLOBAL_TTT_LR x1.5) and 1.4e-3 (momentum kept across 2 phases).
SGD_ATOL = 1e-6

# 16 documents (targets per document: the length, the last one's one less), distinct lengths, 2 full batches of 8:
# one-chunk documents, documents longer than SEQ whose last chunk is full (80, 96, 128), and two whose last chunk is
# partial past SEQ (70, 111 targets) in the batch of the 128.
LORA_LENGTHS = [33, 80, 17, 49, 128, 9, 64, 25, 96, 41, 12, 57, 20, 70, 5, 112]
# 12 documents, batches of 8: a partial batch; the 4 shortest have 2 chunks or more.
PARTIAL_LENGTHS = [40, 23, 77, 19, 58, 31, 66, 27, 90, 35, 21, 48]
# 24 documents of distinct lengths 6..98 (a fixed shuffle), batches of 4, prefix 12 in 3 phases.
PHASED_LENGTHS = [int(n) for n in np.random.default_rng(5).permutation(np.arange(6, 102, 4))]


def stream(lengths: list[int], seed: int) -> np.ndarray:
    """BOS + (n - 1) tokens per document, in one stream (no trailing BOS: the top's _find_docs needs each document
    to have a target)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.concatenate(([BOS], rng.integers(2, VOCAB, n - 1))) for n in lengths]).astype(np.int64)


def doc_spans(val: np.ndarray) -> dict[int, int]:
    """Each document's start (its BOS) -> its target count (through the next BOS, or to the stream's end)."""
    starts = list(np.flatnonzero(val == BOS)) + [len(val) - 1]
    return {int(a): int(b - a) for a, b in itertools.pairwise(starts)}


# ---------------------------------------------------------------------------------------------------------------
# Setup shared by both sides
# ---------------------------------------------------------------------------------------------------------------

KINDS = ("q", "k", "v", "o", "mlp", "head")


def canonical_a(kind: str, slot: int, rank: int, n_in: int) -> torch.Tensor:
    """The A both sides get for one adapter (nn.Linear's init range, as both draw it)."""
    g = torch.Generator().manual_seed(1000 * KINDS.index(kind) + slot)
    bound = 1.0 / n_in ** 0.5
    return torch.empty(rank, n_in).uniform_(-bound, bound, generator=g)


def same_lora_a(mp: pytest.MonkeyPatch, top, made: dict[str, int]) -> None:
    """Both adapter sets start from canonical_a in every row; made counts the adapter sets each side builds."""
    top_init, our_init = top.BatchedTTTLoRA.__init__, tg.DocLoRA.__init__

    def top_wrapped(self, *args, **kwargs):
        top_init(self, *args, **kwargs)
        made["top"] += 1
        with torch.no_grad():
            self.lm_head_lora.A.copy_(canonical_a("head", 0, *self.lm_head_lora.A.shape[1:]))
            for kind, mods in (("q", self.q_loras), ("k", self.k_loras), ("v", self.v_loras),
                               ("o", self.o_loras), ("mlp", self.mlp_loras)):
                for s, m in enumerate(mods):
                    m.A.copy_(canonical_a(kind, s, *m.A.shape[1:]))

    def ours_wrapped(self, *args, **kwargs):
        our_init(self, *args, **kwargs)
        made["ours"] += 1
        with torch.no_grad():
            self.head[0].copy_(canonical_a("head", 0, *self.head[0].shape[1:]))
            for s, slot in enumerate(self.slots):
                for kind, adapter in zip(KINDS, slot):  # LoRASlot(q, k, v, o, mlp)
                    adapter[0].copy_(canonical_a(kind, s, *adapter[0].shape[1:]))

    mp.setattr(top.BatchedTTTLoRA, "__init__", top_wrapped)
    mp.setattr(tg.DocLoRA, "__init__", ours_wrapped)


def o_adapter_reads_attention_output(mp: pytest.MonkeyPatch) -> None:
    """Mutant of ours (as before the fix): the O adapter fed the attention output y (the input of self.proj,
    captured by a forward pre-hook during CausalSelfAttention.forward with adapters), not the attention's input x."""
    current: dict[str, tuple] = {}
    forward, delta = tg.CausalSelfAttention.forward, tg.lora_delta

    def attn_forward(self, x, cos, sin, v_first=None, aux=None):
        if aux is None or aux.lora is None:
            return forward(self, x, cos, sin, v_first, aux)

        def capture(module, args):
            current["o"] = (aux.lora.o, args[0])

        handle = self.proj.register_forward_pre_hook(capture)
        try:
            return forward(self, x, cos, sin, v_first, aux)
        finally:
            handle.remove()
            current.pop("o", None)

    def lora_delta(x, adapter):
        o = current.get("o")
        return delta(o[1] if o is not None and adapter is o[0] else x, adapter)

    mp.setattr(tg.CausalSelfAttention, "forward", attn_forward)
    mp.setattr(tg, "lora_delta", lora_delta)


def models(top, seed: int = 0):
    top_model, ours = pair(top, seed)
    top_model.looping_active = True  # its main: ttt_model.looping_active = True when NUM_LOOPS > 0
    ours.set_looping(True)
    for block in top_model.blocks:
        block.mlp.use_fused = False  # patch 1
    return top_model, ours


# ---------------------------------------------------------------------------------------------------------------
# Running both
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    nats: dict[int, list[float]] = field(default_factory=dict)  # document start -> nats of each of its chunks
    tokens: dict[int, int] = field(default_factory=dict)  # document start -> scored targets
    batches: list[list[int]] = field(default_factory=list)  # document starts of each batch, in scoring order
    sgd: list = field(default_factory=list)  # per phase: the top's token stream, our (first doc, end doc)
    made: int = 0  # adapter sets built
    loss: float = 0.0
    total_tokens: int = 0
    total_bytes: float = 0.0

    def doc_nats(self) -> dict[int, float]:
        return {d: sum(v) for d, v in self.nats.items()}


def top_h(top, batch: int, prefix: int, lr: float = LORA_LR) -> SimpleNamespace:
    return top_hparams(top, eval_seq_len=SEQ, ttt_eval_seq_len=SEQ, ttt_chunk_size=CHUNK, ttt_batch_size=batch,
                       ttt_lora_rank=RANK, ttt_lora_lr=lr, ttt_beta2=0.99, ttt_weight_decay=0.5,
                       phased_ttt_prefix_docs=prefix, phased_ttt_num_phases=3, global_ttt_momentum=0.9,
                       global_ttt_lr=GLOBAL_LR, global_ttt_chunk_tokens=SGD_CHUNK, rank=0, world_size=1,
                       run_id=f"pytest-ttt-{uuid.uuid4().hex}")


def our_h(batch: int, prefix: int, lr: float = LORA_LR, global_lr: float = GLOBAL_LR) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({
        "PRESET": "record", "COMPILE": "0", "EVAL_SEQ_LEN": str(SEQ), "TTT_CHUNK_SIZE": str(CHUNK),
        "TTT_BATCH_SIZE": str(batch), "TTT_LORA_RANK": str(RANK), "TTT_LORA_LR": str(lr),
        "PHASED_TTT_PREFIX_DOCS": str(prefix), "PHASED_TTT_NUM_PHASES": "3", "GLOBAL_TTT_LR": str(global_lr),
        "TTT_CHUNK_TOKENS": str(SGD_CHUNK)})


def run_top(top, val: np.ndarray, batch: int, prefix: int = 0) -> Run:
    top_model, _ = models(top)
    h = top_h(top, batch, prefix)
    luts = fake_luts(VOCAB)
    val_data = SimpleNamespace(val_tokens=torch.from_numpy(val), caseops_enabled=False, val_bytes=None,
                               base_bytes_lut=luts.base_bytes, has_leading_space_lut=luts.has_leading_space,
                               is_boundary_token_lut=luts.is_boundary)
    out, state, made = Run(), {}, {"top": 0, "ours": 0}
    build, claim, accumulate = top._build_ttt_global_batches, top._claim_next_batch, top._accumulate_bpb
    global_sgd = top.train_val_ttt_global_sgd_distributed

    def build_hook(*args, **kwargs):
        state["batches"] = build(*args, **kwargs)
        return state["batches"]

    def claim_hook(*args):
        state["queue_idx"] = claim(*args)
        if state["queue_idx"] < len(state["batches"]):
            out.batches.append([start for _, (start, _) in state["batches"][state["queue_idx"]][1]])
        return state["queue_idx"]

    def accumulate_hook(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *args, **kwargs):
        for b, start in enumerate(out.batches[-1]):  # the rows of the batch being scored, in its order
            if int(chunk_lens[b]) == 0:
                continue
            sums = [torch.zeros((), dtype=torch.float64) for _ in range(3)]  # loss, bytes, tokens
            accumulate(ptl[b:b + 1], x[b:b + 1], y[b:b + 1], chunk_offsets[b:b + 1], chunk_lens[b:b + 1], pos_idx,
                       *args[:3], *sums, y_bytes=None)
            out.nats.setdefault(start, []).append(sums[0].item())
            out.tokens[start] = out.tokens.get(start, 0) + int(sums[2].item())
            out.total_bytes += sums[1].item()
        return accumulate(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *args, **kwargs)

    def sgd_hook(h_, device, val_data_, model, tokens, *args, **kwargs):
        out.sgd.append(tokens.clone())
        return global_sgd(h_, device, val_data_, model, tokens, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        same_lora_a(mp, top, made)
        mp.setattr(top, "_build_ttt_global_batches", build_hook)
        mp.setattr(top, "_claim_next_batch", claim_hook)
        mp.setattr(top, "_accumulate_bpb", accumulate_hook)
        mp.setattr(top, "train_val_ttt_global_sgd_distributed", sgd_hook)
        try:
            out.loss, _ = top.eval_val_ttt_phased(h, top_model, CPU, val_data,
                                                  lambda x, y, lora: top_model.forward_ttt(x, y, lora=lora))
        finally:
            for name in ("ttt_counter_", "ttt_prefix_counter_", "ttt_pause_flag_"):
                try:
                    os.remove(f"/tmp/{name}{h.run_id}")
                except FileNotFoundError:
                    pass
    out.made, out.total_tokens = made["top"], sum(out.tokens.values())
    return out


def run_ours(top, val: np.ndarray, batch: int, prefix: int = 0, lr: float = LORA_LR, o_output: bool = False,
             count: bool = False) -> Run:
    """Our eval_ttt_lora as run_evaluations calls it. o_output: the O-adapter mutant; count: the count run."""
    _, ours = models(top)
    h = our_h(batch, prefix, lr)
    ctx = eval_ctx(ours, val, fake_luts(VOCAB), h.eval_seq_len, batch_seqs=h.eval_batch_seqs)
    out, trace, made = Run(), [], {"top": 0, "ours": 0}
    global_sgd = tg.PhasedTTT.global_sgd

    def sgd_hook(self, a, b):
        out.sgd.append((a, b))
        if not count:
            global_sgd(self, a, b)

    with pytest.MonkeyPatch.context() as mp:
        same_lora_a(mp, top, made)
        mp.setattr(tg.PhasedTTT, "global_sgd", sgd_hook)
        if o_output:
            o_adapter_reads_attention_output(mp)
        if count:
            mp.setattr(tg, "lora_nll", lambda model, lora, x, y, ctx: torch.ones(y.shape, requires_grad=True))
        r, _ = tg.eval_ttt_lora(ctx, ours, tg.LoRATTTConfig.from_hparams(h), tg.TTTConfig.global_phase(h), 1e9,
                                lambda line: None, trace)
    for c, docs, _ in trace:
        if c == 0:
            out.batches.append([lo for (lo, _), _ in docs])
        for (lo, _), nats in docs:
            out.nats.setdefault(lo, []).append(nats)
    out.made, out.loss, out.total_tokens, out.total_bytes = made["ours"], r.val_loss, r.tokens, r.bytes
    return out


def worst(a: dict[int, float], b: dict[int, float], docs=None) -> tuple[float, int]:
    """Largest |a - b| over documents (all of a's unless given) and the document's start."""
    return max((abs(a[d] - b[d]), d) for d in (docs if docs is not None else a))


# ---------------------------------------------------------------------------------------------------------------
# A. LoRA TTT, phases off
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora(top):
    val = stream(LORA_LENGTHS, 0)
    return SimpleNamespace(val=val, top=run_top(top, val, 8), ours=run_ours(top, val, 8),
                           count=run_ours(top, val, 8, count=True))


def shortened_last_chunk(val: np.ndarray, batches: list[list[int]]) -> set[int]:
    """Documents whose last chunk is partial and whose batch's chunk end is past SEQ: ours scores it in a window
    ending at that chunk end (the longest document's), the top in one ending at the document's end."""
    n = doc_spans(val)
    out = set()
    for batch in batches:
        longest = max(n[d] for d in batch)
        for d in batch:
            c = (n[d] - 1) // CHUNK
            end = min((c + 1) * CHUNK, longest)
            if n[d] < end and end > SEQ:
                out.add(d)
    return out


def test_the_ttt_knobs_left_at_their_defaults_are_the_tops(top):
    """Everything the two runs do not set explicitly: ours (PRESET=record) equals the top's (defaults + README)."""
    h, t = our_h(8, 0), top_h(top, 8, 0)
    assert (h.ttt_lora_alpha, h.ttt_warm_start_a) == (top.BatchedLinearLoRA._ALPHA, top.BatchedLinearLoRA._WARM_START_A)
    assert tg.TTT_LORA_BETAS == (t.ttt_beta1, t.ttt_beta2) and tg.TTT_LORA_EPS == 1e-10  # its eps is a literal
    assert (h.ttt_weight_decay, h.ttt_momentum, h.ttt_grad_clip, h.global_ttt_epochs, h.phased_ttt_num_phases) == (
        t.ttt_weight_decay, t.global_ttt_momentum, t.global_ttt_grad_clip, t.global_ttt_epochs, t.phased_ttt_num_phases)
    assert (t.ttt_optimizer, t.ttt_grad_steps, t.ttt_k_lora, t.ttt_mlp_lora, t.ttt_o_lora) == (
        "adam", 1, True, True, True)
    assert (t.global_ttt_warmup_chunks, t.val_doc_fraction, t.global_ttt_respect_doc_boundaries, h.doc_isolation) == (
        0, 1.0, True, True)
    assert t.global_ttt_batch_seqs >= SGD_CHUNK // SEQ  # one SGD step per chunk in the top, as ours


def test_lora_ttt_per_document_nats_equal_the_tops(lora):
    """Phases off, 2 full batches, ours as shipped (both O adapters read the attention's input): every document's
    nats equal the top's, chunk by chunk, except the last chunk of the documents of difference 2 (tested below)."""
    affected = shortened_last_chunk(lora.val, lora.ours.batches)
    assert len(affected) == 2
    compared = [d for d in doc_spans(lora.val) if d not in affected]
    spans = doc_spans(lora.val)
    assert {spans[d] > SEQ for d in compared} == {True, False} and min(spans[d] for d in compared) <= CHUNK
    assert sorted(lora.top.nats) == sorted(lora.ours.nats) == sorted(spans)
    err, _ = worst(lora.top.doc_nats(), lora.ours.doc_nats(), compared)
    assert err <= NATS_ATOL
    for d in compared:  # and chunk by chunk
        assert np.allclose(lora.top.nats[d], lora.ours.nats[d], rtol=0, atol=NATS_ATOL)
    for d in affected:  # every chunk but the last of the two others
        assert np.allclose(lora.top.nats[d][:-1], lora.ours.nats[d][:-1], rtol=0, atol=NATS_ATOL)


def test_every_document_scores_each_of_its_targets_once_in_both(lora):
    spans = doc_spans(lora.val)
    assert lora.top.tokens == lora.count.doc_nats() == spans
    assert lora.top.total_tokens == lora.ours.total_tokens == len(lora.val) - 1
    assert lora.top.total_bytes == lora.ours.total_bytes


def test_both_score_the_same_batches_in_the_same_order_with_one_adapter_set(lora):
    """Distinct lengths, a multiple of TTT_BATCH_SIZE documents: the same batches, longest first (rows in
    reverse order, irrelevant with equal A rows: the row a document takes carries its A to the same document in
    the next batch on both sides), one adapter set each (A warm from batch to batch)."""
    assert [sorted(b) for b in lora.top.batches] == [sorted(b) for b in lora.ours.batches]
    assert [b[::-1] for b in lora.top.batches] == lora.ours.batches
    assert lora.top.made == lora.ours.made == 1


def test_the_lora_check_fails_for_another_lora_lr(top, lora):
    """The mutant: ours at TTT_LORA_LR 4e-3 (the top at 3e-3)."""
    mutant = run_ours(top, lora.val, 8, lr=4e-3)
    affected = shortened_last_chunk(lora.val, lora.ours.batches)
    compared = [d for d in doc_spans(lora.val) if d not in affected]
    assert worst(lora.top.doc_nats(), mutant.doc_nats(), compared)[0] > 100 * NATS_ATOL


def test_the_lora_check_fails_for_an_o_adapter_reading_the_attention_output(top, lora):
    """The mutant: our O adapter fed the attention output y (what the output projection reads), as ours did before
    the fix; the first chunks (B = 0) still agree, the later ones do not."""
    mutant = run_ours(top, lora.val, 8, o_output=True)
    affected = shortened_last_chunk(lora.val, lora.ours.batches)
    compared = [d for d in doc_spans(lora.val) if d not in affected]
    assert worst(lora.top.doc_nats(), mutant.doc_nats(), compared)[0] > 100 * NATS_ATOL
    assert worst({d: v[0] for d, v in lora.top.nats.items()}, {d: v[0] for d, v in mutant.nats.items()})[0] <= NATS_ATOL


@pytest.mark.xfail(strict=True, reason="difference 2: a partial last chunk past EVAL_SEQ_LEN, in a batch with a "
                   "longer document, is scored by ours in the window ending at the batch's chunk end, by the top in "
                   "the window ending at the document's end: each target of that chunk sees 10 and 1 fewer context "
                   "tokens in ours for the documents of 70 and 111 targets (batch end 80 and 112); measured 6.1e-3 "
                   "and 2.0e-2 nats, their earlier chunks equal")
def test_a_partial_last_chunk_past_seq_len_is_scored_as_the_tops(lora):
    affected = shortened_last_chunk(lora.val, lora.ours.batches)
    assert worst(lora.top.doc_nats(), lora.ours.doc_nats(), affected)[0] <= NATS_ATOL


# ---------------------------------------------------------------------------------------------------------------
# B. A partial batch
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partial(top):
    val = stream(PARTIAL_LENGTHS, 1)
    return SimpleNamespace(val=val, top=run_top(top, val, 8), ours=run_ours(top, val, 8))


def test_the_partial_batch_is_the_tops_longest_documents_and_our_shortest(partial):
    """The rule of each side (difference 3): the top cuts batches from the shortest document and scores the
    longest batch first, so its partial batch is the 4 longest documents, scored first with a new adapter set;
    ours cuts from the longest, so its partial batch is the 4 shortest, scored last with the same adapters."""
    spans = doc_spans(partial.val)
    by_length = sorted(spans, key=lambda d: spans[d])
    assert partial.top.batches == [by_length[8:], by_length[:8]] and partial.top.made == 2
    assert partial.ours.batches == [by_length[4:][::-1], by_length[:4][::-1]] and partial.ours.made == 1


def test_with_a_partial_batch_the_documents_scored_from_fresh_adapters_in_both_agree(partial):
    """The 8 longest documents start from A as initialized on both sides (the top's new set and its reusable set,
    our first batch): equal, but for the 2 whose last chunk difference 2 shortens (in our first batch, with the
    90-target document). The 4 shortest take A from our first batch (warm) but a fresh A in the top."""
    spans = doc_spans(partial.val)
    affected = shortened_last_chunk(partial.val, partial.ours.batches)
    assert sorted(spans[d] for d in affected) == [66, 77]
    longest = [d for d in sorted(spans, key=lambda d: spans[d])[4:] if d not in affected]
    assert worst(partial.top.doc_nats(), partial.ours.doc_nats(), longest)[0] <= NATS_ATOL
    assert partial.top.tokens == spans and partial.top.total_tokens == partial.ours.total_tokens


@pytest.mark.xfail(strict=True, reason="difference 3: with 12 documents in batches of 8, the 4 shortest start from "
                   "A carried over from our first batch and from a new A in the top's; measured 1.9e-3 to 1.0e-1 nats "
                   "(their first chunks agree, B = 0)")
def test_with_a_partial_batch_per_document_nats_equal_the_tops(partial):
    assert worst(partial.top.doc_nats(), partial.ours.doc_nats())[0] <= NATS_ATOL


# ---------------------------------------------------------------------------------------------------------------
# C. The global SGD alone, on the same tokens
# ---------------------------------------------------------------------------------------------------------------

# Documents that never cross a 64-token boundary of a 128-token chunk (both cut at the same places).
ALIGNED = [64, 32, 32, 64, 64, 32, 32, 64, 32, 32, 64, 64, 33]
ALIGNED_LONG = [256, 256, 128, 193]  # long documents, each from a 64-boundary: only the SmearGate differs
UNALIGNED = [50, 20, 44, 40, 32, 17, 64, 60, 32, 32, 64, 28, 33]  # documents across 64-boundaries


def sgd_both(top, phases: list[list[int]], global_lr: float = GLOBAL_LR, smear: bool = True,
             keep_momentum: bool = False) -> tuple[float, float]:
    """Each phase's documents (lengths) trained on by the top's train_val_ttt_global_sgd_distributed (that phase's
    stream, from its first BOS through its last target) and by one PhasedTTT's global_sgd (the same documents of
    one stream), phase after phase, as eval_ttt_lora runs them. smear=False: both SmearGates off (ours then has no
    smear parameters; every other one is compared); keep_momentum: the mutant, our torch.optim.SGD patched during
    global_sgd to return its first phase's optimizer (momentum carried) again. Returns (max parameter error, max
    parameter move)."""
    val = stream([n for lengths in phases for n in lengths], 2)
    top_model, ours = models(top)
    mapping = counterparts(top_model, ours)
    if not smear:
        top_model.smear_gate_enabled, ours.smear = False, None
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    h, hh = top_h(top, 8, 0), our_h(8, 0, global_lr=global_lr)
    ctx = eval_ctx(ours, val, fake_luts(VOCAB), hh.eval_seq_len, batch_seqs=hh.eval_batch_seqs)
    docs = tg.ttt_documents(val, len(val) - 1)
    run = tg.PhasedTTT(ctx, ours, tg.LoRATTTConfig.from_hparams(hh), tg.TTTConfig.global_phase(hh), docs, None)
    sgd, made = torch.optim.SGD, []

    def one_sgd(*args, **kwargs):
        if not made:
            made.append(sgd(*args, **kwargs))
        return made[0]

    a = 0
    for lengths in phases:
        b = a + len(lengths)
        lo, hi = docs[a][0], docs[b - 1][1]
        top.train_val_ttt_global_sgd_distributed(h, CPU, None, top_model, torch.from_numpy(val[lo: hi + 1]))
        with pytest.MonkeyPatch.context() as mp:
            if keep_momentum:
                mp.setattr(torch.optim, "SGD", one_sgd)
            run.global_sgd(a, b)
        a = b
    assert len(made) == int(keep_momentum)
    top_params = dict(top_model.named_parameters())
    err = max((p.detach() - top_params[mapping[n][0]].detach()[mapping[n][1]]).abs().max().item()
              for n, p in ours.named_parameters())
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in ours.named_parameters())
    return err, moved


def test_global_sgd_on_the_same_tokens_equals_the_tops(top):
    """Two phases over documents that never cross a 64-token boundary, through one PhasedTTT (each phase with a new
    SGD optimizer, momentum zero, on both sides): equal parameters. The top skips each phase's last chunk; ours
    trains it at the cosine's LR 0 (no change)."""
    err, moved = sgd_both(top, [ALIGNED[:7], ALIGNED[7:]])
    assert err <= SGD_ATOL and moved > 1000 * SGD_ATOL


def test_the_global_sgd_check_fails_for_another_lr(top):
    err, _ = sgd_both(top, [ALIGNED], global_lr=1.5 * GLOBAL_LR)
    assert err > 100 * SGD_ATOL


def test_the_global_sgd_check_fails_for_momentum_kept_across_phases(top):
    """The mutant: ours with one SGD optimizer over both phases (as before the fix), its momentum carried into the
    second."""
    err, _ = sgd_both(top, [ALIGNED[:7], ALIGNED[7:]], keep_momentum=True)
    assert err > 100 * SGD_ATOL


@pytest.mark.xfail(strict=True, reason="difference 4: a document across a 64-token boundary of a chunk is cut there "
                   "by ours (rows of EVAL_SEQ_LEN, attention within documents in each row), by the top only every "
                   "EVAL_SEQ_LEN tokens from its own start (_build_cu_seqlens): measured 1.3e-4 (parameters moved by "
                   "1.9e-3)")
def test_global_sgd_with_documents_across_row_boundaries_equals_the_tops(top):
    err, _ = sgd_both(top, [UNALIGNED])
    assert err <= SGD_ATOL


@pytest.mark.xfail(strict=True, reason="difference 5: inside a document longer than 64, the top's SmearGate mixes "
                   "the token before each 64-token cut into the next (it resets only at BOS), ours starts a row: "
                   "measured 2.4e-5 (parameters moved by 2.8e-3); 1.5e-8 with both SmearGates off (the next test)")
def test_global_sgd_with_long_documents_equals_the_tops(top):
    err, _ = sgd_both(top, [ALIGNED_LONG])
    assert err <= SGD_ATOL


def test_global_sgd_with_long_documents_and_no_smear_gate_equals_the_tops(top):
    err, moved = sgd_both(top, [ALIGNED_LONG], smear=False)
    assert err <= SGD_ATOL and moved > 1000 * SGD_ATOL


# ---------------------------------------------------------------------------------------------------------------
# D. Phased: 24 documents, batches of 4, prefix 12 in 3 phases
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phased(top):
    val = stream(PHASED_LENGTHS, 3)
    return SimpleNamespace(val=val, top=run_top(top, val, 4, prefix=12), ours=run_ours(top, val, 4, prefix=12),
                           count=run_ours(top, val, 4, prefix=12, count=True))


def test_phased_every_document_scores_each_of_its_targets_once_in_both(phased):
    spans = doc_spans(phased.val)
    assert phased.top.tokens == phased.count.doc_nats() == spans
    assert phased.top.total_tokens == phased.ours.total_tokens == len(phased.val) - 1


def test_the_phases_train_on_what_each_side_states(phased):
    """Difference 7 as rules. The top: phase k after its first k batches (4k documents, the longest), on every
    document scored so far in ascending length order, each from its BOS through the next document's BOS; a new
    adapter set after each phase. Ours: phase k on documents 4(k-1)..4k-1 in stream order; one adapter set."""
    spans = doc_spans(phased.val)
    by_length = sorted(spans, key=lambda d: spans[d])
    assert phased.top.batches[:3] == [by_length[-4:], by_length[-8:-4], by_length[-12:-8]]
    for k, tokens in enumerate(phased.top.sgd, 1):
        scored = by_length[-4 * k:]
        expected = np.concatenate([phased.val[d: d + spans[d] + 1] for d in scored])
        assert np.array_equal(tokens.numpy(), expected)
    assert len(phased.top.sgd) == 3 and phased.top.made == 1 + 3
    assert phased.ours.sgd == [(0, 4), (4, 8), (8, 12)] and phased.ours.made == 1
    starts = list(spans)
    assert phased.ours.batches[:3] == [sorted(starts[4 * k: 4 * k + 4], key=lambda d: -spans[d]) for k in range(3)]


@pytest.mark.xfail(strict=True, reason="difference 7, with 2 to 5 inside it: the phases follow and train on other "
                   "documents, and the LoRA batches differ (ours within stream segments); 23 of 24 documents differ, "
                   "by up to 0.74 nats (0.11 already on first chunks, scored by differently trained base weights)")
def test_phased_per_document_nats_equal_the_tops(phased):
    assert worst(phased.top.doc_nats(), phased.ours.doc_nats())[0] <= NATS_ATOL
