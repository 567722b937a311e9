"""bench/gpu.py, the GPU preflight: the pod kit (--prepare, then the printed command in a copy of the repository
with no ../shared beside it), its --cpu mode end to end (every part, the record pipeline's phase rows,
projection, table, JSON), the anchor-log parser, the projection arithmetic on known numbers, and phased TTT's
cost model on the real split (the batch walk mirrored from train_gpt, the split's lengths from PR #1855's log,
the fit)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, SHARED_DATA, eval_ctx, tg
from test_eval import fake_luts

spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)
TOP = ROOT.parent / "shared" / "anchors" / gpu.TOP


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
    run = fake_run()
    run["phases"].append({"phase": "eval_ttt", "seconds": 50.0, "tokens": 420_000, "tok_s": 8_400})
    assert gpu.project(run, 40_540_160, ttt={"seconds": 321.0})["phases"]["eval_ttt"] == 321.0
    assert gpu.project(run, 40_540_160)["phases"]["eval_ttt"] == pytest.approx(40_540_160 / (8 * 8_400))


# ---------------------------------------------------------------------------------------------
# Phased TTT on the real split
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_the_work_model_mirrors_what_phased_ttt_scores_and_trains(rank):
    """gpu.ttt_work counts the chunk steps (one forward each) and window tokens train_gpt's phased TTT runs on
    this rank of 2, segment by segment, and the tokens each pause's global SGD trains on."""
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                         tie_embeddings=True, tied_embed_init_std=0.05, logit_softcap=30.0, rope_base=1e4,
                         qk_gain_init=1.5)
    model = tg.GPT(cfg)
    rng = np.random.default_rng(1)
    lengths = [3, 200, 47, 48, 49, 130, 9, 75, 96, 1, 150, 33]
    val = np.concatenate([[tg.BOS_ID, *rng.integers(2, 64, n - 1)] for n in lengths] + [[tg.BOS_ID]]).astype(np.int64)
    seen, sgd_docs, segment = [[]], [], [0]
    real_nll, real_sgd = tg.lora_nll, tg.PhasedTTT.global_sgd

    def spy(model, lora, x, y, ctx):
        seen[-1].append(x.numel())
        return real_nll(model, lora, x, y, ctx)

    def sgd(self, doc_ids):
        sgd_docs.append(sum(self.docs[d][1] - self.docs[d][0] for d in doc_ids))
        seen.append([])
        return real_sgd(self, doc_ids)

    lcfg = tg.LoRATTTConfig(rank=2, alpha=4.0, lr=1e-3, weight_decay=0.0, batch_docs=3, chunk=16, warm_start_a=True,
                            prefix_docs=7, phases=2, seed=0)
    sgd_cfg = tg.TTTConfig(lr=1e-3, epochs=1, momentum=0.9, chunk_tokens=64, grad_clip=1.0)
    ctx = eval_ctx(model, val, fake_luts(64), 40, rank=rank, world_size=2)
    import unittest.mock as mock

    with (mock.patch.object(tg, "lora_nll", spy), mock.patch.object(tg, "all_reduce_", lambda t, op="sum": t),
          mock.patch.object(tg.PhasedTTT, "global_sgd", sgd)):
        tg.eval_ttt_lora(ctx, model, lcfg, sgd_cfg, 1e9, lambda *a, **k: None)
    own = np.array([hi - lo for lo, hi in tg.ttt_documents(val, val.size - 1)])
    segments, sgd_tokens = gpu.ttt_work(own, {"TTT_BATCH_SIZE": 3, "TTT_CHUNK_SIZE": 16, "EVAL_SEQ_LEN": 40,
                                              "PHASED_TTT_PREFIX_DOCS": 7, "PHASED_TTT_NUM_PHASES": 2}, 2)
    assert len(segments) == len(seen) == 3 and sgd_tokens == sgd_docs and len(sgd_docs) == 2
    assert [[len(s), sum(s)] for s in seen] == [w[rank].tolist() for w in segments]
    # the first segment is one batch: rank 1 scores nothing in it, yet joins the pause (its global_sgd ran too)
    assert segments[0][1].tolist() == [0, 0] and all(w[0, 0] > 0 for w in segments)


def synthetic_top_logs(folder: Path) -> Path:
    folder.mkdir()
    rows = {"train_seed1.log": ((782, 30000, 90000), (100, 190, 195)), "train_seed2.log": ((500, 700, 710), (1, 2, 3))}
    for name, batches in rows.items():
        lines = ["ttt_phased: total_docs:50000 prefix_docs:2500"]
        lines += [f"ttp: b{b}/782 bl:2.1 bb:1.0 rl:2.1 rb:1.0 dl:{lo}-{hi} gd:0" for b, lo, hi in batches]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def test_split_lengths_come_from_the_logged_batch_ranges(tmp_path):
    lengths, source = gpu.split_doc_lengths(synthetic_top_logs(tmp_path / "top"), 400_000_000)
    assert lengths.size == 50_000 and abs(int(lengths.sum()) - 400_000_000) < 50_000 and lengths.min() >= 1
    q = np.sort(lengths)
    assert "4 of 782 batch ranges" in source
    # One factor rescales every length, so ratios are the logged ones: b782's range over b100's.
    assert q[-1] / q[99 * 64] == pytest.approx(90_000 / 190, rel=0.05)
    assert gpu.split_doc_lengths(tmp_path / "absent", 1)[0] is None


@pytest.mark.skipif(not TOP.is_dir(), reason=f"{TOP} not present (the leaderboard top's folder, PR #1855)")
def test_the_real_split_has_the_real_mean_document_length():
    lengths, source = gpu.split_doc_lengths(TOP, 40_540_160)
    assert lengths.mean() == pytest.approx(810.8, rel=0.01)  # 40,540,160 targets over 50,000 documents
    assert 350 < np.median(lengths) < 600, "most documents are short; a few long ones carry many tokens"
    assert "213 of 782 batch ranges" in source


def test_the_fit_recovers_known_costs_and_falls_back_to_one_term():
    rows = [(s, t, 0.05 * s + 2e-6 * t) for s, t in ((40, 9_000), (35, 12_000), (300, 2_000_000), (120, 500_000))]
    a, b = gpu.fit_ttt_cost(rows)
    assert a == pytest.approx(0.05) and b == pytest.approx(2e-6)
    assert gpu.fit_ttt_cost([(10, 1000, 1.0)]) in ((0.1, 0.0), (0.0, 0.001))


def test_ttt_projection_sums_the_busiest_rank_of_each_segment(monkeypatch):
    own = np.array([100, 60, 50, 400, 30, 20, 90, 10])
    cfg = {"TTT_BATCH_SIZE": 2, "TTT_CHUNK_SIZE": 16, "EVAL_SEQ_LEN": 64, "PHASED_TTT_PREFIX_DOCS": 3,
           "PHASED_TTT_NUM_PHASES": 3, "GLOBAL_TTT_EPOCHS": 1}
    segments, sgd_tokens = gpu.ttt_work(own, cfg, 1)
    a, b = 0.02, 1e-4
    run = {"config": cfg, "ttt_segments": [
        {"documents": 0, "global_sgd_s": 0.001 * sgd_tokens[i] if i < len(sgd_tokens) else None,
         "score_s": float(w[0] @ [a, b])} for i, w in enumerate(segments)]}
    split = np.array([500, 80, 3000, 40, 700, 700, 10, 2500, 90, 60, 1200, 30])
    record = tg.Hyperparameters.from_env({"PRESET": "record"})
    monkeypatch.setattr(record.__class__, "from_env", classmethod(lambda cls, env=None: tg.dataclasses.replace(
        record, phased_ttt_prefix_docs=4, ttt_batch_size=2, ttt_chunk_size=16, eval_seq_len=64)))
    out = gpu.project_ttt(run, own, split, world=2)
    assert out["per_chunk_step_s"] == pytest.approx(a) and out["per_window_token_s"] == pytest.approx(b)
    real, real_sgd = gpu.ttt_work(split, dict(cfg, PHASED_TTT_PREFIX_DOCS=4), 2)
    assert len(real) == 4 and len(real_sgd) == 3
    expected = sum((w @ [a, b]).max() for w in real) + sum(real_sgd) * 0.001 / 2
    assert out["seconds"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# The kit and the --cpu preflight
# ---------------------------------------------------------------------------------------------

SOURCES = (gpu.DEFAULT_TOKENIZER, gpu.DEFAULT_VAL_DOCS, gpu.DEFAULT_DOCS)


def repo_copy(dest: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored) with nothing beside them: a bare pod."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_the_kit_runs_the_preflight_where_there_is_no_shared_folder(tmp_path):
    if not all(p.is_file() for p in SOURCES):
        pytest.skip(f"shared data not present at {SHARED_DATA} (sp8192 tokenizer, challenge and FineWeb docs)")
    pod = repo_copy(tmp_path / "pod" / "repo")
    assert not (pod.parent / "shared").exists()
    prepare = subprocess.run([sys.executable, "bench/gpu.py", "--prepare", "--cpu", "--tokenizer", str(SOURCES[0]),
                              "--val-docs", str(SOURCES[1]), "--docs", str(SOURCES[2]),
                              "--anchors-from", str(ROOT.parent / "shared" / "anchors")],
                             cwd=pod, capture_output=True, text=True, timeout=600)
    assert prepare.returncode == 0, prepare.stderr[-2000:]
    command = prepare.stdout.strip().splitlines()[-1].strip()
    assert command == "python bench/gpu.py --cpu", prepare.stdout
    kit = json.loads((pod / "bench" / ".cache" / "kit-cpu" / "kit.json").read_text())
    assert kit["anchors"] == ["r0405", "top1855"] and "data/tokenizers/fineweb_8192_bpe.model" in kit["files"]
    # The printed command, as a pod runs it; budgets no load can exhaust (a test must not depend on it).
    budgets = [arg for part in gpu.PARTS for arg in ("--budget", f"{part}=3000")]
    cmd = [sys.executable, *command.split()[1:], "--step-variant", "FUSED_CE_ENABLED=1", *budgets]
    proc = subprocess.run(cmd, cwd=pod, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "data: reusing the kit" in proc.stderr
    report = json.loads((pod / "bench" / ".cache" / "gpu-cpu" / "preflight.json").read_text())
    assert report["environment"]["attn_backend_auto"] == "sdpa"
    for state in ("plain", "looped"):
        assert report["step"][state]["tokens_per_s"] > 0 and report["step"][state]["virtual_layers"] >= 6
    phases = [r["phase"] for r in report["pipeline"]["phases"]]
    assert phases[:4] == ["startup", "warmup_train_plain", "warmup_train_looped", "training"]
    assert {"calibration", "quantization", "eval_roundtrip", "eval_sliding", "eval_ttt"} <= set(phases)
    proj = report["projection"]
    assert set(proj["phases"]) >= {"eval_roundtrip", "eval_sliding", "eval_ttt", "calibration"}
    assert all(math.isfinite(v) for v in proj["phases"].values())
    ttt = report["ttt_projection"]
    assert ttt["seconds"] == proj["phases"]["eval_ttt"] and len(ttt["segment_busiest_rank_s"]) == 4
    assert len(ttt["fit_points"]) == len(report["pipeline"]["ttt_segments"]) == 4  # the prefix is scaled down
    table = proc.stdout
    assert "| ours, anchor architecture | looped |" in table and "| eval_ttt |" in table
    assert "| ours + FUSED_CE_ENABLED=1 | plain |" in table and "eval_ttt on the real split" in table
    assert report["step_variants"]["FUSED_CE_ENABLED=1"]["looped"]["tokens_per_s"] > 0
    assert "training budget:" in table and "eval budget:" in table and "**PASS**" in table
    # A kit file changed in transit is named, not used.
    data = pod / "bench" / ".cache" / "kit-cpu" / "data" / "tokenizers" / "fineweb_8192_bpe.model"
    data.write_bytes(data.read_bytes() + b"x")
    bad = subprocess.run(cmd + ["--skip", ",".join(gpu.PARTS)], cwd=pod, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "data/tokenizers/fineweb_8192_bpe.model is missing or differs from kit.json" in bad.stderr


def test_without_a_kit_or_its_sources_the_error_says_how_to_build_one(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--cpu", "--kit", str(tmp_path / "kit"),
                           "--tokenizer", str(tmp_path / "none.model")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: --kit={tmp_path / 'kit'}: no kit.json there; build the kit "
                                                    "with `python bench/gpu.py --prepare --cpu` where ../shared/data "
                                                    "exists and carry that folder")


@pytest.mark.skipif(not all(p.is_file() for p in SOURCES), reason=f"shared data not present at {SHARED_DATA}")
def test_the_cpu_kit_is_its_own_and_changed_sources_rebuild_its_data(tmp_path):
    """--cpu's kit and outputs never share the pod's folders (a --cpu run once replaced a prepared pod dataset),
    and the kit is keyed on the sources' contents, not their paths."""
    args = gpu.parse_args(["--cpu"])
    assert args.kit.name == "kit-cpu" and args.cache.name == "gpu-cpu"
    pod = gpu.parse_args([])
    assert pod.kit.name == "kit" and pod.cache.name == "gpu" and pod.pod_python == "3.12"
    val = tmp_path / "val.jsonl"
    shutil.copyfile(SOURCES[1], val)
    base = ["--cpu", "--kit", str(tmp_path / "kit"), "--val-docs", str(val), "--anchors-from", str(tmp_path)]
    assert gpu.main(base + ["--prepare"]) == 0
    first = json.loads((tmp_path / "kit" / "kit.json").read_text())
    assert gpu.load_kit(gpu.parse_args(base))[1] == 8192
    lines = val.read_text().splitlines(keepends=True)
    val.write_text("".join(lines[1:] + lines[:1]))  # other validation documents
    gpu.load_kit(gpu.parse_args(base))
    second = json.loads((tmp_path / "kit" / "kit.json").read_text())
    assert second["sources"]["val_docs_file"] != first["sources"]["val_docs_file"]
    assert second["files"] != first["files"]


def test_each_part_gets_its_own_budget_and_the_pipeline_runs_first(tmp_path, monkeypatch):
    """Before: one 480 s deadline for every part with the pipeline last, so the step timings and the anchor
    could leave the PASS/FAIL pipeline no time at all."""
    calls = []

    def part(name):
        def run(*args):
            calls.append((name, round(args[-1].left())))
            return {"skipped": "test"}
        return run

    monkeypatch.setattr(gpu, "pipeline_run", part("pipeline"))
    monkeypatch.setattr(gpu, "step_bench", part("step"))
    monkeypatch.setattr(gpu, "anchor_run", part("anchor"))
    args = gpu.parse_args(["--kit", str(tmp_path), "--anchor", str(tmp_path), "--budget", "step=7",
                           "--step-variant", "A=1", "--step-variant", "B=2"])
    saves = []
    gpu.run_parts(args, tmp_path, 8192, {}, {}, lambda: saves.append(1))
    assert calls == [("pipeline", 330), ("step", 7), ("step", 60), ("step", 60), ("anchor", 120)]
    assert len(saves) == 4, "the report is saved after the pipeline, the step and each variant"


def test_bad_arguments_are_one_clear_line(tmp_path):
    for args, fragment in ((["--steps", "0"], "--steps=0: must be >= 1"),
                           (["--skip", "steps"], "--skip=steps: unknown part(s) ['steps']"),
                           (["--budget", "pipline=10"], "--budget=pipline=10: expected PART=SECONDS"),
                           (["--step-variant", "fused=1"], "--step-variant=fused=1: expected KEY=VAL"),
                           (["--prepare", "--tokenizer", str(tmp_path / "none.model")], "--prepare needs the data "
                                                                                       "sources: not found:")):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--cpu", "--kit", str(tmp_path / "kit"),
                               *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert fragment in proc.stderr, proc.stderr


def test_without_brotli_or_a_wheel_the_pipeline_packs_with_lzma(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "gpu_importable", lambda module: False)
    args = gpu.parse_args(["--cpu", "--kit", str(tmp_path / "kit"), "--cache", str(tmp_path)])
    assert gpu.ensure_brotli(args).startswith("absent: the pipeline packs with COMPRESSOR=lzma")
