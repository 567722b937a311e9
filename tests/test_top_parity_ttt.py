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

Results (float32; nats are per-document sums over up to 128 targets of ~4.6 nats each): every check agrees.
- LoRA TTT, phases off, 16 documents in 2 full batches of 8 (one-chunk documents, documents longer than
  EVAL_SEQ_LEN, two whose partial last chunk ends past EVAL_SEQ_LEN in a batch with a longer one): every document's
  nats, chunk by chunk, equal the top's to NATS_ATOL (measured 1.2e-5 per document, 7.2e-6 per chunk); each
  target scored once (counts, tokens and bytes equal); the same batches in the same order, one adapter set each.
  Mutants: TTT_LORA_LR 4e-3 against 3e-3 (up to 1.6 nats); our O adapter fed the attention output y (up to 1.40);
  a partial last chunk scored in the window ending at the batch's chunk end, as ours did before (6.1e-3 and 2.0e-2
  nats on the documents of 70 and 111 targets, the others unchanged).
- A partial batch (12 documents, batches of 8): both cut from the shortest, so the partial batch is the 4 longest,
  scored first on adapters of its own (new A); every document equal (measured 2.4e-6).
- The global SGD alone on the same tokens (the concatenation its phased eval builds): documents within 64-token
  boundaries over two phases (a new SGD optimizer each), documents across them, documents longer than 64 (the
  SmearGate mixes across a 64-token cut on both sides): parameters equal to SGD_ATOL (measured 1.5e-8 to 3.0e-8,
  moves of 1.5e-3 to 2.8e-3). Mutants: GLOBAL_TTT_LR x1.5 (9.3e-4), one SGD optimizer kept across the phases
  (1.4e-3), the chunk cut into rows of EVAL_SEQ_LEN as ours did before (1.1e-4).
- Phased end to end, 24 documents, prefix 12 in 3 phases, batches of 4: the same batches, the same pauses (after
  the 4th, 8th and 12th document), the same token streams trained on (cumulative), the same adapter sets built
  (4); every document equal (measured 3.8e-6, where the phases move documents by up to 0.79 nats).
Not compared here: more than one rank. There the top's ranks claim batches from a shared counter as they finish
(a /tmp file: one node) and pause when a flag file appears, after the batches in flight, so which batches precede
a pause depends on timing; ours plays the same claims on estimated costs (ttt_schedule, tests/test_phased_ttt.py),
deterministic at any world size.
Skipped, with the reason, where the anchor folder is absent.
Runtime: ~30 s on 2 shared CPU cores (importing both scripts included), most of it the phased and LoRA runs.
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
from scoring_trace import LoRATrace
from test_eval import fake_luts
from test_top_parity_step import counterparts
from top_harness import BOS, SKIP_WITHOUT_TOP, VOCAB, pair, top_hparams

pytestmark = [SKIP_WITHOUT_TOP, pytest.mark.filterwarnings("ignore:CUDA is not available")]

CPU = torch.device("cpu")
SEQ, CHUNK, RANK = 64, 16, 8
LORA_LR, GLOBAL_LR, SGD_CHUNK = 3e-3, 0.01, 128
# Per-document nats (sums over up to 128 targets, ~4.6 nats each): the two forwards order a few float32 reductions
# differently (top_harness.LOGIT_ATOL); measured 1.2e-5 (7.2e-6 per chunk), where the mutants move them by up to 1.6
# (TTT_LORA_LR 4e-3 against 3e-3), 1.4 (our O adapter fed the attention output) and 2.0e-2 (the last chunk's window).
NATS_ATOL = 1e-4
# Parameters after the global SGD (float32): measured 1.5e-8 to 3.0e-8, where the SGD moves them by up to 2.8e-3 and
# the mutants by 9.3e-4 (GLOBAL_TTT_LR x1.5), 1.4e-3 (momentum kept across 2 phases) and 1.1e-4 (rows of 64).
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

    def attn_forward(self, x, cos, sin, aux=None):
        if aux is None or aux.lora is None:
            return forward(self, x, cos, sin, aux)

        def capture(module, args):
            current["o"] = (aux.lora.o, args[0])

        handle = self.proj.register_forward_pre_hook(capture)
        try:
            return forward(self, x, cos, sin, aux)
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
    sgd: list = field(default_factory=list)  # per phase: the token stream its global SGD trains on
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
    out, made = Run(), {"top": 0, "ours": 0}
    global_sgd = tg.PhasedTTT.global_sgd

    def sgd_hook(self, doc_ids):
        out.sgd.append(np.concatenate([val[lo: hi + 1] for lo, hi in (self.docs[d] for d in doc_ids)]))
        if not count:
            global_sgd(self, doc_ids)

    with pytest.MonkeyPatch.context() as mp:
        same_lora_a(mp, top, made)
        mp.setattr(tg.PhasedTTT, "global_sgd", sgd_hook)
        if o_output:
            o_adapter_reads_attention_output(mp)
        if count:
            mp.setattr(tg, "lora_nll", lambda model, lora, x, cols, y, ctx: torch.ones(y.shape, requires_grad=True))
        trace = LoRATrace(mp)
        r, _ = tg.eval_ttt_lora(ctx, ours, tg.LoRATTTConfig.from_hparams(h), tg.TTTConfig.global_phase(h), 1e9,
                                lambda line: None)
    out.batches = [[lo for lo, _ in batch] for batch in trace.scoring_order()]
    for row in trace.rows:
        out.nats.setdefault(row.span[0], []).append(row.nats)
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


@pytest.mark.slow
def test_lora_ttt_per_document_nats_equal_the_tops(lora):
    """Phases off, 2 full batches: every document's nats equal the top's, chunk by chunk, the 2 documents whose
    partial last chunk ends past EVAL_SEQ_LEN in a batch with a longer document included (its window ends at the
    document's end on both sides)."""
    spans = doc_spans(lora.val)
    assert len(shortened_last_chunk(lora.val, lora.ours.batches)) == 2
    assert {n > SEQ for n in spans.values()} == {True, False} and min(spans.values()) <= CHUNK
    assert sorted(lora.top.nats) == sorted(lora.ours.nats) == sorted(spans)
    assert worst(lora.top.doc_nats(), lora.ours.doc_nats())[0] <= NATS_ATOL
    for d in spans:
        assert np.allclose(lora.top.nats[d], lora.ours.nats[d], rtol=0, atol=NATS_ATOL)


@pytest.mark.slow
def test_every_document_scores_each_of_its_targets_once_in_both(lora):
    spans = doc_spans(lora.val)
    assert lora.top.tokens == lora.count.doc_nats() == spans
    assert lora.top.total_tokens == lora.ours.total_tokens == len(lora.val) - 1
    assert lora.top.total_bytes == lora.ours.total_bytes


@pytest.mark.slow
def test_both_score_the_same_batches_in_the_same_order_with_one_adapter_set(lora):
    """Distinct lengths, a multiple of TTT_BATCH_SIZE documents: the same batches, longest first (rows in
    reverse order, irrelevant with equal A rows: the row a document takes carries its A to the same document in
    the next batch on both sides), one adapter set each (A warm from batch to batch)."""
    assert [sorted(b) for b in lora.top.batches] == [sorted(b) for b in lora.ours.batches]
    assert [b[::-1] for b in lora.top.batches] == lora.ours.batches
    assert lora.top.made == lora.ours.made == 1


@pytest.mark.slow
def test_the_lora_check_fails_for_another_lora_lr(top, lora):
    """The mutant: ours at TTT_LORA_LR 4e-3 (the top at 3e-3)."""
    mutant = run_ours(top, lora.val, 8, lr=4e-3)
    assert worst(lora.top.doc_nats(), mutant.doc_nats())[0] > 100 * NATS_ATOL


@pytest.mark.slow
def test_the_lora_check_fails_for_an_o_adapter_reading_the_attention_output(top, lora):
    """The mutant: our O adapter fed the attention output y (what the output projection reads), as ours did before
    the fix; the first chunks (B = 0) still agree, the later ones do not."""
    mutant = run_ours(top, lora.val, 8, o_output=True)
    assert worst(lora.top.doc_nats(), mutant.doc_nats())[0] > 100 * NATS_ATOL
    assert worst({d: v[0] for d, v in lora.top.nats.items()}, {d: v[0] for d, v in mutant.nats.items()})[0] <= NATS_ATOL


@pytest.mark.slow
def test_the_last_chunk_check_fails_for_a_window_ending_at_the_batchs_chunk_end(top, lora):
    """The mutant (ours before the fix): a partial last chunk scored in the window that ends at the batch's chunk
    end (the longest document's), so past EVAL_SEQ_LEN its targets see fewer context tokens (here 10 and 1)."""
    affected = shortened_last_chunk(lora.val, lora.ours.batches)
    plan = tg.LoRAWalk.plan

    def batch_window(*args):
        walk = plan(*args)  # every row's window starts where the longest document's (row 0's) does
        own = walk.start - walk.start[:1]  # each row's window start in its document (chunk 0 starts at 0)
        shift = own[:, :1] - own
        return walk._replace(start=walk.start + shift, col=walk.col - shift)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg.LoRAWalk, "plan", batch_window)
        mutant = run_ours(top, lora.val, 8)
    assert worst(lora.top.doc_nats(), mutant.doc_nats(), affected)[0] > 10 * NATS_ATOL
    assert worst(lora.top.doc_nats(), mutant.doc_nats(), set(doc_spans(lora.val)) - affected)[0] <= NATS_ATOL


# ---------------------------------------------------------------------------------------------------------------
# B. A partial batch
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partial(top):
    val = stream(PARTIAL_LENGTHS, 1)
    return SimpleNamespace(val=val, top=run_top(top, val, 8), ours=run_ours(top, val, 8))


@pytest.mark.slow
def test_the_partial_batch_is_the_longest_documents_scored_first_with_new_adapters_in_both(partial):
    """Batches cut from the shortest document, the longest batch first: the partial batch is the 4 longest
    documents, scored first, on an adapter set of its own (new A); the 8 shortest then take the reusable set."""
    spans = doc_spans(partial.val)
    by_length = sorted(spans, key=lambda d: spans[d])
    assert partial.top.batches == [by_length[8:], by_length[:8]] and partial.top.made == 2
    assert partial.ours.batches == [by_length[8:][::-1], by_length[:8][::-1]] and partial.ours.made == 2


@pytest.mark.slow
def test_with_a_partial_batch_per_document_nats_equal_the_tops(partial):
    assert sorted(shortened_last_chunk(partial.val, partial.ours.batches)) != []
    assert worst(partial.top.doc_nats(), partial.ours.doc_nats())[0] <= NATS_ATOL
    assert partial.top.tokens == doc_spans(partial.val) and partial.top.total_tokens == partial.ours.total_tokens


# ---------------------------------------------------------------------------------------------------------------
# C. The global SGD alone, on the same tokens
# ---------------------------------------------------------------------------------------------------------------

# Where rows of 64 would cut (ours before the fix) and where the top cuts: documents whose stream slices fall within
# (or end on) 64-token boundaries in their plain stream, documents longer than 64 (cut inside: the SmearGate mixes
# across the cut), documents across 64-token boundaries.
ALIGNED = [64, 32, 32, 64, 64, 32, 32, 64, 32, 32, 64, 64, 33]
ALIGNED_LONG = [256, 256, 128, 193]
UNALIGNED = [50, 20, 44, 40, 32, 17, 64, 60, 32, 32, 64, 28, 33]


def sgd_both(top, phases: list[list[int]], global_lr: float = GLOBAL_LR, smear: bool = True,
             keep_momentum: bool = False) -> tuple[float, float]:
    """Each phase's documents (lengths) trained on by the top's train_val_ttt_global_sgd_distributed (their
    concatenation, each with the next document's BOS, as its eval_val_ttt_phased builds it) and by one PhasedTTT's
    global_sgd (the same documents of one stream), phase after phase, as eval_ttt_lora runs them. smear=False:
    both SmearGates off (ours then has no smear parameters; every other one is compared); keep_momentum: the mutant, our torch.optim.SGD patched during
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
    run = tg.PhasedTTT(ctx, ours, tg.LoRATTTConfig.from_hparams(hh), tg.TTTConfig.global_phase(hh), docs, val)
    sgd, made = torch.optim.SGD, []

    def one_sgd(*args, **kwargs):
        if not made:
            made.append(sgd(*args, **kwargs))
        return made[0]

    a = 0
    for lengths in phases:
        b = a + len(lengths)
        tokens = np.concatenate([val[lo: hi + 1] for lo, hi in docs[a:b]])  # as its phased eval concatenates them
        top.train_val_ttt_global_sgd_distributed(h, CPU, None, top_model, torch.from_numpy(tokens))
        with pytest.MonkeyPatch.context() as mp:
            if keep_momentum:
                mp.setattr(torch.optim, "SGD", one_sgd)
            run.global_sgd(list(range(a, b)))
        a = b
    assert len(made) == int(keep_momentum)
    top_params = dict(top_model.named_parameters())
    err = max((p.detach() - top_params[mapping[n][0]].detach()[mapping[n][1]]).abs().max().item()
              for n, p in ours.named_parameters())
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in ours.named_parameters())
    return err, moved


@pytest.mark.slow
def test_global_sgd_on_the_same_tokens_equals_the_tops(top):
    """Two phases through one PhasedTTT (each phase with a new SGD optimizer, momentum zero, on both sides): equal
    parameters. Both skip each phase's last chunk."""
    err, moved = sgd_both(top, [ALIGNED[:7], ALIGNED[7:]])
    assert err <= SGD_ATOL and moved > 1000 * SGD_ATOL


@pytest.mark.slow
def test_the_global_sgd_check_fails_for_another_lr(top):
    err, _ = sgd_both(top, [ALIGNED], global_lr=1.5 * GLOBAL_LR)
    assert err > 100 * SGD_ATOL


@pytest.mark.slow
def test_the_global_sgd_check_fails_for_momentum_kept_across_phases(top):
    """The mutant: ours with one SGD optimizer over both phases (as before the fix), its momentum carried into the
    second."""
    err, _ = sgd_both(top, [ALIGNED[:7], ALIGNED[7:]], keep_momentum=True)
    assert err > 100 * SGD_ATOL


@pytest.mark.slow
def test_global_sgd_with_documents_across_row_boundaries_equals_the_tops(top):
    """Documents across 64-token boundaries of a chunk: both cut a document only every EVAL_SEQ_LEN tokens from its
    own start (one packed row of the chunk's sequences)."""
    err, moved = sgd_both(top, [UNALIGNED])
    assert err <= SGD_ATOL and moved > 1000 * SGD_ATOL


@pytest.mark.slow
def test_global_sgd_with_long_documents_equals_the_tops(top):
    """Inside a document longer than 64, both SmearGates mix the token before each 64-token cut into the next (they
    reset only at BOS)."""
    err, moved = sgd_both(top, [ALIGNED_LONG])
    assert err <= SGD_ATOL and moved > 1000 * SGD_ATOL


@pytest.mark.slow
def test_the_global_sgd_check_fails_for_rows_cut_every_seq_len_of_the_stream(top):
    """The mutant (ours before the fix): the chunk cut into rows of EVAL_SEQ_LEN, attention within documents in
    each row, so a document across a row boundary is cut there and the SmearGate starts each row afresh."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "packed_cu_seqlens", lambda inputs, bos, max_len: tg.host_cu_seqlens(
            inputs.reshape(-1, SEQ), bos))
        err, _ = sgd_both(top, [UNALIGNED])
    assert err > 100 * SGD_ATOL


@pytest.mark.slow
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


@pytest.mark.slow
def test_phased_every_document_scores_each_of_its_targets_once_in_both(phased):
    spans = doc_spans(phased.val)
    assert phased.top.tokens == phased.count.doc_nats() == spans
    assert phased.top.total_tokens == phased.ours.total_tokens == len(phased.val) - 1


@pytest.mark.slow
def test_both_pause_after_the_same_batches_and_train_on_the_same_tokens(phased):
    """The top's rule on both sides: phase k after the batch at which 4k documents are scored (here its first k
    batches, the longest), on every document scored so far (cumulative), in the order the batches were cut
    (ascending length), each from its BOS through the next document's BOS; new adapters after each phase."""
    spans = doc_spans(phased.val)
    by_length = sorted(spans, key=lambda d: spans[d])
    assert phased.top.batches[:3] == [by_length[-4:], by_length[-8:-4], by_length[-12:-8]]
    assert [b[::-1] for b in phased.top.batches] == phased.ours.batches
    for k, tokens in enumerate(phased.top.sgd, 1):
        scored = by_length[-4 * k:]
        expected = np.concatenate([phased.val[d: d + spans[d] + 1] for d in scored])
        assert np.array_equal(tokens.numpy(), expected) and np.array_equal(phased.ours.sgd[k - 1], expected)
    assert len(phased.top.sgd) == len(phased.ours.sgd) == 3 and phased.top.made == phased.ours.made == 1 + 3


@pytest.mark.slow
def test_phased_per_document_nats_equal_the_tops(phased):
    """End to end: 24 documents, prefix 12 in 3 phases, every document's nats."""
    assert worst(phased.top.doc_nats(), phased.ours.doc_nats())[0] <= NATS_ATOL
