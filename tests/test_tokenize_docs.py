"""data/tokenize_docs.py and data/verify_tokenizer.py on real challenge documents.

    python -m pytest -q tests/test_tokenize_docs.py

The real-data tests export the first 60 of the 200 challenge documents in ../shared/data with the
canonical sp1024 tokenizer (val = the first 20, small shards so documents cross shard boundaries)
and skip with a reason when that folder is absent. The tools run in this process through their
`main(argv)` (fast: torch is already imported), except one real command line per tool.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CANONICAL_TOKENIZER, read_jsonl_texts

ROOT = Path(__file__).resolve().parent.parent
VAL_DOCS, N_DOCS, SHARD_TOKENS, SEQ_LEN = 20, 60, 20_000, 128


def load_tool(name: str):
    """Import data/<name>.py as a module (data/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"pg_{name}", ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


tokenize_docs = load_tool("tokenize_docs")
verify_tokenizer = load_tool("verify_tokenizer")


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def split_documents(tokens: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == tg.BOS_ID)
    assert starts.size and starts[0] == 0, "every split starts with a document's BOS"
    return np.split(tokens, starts[1:])


def read_split(folder: Path, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(tg.load_shard(f)) for f in tg.list_shards(folder, split)])


@pytest.fixture(scope="module")
def export(shared_data, tmp_path_factory) -> dict:
    """The 60-document slice exported by the real command line."""
    tmp = tmp_path_factory.mktemp("export")
    texts = read_jsonl_texts(shared_data / "corpus" / "fineweb_challenge_docs_200.jsonl", limit=N_DOCS)
    docs = write_jsonl(tmp / "docs.jsonl", texts)
    out = tmp / "fineweb10B_sp1024_slice"
    r = subprocess.run([sys.executable, str(ROOT / "data" / "tokenize_docs.py"), "--docs", str(docs),
                        "--tokenizer", str(CANONICAL_TOKENIZER), "--output", str(out),
                        "--val-docs", str(VAL_DOCS), "--shard-tokens", str(SHARD_TOKENS), "--workers", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return {"dir": out, "docs": docs, "texts": texts, "stdout": r.stdout}


@pytest.mark.slow
def test_shards_are_the_documents_and_the_splits_are_disjoint(export):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(CANONICAL_TOKENIZER))
    out, texts = export["dir"], export["texts"]
    val, train = split_documents(read_split(out, "val")), split_documents(read_split(out, "train"))
    assert len(val) == VAL_DOCS and len(train) == N_DOCS - VAL_DOCS
    # Each document is exactly [BOS] + encode(text), in file order: val = the first 20, train = the rest.
    for doc, text in zip(val + train, texts):
        assert doc.tolist() == [tg.BOS_ID] + sp.encode(text)
        assert sp.decode(doc[1:].tolist()) == sp.normalize(text).replace("\u2581", " ")
    assert not {t for t in texts[:VAL_DOCS]} & {t for t in texts[VAL_DOCS:]}  # disjoint in content too
    assert len(tg.list_shards(out, "val")) > 1 and len(tg.list_shards(out, "train")) > 1  # documents cross shards

    m = json.loads((out / "manifest.json").read_text())
    assert m["split"]["val_doc_range"] == [0, VAL_DOCS - 1] and m["split"]["train_doc_range"] == [VAL_DOCS, N_DOCS - 1]
    assert m["split"]["shared_documents"] == 0 and m["split"]["train_docs_repeating_val_text"] == 0
    assert m["val"]["documents"] == VAL_DOCS and m["train"]["documents"] == N_DOCS - VAL_DOCS
    for split in ("val", "train"):
        files = tg.list_shards(out, split)
        assert m[split]["tokens"] == sum(tg.read_shard_header(f) for f in files)
        assert [s["file"] for s in m[split]["shards"]] == [f.name for f in files]
        assert sum(s["docs_started"] for s in m[split]["shards"]) == m[split]["documents"]
    for name, info in m["files"].items():
        assert tg.sha256_file(out / name) == info["sha256"] and (out / name).stat().st_size == info["bytes"]
    assert m["tokenizer"]["sha256"] == tg.sha256_file(CANONICAL_TOKENIZER)
    assert m["docs"]["documents"] == N_DOCS and m["docs"]["sha256"] == tg.sha256_file(export["docs"])
    assert "tokens_per_s:" in export["stdout"] and "shared_documents:0" in export["stdout"]


def printed_train_env(stdout: str) -> dict[str, str]:
    """The variables of the `... python train_gpt.py` command a tool prints last."""
    line = [row for row in stdout.splitlines() if row.endswith("python train_gpt.py")][-1]
    words = line.removesuffix("python train_gpt.py").split()
    return dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S+", w))


def check_printed_command(stdout: str, out: Path) -> tg.Hyperparameters:
    """Under the default preset, the printed command reads these shards and passes their text-transform check."""
    h = tg.Hyperparameters.from_env(printed_train_env(stdout))
    m = json.loads((out / "manifest.json").read_text())
    tg.check_transform(h, m["text_transform"], str(out / "manifest.json"))  # raises DataError on a mismatch
    assert h.dataset_dir == out and h.tokenizer_file.is_file() and h.vocab_size == m["tokenizer"]["vocab_size"]
    return h


def test_the_printed_train_command_runs_on_the_export(export):
    assert not check_printed_command(export["stdout"], export["dir"]).caseops_enabled  # plain text, sp1024


@pytest.mark.slow
def test_verifier_counts_what_train_gpt_scores(export, tmp_path, capsys):
    report_path = tmp_path / "proof.json"
    rc = verify_tokenizer.main(["--tokenizer", str(CANONICAL_TOKENIZER), "--data", str(export["dir"]),
                                "--docs", str(export["docs"]), "--seq-len", str(SEQ_LEN), "--report", str(report_path)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads(report_path.read_text())

    # train_gpt.py's own numbers, computed with its own functions (what prepare_data + eval_val do).
    sp = tg.load_tokenizer(CANONICAL_TOKENIZER, 1024)
    luts = tg.build_byte_luts(sp, CANONICAL_TOKENIZER)
    val_files = tg.list_shards(export["dir"], "val")

    def train_gpt_count(seq_len: int) -> tuple[int, int]:
        tokens = torch.from_numpy(tg.load_validation_tokens(val_files, seq_len, 1024).astype(np.int64))
        return tokens.numel() - 1, int(tg.count_target_bytes(tokens[:-1], tokens[1:], luts).sum())

    val_tokens, val_bytes = train_gpt_count(SEQ_LEN)
    assert (report["scored"]["val_tokens"], report["scored"]["val_bytes"]) == (val_tokens, val_bytes)
    assert f"val_tokens:{val_tokens} val_bytes:{val_bytes} " in printed  # the names train_gpt.py logs
    fingerprint = tg.dataset_fingerprint(tg.list_shards(export["dir"], "train"), val_files, CANONICAL_TOKENIZER)
    assert report["val_tokens_raw"] == fingerprint["val_tokens_raw"]
    # The whole stream is train_gpt.py's count at EVAL_SEQ_LEN=1, and equals the decoded UTF-8 bytes.
    assert (report["stream"]["targets"], report["stream"]["bytes"]) == train_gpt_count(1)
    assert report["stream"]["bytes"] == report["stream"]["decoded_utf8_bytes"]
    assert report["stream"]["bytes"] - report["scored"]["val_bytes"] == report["scored"]["dropped_bytes"] > 0
    src = report["source"]
    assert src["documents_compared"] == src["equal_to_normalized_source"] == VAL_DOCS
    assert src["source_utf8_bytes"] == sum(len(t.encode()) for t in export["texts"][:VAL_DOCS])
    assert report["ok"] and "verify_tokenizer:ok" in printed


@pytest.mark.slow
def test_verifier_names_a_document_that_does_not_match(export, tmp_path, capsys):
    texts = list(export["texts"][:VAL_DOCS])
    texts[3] = texts[3].replace(" the ", " a ", 1)
    rc = verify_tokenizer.main(["--tokenizer", str(CANONICAL_TOKENIZER), "--data", str(export["dir"]),
                                "--docs", str(write_jsonl(tmp_path / "edited.jsonl", texts))])
    out = capsys.readouterr().out
    assert rc == 1
    assert "mismatches:1" in out and "document 3: decoded text differs" in out and "verify_tokenizer:FAILED" in out


@pytest.mark.slow
def test_a_failed_run_leaves_the_previous_dataset_untouched(export, tmp_path, capsys):
    out = tmp_path / "ds"
    texts = export["texts"][:30]
    assert tokenize_docs.main(["--docs", str(write_jsonl(tmp_path / "a.jsonl", texts)), "--tokenizer",
                               str(CANONICAL_TOKENIZER), "--output", str(out), "--val-docs", "10"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken.jsonl"
    broken.write_text(write_jsonl(tmp_path / "b.jsonl", texts).read_text() + "{not json\n", encoding="utf-8")
    rc = tokenize_docs.main(["--docs", str(broken), "--tokenizer", str(CANONICAL_TOKENIZER), "--output", str(out),
                             "--val-docs", "5", "--force"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--docs={broken} line 31: not valid JSON" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # val shards of the failed run never landed
    assert [p.name for p in tmp_path.iterdir() if ".build-" in p.name] == []  # no temporary folder left


@pytest.mark.slow
def test_spec_trains_the_recipe_tokenizer_on_training_documents_only(export, tmp_path, capsys):
    out = tmp_path / "sp1024_mine"
    rc = tokenize_docs.main(["--docs", str(export["docs"]), "--spec", "sp1024", "--output", str(out),
                             "--val-docs", str(VAL_DOCS), "--workers", "1"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    trained = m["tokenizer"]["trained"]
    assert trained["spec"] == "sp1024" and trained["documents_from"] == "train"
    assert trained["documents"] == N_DOCS - VAL_DOCS  # never read a validation document
    assert trained["trainer"]["normalization_rule_name"] == "nmt_nfkc" and trained["trainer"]["byte_fallback"]
    model = out / "fineweb_1024_bpe.model"
    assert (out / "fineweb_1024_bpe.vocab").is_file() and m["tokenizer"]["sha256"] == tg.sha256_file(model)
    assert verify_tokenizer.main(["--tokenizer", str(model), "--data", str(out), "--docs", str(export["docs"]),
                                  "--seq-len", "64"]) == 0


@pytest.mark.parametrize("extra, needle", [
    (["--val-docs", "0"], "--val-docs=0 is not allowed: expected an integer >= 1"),
    (["--val-docs", "3"], "--val-docs=3 is not allowed: --docs="),
    (["--spec", "sp2048"], "--spec=sp2048 is not allowed: expected one of sp1024, sp4096, sp8192"),
    (["--tokenizer", "missing.model"], "--tokenizer=missing.model: file not found"),
    (["--shard-tokens", "0"], "--shard-tokens=0 is not allowed"),
])
def test_bad_input_is_one_line_with_exit_code_2(extra, needle, tmp_path, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", ["one document.", "two documents.", "three."])
    if "--spec" not in extra and "--tokenizer" not in extra:
        extra = [*extra, "--tokenizer", str(CANONICAL_TOKENIZER)]
        if not CANONICAL_TOKENIZER.is_file():
            pytest.skip(f"shared data not present ({CANONICAL_TOKENIZER})")
    rc = tokenize_docs.main(["--docs", str(docs), "--output", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and needle in err[-1], err
    assert not (tmp_path / "out").exists()


def test_existing_dataset_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fineweb_val_000000.bin").write_bytes(b"")
    docs = write_jsonl(tmp_path / "docs.jsonl", ["a", "b"])
    rc = tokenize_docs.main(["--docs", str(docs), "--tokenizer", str(docs), "--output", str(out)])
    assert rc == 2 and "already holds a dataset (fineweb_val_000000.bin); pass --force" in capsys.readouterr().err


def test_verifier_bad_input(tmp_path, capsys):
    assert verify_tokenizer.main(["--tokenizer", str(tmp_path / "nope.model"), "--data", str(tmp_path)]) == 2
    assert "--tokenizer=" in capsys.readouterr().err
    if CANONICAL_TOKENIZER.is_file():
        assert verify_tokenizer.main(["--tokenizer", str(CANONICAL_TOKENIZER), "--data", str(tmp_path)]) == 2
        assert "fineweb_val_*.bin: no files match" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--val-docs", "3"], "--val-docs=3 is not allowed: --docs={docs} has 3 documents (non-blank lines), so it "
                          "leaves no training documents; expected a value from 1 to 2"),
    (["--val-docs", "7"], "--val-docs=7 is not allowed: --docs={docs} has 3 documents"),
    ([], "--val-docs=50000 (the default, the challenge's split) is not allowed: --docs={docs} has only 3 documents "
         "(non-blank lines), fewer than the default; pass --val-docs with a value from 1 to 2"),
])
@pytest.mark.parametrize("source", ["--tokenizer", "--spec"])
def test_val_docs_is_checked_against_the_document_count_before_tokenizing(extra, needle, source, tmp_path, capsys,
                                                                           monkeypatch):
    # Blank lines are not documents: 3 documents on 5 lines.
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "one document."}\n\n{"text": "two."}\n   \n{"text": "three."}\n', encoding="utf-8")

    def tokenize(*args, **kwargs):
        raise AssertionError("tokenizer training or encoding started before --val-docs was checked")

    monkeypatch.setattr(tokenize_docs, "build", tokenize)
    monkeypatch.setattr(tokenize_docs, "train_tokenizer", tokenize)
    src = ["--tokenizer", str(docs)] if source == "--tokenizer" else ["--spec", "sp1024"]
    rc = tokenize_docs.main(["--docs", str(docs), *src, "--output", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: " + needle.format(docs=docs)), err
    assert not (tmp_path / "out").exists()


def test_a_file_without_two_documents_cannot_be_split(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('\n{"text": "only one."}\n\n', encoding="utf-8")
    rc = tokenize_docs.main(["--docs", str(docs), "--tokenizer", str(docs), "--output", str(tmp_path / "out"),
                             "--val-docs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: --val-docs=1 is not allowed: --docs={docs} has 1 document(s) (non-blank "
                               "lines); a split needs at least 2, one for validation and one for training"], err


def corrupt_models(tmp_path: Path) -> dict[str, Path]:
    """Damaged tokenizer files: random bytes, and with the canonical model, a truncated copy and a copy
    whose piece '▁the' has a byte that is not UTF-8 (it loads; reading the piece fails)."""
    models = {"random": np.random.default_rng(0).integers(0, 256, 37, dtype=np.uint8).tobytes()}
    if CANONICAL_TOKENIZER.is_file():
        good = CANONICAL_TOKENIZER.read_bytes()
        models["truncated"] = good[: len(good) // 2]
        at = good.index("\u2581the".encode())
        models["bad_piece"] = good[: at + 3] + b"\xff" + good[at + 4:]
    paths = {}
    for name, data in models.items():
        paths[name] = tmp_path / f"{name}.model"
        paths[name].write_bytes(data)
    return paths


def test_a_corrupt_tokenizer_is_one_line_with_exit_code_2(tmp_path, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", ["one document.", "two documents.", "three."])
    models = corrupt_models(tmp_path)
    for name, model in models.items():
        rc = tokenize_docs.main(["--docs", str(docs), "--tokenizer", str(model), "--output", str(tmp_path / "out"),
                                 "--val-docs", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (name, err)
        assert err[0].startswith(f"error: --tokenizer={model} is not a readable SentencePiece model ("), (name, err)
        assert not (tmp_path / "out").exists()
        rc = verify_tokenizer.main(["--tokenizer", str(model), "--data", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (name, err)
        assert err[0].startswith(f"error: --tokenizer={model} is not a readable SentencePiece model ("), (name, err)
    if "bad_piece" in models:
        assert "is not UTF-8" in str(err)
    else:
        pytest.skip(f"shared data not present ({CANONICAL_TOKENIZER}): only the random-bytes file was checked")


@pytest.mark.slow
def test_a_corrupt_tokenizer_on_the_command_line_gives_no_traceback(tmp_path):
    model = corrupt_models(tmp_path)["random"]
    docs = write_jsonl(tmp_path / "docs.jsonl", ["one document.", "two documents."])
    for tool, args in (("tokenize_docs", ["--docs", str(docs), "--output", str(tmp_path / "out"), "--val-docs", "1"]),
                       ("verify_tokenizer", ["--data", str(tmp_path)])):
        r = subprocess.run([sys.executable, str(ROOT / "data" / f"{tool}.py"), "--tokenizer", str(model), *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (tool, r.stderr)
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "not a readable SentencePiece model" in r.stderr


@pytest.mark.slow
def test_verifier_refuses_a_tokenizer_that_is_not_the_one_the_manifest_records(export, tmp_path, capsys):
    """Even without --docs: the manifest beside the shards names the tokenizer they were made with."""
    other = CANONICAL_TOKENIZER.parent / "variants" / "CiprianFlorin-Ifrim" / "fineweb_1024_bpe.model"
    if not other.is_file():
        pytest.skip(f"{other} (a second 1024-piece tokenizer) is not present")
    if not verify_tokenizer.main(["--tokenizer", str(other), "--data", str(export["dir"])]) == 2:
        pytest.fail(capsys.readouterr().out)
    err = capsys.readouterr().err
    assert f"{other}: sha256 {tg.sha256_file(other)} is not the tokenizer {tg.sha256_file(CANONICAL_TOKENIZER)}" in err
    assert "set --tokenizer to the tokenizer" in err and "TOKENIZER_PATH" not in err  # the tool's flag, not the knob


# ---------------------------------------------------------------------------------------------
# CaseOps (PR #1729): --caseops writes the transformed text and the validation byte sidecar;
# data/train_tokenizer.py rebuilds a CaseOps tokenizer. These run without ../shared/data: the
# documents are paragraphs of CPython's pydoc topics (whitespace folded and NFKC-stable, so
# SentencePiece's normalizer leaves them alone), the tokenizer a tiny one trained here.
# ---------------------------------------------------------------------------------------------

train_tokenizer_tool = load_tool("train_tokenizer")
caseops = tokenize_docs.caseops()
TINY_VOCAB, CASEOPS_DOCS, CASEOPS_VAL = 400, 80, 10


def caseops_texts(n: int) -> list[str]:
    """Paragraphs with capitals that SentencePiece's nmt_nfkc leaves as they are (single spaces, NFKC-stable)."""
    import unicodedata
    from pydoc_data.topics import topics

    paragraphs = (" ".join(p.split()) for key in sorted(topics) for p in topics[key].split("\n\n"))
    texts = [p for p in paragraphs if len(p) > 200 and any(c.isupper() for c in p)
             and unicodedata.normalize("NFKC", p) == p][:n]
    assert len(texts) == n
    return texts


def sidecar_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("fineweb_val_bytes_*.bin"))


def token_shards(folder: Path, split: str) -> list[Path]:
    """fineweb_<split>_*.bin without the byte sidecars (whose names match fineweb_val_*.bin too)."""
    return [p for p in sorted(folder.glob(f"fineweb_{split}_*.bin")) if not p.name.startswith("fineweb_val_bytes_")]


@pytest.fixture(scope="module")
def tiny_caseops(tmp_path_factory) -> dict:
    """A 400-piece CaseOps tokenizer trained by data/train_tokenizer.py (the real command line)."""
    tmp = tmp_path_factory.mktemp("caseops")
    texts = caseops_texts(CASEOPS_DOCS)
    docs = write_jsonl(tmp / "docs.jsonl", texts)
    r = subprocess.run([sys.executable, str(ROOT / "data" / "train_tokenizer.py"), "--docs", str(docs), "--output",
                        str(tmp / "tok"), "--vocab-size", str(TINY_VOCAB), "--val-docs", str(CASEOPS_VAL),
                        "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    model = tmp / "tok" / f"fineweb_{TINY_VOCAB}_bpe_lossless_caps_caseops_v1_reserved.model"
    return {"tmp": tmp, "docs": docs, "texts": texts, "model": model, "stdout": r.stdout}


@pytest.mark.slow
def test_train_tokenizer_reserves_the_operators_and_round_trips(tiny_caseops):
    import sentencepiece as spm

    model = tiny_caseops["model"]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == TINY_VOCAB and (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(caseops.OPERATORS)  # the record's ids
    assert caseops.reserved_piece_problems(sp) == []
    report = json.loads(model.with_suffix(".json").read_text())
    assert report["text_transform"] == caseops.TRANSFORM_NAME and report["documents_from"] == "train"
    assert report["documents"] == CASEOPS_DOCS - CASEOPS_VAL  # never read a validation document
    assert report["trainer"]["user_defined_symbols"] == list(caseops.OPERATORS)
    assert report["trainer"]["byte_fallback"] and report["trainer"]["normalization_rule_name"] == "nmt_nfkc"
    assert report["model_sha256"] == tg.sha256_file(model) and model.with_suffix(".vocab").is_file()
    assert "transform:lossless_caps_caseops_v1" in tiny_caseops["stdout"]
    operators = 0
    for text in tiny_caseops["texts"]:
        ids = sp.encode(caseops.encode(text))
        operators += sum(i in caseops.RESERVED_PIECE_IDS.values() for i in ids)
        assert caseops.decode(sp.decode(ids)) == text  # transform -> tokenize -> detokenize -> inverse
    assert operators > 100


@pytest.mark.slow
def test_train_tokenizer_bad_input_is_one_line(tiny_caseops, capsys):
    out = tiny_caseops["tmp"] / "tok"
    rc = train_tokenizer_tool.main(["--docs", str(tiny_caseops["docs"]), "--output", str(out),
                                    "--vocab-size", str(TINY_VOCAB), "--val-docs", str(CASEOPS_VAL)])
    assert rc == 2 and "already holds fineweb_400_bpe_lossless_caps_caseops_v1_reserved.model; pass --force" in \
        capsys.readouterr().err
    rc = train_tokenizer_tool.main(["--docs", str(tiny_caseops["docs"]), "--output", str(out / "x"),
                                    "--vocab-size", "100", "--val-docs", str(CASEOPS_VAL)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --vocab-size=100 with --docs=") and "Vocabulary size" in err[-1]
    rc = train_tokenizer_tool.main(["--docs", str(tiny_caseops["docs"]), "--output", str(out / "y")])
    assert rc == 2 and "--val-docs=50000 is not allowed" in capsys.readouterr().err


def check_caseops_export(out: Path, texts: list[str], val_docs: int, model: Path) -> dict:
    """The shards hold [BOS] + sp.encode(caseops.encode(text)); each sidecar shard has its val shard's token
    count, 0 at BOS, and every validation document's counts add up to its UTF-8 length."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    val = np.concatenate([np.asarray(tg.load_shard(f)) for f in token_shards(out, "val")])
    train = np.concatenate([np.asarray(tg.load_shard(f)) for f in token_shards(out, "train")])
    sidecars = sidecar_shards(out)
    assert [tg.read_shard_header(f) for f in sidecars] == [tg.read_shard_header(f) for f in token_shards(out, "val")]
    counts = np.concatenate([np.asarray(tg.load_shard(f)) for f in sidecars])
    docs = split_documents(val) + split_documents(train)
    assert len(docs) == len(texts)
    for doc, text in zip(docs, texts):
        assert doc.tolist() == [tg.BOS_ID] + sp.encode(caseops.encode(text))
    starts = np.flatnonzero(val == tg.BOS_ID)
    for i, (a, b) in enumerate(zip(starts, list(starts[1:]) + [val.size])):
        assert counts[a] == 0 and int(counts[a:b].sum()) == len(texts[i].encode("utf-8"))
        assert counts[a:b].tolist() == caseops.token_original_bytes(sp, val[a:b], texts[i]).tolist()
    m = json.loads((out / "manifest.json").read_text())
    assert m["text_transform"] == caseops.TRANSFORM_NAME and m["tokenizer"]["sha256"] == tg.sha256_file(model)
    side = m["byte_sidecar"]
    assert side["original_bytes"] == m["val"]["text_bytes"] == sum(len(t.encode()) for t in texts[:val_docs])
    assert [s["file"] for s in side["shards"]] == [f.name for f in sidecars]
    for f in sidecars:  # the sidecars' hashes, like every other file's
        assert m["files"][f.name]["sha256"] == tg.sha256_file(f)
    return m


@pytest.mark.slow
def test_caseops_export_writes_the_transformed_shards_and_the_byte_sidecar(tiny_caseops, tmp_path, capsys):
    out = tmp_path / "caseops"
    rc = tokenize_docs.main(["--docs", str(tiny_caseops["docs"]), "--caseops", "--tokenizer", str(tiny_caseops["model"]),
                             "--output", str(out), "--val-docs", str(CASEOPS_VAL), "--shard-tokens", "1000",
                             "--workers", "1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert len(sidecar_shards(out)) > 1  # documents cross shard boundaries, sidecars follow
    m = check_caseops_export(out, tiny_caseops["texts"], CASEOPS_VAL, tiny_caseops["model"])
    assert f"byte_sidecar shards:{len(sidecar_shards(out))} original_bytes:{m['val']['text_bytes']} " in printed
    assert check_printed_command(printed, out).caseops_enabled
    # The byte-table verifier does not apply to CaseOps shards: it says so instead of a byte count BPB does not use.
    assert verify_tokenizer.main(["--tokenizer", str(tiny_caseops["model"]), "--data", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --data={out}: CaseOps shards: their BPB counts the byte "), err

    # A spec with text_transform trains the CaseOps tokenizer and exports with it (--caseops implied).
    specs = json.loads(tokenize_docs.DEFAULT_SPECS.read_text())
    specs["specs"]["tiny_caseops"] = {**specs["specs"]["sp8192_caseops"], "vocab_size": TINY_VOCAB,
                                      "filename": "tiny_caseops.model"}
    specs_file = tmp_path / "specs.json"
    specs_file.write_text(json.dumps(specs))
    out2 = tmp_path / "caseops_spec"
    rc = tokenize_docs.main(["--docs", str(tiny_caseops["docs"]), "--spec", "tiny_caseops", "--specs-file",
                             str(specs_file), "--output", str(out2), "--val-docs", str(CASEOPS_VAL), "--workers", "1"])
    assert rc == 0, capsys.readouterr().err
    m2 = check_caseops_export(out2, tiny_caseops["texts"], CASEOPS_VAL, out2 / "tiny_caseops.model")
    assert m2["tokenizer"]["trained"]["text_transform"] == caseops.TRANSFORM_NAME


@pytest.mark.slow
def test_caseops_export_with_the_record_tokenizer(shared_data, tmp_path):
    """The record's own tokenizer on the first 60 challenge documents (val = 20), by the real command line."""
    model = shared_data / "tokenizers" / "variants" / "openai-parameter-golf-caseops" / \
        "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    if not model.is_file():
        pytest.skip(f"{model} is not present")
    texts = read_jsonl_texts(shared_data / "corpus" / "fineweb_challenge_docs_200.jsonl", limit=N_DOCS)
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    r = subprocess.run([sys.executable, str(ROOT / "data" / "tokenize_docs.py"), "--docs", str(docs), "--caseops",
                        "--tokenizer", str(model), "--output", str(out), "--val-docs", str(VAL_DOCS),
                        "--shard-tokens", str(SHARD_TOKENS), "--workers", "2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    check_caseops_export(out, texts, VAL_DOCS, model)
    assert "CaseOps data (BPB counts the bytes in fineweb_val_bytes_*.bin)" in r.stdout
    assert check_printed_command(r.stdout, out).caseops_enabled  # the record's own knobs read it as printed


@pytest.mark.parametrize("case", ["plain_tokenizer", "plain_spec", "unattributable"])
@pytest.mark.slow
def test_caseops_bad_input_is_one_line_with_exit_code_2(case, tiny_caseops, tmp_path, capsys):
    texts = caseops_texts(4)
    if case == "unattributable":  # leading spaces: no piece's surface covers them (the record's rule cannot count them)
        texts[1] = "   " + texts[1]
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    if case == "plain_tokenizer":
        if not CANONICAL_TOKENIZER.is_file():
            pytest.skip(f"shared data not present ({CANONICAL_TOKENIZER})")
        src = ["--tokenizer", str(CANONICAL_TOKENIZER)]
        needle = f"--tokenizer={CANONICAL_TOKENIZER} is not allowed with --caseops: it is not a CaseOps tokenizer"
    elif case == "plain_spec":
        src = ["--spec", "sp1024"]
        needle = ("--spec=sp1024 is not allowed with --caseops: its tokenizer does not reserve the CaseOps operators; "
                  "expected one of sp8192_caseops")
    else:
        src = ["--tokenizer", str(tiny_caseops["model"])]
        needle = f"--docs={docs} line 2 (document 1): the per-token original byte counts add up to"
    rc = tokenize_docs.main(["--docs", str(docs), "--caseops", *src, "--output", str(tmp_path / "out"),
                             "--val-docs", "2", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and needle in err[-1], err
    assert not (tmp_path / "out").exists()
