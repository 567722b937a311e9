"""GPU preflight: one command that proves a pod before a paid run (users on a rented pod, us on a lent one).

    python bench/gpu.py                                # one H100/H200, about 8 minutes
    python bench/gpu.py --anchor bench/.cache/anchor   # also R0405's own script, side by side
    python bench/gpu.py --cpu                          # tiny, on a CPU: the harness itself (CI runs this)

1. Data: builds (or reuses) a small dataset in the challenge layout under --cache (git-ignored,
   bench/.cache/gpu by default): val = the --val-docs JSONL (200 challenge documents), train = the first
   --train-docs documents of --docs (1,200 FineWeb documents), tokenized with --tokenizer (the sp8192 one
   in parameter-golf main). The folder travels to a machine without ../shared.
2. Step time of the anchor's architecture in this script (bench/step.py with the knobs in
   ../shared/anchors/README.md), without and with depth recurrence: ms/step, tokens/s, MFU, peak memory;
   with --anchor DIR, the anchor script (a copy of ../shared/anchors/r0405) trained on the same data, its
   tokens/s read from its log, and the ratio ours/anchor.
3. PRESET=record end to end for --steps steps on that data: one row per phase from the run's own JSON
   (each compile warm-up, training before and after looping, calibration, quantization with compression,
   every evaluation) with tokens/s and peak memory.
4. Projection of each phase to the real run on 8xH100 (600 s of training; the full validation set,
   --val-tokens-full, 40,540,160 sp8192 tokens per techniques.md 2.1) and PASS/FAIL against both 600 s
   budgets. Per-token phases scale as 1/8 of this GPU's time (linear: no communication cost; TTT's
   8-GPU batches are smaller, so its projection is a lower bound). Compile warm-ups and quantization do
   not shrink with more GPUs.

Everything goes to one JSON (--out, default <cache>/preflight.json); a short table is printed last.
A part that fails or runs out of --budget-s is marked in its row and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "variants" / "CiprianFlorin-Ifrim" / "fineweb_8192_bpe.model"
DEFAULT_VAL_DOCS = SHARED / "corpus" / "fineweb_challenge_docs_200.jsonl"
DEFAULT_DOCS = SHARED / "corpus" / "fineweb_legal_pilot_2800.jsonl"
FULL_VAL_TOKENS = 40_540_160  # sp8192 validation targets after truncation (techniques.md 2.1)
TRAIN_BUDGET_S = EVAL_BUDGET_S = 600.0
RECORD_GPUS = 8
MAX_RESERVE_FRACTION = 0.1
# Our knobs for R0405's architecture (../shared/anchors/README.md): same model, forward equal to 5e-6.
ANCHOR_ARCH = {"PRESET": "record", "SMEAR_GATE_ENABLED": "0", "SPARSE_ATTN_GATE_ENABLED": "0", "PARALLEL_MODE": "off",
               "LOOP_START": "4", "LOOP_END": "5", "ENABLE_LOOPING_AT": "0.5", "QK_GAIN_INIT": "4.0"}
# --cpu: a model small enough that the whole harness runs in about a minute on two cores.
CPU_KNOBS = {"DEVICE": "cpu", "COMPILE": "0", "NUM_LAYERS": "6", "MODEL_DIM": "64", "NUM_HEADS": "2",
             "NUM_KV_HEADS": "1", "MLP_MULT": "2", "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64",
             "ROPE_TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "XSA_LAST_N": "6", "LOOP_START": "2",
             "LOOP_END": "3", "PARALLEL_START_LAYER": "4", "EVAL_BATCH_SEQS": "8", "EVAL_STRIDE": "32",
             "TTT_CHUNK_TOKENS": "1024", "TTT_EPOCHS": "1", "BPB_CHECK_DOCS": "5"}
ANCHOR_LINE = re.compile(r"^(?P<step>\d+)/(?P<of>\d+) train_loss: \S+ train_time: \S+ tok/s: (?P<tok_s>[\d.]+)")
EVAL_PHASES = ("artifact_read", "eval_roundtrip", "eval_sliding", "eval_ttt")


class UsageError(Exception):
    """Bad input: one line naming the flag or file, exit 2."""


class Deadline:
    """Seconds left of --budget-s, handed to each part as its subprocess timeout."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without any knob of train_gpt.py (a PRESET or SEED left in the shell would
    change what is measured), plus `extra`."""
    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    knobs = (set(tg.Hyperparameters.knob_names()) | set(tg.KNOB_ALIASES) | tg.LEGACY_VARS | set(tg.RETIRED_VARS)
             | set(tg.UNIMPLEMENTED_FEATURES) | {"DATA_DIR", "PEAK_TFLOPS"})
    env = {k: v for k, v in os.environ.items() if k not in knobs}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


# ---------------------------------------------------------------------------------------------
# 1. Data
# ---------------------------------------------------------------------------------------------


def build_dataset(args: argparse.Namespace) -> tuple[Path, int]:
    """DATA_DIR with datasets/fineweb10B_sp<V>/ and tokenizers/fineweb_<V>_bpe.model; reused when complete."""
    import sentencepiece as spm

    for flag, path in (("--tokenizer", args.tokenizer), ("--val-docs", args.val_docs), ("--docs", args.docs)):
        if not Path(path).is_file():
            raise UsageError(f"{flag}={path}: file not found (../shared/data is the default source; give the "
                             f"path, or copy a built {args.cache}/data here)")
    vocab = spm.SentencePieceProcessor(model_file=str(args.tokenizer)).vocab_size()
    root = args.cache / "data"
    shards = root / "datasets" / f"fineweb10B_sp{vocab}"
    tokenizer = root / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    wanted = {"val_docs": args.n_val_docs, "train_docs": args.train_docs, "tokenizer": str(args.tokenizer)}
    stamp = root / "preflight_source.json"
    if (shards / "manifest.json").is_file() and tokenizer.is_file() and stamp.is_file() \
            and json.loads(stamp.read_text()) == wanted:
        log(f"data: reusing {root}")
        return root, vocab
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs.jsonl"
        with open(docs, "w", encoding="utf-8") as out:
            for path, limit in ((args.val_docs, args.n_val_docs), (args.docs, args.train_docs)):
                with open(path, encoding="utf-8") as fh:
                    for i, line in zip(range(limit), fh):
                        out.write(line if line.endswith("\n") else line + "\n")
        sys.path.insert(0, str(ROOT / "data"))
        import tokenize_docs

        rc = tokenize_docs.main(["--docs", str(docs), "--tokenizer", str(args.tokenizer), "--output", str(shards),
                                 "--val-docs", str(args.n_val_docs), "--force"])
        if rc != 0:
            raise UsageError(f"data/tokenize_docs.py failed (exit {rc}) building {shards} from --docs/--val-docs")
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.tokenizer, tokenizer)
    stamp.write_text(json.dumps(wanted))
    log(f"data: built {root} in {time.perf_counter() - t0:.1f}s")
    return root, vocab


# ---------------------------------------------------------------------------------------------
# 2. Environment and step timing
# ---------------------------------------------------------------------------------------------


def ensure_brotli(args: argparse.Namespace) -> str:
    """brotli for the pipeline's artifact: installed, else unpacked from a wheel in --wheels onto
    PYTHONPATH (the device image has none; a wheel travels with the carried folder), else COMPRESSOR=lzma
    with the reason in the report."""
    if gpu_importable("brotli"):
        return "installed"
    wheels = sorted(Path(args.wheels).glob("[Bb]rotli-*.whl")) if args.wheels.is_dir() else []
    for wheel in wheels:
        site = args.cache / "site"
        import zipfile

        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        sys.path.insert(0, str(site))
        if gpu_importable("brotli"):
            return f"from {wheel.name}"
    return "absent: the pipeline packs with COMPRESSOR=lzma (put a Brotli wheel in --wheels to time brotli)"


def gpu_importable(module: str) -> bool:
    import importlib

    try:
        importlib.invalidate_caches()
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def environment(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
            "attn_backend_auto": tg.select_attention_backend("auto", device)[0],
            "fa3": tg.importable("flash_attn_interface"), "fa4": tg.importable("flash_attn.cute")}
    if cuda:
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def run_json(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> dict:
    """Run a command whose stdout ends with one JSON document; {"error": ...} when it does not."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def step_bench(args: argparse.Namespace, knobs: dict[str, str], deadline: Deadline) -> dict:
    """bench/step.py --both: our step without and with depth recurrence, in one process."""
    log(f"step: ours with the anchor's architecture (bench/step.py --both) {knobs_label(knobs)}")
    cmd = [sys.executable, str(ROOT / "bench" / "step.py"), "--both", "--json", "--steps", str(args.bench_steps),
           "--warmup", "2"]
    return run_json(cmd, clean_env({**ANCHOR_ARCH, **knobs}), deadline.left())


def knobs_label(knobs: dict[str, str]) -> str:
    extra = {k: v for k, v in knobs.items() if k not in CPU_KNOBS and k != "VOCAB_SIZE"}
    return " ".join(f"{k}={v}" for k, v in extra.items())


def parse_anchor_lines(lines: list[str], tokens_per_step: int) -> dict:
    """R0405 logs `N/T train_loss: .. tok/s: X` with X the mean over steps 1..N; its looping starts at T/2.
    Returns tokens/s over the plain half and over the looped half (from the elapsed times X implies)."""
    points = {}
    for line in lines:
        m = ANCHOR_LINE.match(line.strip())
        if m:
            points[int(m["step"])] = (int(m["of"]), float(m["tok_s"]))
    if not points:
        return {"error": "no `N/T train_loss: ... tok/s:` lines in the anchor's output"}
    total = next(iter(points.values()))[0]
    half = max(s for s in points if s <= total // 2)
    elapsed = {s: s * tokens_per_step / tok_s for s, (_, tok_s) in points.items()}
    last = max(points)
    out = {"steps": last, "plain_tok_s": points[half][1], "plain_steps": half}
    if last > half:
        out.update(looped_tok_s=(last - half) * tokens_per_step / (elapsed[last] - elapsed[half]),
                   looped_steps=last - half)
    return out


def anchor_run(args: argparse.Namespace, data_dir: Path, deadline: Deadline) -> dict:
    """The anchor script, unchanged but for its SDPA pinning (run_anchor.py), on our data; stopped once its
    last training line is printed (what follows is its own GPTQ and evaluation)."""
    if args.cpu:
        return {"skipped": "the anchor script needs CUDA"}
    src = Path(args.anchor)
    if not (src / "run_anchor.py").is_file():
        return {"error": f"--anchor={src}: no run_anchor.py there (copy ../shared/anchors/r0405)"}
    log(f"anchor: {src} for {args.steps} steps")
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "anchor"
        shutil.copytree(src, work)
        env = clean_env({"DATA_DIR": f"{data_dir}/", "ITERATIONS": str(args.steps), "MAX_WALLCLOCK_SECONDS": "0",
                         "WARMUP_STEPS": "3", "TRAIN_LOG_EVERY": "5", "VAL_LOSS_EVERY": "0", "RUN_ID": "anchor"})
        proc = subprocess.Popen([sys.executable, "run_anchor.py"], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        done = threading.Event()

        def read() -> None:  # a thread, so a silent or hung anchor cannot outlive the deadline
            for line in proc.stdout:
                lines.append(line)
                if line.startswith(f"{args.steps}/{args.steps} train_loss"):
                    break
            done.set()

        threading.Thread(target=read, daemon=True).start()
        finished = done.wait(deadline.left())
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        if not finished:
            lines.append("(stopped at the --budget-s deadline)")
    out = parse_anchor_lines(lines, args.tokens_per_step)
    if "error" in out:
        out["error"] += "; last lines: " + " | ".join(x.strip() for x in lines[-3:])
    return out


# ---------------------------------------------------------------------------------------------
# 3. The record pipeline
# ---------------------------------------------------------------------------------------------


def pipeline_run(args: argparse.Namespace, data_dir: Path, vocab: int, knobs: dict[str, str],
                 deadline: Deadline) -> dict:
    """PRESET=record, end to end, --steps steps: the run's JSON (phases, history, evaluations)."""
    log(f"pipeline: PRESET=record for {args.steps} steps")
    run_id = f"preflight_{time.strftime('%Y%m%d_%H%M%S')}"
    env = clean_env({"PRESET": "record", "DATA_DIR": str(data_dir), "VOCAB_SIZE": str(vocab),
                     "ITERATIONS": str(args.steps), "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "3",
                     "TRAIN_LOG_EVERY": "1", "GPTQ_CALIBRATION_BATCHES": str(args.calibration_batches),
                     "LOG_DIR": str(args.cache / "runs"), "RUN_ID": run_id, **knobs})
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                              timeout=deadline.left())
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {time.monotonic() - t0:.0f}s (see {args.cache / 'runs' / run_id}.txt)"}
    result_file = args.cache / "runs" / f"{run_id}.json"
    if proc.returncode != 0 or not result_file.is_file():
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"}
    metrics = json.loads(result_file.read_text())
    metrics["process_seconds"] = time.monotonic() - t0
    return metrics


def training_rates(history: list[dict]) -> dict[str, float]:
    """Median tokens/s of the logged steps before and after looping (each state's first step dropped)."""
    out = {}
    for state, name in ((0, "plain"), (1, "looped")):
        rows = [r["tok_s"] for r in history if r.get("looping") == state]
        if len(rows) > 1:
            out[f"{name}_tok_s"] = statistics.median(rows[1:])
    return out


# ---------------------------------------------------------------------------------------------
# 4. Projection to 8xH100
# ---------------------------------------------------------------------------------------------


def project(run: dict, full_val_tokens: int, calibration_batches: int = 16) -> dict:
    """Each phase on the real run: per-token phases at 8x this GPU's rate over the real token counts
    (the validation set, `calibration_batches` GPTQ batches: the record's 16)."""
    phases, config = {r["phase"]: r for r in run["phases"]}, run["config"]
    rows = {}
    for name, row in phases.items():
        if name.startswith("warmup_") or name in ("startup", "quantization", "artifact_read"):
            rows[name] = row["seconds"]  # compiles, rank-0 work and each rank's artifact read do not shrink
        elif name.startswith("eval_") and row.get("tok_s"):
            rows[name] = full_val_tokens / (RECORD_GPUS * row["tok_s"])
        elif name == "calibration" and row.get("tok_s"):
            rows[name] = calibration_batches * config["TRAIN_BATCH_TOKENS"] / (RECORD_GPUS * row["tok_s"])
    rates = training_rates(run.get("history", {}).get("train", []))
    calib = rows.get("calibration", 0.0)
    reserve = calib * 1.25 + 0.5  # GPTQ_RESERVE_SECONDS=auto's rule
    train_s = TRAIN_BUDGET_S - reserve
    frac = config.get("ENABLE_LOOPING_AT", 0.35)
    steps = None
    if {"plain_tok_s", "looped_tok_s"} <= set(rates):
        step_tokens = config["TRAIN_BATCH_TOKENS"]
        steps = (frac * train_s * RECORD_GPUS * rates["plain_tok_s"] + (1 - frac) * train_s * RECORD_GPUS
                 * rates["looped_tok_s"]) / step_tokens
    eval_total = sum(rows.get(p, 0.0) for p in EVAL_PHASES)
    return {"phases": rows, "train_seconds": train_s, "calibration_seconds": calib, "reserve_seconds": reserve,
            "train_data_access_end": train_s + calib, "steps_in_600s": steps, **rates,
            "eval_seconds": eval_total,
            # Training data is read for the steps plus calibration; a reserve over 10% of the budget would
            # cost the run too many steps to be a record attempt.
            "train_pass": train_s + calib <= TRAIN_BUDGET_S and reserve <= MAX_RESERVE_FRACTION * TRAIN_BUDGET_S,
            "eval_pass": eval_total <= EVAL_BUDGET_S,
            "untimed_seconds": sum(v for k, v in rows.items() if k.startswith("warmup_") or k in ("startup", "quantization"))}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt(x, spec: str = ",.0f") -> str:
    return "–" if x is None else format(x, spec)


def step_table(report: dict) -> list[str]:
    ours, anchor = report.get("step", {}), report.get("anchor", {})
    lines = ["| model | state | ms/step | tokens/s | MFU | peak GiB | ours / anchor |", "|---|---|---|---|---|---|---|"]
    runs = {"ours, anchor architecture": ours, **{f"ours + {label}": part
                                                  for label, part in report.get("step_variants", {}).items()}}
    for state in ("plain", "looped"):
        for name, part in runs.items():
            r = part.get(state)
            if r:
                a = anchor.get(f"{state}_tok_s")
                ratio = f"{r['tokens_per_s'] / a:.3f}x" if a else "–"
                mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") else "–"
                peak = fmt(r["peak_memory_mib"] / 1024 if r.get("peak_memory_mib") else None, ".1f")
                lines.append(f"| {name} | {state} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                             f"{peak} | {ratio} |")
        a = anchor.get(f"{state}_tok_s")
        if a:
            ms = report["tokens_per_step"] / a * 1000
            lines.append(f"| anchor R0405 script | {state} | {ms:.1f} | {a:,.0f} | – | – | 1.000x |")
    for key in ("error", "skipped"):
        for name, part in (("step", ours), ("anchor", anchor)):
            if key in part:
                lines.append(f"| {name} | {key} | {part[key]} | | | | |")
    return lines


def budget_of(phase: str) -> str:
    if phase in ("training", "calibration"):
        return "training (600 s)"
    if phase in EVAL_PHASES:
        return "evaluation (600 s)"
    return "neither (diagnostic)" if phase == "eval_pre_quant" else "neither (untimed)"


def pipeline_table(report: dict) -> list[str]:
    run, proj = report.get("pipeline", {}), report.get("projection") or {}
    if "phases" not in run:
        return [f"pipeline: {run.get('error', 'not run')}"]
    lines = ["| phase | seconds | tokens/s | peak GiB | 8xH100 projection (s) | counts in |", "|---|---|---|---|---|---|"]
    for row in run["phases"]:
        name = row["phase"]
        peak = fmt(row["peak_mib"] / 1024, ".1f") if "peak_mib" in row else "–"
        projected = proj.get("train_seconds") if name == "training" else proj.get("phases", {}).get(name)
        lines.append(f"| {name} | {row['seconds']:.2f} | {fmt(row.get('tok_s'))} | {peak} | {fmt(projected, '.1f')} | "
                     f"{budget_of(name)} |")
    rates = training_rates(run.get("history", {}).get("train", []))
    lines.append(f"| training tokens/s before / after looping | | {fmt(rates.get('plain_tok_s'))} / "
                 f"{fmt(rates.get('looped_tok_s'))} | | | |")
    lines.append(f"| wall time of the run | {run['wall_seconds']:.1f} | | | | |")
    if proj:
        lines += ["", f"- training budget: {proj['train_seconds']:.1f} s of steps + {proj['calibration_seconds']:.1f} s "
                      f"calibration = {proj['train_data_access_end']:.1f} s of 600 (reserve {proj['reserve_seconds']:.1f} s)"
                      f", ~{fmt(proj['steps_in_600s'])} steps (R0405 made 4,986-4,992 on 8xH100 with FA3): "
                      f"**{'PASS' if proj['train_pass'] else 'FAIL'}**",
                  f"- eval budget: {proj['eval_seconds']:.1f} s of 600 (artifact read + "
                  f"{', '.join(p for p in EVAL_PHASES[1:] if p in proj['phases'])}): "
                  f"**{'PASS' if proj['eval_pass'] else 'FAIL'}**",
                  f"- untimed (compile warm-ups, start-up, quantization): {proj['untimed_seconds']:.1f} s"]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny model on the CPU: checks the harness (CI)")
    ap.add_argument("--anchor", type=Path, help="a copy of ../shared/anchors/r0405 to time side by side")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache" / "gpu", help="data, runs and JSON")
    ap.add_argument("--out", type=Path, help="the JSON report (default <cache>/preflight.json)")
    ap.add_argument("--wheels", type=Path, default=ROOT / "bench" / ".cache" / "wheels",
                    help="where a Brotli wheel is looked for when brotli is not installed")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--val-docs", type=Path, default=DEFAULT_VAL_DOCS, help="JSONL of the validation documents")
    ap.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="JSONL of the training documents")
    ap.add_argument("--n-val-docs", type=int, default=200)
    ap.add_argument("--train-docs", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=30, help="training steps of the pipeline and the anchor")
    ap.add_argument("--bench-steps", type=int, default=6, help="timed steps per state in bench/step.py")
    ap.add_argument("--calibration-batches", type=int, default=4, help="GPTQ batches in the pipeline (the "
                    "projection scales to the record's 16)")
    ap.add_argument("--val-tokens-full", type=int, default=FULL_VAL_TOKENS)
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole preflight")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: step, anchor, pipeline")
    ap.add_argument("--step-variant", action="append", default=[], metavar="KEY=VAL[,KEY=VAL]",
                    help="also time our step with these knobs (e.g. FUSED_CE_ENABLED=1); repeatable")
    args = ap.parse_args(argv)
    for name in ("n_val_docs", "train_docs", "steps", "bench_steps", "calibration_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    args.step_variants = {}
    for spec in args.step_variant:
        pairs = [p.split("=", 1) for p in spec.split(",")]
        if not all(len(p) == 2 and re.fullmatch(r"[A-Z][A-Z0-9_]*", p[0]) for p in pairs):
            ap.error(f"--step-variant={spec}: expected KEY=VAL[,KEY=VAL] with upper-case knob names")
        args.step_variants[spec] = dict(pairs)
    unknown = set(filter(None, args.skip.split(","))) - {"step", "anchor", "pipeline"}
    if unknown:
        ap.error(f"--skip={args.skip}: unknown part(s) {sorted(unknown)}; allowed: step, anchor, pipeline")
    if args.cpu:
        args.steps, args.bench_steps = min(args.steps, 6), min(args.bench_steps, 2)
        args.n_val_docs, args.train_docs = min(args.n_val_docs, 8), min(args.train_docs, 60)
    args.tokens_per_step = int(CPU_KNOBS["TRAIN_BATCH_TOKENS"]) if args.cpu else 786_432
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.budget_s)
    skip = set(filter(None, args.skip.split(",")))
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        data_dir, vocab = build_dataset(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    knobs = dict(CPU_KNOBS, VOCAB_SIZE=str(vocab)) if args.cpu else {"VOCAB_SIZE": str(vocab)}
    brotli = ensure_brotli(args)
    if brotli.startswith("absent"):
        knobs["COMPRESSOR"] = "lzma"
    report: dict = {"command": "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "environment": {**environment(args), "brotli": brotli}, "data": str(data_dir),
                    "tokens_per_step": args.tokens_per_step}
    report["step"] = {"skipped": "--skip"} if "step" in skip else step_bench(args, knobs, deadline)
    report["step_variants"] = {label: step_bench(args, {**knobs, **extra}, deadline)
                               for label, extra in args.step_variants.items() if "step" not in skip}
    if args.anchor and "anchor" not in skip:
        report["anchor"] = anchor_run(args, data_dir, deadline)
    report["pipeline"] = {"skipped": "--skip"} if "pipeline" in skip else pipeline_run(args, data_dir, vocab, knobs,
                                                                                      deadline)
    if "phases" in report["pipeline"]:
        report["projection"] = project(report["pipeline"], args.val_tokens_full)
    report["preflight_seconds"] = time.perf_counter() - t0
    out = args.out or args.cache / "preflight.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    env = report["environment"]
    print(f"# GPU preflight: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, attention "
          f"{env['attn_backend_auto']} (fa3 {env['fa3']}, fa4 {env['fa4']}), brotli {env['brotli']}; "
          f"{report['preflight_seconds']:.0f} s; JSON: {out}")
    print("\n".join(["", *step_table(report), "", *pipeline_table(report)]))
    failed = [name for name in ("step", "anchor", "pipeline") if "error" in report.get(name, {})]
    failed += [f"step variant {label}" for label, part in report.get("step_variants", {}).items() if "error" in part]
    if failed:
        print(f"\nFAILED parts: {', '.join(failed)} (their rows say why)")
        return 2
    proj = report.get("projection")
    # On the CPU the verdicts describe a CPU, not a pod: --cpu checks that every part runs.
    return 0 if args.cpu or proj is None or (proj["train_pass"] and proj["eval_pass"]) else 1


if __name__ == "__main__":
    sys.exit(main())
