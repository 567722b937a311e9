"""Provenance of a score: the tokenizer proves itself on the validation text, the shards match their manifest's
hashes, and an artifact records the data it was scored on and the knobs EVAL_ONLY takes from it."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from conftest import SHARED_DATA, tg
from pgolf import provenance, recover
from pgolf.shards import write_shard
from test_run import error_lines, run_script, tiny_env

OTHER_1024 = SHARED_DATA / "tokenizers" / "variants" / "CiprianFlorin-Ifrim" / "fineweb_1024_bpe.model"


@pytest.fixture(scope="module")
def other_tokenizer(dataset):
    """A 1,024-piece tokenizer that is not the one the `dataset` shards were made with."""
    if dataset["source"] != "shared" or not OTHER_1024.is_file():
        pytest.skip(f"needs the shared challenge data and {OTHER_1024} (another 1,024-piece tokenizer)")
    return OTHER_1024


def val_tokens(dataset) -> np.ndarray:
    return np.asarray(tg.load_shard(tg.list_shards(dataset["dir"], "val")[0]))


def reencode(tokens: np.ndarray, tokenizer, max_docs=None) -> tg.ReencodeCheck:
    sp = tg.load_tokenizer(tokenizer, 1024)
    return tg.tokenizer_check(tokens, sp, tg.build_byte_luts(sp).is_boundary.numpy(), max_docs, tokenizer, "val.bin")


def copy_dataset(dataset: dict, dest) -> dict:
    """The shards without a manifest (the embedded sample's would name an edited shard before the check tested)."""
    shutil.copytree(dataset["dir"], dest / "shards", ignore=shutil.ignore_patterns(*provenance.DATASET_MANIFESTS))
    return {**dataset, "dir": dest / "shards"}


# ---------------------------------------------------------------------------------------------
# The tokenizer reproduces the validation shards
# ---------------------------------------------------------------------------------------------


def test_the_datas_tokenizer_reencodes_every_document_and_another_is_refused(dataset, other_tokenizer):
    tokens = val_tokens(dataset)
    ok = reencode(tokens, dataset["tokenizer"])
    assert ok.reencoded == ok.checked == len(tg.document_spans(tokens)) - 1 > 10, ok  # all but the last
    cut = tokens[: int(np.flatnonzero(tokens == tg.BOS_ID)[-1]) + 7]  # the stream ends 6 tokens into a document
    assert reencode(cut, dataset["tokenizer"]).checked == ok.checked
    with pytest.raises(tg.DataError) as err:
        reencode(tokens, other_tokenizer)
    msg = str(err.value)
    assert msg.startswith(f"TOKENIZER_PATH={other_tokenizer} is not the tokenizer of val.bin: "), msg
    assert f"gives 0 of {ok.checked} validation documents back" in msg and "\n" not in msg, msg


def test_documents_with_unknown_tokens_are_left_out(other_tokenizer, shared_data):
    """A tokenizer without byte fallback writes <unk>, which decodes to ' ⁇ ': those documents cannot re-encode."""
    import sentencepiece as spm

    from conftest import read_jsonl_texts

    sp = spm.SentencePieceProcessor(model_file=str(other_tokenizer))
    docs = read_jsonl_texts(tg.Path(shared_data) / "corpus" / "fineweb_challenge_docs_200.jsonl", 60)
    tokens = np.concatenate([[tg.BOS_ID] + sp.encode(t) for t in docs]).astype(np.uint16)
    r = reencode(tokens, other_tokenizer)
    assert 0 < r.checked < 59 and r.reencoded == r.checked, r


@pytest.mark.slow
def test_a_wrong_tokenizer_without_a_manifest_exits_2_before_training(dataset, other_tokenizer, tmp_path):
    run = run_script(tmp_path, tiny_env(dataset, tmp_path, "wrongtok", TOKENIZER_PATH=other_tokenizer))
    assert run.rc == 2, run.describe()
    (line,) = error_lines(run)
    assert f"TOKENIZER_PATH={other_tokenizer}" in line and str(dataset["dir"]) in line and "gives 0 of" in line, line
    assert not any(line.startswith("step:") for line in run.log_lines)


# ---------------------------------------------------------------------------------------------
# Shards against their manifest's sha256
# ---------------------------------------------------------------------------------------------


def write_manifest(folder, name: str = "manifest.json", prefix: str = "", check: str = "sha256") -> None:
    files = {f"{prefix}{f.name}": {"bytes": f.stat().st_size, check: tg.sha256_file(f)}
             for f in sorted(folder.glob("fineweb_*.bin"))}
    (folder / name).write_text(json.dumps({"files": files}))


@pytest.mark.parametrize("prefix", ["", "datasets/fineweb10B_sp1024/"])  # tokenize_docs.py; make_sample, download
def test_shards_are_hashed_once_then_checked_by_size_and_time(dataset, tmp_path, prefix):
    data = copy_dataset(dataset, tmp_path)
    write_manifest(data["dir"], prefix=prefix)
    n = len(list(data["dir"].glob("fineweb_*.bin")))
    first = provenance.verify_shards(tg, data["dir"])
    assert (first["shards"], first["verified"], first["hashed_now"]) == (n, n, n), first
    assert json.loads((data["dir"] / ".shard_sha256.json").read_text())
    assert provenance.verify_shards(tg, data["dir"])["hashed_now"] == 0, "recorded: not hashed again"


@pytest.mark.slow
def test_a_shard_edited_after_its_manifest_is_refused(dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path)
    write_manifest(data["dir"])
    provenance.verify_shards(tg, data["dir"])  # verified and recorded, then edited: the same size
    shard = tg.list_shards(data["dir"], "train")[-1]
    want = tg.sha256_file(shard)
    raw = bytearray(shard.read_bytes())
    raw[-2:] = (int.from_bytes(raw[-2:], "little") ^ 1).to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    run = run_script(tmp_path, tiny_env(data, tmp_path, "edited"))
    assert run.rc == 2, run.describe()
    (line,) = error_lines(run)
    assert f"{shard}: sha256 {tg.sha256_file(shard)}, but " in line and f"records {want}" in line, line
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(tg.DataError, match=f"{shard}: {len(raw) - 2} bytes, but .* records {len(raw)}"):
        provenance.verify_shards(tg, data["dir"])


def test_without_per_file_sha256_the_shards_are_unverified(dataset, tmp_path, monkeypatch):
    data = copy_dataset(dataset, tmp_path)
    write_manifest(data["dir"], "download.json", "datasets/fineweb10B_sp1024/", check="git-sha1")
    assert provenance.verify_shards(tg, data["dir"]) is None
    assert provenance.verify_shards(tg, tmp_path) is None
    write_manifest(data["dir"], "download.json")  # a read-only shard folder: the record goes to ~/.cache
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tg.os, "access", lambda *a: False)
    assert provenance.verify_shards(tg, data["dir"])["hashed_now"] > 0
    assert (tmp_path / "home" / ".cache" / "parameter-golf" / "shard_sha256.json").is_file()
    assert not (data["dir"] / ".shard_sha256.json").exists()


# ---------------------------------------------------------------------------------------------
# EVAL_ONLY (pgolf/recover.py): the artifact's data and knobs
# ---------------------------------------------------------------------------------------------


def eval_only_h(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({"EVAL_ONLY": "1", "ARTIFACT": "x.ptz", **env})


def meta_for(**config) -> dict:
    return {"code_sha256": hashlib.sha256(b"code").hexdigest(), "config": config}


def test_eval_only_refuses_model_knobs_set_against_the_artifact():
    meta = meta_for(NUM_LAYERS=2, VOCAB_SIZE=1024, MODEL_DIM=64)
    with pytest.raises(tg.ConfigError) as err:
        recover.eval_only_config(tg, eval_only_h(NUM_LAYERS="7", VOCAB_SIZE="4096", MODEL_DIM="64"), meta, b"code",
                                 "x.ptz")
    msg = str(err.value)
    assert msg.startswith("NUM_LAYERS=7, VOCAB_SIZE=4096 not allowed with EVAL_ONLY=1: x.ptz was trained with "
                          "NUM_LAYERS=2, VOCAB_SIZE=1024"), msg
    # Set to its PRESET's default (11) is set all the same: the artifact's 2 would be taken without a word.
    with pytest.raises(tg.ConfigError, match="^NUM_LAYERS=11 not allowed with EVAL_ONLY=1: x.ptz was trained with "
                                             "NUM_LAYERS=2"):
        recover.eval_only_config(tg, eval_only_h(NUM_LAYERS="11"), meta, b"code", "x.ptz")
    # Knobs no variable sets, or set to the artifact's values, are taken without a word.
    h = recover.eval_only_config(tg, eval_only_h(PRESET="smoke", NUM_LAYERS="2"), meta, b"code", "x.ptz")
    assert (h.num_layers, h.vocab_size, h.model_dim) == (2, 1024, 64)


def test_eval_only_logs_the_model_knobs_it_takes_and_notes_another_preset():
    meta = meta_for(NUM_LAYERS=2, VOCAB_SIZE=1024, NUM_LOOPS=0)
    h = recover.eval_only_config(tg, eval_only_h(), meta, b"code", "x.ptz")
    lines = []
    recover.log_eval_only_knobs(tg, h, {"preset": "smoke"}, lines.append)
    assert lines[0] == ("eval_only_model_knobs:VOCAB_SIZE=1024,NUM_LAYERS=2,NUM_LOOPS=0 "
                        "other_model_knobs:PRESET=record_defaults artifact:x.ptz"), lines
    (note,) = lines[1:]
    assert note.startswith("WARNING: PRESET=record, but x.ptz was trained under PRESET=smoke: ") and \
        "EVAL_SEQ_LEN=2048 (smoke: 128)" in note, note
    lines.clear()
    recover.log_eval_only_knobs(tg, h, {"preset": "record"}, lines.append)
    assert len(lines) == 1


def test_eval_only_refuses_another_tokenizer_or_validation_set(tmp_path):
    h = eval_only_h(TOKENIZER_PATH="t.model", DATA_PATH="shards")
    fp = {"tokenizer_sha256": "a" * 64, "val_sha256": "b" * 64}
    recover.check_artifact_data(tg, h, {"data": dict(fp)}, fp, print)
    with pytest.raises(tg.DataError, match=f"^TOKENIZER_PATH=t.model: tokenizer_sha256 {'a' * 64}, but x.ptz was "
                                           f"trained and scored with tokenizer_sha256 {'c' * 64}"):
        recover.check_artifact_data(tg, h, {"data": {**fp, "tokenizer_sha256": "c" * 64}}, fp, print)
    with pytest.raises(tg.DataError, match=f"^DATA_PATH=shards: val_sha256 {'b' * 64}, but .* val_sha256 {'d' * 64}"):
        recover.check_artifact_data(tg, h, {"data": {**fp, "val_sha256": "d" * 64}}, fp, print)
    lines = []
    recover.check_artifact_data(tg, h, {}, fp, lines.append)
    assert lines == ["WARNING: x.ptz records no tokenizer or validation sha256: the data it is scored on is unchecked"]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("provenance")
    run = run_script(out, tiny_env(copy_dataset(dataset, out), out, "trained"))
    assert run.rc == 0, run.describe()
    return run


@pytest.mark.slow
def test_a_run_logs_its_checks_and_its_artifact_records_the_data(trained, dataset):
    log = trained.log_lines
    assert any(x.startswith("tokenizer_check:ok reencoded:") and " seconds:" in x for x in log), log
    assert "shard_hashes:unverified (no per-file hashes)" in log
    _, meta = recover.read_artifact(tg, trained.path("ptz"))
    assert meta["preset"] == "record" and meta["data"] == {"tokenizer_sha256": tg.sha256_file(dataset["tokenizer"]),
                                                           "val_sha256": trained.metrics["dataset"]["val_sha256"]}


@pytest.mark.slow
def test_eval_only_on_other_validation_shards_or_knobs_exits_2(trained, dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path)
    val = tg.list_shards(data["dir"], "val")[0]
    tokens = tg.load_shard(val)
    write_shard(val, np.asarray(tokens[: int(np.flatnonzero(tokens == tg.BOS_ID)[-1])]))  # one document less
    run = run_script(tmp_path, tiny_env(data, tmp_path, "otherval", EVAL_ONLY=1, ARTIFACT=trained.path("ptz")))
    assert run.rc == 2, run.describe()
    (line,) = error_lines(run)
    assert f"DATA_PATH={data['dir']}: val_sha256 {hashlib.sha256(val.read_bytes()).hexdigest()}, but" in line, line
    assert f"val_sha256 {trained.metrics['dataset']['val_sha256']}" in line, line
    knobs = run_script(tmp_path, tiny_env(dataset, tmp_path, "knobs", EVAL_ONLY=1, ARTIFACT=trained.path("ptz"),
                                          NUM_LAYERS=3))
    assert knobs.rc == 2 and "NUM_LAYERS=3 not allowed with EVAL_ONLY=1" in error_lines(knobs)[0], knobs.describe()


@pytest.mark.slow
def test_eval_only_under_another_preset_says_so(trained, dataset, tmp_path):
    env = tiny_env(dataset, tmp_path, "smoke_rescore", EVAL_ONLY=1, ARTIFACT=trained.path("ptz"), PRESET="smoke",
                   SAMPLE_DATA=0)
    run = run_script(tmp_path, env)
    assert run.rc == 0, run.describe()
    assert any(x.startswith("eval_only_model_knobs:") and "NUM_LAYERS=2" in x for x in run.log_lines), run.log_lines
    assert any(x.startswith("WARNING: PRESET=smoke, but") and "PRESET=record" in x for x in run.log_lines)


def test_a_copy_without_pgolf_fingerprints_the_data_but_checks_no_manifest(dataset, tmp_path, monkeypatch):
    """The manifest checks are the repository's pgolf/provenance.py: a shipped copy (no pgolf/ beside it) still
    fingerprints the shards and the tokenizer, says in its log that no manifest was checked, and edits nothing."""
    data = copy_dataset(dataset, tmp_path)
    write_manifest(data["dir"])
    env = tiny_env(data, tmp_path, "shipped")
    h = tg.Hyperparameters.from_env({k: v for k, v in env.items() if k != "STRICT_ENV"})
    d = tg.DistInfo(0, 1, tg.torch.device("cpu"))
    lines: list[str] = []
    with_pgolf = tg.prepare_data(h, d, lines.append)
    assert isinstance(with_pgolf.shards, dict) and with_pgolf.fingerprint["manifest"].endswith("manifest.json")
    monkeypatch.setitem(tg.sys.modules, "pgolf", None)
    alone = tg.prepare_data(h, d, lines.append)
    assert alone.shards == "unchecked" and alone.fingerprint["manifest"] is None
    for key in ("val_sha256", "tokenizer_sha256", "val_tokens", "val_documents"):
        assert alone.fingerprint[key] == with_pgolf.fingerprint[key], key
    lines.clear()
    tg.log_data_checks(h, alone, lines.append)
    assert "shard_hashes:unchecked" in lines and any(" manifest:unchecked " in line for line in lines), lines
    assert any(line.startswith("WARNING: pgolf/ is not beside this script: the shards in ") for line in lines), lines
