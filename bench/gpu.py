"""GPU preflight: one command that proves a pod before a paid run (users on a rented pod, us on a lent one).

    python bench/gpu.py --prepare        # here, beside ../shared: build the pod kit (bench/.cache/kit) and print
                                         #   its size and the exact command to run on the pod
    python bench/gpu.py                  # on the pod, the kit carried: one H100/H200, about 9 minutes
    python bench/gpu.py --cpu --prepare && python bench/gpu.py --cpu   # the harness itself on a CPU (CI)
    python bench/gpu.py --project-eval   # anywhere, no GPU: PRESET=record's evaluation on 8xH100, calibrated on
                                         #   PR #1855's seed logs, PASS/FAIL against 600 s (exit 0/1)

The kit (--kit, git-ignored) holds everything a bare pod needs: the dataset (val = the --val-docs JSONL, the
200 challenge documents; train = the first --train-docs documents of --docs, 1,200 FineWeb documents;
tokenized with --tokenizer, the sp8192 one in parameter-golf main), copies of the PR #1394 record's and the
leaderboard top's (PR #1855) scripts (../shared/anchors), a Brotli wheel for the pod's Python (the device image
has none) and kit.json: the sha256 of every kit file and of the sources it was built from. On the pod the
sources are absent and the kit is used as it is (its files checked against kit.json); beside changed sources
its data is rebuilt.
--cpu keeps its own kit and outputs (kit-cpu, gpu-cpu): a tiny CPU dataset never replaces a pod's.

Parts, in this order, each with its own time budget (--budget PART=SECONDS), so a slow one cannot starve the
verdict:
1. pipeline: PRESET=record end to end for --steps steps on the kit's data: one row per phase from the run's
   own JSON (each compile warm-up, training before and after looping, calibration, quantization with
   compression, every evaluation) with tokens/s and peak memory, projected to the real run on 8xH100 (600 s
   of training; the full validation set, --val-tokens-full, 40,540,160 sp8192 tokens) with PASS/FAIL against
   both 600 s budgets. Per-token phases scale as 1/8 of this GPU's time. Phased TTT is projected from the real
   split's document lengths (the per-batch ranges in the leaderboard top's logs, PR #1855, rescaled to our
   token count): its cost per chunk step and per window token is fitted on this run's TTT segments (the phase
   prefix scaled to this dataset, so most documents fall after it as in the real split), then summed over the
   busiest rank's batches of the real split. Compile warm-ups and quantization do not shrink.
2. step: our step with PR #1394's architecture (bench/step.py --both, the knobs in ANCHOR_ARCH), without and
   with depth recurrence: ms/step, tokens/s, MFU, peak memory.
3. variant: the step again with each --step-variant's knobs (e.g. FUSED_CE_ENABLED=1).
4. anchor: PR #1394's own script (the kit's copy, or --anchor) trained on the same data, its tokens/s read
   from its log, and the ratio ours/anchor.

Everything goes to one JSON (--out, default <cache>/preflight.json); a short table is printed last. A part
that fails or runs out of its budget is marked in its row and the others still run.

--project-eval (also a line under the pipeline's table) projects the record preset's whole evaluation (artifact
read + round trip + sliding + phased TTT with LoRA and phases kept) from PR #1855's own 8xH100 logs rather than
from this pod: its TTT segment times give seconds per chunk step and per window token under its work model
(every batch row at full context, batches claimed from a shared counter), applied to ours (LoRAWalk costs on the
busiest rank of ttt_schedule, our pauses and phase SGD) on the real split; its evaluation and decompression
times give the other parts; and our one H100 measurement (OUR_H100) scales model compute to our speed.
See project_record_eval.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
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
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DEFAULT_TOKENIZER = SHARED / "data" / "tokenizers" / "variants" / "CiprianFlorin-Ifrim" / "fineweb_8192_bpe.model"
DEFAULT_VAL_DOCS = SHARED / "data" / "corpus" / "fineweb_challenge_docs_200.jsonl"
DEFAULT_DOCS = SHARED / "data" / "corpus" / "fineweb_legal_pilot_2800.jsonl"
ANCHORS = ("r0405", "top1855")  # folders of ../shared/anchors copied into the kit
TOP = "top1855"  # the leaderboard top's folder: its seed logs give the real split's document lengths
CACHE = ROOT / "bench" / ".cache"
FULL_VAL_TOKENS = 40_540_160  # sp8192 validation targets after truncation (the published sp8192 split)
FULL_VAL_DOCS = 50_000
TRAIN_BUDGET_S = EVAL_BUDGET_S = 600.0
RECORD_GPUS = 8
MAX_RESERVE_FRACTION = 0.1
PARTS = ("pipeline", "step", "variant", "anchor")
# Seconds per part on a pod: the pipeline first and largest (its compiles alone take about two minutes).
BUDGETS = {"pipeline": 330.0, "step": 90.0, "variant": 60.0, "anchor": 120.0}
CPU_BUDGETS = {"pipeline": 900.0, "step": 300.0, "variant": 300.0, "anchor": 60.0}
# Our knobs for PR #1394's architecture (the 2026-04-05 SP8192 record): same model, our forward equals its to 5e-6.
# The record preset's later additions are off: PR #1394 has no document isolation or packing and no fused ops.
ANCHOR_ARCH = {"PRESET": "record", "SMEAR_GATE_ENABLED": "0", "SPARSE_ATTN_GATE_ENABLED": "0", "PARALLEL_MODE": "off",
               "LOOP_START": "4", "LOOP_END": "5", "ENABLE_LOOPING_AT": "0.5", "QK_GAIN_INIT": "4.0",
               "DOC_ISOLATION": "0", "DOC_PACKED_LOADER": "0", "FUSED_CE_ENABLED": "0", "FUSED_MLP_ENABLED": "0"}
# --cpu: a model small enough that the whole harness runs in about a minute on two cores.
CPU_KNOBS = {"DEVICE": "cpu", "COMPILE": "0", "NUM_LAYERS": "6", "MODEL_DIM": "64", "NUM_HEADS": "2",
             "NUM_KV_HEADS": "1", "MLP_MULT": "2", "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64",
             "ROPE_TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "XSA_LAST_N": "6", "LOOP_START": "2",
             "LOOP_END": "3", "PARALLEL_START_LAYER": "4", "EVAL_BATCH_SEQS": "8", "EVAL_STRIDE": "32",
             "TTT_CHUNK_TOKENS": "1024", "BPB_CHECK_DOCS": "5", "TTT_BATCH_SIZE": "4"}
ANCHOR_LINE = re.compile(r"^(?P<step>\d+)/(?P<of>\d+) train_loss: \S+ train_time: \S+ tok/s: (?P<tok_s>[\d.]+)")
TOP_BATCH_LINE = re.compile(r"^ttp: b(?P<b>\d+)/(?P<n>\d+) .* dl:(?P<lo>\d+)-(?P<hi>\d+)")
EVAL_PHASES = ("artifact_read", "eval_roundtrip", "eval_sliding", "eval_ttt")


class UsageError(Exception):
    """Bad input: one line naming the flag or file, exit 2."""


class Deadline:
    """Seconds left of one part's budget, handed to its subprocess as the timeout."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train_gpt():
    if str(ROOT) not in sys.path:  # called in loops (claimed_makespan): sys.path must not grow
        sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    return tg


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without any knob of train_gpt.py (a PRESET or SEED left in the shell would
    change what is measured), plus `extra`."""
    tg = train_gpt()
    from pgolf.knobs import KNOWN_NAMES  # beside train_gpt.py, on sys.path once train_gpt() has run
    knobs = set(tg.Hyperparameters.knob_names()) | KNOWN_NAMES | {"DATA_DIR", "PEAK_TFLOPS"}
    env = {k: v for k, v in os.environ.items() if k not in knobs}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def sha256(path: Path) -> str:
    return train_gpt().sha256_file(path)


# ---------------------------------------------------------------------------------------------
# The kit: data, anchors, wheel, stamps
# ---------------------------------------------------------------------------------------------


def kit_files(kit: Path) -> dict[str, str]:
    """sha256 of every file under the kit but kit.json itself, by relative path."""
    return {str(p.relative_to(kit)): sha256(p) for p in sorted(kit.rglob("*"))
            if p.is_file() and p.name != "kit.json"}


def source_stamp(args: argparse.Namespace) -> dict:
    """What the kit's data is built from: the sources' sha256 and the document counts (never their paths)."""
    stamp = {"val_docs": args.n_val_docs, "train_docs": args.train_docs}
    for name in ("tokenizer", "val_docs_file", "docs_file"):
        stamp[name] = sha256(getattr(args, name))
    return stamp


def sources_present(args: argparse.Namespace) -> bool:
    return all(getattr(args, n).is_file() for n in ("tokenizer", "val_docs_file", "docs_file"))


def build_data(args: argparse.Namespace) -> None:
    """kit/data with datasets/fineweb10B_sp<V>/ and tokenizers/fineweb_<V>_bpe.model, built aside and moved in."""
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(args.tokenizer)).vocab_size()
    t0 = time.perf_counter()
    args.kit.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.kit) as tmp:
        docs, root = Path(tmp) / "docs.jsonl", Path(tmp) / "data"
        with open(docs, "w", encoding="utf-8") as out:
            for path, limit in ((args.val_docs_file, args.n_val_docs), (args.docs_file, args.train_docs)):
                with open(path, encoding="utf-8") as fh:
                    for _, line in zip(range(limit), fh):
                        out.write(line if line.endswith("\n") else line + "\n")
        sys.path.insert(0, str(ROOT / "data"))
        import tokenize_docs

        shards = root / "datasets" / f"fineweb10B_sp{vocab}"
        with contextlib.redirect_stdout(io.StringIO()):  # its "train on it with DATA_PATH=<this temp dir>" line
            rc = tokenize_docs.main(["--docs", str(docs), "--tokenizer", str(args.tokenizer), "--output",
                                     str(shards), "--val-docs", str(args.n_val_docs), "--force"])
        if rc != 0:
            raise UsageError(f"data/tokenize_docs.py failed (exit {rc}) building {shards} from --docs/--val-docs")
        (root / "tokenizers").mkdir(parents=True)
        shutil.copyfile(args.tokenizer, root / "tokenizers" / f"fineweb_{vocab}_bpe.model")
        shutil.rmtree(args.kit / "data", ignore_errors=True)
        os.replace(root, args.kit / "data")
    log(f"data: built {args.kit / 'data'} in {time.perf_counter() - t0:.1f}s")


def copy_anchors(args: argparse.Namespace) -> list[str]:
    copied = []
    for name in ANCHORS:
        src = args.anchors_from / name
        if src.is_dir():
            shutil.rmtree(args.kit / "anchors" / name, ignore_errors=True)
            shutil.copytree(src, args.kit / "anchors" / name, ignore=shutil.ignore_patterns("__pycache__"))
            copied.append(name)
        else:
            log(f"anchors: {src} not found; the kit has no {name} (its part of the preflight is skipped)")
    return copied


def fetch_wheel(args: argparse.Namespace) -> str:
    """A Brotli wheel for the pod's Python (--pod-python; none = skip), from PyPI with pip download."""
    if args.pod_python == "none":
        return "skipped (--pod-python none): the pod packs with brotli if installed, else lzma"
    wheels = args.kit / "wheels"
    if sorted(wheels.glob("[Bb]rotli-*.whl")):
        return f"kept {sorted(wheels.glob('[Bb]rotli-*.whl'))[-1].name}"
    tag = args.pod_python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "brotli", "--only-binary=:all:", "--no-deps", "--python-version",
           args.pod_python, "--implementation", "cp", "--abi", f"cp{tag}", "--platform", "manylinux2014_x86_64",
           "-d", str(wheels), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = sorted(wheels.glob("[Bb]rotli-*.whl"))
    if proc.returncode != 0 or not found:
        return f"FAILED ({(proc.stderr.strip().splitlines() or ['no wheel'])[-1][:160]}): the pod packs with lzma"
    return f"downloaded {found[-1].name}"


def pod_command(args: argparse.Namespace) -> str:
    kit = args.kit.resolve()
    default = (CACHE / ("kit-cpu" if args.cpu else "kit")).resolve()
    flags = (" --cpu" if args.cpu else "") + ("" if kit == default else f" --kit {os.path.relpath(kit, ROOT)}")
    return f"python bench/gpu.py{flags}"


def prepare(args: argparse.Namespace) -> int:
    """--prepare: build the kit, print its size and the command that runs the preflight on the pod."""
    if not sources_present(args):
        missing = [str(getattr(args, n)) for n in ("tokenizer", "val_docs_file", "docs_file")
                   if not getattr(args, n).is_file()]
        raise UsageError(f"--prepare needs the data sources: not found: {', '.join(missing)} (../shared/data is the "
                         f"default source; give --tokenizer/--val-docs/--docs)")
    build_data(args)
    anchors = copy_anchors(args)
    wheel = fetch_wheel(args)
    files = kit_files(args.kit)
    manifest = {"sources": source_stamp(args), "files": files, "anchors": anchors, "wheel": wheel,
                "pod_python": args.pod_python, "command": pod_command(args),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (args.kit / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum((args.kit / f).stat().st_size for f in files) + (args.kit / "kit.json").stat().st_size
    rel = os.path.relpath(args.kit.resolve(), ROOT)
    print(f"kit: {rel} ({size / 2**20:.1f} MiB in {len(files) + 1} files; anchors: {', '.join(anchors) or 'none'}; "
          f"wheel: {wheel})")
    print(f"run on the pod, from the repository root, with {rel} carried:")
    print(f"    {pod_command(args)}")
    return 0


def load_kit(args: argparse.Namespace) -> tuple[Path, int]:
    """The kit's data folder and vocabulary: checked against kit.json, rebuilt when the sources beside it changed."""
    manifest_path = args.kit / "kit.json"
    if not manifest_path.is_file():
        if not sources_present(args):
            raise UsageError(f"--kit={args.kit}: no kit.json there; build the kit with `python bench/gpu.py --prepare"
                             f"{' --cpu' if args.cpu else ''}` where ../shared/data exists and carry that folder")
        log(f"data: no kit at {args.kit}; preparing one")
        prepare(args)
    manifest = json.loads(manifest_path.read_text())
    if sources_present(args) and manifest["sources"] != source_stamp(args):
        log("data: the sources changed since the kit was built; rebuilding it")
        prepare(args)
        manifest = json.loads(manifest_path.read_text())
    else:
        log(f"data: reusing the kit at {args.kit}")
    changed = sorted(f for f, digest in manifest["files"].items()
                     if not (args.kit / f).is_file() or sha256(args.kit / f) != digest)
    if changed:
        raise UsageError(f"--kit={args.kit}: {changed[0]} is missing or differs from kit.json ({len(changed)} file(s)); "
                         f"rebuild it with --prepare")
    tokenizers = sorted((args.kit / "data" / "tokenizers").glob("fineweb_*_bpe.model"))
    vocab = int(re.search(r"fineweb_(\d+)_bpe", tokenizers[0].name).group(1))
    return args.kit / "data", vocab


# ---------------------------------------------------------------------------------------------
# Environment and step timing
# ---------------------------------------------------------------------------------------------


def ensure_brotli(args: argparse.Namespace) -> str:
    """brotli for the pipeline's artifact: installed, else unpacked from the kit's wheel onto PYTHONPATH (the
    device image has none), else COMPRESSOR=lzma with the reason in the report."""
    if gpu_importable("brotli"):
        return "installed"
    wheels = args.kit / "wheels"
    for wheel in sorted(wheels.glob("[Bb]rotli-*.whl")) if wheels.is_dir() else []:
        site = args.cache / "site"
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        sys.path.insert(0, str(site))
        if gpu_importable("brotli"):
            return f"from {wheel.name}"
    return "absent: the pipeline packs with COMPRESSOR=lzma (a Brotli wheel in the kit would time brotli)"


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

    tg = train_gpt()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    backend, notes = tg.select_attention_backend("auto", device)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
            "attn_backend_auto": backend, "attn_backend_notes": notes,
            "fa3": tg.importable("flash_attn_interface"), "fa4": tg.importable("flash_attn.cute")}
    if cuda:
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def run_json(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> dict:
    """Run a command whose stdout ends with one JSON document; {"error": ...} when it does not."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s (its budget)"}
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
    """PR #1394's script logs `N/T train_loss: .. tok/s: X` with X the mean over steps 1..N; its looping starts
    at T/2.
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
    src = Path(args.anchor)
    if not (src / "run_anchor.py").is_file():
        return {"error": f"--anchor={src}: no run_anchor.py there (a copy of ../shared/anchors/r0405)"}
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
            lines.append("(stopped at its budget)")
    out = parse_anchor_lines(lines, args.tokens_per_step)
    if "error" in out:
        out["error"] += "; last lines: " + " | ".join(x.strip() for x in lines[-3:])
    return out


# ---------------------------------------------------------------------------------------------
# The record pipeline
# ---------------------------------------------------------------------------------------------


def prefix_docs_for(n_docs: int, phases: int) -> int:
    """The phase prefix scaled to this dataset (the record's 2,500 of 50,000 documents), at least one document
    per phase, so most documents fall after it as in the real split."""
    return max(phases, round(n_docs * 2500 / FULL_VAL_DOCS))


def pipeline_run(args: argparse.Namespace, data_dir: Path, vocab: int, knobs: dict[str, str],
                 deadline: Deadline) -> dict:
    """PRESET=record, end to end, --steps steps: the run's JSON (phases, history, evaluations) and its log."""
    log(f"pipeline: PRESET=record for {args.steps} steps")
    run_id = f"preflight_{time.strftime('%Y%m%d_%H%M%S')}"
    record = train_gpt().Hyperparameters.from_env({"PRESET": "record"})
    env = clean_env({"PRESET": "record", "DATA_DIR": str(data_dir), "VOCAB_SIZE": str(vocab),
                     "ITERATIONS": str(args.steps), "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "3",
                     "TRAIN_LOG_EVERY": "1", "GPTQ_CALIBRATION_BATCHES": str(args.calibration_batches),
                     "PHASED_TTT_PREFIX_DOCS": str(prefix_docs_for(args.n_val_docs, record.phased_ttt_num_phases)),
                     "LOG_DIR": str(args.cache / "runs"), "RUN_ID": run_id, **knobs})
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                              timeout=deadline.left())
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {time.monotonic() - t0:.0f}s, its budget (see {args.cache / 'runs' / run_id}.txt)"}
    result_file = args.cache / "runs" / f"{run_id}.json"
    if proc.returncode != 0 or not result_file.is_file():
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"}
    metrics = json.loads(result_file.read_text())
    metrics["process_seconds"] = time.monotonic() - t0
    metrics["ttt_segments"] = parse_ttt_segments((args.cache / "runs" / f"{run_id}.txt").read_text().splitlines())
    return metrics


def parse_ttt_segments(lines: list[str]) -> list[dict]:
    """The run's `ttt_phased:i/n documents:.. score_s:.. global_sgd_s:..` lines, one dict per segment."""
    rows = []
    for line in lines:
        if line.startswith("ttt_phased:"):
            kv = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            rows.append({"documents": int(kv["documents"]), "score_s": float(kv["score_s"]),
                         "global_sgd_s": None if kv["global_sgd_s"] == "none" else float(kv["global_sgd_s"])})
    return rows


def training_rates(history: list[dict]) -> dict[str, float]:
    """Median tokens/s of the logged steps before and after looping (each state's first step dropped)."""
    out = {}
    for state, name in ((0, "plain"), (1, "looped")):
        rows = [r["tok_s"] for r in history if r.get("looping") == state]
        if len(rows) > 1:
            out[f"{name}_tok_s"] = statistics.median(rows[1:])
    return out


# ---------------------------------------------------------------------------------------------
# Phased TTT's cost on the real split
# ---------------------------------------------------------------------------------------------


def ttt_work(lengths: np.ndarray, cfg: dict, world: int) -> tuple[list[np.ndarray], list[int]]:
    """Phased TTT's work as eval_ttt_lora plans it: per segment (the batches between two pauses), a (world, 2)
    array of chunk steps and window tokens per rank (each batch's LoRAWalk, claimed as ttt_schedule deals
    them); and per pause, the tokens its global SGD trains on. cfg: TTT_BATCH_SIZE, TTT_CHUNK_SIZE,
    EVAL_SEQ_LEN, PHASED_TTT_PREFIX_DOCS, PHASED_TTT_NUM_PHASES (GLOBAL_TTT_EPOCHS 0: no pause)."""
    tg = train_gpt()
    lengths = np.asarray(lengths, dtype=np.int64)
    batches = tg.lora_batches(lengths, cfg["TTT_BATCH_SIZE"])
    bounds = (tg.phase_bounds(lengths.size, cfg["PHASED_TTT_PREFIX_DOCS"], cfg["PHASED_TTT_NUM_PHASES"])
              if cfg.get("GLOBAL_TTT_EPOCHS", 1) else [])
    walks = [tg.LoRAWalk.plan([(0, int(n)) for n in sorted(lengths[b], reverse=True)], cfg["TTT_CHUNK_SIZE"],
                              cfg["EVAL_SEQ_LEN"]) for _, b in batches]
    shares, pauses = tg.ttt_schedule([w.cost() for w in walks], [len(b) for _, b in batches], bounds, world)
    segments = []
    for share in shares:
        work = np.zeros((world, 2), dtype=np.int64)
        for rank, mine in enumerate(share):
            for j in mine:
                work[rank] += (len(walks[j].rows), walks[j].cost())
        segments.append(work)
    sgd = [int(lengths[tg.phase_documents(batches, p, n)].sum()) for p, n in zip(pauses, bounds)]
    return segments, sgd


def split_doc_lengths(top: Path, total_tokens: int) -> tuple[np.ndarray | None, str]:
    """The real split's document lengths, in a fixed shuffled (stream) order. PR #1855's seed logs (top/
    train_seed*.log) print the length range of a sample of its TTT batches (`ttp: bN/782 ... dl:lo-hi`: 64
    documents each, in length order; 213 distinct batches over the three logs). Ranges are interpolated
    geometrically over every batch (lengths grow exponentially in the tail), spread geometrically inside
    each (the last holds the remainder of 50,000), and rescaled from CaseOps tokens to `total_tokens`."""
    points = {}
    for path in sorted(top.glob("train_seed*.log")) if top.is_dir() else []:
        for line in path.read_text().splitlines():
            m = TOP_BATCH_LINE.match(line)
            if m:
                points[int(m["b"])] = (int(m["lo"]), int(m["hi"]), int(m["n"]))
    if len(points) < 2:
        return None, f"{top}: no train_seed*.log with two or more `ttp: bN/M ... dl:lo-hi` lines"
    n_batches = next(iter(points.values()))[2]
    idx, grid = np.array(sorted(points)), np.arange(1, n_batches + 1)
    lo = np.exp(np.interp(grid, idx, [np.log(points[i][0]) for i in idx]))
    hi = np.exp(np.interp(grid, idx, [np.log(points[i][1]) for i in idx]))
    per = -(-FULL_VAL_DOCS // n_batches)
    sizes = [per] * (n_batches - 1) + [FULL_VAL_DOCS - per * (n_batches - 1)]
    lengths = np.concatenate([np.geomspace(a, b, k) for a, b, k in zip(lo, hi, sizes)])
    lengths = np.maximum(1, np.round(lengths * total_tokens / lengths.sum())).astype(np.int64)
    np.random.default_rng(0).shuffle(lengths)
    return lengths, (f"PR #1855's logs: {len(points)} of {n_batches} batch ranges, rescaled to {total_tokens:,} "
                     f"tokens")


def fit_ttt_cost(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Seconds = a * chunk_steps + b * window_tokens, least squares over the run's segments, both >= 0."""
    X = np.array([[s, t] for s, t, _ in rows], dtype=np.float64)
    y = np.array([sec for _, _, sec in rows], dtype=np.float64)
    if len(rows) >= 2 and np.linalg.matrix_rank(X) == 2:
        a, b = np.linalg.lstsq(X, y, rcond=None)[0]
        if a >= 0 and b >= 0:
            return float(a), float(b)
    # One term only: whichever explains the seconds better.
    fits = [(float(X[:, i] @ y / max(X[:, i] @ X[:, i], 1e-12)), i) for i in (0, 1)]
    errs = [((X[:, i] * c - y) ** 2).sum() for c, i in fits]
    c, i = fits[int(np.argmin(errs))]
    return (c, 0.0) if i == 0 else (0.0, c)


def val_doc_lengths(data_dir: Path, config: dict) -> np.ndarray:
    """Document lengths of the pipeline's validation stream, in stream order, as its TTT sees them."""
    tg = train_gpt()
    folder = data_dir / "datasets" / f"fineweb10B_sp{config['VOCAB_SIZE']}"
    tokens = tg.load_validation_tokens(tg.list_shards(folder, "val"), config["EVAL_SEQ_LEN"], config["VOCAB_SIZE"],
                                       config["MAX_VAL_TOKENS"])
    return np.array([hi - lo for lo, hi in tg.ttt_documents(tokens, tokens.size - 1)], dtype=np.int64)


def project_ttt(run: dict, own_lengths: np.ndarray, split: np.ndarray, world: int = RECORD_GPUS) -> dict:
    """Phased TTT on the real split, per the cost this run measured (fit_ttt_cost over its segments; global SGD
    per token), summed over segments of the busiest rank."""
    tg = train_gpt()
    cfg, segs = run["config"], run.get("ttt_segments") or []
    own, own_sgd = ttt_work(own_lengths, cfg, 1)
    if len(own) != len(segs):
        return {"error": f"{len(segs)} ttt_phased lines for {len(own)} segments"}
    rows = [(int(w[0, 0]), int(w[0, 1]), seg["score_s"]) for w, seg in zip(own, segs)]
    sgd_s = sum(seg["global_sgd_s"] for seg in segs if seg["global_sgd_s"] is not None)
    sgd_tokens = sum(own_sgd) * cfg["GLOBAL_TTT_EPOCHS"]
    a_s, b_s = fit_ttt_cost(rows)
    record = tg.Hyperparameters.from_env({"PRESET": "record"})
    real, real_sgd = ttt_work(split, {"TTT_BATCH_SIZE": record.ttt_batch_size, "TTT_CHUNK_SIZE": record.ttt_chunk_size,
                                      "EVAL_SEQ_LEN": record.eval_seq_len,
                                      "PHASED_TTT_PREFIX_DOCS": record.phased_ttt_prefix_docs,
                                      "PHASED_TTT_NUM_PHASES": record.phased_ttt_num_phases,
                                      "GLOBAL_TTT_EPOCHS": record.global_ttt_epochs}, world)
    busiest = [float((work @ [a_s, b_s]).max()) for work in real]
    seconds = sum(busiest)
    if sgd_tokens:
        seconds += sum(real_sgd) * record.global_ttt_epochs * sgd_s / sgd_tokens / world
    return {"seconds": float(seconds), "per_chunk_step_s": a_s, "per_window_token_s": b_s,
            "segment_busiest_rank_s": busiest, "fit_points": rows,
            "sgd_s_per_token": sgd_s / sgd_tokens if sgd_tokens else None}


# ---------------------------------------------------------------------------------------------
# The record preset's evaluation on 8xH100, calibrated on PR #1855's seed logs
# ---------------------------------------------------------------------------------------------

# Our one H100 measurement (2026-11-26): PRESET=record under torchrun on one
# H100 80GB HBM3, torch 2.11.0+cu130, PyTorch SDPA (no FA3), 786,432 tokens per step, 40 steps.
OUR_H100 = {"plain_tok_s": 770_000.0, "looped_tok_s": 524_000.0,
            "source": "PRESET=record on one H100 80GB HBM3 (torch 2.11.0+cu130, SDPA, no FA3)"}
TOP_KNOB_LINE = re.compile(r"^  (?P<key>[a-z][a-z0-9_]*): (?P<value>\S+)$")
TOP_PAUSE_LINE = re.compile(r"^ttpp: phase:(?P<k>\d+)/\d+ pd:(?P<pd>\d+) gd:(?P<gd>\d+) t:(?P<t>[\d.]+)s")
TOP_RESUME_LINE = re.compile(r"^ttpr: phase:(?P<k>\d+)/\d+ t:(?P<t>[\d.]+)s")
TOP_SGD_LINE = re.compile(r"^tttg: c(?P<c>\d+)/(?P<n>\d+) ")
TOP_EVAL_LINE = re.compile(r"^(?P<label>[a-z][a-z_ -]*?) val_loss:\S+ val_bpb:\S+ eval_time:(?P<ms>\d+)ms")
TOP_DECOMPRESS_LINE = re.compile(r"^Deserialize: decompression done in (?P<s>[\d.]+)s")
TOP_DOCS_LINE = re.compile(r"^ttt_phased: total_docs:(?P<docs>\d+) ")
TOP_VAL_LINE = re.compile(r"^val_tokens: (?P<n>\d+)$")
TOP_LOOP_LINE = re.compile(r"^layer_loop:enabled step:(?P<step>\d+)")
TOP_EVAL_KNOBS = ("world_size", "ttt_batch_size", "ttt_chunk_size", "ttt_eval_seq_len", "global_ttt_chunk_tokens",
                  "train_batch_tokens")


def parse_top_log(lines: list[str]) -> dict:
    """What one PR #1855 seed log says about its evaluation: its knobs (TOP_EVAL_KNOBS), the validation tokens and
    documents, each phase's pause (`ttpp:` scored documents pd and seconds t since the TTT timer started), resume
    (`ttpr:`) and global SGD chunk count (`tttg: c1/N`), the TTT total (`quantized_ttt_phased ... eval_time`), the
    other evaluations' times (`<label> ... eval_time:..ms`), each artifact decompression, and its training rate
    per GPU before and after looping (from the cumulative `tok/s` of its progress lines)."""
    out: dict = {"knobs": {}, "pauses": [], "resumes": [], "sgd_chunks": [], "evals": {}, "decompress_s": [],
                 "train": []}
    loop_step = None
    for line in lines:
        if m := TOP_KNOB_LINE.match(line):
            if m["key"] in TOP_EVAL_KNOBS:
                out["knobs"][m["key"]] = int(m["value"])
        elif m := TOP_PAUSE_LINE.match(line):
            out["pauses"].append({"docs": int(m["pd"]), "trained_docs": int(m["gd"]), "t": float(m["t"])})
        elif m := TOP_RESUME_LINE.match(line):
            out["resumes"].append(float(m["t"]))
        elif (m := TOP_SGD_LINE.match(line)) and m["c"] == "1":
            out["sgd_chunks"].append(int(m["n"]))
        elif m := TOP_EVAL_LINE.match(line):
            out["evals"][m["label"]] = int(m["ms"]) / 1000
        elif m := TOP_DECOMPRESS_LINE.match(line):
            out["decompress_s"].append(float(m["s"]))
        elif m := TOP_DOCS_LINE.match(line):
            out["docs"] = int(m["docs"])
        elif m := TOP_VAL_LINE.match(line):
            out["val_tokens"] = int(m["n"])
        elif m := TOP_LOOP_LINE.match(line):
            loop_step = int(m["step"])
        elif m := ANCHOR_LINE.match(line):
            out["train"].append((int(m["step"]), float(m["tok_s"])))
    out["ttt_s"] = out["evals"].pop("quantized_ttt_phased", None)
    k = out["knobs"]
    if loop_step is not None and "train_batch_tokens" in k and "world_size" in k:
        # tok/s is the cumulative mean since step 1: elapsed(step) = step * tokens per step / tok/s
        elapsed = {s: s * k["train_batch_tokens"] / r for s, r in out["train"]}
        plain = [s for s in elapsed if s < loop_step]
        looped = sorted(s for s in elapsed if s > loop_step)
        if plain:
            out["plain_tok_s_per_gpu"] = max(plain) * k["train_batch_tokens"] / elapsed[max(plain)] / k["world_size"]
        if len(looped) >= 2:
            a, b = looped[0], looped[-1]
            out["looped_tok_s_per_gpu"] = ((b - a) * k["train_batch_tokens"] / (elapsed[b] - elapsed[a])
                                           / k["world_size"])
    return out


def top_segments(log: dict) -> list[dict]:
    """The log's TTT split at its pauses: per segment, the documents scored in it (from the pauses' running
    counts) and its seconds (pause - previous resume; the last one ends with the TTT total); per phase, its SGD
    seconds (resume - pause) and chunks."""
    if not log["pauses"] or len(log["pauses"]) != len(log["resumes"]) or log.get("ttt_s") is None:
        raise ValueError("a PR #1855 log needs its ttpp:/ttpr: pairs and its quantized_ttt_phased line")
    segs, done, start = [], 0, 0.0
    for p, resume in zip(log["pauses"], log["resumes"]):
        segs.append({"docs": p["docs"] - done, "seconds": p["t"] - start, "sgd_s": resume - p["t"]})
        done, start = p["docs"], resume
    segs.append({"docs": log["docs"] - done, "seconds": log["ttt_s"] - start, "sgd_s": None})
    for seg, chunks in zip(segs, log["sgd_chunks"]):
        seg["sgd_chunks"] = chunks
    return segs


def top_batch_work(lengths: np.ndarray, batch: int, chunk: int, seq: int) -> list[tuple[int, int]]:
    """PR #1855's LoRA work per batch, in its queue order (train_gpt.lora_batches cuts the same batches): (chunk
    steps, window tokens), where each of its chunk steps runs every row of the batch, finished or not, at the
    chunk's full context min((c + 1) * chunk, seq)."""
    tg = train_gpt()
    lengths = np.asarray(lengths, dtype=np.int64)
    out = []
    for _, docs in tg.lora_batches(lengths, batch):
        steps = int(-(-int(lengths[docs].max()) // chunk))
        out.append((steps, len(docs) * int(np.minimum((np.arange(steps) + 1) * chunk, seq).sum())))
    return out


def segment_batches(sizes: list[int], docs: list[int]) -> list[tuple[int, int]]:
    """[first, end) queue positions of each segment, from the documents each one scored (batch sizes in queue
    order): a segment ends with the batch that completes its count."""
    cum, out, done = np.cumsum(sizes), [], 0
    for n in docs:
        first = int(np.searchsorted(cum, done, side="right")) if done else 0
        done += n
        out.append((first, min(len(sizes), int(np.searchsorted(cum, done, side="left")) + 1)))
    return out


def claimed_makespan(costs: list[float], world: int) -> float:
    """Wall time of a segment under PR #1855's shared batch counter: each batch, in queue order, goes to the rank
    that is free first (train_gpt.ttt_schedule plays the same claims); the segment ends when the last rank
    finishes."""
    shares = train_gpt().ttt_schedule(costs, [0] * len(costs), [], world)[0]
    return max((sum(costs[j] for j in share) for seg in shares for share in seg), default=0.0)


def fit_top_ttt(segments: list[tuple[list[tuple[int, int]], float]], world: int, grid: int = 721) -> dict:
    """Seconds per chunk step a and per window token b (a, b >= 0, per rank) such that the claimed makespans of
    the segments' batches (a * steps + b * tokens each) fit the logged segment seconds in least squares. The
    makespan scales with (a, b), so for each direction on a grid the scale is closed-form."""
    y = np.array([sec for _, sec in segments], dtype=np.float64)
    s_ref = max(sum(s for work, _ in segments for s, _ in work), 1)
    t_ref = max(sum(t for work, _ in segments for _, t in work), 1)
    best = None
    for theta in np.linspace(0.0, math.pi / 2, grid):
        ca, cb = math.cos(theta) / s_ref, math.sin(theta) / t_ref
        m = np.array([claimed_makespan([ca * s + cb * t for s, t in work], world) for work, _ in segments])
        scale = float(m @ y / max(m @ m, 1e-300))
        err = float(((scale * m - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, scale * ca, scale * cb, scale * m)
    err, a, b, predicted = best
    return {"per_chunk_step_s": a, "per_window_token_s": b, "predicted_s": predicted.tolist(),
            "measured_s": y.tolist(), "rms_s": math.sqrt(err / len(y))}


def record_eval_config() -> dict:
    """PRESET=record's evaluation knobs, as ttt_work reads them, plus the sliding and round-trip windows."""
    h = train_gpt().Hyperparameters.from_env({"PRESET": "record"})
    return {"TTT_BATCH_SIZE": h.ttt_batch_size, "TTT_CHUNK_SIZE": h.ttt_chunk_size, "EVAL_SEQ_LEN": h.eval_seq_len,
            "PHASED_TTT_PREFIX_DOCS": h.phased_ttt_prefix_docs, "PHASED_TTT_NUM_PHASES": h.phased_ttt_num_phases,
            "GLOBAL_TTT_EPOCHS": h.global_ttt_epochs, "TTT_CHUNK_TOKENS": h.ttt_chunk_tokens,
            "EVAL_STRIDE": h.eval_stride if h.sliding else None, "TTT": h.ttt_enabled,
            "COMPRESSOR": h.compressor}


def window_tokens(n_targets: int, seq: int, stride: int) -> int:
    """Tokens through the model in an evaluation of n_targets targets in windows of seq every stride."""
    starts, _ = train_gpt().sliding_windows(n_targets, seq, stride)
    return int(starts.size) * seq


def project_record_eval(top: Path, ours: dict = OUR_H100, world: int = RECORD_GPUS) -> dict:
    """PRESET=record's evaluation on 8xH100 (artifact read + round trip + sliding + phased TTT, LoRA and phases
    kept), calibrated on PR #1855's seed logs in `top`:
    - TTT: seconds per chunk step and per window token fitted to the logged segment times under the top's work
      model (fit_top_ttt; the real split's lengths from the same logs, split_doc_lengths, at its token count),
      applied to our work model (ttt_work: LoRAWalk costs, ttt_schedule, our pauses) on the busiest rank of
      each segment; the phase SGD at the logs' seconds per trained 32,768-token chunk, over our phases' chunks;
    - round trip: the top's pre-quantization diagnostic (the same forward-only, 2048-token-window pass over
      every validation token; slowest seed), scaled by window tokens; sliding: the same seconds per window token
      over the sliding windows (the top runs no sliding evaluation);
    - artifact read: the top's per-group lrzip decompression (slowest), our COMPRESSOR=pergroup being its format.
    Each model-compute part is given twice: at the top's speed, and at ours as measured on one H100 (`ours`:
    the top's looped training tokens/s per GPU over ours)."""
    paths = sorted(top.glob("train_seed*.log")) if top.is_dir() else []
    logs = [parse_top_log(p.read_text().splitlines()) for p in paths]
    logs = [lg for lg in logs if lg["pauses"] and lg.get("ttt_s") is not None]
    if not logs:
        return {"error": f"{top}: no train_seed*.log with PR #1855's phased TTT lines "
                         f"(ttpp:/ttpr:/quantized_ttt_phased)"}
    knobs, n_targets = logs[0]["knobs"], logs[0]["val_tokens"]
    split, source = split_doc_lengths(top, n_targets)
    if split is None:
        return {"error": source}
    work = top_batch_work(split, knobs["ttt_batch_size"], knobs["ttt_chunk_size"], knobs["ttt_eval_seq_len"])
    sizes = [len(docs) for _, docs in train_gpt().lora_batches(split, knobs["ttt_batch_size"])]
    points, sgd_s, sgd_chunks, per_log = [], 0.0, 0, []
    for lg in logs:
        segs = top_segments(lg)
        spans = segment_batches(sizes, [seg["docs"] for seg in segs])
        per_log.append(len(spans))
        points += [(work[lo:hi], seg["seconds"]) for (lo, hi), seg in zip(spans, segs)]
        for seg in segs[:-1]:
            sgd_s, sgd_chunks = sgd_s + seg["sgd_s"], sgd_chunks + seg["sgd_chunks"] - 1  # its last is not trained
    fit = fit_top_ttt(points, knobs["world_size"])
    a, b = fit["per_chunk_step_s"], fit["per_window_token_s"]
    per_chunk = sgd_s / max(sgd_chunks, 1)
    cfg = record_eval_config()
    segments, sgd_tokens = ttt_work(split, cfg, world)
    lora = [float((w @ [a, b]).max()) for w in segments]
    chunks = [max(0, -(-t // cfg["TTT_CHUNK_TOKENS"]) - 1) for t in sgd_tokens]
    ttt_s = sum(lora) + sum(chunks) * per_chunk
    seq = cfg["EVAL_SEQ_LEN"]
    rt_label = "diagnostic pre-quantization post-ema"
    rt_logged = max(lg["evals"][rt_label] for lg in logs if rt_label in lg["evals"])
    per_token = rt_logged / window_tokens(n_targets, seq, seq)
    roundtrip = per_token * window_tokens(n_targets, seq, seq)
    sliding = per_token * window_tokens(n_targets, seq, cfg["EVAL_STRIDE"]) if cfg["EVAL_STRIDE"] else 0.0
    read = max(s for lg in logs for s in lg["decompress_s"]) if any(lg["decompress_s"] for lg in logs) else 0.0
    top_rate = statistics.mean(lg["looped_tok_s_per_gpu"] for lg in logs if "looped_tok_s_per_gpu" in lg)
    slow = top_rate / ours["looped_tok_s"]
    parts = {"artifact_read": read, "eval_roundtrip": roundtrip, "eval_sliding": sliding, "eval_ttt": ttt_s}
    at_ours = {k: v if k == "artifact_read" else v * slow for k, v in parts.items()}
    top_own = sum(claimed_makespan([a * s + b * t for s, t in w], knobs["world_size"]) for w, _ in points[:per_log[0]])
    others = sum(parts.values()) - sliding
    return {"logs": [p.name for p in paths], "split": source, "val_tokens": n_targets, "config": cfg, "fit": fit,
            # seconds per window token at which the sliding pass would just fit (PR #1855's speed)
            "sliding_break_even_s_per_token": (EVAL_BUDGET_S - others) / (sliding / per_token) if sliding else None,
            "sgd_s_per_chunk": per_chunk, "sgd_chunks_logged": sgd_chunks, "ttt_lora_segments_s": lora,
            "ttt_sgd_chunks": chunks, "ttt_sgd_s": sum(chunks) * per_chunk, "ttt_sgd_tokens": sgd_tokens,
            "ours_window_tokens": int(sum(int(w[:, 1].sum()) for w in segments)),
            "top_window_tokens": int(sum(t for _, t in work)), "top_ttt_logged_s": [lg["ttt_s"] for lg in logs],
            "top_lora_model_s": top_own, "roundtrip_logged_s": rt_logged, "seconds_per_eval_token": per_token,
            "top_looped_tok_s_per_gpu": top_rate, "ours_looped_tok_s": ours["looped_tok_s"], "speed_factor": slow,
            "ours_source": ours["source"], "parts": parts, "parts_at_our_speed": at_ours,
            "total_s": sum(parts.values()), "total_at_our_speed_s": sum(at_ours.values()),
            "pass": sum(parts.values()) <= EVAL_BUDGET_S, "pass_at_our_speed": sum(at_ours.values()) <= EVAL_BUDGET_S}


def record_eval_lines(p: dict) -> list[str]:
    """The projection as printed by --project-eval."""
    if "error" in p:
        return [f"record eval projection: {p['error']}"]
    fit, cfg = p["fit"], p["config"]
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines = [f"# PRESET=record evaluation projected to 8xH100, calibrated on PR #1855's {', '.join(p['logs'])}",
             "",
             f"- real split: {p['split']}",
             f"- PR #1855's TTT per rank: {fit['per_chunk_step_s'] * 1000:.1f} ms per chunk step + "
             f"{fit['per_window_token_s'] * 1e6:.3f} us per window token (all rows x full context per chunk), "
             f"fitted to {len(fit['measured_s'])} logged segments under its batch counter, rms "
             f"{fit['rms_s']:.1f} s; segments logged / modelled (s): "
             + ", ".join(f"{m:.1f}/{q:.1f}" for m, q in zip(fit["measured_s"], fit["predicted_s"])),
             f"- its phase SGD: {p['sgd_s_per_chunk']:.3f} s per trained {cfg['TTT_CHUNK_TOKENS']:,}-token chunk "
             f"({p['sgd_chunks_logged']} trained chunks in the logs); its LoRA scoring under the fit: "
             f"{p['top_lora_model_s']:.1f} s + SGD, logged TTT totals "
             + ", ".join(f"{s:.1f}" for s in p["top_ttt_logged_s"]) + " s",
             f"- ours: {p['ours_window_tokens'] / 1e9:.3f} G window tokens (the top's work: "
             f"{p['top_window_tokens'] / 1e9:.3f} G), busiest of {RECORD_GPUS} ranks per segment "
             + ", ".join(f"{s:.1f}" for s in p["ttt_lora_segments_s"])
             + f" = {sum(p['ttt_lora_segments_s']):.1f} s; phase SGD on "
             + ", ".join(f"{t / 1e6:.2f}" for t in p["ttt_sgd_tokens"]) + f" M tokens = "
             f"{sum(p['ttt_sgd_chunks'])} chunks, {p['ttt_sgd_s']:.1f} s",
             f"- evaluations: {p['seconds_per_eval_token'] * 1e9:.1f} ns per window token (PR #1855's "
             f"pre-quantization diagnostic, {p['roundtrip_logged_s']:.1f} s, slowest seed; compiled, forward only, "
             f"2048-token windows); "
             + (f"sliding at stride {cfg['EVAL_STRIDE']} is "
                f"{p['parts']['eval_sliding'] / max(p['parts']['eval_roundtrip'], 1e-9):.1f}x the round trip's windows"
                if cfg["EVAL_STRIDE"] else "no sliding evaluation (EVAL_STRIDE=0, as PR #1855)"),
             f"- our speed: PR #1855's looped training {p['top_looped_tok_s_per_gpu']:,.0f} tok/s per GPU (its logs) "
             f"over ours {p['ours_looped_tok_s']:,.0f} ({p['ours_source']}): x{p['speed_factor']:.2f} on model compute",
             "",
             "| part (s) | at PR #1855's speed | at our measured H100 speed |", "|---|---|---|"]
    for name in EVAL_PHASES:
        lines.append(f"| {name} | {p['parts'][name]:.1f} | {p['parts_at_our_speed'][name]:.1f} |")
    lines += [f"| total (budget {EVAL_BUDGET_S:.0f}) | {p['total_s']:.1f} {verdict(p['pass'])} | "
              f"{p['total_at_our_speed_s']:.1f} {verdict(p['pass_at_our_speed'])} |",
              f"| total without eval_sliding | {p['total_s'] - p['parts']['eval_sliding']:.1f} "
              f"{verdict(p['total_s'] - p['parts']['eval_sliding'] <= EVAL_BUDGET_S)} | "
              f"{p['total_at_our_speed_s'] - p['parts_at_our_speed']['eval_sliding']:.1f} "
              f"{verdict(p['total_at_our_speed_s'] - p['parts_at_our_speed']['eval_sliding'] <= EVAL_BUDGET_S)} |",
              *(["", f"- eval_sliding fits the budget (at PR #1855's speed) only at <= "
                 f"{p['sliding_break_even_s_per_token'] * 1e9:.1f} ns per window token, "
                 f"{p['seconds_per_eval_token'] / p['sliding_break_even_s_per_token']:.2f}x faster than the logged "
                 f"evaluation"] if p["sliding_break_even_s_per_token"] else []),
              "",
              f"record eval projection (8xH100, LoRA and phases kept): {p['total_s']:.1f} s at PR #1855's speed, "
              f"{p['total_at_our_speed_s']:.1f} s at ours: {verdict(p['pass'] and p['pass_at_our_speed'])}"]
    return lines


# ---------------------------------------------------------------------------------------------
# Projection to 8xH100
# ---------------------------------------------------------------------------------------------


def project(run: dict, full_val_tokens: int, calibration_batches: int = 16, ttt: dict | None = None) -> dict:
    """Each phase on the real run: per-token phases at 8x this GPU's rate over the real token counts
    (the validation set, `calibration_batches` GPTQ batches: the record's 16); eval_ttt from `ttt`
    (project_ttt) when given."""
    phases, config = {r["phase"]: r for r in run["phases"]}, run["config"]
    rows = {}
    for name, row in phases.items():
        if name.startswith("warmup_") or name in ("startup", "quantization", "artifact_read"):
            rows[name] = row["seconds"]  # compiles, rank-0 work and each rank's artifact read do not shrink
        elif name == "eval_ttt" and ttt and "seconds" in ttt:
            rows[name] = ttt["seconds"]
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
            lines.append(f"| anchor PR #1394 script | {state} | {ms:.1f} | {a:,.0f} | – | – | 1.000x |")
    for key in ("error", "skipped"):
        for name, part in (("step", ours), ("anchor", anchor), *report.get("step_variants", {}).items()):
            if key in part:
                lines.append(f"| {name} | {key} | {part[key]} | | | | |")
    return lines


def budget_of(phase: str) -> str:
    if phase in ("training", "calibration"):
        return "training (600 s)"
    if phase in EVAL_PHASES:
        return "evaluation (600 s)"
    return "neither (diagnostic)" if phase == "eval_pre_quant" else "neither (untimed)"


def budget_verdict(ok: bool, cpu: bool) -> str:
    return "no verdict (this is a CPU, not a pod)" if cpu else f"**{'PASS' if ok else 'FAIL'}**"


def failed_checks(report: dict) -> list[str]:
    """The checks the report prints FAIL for: the exit code must agree with the table."""
    proj, record = report.get("projection") or {}, report.get("record_eval_projection") or {}
    checks = {} if report.get("cpu") or not proj else {"training budget": proj["train_pass"],
                                                         "eval budget": proj["eval_pass"]}
    if "pass" in record:  # PR #1855's logs, not this machine: a verdict on a CPU too
        checks["record eval projection"] = record["pass"] and record["pass_at_our_speed"]
    return [name for name, ok in checks.items() if not ok]


def pipeline_table(report: dict) -> list[str]:
    run, proj, cpu = report.get("pipeline", {}), report.get("projection") or {}, report.get("cpu", False)
    if "phases" not in run:
        return [f"pipeline: {run.get('error', run.get('skipped', 'not run'))}"]
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
                      f", ~{fmt(proj['steps_in_600s'])} steps (PR #1394 made 4,986-4,992 on 8xH100 with FA3): "
                      f"{budget_verdict(proj['train_pass'], cpu)}",
                  f"- eval budget: {proj['eval_seconds']:.1f} s of 600 (artifact read + "
                  f"{', '.join(p for p in EVAL_PHASES[1:] if p in proj['phases'])}): "
                  f"{budget_verdict(proj['eval_pass'], cpu)}",
                  f"- untimed (compile warm-ups, start-up, quantization): {proj['untimed_seconds']:.1f} s"]
    ttt = report.get("ttt_projection") or {}
    if "seconds" in ttt:
        lines.append(f"- eval_ttt on the real split ({ttt['split']}): {ttt['per_chunk_step_s'] * 1000:.2f} ms per chunk "
                     f"step + {ttt['per_window_token_s'] * 1e6:.3f} us per window token (fitted on "
                     f"{len(ttt['fit_points'])} segments of this run), busiest of {RECORD_GPUS} ranks per segment: "
                     f"{', '.join(f'{s:.1f}' for s in ttt['segment_busiest_rank_s'])} s")
    elif ttt:
        lines.append(f"- eval_ttt projected per token instead (no real-split model: {ttt.get('error')})")
    record = report.get("record_eval_projection")
    if record:  # PR #1855's logs, not this run: `python bench/gpu.py --project-eval` prints the details
        lines.append(f"- {record_eval_lines(record)[-1]} (`--project-eval` for the details)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny model on the CPU, own kit and outputs (CI)")
    ap.add_argument("--prepare", action="store_true", help="build the kit and print the pod command, then exit")
    ap.add_argument("--project-eval", action="store_true", help="print PRESET=record's evaluation projected to 8xH100 "
                    "from PR #1855's seed logs (--anchors-from, else the kit's copy) and PASS/FAIL against 600 s, "
                    "then exit (no GPU, no kit needed)")
    ap.add_argument("--kit", type=Path, help="the kit folder (default bench/.cache/kit, --cpu: kit-cpu)")
    ap.add_argument("--cache", type=Path, help="runs and JSON (default bench/.cache/gpu, --cpu: gpu-cpu)")
    ap.add_argument("--out", type=Path, help="the JSON report (default <cache>/preflight.json)")
    ap.add_argument("--anchor", type=Path, help="a copy of ../shared/anchors/r0405 (the readable script of the "
                    "PR #1394 record, with its SDPA launcher run_anchor.py) to time side by side (default: the kit's; "
                    "none on --cpu)")
    ap.add_argument("--anchors-from", type=Path, default=SHARED / "anchors", help="--prepare: where the anchors are")
    ap.add_argument("--pod-python", help="--prepare: Python of the pod for the Brotli wheel (default 3.12, the device "
                                         "image's; --cpu: none = no wheel)")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--val-docs", dest="val_docs_file", type=Path, default=DEFAULT_VAL_DOCS,
                    help="JSONL of the validation documents")
    ap.add_argument("--docs", dest="docs_file", type=Path, default=DEFAULT_DOCS, help="JSONL of the training documents")
    ap.add_argument("--n-val-docs", type=int, default=200)
    ap.add_argument("--train-docs", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=30, help="training steps of the pipeline and the anchor")
    ap.add_argument("--bench-steps", type=int, default=6, help="timed steps per state in bench/step.py")
    ap.add_argument("--calibration-batches", type=int, default=4, help="GPTQ batches in the pipeline (the "
                    "projection scales to the record's 16)")
    ap.add_argument("--val-tokens-full", type=int, default=FULL_VAL_TOKENS)
    ap.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                    help=f"a part's time budget (parts: {', '.join(PARTS)}; 'variant' is per variant); repeatable")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(PARTS)}")
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
    args.budgets = dict(CPU_BUDGETS if args.cpu else BUDGETS)
    for spec in args.budget:
        part, _, value = spec.partition("=")
        if part not in PARTS or not re.fullmatch(r"\d+(\.\d+)?", value):
            ap.error(f"--budget={spec}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        args.budgets[part] = float(value)
    unknown = set(filter(None, args.skip.split(","))) - set(PARTS)
    if unknown:
        ap.error(f"--skip={args.skip}: unknown part(s) {sorted(unknown)}; allowed: {', '.join(PARTS)}")
    args.pod_python = args.pod_python or ("none" if args.cpu else "3.12")
    args.kit = args.kit or CACHE / ("kit-cpu" if args.cpu else "kit")
    args.cache = args.cache or CACHE / ("gpu-cpu" if args.cpu else "gpu")
    if args.cpu:
        args.steps, args.bench_steps = min(args.steps, 6), min(args.bench_steps, 2)
        args.n_val_docs, args.train_docs = min(args.n_val_docs, 8), min(args.train_docs, 60)
    if args.anchor is None and not args.cpu and (args.kit / "anchors" / "r0405").is_dir():
        args.anchor = args.kit / "anchors" / "r0405"
    args.tokens_per_step = int(CPU_KNOBS["TRAIN_BATCH_TOKENS"]) if args.cpu else 786_432
    return args


def run_parts(args: argparse.Namespace, data_dir: Path, vocab: int, knobs: dict[str, str], report: dict,
              save: Callable[[], None]) -> None:
    """Each part against its own budget, the pipeline (the verdict) first; the report is saved after each, so
    a preflight stopped from outside keeps the parts it finished."""
    skip = set(filter(None, args.skip.split(",")))
    budget = lambda part: Deadline(args.budgets[part])  # noqa: E731  (started when the part starts)
    report["pipeline"] = ({"skipped": "--skip"} if "pipeline" in skip else
                          pipeline_run(args, data_dir, vocab, knobs, budget("pipeline")))
    add_projection(args, data_dir, report)
    save()
    report["step"] = {"skipped": "--skip"} if "step" in skip else step_bench(args, knobs, budget("step"))
    save()
    report["step_variants"] = {}
    for label, extra in args.step_variants.items() if "variant" not in skip else ():
        report["step_variants"][label] = step_bench(args, {**knobs, **extra}, budget("variant"))
        save()
    if "anchor" in skip:
        report["anchor"] = {"skipped": "--skip"}
    elif args.cpu or args.anchor is None:
        report["anchor"] = {"skipped": "the anchor script needs CUDA" if args.cpu else "no anchor in the kit"}
    else:
        report["anchor"] = anchor_run(args, data_dir, budget("anchor"))


def add_projection(args: argparse.Namespace, data_dir: Path, report: dict) -> None:
    run = report["pipeline"]
    if "phases" not in run:
        return
    ttt = None
    if run.get("ttt_segments"):
        split, source = split_doc_lengths(args.kit / "anchors" / TOP, args.val_tokens_full)
        if split is None:
            ttt = {"error": source}
        else:
            ttt = project_ttt(run, val_doc_lengths(data_dir, run["config"]), split)
            ttt["split"] = source
        report["ttt_projection"] = ttt
    report["projection"] = project(run, args.val_tokens_full, ttt=ttt)
    report["record_eval_projection"] = project_record_eval(args.kit / "anchors" / TOP)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.project_eval:
        top = args.anchors_from / TOP
        top = top if top.is_dir() else args.kit / "anchors" / TOP
        proj = project_record_eval(top)
        print("\n".join(record_eval_lines(proj)))
        return 2 if "error" in proj else 0 if proj["pass"] and proj["pass_at_our_speed"] else 1
    try:
        if args.prepare:
            return prepare(args)
        data_dir, vocab = load_kit(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    # The kit's shards are plain sp8192 (no CaseOps byte sidecars): the record's CaseOps byte counting is off.
    knobs = {**(CPU_KNOBS if args.cpu else {}), "VOCAB_SIZE": str(vocab), "CASEOPS_ENABLED": "0"}
    brotli = ensure_brotli(args)
    if brotli.startswith("absent"):
        knobs["COMPRESSOR"] = "lzma"
    report: dict = {"command": "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "cpu": args.cpu, "environment": {**environment(args), "brotli": brotli}, "kit": str(args.kit),
                    "data": str(data_dir), "tokens_per_step": args.tokens_per_step, "budgets": args.budgets}
    out = args.out or args.cache / "preflight.json"

    def save() -> None:
        report["preflight_seconds"] = time.perf_counter() - t0
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, out)

    run_parts(args, data_dir, vocab, knobs, report, save)
    save()
    env = report["environment"]
    print(f"# GPU preflight: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, attention "
          f"{env['attn_backend_auto']} (fa3 {env['fa3']}, fa4 {env['fa4']}), brotli {env['brotli']}; "
          f"{report['preflight_seconds']:.0f} s; JSON: {out}")
    print("\n".join(["", *pipeline_table(report), "", *step_table(report)]))
    failed = [name for name in ("pipeline", "step", "anchor") if "error" in report.get(name, {})]
    failed += [f"step variant {label}" for label, part in report.get("step_variants", {}).items() if "error" in part]
    if failed:
        print(f"\nFAILED parts: {', '.join(failed)} (their rows say why)")
        return 2
    # On --cpu the budgets describe a CPU, not a pod (no verdict): --cpu checks that every part runs.
    failed = failed_checks(report)
    if failed:
        print(f"\nFAIL: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
