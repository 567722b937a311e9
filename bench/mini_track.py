"""CPU mini-track: the challenge scaled to a 2-core CPU, end to end, so a change is measured and not guessed.

Every configuration is `train_gpt.py` itself, run as a subprocess with environment overrides:
the same data, the same training wallclock, the same artifact cap, the same evaluation and the same
seeds for all of them.

    python bench/mini_track.py [--configs baseline,record] [--seeds 1337,42] [--seconds 240]
                               [--variant NAME=KEY=VAL,KEY=VAL ...] [--json] [--no-append]

The track:
- Data: ../shared/data/corpus/fineweb_legal_pilot_2800.jsonl tokenized with the canonical
  ../shared/data/tokenizers/fineweb_1024_bpe.model by data/tokenize_docs.py ([BOS] + ids per
  document); the last 200 documents are the validation split, the other 2,600 train. Cached in
  bench/.cache/ under a key of the corpus and tokenizer hashes. Without ../shared the embedded
  sample (data/make_sample.py) stands in, and every result says so: such numbers are not
  comparable with shared-data ones.
- Budget: MINI_TRAIN_SECONDS (or --seconds; default 240) of training wallclock, GPTQ Hessians
  included; artifact cap 2,000,000 bytes with the code counted at its shipped size (train_gpt.py is
  run as the file records/pack.py generates, so bytes_code is the shipped size); score = sliding
  val_bpb at stride 64 over all validation documents; no test-time training (phased LoRA TTT took
  265-269 s on the 200 validation documents at rank 16: it does not fit a six-minute run;
  --eval-variant re-scores the artifacts with it).
- Configurations: `baseline` (PRESET=baseline: the naive baseline's architecture and optimizer) and
  `record` (PRESET=record: the full record stack), both at the mini size of COMMON_ENV; each
  `--variant NAME=KEY=VAL,...` is the record configuration plus its overrides (a variant that sets
  PRESET=baseline starts from the baseline configuration instead).

Output: the per-run table and the per-configuration means on stdout (or JSON with --json), progress
on stderr, and the same table appended to bench/RESULTS.md with the date, commit and hardware
unless --no-append. Each run's log, metrics JSON and artifact stay in bench/.cache/runs/<stamp>/.

Exit codes: 0 done, 1 a run failed or an artifact is over the cap, 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CORPUS = SHARED / "corpus" / "fineweb_legal_pilot_2800.jsonl"
TOKENIZER = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
# --tokenizer NAME -> (shared tokenizer, VOCAB_SIZE, CaseOps transform). sp8192 is the file in
# openai/parameter-golf main (SOURCES.md); caseops8192 the leaderboard top's CaseOps tokenizer (PR #1729).
TOKENIZERS: dict[str, tuple[Path, int, bool]] = {
    "sp1024": (TOKENIZER, 1024, False),
    "sp8192": (SHARED / "tokenizers" / "variants" / "CiprianFlorin-Ifrim" / "fineweb_8192_bpe.model", 8192, False),
    "caseops8192": (SHARED / "tokenizers" / "variants" / "openai-parameter-golf-caseops" /
                    "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", 8192, True),
}
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "RESULTS.md"

VAL_DOCS = 200  # the last 200 documents of the corpus
DEFAULT_SECONDS = 240.0
DEFAULT_SEEDS = (1337, 42)
DEFAULT_CONFIGS = ("baseline", "record")
ARTIFACT_CAP = 2_000_000  # decimal bytes: packed code + compressed model
EVAL_STRIDE = 64
RUN_LIMIT_S = 360.0  # one configuration's run (train + quantize + eval) should fit 6 minutes
GPTQ_RESERVE_MAX_S = 8.0
DATA_FORMAT = 1  # bump when the cached dataset layout changes

# The mini size, shared by every configuration: 6 layers x 128, 4/2 heads, seq 128, 4,096 tokens per
# step (bench/ablate.py's shape). Schedules are scaled to the few hundred steps a CPU run gets.
# Evaluation runs 16 sequences per forward (plain and sliding): on a 2-core CPU that scores ~2.3x
# faster than 512 (cache-sized activations), which is what keeps three passes over the 558k
# validation tokens (pre-quant, round trip, sliding) near a minute. fp32 throughout: bf16 autocast
# makes CPU eval ~1.5x faster but training 10-60% slower per step (the baseline most).
COMMON_ENV: dict[str, str] = {
    "VOCAB_SIZE": "1024", "NUM_LAYERS": "6", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "ROPE_TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "4096",
    "GRAD_ACCUM_STEPS": "1", "EVAL_BATCH_SEQS": "16", "ITERATIONS": "1000000",
    "WARMUP_STEPS": "2", "COMPILE": "0", "TRAIN_LOG_EVERY": "100", "VAL_LOSS_EVERY": "0",
    "MUON_MOMENTUM_WARMUP_STEPS": "100",
}
# Configuration name -> overrides on top of COMMON_ENV. Everything not set here is the preset's own
# value (the baseline keeps its relu^2 MLP 2x, classic Muon, no EMA, ...; the record its MLP 4x,
# LeakyReLU^2, XSA, gates, Polar Express + MuonEq-R, GPTQ + LQER, ...).
CONFIGS: dict[str, dict[str, str]] = {
    "baseline": {"PRESET": "baseline"},
    # The record's loop (layers 3-5 of 11, twice more) and lanes (from layer 8 of 11) scaled to 6
    # layers; EMA 0.9965 averages over ~300 steps, longer than most of a CPU run, so 0.99.
    "record": {"PRESET": "record", "LOOP_START": "2", "LOOP_END": "3", "NUM_LOOPS": "1",
               "PARALLEL_START_LAYER": "4", "ROPE_DIMS": "16", "EMA_DECAY": "0.99"},
}
# Set by the track for every configuration; a variant may not change them.
TRACK_KEYS = frozenset({
    "SEED", "RUN_ID", "LOG_DIR", "DATA_DIR", "DATA_PATH", "TOKENIZER_PATH", "SAMPLE_DATA", "VOCAB_SIZE",
    "MAX_WALLCLOCK_SECONDS", "TARGET_BYTES", "TARGET_MB", "EVAL_STRIDE", "SLIDING_WINDOW_ENABLED", "TTT_ENABLED",
    "CASEOPS_ENABLED",
    "MAX_VAL_TOKENS", "EVAL_ONLY", "ARTIFACT", "DRY_RUN", "DEVICE",
})
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")
FINAL_RE = re.compile(r"^final val_loss:\S+ val_bpb:\S+ eval:(\w+) bytes_total:(\d+) .*steps:(\d+)$")
PROGRESS_PREFIXES = ("step:", "train_done", "pre_quant_val_loss", "quant:", "roundtrip_val_loss", "sliding_val_loss")


class UsageError(ValueError):
    """Bad input: one line naming the flag, the value and what is allowed."""


def train_gpt():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    return tg


def log(msg: str) -> None:
    print(f"mini_track: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def parse_variant(spec: str, flag: str = "--variant") -> tuple[str, dict[str, str]]:
    """`NAME=KEY=VAL,KEY=VAL` -> (NAME, {KEY: VAL}). Checks the shape and that every KEY is a knob the
    track lets a variant change (for --eval-variant: an evaluation knob, see EVAL_VARIANT_KEYS); values
    are checked later against train_gpt's own parser."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest.strip():
        raise UsageError(f"{flag} {spec!r} is not allowed: expected NAME=KEY=VAL[,KEY=VAL...]")
    name = name.strip()
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"{flag} {spec!r} is not allowed: NAME {name!r} must start with a letter and use only "
                         "letters, digits, '_', '.', '-' (at most 40 characters)")
    tg = train_gpt()
    from pgolf.knobs import KNOB_ALIASES  # beside train_gpt.py, on sys.path once train_gpt() has run
    knobs = set(tg.Hyperparameters.knob_names()) | set(KNOB_ALIASES)
    overrides: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"{flag} {name}: {item.strip()!r} is not allowed: expected KEY=VAL")
        if key not in knobs:
            import difflib

            close = difflib.get_close_matches(key.upper(), sorted(knobs), n=1, cutoff=0.7)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"{flag} {name}: {key!r} is not a knob of train_gpt.py{hint}")
        if flag == "--eval-variant" and key not in eval_variant_keys():
            raise UsageError(f"{flag} {name}: {key} is not allowed: an evaluation variant re-scores the trained "
                             "artifact, so only test-time training knobs (TTT_*, PHASED_TTT_*, GLOBAL_TTT_*) and "
                             "EVAL_TIME_BUDGET_SECONDS may change")
        if flag == "--variant" and key in TRACK_KEYS:
            raise UsageError(f"{flag} {name}: {key} is fixed by the track (data, budget, seeds and eval are the "
                             "same for every configuration)")
        if key in overrides:
            raise UsageError(f"{flag} {name}: {key} is set twice")
        overrides[key] = value.strip()
    return name, overrides


def eval_variant_keys() -> set[str]:
    """Knobs an --eval-variant may set: test-time training and the evaluation budget."""
    tg = train_gpt()
    return {k for k in tg.Hyperparameters.knob_names() if k.startswith(("TTT_", "PHASED_TTT_", "GLOBAL_TTT_"))
            } | {"EVAL_TIME_BUDGET_SECONDS"}


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for tok in text.split(","):
        try:
            seed = int(tok.strip())
        except ValueError:
            raise UsageError(f"--seeds={text!r} is not allowed: expected comma-separated integers, e.g. 1337,42") from None
        if seed < 0:
            raise UsageError(f"--seeds={text!r} is not allowed: seeds must be >= 0")
        if seed in seeds:
            raise UsageError(f"--seeds={text!r} is not allowed: seed {seed} is listed twice")
        seeds.append(seed)
    return seeds


def parse_seconds(text: str, source: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{source}={text!r} is not allowed: expected a number of seconds > 0")
    return value


@dataclass
class Plan:
    configs: dict[str, dict[str, str]]  # name -> overrides on top of COMMON_ENV, in run order
    seeds: list[int]
    seconds: float
    as_json: bool
    append: bool
    command: str
    evals: dict[str, dict[str, str]] = field(default_factory=dict)  # --eval-variant name -> evaluation knobs
    tokenizer: str = "sp1024"  # a TOKENIZERS name
    eval_configs: list[str] = field(default_factory=list)  # configurations the eval variants re-score


def build_plan(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Plan:
    environ = os.environ if environ is None else environ
    ap = argparse.ArgumentParser(prog="bench/mini_track.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma-separated configurations to run (baseline, record, or a --variant NAME); "
                         "default baseline,record; every --variant is added")
    ap.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds (default 1337,42)")
    ap.add_argument("--seconds", default=None,
                    help=f"training wallclock per run (default MINI_TRAIN_SECONDS or {DEFAULT_SECONDS:g})")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VAL,...",
                    help="an extra configuration: the record configuration plus these train_gpt.py knobs "
                         "(PRESET=baseline starts from the baseline); repeatable")
    ap.add_argument("--eval-variant", action="append", default=[], metavar="NAME=KEY=VAL,...",
                    help="re-score every run's artifact with EVAL_ONLY=1, TTT_ENABLED=1 and these test-time "
                         "training knobs (one row <config>+<NAME> per run); repeatable")
    ap.add_argument("--eval-configs", default="", metavar="NAMES",
                    help="comma-separated configurations whose runs the --eval-variant(s) re-score (default: all)")
    ap.add_argument("--tokenizer", default="sp1024", choices=sorted(TOKENIZERS),
                    help="the track's tokenizer (default sp1024, the canonical one); sp8192 and caseops8192 compare "
                         "plain and CaseOps text at one vocabulary size (CaseOps bytes counted on the original text)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--no-append", action="store_true", help="do not append the results to bench/RESULTS.md")
    args = ap.parse_args(argv)

    if args.seconds is not None:
        seconds = parse_seconds(args.seconds, "--seconds")
    elif environ.get("MINI_TRAIN_SECONDS", "").strip():
        seconds = parse_seconds(environ["MINI_TRAIN_SECONDS"].strip(), "MINI_TRAIN_SECONDS")
    else:
        seconds = DEFAULT_SECONDS
    seeds = parse_seeds(args.seeds)

    variants: dict[str, dict[str, str]] = {}
    for spec in args.variant:
        name, overrides = parse_variant(spec)
        if name in CONFIGS or name in variants:
            raise UsageError(f"--variant {name}: the name is already taken (baseline, record and each variant "
                             "name must be unique)")
        base = dict(CONFIGS["baseline"] if overrides.get("PRESET") == "baseline" else CONFIGS["record"])
        variants[name] = {**base, **overrides}

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if not names and not variants:
        raise UsageError(f"--configs={args.configs!r} is not allowed: name at least one configuration")
    known = {**CONFIGS, **variants}
    for n in names:
        if n not in known:
            raise UsageError(f"--configs={args.configs!r} is not allowed: {n!r} is not one of "
                             f"{', '.join(known)} (define others with --variant NAME=KEY=VAL,...)")
    if len(set(names)) != len(names):
        raise UsageError(f"--configs={args.configs!r} is not allowed: a configuration is listed twice")
    ordered = names + [n for n in variants if n not in names]
    configs = {n: known[n] for n in ordered}
    evals: dict[str, dict[str, str]] = {}
    for spec in args.eval_variant:
        name, overrides = parse_variant(spec, "--eval-variant")
        if name in evals:
            raise UsageError(f"--eval-variant {name}: the name is already taken")
        evals[name] = {"TTT_ENABLED": "1", **overrides}

    # Every configuration through train_gpt's own parser now, before any work (bad value: one line).
    tg = train_gpt()
    for name, overrides in configs.items():
        env = track_env(overrides, seconds, seeds[0], Path("data"), Path("tok.model"), Path("logs"), name)
        for label, knobs in [(name, env)] + [(f"{name}+{e}", {**env, **k}) for e, k in evals.items()]:
            try:
                tg.Hyperparameters.from_env(knobs)
            except tg.ConfigError as exc:
                raise UsageError(f"configuration {label}: {exc}") from None

    command = "python bench/mini_track.py" + "".join(f" {a}" if " " not in a else f" '{a}'"
                                                     for a in (sys.argv[1:] if argv is None else argv))
    eval_configs = [n.strip() for n in args.eval_configs.split(",") if n.strip()] or list(configs)
    if evals and not set(eval_configs) <= set(configs):
        raise UsageError(f"--eval-configs={args.eval_configs!r} is not allowed: name configurations of this sweep "
                         f"({', '.join(configs)})")
    return Plan(configs, seeds, seconds, args.json, not args.no_append, command, evals, args.tokenizer, eval_configs)


def track_env(overrides: Mapping[str, str], seconds: float, seed: int, data: Path, tokenizer: Path, log_dir: Path,
              run_id: str) -> dict[str, str]:
    """The train_gpt.py knobs of one run: the mini size, the configuration, then the track's fixed budget."""
    env = {**COMMON_ENV, "GPTQ_RESERVE_SECONDS": gptq_reserve(seconds), **overrides}
    env.update({
        "MAX_WALLCLOCK_SECONDS": f"{seconds:g}", "TARGET_BYTES": str(ARTIFACT_CAP), "EVAL_STRIDE": str(EVAL_STRIDE),
        "TTT_ENABLED": "0", "SEED": str(seed), "DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer),
        "LOG_DIR": str(log_dir), "RUN_ID": run_id,
    })
    return env


def gptq_reserve(seconds: float) -> str:
    """Training seconds kept for the GPTQ Hessians (16 batches of 4,096 tokens: 1.6 s for the baseline,
    4.3 s for the looped record stack on a 2-core CPU): a fixed number rather than train_gpt's measured
    `auto`, so that a load spike during its probe cannot move where training stops (one probe under
    load reserved 55 s); every configuration stops training at the same second. Short dev runs keep a
    quarter of their budget at most."""
    return f"{min(GPTQ_RESERVE_MAX_S, seconds / 4):g}"


def child_environ(knobs: Mapping[str, str]) -> dict[str, str]:
    """os.environ without any train_gpt.py knob or launcher variable of the caller's shell, plus `knobs`."""
    tg = train_gpt()
    from pgolf.knobs import KNOWN_NAMES
    drop = set(tg.Hyperparameters.knob_names()) | KNOWN_NAMES | (set(tg.LAUNCHER_VARS) - {"OMP_NUM_THREADS"})
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(knobs)
    return env


# ---------------------------------------------------------------------------------------------
# Data and code
# ---------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    path: Path
    tokenizer: Path
    source: str  # "shared" or "sample"
    label: str  # one line for the output
    # What the data needs: VOCAB_SIZE, CASEOPS_ENABLED (plain shards unless it says so: the record's default is 1).
    knobs: dict[str, str] = field(default_factory=lambda: {"CASEOPS_ENABLED": "0"})


def sha256_of(path: Path) -> str:
    return train_gpt().sha256_file(path)


def dataset_key(corpus: Path, tokenizer: Path, val_docs: int, caseops: bool = False) -> str:
    """Names the cached dataset: the corpus and tokenizer contents, the split and the layout version."""
    text = f"{sha256_of(corpus)}:{sha256_of(tokenizer)}:{val_docs}:{DATA_FORMAT}" + (":caseops" if caseops else "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reorder_last_first(src: Path, dst: Path, last: int) -> int:
    """Write src's documents to dst with its last `last` documents first (tokenize_docs.py makes the
    first N the validation split). Blank lines are not documents. Returns the document count."""
    with open(src, "rb") as fh:
        lines = [line if line.endswith(b"\n") else line + b"\n" for line in fh if line.strip()]
    if len(lines) <= last:
        raise UsageError(f"{src}: {len(lines)} documents, need more than {last} (the last {last} are validation)")
    with open(dst, "wb") as out:
        out.writelines(lines[-last:])
        out.writelines(lines[:-last])
    return len(lines)


def prepare_shared(cache: Path, corpus: Path, tokenizer: Path, vocab: int = 1024, caseops: bool = False) -> Dataset:
    val_docs = VAL_DOCS
    key = dataset_key(corpus, tokenizer, val_docs, caseops)
    out = cache / f"{corpus.stem}_{tokenizer.stem}_{key}"
    marker = out / "mini_track.json"
    label = (f"shared FineWeb sample {corpus.name} (last {val_docs} documents = validation), "
             f"tokenizer {tokenizer.name}" + (" on CaseOps text, bytes of the original text" if caseops else ""))
    knobs = {"VOCAB_SIZE": str(vocab), "CASEOPS_ENABLED": "1" if caseops else "0"}  # the record's default is 1
    if marker.is_file() and (out / "manifest.json").is_file():
        log(f"data: reusing {out}")
        return Dataset(out, tokenizer, "shared", label, knobs)
    log(f"data: tokenizing {corpus} with {tokenizer.name} through data/tokenize_docs.py -> {out}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mini_track_") as tmp:
        reordered = Path(tmp) / "docs_val_first.jsonl"  # outside the repository, deleted afterwards
        n_docs = reorder_last_first(corpus, reordered, val_docs)
        cmd = [sys.executable, str(ROOT / "data" / "tokenize_docs.py"), "--docs", str(reordered), "--tokenizer",
               str(tokenizer), "--output", str(out), "--val-docs", str(val_docs), "--force"] + (["--caseops"] if caseops
                                                                                                 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"data/tokenize_docs.py failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    info = {"corpus": str(corpus), "corpus_sha256": sha256_of(corpus), "tokenizer": str(tokenizer),
            "tokenizer_sha256": sha256_of(tokenizer), "documents": n_docs, "val_docs": val_docs,
            "split": f"validation = the last {val_docs} documents of the corpus, train = the rest (file order)",
            "val_tokens": manifest["val"]["tokens"], "train_tokens": manifest["train"]["tokens"], "key": key}
    (out / "mini_track.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"data: {n_docs} documents, val {info['val_tokens']:,} tokens, train {info['train_tokens']:,} tokens "
        f"({time.perf_counter() - t0:.1f}s)")
    return Dataset(out, tokenizer, "shared", label, knobs)


def prepare_sample(cache: Path) -> Dataset:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dataset_dir, tokenizer = module.build_sample(cache / "sample", vocab_size=1024, log=lambda *a, **k: None)
    return Dataset(Path(dataset_dir), Path(tokenizer), "sample",
                   "EMBEDDED SAMPLE (data/make_sample.py), not the shared FineWeb data: not comparable with "
                   "shared-data results")


def prepare_data(cache: Path | None = None, corpus: Path | None = None, tokenizer: Path | None = None,
                 name: str = "sp1024") -> Dataset:
    """The track's dataset: the shared corpus tokenized (cached), or the embedded sample without ../shared
    (only for the default tokenizer: another one without ../shared is an error)."""
    default, vocab, caseops = TOKENIZERS[name]
    cache, corpus, tokenizer = cache or CACHE, corpus or CORPUS, tokenizer or default
    if corpus.is_file() and tokenizer.is_file():
        return prepare_shared(cache, corpus, tokenizer, vocab, caseops)
    if name != "sp1024":
        raise UsageError(f"--tokenizer={name} is not allowed here: {tokenizer if corpus.is_file() else corpus} not found "
                         "(it needs ../shared/data; only sp1024 falls back to the embedded sample)")
    missing = corpus if not corpus.is_file() else tokenizer
    log(f"data: {missing} not found (no ../shared/data beside this clone): falling back to the embedded sample "
        "(data/make_sample.py); results are labelled data=sample and are not comparable with shared-data results")
    return prepare_sample(cache)


def packed_script(cache: Path | None = None, source: Path | None = None) -> tuple[Path, str]:
    """train_gpt.py as the file a submission ships (`records/pack.py SOURCE -o FILE`: stripped, compressed,
    verified), cached by the sha256 of the source and of pack.py: run as is, its own size is the
    bytes_code the artifact cap counts. Returns (path, source sha256)."""
    code = (source or ROOT / "train_gpt.py").read_bytes()
    packer = ROOT / "records" / "pack.py"
    sha = hashlib.sha256(code).hexdigest()
    key = hashlib.sha256(code + packer.read_bytes()).hexdigest()
    path = (cache or CACHE) / "packed" / f"train_gpt_{key[:16]}.py"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        src = path.with_name(f"{path.stem}_source.py")  # pack.py names the payload after the source
        src.write_bytes(code)
        try:
            subprocess.run([sys.executable, str(packer), str(src), "-o", str(path)], check=True,
                           stdout=subprocess.DEVNULL)
        finally:
            src.unlink()
    return path, sha


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    config: str
    seed: int
    steps: int
    tokens: int
    pre_quant_bpb: float
    roundtrip_bpb: float
    sliding_bpb: float
    bytes_total: int
    bytes_model: int
    bytes_code: int
    train_s: float
    quant_s: float
    eval_s: float
    wall_s: float
    over_cap: bool = False
    over_time: bool = False
    json_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def run_from_metrics(config: str, seed: int, metrics: Mapping[str, Any], wall_s: float, json_path: str = "") -> Run:
    """One table row from a run's <RUN_ID>.json (the metrics train_gpt.py writes)."""
    evals = metrics.get("evaluations") or {}
    if "sliding" not in evals:
        raise RuntimeError(f"{config} seed {seed}: no sliding evaluation in {json_path or 'the metrics'} "
                           f"(evaluations: {', '.join(evals) or 'none'})")
    cfg = metrics.get("config") or {}
    batch = int(cfg.get("train_batch_tokens", cfg.get("TRAIN_BATCH_TOKENS", 0)) or 0)
    bytes_total = int(metrics["bytes_total"])
    return Run(
        config=config, seed=seed, steps=int(metrics["steps"]), tokens=int(metrics["steps"]) * batch,
        pre_quant_bpb=float(metrics["pre_quant"]["val_bpb"]), roundtrip_bpb=float(evals["roundtrip"]["val_bpb"]),
        sliding_bpb=float(evals["sliding"]["val_bpb"]), bytes_total=bytes_total,
        bytes_model=int(metrics["bytes_model"]), bytes_code=int(metrics["bytes_code"]),
        train_s=metrics["train_time_ms"] / 1000, quant_s=float((metrics.get("quant") or {}).get("quant_seconds", 0.0)),
        eval_s=metrics["eval_time_ms"] / 1000, wall_s=wall_s, over_cap=bytes_total > ARTIFACT_CAP,
        over_time=wall_s > RUN_LIMIT_S, json_path=json_path,
        extra={"calib_s": (metrics.get("calib_ms") or 0) / 1000, "stopped_by": metrics.get("stopped_by"),
               "sliding_eval_s": float(evals["sliding"].get("seconds", 0.0)),
               "roundtrip_eval_s": float(evals["roundtrip"].get("seconds", 0.0))})


def run_one(config: str, overrides: Mapping[str, str], seed: int, seconds: float, data: Dataset, script: Path,
            run_dir: Path) -> Run:
    run_id = f"{config}_s{seed}"
    knobs = {**track_env(overrides, seconds, seed, data.path, data.tokenizer, run_dir, run_id), **data.knobs}
    out_path = run_dir / f"{run_id}.out"
    tag = f"[{config} s{seed}]"
    t0 = time.perf_counter()
    last = ""
    with open(out_path, "w", encoding="utf-8", buffering=1) as out:  # line-buffered: tail -f works
        proc = subprocess.Popen([sys.executable, str(script)], cwd=str(ROOT), env=child_environ(knobs),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            line = line.rstrip("\n")
            if line.strip():
                last = line
            if line.startswith(PROGRESS_PREFIXES):
                log(f"{tag} {line[:160]}")
        rc = proc.wait()
    wall = time.perf_counter() - t0
    json_path = run_dir / f"{run_id}.json"
    if rc != 0 or not FINAL_RE.match(last) or not json_path.is_file():
        raise RuntimeError(f"{config} seed {seed} failed (exit {rc}): {last[:300]}; full output: {out_path}")
    metrics = json.loads(json_path.read_text())
    return run_from_metrics(config, seed, metrics, wall, str(json_path))


@dataclass
class EvalRun:
    """One --eval-variant re-scoring of a trained run's artifact (EVAL_ONLY=1, same packed script)."""
    config: str  # <configuration>+<eval variant>
    seed: int
    ttt_bpb: float
    sliding_bpb: float  # the same artifact's sliding score in the same re-scoring run
    ttt_s: float
    wall_s: float


def run_eval_variant(run: Run, name: str, knobs: Mapping[str, str], overrides: Mapping[str, str], plan: Plan,
                     data: Dataset, script: Path, run_dir: Path) -> EvalRun:
    run_id = f"{run.config}_s{run.seed}"
    env = track_env(overrides, plan.seconds, run.seed, data.path, data.tokenizer, run_dir, f"{run_id}_{name}")
    env.update({**data.knobs, **knobs, "EVAL_ONLY": "1", "ARTIFACT": str(run_dir / f"{run_id}.ptz")})
    child = child_environ(env)  # EVAL_ONLY is the repository's pgolf/recover.py: the packed script finds it here
    child["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), child.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], cwd=str(ROOT), env=child,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_path = run_dir / f"{run_id}_{name}.out"
    out_path.write_text(proc.stdout, encoding="utf-8")
    json_path = run_dir / f"{run_id}_{name}.json"
    if proc.returncode != 0 or not json_path.is_file():
        tail = (proc.stdout.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{run.config}+{name} seed {run.seed} failed (exit {proc.returncode}): {tail[:300]}; "
                           f"full output: {out_path}")
    evals = json.loads(json_path.read_text())["evaluations"]
    return EvalRun(f"{run.config}+{name}", run.seed, float(evals["ttt"]["val_bpb"]), float(evals["sliding"]["val_bpb"]),
                   float(evals["ttt"]["seconds"]), time.perf_counter() - t0)


def format_eval_runs(rows: Sequence[EvalRun]) -> str:
    """Per re-scoring, then per eval variant: the TTT score and its gain over the same artifact's sliding."""
    out = ["| config | seed | TTT BPB | sliding BPB | Δ TTT − sliding | TTT s | wall s |", "|---|---|---|---|---|---|---|"]
    out += [f"| {r.config} | {r.seed} | {r.ttt_bpb:.4f} | {r.sliding_bpb:.4f} | {r.ttt_bpb - r.sliding_bpb:+.4f} | "
            f"{r.ttt_s:.0f} | {r.wall_s:.0f} |" for r in rows]
    by: dict[str, list[EvalRun]] = {}
    for r in rows:
        by.setdefault(r.config, []).append(r)
    out += ["", "| config | runs | TTT BPB (mean) | Δ TTT − sliding (mean) | Δ seed std |", "|---|---|---|---|---|"]
    for name, rs in by.items():
        deltas = [r.ttt_bpb - r.sliding_bpb for r in rs]
        std = f"{statistics.stdev(deltas):.4f}" if len(deltas) > 1 else "–"
        out.append(f"| {name} | {len(rs)} | {statistics.mean(r.ttt_bpb for r in rs):.4f} | "
                   f"{statistics.mean(deltas):+.4f} | {std} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

TABLE_HEADER = ("| config | seed | steps | tokens | pre-quant BPB | round-trip BPB | sliding BPB | bytes | train s | "
                "quant s | eval s | wall s |")


def format_runs(runs: Sequence[Run]) -> str:
    rows = [TABLE_HEADER, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        size = f"{r.bytes_total:,}" + (" **OVER CAP**" if r.over_cap else "")
        wall = f"{r.wall_s:.0f}" + (" (> 6 min)" if r.over_time else "")
        rows.append(f"| {r.config} | {r.seed} | {r.steps:,} | {r.tokens:,} | {r.pre_quant_bpb:.4f} | "
                    f"{r.roundtrip_bpb:.4f} | {r.sliding_bpb:.4f} | {size} | {r.train_s:.0f} | {r.quant_s:.1f} | "
                    f"{r.eval_s:.0f} | {wall} |")
    return "\n".join(rows)


def means(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per configuration, in first-seen order: the mean of every number, the sliding BPB's seed std."""
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.config, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in by.items():
        m: dict[str, Any] = {"runs": len(rs), "seeds": [r.seed for r in rs]}
        for key in ("steps", "tokens", "pre_quant_bpb", "roundtrip_bpb", "sliding_bpb", "bytes_total", "train_s",
                    "quant_s", "eval_s", "wall_s"):
            m[key] = statistics.mean(getattr(r, key) for r in rs)
        m["sliding_bpb_std"] = statistics.stdev(r.sliding_bpb for r in rs) if len(rs) > 1 else None
        m["sliding_bpb_per_seed"] = {r.seed: r.sliding_bpb for r in rs}
        m["bytes_max"] = max(r.bytes_total for r in rs)
        m["wall_s_max"] = max(r.wall_s for r in rs)
        out[name] = m
    return out


def format_means(ms: Mapping[str, Mapping[str, Any]]) -> str:
    ref = ms.get("baseline", {}).get("sliding_bpb")
    rows = ["| config | runs | sliding BPB (mean) | seed std | Δ vs baseline | round-trip BPB | pre-quant BPB | "
            "steps | bytes (max) | wall s (max) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in ms.items():
        std = f"{m['sliding_bpb_std']:.4f}" if m["sliding_bpb_std"] is not None else "–"
        delta = f"{m['sliding_bpb'] - ref:+.4f}" if ref is not None and name != "baseline" else ""
        rows.append(f"| {name} | {m['runs']} | {m['sliding_bpb']:.4f} | {std} | {delta} | {m['roundtrip_bpb']:.4f} | "
                    f"{m['pre_quant_bpb']:.4f} | {m['steps']:.0f} | {m['bytes_max']:,} | {m['wall_s_max']:.0f} |")
    return "\n".join(rows)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch_version}, python {platform.python_version()}"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + (" (with uncommitted changes)" if dirty else "")


def config_lines(configs: Mapping[str, Mapping[str, str]]) -> list[str]:
    common = " ".join(f"{k}={v}" for k, v in COMMON_ENV.items())
    lines = [f"- every configuration: `{common}`"]
    for name, overrides in configs.items():
        lines.append(f"- `{name}`: `{' '.join(f'{k}={v}' for k, v in overrides.items())}`")
    return lines


def report(plan: Plan, runs: Sequence[Run], data: Dataset, meta: Mapping[str, Any],
           eval_runs: Sequence[EvalRun] = ()) -> str:
    """The markdown block printed and appended to bench/RESULTS.md."""
    ms = means(runs)
    budget = (f"{plan.seconds:g} s training wallclock (GPTQ Hessians included), artifact cap {ARTIFACT_CAP:,} bytes "
              f"with train_gpt.py counted packed ({meta['bytes_code']:,} bytes), score = sliding val_bpb at stride "
              f"{EVAL_STRIDE} over all validation documents, no test-time training (TTT_ENABLED=0)")
    parts = [
        f"## CPU mini-track (`{plan.command}`, {meta['date']})",
        "",
        f"Commit {meta['commit']}, train_gpt.py sha256 {meta['code_sha256'][:12]}; {meta['hardware']}.",
        f"Data: {data.label}. Budget: {budget}. Seeds: {', '.join(map(str, plan.seeds))}.",
        "",
        *config_lines(plan.configs),
        "",
        format_runs(runs),
        "",
        format_means(ms),
        "",
        "train s: the training loop (the GPTQ Hessians run in the reserve after it); quant s: GPTQ and packing; "
        "eval s: train_gpt's evaluation time (artifact read, round trip, sliding); wall s: the whole run, start-up "
        f"and the pre-quant evaluation included (budget {RUN_LIMIT_S:.0f} s). tokens = steps x TRAIN_BATCH_TOKENS.",
    ]
    if eval_runs:
        parts += ["", "Evaluation variants (each run's artifact re-scored by the same packed script with EVAL_ONLY=1):",
                  *[f"- `{n}`: {' '.join(f'{k}={v}' for k, v in kn.items())}" for n, kn in plan.evals.items()], "",
                  format_eval_runs(eval_runs)]
    flags = [f"{r.config} seed {r.seed}: bytes_total {r.bytes_total:,} is OVER the {ARTIFACT_CAP:,}-byte cap"
             for r in runs if r.over_cap]
    flags += [f"{r.config} seed {r.seed}: the run took {r.wall_s:.0f} s, over the {RUN_LIMIT_S / 60:g}-minute budget"
              for r in runs if r.over_time]
    if flags:
        parts += ["", *[f"**{f}**" for f in flags]]
    if data.source != "shared":
        parts += ["", "**Data: embedded sample, not the shared FineWeb data: do not compare with shared-data results.**"]
    return "\n".join(parts) + "\n"


def to_json(plan: Plan, runs: Sequence[Run], data: Dataset, meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "track": {"train_seconds": plan.seconds, "artifact_cap": ARTIFACT_CAP, "eval_stride": EVAL_STRIDE,
                  "ttt": False, "metric": "sliding val_bpb", "seeds": plan.seeds, "run_limit_s": RUN_LIMIT_S,
                  "data": {"source": data.source, "path": str(data.path), "tokenizer": str(data.tokenizer),
                           "label": data.label}},
        "meta": dict(meta),
        "common_env": dict(COMMON_ENV),
        "configs": {k: dict(v) for k, v in plan.configs.items()},
        "runs": [{k: v for k, v in vars(r).items()} for r in runs],
        "means": means(runs),
    }


def append_results(text: str, path: Path | None = None) -> None:
    path = path or RESULTS
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    sep = "" if not existing or existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(sep + text)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None, prepare: Callable[[], Dataset] | None = None) -> int:
    try:
        plan = build_plan(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        data = prepare() if prepare else prepare_data(name=plan.tokenizer)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    script, code_sha = packed_script()
    commit = git_commit()  # now: the script is packed now, and the tree may change while the runs go
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    run_dir = CACHE / "runs" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    total = len(plan.configs) * len(plan.seeds)
    log(f"{total} run(s): {', '.join(plan.configs)} x seeds {', '.join(map(str, plan.seeds))}, {plan.seconds:g} s "
        f"training each; data: {data.source}; logs: {run_dir}")
    runs: list[Run] = []
    eval_runs: list[EvalRun] = []
    i = 0
    try:
        # Seeds outermost: an interrupted sweep still has every configuration at the first seed.
        for seed in plan.seeds:
            for name, overrides in plan.configs.items():
                i += 1
                log(f"[{i}/{total}] {name} seed {seed}: training {plan.seconds:g} s, then GPTQ and evaluation")
                r = run_one(name, overrides, seed, plan.seconds, data, script, run_dir)
                runs.append(r)
                log(f"[{i}/{total}] {name} seed {seed}: sliding BPB {r.sliding_bpb:.4f} (round trip "
                    f"{r.roundtrip_bpb:.4f}), {r.steps} steps, {r.bytes_total:,} bytes; train {r.train_s:.0f} s, "
                    f"quant {r.quant_s:.1f} s, eval {r.eval_s:.0f} s, wall {r.wall_s:.0f} s")
                if r.over_cap:
                    log(f"WARNING: {name} seed {seed}: bytes_total {r.bytes_total:,} is OVER the {ARTIFACT_CAP:,} cap")
                for ename, eknobs in (plan.evals.items() if name in plan.eval_configs else ()):
                    log(f"[{i}/{total}] {name} seed {seed}: re-scoring with eval variant {ename}")
                    er = run_eval_variant(r, ename, eknobs, overrides, plan, data, script, run_dir)
                    eval_runs.append(er)
                    log(f"[{i}/{total}] {er.config} seed {seed}: TTT BPB {er.ttt_bpb:.4f} (sliding {er.sliding_bpb:.4f}), "
                        f"TTT {er.ttt_s:.0f} s, wall {er.wall_s:.0f} s")
    except (RuntimeError, KeyboardInterrupt) as exc:
        msg = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        if not runs:
            return 1 if not isinstance(exc, KeyboardInterrupt) else 130
        log(f"{len(runs)} finished run(s) below; nothing appended to {RESULTS.name}")
        plan.append = False
        failed = True
    else:
        failed = False
    meta = {"date": datetime.date.today().isoformat(), "commit": commit, "hardware": hardware(),
            "code_sha256": code_sha, "bytes_code": runs[0].bytes_code, "run_dir": str(run_dir)}
    text = report(plan, runs, data, meta, eval_runs)
    if plan.as_json:
        print(json.dumps({**to_json(plan, runs, data, meta), "eval_runs": [dataclasses.asdict(e) for e in eval_runs]},
                         indent=2, default=str))
    else:
        print(text, end="")
    if plan.append:
        append_results(text)
        log(f"appended to {RESULTS}")
    return 1 if failed or any(r.over_cap for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
