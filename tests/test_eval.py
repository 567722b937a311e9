"""Evaluation: BPB self-check, sliding-window coverage, distributed totals (sliding and phased TTT).

Run:
    python -m pytest -q tests/test_eval.py          # about a minute; tokenizer tests need ../shared/data

The self-check must catch a deliberately wrong lookup table and pass on every real tokenizer in
../shared/data/tokenizers on FineWeb and Wikipedia text. Sliding windows must score every target
exactly once for many (length, seq_len, stride, ranks); stride = seq_len must reproduce the plain
evaluation. Two gloo processes must give the same sliding totals as one, and phased TTT's over the
real collectives (its legality is tests/test_phased_ttt.py's).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, eval_ctx, tg

SHARED = ROOT.parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------
# BPB self-check
# ---------------------------------------------------------------------------------------------


def docs_from(path: Path, n: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


def stream(sp, docs: list[str]) -> np.ndarray:
    return np.concatenate([np.array([tg.BOS_ID] + ids, dtype=np.int64) for ids in sp.encode(docs)])


def all_tokenizers() -> list[Path]:
    return sorted((SHARED / "tokenizers").rglob("*.model")) if SHARED.is_dir() else []


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (shared tokenizers and text) is not present")
@pytest.mark.parametrize("model", all_tokenizers(), ids=lambda p: str(p.relative_to(SHARED / "tokenizers")))
@pytest.mark.slow
def test_self_check_passes_on_every_real_tokenizer(model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = docs_from(SHARED / "corpus" / "fineweb_challenge_docs_200.jsonl", 40)
    docs += docs_from(SHARED / "corpus" / "enwiki_wikiextractor_30MB.jsonl", 8)
    tokens = stream(sp, docs)
    luts = tg.build_byte_luts(sp, model)
    check = tg.bpb_self_check(tokens, sp, luts, None)
    assert check.documents == check.checked == len(docs)
    assert check.targets == tokens.size - 1
    no_fallback = not any(sp.is_byte(i) for i in range(sp.vocab_size()))
    assert (check.unknown_tokens > 0) == no_fallback or check.unknown_tokens == 0


@pytest.fixture(scope="module")
def canonical(shared_data):
    import sentencepiece as spm
    model = shared_data / "tokenizers" / "fineweb_1024_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = docs_from(shared_data / "corpus" / "fineweb_challenge_docs_200.jsonl", 30)
    return sp, tg.build_byte_luts(sp, model), stream(sp, docs), docs


def test_self_check_matches_the_source_text_bytes(canonical):
    sp, luts, tokens, docs = canonical
    check = tg.bpb_self_check(tokens, sp, luts, None)
    # The challenge's documents are already NFKC-normal: the decoded bytes are the source bytes.
    normalized = [sp.decode(sp.encode(d)) for d in docs]
    assert check.bytes == sum(len(d.encode("utf-8")) for d in normalized)
    assert check.unknown_tokens == 0 and check.documents == 30


def test_self_check_catches_a_leading_space_counted_twice(canonical):
    sp, luts, tokens, _ = canonical
    bad = tg.ByteLUTs(luts.base_bytes + luts.has_leading_space.long(), luts.has_leading_space,
                      luts.is_boundary)  # len(piece[1:]) + 1 in the table AND +1 again in the count
    with pytest.raises(tg.DataError) as info:
        tg.bpb_self_check(tokens, sp, bad, 5, source="val.bin")
    msg = str(info.value)
    assert msg.startswith("val.bin: BPB self-check failed: document 0") and "first bad token" in msg, msg
    assert "\n" not in msg
    # The named token really is the first one that carries a leading space.
    pos = int(msg.split("document position ")[1].split(":")[0])
    start = tg.document_spans(tokens)[0][0]
    first_space = next(j for j in range(1000) if luts.has_leading_space[tokens[start + j]])
    assert pos == first_space


def test_self_check_catches_byte_fallback_counted_as_three_bytes(canonical):
    sp, luts, _, _ = canonical
    tokens = stream(sp, ["naïve café — ünïcödé 日本語 text"])
    assert any(sp.is_byte(int(i)) for i in tokens), "test setup: the text needs byte-fallback pieces"
    base = luts.base_bytes.clone()
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            base[i] = 3  # the U+FFFD mistake (byte fallback counted as 3 bytes, PR #1289)
    with pytest.raises(tg.DataError, match="BPB self-check failed"):
        tg.bpb_self_check(tokens, sp, tg.ByteLUTs(base, luts.has_leading_space, luts.is_boundary), None)


def test_document_spans_and_sampling(canonical):
    sp, luts, tokens, _ = canonical
    spans = tg.document_spans(tokens)
    assert len(spans) == 30 and all(tokens[s - 1] == tg.BOS_ID for s, _ in spans)
    assert tg.bpb_self_check(tokens, sp, luts, 7).checked == 7
    # A stream cut in the middle of a document: the fragment before the first BOS is not a document.
    cut = tokens[5:]
    assert len(tg.document_spans(cut)) == 29


# ---------------------------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_targets", [64, 65, 100, 127, 128, 1000, 1031])
@pytest.mark.parametrize("seq_len, stride", [(64, 64), (64, 16), (64, 1), (32, 7), (64, 48)])
def test_sliding_windows_score_every_target_exactly_once(n_targets, seq_len, stride):
    starts, first = tg.sliding_windows(n_targets, seq_len, stride)
    counts = np.zeros(n_targets + 1, dtype=np.int64)
    for s, f in zip(starts, first):
        assert 0 <= s and s + seq_len <= n_targets, "every window is full length and inside the stream"
        counts[s + 1 + f: s + 1 + seq_len] += 1
        context = np.arange(f, seq_len)  # offset o predicts target s+o+1 from o+1 tokens
        if s > 0:
            assert context.min() + 1 >= seq_len - stride, "each later-window target has >= seq_len - stride context"
    assert counts[0] == 0 and (counts[1:] == 1).all()


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_split_covers_every_window_once(world_size):
    starts, _ = tg.sliding_windows(1000, 64, 16)
    seen = np.concatenate([np.arange(starts.size)[starts.size * r // world_size: starts.size * (r + 1) // world_size]
                           for r in range(world_size)])
    assert np.array_equal(seen, np.arange(starts.size))


def tiny_eval_model(**kw) -> tg.GPT:
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=128, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                         tie_embeddings=True, tied_embed_init_std=0.05, logit_softcap=30.0, rope_base=10000.0,
                         qk_gain_init=1.5, smear_gate_enabled=True, **kw)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def fake_luts(vocab: int) -> tg.ByteLUTs:
    g = torch.Generator().manual_seed(1)
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[tg.BOS_ID] = True
    base = torch.randint(1, 5, (vocab,), generator=g)
    return tg.ByteLUTs(base, torch.rand(vocab, generator=g) < 0.3, boundary)


def val_stream(n: int, vocab: int = 128) -> np.ndarray:
    rng = np.random.default_rng(3)
    toks = rng.integers(2, vocab, n)
    toks[::37] = tg.BOS_ID
    return toks.astype(np.uint16)


def test_stride_equal_to_seq_len_reproduces_the_plain_eval():
    model = tiny_eval_model()
    luts = fake_luts(128)
    val = val_stream(32 * 10 + 1)
    plain = tg.eval_windows(eval_ctx(model, val, luts, 32), 32)
    sliding = tg.eval_windows(eval_ctx(model, val, luts, 32, stride=32), 32)
    assert (sliding.tokens, sliding.bytes) == (plain.tokens, plain.bytes) == (320, plain.bytes)
    assert sliding.val_loss == pytest.approx(plain.val_loss, rel=1e-12, abs=0)
    assert sliding.val_bpb == pytest.approx(plain.val_bpb, rel=1e-12, abs=0)
    # Overlapping windows see more context: a different (here: any) loss, the same targets and bytes.
    s16 = tg.eval_windows(eval_ctx(model, val, luts, 32, stride=16), 16)
    assert (s16.tokens, s16.bytes) == (plain.tokens, plain.bytes)


def test_sliding_batch_padding_does_not_change_the_totals():
    model = tiny_eval_model()
    luts = fake_luts(128)
    val = val_stream(500)
    usable = ((val.size - 1) // 32) * 32 + 1
    val = val[:usable]
    a = tg.eval_windows(eval_ctx(model, val, luts, 32, batch_seqs=3), 8)
    b = tg.eval_windows(eval_ctx(model, val, luts, 32, batch_seqs=7), 8)
    assert (a.tokens, a.bytes) == (b.tokens, b.bytes) == (usable - 1, a.bytes)
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Two gloo processes give the one-process totals
# ---------------------------------------------------------------------------------------------

DIST_SCRIPT = r"""
import json, os, sys
import numpy as np, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import train_gpt as tg
from test_eval import tiny_eval_model, fake_luts, val_stream
from conftest import eval_ctx
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    torch.distributed.init_process_group("gloo")
torch.set_num_threads(1)
model = tiny_eval_model()
val = val_stream(641)
cpu = torch.device("cpu")
ctx = eval_ctx(model, val, fake_luts(128), 32, stride=8, rank=rank, world_size=world)
s = tg.eval_windows(ctx, 8)
sgd = tg.TTTConfig(lr=0.05, epochs=1, momentum=0.9, chunk_tokens=96, grad_clip=1.0)
out = {{"sliding": [s.val_loss, s.tokens, s.bytes]}}
for name, lr, phases in (("ttt_base", 0.0, 0), ("ttt", 1e-2, 2)):  # LoRA LR 0 and no phase: the base model scores
    cfg = tg.LoRATTTConfig(rank=4, alpha=8.0, lr=lr, weight_decay=0.1, batch_docs=3, chunk=8, warm_start_a=True,
                           prefix_docs=8, phases=phases, seed=0)
    t, info = tg.eval_ttt_lora(ctx, model, cfg, sgd, 1e9, lambda m: None)
    out[name] = [t.val_loss, t.tokens, t.bytes, info["phases_run"]]
if rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
if world > 1:
    # Leave together, as train_gpt.finish() does: a rank that exits right after its last collective can abort
    # ("terminate called without an active exception") while Gloo's threads still hold that collective.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_distributed_sliding_and_ttt_match_one_process(tmp_path):
    """Sliding, and phased TTT scoring with the base model, total as one process does; phased TTT with LoRA steps
    and 2 phases (the ranks pause together, all_reduce_ and sync_gradients over gloo) scores every target once and
    runs both phases: its loss differs, since the ranks claim batches in another order."""
    script = tmp_path / "dist_eval.py"
    script.write_text(DIST_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(script), str(one)], check=True, env=env, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(two)], env=env, timeout=300, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    for key in ("sliding", "ttt_base", "ttt"):
        assert a[key][1:] == b[key][1:], key
    for key in ("sliding", "ttt_base"):
        assert b[key][0] == pytest.approx(a[key][0], rel=1e-5), key
    assert a["ttt"][3] == 2 and math.isfinite(b["ttt"][0]) and a["ttt"][0] != a["ttt_base"][0]
