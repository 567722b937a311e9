"""CASEOPS_ENABLED: BPB counted on the original text through the byte sidecar (PR #1729), in every
evaluation path, with the run refused when the sidecar or the manifest does not fit.

The end-to-end test builds a real CaseOps dataset from shared documents with data/tokenize_docs.py and
the record's CaseOps tokenizer, runs train_gpt.py on it, and compares the bytes it scored with an
independent count: the UTF-8 length of the original validation documents."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, eval_ctx, tg
from pgolf.shards import write_shard
from test_doc_isolation import iso_model
from test_eval import fake_luts, val_stream

SHARED = ROOT.parent / "shared" / "data"
CASEOPS_TOKENIZER = (SHARED / "tokenizers" / "variants" / "openai-parameter-golf-caseops" /
                     "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
DOCS = SHARED / "corpus" / "fineweb_challenge_docs_200.jsonl"


def caseops_module():
    spec = importlib.util.spec_from_file_location("caseops", ROOT / "data" / "caseops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scripts_decoder_inverts_the_data_transform():
    co = caseops_module()
    rng = random.Random(0)
    alphabet = "aZbYcX iPhone NASA McDonald's \u00e9\u00c9\u00df 12 \n\t" + "".join(co.OPERATORS) + "\ue000"
    samples = ["The NASA Launch", "iPhone OpenAI", "A", "", "\ue001literal\ue004"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for text in samples:
        assert tg.caseops_decode(co.encode(text)) == text, text


def stream_bytes(ctx) -> np.ndarray:
    """The byte-table count of every target position of a stream (index 0 unused)."""
    t = ctx.tokens
    counted = tg.count_target_bytes(t[:-1], t[1:], ctx.luts)
    return torch.cat((torch.zeros(1, dtype=counted.dtype), counted))


@pytest.mark.parametrize("stride", [32, 8])
def test_every_window_evaluation_counts_the_sidecar(stride):
    model = iso_model(doc_isolation=False)
    val = val_stream(32 * 6 + 1, vocab=96)
    luts = fake_luts(96)
    ctx = eval_ctx(model, val, luts, 32, stride=stride)
    same = tg.dataclasses.replace(ctx, sidecar=stream_bytes(ctx))
    with torch.no_grad():
        a, b = tg.eval_windows(ctx, stride), tg.eval_windows(same, stride)
    assert (a.bytes, a.tokens) == (b.bytes, b.tokens) and a.val_bpb == pytest.approx(b.val_bpb, rel=1e-12)
    doubled = tg.dataclasses.replace(ctx, sidecar=2 * stream_bytes(ctx))
    with torch.no_grad():
        assert tg.eval_windows(doubled, stride).bytes == 2 * a.bytes  # the sidecar, not the tables, is counted


@pytest.mark.slow
def test_phased_lora_ttt_counts_the_sidecar():
    val = val_stream(200, vocab=96)
    cfg = tg.LoRATTTConfig(rank=2, alpha=4.0, lr=1e-3, weight_decay=0.0, batch_docs=3, chunk=8, warm_start_a=True,
                           prefix_docs=2, phases=1, seed=0)
    sgd = tg.TTTConfig(lr=0.0, epochs=1, momentum=0.0, chunk_tokens=64, grad_clip=0.0)
    results = []
    for scale in (1, 3):
        model = iso_model(doc_isolation=False, num_loops=0, parallel_mode="off")
        ctx = eval_ctx(model, val, fake_luts(96), 32)
        ctx = tg.dataclasses.replace(ctx, sidecar=scale * stream_bytes(ctx))
        results.append(tg.eval_ttt_lora(ctx, model, cfg, sgd, 1e9, lambda s: None)[0])
    plain = tg.eval_windows(eval_ctx(iso_model(doc_isolation=False), val, fake_luts(96), 32), 32)
    assert results[0].bytes == plain.bytes and results[1].bytes == 3 * plain.bytes


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    if not (CASEOPS_TOKENIZER.is_file() and DOCS.is_file()):
        pytest.skip(f"needs the shared CaseOps tokenizer and documents ({SHARED}; see SOURCES.md)")
    out = tmp_path_factory.mktemp("caseops") / "data"
    cmd = [sys.executable, str(ROOT / "data" / "tokenize_docs.py"), "--docs", str(DOCS), "--caseops", "--tokenizer",
           str(CASEOPS_TOKENIZER), "--output", str(out), "--val-docs", "20", "--workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    docs = [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out, docs


def divisor_seq_len(n_targets: int) -> int:
    """An EVAL_SEQ_LEN that divides the validation targets, so the scored stream is every document whole."""
    return next(s for s in range(512, 15, -1) if n_targets % s == 0)


def caseops_env(path, tmp_path, run_id, **kw) -> dict[str, str]:
    env = dict(PRESET="smoke", DATA_PATH=str(path), TOKENIZER_PATH=str(CASEOPS_TOKENIZER), VOCAB_SIZE="8192",
               LOG_DIR=str(tmp_path), RUN_ID=run_id, ITERATIONS="2", MAX_WALLCLOCK_SECONDS="0", NUM_LAYERS="2",
               MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="256",
               WARMUP_STEPS="0", QUANT_METHOD="rtn", BPB_CHECK_DOCS="all", CASEOPS_ENABLED="1", SAMPLE_DATA="0")
    env.update(kw)
    return env


@pytest.mark.slow
def test_a_caseops_runs_bytes_are_the_original_documents_bytes(caseops_data, tmp_path):
    path, docs = caseops_data
    val = tg.load_shard(path / "fineweb_val_000000.bin")
    seq = divisor_seq_len(val.size - 1)
    assert tg.main(caseops_env(path, tmp_path, "co", EVAL_SEQ_LEN=str(seq))) == 0
    metrics = json.loads((tmp_path / "co.json").read_text())
    original = sum(len(text.encode("utf-8")) for text in docs[:20])  # the 20 validation documents, untouched
    result = metrics["evaluations"]["roundtrip"]
    assert result["bytes"] == original
    assert result["val_bpb"] == pytest.approx(result["val_loss"] * result["tokens"] / (original * np.log(2)), rel=1e-9)
    log = (tmp_path / "co.txt").read_text()
    assert "byte_accounting:caseops_sidecar" in log and "compliance:dataset" in log
    # the tokenizer's NFKC normalization makes some decoded documents differ from their original by a few bytes
    assert 0 <= metrics["bpb_check"]["normalized"] < 20


@pytest.mark.slow
def test_caseops_shards_without_caseops_enabled_are_refused(caseops_data, tmp_path, capsys):
    path, _ = caseops_data
    assert tg.main(caseops_env(path, tmp_path, "off", CASEOPS_ENABLED="0")) != 0
    err = capsys.readouterr().err
    assert "CASEOPS_ENABLED=0 is not allowed for these shards" in err and "lossless_caps_caseops_v1" in err


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing; CASEOPS_ENABLED=1 (the record's default) counts bytes from the sidecar"),
    ("short", "byte counts for the"),
    ("wrong", "BPB self-check failed"),
])
@pytest.mark.slow
def test_a_missing_or_inconsistent_sidecar_is_refused_in_one_line(caseops_data, tmp_path, capsys, damage, message):
    src, _ = caseops_data
    path = tmp_path / "data"
    path.mkdir()
    for f in src.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]  # its hashes would name the damaged file first (tests/test_provenance.py)
    (path / "manifest.json").write_text(json.dumps(manifest))
    side = path / "fineweb_val_bytes_000000.bin"
    counts = tg.load_shard(side).copy()
    if damage == "missing":
        side.unlink()
    elif damage == "short":
        write_shard(side, counts[:-1])
    else:  # the second document counted twice: not the original text's bytes
        tokens = tg.load_shard(path / "fineweb_val_000000.bin")
        lo, hi = tg.document_spans(tokens)[1]
        counts[lo:hi] *= 2
        write_shard(side, counts)
    assert tg.main(caseops_env(path, tmp_path, "bad")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err), err[-3:]
