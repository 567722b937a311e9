"""Build a record folder from a seed sweep's logs, in one command.

Usage:
    python records/make_submission.py --name MyRun --logs logs/myrun_s1337.json logs/myrun_s42.json \\
        logs/myrun_s2025.json --author "Ada L" --github-id adal --blurb "what changed" \\
        [--pack [--codec lzma|brotli]] [--baseline records/track_10min_16mb/<current record>]

Creates records/track_10min_16mb/<YYYY-MM-DD>_<name>/ with
- train_gpt.py: the exact script the logs ran (its sha256 must equal the logs' code_sha256); with
  --pack, the self-extracting LZMA (or Brotli) version of that same source, its compressed bytes held
  in a Latin-1 string literal (`#coding:l1`, the dense wrapper `records/pack.py -o` writes; payload
  sha256 = the logs' code_sha256), so bytes_code is the packed size and bytes_total = bytes_model +
  packed size; a script that is already packed (the sweep ran the packed file) is shipped as it is;
- train_seed<S>.log: each run's log (logs/<RUN_ID>.txt), byte for byte;
- submission.json: author, github_id, name, blurb, date, track, val_loss / val_bpb (mean, sample std),
  seeds, per-seed results, bytes_total / bytes_code, hardware, pytorch version, compliance fields and,
  with --baseline, the significance tests (see records/stats.py);
- requirements.txt and a README.md skeleton: per-seed table, the run command, compliance block. The run
  command works from the folder where the pull request puts it (records/<track>/<folder>/ of a checkout):
  it reads the data the logs name from the checkout's data/ (DATA_PATH=../../../data/datasets/<shards>,
  TOKENIZER_PATH=../../../data/tokenizers/<tokenizer>: the challenge data as its downloader lays it out, or
  the embedded sample when the runs used SAMPLE_DATA, then with SAMPLE_DATA=0 where the preset would turn it
  on) and writes its logs to the checkout's logs/ (LOG_DIR=../../../logs), nothing into the folder.

It refuses, with one `error:` line per problem and nothing written, when a log is incomplete or does
not belong to its JSON, the seeds' configs (config_hash: everything but the knobs in CONFIG_HASH_IGNORED) differ,
the seeds scored different data ("mixed data": dataset.val_sha256 or dataset.tokenizer_sha256 differ), a
seed repeats, any seed is over 16,000,000 bytes, or the script's hash does not match the logs. On the
record track (the default) it also refuses a run that is not reportable (its JSON's `reportable_reason`
is quoted: not the challenge's validation split, or MAX_VAL_TOKENS), a run JSON without the dataset
identity (an older train_gpt.py: re-run it), and training (or GPTQ's training-data access)
or evaluation over 600 s. --non-record (= --track non_record_16mb) builds a non-record submission
under records/track_non_record_16mb/ instead: those become warnings.

One or two seeds are accepted with a warning (a record needs at least 3); what needs more seeds (the
sample std, the t-tests) is reported as not computable. The folder is written to a temporary name,
validated with records/check.py (which re-derives submission.json and the README from the logs with the
functions here), then renamed into place; the temporary folder never stays behind.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import check  # noqa: E402
import pack  # noqa: E402
import runlog  # noqa: E402
import stats  # noqa: E402
from runlog import RecordError  # noqa: E402

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
TRACKS = {"10min_16mb": "record track: 8xH100 SXM, 600 s training, 600 s evaluation",
          "non_record_16mb": "non-record track: 16,000,000 bytes, no time limit"}
SWEEP_SEEDS = "1337 42 2025"
DATA_KEYS = ("val_sha256", "tokenizer_sha256")  # which data: must be one across the seeds ("mixed data")
PATH_KEYS = ("tokenizer", "manifest")  # where the data was on the machine that ran it: not compared, not shipped


@dataclass
class Shipped:
    data: bytes  # the train_gpt.py that goes into the folder
    how: str  # raw / packed-from-raw / packed
    source_sha256: str  # the sha256 the logs recorded
    codec: str | None
    wrapper: str | None = None  # how a packed file holds its compressed bytes: latin1 or base85


# ---------------------------------------------------------------------------------------------
# Loading and validating the runs
# ---------------------------------------------------------------------------------------------


def load_runs(paths: list[Path], errors: list[str]) -> list[runlog.Run]:
    """The runs, each with its JSON and its log; problems are appended to `errors`."""
    runs = []
    for path in paths:
        try:
            run = runlog.load_run(path)
        except RecordError as exc:
            errors.append(str(exc))
            continue
        where = str(run.json_path or path)
        if run.metrics is None:
            errors.append("; ".join(run.warnings) if run.warnings else
                          f"{path}: no metrics JSON next to it ({path.with_suffix('.json').name}); give the run's "
                          f".json (train_gpt.py writes it at the end of a finished run)")
            continue
        if run.log is None:
            errors.append(f"{where}: no log next to it ({Path(where).with_suffix('.txt').name}); the folder ships the "
                          f"log, so it must be there")
            continue
        m, lg = run.metrics, run.log
        if m.get("eval_only"):
            errors.append(f"{where}: an EVAL_ONLY re-scoring, not a training run")
            continue
        missing = [k for k in runlog.REQUIRED_METRICS if k not in m]
        if missing:
            errors.append(f"{where}: incomplete run JSON, missing {', '.join(missing)}")
            continue
        if not lg.complete:  # load_run refuses a JSON whose log is incomplete; kept for a JSON-less log
            errors.append(f"{lg.path}: incomplete log: it does not end with the `final ...` line (unfinished run or "
                          f"truncated file)")
            continue
        runs.append(run)
    return runs


def validate_runs(runs: list[runlog.Run], errors: list[str]) -> None:
    if not runs:
        return
    seeds = [r.seed for r in runs]
    for s in sorted({s for s in seeds if seeds.count(s) > 1}):
        errors.append(f"--logs: seed {s} appears {seeds.count(s)} times "
                      f"({', '.join(r.label for r in runs if r.seed == s)}); one run per seed")
    first = runs[0]
    ignored = runlog.config_hash_ignored()
    for run in runs:
        stored = run.metrics.get("config_hash")
        computed = runlog.config_hash(run.metrics["config"])
        if stored and computed and stored != computed:
            errors.append(f"{run.label}: config_hash {stored[:12]} does not match its config ({computed[:12]}): "
                          f"edited JSON?")
    for run in runs[1:]:
        diffs = runlog.config_differences(first.metrics["config"], run.metrics["config"], ignored)
        if diffs:
            errors.append(f"{run.label}: config differs from {first.label}: {'; '.join(diffs[:6])}"
                          + (f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else "")
                          + f"; all seeds must come from one configuration (only {', '.join(sorted(ignored))} "
                            f"may differ)")
        data_a, data_b = first.metrics.get("dataset") or {}, run.metrics.get("dataset") or {}
        mixed = [f"{k} {str(data_b[k])[:16]} vs {str(data_a[k])[:16]} in {first.label}" for k in DATA_KEYS
                 if data_a.get(k) and data_b.get(k) and data_a[k] != data_b[k]]
        data_diffs = [f"{k} {data_a.get(k)!r} vs {data_b.get(k)!r}" for k in sorted(set(data_a) | set(data_b))
                      if k not in PATH_KEYS and data_a.get(k) != data_b.get(k)]
        if mixed:
            errors.append(f"{run.label}: mixed data: {'; '.join(mixed)}; every seed of a submission must score the "
                          f"same validation data with the same tokenizer")
        elif data_diffs:
            errors.append(f"{run.label}: dataset differs from {first.label}: {'; '.join(data_diffs[:4])}")
        if run.metrics["world_size"] != first.metrics["world_size"]:
            errors.append(f"{run.label}: world_size {run.metrics['world_size']} vs {first.metrics['world_size']} in "
                          f"{first.label}")


def check_data(runs: list[runlog.Run], record: bool, errors: list[str], warnings: list[str]) -> None:
    """Which data each run scored (its JSON's dataset identity and `reportable`): a record needs the challenge's
    validation split on every seed, recorded by the current train_gpt.py; a non-record submission is warned."""
    where = errors if record else warnings
    hint = "; a record must score the challenge's validation split (--non-record builds a non-record submission)"
    for run in runs:
        ident, missing = runlog.data_identity_of_metrics(run.metrics)
        if ident is None:
            where.append(f"{run.label}: no dataset identity ({missing}): {runlog.OLDER_RUN}")
        elif ident.inconsistent:
            errors.append(f"{run.label}: {ident.inconsistent} (edited JSON?)")
        elif not ident.reportable:
            where.append(f"{run.label}: not reportable: {ident.reason}" + (hint if record else ""))

def resolve_script(path: Path, runs: list[runlog.Run], do_pack: bool, codec: str, errors: list[str]) -> Shipped | None:
    """The exact script to ship, verified against the logs' code_sha256."""
    shas = sorted({r.metrics["code_sha256"] for r in runs})
    if len(shas) > 1:
        by = "; ".join(f"{r.label}: {r.metrics['code_sha256'][:12]}" for r in runs)
        errors.append(f"--logs: the runs used different scripts ({by}); rerun every seed with one train_gpt.py")
        return None
    if not path.is_file():
        errors.append(f"--script {path}: no such file")
        return None
    data = path.read_bytes()
    want = shas[0]
    got = pack.unpack(data)
    payload, got_codec = got if got else (None, None)
    sha = hashlib.sha256(data).hexdigest()
    payload_sha = hashlib.sha256(payload).hexdigest() if payload is not None else None
    ran_bytes = {r.metrics["bytes_code"] for r in runs}
    if sha == want:
        if len(data) not in ran_bytes:
            errors.append(f"--script {path}: {len(data)} bytes but the logs ran {sorted(ran_bytes)} bytes")
            return None
        if payload is not None:  # the sweep ran the packed file: ship it as it is
            return Shipped(data, "packed", want, got_codec, pack.unpack_wrapper(data)[3])
        if do_pack:
            try:
                packed = pack.pack(data, codec, do_minify=False, name=str(path))
            except pack.PackError as exc:
                errors.append(str(exc))
                return None
            return Shipped(packed, "packed-from-raw", want, codec, pack.DEFAULT_WRAPPER)
        return Shipped(data, "raw", want, None)
    if payload_sha == want:  # a packed file whose payload is the script the logs ran
        return Shipped(data, "packed-from-raw", want, got_codec, pack.unpack_wrapper(data)[3])
    errors.append(f"--script {path}: sha256 {sha[:16]}" + (f" (payload {payload_sha[:16]})" if payload_sha else "")
                  + f" does not match the code_sha256 {want[:16]} in the logs: ship the exact script the runs used "
                    f"(stale logs, train_gpt.py edited since the sweep, or the runs executed a packed file: pass "
                    f"that file with --script)")
    return None


def check_limits(runs: list[runlog.Run], code_size: int, track: str, errors: list[str]) -> None:
    lim = runlog.limits()
    for run in runs:
        m = run.metrics
        total = m["bytes_model"] + code_size
        if total > lim["bytes"]:
            errors.append(f"{run.label}: bytes_total {total:,} (model {m['bytes_model']:,} + code {code_size:,}) is over "
                          f"the {lim['bytes']:,}-byte limit by {total - lim['bytes']:,}")
        if track != "10min_16mb":
            continue
        if m["train_time_ms"] > lim["train_s"] * 1000:
            errors.append(f"{run.label}: train_time_ms {m['train_time_ms']:,} is over the {lim['train_s']:.0f} s limit")
        access = run.train_data_access_end_ms
        if access is not None and access > lim["train_s"] * 1000:
            errors.append(f"{run.label}: training data was read until {access:,} ms (GPTQ calibration), over the "
                          f"{lim['train_s']:.0f} s limit; raise GPTQ_RESERVE_SECONDS")
        if m["eval_time_ms"] > lim["eval_s"] * 1000:
            errors.append(f"{run.label}: eval_time_ms {m['eval_time_ms']:,} is over the {lim['eval_s']:.0f} s limit")


# ---------------------------------------------------------------------------------------------
# Contents
# ---------------------------------------------------------------------------------------------


def _round(x: float | None, digits: int = 8) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


def _std(x: float | None, digits: int) -> str:
    """A sample std, or why there is none (one seed: not computable)."""
    return "n/a (1 seed)" if x is None else f"{x:.{digits}f}"


def hardware(runs: list[runlog.Run]) -> str:
    v, ws = runs[0].metrics.get("versions") or {}, runs[0].metrics["world_size"]
    if v.get("gpu"):
        return f"{ws}x{v['gpu']}"
    threads = v.get("cpu_threads")
    return (f"CPU ({ws} process{'es' if ws != 1 else ''}"
            + (f", {threads} thread{'s' if str(threads) != '1' else ''}" if threads else "") + ")")


def seed_row(run: runlog.Run, code_size: int) -> dict[str, Any]:
    m = run.metrics
    row: dict[str, Any] = {"run_id": m["run_id"], "val_loss": m["val_loss"], "val_bpb": m["val_bpb"],
                           "eval": m["eval"], "val_tokens": m["val_tokens"], "val_bytes": m["val_bytes"],
                           "steps": m["steps"], "step_avg_ms": _round(m["train_time_ms"] / max(m["steps"], 1), 2),
                           "train_time_ms": m["train_time_ms"], "eval_time_ms": m["eval_time_ms"]}
    if run.train_data_access_end_ms is not None:
        row["train_data_access_end_ms"] = run.train_data_access_end_ms
    for label in runlog.EVAL_LABELS:
        ev = run.evaluation(label)
        if ev:
            row[f"{label}_val_loss"], row[f"{label}_val_bpb"] = ev["val_loss"], ev["val_bpb"]
    row.update(bytes_model=m["bytes_model"], bytes_code=code_size, bytes_total=m["bytes_model"] + code_size)
    if m["bytes_code"] != code_size:
        row["bytes_code_as_run"] = m["bytes_code"]
    return row


def script_module(source: bytes, name: str) -> Any:
    """The script the runs executed, imported as a module (train_gpt.py has no import side effects), so the run
    command is computed against its own defaults; None when it cannot be imported."""
    modname = f"_shipped_train_gpt_{hashlib.sha256(source).hexdigest()[:16]}"
    if modname in sys.modules:
        return sys.modules[modname]
    module = types.ModuleType(modname)
    module.__file__ = name
    sys.modules[modname] = module
    try:
        exec(compile(source, name, "exec", dont_inherit=True), module.__dict__)
    except Exception:  # noqa: BLE001 - fall back to the repository's train_gpt.py
        del sys.modules[modname]
        return None
    return module if hasattr(module, "Hyperparameters") else None


# Where the run reads its data and writes its outputs: set by the README's run command for this folder's place in a
# checkout (records/<track>/<folder>/), not copied from the logs, and never compared with the logged config.
LOCATION_KNOBS = frozenset({"DATA_DIR", "DATA_PATH", "TOKENIZER_PATH", "SAMPLE_DATA", "LOG_DIR"})
CHECKOUT = "../../.."  # from records/<track>/<folder>/ to the root of the checkout it sits in
COMMAND_MARK = "SEED=$s RUN_ID="  # starts the README's run command line (check.py compares its knobs with the logs)


def _env_text(v: Any) -> str:
    return ("1" if v else "0") if isinstance(v, bool) else str(v)


def preset_defaults(config: dict[str, Any], tg: Any) -> dict[str, Any]:
    """Every knob's default under the config's PRESET in `tg` (the script that ran), JSON-typed; {} when unknown."""
    if tg is None:
        return {}
    try:
        preset = str(config.get("PRESET", "record"))
        return json.loads(json.dumps(tg.Hyperparameters.from_env({"PRESET": preset}).knob_values(), default=str))
    except Exception:  # noqa: BLE001 - an unknown preset in an older config: list every knob
        return {}


def non_default_env(config: dict[str, Any], tg: Any) -> tuple[list[str], bool]:
    """`KNOB=value` for every knob that differs from its preset's default in `tg` (the script that ran; SEED,
    RUN_ID and the LOCATION_KNOBS left out), and whether those assignments were verified to reproduce the config."""
    ignored = runlog.config_hash_ignored() | LOCATION_KNOBS
    preset = str(config.get("PRESET", "record"))
    defaults = preset_defaults(config, tg)
    env = [] if preset == "record" else [f"PRESET={preset}"]
    for key in sorted(config):
        if key in ignored or key == "PRESET" or (key in defaults and defaults[key] == config[key]):
            continue
        env.append(f"{key}={shlex.quote(_env_text(config[key]))}")
    verified = False
    if tg is not None and defaults:
        try:
            parsed = dict(kv.split("=", 1) for kv in env)
            parsed = {k: shlex.split(v)[0] if v else "" for k, v in parsed.items()}
            again = json.loads(json.dumps(tg.Hyperparameters.from_env(parsed).knob_values(), default=str))
            verified = not runlog.config_differences({k: again.get(k, "<missing>") for k in config}, config, ignored)
        except Exception:  # noqa: BLE001 - reported as "not verified" in the README
            verified = False
    return env, verified


@dataclass
class DataPlace:
    """The data the runs read, by name: where the README's command finds it in a checkout's data/."""
    dataset: str  # the shard folder's name (data/datasets/<dataset>/)
    tokenizer: str  # the tokenizer file's name (data/tokenizers/<tokenizer>)
    sample: bool  # the embedded sample (SAMPLE_DATA=1), not the challenge data

    @property
    def env(self) -> list[str]:
        return [f"DATA_PATH={shlex.quote(f'{CHECKOUT}/data/datasets/{self.dataset}')}",
                f"TOKENIZER_PATH={shlex.quote(f'{CHECKOUT}/data/tokenizers/{self.tokenizer}')}"]


def data_place(run: runlog.Run) -> DataPlace:
    """Which data the run read, from its log (the `dataset:` line and the config's resolved tokenizer path), else
    from its config (DATA_PATH / TOKENIZER_PATH, or the names train_gpt.py derives from VOCAB_SIZE)."""
    config = run.metrics["config"] if run.metrics else run.config
    sample = str(config.get("SAMPLE_DATA")).lower() in ("true", "1")
    vocab = config.get("VOCAB_SIZE")
    caseops = "_lossless_caps_caseops_v1_reserved" if str(config.get("CASEOPS_ENABLED")).lower() in ("true", "1") else ""
    lg = run.log
    dataset = ((lg.dataset_dir if lg is not None else None) or str(config.get("DATA_PATH") or "")
               or (f"sample_sp{vocab}" if sample else f"fineweb10B_sp{vocab}{caseops}"))
    tokenizer = ((lg.config.get("dataset_tokenizer") if lg is not None else None)
                 or ((run.metrics or {}).get("dataset") or {}).get("tokenizer") or str(config.get("TOKENIZER_PATH") or "")
                 or (f"sample_{vocab}_bpe.model" if sample else f"fineweb_{vocab}_bpe{caseops}.model"))
    # The sample builder's folder read through DATA_PATH (SAMPLE_DATA=0) is the sample too, not challenge data.
    sample = sample or re.fullmatch(r"sample_sp\d+", Path(dataset).name) is not None
    return DataPlace(Path(dataset).name, Path(tokenizer).name, sample)


@dataclass
class RunCommand:
    """The README's run command: the data and log places for this folder, then the logged knobs."""
    place: DataPlace
    env: list[str]  # location knobs first (DATA_PATH, TOKENIZER_PATH, SAMPLE_DATA=0 if needed, LOG_DIR), then knobs
    verified: bool  # the knobs were verified to reproduce the logged configuration


def run_command(runs: list[runlog.Run], tg: Any) -> RunCommand:
    config = runs[0].metrics["config"]
    place = data_place(runs[0])
    knobs, verified = non_default_env(config, tg)
    # The data is given by path, so SAMPLE_DATA (which builds the sample with data/make_sample.py next to
    # train_gpt.py, absent here) stays off; a preset whose default turns it on gets SAMPLE_DATA=0.
    sample_off = ["SAMPLE_DATA=0"] if preset_defaults(config, tg).get("SAMPLE_DATA", True) else []
    return RunCommand(place, place.env + sample_off + [f"LOG_DIR={CHECKOUT}/logs"] + knobs, verified)


def requirements_text(runs: list[runlog.Run]) -> str:
    lines = ["# What train_gpt.py needs (the repository's requirements.txt; huggingface_hub is only for the "
             "data download).", f"# The runs used torch {runs[0].metrics['versions'].get('torch', '?')}, python "
             f"{runs[0].metrics['versions'].get('python', '?')}."]
    repo = runlog.ROOT / "requirements.txt"
    if repo.is_file():
        lines += [ln for ln in repo.read_text(encoding="utf-8").splitlines()
                  if ln.strip() and not ln.lstrip().startswith("#") and not ln.startswith("huggingface_hub")]
    else:
        lines += ["torch", "numpy", "sentencepiece", "brotli"]
    if any(r.metrics.get("config", {}).get("COMPRESSOR") == "pergroup" for r in runs):
        lines.append("# lrzip, the program (COMPRESSOR=pergroup's coder: reading the artifact needs it): "
                     "apt-get install -y lrzip")
    if any(r.metrics.get("attention_backend") == "fa3" for r in runs):
        lines.append("# flash_attn_interface (FlashAttention 3): a flash_attn_3 wheel for this torch/CUDA, installed "
                     "with pip install --no-deps")
    return "\n".join(lines) + "\n"


def _f(x: Any, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def run_command_text(sub: dict[str, Any], folder_rel: str, cmd: RunCommand) -> list[str]:
    """The README's run command section (without its heading): where the data and the logs are, the command."""
    place = cmd.place
    data = sub.get("dataset") or {}
    ids = (f"the logs' val sha256 `{str(data.get('val_sha256', '?'))[:16]}`, tokenizer sha256 "
           f"`{str(data.get('tokenizer_sha256', '?'))[:16]}`")
    where = f"the shards in `data/datasets/{place.dataset}/` and the tokenizer `data/tokenizers/{place.tokenizer}`"
    if place.sample:
        vocab = place.dataset.rpartition("_sp")[2]
        data_note = (f"on the data the logs name, the embedded sample dataset (`SAMPLE_DATA=1` in the runs; {ids}): "
                     f"{where} of that checkout. Build it first, from the checkout's root, with "
                     f"`python data/make_sample.py --vocab-size {vocab}` (the training stack's sample builder); the "
                     f"command gives its paths, so it needs no `data/make_sample.py` next to this `train_gpt.py`.")
    else:
        data_note = (f"on the data the logs name ({ids}): {where} of that checkout, the challenge data as "
                     f"`data/cached_challenge_fineweb.py` lays it out.")
    ws = sub["world_size"]
    launcher = "python train_gpt.py" if ws == 1 else f"torchrun --standalone --nproc_per_node={ws} train_gpt.py"
    seeds = " ".join(str(s) for s in sub["seeds"])
    return [
        f"From this folder, where it sits in a checkout of the challenge repository (`{folder_rel}/`), {data_note} "
        f"The logs and artifacts go to the checkout's `logs/` (`LOG_DIR={CHECKOUT}/logs`): running it writes nothing "
        f"into this folder.",
        "",
        "```bash",
        f"for s in {seeds}; do",
        f"  {COMMAND_MARK}{sub['name']}_s$s {' '.join(cmd.env)} {launcher}",
        "done",
        "```",
        "",
        ("The knobs after `LOG_DIR` are those that differ from the preset's defaults; they reproduce the logged "
         "configuration." if cmd.verified else "The knobs after `LOG_DIR` are those that differ from the preset's "
         "defaults (not verified against the logged configuration: compare with the `config:` block of a log)."),
    ]


def readme_text(sub: dict[str, Any], runs: list[runlog.Run], shipped: Shipped, folder_rel: str,
                cmd: RunCommand, significance_lines: list[str]) -> str:
    n = len(runs)
    rows = sub["seed_results"]
    labels = [lab for lab in ("sliding", "ttt") if any(f"{lab}_val_bpb" in r for r in rows.values())]
    head = ["seed", "steps", "ms/step", "pre-quant BPB", "round-trip BPB"] + \
           [{"sliding": "sliding BPB", "ttt": "TTT BPB"}[lab] for lab in labels] + \
           ["final val_loss", "final BPB", "artifact bytes"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, r in rows.items():
        cells = [seed, str(r["steps"]), _f(r["step_avg_ms"], 2), _f(r.get("pre_quant_val_bpb")),
                 _f(r.get("roundtrip_val_bpb"))] + [_f(r.get(f"{lab}_val_bpb")) for lab in labels] + \
                [_f(r["val_loss"]), _f(r["val_bpb"]), f"{r['bytes_total']:,}"]
        table.append("| " + " | ".join(cells) + " |")
    def mean_of(key: str, digits: int = 4) -> str:
        vals = [r[key] for r in rows.values() if r.get(key) is not None]
        return _f(sum(vals) / len(vals), digits) if len(vals) == len(rows) else "–"

    table.append("| " + " | ".join(["**mean**", mean_of("steps", 0), mean_of("step_avg_ms", 2),
                                    mean_of("pre_quant_val_bpb"), mean_of("roundtrip_val_bpb")]
                                   + [mean_of(f"{lab}_val_bpb") for lab in labels]
                                   + [_f(sub["val_loss"]), f"**{_f(sub['val_bpb'])}**",
                                      f"{sub['bytes_total']:,} (max)"]) + " |")
    if shipped.how == "packed-from-raw":
        code_note = (f"`train_gpt.py` here is the self-extracting ({shipped.codec} + {shipped.wrapper}) form of the "
                     f"script the logs ran: its payload's sha256 is the logs' `code_sha256` "
                     f"({shipped.source_sha256[:16]}…), so the program is identical. The logs counted the readable file "
                     f"(`bytes_code:{runs[0].metrics['bytes_code']}`); this submission counts the file it ships: "
                     f"`bytes_code` = {sub['bytes_code']:,} and each seed's `bytes_total` = its `bytes_model` + "
                     f"{sub['bytes_code']:,}. Unpack it with `python records/pack.py --unpack train_gpt.py`.")
    elif shipped.how == "packed":
        code_note = (f"`train_gpt.py` is the self-extracting ({shipped.codec} + {shipped.wrapper}) script the runs "
                     f"executed (`bytes_code` = {sub['bytes_code']:,}, as in the logs); `python records/pack.py "
                     f"--unpack train_gpt.py` shows the source.")
    else:
        code_note = f"`train_gpt.py` is the readable script the runs executed (`bytes_code` = {sub['bytes_code']:,})."
    c = sub["compliance"]
    lim = runlog.limits()

    compliance = [
        f"- [{'x' if c['train_under_600s'] else ' '}] training ≤ {lim['train_s']:.0f} s on every seed "
        f"(max {c['max_train_time_ms'] / 1000:.1f} s; training data last read at "
        f"{(c.get('max_train_data_access_end_ms') or 0) / 1000:.1f} s, GPTQ calibration included)",
        f"- [{'x' if c['eval_under_600s'] else ' '}] evaluation ≤ {lim['eval_s']:.0f} s on every seed "
        f"(max {c['max_eval_time_ms'] / 1000:.1f} s: artifact read, every evaluation, TTT)",
        f"- [{'x' if c['artifact_under_16mb'] else ' '}] code + model ≤ {lim['bytes']:,} bytes on every seed "
        f"(max {sub['bytes_total']:,})",
        f"- [{'x' if c['same_config'] else ' '}] all seeds from one configuration (config_hash "
        f"`{sub.get('config_hash', '?')[:16]}`; only {', '.join(sorted(runlog.config_hash_ignored()))} may differ) "
        f"and one dataset "
        f"(val sha256 `{str(sub.get('dataset', {}).get('val_sha256', '?'))[:16]}`, tokenizer sha256 "
        f"`{str(sub.get('dataset', {}).get('tokenizer_sha256', '?'))[:16]}`)",
        f"- [{'x' if c['three_seeds'] else ' '}] at least 3 seeds ({n})",
        f"- [{'x' if c['reportable'] else ' '}] scored on the challenge's validation split, every target once — "
        f"{c['reportable_reason']}" + ("" if c["reportable"] else " (a non-record submission)"),
        f"- validation data in training, warmup or calibration: {'no' if c['no_validation_data_in_training'] else '**?**'}"
        f"; test-time training: {'score-first (each chunk scored before it is trained on)' if c['ttt'] else 'none'}",
        f"- the logs' `compliance:` lines state the same per seed; `python records/check.py {folder_rel}` "
        f"re-checks this folder.",
    ]
    parts = [
        f"# {sub['name']}",
        "",
        f"**val_bpb {sub['val_bpb']:.4f} ± {_std(sub['val_bpb_std'], 4)}** (mean ± sample std over {n} "
        f"seed{'s' if n != 1 else ''}; "
        f"val_loss {sub['val_loss']:.5f} nats) · {sub['bytes_total']:,} bytes · {sub['hardware']} · "
        f"PyTorch {sub['pytorch_version']}",
        "",
        sub["blurb"],
        "",
        "## What changed",
        "",
        f"{check.PLACEHOLDER}: what this submission changes against its baseline and why, one paragraph per change, "
        "with the pull requests the ideas came from. Remove this line when done.",
        "",
        "## Results",
        "",
        *table,
        "",
        f"val_bpb std {_std(sub['val_bpb_std'], 5)}, val_loss std {_std(sub['val_loss_std'], 5)} (sample std, "
        f"n − 1). "
        f"Score: `eval:{runs[0].metrics['eval']}`. BPB = val_loss / ln 2 × tokens / bytes with each run's own counts.",
        "",
    ]
    if significance_lines:
        parts += ["## Significance", "", "```", *significance_lines, "```", ""]
    parts += [
        "## Code size",
        "",
        code_note,
        "",
        "## Run command",
        "",
        *run_command_text(sub, folder_rel, cmd),
        "",
        "## Compliance",
        "",
        *compliance,
        "",
        "## Files",
        "",
        "`train_gpt.py` (the script), `train_seed<S>.log` (one log per seed, as written by the script), "
        "`submission.json`, `requirements.txt`. Built with `records/make_submission.py`.",
        "",
    ]
    return "\n".join(parts)


def build_submission(runs: list[runlog.Run], shipped: Shipped, args: argparse.Namespace,
                     comparison: stats.Comparison | None, baseline_desc: str | None) -> dict[str, Any]:
    code_size = len(shipped.data)
    ordered = sorted(runs, key=lambda r: r.seed)
    rows = {str(r.seed): seed_row(r, code_size) for r in ordered}
    losses = [r.metrics["val_loss"] for r in ordered]
    bpbs = [r.metrics["val_bpb"] for r in ordered]
    m_loss, s_loss = stats.mean_std(losses)
    m_bpb, s_bpb = stats.mean_std(bpbs)
    lim = runlog.limits()
    first = ordered[0].metrics
    versions = first.get("versions") or {}
    torch_versions = sorted({str((r.metrics.get("versions") or {}).get("torch")) for r in ordered})
    access = [r.train_data_access_end_ms for r in ordered if r.train_data_access_end_ms is not None]
    max_train = max(r.metrics["train_time_ms"] for r in ordered)
    idents = [runlog.data_identity_of_metrics(r.metrics) for r in ordered]  # (identity or None, what is missing)
    sub: dict[str, Any] = {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": args.date, "track": args.track,
        "val_loss": _round(m_loss), "val_loss_std": _round(s_loss), "val_bpb": _round(m_bpb), "val_bpb_std": _round(s_bpb),
        "seeds": [r.seed for r in ordered], "seed_results": rows,
        "bytes_total": max(row["bytes_total"] for row in rows.values()), "bytes_code": code_size,
        "bytes_model_max": max(r.metrics["bytes_model"] for r in ordered),
        "eval": first["eval"], "step_avg_ms": _round(sum(row["step_avg_ms"] for row in rows.values()) / len(rows), 2),
        "hardware": hardware(ordered), "world_size": first["world_size"],
        "pytorch_version": ", ".join(torch_versions), "python_version": versions.get("python"),
        "cuda_version": versions.get("cuda"), "attention_backend": first.get("attention_backend"),
        "config_hash": first.get("config_hash") or runlog.config_hash(first["config"]),
        "code_sha256": hashlib.sha256(shipped.data).hexdigest(), "code_packed": shipped.how != "raw",
        "code_source_sha256": shipped.source_sha256,
        "dataset": {k: v for k, v in (first.get("dataset") or {}).items() if k not in PATH_KEYS},
        "compliance": {
            "train_under_600s": max_train <= lim["train_s"] * 1000 and all(a <= lim["train_s"] * 1000 for a in access),
            "eval_under_600s": all(r.metrics["eval_time_ms"] <= lim["eval_s"] * 1000 for r in ordered),
            "artifact_under_16mb": all(row["bytes_total"] <= lim["bytes"] for row in rows.values()),
            "same_config": True, "three_seeds": len(ordered) >= 3,
            "reportable": all(i is not None and i.reportable and not i.inconsistent for i, _ in idents),
            "reportable_reason": next((f"{why}: {runlog.OLDER_RUN}" if i is None else i.reason
                                       for i, why in idents if i is None or not i.reportable), idents[0][0].reason
                                      if idents[0][0] is not None else ""),
            "no_validation_data_in_training": all(
                (r.log.compliance.get("validation_data_in_training") or {}).get("value") == "no" for r in ordered),
            "ttt": bool(first["config"].get("TTT_ENABLED")), "score_first_ttt": bool(first["config"].get("TTT_ENABLED")),
            "max_train_time_ms": max_train, "max_train_data_access_end_ms": max(access) if access else None,
            "max_eval_time_ms": max(r.metrics["eval_time_ms"] for r in ordered),
        },
    }
    if comparison is not None:
        sub["significance"] = {"baseline": baseline_desc, **comparison.as_dict()}
    return sub


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _git_user() -> str:
    try:
        out = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="records/make_submission.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--name", required=True, help="short name: letters, digits, . _ + - (folder <date>_<name>)")
    p.add_argument("--logs", required=True, nargs="+", type=Path, metavar="RUN.json",
                   help="one run JSON per seed (logs/<RUN_ID>.json; the .txt log next to it is shipped)")
    p.add_argument("--script", type=Path, default=runlog.ROOT / "train_gpt.py",
                   help="the script the runs executed (default: the repository's train_gpt.py)")
    p.add_argument("--pack", action="store_true", help="ship the self-extracting form of the script: its compressed "
                   "bytes in a Latin-1 string literal, as records/pack.py -o writes (fewer code bytes)")
    p.add_argument("--codec", choices=pack.CODECS, default="lzma", help="compressor for --pack (default lzma)")
    p.add_argument("--baseline", nargs="+", metavar="B",
                   help="record folder(s), submission.json or run JSONs to test against (records/stats.py)")
    p.add_argument("--author", default=None, help="your name (default: git config user.name)")
    p.add_argument("--github-id", default=None, help="your GitHub user name")
    p.add_argument("--blurb", default=None, help="one sentence: what this submission does")
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--track", choices=sorted(TRACKS), default=None, help="default 10min_16mb (the record track)")
    p.add_argument("--non-record", action="store_true",
                   help="build a non-record submission (= --track non_record_16mb, under track_non_record_16mb/): "
                        "runs that are not reportable or predate the dataset identity, and the time limits, are "
                        "warnings instead of refusals")
    p.add_argument("--out", type=Path, default=runlog.HERE, help="records root (default: this repository's records/)")
    p.add_argument("--force", action="store_true", help="replace an existing folder of the same name")
    args = p.parse_args(argv)
    args.author = args.author if args.author is not None else (_git_user() or check.PLACEHOLDER)
    args.github_id = args.github_id or check.PLACEHOLDER
    args.blurb = args.blurb or f"{check.PLACEHOLDER}: one sentence on what this submission does."
    args.date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    args.track_conflict = args.non_record and args.track == "10min_16mb"
    args.track = args.track or ("non_record_16mb" if args.non_record else "10min_16mb")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    errors: list[str] = []
    warnings: list[str] = []
    record = args.track == "10min_16mb"
    if args.track_conflict:
        errors.append("--non-record with --track 10min_16mb is not allowed: a non-record submission goes under "
                      "track_non_record_16mb (leave --track out)")
    if not NAME_RE.fullmatch(args.name):
        errors.append(f"--name {args.name!r} is not allowed: letters, digits and . _ + - (no spaces or slashes)")
    if not DATE_RE.fullmatch(args.date):
        errors.append(f"--date {args.date!r} is not allowed: expected YYYY-MM-DD")
    runs = load_runs(args.logs, errors)
    validate_runs(runs, errors)
    check_data(runs, record, errors, warnings)
    shipped = resolve_script(args.script, runs, args.pack, args.codec, errors) if runs else None
    if shipped is not None:
        check_limits(runs, len(shipped.data), args.track, errors)
    dest = args.out / f"track_{args.track}" / f"{args.date}_{args.name}"
    if dest.exists() and not args.force:
        errors.append(f"{dest}: already exists; choose another --name or pass --force to replace it")
    if 0 < len(runs) < check.MIN_SEEDS:
        n = len(runs)
        warnings.append(f"--logs: {n} seed{'s' if n > 1 else ''} ({', '.join(str(r.seed) for r in runs)}): a record "
                        f"needs at least {check.MIN_SEEDS} seeds (p < 0.01 on the 0.005-nat margin); "
                        + ("the sample std and the significance tests are not computable with one seed" if n == 1
                           else "with 2 seeds the significance tests have very few degrees of freedom"))
    comparison, baseline_desc, sig_lines = None, None, []
    if args.baseline and runs and not errors:
        try:
            new = stats.Side("new", [stats.score_of_run(r) for r in sorted(runs, key=lambda r: r.seed)])
            old = stats.load_side(args.baseline, "baseline")
            comparison = stats.compare(new, old)
            baseline_desc = " ".join(args.baseline)
            sig_lines = stats.describe(old) + comparison.lines()
        except RecordError as exc:
            errors.append(f"--baseline: {exc}")
    if errors or not runs or shipped is None:
        for e in errors or ["--logs: no usable runs"]:
            print(f"error: {e}", file=sys.stderr)
        print("make_submission: nothing written", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)

    sub = build_submission(runs, shipped, args, comparison, baseline_desc)
    source = pack.unpack(shipped.data)[0] if shipped.how != "raw" else shipped.data
    cmd = run_command(runs, script_module(source, str(args.script)) or runlog.train_gpt())
    folder_rel = f"records/track_{args.track}/{dest.name}"  # where the pull request puts it
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # removed again on failure
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    done = False
    try:
        (tmp / "train_gpt.py").write_bytes(shipped.data)
        for run in sorted(runs, key=lambda r: r.seed):
            shutil.copyfile(run.log_path, tmp / f"train_seed{run.seed}.log")
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        (tmp / "requirements.txt").write_text(requirements_text(runs), encoding="utf-8")
        (tmp / "README.md").write_text(readme_text(sub, runs, shipped, folder_rel, cmd, sig_lines),
                                       encoding="utf-8")
        os.chmod(tmp, 0o755)
        results = check.check_folder(tmp, name=dest.name)
        failed = [c for c in results if c.status == "FAIL"]
        if failed:
            for c in failed:
                print(f"error: check {c.name}: {c.detail}", file=sys.stderr)
            raise RecordError("the built folder does not pass records/check.py")
        if dest.exists():  # --force: swap in the new folder, then drop the old one
            old = dest.with_name(f".{dest.name}.old{os.getpid()}")
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except OSError:
                os.rename(old, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        done = True
    except (OSError, RecordError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("make_submission: nothing written", file=sys.stderr)
        return 2
    finally:  # success, refusal or a bug: the temporary folder never stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made if not done else ():
            try:
                d.rmdir()
            except OSError:
                break

    print(f"wrote {dest}/")
    print(f"  train_gpt.py  {len(shipped.data):,} bytes ({shipped.how}"
          + (f", {shipped.codec}" if shipped.codec else "") + f"), sha256 {sub['code_sha256'][:16]}")
    for seed, row in sub["seed_results"].items():
        print(f"  seed {seed:>6}: val_loss {row['val_loss']:.8f} val_bpb {row['val_bpb']:.8f} steps {row['steps']} "
              f"bytes_total {row['bytes_total']:,}")
    print(f"  mean val_bpb {sub['val_bpb']:.8f} ± {_std(sub['val_bpb_std'], 8)}, val_loss {sub['val_loss']:.8f} "
          f"± {_std(sub['val_loss_std'], 8)} (sample std, n={len(runs)})")
    c = sub["compliance"]
    print(f"  data: {c['reportable_reason'] if c['reportable'] else 'NOT reportable: ' + c['reportable_reason']}; "
          f"val sha256 {sub['dataset'].get('val_sha256')}; tokenizer sha256 {sub['dataset'].get('tokenizer_sha256')}"
          + ("" if record else f" ({TRACKS[args.track]})"))
    for line in sig_lines:
        print(f"  {line}")
    for c in results:
        if c.status != "PASS":
            print(f"  {c.line()}")
    print(f"next: fill in README.md ({check.PLACEHOLDER} markers), run python records/check.py {dest}, "
          f"then open a pull request that adds only this folder (as {folder_rel}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
