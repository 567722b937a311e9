"""Reading the outputs of train_gpt.py runs: the log (`logs/<RUN_ID>.txt`, shipped in a record folder
as `train_seed<S>.log`) and the metrics JSON (`logs/<RUN_ID>.json`). Shared by the records tools.

The log is self-sufficient: its sorted `config:` block holds every resolved knob (lower case), the
versions, the dataset fingerprint and `code_sha256`/`code_bytes`; the labelled evaluation lines
(`pre_quant_val_loss:`, `roundtrip_val_loss:`, `sliding_val_loss:`, `ttt_val_loss:`) and the
`compliance:` lines follow; a complete log ends with exactly one `final ...` line.

A run's JSON and the log next to it must come from one run: `load_run` refuses a JSON whose log is
incomplete or names another run (a re-run that died leaves the old JSON behind) and, given the log,
ignores such a JSON with a warning. `data_identity_*` say which data a run scored (validation and
tokenizer sha256, whether it is the challenge's validation split).

The challenge limits come from train_gpt.py (imported from the repository root next to this folder);
when it cannot be imported, the same published values are used.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

FINAL_RE = re.compile(
    r"final val_loss:(?P<val_loss>\d+\.\d{8}) val_bpb:(?P<val_bpb>\d+\.\d{8}) eval:(?P<eval>roundtrip|sliding|ttt) "
    r"bytes_total:(?P<bytes_total>\d+) bytes_model:(?P<bytes_model>\d+) bytes_code:(?P<bytes_code>\d+) "
    r"train_time_ms:(?P<train_time_ms>\d+) eval_time_ms:(?P<eval_time_ms>\d+) steps:(?P<steps>\d+)")
STEP_RE = re.compile(r"step:(?P<step>\d+)/(?P<of>\d+) train_loss:(?P<train_loss>\S+) train_time:(?P<train_time_ms>\d+)ms "
                     r"step_avg:(?P<step_avg_ms>[\d.]+)ms")
VAL_RE = re.compile(r"step:(?P<step>\d+)/(?P<of>\d+) val_loss:(?P<val_loss>\S+) val_bpb:(?P<val_bpb>\S+) "
                    r"train_time:(?P<train_time_ms>\d+)ms")
EVAL_LABELS = ("pre_quant", "roundtrip", "sliding", "ttt")
EVAL_RE = re.compile(r"(?P<label>pre_quant|roundtrip|sliding|ttt)_val_loss:(?P<val_loss>\S+) val_bpb:(?P<val_bpb>\S+)")
DATASET_LINE_RE = re.compile(r"dataset:(?P<dir>.*?) manifest:")  # the shard folder the run read (its `dataset:` line)
CONFIG_LINE_RE = re.compile(r"  (?P<key>[a-z0-9_]+): ?(?P<value>.*)")

# Config-block keys that describe the machine, not the configuration: a difference is reported, not refused.
ENVIRONMENT_KEYS = frozenset({"python", "torch", "numpy", "cuda", "platform", "gpu", "gpu_count", "flash_attn",
                              "cpu_threads", "attention_backend", "resolved_attn_backend", "resolved_device"})
CODE_KEYS = frozenset({"code_sha256", "code_bytes", "config_hash"})
# The JSON keys a finished training run has (finish() and train_and_evaluate() in train_gpt.py).
REQUIRED_METRICS = ("run_id", "eval", "val_loss", "val_bpb", "val_tokens", "val_bytes", "bytes_total", "bytes_model",
                    "bytes_code", "train_time_ms", "eval_time_ms", "steps", "world_size", "config", "code_sha256",
                    "versions", "evaluations", "pre_quant")


class RecordError(Exception):
    """Bad input to a records tool; the message names the file or argument, the value and what is allowed."""


# ---------------------------------------------------------------------------------------------
# train_gpt.py: limits and the config hash
# ---------------------------------------------------------------------------------------------

_TG: Any = None


def train_gpt() -> Any:
    """The repository's train_gpt module (already imported, or loaded from ROOT), or None."""
    global _TG
    if _TG is None:
        module = sys.modules.get("train_gpt")
        if module is None and (ROOT / "train_gpt.py").is_file():
            try:
                spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "train_gpt.py")
                module = importlib.util.module_from_spec(spec)
                sys.modules["train_gpt"] = module
                spec.loader.exec_module(module)
            except Exception:  # noqa: BLE001 - no torch, or a broken checkout: fall back to the constants
                sys.modules.pop("train_gpt", None)
                module = False
        _TG = module or False
    return _TG or None


def limits() -> dict[str, float]:
    """The challenge limits: artifact bytes, training seconds, evaluation seconds."""
    tg = train_gpt()
    return {"bytes": int(getattr(tg, "ARTIFACT_LIMIT_BYTES", 16_000_000)),
            "train_s": float(getattr(tg, "TRAIN_LIMIT_S", 600.0)),
            "eval_s": float(getattr(tg, "EVAL_LIMIT_S", 600.0))}


def config_hash_ignored() -> frozenset[str]:
    """Knobs that name or place a run (SEED, RUN_ID, LOG_DIR): the seeds of one sweep differ only there."""
    return frozenset(getattr(train_gpt(), "CONFIG_HASH_IGNORED", frozenset({"SEED", "RUN_ID", "LOG_DIR"})))


def config_hash(config: dict[str, Any]) -> str | None:
    tg = train_gpt()
    return tg.config_hash(config) if tg is not None and hasattr(tg, "config_hash") else None


def config_differences(a: dict[str, Any], b: dict[str, Any], ignored: frozenset[str] = frozenset()) -> list[str]:
    """`KEY a_value vs b_value` for every key (not in `ignored`, case-insensitive) where a and b differ."""
    ign = {k.lower() for k in ignored}
    out = []
    for key in sorted(set(a) | set(b)):
        if key.lower() in ign:
            continue
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if va != vb:
            out.append(f"{key} {va!r} vs {vb!r}")
    return out


# ---------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------


def parse_kv(line: str, stop: str = "how") -> dict[str, str]:
    """`a:1 b:x how:free text` -> {"a": "1", "b": "x", "how": "free text"}; the `stop` key takes the rest."""
    out: dict[str, str] = {}
    parts = line.split(" ")
    for i, part in enumerate(parts):
        key, sep, value = part.partition(":")
        if not sep:
            continue
        if key == stop:
            out[key] = " ".join([value] + parts[i + 1:])
            break
        out[key] = value
    return out


def _num(value: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


@dataclass
class LogInfo:
    path: Path
    config: dict[str, str] = field(default_factory=dict)  # the `config:` block, lower-case keys
    final: dict[str, Any] | None = None  # the `final` line, numbers parsed
    final_is_last: bool = False  # the final line is the last non-empty line (the run finished)
    steps: list[dict[str, float]] = field(default_factory=list)  # train step lines
    vals: list[dict[str, float]] = field(default_factory=list)  # periodic validation lines
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # pre_quant/roundtrip/sliding/ttt lines
    compliance: dict[str, dict[str, str]] = field(default_factory=dict)
    dataset_dir: str | None = None  # the shard folder the run read, as its `dataset:` line names it
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.final is not None and self.final_is_last

    @property
    def seed(self) -> int | None:
        try:
            return int(self.config["seed"])
        except (KeyError, ValueError):
            return None

    @property
    def data_access_end_ms(self) -> int | None:
        c = self.compliance.get("train_data_access_end", {})
        return int(c["ms"]) if c.get("ms", "").isdigit() else None


def parse_log(text: str, path: Path | str = "log") -> LogInfo:
    info = LogInfo(Path(path))
    lines = text.splitlines()
    in_config = False
    for line in lines:
        if line == "config:":
            in_config = True
            continue
        if in_config:
            m = CONFIG_LINE_RE.fullmatch(line)
            if m:
                info.config[m["key"]] = m["value"]
                continue
            in_config = False
        if line.startswith("final "):
            m = FINAL_RE.fullmatch(line)
            info.final = {k: (v if k == "eval" else _num(v)) for k, v in m.groupdict().items()} if m else None
        elif line.startswith("step:"):
            m = STEP_RE.match(line)
            if m:
                info.steps.append({k: float(v) for k, v in m.groupdict().items()})
                continue
            m = VAL_RE.match(line)
            if m:
                info.vals.append({k: float(v) for k, v in m.groupdict().items()})
        elif line.startswith("compliance:"):
            kv = parse_kv(line)
            info.compliance[kv.pop("compliance")] = kv
        elif line.startswith("dataset:") and (m := DATASET_LINE_RE.match(line)):
            info.dataset_dir = m["dir"]
        elif line.startswith("WARNING:"):
            info.warnings.append(line)
        elif line.startswith("error:"):
            info.errors.append(line)
        else:
            m = EVAL_RE.match(line)
            if m:
                kv = parse_kv(line)
                entry: dict[str, Any] = {"val_loss": float(m["val_loss"]), "val_bpb": float(m["val_bpb"])}
                for key in ("val_tokens", "val_bytes"):
                    if key in kv and kv[key].isdigit():
                        entry[key] = int(kv[key])
                if kv.get("eval_time", "").endswith("ms"):
                    entry["eval_time_ms"] = float(kv["eval_time"][:-2])
                info.evals[m["label"]] = entry
    rest = [line for line in lines if line.strip()]
    info.final_is_last = bool(rest) and FINAL_RE.fullmatch(rest[-1]) is not None
    return info


def read_log(path: Path) -> LogInfo:
    try:
        return parse_log(path.read_text(encoding="utf-8", errors="replace"), path)
    except OSError as exc:
        raise RecordError(f"{path}: cannot read: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# A run: metrics JSON + log
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run, from its JSON (`metrics`) and/or its log (`log`)."""
    label: str
    json_path: Path | None = None
    log_path: Path | None = None
    metrics: dict[str, Any] | None = None
    log: LogInfo | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. a JSON next to the log that was ignored

    @property
    def seed(self) -> int | None:
        if self.metrics and isinstance(self.metrics.get("config"), dict) and "SEED" in self.metrics["config"]:
            return int(self.metrics["config"]["SEED"])
        return self.log.seed if self.log else None

    @property
    def run_id(self) -> str:
        if self.metrics and self.metrics.get("run_id"):
            return str(self.metrics["run_id"])
        if self.log and self.log.config.get("run_id"):
            return self.log.config["run_id"]
        return self.label

    @property
    def config(self) -> dict[str, Any]:
        """The resolved knobs, UPPER_CASE keys (typed from the JSON, strings from a log)."""
        if self.metrics and isinstance(self.metrics.get("config"), dict):
            return dict(self.metrics["config"])
        if self.log:
            skip = ENVIRONMENT_KEYS | CODE_KEYS
            return {k.upper(): v for k, v in self.log.config.items()
                    if k not in skip and not k.startswith(("dataset_", "resolved_")) and k != "world_size"}
        return {}

    def value(self, key: str) -> Any:
        """A final metric (val_loss, val_bpb, bytes_*, *_time_ms, steps, eval) from the JSON, else the log."""
        if self.metrics and key in self.metrics:
            return self.metrics[key]
        if self.log and self.log.final and key in self.log.final:
            return self.log.final[key]
        return None

    def evaluation(self, label: str) -> dict[str, Any] | None:
        """{val_loss, val_bpb, tokens?, bytes?} of one labelled evaluation (pre_quant, roundtrip, ...)."""
        if self.metrics:
            if label == "pre_quant" and isinstance(self.metrics.get("pre_quant"), dict):
                return dict(self.metrics["pre_quant"])
            ev = (self.metrics.get("evaluations") or {}).get(label)
            if isinstance(ev, dict):
                return dict(ev)
        if self.log and label in self.log.evals:
            e = self.log.evals[label]
            out = {"val_loss": e["val_loss"], "val_bpb": e["val_bpb"]}
            if "val_tokens" in e:
                out.update(tokens=e["val_tokens"], bytes=e["val_bytes"])
            return out
        return None

    @property
    def tokens_bytes(self) -> tuple[int, int] | None:
        """(scored tokens, their bytes) of the reported evaluation: the run's own tokens/bytes ratio."""
        if self.metrics and self.metrics.get("val_tokens") and self.metrics.get("val_bytes"):
            return int(self.metrics["val_tokens"]), int(self.metrics["val_bytes"])
        label = self.value("eval")
        ev = self.evaluation(label) if label else None
        if ev and ev.get("tokens") and ev.get("bytes"):
            return int(ev["tokens"]), int(ev["bytes"])
        return None

    @property
    def code_sha256(self) -> str | None:
        if self.metrics and self.metrics.get("code_sha256"):
            return str(self.metrics["code_sha256"])
        return self.log.config.get("code_sha256") if self.log else None

    @property
    def train_data_access_end_ms(self) -> int | None:
        if self.metrics and isinstance(self.metrics.get("train_data_access_end_ms"), (int, float)):
            return int(self.metrics["train_data_access_end_ms"])
        return self.log.data_access_end_ms if self.log else None

    def history(self) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        """(train points, val points), each {step, train_time_ms, train_loss | val_loss+val_bpb}: the JSON's
        `history` when present, else the log's step lines."""
        hist = (self.metrics or {}).get("history")
        if isinstance(hist, dict) and (hist.get("train") or hist.get("val")):
            return list(hist.get("train") or []), list(hist.get("val") or [])
        if self.log:
            return ([{k: s[k] for k in ("step", "train_time_ms", "train_loss")} for s in self.log.steps],
                    [{k: v[k] for k in ("step", "train_time_ms", "val_loss", "val_bpb")} for v in self.log.vals])
        return [], []


VERSION_KEYS = ("python", "torch", "numpy", "cuda", "platform", "gpu", "gpu_count", "flash_attn", "cpu_threads")


def typed(value: str) -> Any:
    """A config-block value as the run JSON holds it: True/False, None, a number, else the text."""
    if value in ("True", "False"):
        return value == "True"
    return None if value == "None" else _num(value)


def metrics_from_log(lg: LogInfo) -> dict[str, Any]:
    """What a finished run's JSON says, re-derived from its complete log alone (the config block, the labelled
    evaluation lines, the `compliance:` lines and the `final` line; scores at the log's 8 decimals): the keys
    the records tools read (REQUIRED_METRICS, dataset, reportable, train_data_access_end_ms). A folder ships
    only the logs, so this is how check.py re-derives a submission's numbers."""
    if lg.final is None:
        raise RecordError(f"{lg.path}: no final line")
    cfg, fin = lg.config, lg.final
    skip = ENVIRONMENT_KEYS | CODE_KEYS
    config = {k.upper(): typed(v) for k, v in cfg.items()
              if k not in skip and not k.startswith(("dataset_", "resolved_")) and k != "world_size"}
    versions = {k: cfg[k] for k in VERSION_KEYS if k in cfg}
    if "resolved_device" in cfg:
        versions["device"] = cfg["resolved_device"]
    evaluations = {label: {"val_loss": e["val_loss"], "val_bpb": e["val_bpb"],
                           **({"tokens": e["val_tokens"], "bytes": e["val_bytes"]} if "val_tokens" in e else {})}
                   for label, e in lg.evals.items() if label != "pre_quant"}
    final_eval = lg.evals.get(fin["eval"], {})
    m: dict[str, Any] = {
        "run_id": cfg.get("run_id"), "eval": fin["eval"], "val_loss": fin["val_loss"], "val_bpb": fin["val_bpb"],
        "val_tokens": final_eval.get("val_tokens"), "val_bytes": final_eval.get("val_bytes"),
        **{k: fin[k] for k in ("bytes_total", "bytes_model", "bytes_code", "train_time_ms", "eval_time_ms", "steps")},
        "world_size": _int(cfg.get("world_size")), "config": config, "config_hash": cfg.get("config_hash"),
        "code_sha256": cfg.get("code_sha256"), "versions": versions,
        "attention_backend": cfg.get("resolved_attn_backend"),
        "dataset": {k[len("dataset_"):]: typed(v) for k, v in cfg.items() if k.startswith("dataset_")},
        "evaluations": evaluations,
    }
    if "pre_quant" in lg.evals:
        m["pre_quant"] = {k: lg.evals["pre_quant"][k] for k in ("val_loss", "val_bpb")}
    if lg.data_access_end_ms is not None:
        m["train_data_access_end_ms"] = lg.data_access_end_ms
    ident, _ = data_identity_of_log(lg)
    if ident is not None:
        m["reportable"], m["reportable_reason"] = ident.reportable, ident.reason
    return m


def run_from_log(lg: LogInfo) -> Run:
    """A run from a complete log alone, its metrics re-derived (metrics_from_log)."""
    return Run(lg.path.name, None, lg.path, metrics_from_log(lg), lg)


def sibling_log(json_path: Path) -> Path | None:
    for ext in (".txt", ".log"):
        p = json_path.with_suffix(ext)
        if p.is_file():
            return p
    return None


def is_run_json(data: Any) -> bool:
    """A run's metrics JSON as train_gpt.py writes it (a submission.json or a stray object is not one)."""
    return isinstance(data, dict) and "config" in data and "val_loss" in data


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecordError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


INCOMPLETE = ("the log has no `final` line at its end (incomplete log: a re-run that died or is still running, or a "
              "truncated file)")


def pairing_problems(metrics: dict[str, Any], log: LogInfo) -> list[str]:
    """Why a run JSON does not belong to the log next to it (empty when they are one run): the log is
    incomplete (the JSON is written just before the `final` line), or they differ in run_id, seed,
    code_sha256, config_hash, the final scores or the data identity."""
    if not log.complete:
        return [INCOMPLETE]
    out = []
    cfg, fin, data = log.config, log.final, log.compliance.get("dataset", {})
    pairs = [("run_id", metrics.get("run_id"), cfg.get("run_id")),
             ("seed", (metrics.get("config") or {}).get("SEED"), cfg.get("seed")),
             ("code_sha256", metrics.get("code_sha256"), cfg.get("code_sha256")),
             ("config_hash", metrics.get("config_hash"), cfg.get("config_hash")),
             ("val_sha256", (metrics.get("dataset") or {}).get("val_sha256"), data.get("val_sha256")),
             ("tokenizer_sha256", (metrics.get("dataset") or {}).get("tokenizer_sha256"), data.get("tokenizer_sha256"))]
    pairs += [(k, metrics.get(k), fin[k]) for k in ("eval", "steps", "bytes_total", "bytes_model", "bytes_code",
                                                    "train_time_ms", "eval_time_ms")]
    for key, in_json, in_log in pairs:
        if in_json is not None and in_log is not None and str(in_json) != str(in_log):
            out.append(f"{key} {in_json} in the JSON vs {in_log} in the log")
    for key in ("val_loss", "val_bpb"):
        if isinstance(metrics.get(key), (int, float)) and f"{metrics[key]:.8f}" != f"{fin[key]:.8f}":
            out.append(f"{key} {metrics[key]:.8f} in the JSON vs {fin[key]:.8f} in the log")
    said = log.compliance.get("reportable", {}).get("value")
    if isinstance(metrics.get("reportable"), bool) and said in ("yes", "NO") and metrics["reportable"] != (said == "yes"):
        out.append(f"reportable {str(metrics['reportable']).lower()} in the JSON vs {said} in the log")
    return out


def load_run(path: Path) -> Run:
    """A run from its JSON (the log next to it is read too) or from a log (.txt/.log; a JSON next to it too).

    Given a JSON whose log does not belong to it (`pairing_problems`), it refuses, naming both files; given
    a log, such a JSON is ignored and the run gets a warning."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file (expected a run's .json or .txt/.log)")
    if path.suffix == ".json":
        metrics = load_json(path)
        if not isinstance(metrics, dict):
            raise RecordError(f"{path}: expected a JSON object (a run's metrics), got {type(metrics).__name__}")
        if not is_run_json(metrics):
            raise RecordError(f"{path}: not a train_gpt.py run JSON (no `config` and `val_loss`)")
        log_path = sibling_log(path)
        log = read_log(log_path) if log_path else None
        problems = pairing_problems(metrics, log) if log is not None else []
        if problems:
            raise RecordError(f"{path}: does not belong to the log next to it, {log_path}: {'; '.join(problems[:4])}"
                              f"; the two files come from different runs (a re-run that died leaves the old JSON "
                              f"behind): re-run, or give {log_path.name} to read the log alone")
        return Run(str(path), path, log_path, metrics, log)
    log = read_log(path)
    if not log.config and log.final is None and not log.errors:  # ours has one of them from its first lines
        raise RecordError(f"{path}: not a train_gpt.py log (no `config:` block, no `final` line, no `error:` line)")
    json_path = path.with_suffix(".json")
    metrics, warnings = None, []
    if json_path.is_file():
        data = load_json(json_path)
        metrics = data if is_run_json(data) else None
        problems = pairing_problems(metrics, log) if metrics is not None else []
        if problems:
            warnings.append(f"{json_path}: ignored, it does not belong to {path}: {'; '.join(problems[:4])}; "
                            f"reading the log alone")
            metrics = None
    return Run(str(path), json_path if metrics else None, path, metrics, log, warnings)


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given; a folder becomes its run JSONs, or else its logs (train_seed*.log, *.txt, *.log). A
    `<RUN_ID>.new.*` file is an OVERWRITE=1 rerun still going or dead, not a run: never picked up."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            def runs(pattern: str) -> list[Path]:
                return sorted(q for q in p.glob(pattern) if q.name != "submission.json" and ".new." not in q.name)

            found = runs("*.json") or runs("train_seed*.log") or runs("*.txt") or runs("*.log")
            if not found:
                raise RecordError(f"{p}: folder holds no run .json or .log/.txt files")
            out.extend(found)
        else:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# Which data a run scored
# ---------------------------------------------------------------------------------------------

# What train_gpt.py records about the scored data (the JSON's `dataset`, the log's `compliance:dataset` line);
# a run without them was written by an older script, whose `reportable` did not look at the data at all.
IDENTITY_KEYS = ("val_sha256", "tokenizer_sha256", "val_documents", "challenge_split")
OLDER_RUN = ("written by an older train_gpt.py, so which data it scored cannot be verified; re-run it with the current "
             "script (re-scoring its artifact with EVAL_ONLY=1 shows the data, but a submission needs training runs)")


@dataclass
class DataIdentity:
    """The scored data: validation shards' and tokenizer's sha256, and whether they are the challenge's
    validation split (`reportable`, with train_gpt.py's reason)."""
    val_sha256: str
    tokenizer_sha256: str
    val_documents: int | None
    manifest_sha256: str | None
    reportable: bool
    reason: str
    inconsistent: str = ""  # a `reportable` claim its own counts contradict (an edited file)

    @property
    def key(self) -> tuple[str, str]:
        return self.val_sha256, self.tokenizer_sha256

    def describe(self) -> str:
        split = self.reason if self.reportable else f"not reportable ({self.reason})"
        return (f"{split}; val sha256 {self.val_sha256}; tokenizer sha256 {self.tokenizer_sha256}"
                + (f"; manifest sha256 {self.manifest_sha256}" if self.manifest_sha256 else "; no manifest"))


def _int(value: Any) -> int | None:
    try:
        return int(str(value).replace(",", ""))
    except (TypeError, ValueError):
        return None


def _recheck(ident: DataIdentity, vocab_size: Any, val_tokens_raw: Any, max_val_tokens: Any) -> DataIdentity:
    """A `reportable` claim, re-derived from the run's own counts with train_gpt.py's `challenge_split` (only
    for vocabularies whose split it knows, so a newer script's tokenizer is not refused)."""
    tg = train_gpt()
    vocab, raw, docs = _int(vocab_size), _int(val_tokens_raw), ident.val_documents
    known = getattr(tg, "CHALLENGE_VAL_TARGETS", {}) if tg is not None else {}
    if ident.reportable and hasattr(tg, "challenge_split") and vocab in known and None not in (raw, docs):
        ok, why = tg.challenge_split(vocab, raw, docs, _int(max_val_tokens) or 0)
        if not ok:
            ident.inconsistent = f"claims reportable, but its own counts say {why}"
    return ident


def data_identity_of_metrics(m: dict[str, Any]) -> tuple[DataIdentity | None, str]:
    """(identity, "") from a run JSON, or (None, what is missing) for a JSON of an older script."""
    ds = m.get("dataset") if isinstance(m.get("dataset"), dict) else {}
    missing = [f"dataset.{k}" for k in IDENTITY_KEYS if ds.get(k) is None]
    missing += [k for k in ("reportable", "reportable_reason") if k not in m]
    if missing:
        return None, f"no {', '.join(missing)}"
    ident = DataIdentity(str(ds["val_sha256"]), str(ds["tokenizer_sha256"]), _int(ds["val_documents"]),
                         ds.get("manifest_sha256"), bool(m["reportable"]), str(m["reportable_reason"]))
    if bool(ds["challenge_split"]) != ident.reportable:
        ident.inconsistent = f"reportable {ident.reportable} but dataset.challenge_split {ds['challenge_split']}"
        return ident, ""
    config = m.get("config") if isinstance(m.get("config"), dict) else {}
    return _recheck(ident, config.get("VOCAB_SIZE"), ds.get("val_tokens_raw"), config.get("MAX_VAL_TOKENS")), ""


def data_identity_of_log(lg: LogInfo) -> tuple[DataIdentity | None, str]:
    """(identity, "") from a log's `compliance:dataset` and `compliance:reportable` lines, or (None, what is
    missing) for a log of an older script."""
    data, rep = lg.compliance.get("dataset"), lg.compliance.get("reportable")
    missing = [] if data and data.get("val_sha256") and data.get("tokenizer_sha256") else ["compliance:dataset"]
    missing += [] if rep and rep.get("value") in ("yes", "NO") else ["compliance:reportable"]
    if missing:
        return None, f"no {' or '.join(missing)} line"
    manifest = data.get("manifest_sha256")
    reason = re.sub(r"^score from eval:\S+ on ", "", rep.get("how", ""))
    ident = DataIdentity(data["val_sha256"], data["tokenizer_sha256"], _int(data.get("val_documents")),
                         None if manifest in (None, "none") else manifest, rep["value"] == "yes", reason)
    return _recheck(ident, lg.config.get("vocab_size"), lg.config.get("dataset_val_tokens_raw"),
                    lg.config.get("max_val_tokens")), ""


def bpb(val_loss: float, tokens: float, n_bytes: float) -> float:
    """Bits per byte from nats per token and the run's own token and byte counts."""
    return val_loss / math.log(2) * tokens / n_bytes
