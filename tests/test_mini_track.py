"""bench/mini_track.py: argument and variant parsing, the run environment, the report from metrics
JSONs, the dataset cache key, the shared-data fallback, and one tiny end-to-end sweep.

Run: python -m pytest -q tests/test_mini_track.py       (the end-to-end sweep and the shared-data preparation
     are @pytest.mark.slow, about a minute on a 2-core CPU; -m "not slow" leaves them out)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CANONICAL_TOKENIZER, ROOT, tg


def _load():
    spec = importlib.util.spec_from_file_location("mini_track", ROOT / "bench" / "mini_track.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mini_track"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


mt = _load()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Cache and RESULTS.md in tmp_path, never the repository's."""
    monkeypatch.setattr(mt, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(mt, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.delenv("MINI_TRAIN_SECONDS", raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def test_defaults(monkeypatch):
    monkeypatch.delenv("MINI_TRAIN_SECONDS", raising=False)
    plan = mt.build_plan([])
    assert list(plan.configs) == ["baseline", "record"]
    assert plan.seeds == [1337, 42] and plan.seconds == 240.0
    assert plan.append and not plan.as_json
    assert plan.configs["baseline"]["PRESET"] == "baseline" and plan.configs["record"]["PRESET"] == "record"


def test_seconds_from_env_and_flag():
    assert mt.build_plan([], {"MINI_TRAIN_SECONDS": "30"}).seconds == 30.0
    assert mt.build_plan(["--seconds", "12.5"], {"MINI_TRAIN_SECONDS": "30"}).seconds == 12.5
    for bad in ("0", "-3", "abc", "inf", "nan"):
        with pytest.raises(mt.UsageError, match="--seconds"):
            mt.build_plan(["--seconds", bad], {})
    with pytest.raises(mt.UsageError, match="MINI_TRAIN_SECONDS='ten'"):
        mt.build_plan([], {"MINI_TRAIN_SECONDS": "ten"})


def test_seeds_parsing():
    assert mt.parse_seeds("1337") == [1337]
    assert mt.parse_seeds("1, 2,3") == [1, 2, 3]
    for bad, why in (("1,x", "integers"), ("1,1", "twice"), ("-1", ">= 0"), ("", "integers")):
        with pytest.raises(mt.UsageError, match=why):
            mt.parse_seeds(bad)


def test_variant_parsing():
    assert mt.parse_variant("wide=MODEL_DIM=192,NUM_HEADS=6") == ("wide", {"MODEL_DIM": "192", "NUM_HEADS": "6"})
    assert mt.parse_variant("no-xsa=XSA_LAST_N=0") == ("no-xsa", {"XSA_LAST_N": "0"})
    assert mt.parse_variant("eqr=MUON_EQ_R=0") == ("eqr", {"MUON_EQ_R": "0"})  # an alias train_gpt reads


@pytest.mark.parametrize("spec, message", [
    ("wide", "expected NAME=KEY=VAL"),
    ("wide=", "expected NAME=KEY=VAL"),
    ("1wide=MODEL_DIM=192", "must start with a letter"),
    ("wi de=MODEL_DIM=192", "must start with a letter"),
    ("wide=MODEL_DIM", "expected KEY=VAL"),
    ("wide=MODEL_DIM=192,", "expected KEY=VAL"),
    ("wide=MODEL_DIMM=192", "did you mean MODEL_DIM"),
    ("wide=model_dim=192", "not a knob"),
    ("wide=SEED=7", "fixed by the track"),
    ("wide=EVAL_STRIDE=32", "fixed by the track"),
    ("wide=MAX_WALLCLOCK_SECONDS=600", "fixed by the track"),
    ("wide=MODEL_DIM=192,MODEL_DIM=256", "set twice"),
])
def test_variant_errors(spec, message):
    with pytest.raises(mt.UsageError, match=message):
        mt.parse_variant(spec)


@pytest.mark.parametrize("spec, message", [
    ("ttt=NUM_LAYERS=3", "only test-time training knobs"),
    ("ttt=EVAL_STRIDE=32", "only test-time training knobs"),
    ("ttt=TTT_LORA_RANKK=4", "did you mean TTT_LORA_RANK"),
    ("ttt", "expected NAME=KEY=VAL"),
])
def test_eval_variant_errors(spec, message):
    with pytest.raises(mt.UsageError, match=message):
        mt.parse_variant(spec, "--eval-variant")


def test_eval_variants_turn_ttt_on_and_are_checked_by_train_gpt():
    plan = mt.build_plan(["--eval-variant", "lora=TTT_LORA_RANK=8,GLOBAL_TTT_EPOCHS=2"], {})
    assert plan.evals == {"lora": {"TTT_ENABLED": "1", "TTT_LORA_RANK": "8", "GLOBAL_TTT_EPOCHS": "2"}}
    with pytest.raises(mt.UsageError, match=r"configuration baseline\+lora: TTT_LORA_RANK=0 is not allowed"):
        mt.build_plan(["--eval-variant", "lora=TTT_LORA_RANK=0"], {})


def test_eval_configs_choose_which_runs_are_re_scored():
    plan = mt.build_plan(["--eval-variant", "lora=TTT_LORA_RANK=8", "--eval-configs", "record"], {})
    assert plan.eval_configs == ["record"]
    assert mt.build_plan(["--eval-variant", "lora=TTT_LORA_RANK=8"], {}).eval_configs == ["baseline", "record"]
    with pytest.raises(mt.UsageError, match="--eval-configs='nope' is not allowed"):
        mt.build_plan(["--eval-variant", "lora=TTT_LORA_RANK=8", "--eval-configs", "nope"], {})


def test_eval_variant_table_reports_the_gain_over_the_same_artifacts_sliding_score():
    rows = [mt.EvalRun("record+lora", 1, 2.0, 2.1, 50.0, 90.0), mt.EvalRun("record+lora", 2, 2.02, 2.1, 51.0, 91.0)]
    text = mt.format_eval_runs(rows)
    assert "| record+lora | 1 | 2.0000 | 2.1000 | -0.1000 | 50 | 90 |" in text
    assert "| record+lora | 2 | 2.0100 | -0.0900 | 0.0141 |" in text


def test_variants_join_the_plan():
    plan = mt.build_plan(["--variant", "no_xsa=XSA_LAST_N=0", "--variant", "base_wide=PRESET=baseline,MLP_MULT=4"], {})
    assert list(plan.configs) == ["baseline", "record", "no_xsa", "base_wide"]
    assert plan.configs["no_xsa"] == {**mt.CONFIGS["record"], "XSA_LAST_N": "0"}
    assert plan.configs["base_wide"] == {**mt.CONFIGS["baseline"], "MLP_MULT": "4"}
    plan = mt.build_plan(["--configs", "record", "--variant", "v=XSA_LAST_N=0"], {})
    assert list(plan.configs) == ["record", "v"]
    plan = mt.build_plan(["--configs", "v", "--variant", "v=XSA_LAST_N=0"], {})
    assert list(plan.configs) == ["v"]


@pytest.mark.parametrize("argv, message", [
    (["--configs", "baseline,recrd"], "'recrd' is not one of"),
    (["--configs", "record,record"], "listed twice"),
    (["--configs", ","], "at least one"),
    (["--variant", "record=XSA_LAST_N=0"], "already taken"),
    (["--variant", "a=XSA_LAST_N=0", "--variant", "a=LN_SCALE=0"], "already taken"),
    (["--variant", "a=NUM_LAYERS=eleven"], r"configuration a: NUM_LAYERS='eleven' is not allowed"),
    (["--variant", "a=MODEL_DIM=100"], "configuration a: MODEL_DIM=100 is not allowed"),
    (["--variant", "a=PRESET=smok"], "PRESET='smok' is not allowed"),
])
def test_bad_plans(argv, message):
    with pytest.raises(mt.UsageError, match=message):
        mt.build_plan(argv, {})


def test_main_reports_bad_input_in_one_line(isolated, capsys):
    assert mt.main(["--variant", "oops"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --variant 'oops' is not allowed")
    assert not (isolated / "cache").exists(), "nothing is prepared before the input is checked"


# ---------------------------------------------------------------------------------------------
# The run environment
# ---------------------------------------------------------------------------------------------


def _hparams(name: str, seconds: float = 240.0):
    env = mt.track_env(mt.CONFIGS[name], seconds, 1337, Path("d"), Path("t.model"), Path("logs"), name)
    return env, tg.Hyperparameters.from_env(env)


def test_configs_share_size_budget_and_eval():
    (eb, b), (er, r) = _hparams("baseline"), _hparams("record")
    for h, env in ((b, eb), (r, er)):
        assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads) == (6, 128, 4, 2)
        assert (h.train_seq_len, h.eval_seq_len, h.train_batch_tokens, h.vocab_size) == (128, 128, 4096, 1024)
        assert h.max_wallclock_seconds == 240 and h.target_bytes == mt.ARTIFACT_CAP == 2_000_000
        assert h.eval_stride == 64 and h.sliding and not h.ttt_enabled
        assert h.seed == 1337 and not h.compile and h.gptq_reserve == 8.0
        assert not h.env_warnings
    # The baseline is the naive baseline's technique set, the record the full stack.
    assert b.preset == "baseline" and b.mlp_act == "relu2" and b.mlp_mult == 2.0 and b.ema_decay == 0
    assert b.muon_ns == "classic" and not b.num_loops and b.parallel_mode == "off" and not b.xsa_last_n
    assert r.preset == "record" and r.mlp_act == "leaky_relu2" and r.mlp_mult == 4.0 and r.ema_decay == 0.99
    assert r.muon_ns == "polar_express" and r.num_loops == 1 and r.loop_end < r.num_layers
    assert r.parallel_mode == "lanes" and r.parallel_start_layer == 4 and r.xsa_last_n >= r.num_layers


def test_track_keys_win_over_overrides():
    env = mt.track_env({"EVAL_STRIDE": "0", "TTT_ENABLED": "1", "SEED": "9"}, 30, 42, Path("d"), Path("t"), Path("l"),
                       "x_s42")
    assert env["EVAL_STRIDE"] == "64" and env["TTT_ENABLED"] == "0" and env["SEED"] == "42"
    assert env["MAX_WALLCLOCK_SECONDS"] == "30" and env["GPTQ_RESERVE_SECONDS"] == "7.5"
    assert mt.track_env({"GPTQ_RESERVE_SECONDS": "auto"}, 30, 1, Path("d"), Path("t"), Path("l"),
                        "x")["GPTQ_RESERVE_SECONDS"] == "auto", "a variant may set its own reserve"


def test_child_environ_drops_the_callers_knobs(monkeypatch):
    monkeypatch.setenv("NUM_LAYERS", "99")
    monkeypatch.setenv("MUON_EQ_R", "0")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MINI_UNRELATED", "kept")
    env = mt.child_environ({"MODEL_DIM": "128"})
    assert "NUM_LAYERS" not in env and "MUON_EQ_R" not in env and "RANK" not in env
    assert env["MODEL_DIM"] == "128" and env["MINI_UNRELATED"] == "kept"


# ---------------------------------------------------------------------------------------------
# Report from metrics
# ---------------------------------------------------------------------------------------------


def fake_metrics(sliding: float, steps: int = 400, bytes_total: int = 700_000, seed: int = 1337) -> dict:
    return {"steps": steps, "bytes_total": bytes_total, "bytes_model": bytes_total - 61_000, "bytes_code": 61_000,
            "train_time_ms": 232_000, "eval_time_ms": 95_500, "calib_ms": 2500, "stopped_by": "wallclock",
            "pre_quant": {"val_bpb": sliding - 0.01}, "quant": {"quant_seconds": 4.2},
            "evaluations": {"roundtrip": {"val_bpb": sliding + 0.02, "seconds": 30.0},
                            "sliding": {"val_bpb": sliding, "seconds": 60.0}},
            "config": {"TRAIN_BATCH_TOKENS": 4096, "SEED": seed}}


def test_run_from_metrics():
    r = mt.run_from_metrics("record", 1337, fake_metrics(2.1), 350.0, "x.json")
    assert (r.steps, r.tokens, r.bytes_total) == (400, 400 * 4096, 700_000)
    assert (r.pre_quant_bpb, r.roundtrip_bpb, r.sliding_bpb) == pytest.approx((2.09, 2.12, 2.1))
    assert (r.train_s, r.quant_s, r.eval_s, r.wall_s) == pytest.approx((232.0, 4.2, 95.5, 350.0))
    assert not r.over_cap and not r.over_time
    over = mt.run_from_metrics("record", 1, fake_metrics(2.1, bytes_total=2_000_001), 361.0)
    assert over.over_cap and over.over_time
    assert not mt.run_from_metrics("record", 1, fake_metrics(2.1, bytes_total=2_000_000), 1.0).over_cap
    m = fake_metrics(2.1)
    del m["evaluations"]["sliding"]
    with pytest.raises(RuntimeError, match="no sliding evaluation"):
        mt.run_from_metrics("record", 1, m, 1.0)


def _runs():
    return [mt.run_from_metrics("baseline", 1337, fake_metrics(2.30, steps=900), 330.0),
            mt.run_from_metrics("record", 1337, fake_metrics(2.20, steps=450), 340.0),
            mt.run_from_metrics("baseline", 42, fake_metrics(2.32, steps=880), 331.0),
            mt.run_from_metrics("record", 42, fake_metrics(2.24, steps=440, bytes_total=2_100_000), 365.0)]


def test_means_and_tables():
    ms = mt.means(_runs())
    assert list(ms) == ["baseline", "record"]
    assert ms["baseline"]["sliding_bpb"] == pytest.approx(2.31) and ms["record"]["sliding_bpb"] == pytest.approx(2.22)
    assert ms["record"]["sliding_bpb_std"] == pytest.approx(0.0282843, abs=1e-6)
    assert ms["record"]["sliding_bpb_per_seed"] == {1337: pytest.approx(2.20), 42: pytest.approx(2.24)}
    assert ms["record"]["steps"] == 445 and ms["record"]["bytes_max"] == 2_100_000 and ms["record"]["runs"] == 2
    table = mt.format_runs(_runs()).splitlines()
    assert table[0] == mt.TABLE_HEADER and len(table) == 6
    assert table[2] == ("| baseline | 1337 | 900 | 3,686,400 | 2.2900 | 2.3200 | 2.3000 | 700,000 | 232 | 4.2 | "
                        "96 | 330 |")
    assert "2,100,000 **OVER CAP**" in table[5] and "365 (> 6 min)" in table[5]
    mean_rows = mt.format_means(ms).splitlines()
    assert mean_rows[2].startswith("| baseline | 2 | 2.3100 | 0.0141 |  |")
    assert mean_rows[3].startswith("| record | 2 | 2.2200 | 0.0283 | -0.0900 |")
    one = mt.format_means(mt.means(_runs()[1:2])).splitlines()
    assert one[2].startswith("| record | 1 | 2.2000 | – |  |"), "no baseline: no delta; one seed: no std"


def _plan(**kw):
    plan = mt.build_plan(["--seeds", "1337,42", "--no-append"], {})
    for k, v in kw.items():
        setattr(plan, k, v)
    return plan


META = {"date": "2026-11-22", "commit": "abc1234", "hardware": "Xeon, 2 cores, torch 2.13.0+cpu, python 3.11.7",
        "code_sha256": "f" * 64, "bytes_code": 61_000, "run_dir": "/tmp/x"}


def test_report_block_and_append(tmp_path):
    shared = mt.Dataset(Path("d"), Path("t"), "shared", "shared FineWeb sample")
    text = mt.report(_plan(), _runs(), shared, META)
    assert text.startswith("## CPU mini-track (`python bench/mini_track.py --seeds 1337,42 --no-append`, 2026-11-22)")
    assert "Commit abc1234" in text and "Xeon, 2 cores, torch 2.13.0+cpu" in text
    assert "240 s training wallclock" in text and "2,000,000 bytes" in text and "(61,000 bytes)" in text
    assert "stride 64" in text and "TTT_ENABLED=0" in text and "Seeds: 1337, 42." in text
    assert "- `record`: `PRESET=record " in text and "- `baseline`: `PRESET=baseline`" in text
    assert "**record seed 42: bytes_total 2,100,000 is OVER the 2,000,000-byte cap**" in text
    assert "EMBEDDED SAMPLE" not in text and "embedded sample" not in text
    sample = mt.Dataset(Path("d"), Path("t"), "sample", "EMBEDDED SAMPLE (data/make_sample.py)")
    assert "do not compare with shared-data results" in mt.report(_plan(), _runs(), sample, META)

    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n\nold text\n")
    mt.append_results(text, results)
    mt.append_results(text, results)
    body = results.read_text()
    assert body.startswith("# Measured results\n\nold text\n\n## CPU mini-track")
    assert body.count("\n\n## CPU mini-track") == 2


def test_json_output_is_serializable():
    data = mt.Dataset(Path("d"), Path("t"), "shared", "label")
    out = json.loads(json.dumps(mt.to_json(_plan(), _runs(), data, META), default=str))
    assert out["track"]["eval_stride"] == 64 and out["track"]["ttt"] is False
    assert out["track"]["data"]["source"] == "shared" and out["configs"]["baseline"] == {"PRESET": "baseline"}
    assert [r["config"] for r in out["runs"]] == ["baseline", "record", "baseline", "record"]
    assert out["means"]["record"]["sliding_bpb"] == pytest.approx(2.22)


# ---------------------------------------------------------------------------------------------
# Data and code cache
# ---------------------------------------------------------------------------------------------


def _write_docs(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))


def test_dataset_key(tmp_path):
    docs, tok = tmp_path / "docs.jsonl", tmp_path / "tok.model"
    _write_docs(docs, ["a", "b"])
    tok.write_bytes(b"model-1")
    key = mt.dataset_key(docs, tok, 200)
    assert key == mt.dataset_key(docs, tok, 200) and len(key) == 16
    assert mt.dataset_key(docs, tok, 100) != key
    tok.write_bytes(b"model-2")
    assert mt.dataset_key(docs, tok, 200) != key
    tok.write_bytes(b"model-1")
    _write_docs(docs, ["a", "c"])
    assert mt.dataset_key(docs, tok, 200) != key


def test_reorder_last_first(tmp_path):
    src, dst = tmp_path / "src.jsonl", tmp_path / "dst.jsonl"
    src.write_bytes(b'{"text": "0"}\n\n{"text": "1"}\n{"text": "2"}\n   \n{"text": "3"}')  # blanks, no final newline
    assert mt.reorder_last_first(src, dst, 2) == 4
    assert [json.loads(x)["text"] for x in dst.read_text().splitlines()] == ["2", "3", "0", "1"]
    with pytest.raises(mt.UsageError, match="need more than 4"):
        mt.reorder_last_first(src, dst, 4)


@pytest.mark.skipif(not CANONICAL_TOKENIZER.is_file(), reason="needs ../shared/data's canonical tokenizer")
@pytest.mark.slow
def test_prepare_shared_splits_off_the_last_documents_and_caches(tmp_path, monkeypatch, capsys):
    import sentencepiece as spm

    monkeypatch.setattr(mt, "VAL_DOCS", 3)
    texts = [f"Document number {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(10)]
    docs = tmp_path / "docs.jsonl"
    _write_docs(docs, texts)
    data = mt.prepare_data(tmp_path / "cache", docs, CANONICAL_TOKENIZER)
    assert data.source == "shared" and data.tokenizer == CANONICAL_TOKENIZER
    assert "last 3 documents = validation" in data.label
    sp = spm.SentencePieceProcessor(model_file=str(CANONICAL_TOKENIZER))
    expect = lambda ts: [t for text in ts for t in [sp.bos_id(), *sp.encode(text)]]  # noqa: E731
    assert tg.load_shard(data.path / "fineweb_val_000000.bin").tolist() == expect(texts[-3:])
    assert tg.load_shard(data.path / "fineweb_train_000000.bin").tolist() == expect(texts[:-3])
    info = json.loads((data.path / "mini_track.json").read_text())
    assert info["documents"] == 10 and info["val_docs"] == 3
    assert "tokenizing" in capsys.readouterr().err
    again = mt.prepare_data(tmp_path / "cache", docs, CANONICAL_TOKENIZER)
    assert again.path == data.path and "reusing" in capsys.readouterr().err
    _write_docs(docs, texts[::-1])
    assert mt.prepare_data(tmp_path / "cache", docs, CANONICAL_TOKENIZER).path != data.path, "new corpus, new key"


def test_missing_shared_data_falls_back_to_the_sample(tmp_path, monkeypatch, capsys):
    built = []

    def fake_sample(cache):
        built.append(cache)
        return mt.Dataset(cache / "sample", cache / "sample.model", "sample", "EMBEDDED SAMPLE")

    monkeypatch.setattr(mt, "prepare_sample", fake_sample)
    monkeypatch.setattr(mt, "CORPUS", tmp_path / "no_shared" / "corpus.jsonl")
    data = mt.prepare_data(tmp_path / "cache")
    assert data.source == "sample" and built == [tmp_path / "cache"]
    err = capsys.readouterr().err
    assert "no_shared/corpus.jsonl not found" in err and "falling back to the embedded sample" in err
    assert "not comparable" in err


def test_packed_script_is_cached_by_source_hash(tmp_path):
    src = tmp_path / "train_gpt.py"
    src.write_text("print('hello')\n")
    path, sha = mt.packed_script(tmp_path / "cache", src)
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest()
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)
    assert out.stdout == "hello\n" and path.read_bytes() != src.read_bytes(), "the shipped (packed) form runs"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "nothing else is left in the cache"
    mtime = path.stat().st_mtime_ns
    assert mt.packed_script(tmp_path / "cache", src) == (path, sha) and path.stat().st_mtime_ns == mtime
    src.write_text("print('changed')\n")
    assert mt.packed_script(tmp_path / "cache", src)[0] != path


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

TINY = {"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "64",
        "EVAL_SEQ_LEN": "128", "ROPE_TRAIN_SEQ_LEN": "64", "MAX_VAL_TOKENS": "4096",
        "GPTQ_CALIBRATION_BATCHES": "2", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_tiny_sweep_end_to_end(isolated, monkeypatch, dataset, capsys):
    """Two configurations, one seed, 3 s of training each on a 2x64 model and 4,096 validation targets: the
    whole path (packed code, subprocess runs, metrics JSON, table, RESULTS.md) in well under a minute."""
    monkeypatch.setattr(mt, "COMMON_ENV", {**mt.COMMON_ENV, **TINY})
    monkeypatch.setattr(mt, "CONFIGS", {"baseline": mt.CONFIGS["baseline"],
                                        "record": {**mt.CONFIGS["record"], "LOOP_START": "0", "LOOP_END": "1",
                                                   "PARALLEL_START_LAYER": "1"}})
    data = mt.Dataset(Path(dataset["dir"]), Path(dataset["tokenizer"]), dataset["source"], "test data")
    rc = mt.main(["--seconds", "3", "--seeds", "1337", "--json", "--eval-variant",
                  "lora=TTT_LORA_RANK=4,TTT_BATCH_SIZE=8,PHASED_TTT_PREFIX_DOCS=2"],
                 prepare=lambda: data)
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    runs = out["runs"]
    assert [(r["config"], r["seed"]) for r in runs] == [("baseline", 1337), ("record", 1337)]
    (packed,) = (isolated / "cache" / "packed").glob("train_gpt_*.py")
    for r in runs:
        metrics = json.loads(Path(r["json_path"]).read_text())
        assert metrics["config"]["EVAL_STRIDE"] == 64 and metrics["config"]["TARGET_BYTES"] == 2_000_000
        assert metrics["config"]["TTT_ENABLED"] is False and "sliding" in metrics["evaluations"]
        assert metrics["code_sha256"] == mt.sha256_of(packed), "the packed script ran"
        assert r["bytes_code"] == packed.stat().st_size < (ROOT / "train_gpt.py").stat().st_size / 2
        assert r["bytes_total"] <= 2_000_000 and not r["over_cap"]
        assert r["steps"] > 0 and r["tokens"] == r["steps"] * 4096
        assert 0 < r["sliding_bpb"] < 20 and r["train_s"] <= 3.5
    assert set(out["means"]) == {"baseline", "record"}
    assert [(e["config"], e["seed"]) for e in out["eval_runs"]] == [("baseline+lora", 1337), ("record+lora", 1337)]
    assert all(0 < e["ttt_bpb"] < 20 and e["sliding_bpb"] == r["sliding_bpb"]
               for e, r in zip(out["eval_runs"], runs)), "re-scored the runs' own artifacts"
    assert "[1/2] baseline seed 1337" in captured.err and "[2/2] record seed 1337" in captured.err
    results = (isolated / "RESULTS.md").read_text()
    assert results.startswith("## CPU mini-track (`python bench/mini_track.py --seconds 3 --seeds 1337 --json "
                              "--eval-variant lora=TTT_LORA_RANK=4,")
    assert "| record | 1337 |" in results and "| baseline | 1 |" in results
    assert "| record+lora | 1337 |" in results and "TTT_ENABLED=1 TTT_LORA_RANK=4" in results


def test_tokenizer_choice_keys_the_data_and_sets_what_train_gpt_needs(tmp_path):
    assert mt.build_plan(["--tokenizer", "caseops8192"], {}).tokenizer == "caseops8192"
    assert mt.build_plan([], {}).tokenizer == "sp1024"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n')
    tok = tmp_path / "t.model"
    tok.write_bytes(b"x")
    assert mt.dataset_key(corpus, tok, 5) != mt.dataset_key(corpus, tok, 5, caseops=True)
    with pytest.raises(mt.UsageError, match="--tokenizer=caseops8192 is not allowed here"):
        mt.prepare_data(tmp_path / "cache", tmp_path / "missing.jsonl", name="caseops8192")
    assert "CASEOPS_ENABLED" in mt.TRACK_KEYS and mt.TOKENIZERS["caseops8192"][1:] == (8192, True)
