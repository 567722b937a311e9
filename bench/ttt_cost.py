"""Phased score-first LoRA TTT, ours against the leaderboard top's (PR #1855), side by side on this CPU
(bench/RESULTS.md, 2026-12-06).

    python bench/ttt_cost.py                      # 24 documents, best of 3 timed runs per side
    python bench/ttt_cost.py --docs 36 --repeats 5 --ops 25

Both implementations run on the same weights (tests/top_harness.py's `pair`: PR #1855's GPT perturbed, copied
into ours; looping on as both evaluate), the same validation stream (synthetic documents of lengths drawn
log-uniformly from --min-len..--max-len with a fixed --seed, BOS-separated, one stream) and the same knobs
(KNOBS: EVAL_SEQ_LEN = TTT_EVAL_SEQ_LEN 128, TTT_CHUNK_SIZE 32, TTT_BATCH_SIZE 8, TTT_LORA_RANK 8, global SGD
chunks of 256 tokens, PHASED_TTT_PREFIX_DOCS = half the documents in 3 phases; the LoRA and phase learning
rates are tests/test_top_parity_ttt.py's, 30x and 10x the record's, so that the phases move the scores), world
size 1, float32, eager:
- ours: train_gpt.eval_ttt_lora as run_evaluations calls it (PRESET=record, COMPILE=0); its EvalResult;
- the top: its eval_val_ttt_phased(h, model, cpu, val_data, forward_ttt_train) with forward_ttt_train its
  model's eager forward_ttt (its main passes torch.compile of the same call), imported with the FA3 CPU stand-in
  (tests/stubs/fa3) and the CPU patches of tests/top_harness.py and tests/test_top_parity_ttt.py (its fused MLP
  off: a Triton kernel; its unfused branch is the same function); its return (val_loss, val_bpb).
LoRA's A matrices are set equal on both sides (test_top_parity_ttt.same_lora_a: each side draws its own, from
different generators) so that the scores can be compared.

Runs, per side: one untimed warm-up that also records every document's nats (the top's through observation
hooks on its batch queue and byte accumulation, ours through tests/scoring_trace.py's LoRATrace), one untimed run
under a TorchDispatchMode that counts aten operations, then --repeats timed runs (the two sides alternate; each run on
freshly built models, since the phases train the base weights). Printed: a table with both losses and BPBs,
both wall times (best of the repeats, and every repeat), the operations of one chunk step (the second chunk of
the first batch: one forward, the backward into the adapters, the AdamW step, and the bookkeeping up to the next
forward: scoring, masks, the next window), split by where they ran, and per run; the largest per-document
difference; the seconds spent inside attention (counting run; the top's is the CPU stand-in, a single kernel
on a GPU) and both wall times without it; and last `ttt ours/top wall: <ratio>`. --ops N adds the N operations
whose count per chunk step differs most between the two; --fused-adamw times ours again with its LoRA AdamW
fused (PR #1855's), patched in for the run. Skipped with a message where PR #1855's folder
(../shared/anchors/top1855) is absent. Runtime: 2 min 0 s at the defaults on 2 shared cores (OMP_NUM_THREADS=1),
2 min 23 s with --fused-adamw.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402  (the harness patches through pytest.MonkeyPatch)

from conftest import eval_ctx, tg  # noqa: E402
from scoring_trace import LoRATrace  # noqa: E402
from test_eval import fake_luts  # noqa: E402
from top_harness import BOS, TOP, VOCAB, load_top, pair, top_hparams  # noqa: E402

warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
warnings.filterwarnings("ignore", message=".*autocast.*")

CPU = torch.device("cpu")
# Per-document nats (sums over a document's targets): tests/test_top_parity_ttt.py's tolerance.
NATS_ATOL = 1e-4
# The knobs of both runs (scaled down from the record's 2048 / 48 / 64 / 80 / 32,768).
KNOBS = dict(seq=128, chunk=32, batch=8, rank=8, lora_lr=3e-3, global_lr=0.01, sgd_chunk=256, phases=3)
PLACES = ("forward", "backward", "optimizer", "other")
# Attention's forward and backward as the dispatcher sees them: the top's FA3 stand-in (custom ops computing exact
# attention one sequence at a time in eager ops: a single kernel on a GPU) and ours (SDPA's CPU kernel).
ATTENTION_OPS = ("_flash_attn_forward", "_flash_attn_backward", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention_for_cpu_backward")
TOP_COUNTERS = ("ttt_counter_", "ttt_prefix_counter_", "ttt_pause_flag_")


def doc_lengths(n: int, lo: int, hi: int, seed: int) -> np.ndarray:
    """n document lengths (tokens, BOS included) drawn log-uniformly from lo..hi: many short, a few long."""
    rng = np.random.default_rng(seed)
    return np.round(np.exp(rng.uniform(math.log(lo), math.log(hi), n))).astype(np.int64)


def stream(lengths: np.ndarray, seed: int) -> np.ndarray:
    """BOS + (n - 1) random tokens per document, one stream."""
    rng = np.random.default_rng(seed + 1)
    return np.concatenate([np.concatenate(([BOS], rng.integers(2, VOCAB, int(n) - 1))) for n in lengths]).astype(
        np.int64)


_TOP: list = []


def the_top():
    """PR #1855's script, imported once per process (its custom ops register on import)."""
    if not _TOP:
        _TOP.append(load_top())
    return _TOP[0]


def fresh_models(top):
    """Both models on the same weights, as both evaluate (looping on); the top's Triton MLP off."""
    top_model, ours = pair(top, 0)
    top_model.looping_active = True
    ours.set_looping(True)
    for block in top_model.blocks:
        block.mlp.use_fused = False
    return top_model, ours


def top_h(top, prefix: int):
    k = KNOBS
    return top_hparams(top, eval_seq_len=k["seq"], ttt_eval_seq_len=k["seq"], ttt_chunk_size=k["chunk"],
                       ttt_batch_size=k["batch"], ttt_lora_rank=k["rank"], ttt_lora_lr=k["lora_lr"], ttt_beta2=0.99,
                       ttt_weight_decay=0.5, phased_ttt_prefix_docs=prefix, phased_ttt_num_phases=k["phases"],
                       global_ttt_momentum=0.9, global_ttt_lr=k["global_lr"], global_ttt_chunk_tokens=k["sgd_chunk"],
                       rank=0, world_size=1, run_id=f"ttt-cost-{uuid.uuid4().hex}")


def our_h(prefix: int) -> tg.Hyperparameters:
    k = KNOBS
    return tg.Hyperparameters.from_env({
        "PRESET": "record", "COMPILE": "0", "EVAL_SEQ_LEN": str(k["seq"]), "TTT_CHUNK_SIZE": str(k["chunk"]),
        "TTT_BATCH_SIZE": str(k["batch"]), "TTT_LORA_RANK": str(k["rank"]), "TTT_LORA_LR": str(k["lora_lr"]),
        "PHASED_TTT_PREFIX_DOCS": str(prefix), "PHASED_TTT_NUM_PHASES": str(k["phases"]),
        "GLOBAL_TTT_LR": str(k["global_lr"]), "TTT_CHUNK_TOKENS": str(k["sgd_chunk"])})


# ---------------------------------------------------------------------------------------------------------------
# Operation counting
# ---------------------------------------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched, by step (a new one at each chunk forward; "setup" before the
    first, "sgd" inside a phase's global SGD) and by place (forward, backward, optimizer, other); and the
    seconds spent inside each operation by name (a custom op's inner operations are not dispatched to the
    mode again, so its time includes them)."""

    def __init__(self):
        super().__init__()
        self.steps: list[dict[str, Counter]] = []
        self.total = 0
        self.place = "other"
        self.bucket: dict[str, Counter] | None = None
        self.sgd: Counter = Counter()
        self.setup: Counter = Counter()
        self.in_sgd = False
        self.seconds: Counter = Counter()

    def new_step(self) -> None:
        self.bucket = {p: Counter() for p in PLACES}
        self.steps.append(self.bucket)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        name = str(func.overloadpacket.__name__)
        if self.in_sgd:
            self.sgd[name] += 1
        elif self.bucket is None:
            self.setup[name] += 1
        else:
            self.bucket[self.place][name] += 1
        t0 = time.perf_counter()
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.seconds[name] += time.perf_counter() - t0


def counting(mp: pytest.MonkeyPatch, counter: OpCounter) -> None:
    """Marks where each counted operation runs: the backward (torch.Tensor.backward), the AdamW step, the phase
    SGD (both sides' global SGD functions). Each step's forward is marked by the callers (their forward hooks)."""
    backward, adamw_step = torch.Tensor.backward, torch.optim.AdamW.step

    def in_place(place, fn):
        def wrapped(*args, **kwargs):
            before, counter.place = counter.place, place
            try:
                return fn(*args, **kwargs)
            finally:
                counter.place = before
        return wrapped

    mp.setattr(torch.Tensor, "backward", in_place("backward", backward))
    mp.setattr(torch.optim.AdamW, "step", in_place("optimizer", adamw_step))


def in_sgd(counter: OpCounter | None, fn):
    if counter is None:
        return fn

    def wrapped(*args, **kwargs):
        counter.in_sgd = True
        try:
            return fn(*args, **kwargs)
        finally:
            counter.in_sgd = False
    return wrapped


def forward_marked(counter: OpCounter | None, fn):
    """fn, with each call starting a new chunk step (counted as its forward until it returns)."""
    if counter is None:
        return fn

    def wrapped(*args, **kwargs):
        counter.new_step()
        counter.place = "forward"
        try:
            return fn(*args, **kwargs)
        finally:
            counter.place = "other"
    return wrapped


# ---------------------------------------------------------------------------------------------------------------
# The two runs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    loss: float
    bpb: float
    seconds: float
    nats: dict[int, float] = field(default_factory=dict)  # document start -> its nats (a traced run)
    chunk_steps: int = 0
    ops: OpCounter | None = None


def run_top(top, val: np.ndarray, prefix: int, trace: bool = False, count: bool = False) -> Run:
    """PR #1855's eval_val_ttt_phased. trace: every document's nats through observation hooks (its batch queue
    and _accumulate_bpb, called again per row with fresh sums); count: its operations."""
    from test_top_parity_ttt import same_lora_a

    top_model, _ = fresh_models(top)
    h = top_h(top, prefix)
    luts = fake_luts(VOCAB)
    val_data = SimpleNamespace(val_tokens=torch.from_numpy(val), caseops_enabled=False, val_bytes=None,
                               base_bytes_lut=luts.base_bytes, has_leading_space_lut=luts.has_leading_space,
                               is_boundary_token_lut=luts.is_boundary)
    nats, state, steps = {}, {}, [0]
    counter = OpCounter() if count else None

    def forward(x, y, lora):
        steps[0] += 1
        return top_model.forward_ttt(x, y, lora=lora)

    with pytest.MonkeyPatch.context() as mp:
        same_lora_a(mp, top, {"top": 0, "ours": 0})
        mp.setattr(top, "log", lambda *args, **kwargs: None)  # its progress lines (it computes them as before)
        if trace:
            build, claim, accumulate = top._build_ttt_global_batches, top._claim_next_batch, top._accumulate_bpb

            def build_hook(*args, **kwargs):
                state["queue"] = build(*args, **kwargs)
                return state["queue"]

            def claim_hook(*args):
                i = claim(*args)
                if i < len(state["queue"]):
                    state["rows"] = [start for _, (start, _) in state["queue"][i][1]]
                return i

            def accumulate_hook(ptl, x, y, offsets, lens, pos, *args, **kwargs):
                for b, start in enumerate(state["rows"]):
                    if int(lens[b]):
                        sums = [torch.zeros((), dtype=torch.float64) for _ in range(3)]
                        accumulate(ptl[b:b + 1], x[b:b + 1], y[b:b + 1], offsets[b:b + 1], lens[b:b + 1], pos,
                                   *args[:3], *sums, y_bytes=None)
                        nats[start] = nats.get(start, 0.0) + sums[0].item()
                return accumulate(ptl, x, y, offsets, lens, pos, *args, **kwargs)

            mp.setattr(top, "_build_ttt_global_batches", build_hook)
            mp.setattr(top, "_claim_next_batch", claim_hook)
            mp.setattr(top, "_accumulate_bpb", accumulate_hook)
        if counter is not None:
            counting(mp, counter)
            mp.setattr(top, "train_val_ttt_global_sgd_distributed",
                       in_sgd(counter, top.train_val_ttt_global_sgd_distributed))
        try:
            with counter if counter is not None else _nothing():
                t0 = time.perf_counter()
                loss, bpb = top.eval_val_ttt_phased(h, top_model, CPU, val_data, forward_marked(counter, forward))
                seconds = time.perf_counter() - t0
        finally:
            for name in TOP_COUNTERS:
                try:
                    os.remove(f"/tmp/{name}{h.run_id}")
                except FileNotFoundError:
                    pass
    return Run(loss, bpb, seconds, nats, steps[0], counter)


class FusedAdamW(torch.optim.AdamW):
    """AdamW with fused=True (PR #1855's LoRA optimizer): one kernel for every adapter tensor."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "fused": True})


def run_ours(top, val: np.ndarray, prefix: int, trace: bool = False, count: bool = False,
             fused_adamw: bool = False) -> Run:
    """Our eval_ttt_lora as run_evaluations calls it (no budget limit). trace: every document's nats (observed by
    tests/scoring_trace.py's LoRATrace); count: its operations; fused_adamw: the what-if of --fused-adamw
    (torch.optim.AdamW patched to FusedAdamW during the run; train_gpt.py unchanged)."""
    from test_top_parity_ttt import same_lora_a

    _, ours = fresh_models(top)
    h = our_h(prefix)
    ctx = eval_ctx(ours, val, fake_luts(VOCAB), h.eval_seq_len, batch_seqs=h.eval_batch_seqs)
    counter = OpCounter() if count else None
    steps = [0]
    nll = tg.lora_nll

    def forward(*args, **kwargs):
        steps[0] += 1
        return nll(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        same_lora_a(mp, top, {"top": 0, "ours": 0})
        mp.setattr(tg, "lora_nll", forward_marked(counter, forward))
        if fused_adamw:
            mp.setattr(torch.optim, "AdamW", FusedAdamW)
        if counter is not None:
            counting(mp, counter)
            mp.setattr(tg.PhasedTTT, "global_sgd", in_sgd(counter, tg.PhasedTTT.global_sgd))
        records = LoRATrace(mp) if trace else None
        with counter if counter is not None else _nothing():
            t0 = time.perf_counter()
            r, _ = tg.eval_ttt_lora(ctx, ours, tg.LoRATTTConfig.from_hparams(h), tg.TTTConfig.global_phase(h), 1e9,
                                    lambda line: None)
            seconds = time.perf_counter() - t0
    nats = {lo: v for (lo, _), v in records.doc_nats().items()} if records is not None else {}
    return Run(r.val_loss, r.val_bpb, seconds, nats, steps[0], counter)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Measurement and table
# ---------------------------------------------------------------------------------------------------------------


def measure(docs: int = 24, repeats: int = 3, min_len: int = 20, max_len: int = 600, seed: int = 0,
            fused_adamw: bool = False, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Everything the table prints, as a dict."""
    top = the_top()
    lengths = doc_lengths(docs, min_len, max_len, seed)
    val = stream(lengths, seed)
    prefix = docs // 2
    log(f"ttt_cost: {docs} documents ({int(lengths.min())}-{int(lengths.max())} tokens, {val.size:,} in all), "
        f"prefix {prefix} in {KNOBS['phases']} phases, knobs {KNOBS}")
    t0 = time.perf_counter()
    traced = {"ours": run_ours(top, val, prefix, trace=True), "top": run_top(top, val, prefix, trace=True)}
    log(f"ttt_cost: warm-up (traced) done in {time.perf_counter() - t0:.1f}s")
    counted = {"ours": run_ours(top, val, prefix, count=True), "top": run_top(top, val, prefix, count=True)}
    log(f"ttt_cost: op counts done in {time.perf_counter() - t0:.1f}s")
    timed: dict[str, list[Run]] = {"ours": [], "top": [], "fused": []}
    runs = {"ours": run_ours, "top": run_top, "fused": lambda *a: run_ours(*a, fused_adamw=True)}
    order = ["ours", "top"] + (["fused"] if fused_adamw else [])
    for i in range(repeats):
        for side in order if i % 2 == 0 else order[::-1]:
            timed[side].append(runs[side](top, val, prefix))
        log(f"ttt_cost: repeat {i + 1}/{repeats}: " + ", ".join(f"{s} {timed[s][-1].seconds:.2f}s" for s in order))
    out = {"documents": docs, "lengths": lengths.tolist(), "tokens": int(val.size), "prefix_docs": prefix,
           "knobs": dict(KNOBS), "repeats": repeats}
    for side in ("ours", "top"):
        c = counted[side].ops
        # the second chunk step of the first batch: trained on both sides whenever its longest document has
        # three chunks or more (the defaults' longest, 481 tokens, has 16)
        step = c.steps[1] if len(c.steps) > 1 else {p: Counter() for p in PLACES}
        out[side] = {"val_loss": traced[side].loss, "val_bpb": traced[side].bpb,
                     "seconds": [r.seconds for r in timed[side]],
                     "best_seconds": min(r.seconds for r in timed[side]),
                     "chunk_steps": counted[side].chunk_steps,
                     "step_ops": {p: sum(step[p].values()) for p in PLACES},
                     "step_op_names": sum((step[p] for p in PLACES), Counter()),
                     "run_ops": c.total, "sgd_ops": sum(c.sgd.values()),
                     "attention_s": sum(c.seconds[n] for n in ATTENTION_OPS),
                     "losses_of_timed_runs": [r.loss for r in timed[side]]}
    a, b = traced["ours"].nats, traced["top"].nats
    out["docs_compared"] = len(set(a) & set(b))
    out["same_documents"] = sorted(a) == sorted(b)
    out["max_doc_diff"] = max((abs(a[d] - b[d]) for d in a if d in b), default=float("nan"))
    out["loss_diff"] = abs(out["ours"]["val_loss"] - out["top"]["val_loss"])
    out["ratio"] = out["ours"]["best_seconds"] / out["top"]["best_seconds"]
    if fused_adamw:
        out["fused"] = {"best_seconds": min(r.seconds for r in timed["fused"]),
                        "seconds": [r.seconds for r in timed["fused"]], "val_loss": timed["fused"][0].loss}
    rest = [out[side]["best_seconds"] - out[side]["attention_s"] for side in ("ours", "top")]
    out["ratio_without_attention"] = rest[0] / rest[1]
    return out


def table(r: dict, ops: int = 0) -> list[str]:
    ours, top = r["ours"], r["top"]

    def step(side):
        s = side["step_ops"]
        return f"{sum(s.values()):,} ({' / '.join(f'{s[p]:,}' for p in PLACES)})"

    lines = [f"# phased LoRA TTT, ours vs PR #1855, {r['documents']} documents ({r['tokens']:,} tokens), prefix "
             f"{r['prefix_docs']} in {r['knobs']['phases']} phases, EVAL_SEQ_LEN {r['knobs']['seq']}, TTT_CHUNK_SIZE "
             f"{r['knobs']['chunk']}, TTT_BATCH_SIZE {r['knobs']['batch']}, rank {r['knobs']['rank']}; world size 1, "
             f"float32, eager; torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
             "",
             "| | ours (eval_ttt_lora) | top (PR #1855 eval_val_ttt_phased) |",
             "|---|---|---|",
             f"| val_loss (nats/token) | {ours['val_loss']:.8f} | {top['val_loss']:.8f} |",
             f"| val_bpb | {ours['val_bpb']:.8f} | {top['val_bpb']:.8f} |",
             f"| wall s, best of {r['repeats']} | {ours['best_seconds']:.3f} | {top['best_seconds']:.3f} |",
             f"| wall s, each run | {', '.join(f'{s:.2f}' for s in ours['seconds'])} | "
             f"{', '.join(f'{s:.2f}' for s in top['seconds'])} |",
             f"| chunk steps (forwards) per run | {ours['chunk_steps']} | {top['chunk_steps']} |",
             f"| aten ops per chunk step: all ({' / '.join(PLACES)}) | {step(ours)} | {step(top)} |",
             f"| aten ops per run (eager total; of which phase SGD) | {ours['run_ops']:,} ({ours['sgd_ops']:,}) | "
             f"{top['run_ops']:,} ({top['sgd_ops']:,}) |",
             f"| s inside attention ops per run (counting run) | {ours['attention_s']:.2f} (SDPA CPU kernel) | "
             f"{top['attention_s']:.2f} (FA3 stand-in, eager per sequence) |",
             f"| wall s without attention (best - attention) | {ours['best_seconds'] - ours['attention_s']:.2f} | "
             f"{top['best_seconds'] - top['attention_s']:.2f} |",
             *([f"| what-if: ours with AdamW(fused=True), wall s best of {r['repeats']} (each; val_loss) | "
                f"{r['fused']['best_seconds']:.3f} ({', '.join(f'{s:.2f}' for s in r['fused']['seconds'])}; "
                f"{r['fused']['val_loss']:.8f}) | – |"] if "fused" in r else []),
             "",
             f"per-document nats: max |ours - top| {r['max_doc_diff']:.2e} over {r['docs_compared']} documents "
             f"(tolerance {NATS_ATOL:.0e}: "
             f"{'equal' if r['same_documents'] and r['max_doc_diff'] <= NATS_ATOL else 'DIFFERENT'}); "
             f"val_loss |ours - top| {r['loss_diff']:.2e} nats/token",
             f"ours/top wall without attention (the top's attention is a CPU stand-in): "
             f"{r['ratio_without_attention']:.3f}"]
    if ops:
        a, b = ours["step_op_names"], top["step_op_names"]
        names = sorted(set(a) | set(b), key=lambda n: (-abs(a[n] - b[n]), n))[:ops]
        lines += ["", "| aten op, one chunk step | ours | top | ours - top |", "|---|---|---|---|"]
        lines += [f"| {n} | {a[n]} | {b[n]} | {a[n] - b[n]:+d} |" for n in names]
    lines += ["", f"ttt ours/top wall: {r['ratio']:.3f}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=24, help="validation documents (default 24)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side after the warm-up (default 3)")
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fused-adamw", action="store_true", help="also time ours with its LoRA AdamW fused (as PR "
                    "#1855's), patched in for the run: what that change to train_gpt.py would save")
    ap.add_argument("--ops", type=int, default=0, help="also list the N aten ops whose count per chunk step differs "
                                                       "most between the two")
    args = ap.parse_args(argv)
    if args.docs < 2 or args.repeats < 1 or not 2 <= args.min_len <= args.max_len:
        ap.error("need --docs >= 2, --repeats >= 1 and 2 <= --min-len <= --max-len")
    if not (TOP / "train_gpt.py").is_file():
        print(f"ttt_cost: skipped: {TOP} is not present (the leaderboard top's record folder, PR #1855)")
        return 0
    r = measure(args.docs, args.repeats, args.min_len, args.max_len, args.seed, args.fused_adamw)
    print("\n".join(table(r, args.ops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
