"""bench/gpu.py, the GPU preflight: its --cpu mode end to end (data build and reuse, step timing, the
record pipeline's phase rows, projection, table, JSON), the anchor-log parser and the projection
arithmetic on known numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_DATA

spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)


def test_anchor_log_parser_splits_the_plain_and_looped_halves():
    # Mean tok/s over steps 1..N as R0405 prints it: 10 plain steps of 1 s, then 10 looped steps of 2 s.
    tps = 1000
    elapsed = {n: (n if n <= 10 else 10 + 2 * (n - 10)) for n in range(1, 21)}
    lines = ["warmup_step: 1/3", "layer_loop:enabled step:10 frac:0.500"]
    lines += [f"{n}/20 train_loss: 5.0 train_time: 0.1m tok/s: {n * tps / elapsed[n]:.0f}" for n in (1, 2, 5, 10, 15, 20)]
    out = gpu.parse_anchor_lines(lines, tps)
    assert out["plain_steps"] == 10 and out["plain_tok_s"] == pytest.approx(1000)
    assert out["looped_steps"] == 10 and out["looped_tok_s"] == pytest.approx(500, rel=1e-3)
    assert "error" in gpu.parse_anchor_lines(["Traceback (most recent call last):"], tps)


def fake_run(calib_tok_s: float = 400_000.0, eval_tok_s: float = 2_000_000.0) -> dict:
    phases = [{"phase": "startup", "seconds": 20.0}, {"phase": "warmup_train_plain", "seconds": 40.0},
              {"phase": "training", "seconds": 30.0, "tokens": 30 * 786_432, "tok_s": 786_432},
              {"phase": "calibration", "seconds": 7.8, "tokens": 3_145_728, "tok_s": calib_tok_s},
              {"phase": "quantization", "seconds": 9.0}, {"phase": "artifact_read", "seconds": 1.5},
              {"phase": "eval_roundtrip", "seconds": 0.2, "tokens": 420_000, "tok_s": eval_tok_s},
              {"phase": "eval_sliding", "seconds": 6.0, "tokens": 420_000, "tok_s": eval_tok_s / 32}]
    history = [{"looping": 0, "tok_s": t} for t in (500_000, 1_000_000, 1_000_000)]
    history += [{"looping": 1, "tok_s": t} for t in (600_000, 700_000, 700_000, 700_000)]
    return {"phases": phases, "history": {"train": history}, "wall_seconds": 120.0,
            "config": {"GPTQ_CALIBRATION_BATCHES": 4, "TRAIN_BATCH_TOKENS": 786_432, "ENABLE_LOOPING_AT": 0.35}}


def test_projection_arithmetic():
    proj = gpu.project(fake_run(), 40_540_160)
    calib = 16 * 786_432 / (8 * 400_000)
    assert proj["calibration_seconds"] == pytest.approx(calib)
    assert proj["reserve_seconds"] == pytest.approx(calib * 1.25 + 0.5)
    assert proj["train_seconds"] + proj["reserve_seconds"] == pytest.approx(600)
    assert proj["plain_tok_s"] == 1_000_000 and proj["looped_tok_s"] == 700_000  # first step of each state dropped
    steps = proj["train_seconds"] * 8 * (0.35 * 1_000_000 + 0.65 * 700_000) / 786_432
    assert proj["steps_in_600s"] == pytest.approx(steps)
    evals = 1.5 + 40_540_160 / (8 * 2_000_000) + 40_540_160 * 32 / (8 * 2_000_000)
    assert proj["eval_seconds"] == pytest.approx(evals)
    assert proj["train_pass"] and proj["eval_pass"]  # 85 s of evaluation
    assert proj["phases"]["warmup_train_plain"] == 40.0 and proj["untimed_seconds"] == pytest.approx(69.0)
    slow = gpu.project(fake_run(eval_tok_s=200_000.0), 40_540_160)
    assert slow["eval_seconds"] > 600 and not slow["eval_pass"]
    slow_calibration = gpu.project(fake_run(calib_tok_s=20_000.0), 40_540_160)  # 79 s
    assert not slow_calibration["train_pass"], "a reserve over 10% of the training budget fails"


@pytest.mark.slow
def test_cpu_preflight_runs_every_part_and_reuses_its_data(tmp_path):
    if not (gpu.DEFAULT_TOKENIZER.is_file() and gpu.DEFAULT_VAL_DOCS.is_file() and gpu.DEFAULT_DOCS.is_file()):
        pytest.skip(f"shared data not present at {SHARED_DATA} (sp8192 tokenizer, challenge and FineWeb docs)")
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--cpu", "--cache", str(tmp_path), "--steps", "4",
           "--step-variant", "FUSED_CE_ENABLED=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["environment"]["attn_backend_auto"] == "sdpa"
    for state in ("plain", "looped"):
        assert report["step"][state]["tokens_per_s"] > 0 and report["step"][state]["virtual_layers"] >= 6
    phases = [r["phase"] for r in report["pipeline"]["phases"]]
    assert phases[:4] == ["startup", "warmup_train_plain", "warmup_train_looped", "training"]
    assert {"calibration", "quantization", "eval_roundtrip", "eval_sliding", "eval_ttt"} <= set(phases)
    proj = report["projection"]
    assert set(proj["phases"]) >= {"eval_roundtrip", "eval_sliding", "eval_ttt", "calibration"}
    assert all(math.isfinite(v) for v in proj["phases"].values())
    table = proc.stdout
    assert "| ours, anchor architecture | looped |" in table and "| eval_ttt |" in table
    assert "| ours + FUSED_CE_ENABLED=1 | plain |" in table
    assert report["step_variants"]["FUSED_CE_ENABLED=1"]["looped"]["tokens_per_s"] > 0
    assert "training budget:" in table and "eval budget:" in table and "**PASS**" in table
    # Run again: the data is reused, not rebuilt.
    again = subprocess.run(cmd + ["--skip", "step,pipeline"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "data: reusing" in again.stderr and again.returncode == 0, again.stderr[-2000:]


def test_bad_arguments_are_one_clear_line(tmp_path):
    for args, fragment in ((["--steps", "0"], "--steps=0: must be >= 1"),
                           (["--skip", "steps"], "--skip=steps: unknown part(s) ['steps']"),
                           (["--step-variant", "fused=1"], "--step-variant=fused=1: expected KEY=VAL"),
                           (["--tokenizer", str(tmp_path / "none.model")], "--tokenizer=")):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--cpu", "--cache", str(tmp_path),
                               *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert fragment in proc.stderr, proc.stderr


def test_without_brotli_or_a_wheel_the_pipeline_packs_with_lzma(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "gpu_importable", lambda module: False)
    args = gpu.parse_args(["--cpu", "--cache", str(tmp_path), "--wheels", str(tmp_path / "no-wheels")])
    assert gpu.ensure_brotli(args).startswith("absent: the pipeline packs with COMPRESSOR=lzma")
