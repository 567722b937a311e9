"""Validate a record folder (ours or anyone's) before opening the pull request.

Usage:
    python records/check.py records/track_10min_16mb/2026-05-01_MyRun
    python records/check.py FOLDER --quiet          # only failures and warnings

Prints one line per check, `PASS`, `WARN` or `FAIL`, then a summary; exits 1 when any check fails.

Checks (the challenge README's rules, and what reviewers of public record PRs check):
- files: train_gpt.py, submission.json, README.md, one log per seed (train_seed<S>.log), requirements.txt;
- the script compiles; a packed (self-extracting) script's wrapper is run in a subprocess with `exec` and
  `compile` intercepted, so its payload is decompressed exactly as `python train_gpt.py` would (a payload
  that no longer decompresses fails) but the program itself does not run, and the payload compiles;
- submission.json has the fields (author, github_id, name, blurb, date, track, val_loss, val_bpb, ...);
- bytes_code in submission.json is the size of the shipped train_gpt.py, bytes_total = code + model;
- every log is complete (ends with its `final` line) and names its seed; the seeds match submission.json;
- every log ran this script: its code_sha256 is the sha256 of train_gpt.py, or of the payload of a packed one;
- all seeds ran one configuration: the logs' config blocks differ only in SEED, RUN_ID and LOG_DIR
  (data fingerprint included); version or GPU differences are warnings;
- which data every seed scored (the logs' `compliance:dataset` lines): one validation sha256 and one
  tokenizer sha256 across the seeds (else "mixed data"); the identity is printed in the PASS line;
- every seed: code + model <= 16,000,000 bytes, training and training-data access <= 600 s, eval <= 600 s,
  the score is reportable (the challenge's whole validation split: the log's `compliance:reportable`
  line, its claim re-derived from the logged document and target counts), and the log records the data
  identity (a log of an older train_gpt.py does not: re-run it); on the non-record track
  (track non_record_16mb) the time limits, reportability and a missing identity are warnings;
- every value of submission.json and every number and hash of the README agree with the logs: both are
  re-derived from the logs with make_submission.py's own functions (scores at the logs' 8 decimals, or the
  file's own full-precision value where it rounds to the log's) and compared value by value: per-seed
  results, means, sample std, bytes, steps, times, versions, dataset, compliance fields and, when its
  baseline can be read from here, the significance tests; in the README each generated line still there
  (found by its text without the numbers) is compared number by number, a missing or reworded headline or
  results row fails, and every knob the run command sets must be the logged value (not the data and log
  places, which the command sets for the folder). A differing value fails with the file, the value found
  and the value the logs give. Lines the author adds are not compared;
- BPB agrees with val_loss / ln 2 x tokens / bytes of each log's own counts;
- at least 3 seeds, 8xH100 hardware, the README lists every seed (warnings).

Logs not written by this repository's train_gpt.py (no `config:` block, no `final` line) cannot be
cross-checked; those checks are reported as warnings, the rest still run.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import math
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import pack  # noqa: E402
import runlog  # noqa: E402
import stats  # noqa: E402
from runlog import RecordError  # noqa: E402

LN2 = math.log(2)
REQUIRED_FIELDS = ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code")
RECOMMENDED_FIELDS = ("track", "val_bpb_std", "seeds", "seed_results", "hardware", "pytorch_version")
TRACKS = ("10min_16mb", "non_record_16mb")
FOLDER_RE = re.compile(r"(?P<date>\d{4}-\d{2}-\d{2})_(?P<name>[A-Za-z0-9][A-Za-z0-9._+-]*)")
PLACEHOLDER = "TODO"
MIN_SEEDS = 3
WRAPPER_TIMEOUT_S = 120
# Run in a fresh interpreter: the wrapper of a packed train_gpt.py with `compile` and `exec` intercepted, so it
# decompresses its payload exactly as `python train_gpt.py` would, but the program itself never runs; the payload
# is then compiled for real and written to argv[2]. Exit 1: the wrapper failed (2: a module it imports is missing);
# 3: it does not exec exactly one payload; 4: the payload does not compile.
WRAPPER_RUNNER = r"""
import builtins, sys
path, out = sys.argv[1], sys.argv[2]
with open(path, "rb") as fh:
    data = fh.read()
token, compiled, ran = object(), [], []
def fake_compile(source, *args, **kwargs):
    compiled.append(source)
    return token
def fake_exec(obj, *args, **kwargs):
    ran.append(compiled[-1] if obj is token and compiled else obj)
env = {"__name__": "__main__", "__file__": path,
       "__builtins__": {**vars(builtins), "compile": fake_compile, "exec": fake_exec}}
try:
    exec(compile(data, path, "exec", dont_inherit=True), env)
except ModuleNotFoundError as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(2)
except BaseException as exc:
    name = type(exc).__name__
    mod = type(exc).__module__
    print(f"{name if mod == 'builtins' else mod + '.' + name}: {exc}", file=sys.stderr)
    sys.exit(1)
if len(ran) != 1 or not isinstance(ran[0], (bytes, str)):
    print(f"it runs {len(ran)} exec call(s), not one exec of a payload", file=sys.stderr)
    sys.exit(3)
payload = ran[0].encode("utf-8") if isinstance(ran[0], str) else ran[0]
try:
    compile(payload, path + " (payload)", "exec", dont_inherit=True)
except (SyntaxError, ValueError) as exc:
    print(f"the payload does not compile: {exc}", file=sys.stderr)
    sys.exit(4)
with open(out, "wb") as fh:
    fh.write(payload)
"""
# A number or a hash (8+ hex digits) in a README line: what must agree with the logs; the rest of a generated
# line (its shape, the tokens replaced by #) identifies it.
README_TOKEN_RE = re.compile(r"(?<![\w.])(?:(?=[0-9a-f]*\d)[0-9a-f]{8,}|[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?)(?!\w)")
NUMBER_RE = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?")
FREE_FIELDS = frozenset({"author", "github_id", "name", "blurb", "date", "track"})  # the author's, not the logs'
FLOAT_RTOL = 1e-9  # submission.json floats vs the same numbers re-derived (summation order aside)
LOG_DECIMALS_TOL = 6e-9  # a log prints scores with 8 decimals: a full-precision value within this is the same


@dataclass
class Check:
    status: str  # PASS / WARN / FAIL
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"


@dataclass
class Script:
    """The shipped train_gpt.py: its bytes, and the payload when it is a self-extracting file."""
    path: Path
    data: bytes
    payload: bytes | None
    codec: str | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def payload_sha256(self) -> str | None:
        return hashlib.sha256(self.payload).hexdigest() if self.payload is not None else None

    def ran_by(self, code_sha256: str | None) -> bool:
        """True when a log with this code_sha256 ran exactly this script (or the source it packs)."""
        return code_sha256 is not None and code_sha256 in (self.sha256, self.payload_sha256)


def read_script(path: Path) -> Script:
    data = path.read_bytes()
    got = pack.unpack(data)
    return Script(path, data, got[0] if got else None, got[1] if got else None)


def looks_packed(data: bytes) -> bool:
    """A self-extracting file: at most pack.MAX_WRAPPER_STATEMENTS statements holding a compressed literal
    or calling exec (its payload may no longer decompress, so unpack() alone cannot tell)."""
    try:
        tree = ast.parse(data)
    except (SyntaxError, ValueError):
        return False
    if len(tree.body) > pack.MAX_WRAPPER_STATEMENTS:
        return False
    return pack.unpack(data) is not None or any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "exec" for n in ast.walk(tree))


def run_wrapper(path: Path) -> tuple[bytes | None, str, bool]:
    """(payload, "", _) when the wrapper of the packed file at `path`, run in a subprocess with exec and compile
    intercepted (WRAPPER_RUNNER), hands exactly one payload that compiles to exec; else (None, why, missing
    module: the wrapper could not be tried here)."""
    with tempfile.TemporaryDirectory(prefix="check_wrapper_") as tmp:
        out = Path(tmp) / "payload"
        try:
            proc = subprocess.run([sys.executable, "-c", WRAPPER_RUNNER, str(path.resolve()), str(out)], cwd=tmp,
                                  capture_output=True, timeout=WRAPPER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"running the wrapper did not finish in {WRAPPER_TIMEOUT_S} s", False
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        why = err[-1] if err else f"exit status {proc.returncode}"
        if proc.returncode != 0:
            return None, why, proc.returncode == 2
        return out.read_bytes(), "", False


def _decimals_tolerance(x: float) -> float:
    """Half a unit in the last printed decimal of x (a submission may round), at least 1e-8."""
    text = repr(float(x))
    if "e" in text or "." not in text:
        return 1e-8
    return max(0.5 * 10 ** -len(text.split(".")[1]), 1e-8) + 1e-12


def seed_logs(folder: Path) -> list[Path]:
    logs = sorted(folder.glob("train_seed*.log"))
    return logs or sorted(p for p in list(folder.glob("*.log")) + list(folder.glob("*.txt"))
                          if p.name not in ("requirements.txt",))


class Checker:
    def __init__(self, folder: Path, name: str | None = None):
        self.folder = folder
        self.name = name or folder.name  # the folder's final name (the builder checks it under a temporary one)
        self.results: list[Check] = []
        self.limits = runlog.limits()

    def add(self, status: str, name: str, detail: str) -> None:
        self.results.append(Check(status, name, detail))

    def ok(self, cond: bool, name: str, good: str, bad: str, soft: bool = False) -> bool:
        self.add("PASS" if cond else ("WARN" if soft else "FAIL"), name, good if cond else bad)
        return cond

    # ---------------------------------------------------------------------------------------------

    def run(self) -> list[Check]:
        f = self.folder
        if not f.is_dir():
            self.add("FAIL", "folder", f"{f}: not a folder")
            return self.results
        m = FOLDER_RE.fullmatch(self.name)
        self.ok(m is not None, "folder_name", f"{self.name} is <YYYY-MM-DD>_<name>",
                f"{self.name!r} is not <YYYY-MM-DD>_<name> (letters, digits, . _ + -)", soft=True)
        logs = seed_logs(f)
        missing = [n for n in ("train_gpt.py", "submission.json", "README.md") if not (f / n).is_file()]
        self.ok(not missing and bool(logs), "files", f"train_gpt.py, submission.json, README.md, {len(logs)} log(s)",
                f"missing: {', '.join(missing + ([] if logs else ['train_seed<S>.log']))}")
        self.ok((f / "requirements.txt").is_file(), "requirements", "requirements.txt present",
                "no requirements.txt (list what the script needs beyond the repository's)", soft=True)
        script = self.check_script()
        sub = self.check_submission(m.group("date") if m else None)
        if script is not None and sub is not None:
            self.check_bytes_code(script, sub)
        runs = self.check_logs(logs)
        if runs:
            self.check_runs(runs, script, sub)
        elif logs:
            self.add("WARN", "logs_format", "no log was written by this repository's train_gpt.py (no config block, "
                     "no final line): seeds, config, hash, sizes and times could not be cross-checked")
        return self.results

    def check_script(self) -> Script | None:
        path = self.folder / "train_gpt.py"
        if not path.is_file():
            return None
        script = read_script(path)
        try:
            compile(script.data, str(path), "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            self.add("FAIL", "script_compiles", f"{path.name}: {exc}")
            return script
        if not looks_packed(script.data):
            self.add("PASS", "script_compiles", f"{len(script.data):,} bytes, sha256 {script.sha256[:12]}")
            return script
        payload, why, missing = run_wrapper(path)
        if payload is None and missing and script.payload is not None:
            self.add("WARN", "script_compiles", f"{path.name}: its wrapper could not be run here ({why}); its literal "
                     f"unpacks ({script.codec}) to {len(script.payload):,} bytes, sha256 {script.payload_sha256[:12]}")
            return script
        if payload is None:
            self.add("FAIL", "script_compiles", f"{path.name}: a self-extracting file whose wrapper fails when run: "
                     f"{why} (`python train_gpt.py` stops there)")
            return Script(path, script.data, None, None)
        if script.payload is not None and payload != script.payload:
            self.add("FAIL", "script_compiles", f"{path.name}: its wrapper runs a payload (sha256 "
                     f"{hashlib.sha256(payload).hexdigest()[:12]}) other than its literal holds (sha256 "
                     f"{script.payload_sha256[:12]})")
            return Script(path, script.data, payload, script.codec)
        script = Script(path, script.data, payload, script.codec)
        self.add("PASS", "script_compiles", f"packed ({script.codec or 'unknown codec'}): {len(script.data):,} bytes, "
                 f"payload {len(payload):,} bytes sha256 {script.payload_sha256[:12]}, decompressed by running the "
                 f"wrapper (the program itself not run); the payload compiles")
        return script

    def check_submission(self, folder_date: str | None) -> dict[str, Any] | None:
        path = self.folder / "submission.json"
        if not path.is_file():
            return None
        try:
            sub = runlog.load_json(path)
        except RecordError as exc:
            self.add("FAIL", "submission_json", str(exc))
            return None
        if not isinstance(sub, dict):
            self.add("FAIL", "submission_json", f"{path.name}: expected an object")
            return None
        missing = [k for k in REQUIRED_FIELDS if k not in sub or sub[k] in (None, "")]
        numeric = [k for k in ("val_loss", "val_bpb", "bytes_total", "bytes_code")
                   if k in sub and not isinstance(sub[k], (int, float))]
        self.ok(not missing and not numeric, "submission_fields", "required fields present",
                "; ".join(filter(None, [f"missing {', '.join(missing)}" if missing else "",
                                        f"not numbers: {', '.join(numeric)}" if numeric else ""])))
        absent = [k for k in RECOMMENDED_FIELDS if k not in sub]
        placeholders = [k for k in ("author", "github_id", "blurb") if PLACEHOLDER in str(sub.get(k, ""))]
        self.ok(not absent and not placeholders, "submission_details", "track, std, seeds, per-seed results, hardware",
                "; ".join(filter(None, [f"missing {', '.join(absent)}" if absent else "",
                                        f"placeholder {PLACEHOLDER} in {', '.join(placeholders)}" if placeholders
                                        else ""])), soft=True)
        if "track" in sub:
            self.ok(sub["track"] in TRACKS, "track", str(sub["track"]),
                    f"track {sub['track']!r} is not one of {', '.join(TRACKS)}")
            parent = self.folder.parent.name
            if parent.startswith("track_"):
                self.ok(parent == f"track_{sub['track']}", "track_folder", f"under {parent}/",
                        f"submission.json says track {sub['track']!r} but the folder is under {parent}/")
        if folder_date and sub.get("date"):
            self.ok(str(sub["date"]).startswith(folder_date), "date", folder_date,
                    f"submission.json date {sub['date']!r} differs from the folder's {folder_date}", soft=True)
        return sub

    def check_bytes_code(self, script: Script, sub: dict[str, Any]) -> None:
        size = len(script.data)
        claimed = sub.get("bytes_code")
        self.ok(claimed == size, "bytes_code", f"{size:,} = size of the shipped train_gpt.py",
                f"submission.json bytes_code {claimed!r} != {size:,} bytes of the shipped train_gpt.py")
        total = sub.get("bytes_total")
        if isinstance(total, (int, float)):
            self.ok(total <= self.limits["bytes"], "bytes_total_claimed", f"{total:,} <= {self.limits['bytes']:,}",
                    f"submission.json bytes_total {total:,} is over {self.limits['bytes']:,}")

    def check_logs(self, logs: list[Path]) -> list[runlog.LogInfo]:
        parsed = [runlog.read_log(p) for p in logs]
        ours = [lg for lg in parsed if lg.config or lg.final is not None]
        if not ours:
            return []
        incomplete = [lg.path.name for lg in ours if not lg.complete]
        self.ok(not incomplete, "logs_complete", f"{len(ours)} log(s) end with their final line",
                f"incomplete (no final line at the end: unfinished or truncated run): {', '.join(incomplete)}")
        foreign = [lg.path.name for lg in parsed if lg not in ours]
        if foreign:
            self.add("WARN", "logs_format", f"not written by this repository's train_gpt.py: {', '.join(foreign)}")
        return [lg for lg in ours if lg.complete]

    def check_runs(self, runs: list[runlog.LogInfo], script: Script | None, sub: dict[str, Any] | None) -> None:
        lim = self.limits
        # Seeds
        seeds = [lg.seed for lg in runs]
        no_seed = [lg.path.name for lg in runs if lg.seed is None]
        dupes = sorted({s for s in seeds if s is not None and seeds.count(s) > 1})
        named = [lg.path.name for lg in runs if lg.seed is not None and lg.path.name.startswith("train_seed")
                 and lg.path.name != f"train_seed{lg.seed}.log"]
        self.ok(not no_seed and not dupes and not named, "seeds", f"{len(runs)} distinct seeds: "
                f"{', '.join(str(s) for s in seeds)}",
                "; ".join(filter(None, [f"no seed in {', '.join(no_seed)}" if no_seed else "",
                                        f"duplicate seeds {dupes}" if dupes else "",
                                        f"file name differs from its seed: {', '.join(named)}" if named else ""])))
        self.ok(len(runs) >= MIN_SEEDS, "seed_count", f"{len(runs)} seeds",
                f"{len(runs)} seed(s); a record needs enough seeds for p < 0.01 (usually {MIN_SEEDS})", soft=True)
        # Script hash
        if script is not None:
            bad = [f"{lg.path.name} ran {str(lg.config.get('code_sha256'))[:12]}" for lg in runs
                   if not script.ran_by(lg.config.get("code_sha256"))]
            want = script.sha256[:12] + (f" or payload {script.payload_sha256[:12]}" if script.payload else "")
            self.ok(not bad, "script_matches_logs", f"every log ran this train_gpt.py ({want})",
                    f"stale logs or edited script: {'; '.join(bad)}; train_gpt.py is {want}")
        # One configuration
        first = runs[0]
        ignored = {k.lower() for k in runlog.config_hash_ignored()}
        hard, soft = [], []
        for lg in runs[1:]:
            for key in sorted(set(first.config) | set(lg.config)):
                a, b = first.config.get(key, "<missing>"), lg.config.get(key, "<missing>")
                if key in ignored or key in runlog.CODE_KEYS or a == b:
                    continue
                (soft if key in runlog.ENVIRONMENT_KEYS else hard).append(f"{lg.path.name}: {key} {a!r} vs {b!r}")
        self.ok(not hard, "same_config", f"{len(runs)} logs share one configuration and dataset "
                f"(only {', '.join(sorted(k.upper() for k in ignored))} differ)",
                f"seeds from different configs (vs {first.path.name}): {'; '.join(hard[:8])}"
                + (f" (+{len(hard) - 8} more)" if len(hard) > 8 else ""))
        if soft:
            self.add("WARN", "same_environment", "; ".join(soft[:6]))
        record_track = sub is None or sub.get("track", "10min_16mb") == "10min_16mb"
        self.check_data(runs, record_track)
        # Sizes, times, reportable
        code_size = len(script.data) if script is not None else None
        over, slow, slow_eval, unreportable = [], [], [], []
        for lg in runs:
            fin = lg.final
            total = fin["bytes_model"] + (code_size if code_size is not None else fin["bytes_code"])
            if total > lim["bytes"]:
                over.append(f"seed {lg.seed}: {total:,}")
            access = lg.data_access_end_ms
            worst = max(fin["train_time_ms"], access or 0)
            if worst > lim["train_s"] * 1000:
                slow.append(f"seed {lg.seed}: {worst:,} ms")
            if fin["eval_time_ms"] > lim["eval_s"] * 1000:
                slow_eval.append(f"seed {lg.seed}: {fin['eval_time_ms']:,} ms")
            rep = lg.compliance.get("reportable", {})
            if rep.get("value") != "yes":
                unreportable.append(f"{lg.path.name}: {rep.get('how') or 'no compliance:reportable line'}")
        self.ok(not over, "artifact_bytes", f"every seed's code + model <= {lim['bytes']:,} bytes "
                f"(max {max(r.final['bytes_model'] for r in runs) + (code_size or 0):,})",
                f"over {lim['bytes']:,} bytes: {', '.join(over)}")
        self.ok(not slow, "train_time", f"training and training-data access <= {lim['train_s']:.0f} s for every seed",
                f"over {lim['train_s']:.0f} s (training or GPTQ data access): {', '.join(slow)}", soft=not record_track)
        self.ok(not slow_eval, "eval_time", f"evaluation <= {lim['eval_s']:.0f} s for every seed",
                f"over {lim['eval_s']:.0f} s: {', '.join(slow_eval)}", soft=not record_track)
        self.ok(not unreportable, "reportable", "every seed scored the challenge's whole validation split",
                f"not reportable: {'; '.join(unreportable[:3])}" + (f" (+{len(unreportable) - 3} more)"
                                                                    if len(unreportable) > 3 else "")
                + ("; a record must score the challenge's validation split" if record_track
                   else " (allowed on the non-record track)"), soft=not record_track)
        # BPB self-consistency
        bad_bpb = []
        for lg in runs:
            ev = lg.evals.get(lg.final["eval"], {})
            if ev.get("val_tokens") and ev.get("val_bytes"):
                expect = runlog.bpb(lg.final["val_loss"], ev["val_tokens"], ev["val_bytes"])
                if abs(expect - lg.final["val_bpb"]) > 2e-7 * max(1.0, expect):
                    bad_bpb.append(f"seed {lg.seed}: {lg.final['val_bpb']:.8f} vs {expect:.8f}")
        self.ok(not bad_bpb, "bpb_units", "val_bpb = val_loss / ln 2 x tokens / bytes in every log",
                f"val_bpb disagrees with val_loss and the log's own tokens/bytes: {', '.join(bad_bpb)}")
        # Hardware
        gpus = {(lg.config.get("world_size"), lg.config.get("gpu", lg.config.get("resolved_device", lg.config.get("device", "?")))) for lg in runs}
        h100 = all(ws == "8" and "H100" in str(gpu) for ws, gpu in gpus)
        self.ok(h100 or not record_track, "hardware", ", ".join(f"{ws}x {gpu}" for ws, gpu in sorted(gpus, key=str)),
                f"ran on {', '.join(f'{ws}x {gpu}' for ws, gpu in sorted(gpus, key=str))}; the record track is "
                f"timed on 8xH100 SXM", soft=True)
        if sub is not None:
            self.check_claims(runs, sub, script)
        readme = self.folder / "README.md"
        if readme.is_file():
            text = readme.read_text(encoding="utf-8", errors="replace")
            absent = [str(s) for s in seeds if s is not None and str(s) not in text]
            self.ok(not absent, "readme_seeds", "README lists every seed", f"README does not mention seed(s) "
                    f"{', '.join(absent)}", soft=True)

    def check_data(self, runs: list[runlog.LogInfo], record_track: bool) -> None:
        """Which data every seed scored: one identity across the logs, printed when it passes."""
        found, missing, bad = [], [], []
        for lg in runs:
            ident, why = runlog.data_identity_of_log(lg)
            if ident is None:
                missing.append(f"{lg.path.name} ({why})")
                continue
            found.append((lg, ident))
            if ident.inconsistent:
                bad.append(f"{lg.path.name}: {ident.inconsistent} (edited log?)")
        if missing:
            self.add("FAIL" if record_track else "WARN", "data_identity",
                     f"no data identity in {', '.join(missing)}: {runlog.OLDER_RUN}")
        if not found:
            return
        first_lg, first = found[0]
        mixed = [f"{lg.path.name}: val sha256 {i.val_sha256[:16]}, tokenizer sha256 {i.tokenizer_sha256[:16]}"
                 for lg, i in found[1:] if i.key != first.key]
        if mixed:
            self.add("FAIL", "data_identity", f"mixed data: {'; '.join(mixed)} vs {first_lg.path.name}: val sha256 "
                     f"{first.val_sha256[:16]}, tokenizer sha256 {first.tokenizer_sha256[:16]}; every seed must "
                     f"score the same validation data with the same tokenizer")
        elif bad:
            self.add("FAIL", "data_identity", "; ".join(bad))
        elif not missing:
            self.add("PASS", "data_identity", f"{len(found)} log(s): {first.describe()}")

    def check_claims(self, runs: list[runlog.LogInfo], sub: dict[str, Any], script: Script | None) -> None:
        """Every number of submission.json and of the README against the logs: both are re-derived from the logs
        with make_submission's own functions (Derived) and compared value by value."""
        problems = self.seed_problems(runs, sub)
        derived = None
        if script is not None:
            try:
                derived = Derived.build(self, runs, sub, script)
            except Exception as exc:  # noqa: BLE001 - an unexpected log: fall back to the main numbers
                self.add("WARN", "claims_derived", f"submission.json and README.md could not be re-derived from the "
                         f"logs ({type(exc).__name__}: {exc}); only scores, means, std, dataset and bytes compared")
        if derived is None:
            problems += self.claim_problems(runs, sub, len(script.data) if script is not None else None)
        else:
            problems += derived.json_problems(sub)
            if derived.significance_note:
                self.add("WARN", "significance", f"not re-derived: {derived.significance_note}; its numbers in "
                         f"submission.json and README.md are not checked")
        self.ok(not problems, "claims_match_logs", "seeds, per-seed results, means, std, bytes, times, versions, "
                "dataset and compliance fields in submission.json agree with the logs" if derived is not None else
                "seeds, per-seed results, means, std and bytes agree with the logs",
                f"{len(problems)} difference(s): " + "; ".join(problems[:8])
                + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
        readme = self.folder / "README.md"
        if derived is not None and readme.is_file():
            derived.check_readme(self, readme.read_text(encoding="utf-8", errors="replace"))

    @staticmethod
    def seed_problems(runs: list[runlog.LogInfo], sub: dict[str, Any]) -> list[str]:
        """submission.json's seeds and per-seed entries against the logs' seeds."""
        problems = []
        seeds = sorted(lg.seed for lg in runs if lg.seed is not None)
        claimed_seeds = sub.get("seeds")
        if claimed_seeds is not None and sorted(int(s) for s in claimed_seeds) != seeds:
            problems.append(f"seeds {claimed_seeds} vs logs {seeds}")
        results = sub.get("seed_results")
        if isinstance(results, dict) and sorted(int(k) for k in results) != seeds:
            problems.append(f"seed_results for {sorted(results)} vs logs {seeds}")
        return problems

    @staticmethod
    def claim_problems(runs: list[runlog.LogInfo], sub: dict[str, Any], code_size: int | None) -> list[str]:
        """The scores, means, std, dataset and bytes of submission.json against the logs (when the whole file
        cannot be re-derived: see check_claims)."""
        problems = []
        results = sub.get("seed_results")
        if isinstance(results, dict):
            for lg in runs:
                entry = results.get(str(lg.seed))
                if not isinstance(entry, dict):
                    continue
                for key in ("val_loss", "val_bpb"):
                    v = entry.get(key)
                    if isinstance(v, (int, float)) and abs(v - lg.final[key]) > _decimals_tolerance(v) + 1e-8:
                        problems.append(f"seed {lg.seed} {key} {v} vs log {lg.final[key]:.8f}")
                if "steps" in entry and entry["steps"] != lg.final["steps"]:
                    problems.append(f"seed {lg.seed} steps {entry['steps']} vs log {lg.final['steps']}")
                if code_size is not None and "bytes_total" in entry:
                    if entry["bytes_total"] != lg.final["bytes_model"] + code_size:
                        problems.append(f"seed {lg.seed} bytes_total {entry['bytes_total']} vs log model "
                                        f"{lg.final['bytes_model']} + code {code_size}")
        for key in ("val_loss", "val_bpb"):
            vals = [lg.final[key] for lg in runs]
            mean = sum(vals) / len(vals)
            v = sub.get(key)
            if isinstance(v, (int, float)) and abs(v - mean) > _decimals_tolerance(v) + 1e-8:
                problems.append(f"{key} {v} is not the mean of the logs ({mean:.8f})")
            sd_claim = sub.get(f"{key}_std")
            if isinstance(sd_claim, (int, float)) and len(vals) > 1:
                sd = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1))
                if abs(sd_claim - sd) > _decimals_tolerance(sd_claim) + 1e-8:
                    problems.append(f"{key}_std {sd_claim} is not the sample std of the logs ({sd:.8f})")
        claimed_data = sub.get("dataset") if isinstance(sub.get("dataset"), dict) else {}
        for key in ("val_sha256", "tokenizer_sha256"):
            logged = {str(lg.compliance.get("dataset", {}).get(key)) for lg in runs if lg.compliance.get("dataset")}
            if claimed_data.get(key) and len(logged) == 1 and claimed_data[key] not in logged:
                problems.append(f"dataset.{key} {str(claimed_data[key])[:16]} vs logs {next(iter(logged))[:16]}")
        if code_size is not None and isinstance(sub.get("bytes_total"), (int, float)):
            worst = max(lg.final["bytes_model"] for lg in runs) + code_size
            if sub["bytes_total"] != worst:
                problems.append(f"bytes_total {sub['bytes_total']} != largest model {worst - code_size} + code "
                                f"{code_size} = {worst}")
        return problems


# ---------------------------------------------------------------------------------------------
# submission.json and README.md re-derived from the logs
# ---------------------------------------------------------------------------------------------


def _same_value(found: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(found, bool):
        return found is want
    if isinstance(want, (int, float)) and isinstance(found, (int, float)):
        if isinstance(want, int) and isinstance(found, int):
            return found == want
        if math.isnan(want) or math.isnan(found):
            return math.isnan(want) and math.isnan(found)
        return found == want or abs(found - want) <= FLOAT_RTOL * max(1.0, abs(want))
    return found == want


def _json_diffs(want: Any, found: Any, path: str, skip: frozenset[str], out: list[tuple[str, Any, Any]]) -> None:
    """(path, found, want) for every leaf of `want` that `found` holds with another value (keys only one side
    has are not compared: an author may add fields, and a folder from an older builder may lack some)."""
    if path in skip:
        return
    if isinstance(want, dict):
        if not isinstance(found, dict):
            out.append((path, found, want))
            return
        for key, value in want.items():
            if key in found:
                _json_diffs(value, found[key], f"{path}.{key}" if path else str(key), skip, out)
    elif isinstance(want, list):
        if not isinstance(found, list) or len(found) != len(want):
            out.append((path, found, want))
            return
        for i, (w, f) in enumerate(zip(want, found)):
            _json_diffs(w, f, f"{path}[{i}]", skip, out)
    elif not _same_value(found, want):
        out.append((path, found, want))


def _refine(runs: list[runlog.Run], sub: dict[str, Any]) -> None:
    """The logs print scores with 8 decimals; submission.json holds them at full precision. Where its per-seed
    value is the log's (within the rounding), take it, so the means, std and tests come out exactly as they were
    built; an edited value stays the log's and shows up as a difference."""
    results = sub.get("seed_results") if isinstance(sub.get("seed_results"), dict) else {}
    for run in runs:
        row, m = results.get(str(run.seed)), run.metrics
        if not isinstance(row, dict):
            continue
        holders = {"": m, "pre_quant_": m.get("pre_quant"),
                   **{f"{label}_": m["evaluations"].get(label) for label in runlog.EVAL_LABELS if label != "pre_quant"}}
        for prefix, holder in holders.items():
            for key in ("val_loss", "val_bpb"):
                v = row.get(prefix + key)
                if (isinstance(holder, dict) and isinstance(v, float) and isinstance(holder.get(key), float)
                        and abs(v - holder[key]) <= LOG_DECIMALS_TOL):
                    holder[key] = v
        label = m["eval"]
        if isinstance(m["evaluations"].get(label), dict):
            m["evaluations"][label].update(val_loss=m["val_loss"], val_bpb=m["val_bpb"])


def _baseline_items(desc: str) -> list[str]:
    """--baseline's items as recorded, each found from here or from the repository root."""
    items = []
    for item in desc.split():
        path = Path(item)
        if not path.exists() and not NUMBER_RE.fullmatch(item) and (runlog.ROOT / item).exists():
            item = str(runlog.ROOT / item)
        items.append(item)
    return items


def _knob_same(readme_value: str, logged: str) -> bool:
    if logged in ("True", "False"):
        return readme_value.strip().lower() in (("1", "true", "yes", "on") if logged == "True" else
                                                ("0", "false", "no", "off", ""))
    if readme_value == logged:
        return True
    try:
        return float(readme_value) == float(logged)
    except ValueError:
        return False


def _same_token(found: str, want: str) -> bool:
    if found == want:
        return True
    if NUMBER_RE.fullmatch(found) and NUMBER_RE.fullmatch(want):
        return float(found.replace(",", "")) == float(want.replace(",", ""))
    return False


def _quote(line: str, width: int = 90) -> str:
    line = line.strip()
    return f"`{line if len(line) <= width else line[:width - 1] + '…'}`"


@dataclass
class Derived:
    """submission.json and README.md as make_submission.py writes them, re-derived from the folder's logs (and
    the shipped script, and the baseline of the significance tests when it can be found)."""
    sub: dict[str, Any]
    readme: str
    runs: list[runlog.Run]
    skip: frozenset[str]  # submission.json paths these logs cannot re-derive
    significance_note: str  # why the significance tests were not re-derived ("" when they were, or are absent)

    @classmethod
    def build(cls, checker: "Checker", logs: list[runlog.LogInfo], sub: dict[str, Any], script: Script) -> "Derived":
        import make_submission as ms  # here, not at the top: make_submission imports this module

        runs = sorted((runlog.run_from_log(lg) for lg in logs), key=lambda r: r.seed)
        _refine(runs, sub)
        source_sha = runs[0].metrics["code_sha256"]
        how = ("raw" if script.payload is None else "packed-from-raw" if script.payload_sha256 == source_sha
               else "packed")
        wrapper = (pack.unpack_wrapper(script.data) or (None,) * 4)[3]
        shipped = ms.Shipped(script.data, how, source_sha, script.codec, wrapper)
        args = argparse.Namespace(**{k: sub.get(k) for k in FREE_FIELDS})
        parent = checker.folder.parent.name
        folder_rel = (f"records/{parent}/{checker.name}" if parent.startswith("track_")
                      else f"records/track_{sub.get('track') or '10min_16mb'}/{checker.name}")
        skip = {*FREE_FIELDS, "seeds"}  # the seeds are compared as a set (seed_problems)
        if any(runlog.data_identity_of_log(lg)[0] is None for lg in logs):
            skip.add("compliance.reportable_reason")  # says what an older log lacks, in the words of its JSON
        comparison, desc, sig_lines, note = None, None, [], ""
        sig = sub.get("significance")
        if isinstance(sig, dict):
            desc = str(sig.get("baseline") or "")
            try:
                old = stats.load_side(_baseline_items(desc), "baseline")
                comparison = stats.compare(stats.Side("new", [stats.score_of_run(r) for r in runs]), old)
                sig_lines = stats.describe(old) + comparison.lines()
            except (RecordError, OSError, ValueError) as exc:
                note, desc = f"the baseline {desc!r} cannot be read from here ({exc})", None
                skip.add("significance")
        expected = ms.build_submission(runs, shipped, args, comparison, desc)
        readme = ms.readme_text(expected, runs, shipped, folder_rel, ms.run_command(runs, runlog.train_gpt()), sig_lines)
        return cls(expected, readme, runs, frozenset(skip), note)

    def json_problems(self, found: dict[str, Any]) -> list[str]:
        out: list[tuple[str, Any, Any]] = []
        _json_diffs(self.sub, found, "", self.skip, out)
        def short(v: Any) -> str:
            text = repr(v)
            return text if len(text) <= 100 else text[:99] + "…"

        return [f"submission.json {path}: {short(f)} where the logs give {short(w)}" for path, f, w in out]

    def command_problems(self, text: str) -> tuple[list[str], int, bool]:
        """The README's run command(s) against the logs: every knob it sets (but SEED, RUN_ID and where the data
        and logs are) is the logged value, and the launcher starts the logged number of processes. Returns the
        problems, the number of knobs compared, and whether a run command was found."""
        import make_submission as ms

        config = self.runs[0].log.config
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if ms.COMMAND_MARK in line]
        problems, compared = [], 0
        for n, line in lines:
            try:
                words = shlex.split(line)
            except ValueError as exc:
                problems.append(f"README.md line {n}: the run command cannot be read ({exc})")
                continue
            i = 0
            while i < len(words) and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[i]):
                key, _, value = words[i].partition("=")
                i += 1
                if key in ("SEED", "RUN_ID") or key in ms.LOCATION_KNOBS:
                    continue
                compared += 1
                logged = config.get(key.lower())
                if logged is None:
                    problems.append(f"README.md line {n}: run command sets {key}={value}, a knob the logs' config "
                                    f"does not have")
                elif not _knob_same(value, logged):
                    problems.append(f"README.md line {n}: run command sets {key}={value} where the logs ran "
                                    f"{key.lower()}: {logged}")
            launcher = " ".join(words[i:])
            procs = re.search(r"--nproc_per_node[= ](\d+)", launcher)
            ran = self.sub.get("world_size")
            said = int(procs.group(1)) if procs else (1 if launcher.startswith("python") else None)
            if said is not None and said != ran:
                problems.append(f"README.md line {n}: the run command starts {said} process(es) where the logs ran "
                                f"world_size {ran}")
        return problems, compared, bool(lines)

    def check_readme(self, checker: "Checker", text: str) -> None:
        """Every generated README line that is still there (found by its text with the numbers taken out) has the
        numbers and hashes the logs give; the headline and the results table must be there."""
        import make_submission as ms

        expected = [line for line in self.readme.splitlines()
                    if ms.COMMAND_MARK not in line and README_TOKEN_RE.search(line)]
        by_shape: dict[str, list[int]] = {}
        for i, line in enumerate(expected):
            by_shape.setdefault(README_TOKEN_RE.sub("#", line).strip(), []).append(i)
        problems, matched, numbers = [], set(), 0
        for n, line in enumerate(text.splitlines(), 1):
            if ms.COMMAND_MARK in line:
                continue
            candidates = by_shape.get(README_TOKEN_RE.sub("#", line).strip())
            if not candidates:
                continue
            found = README_TOKEN_RE.findall(line)

            def misses(i: int, found: list[str] = found) -> int:
                return sum(not _same_token(f, w) for f, w in zip(found, README_TOKEN_RE.findall(expected[i])))

            best = min(candidates, key=lambda i: (misses(i), i in matched))
            matched.add(best)
            numbers += len(found)
            for f, w in zip(found, README_TOKEN_RE.findall(expected[best])):
                if not _same_token(f, w):
                    problems.append(f"README.md line {n}: {f} where the logs give {w} ({_quote(line)})")
        command, knobs, has_command = self.command_problems(text)
        problems += command
        missing = [expected[i] for i in range(len(expected)) if i not in matched]
        claims = [line for line in missing if line.startswith(("**val_bpb", "|"))]
        if not matched:  # not make_submission.py's README: only its run command can be compared
            if command:
                checker.add("FAIL", "readme_matches_logs", "; ".join(command[:8]))
            else:
                checker.add("WARN", "readme_matches_logs", "README.md holds none of the lines make_submission.py "
                            "writes: its numbers are not compared with the logs")
            return
        if claims:
            problems += [f"README.md: the generated line {_quote(line)} is missing or reworded (the headline and the "
                         f"results table must stay as make_submission.py wrote them, with the logs' numbers)"
                         for line in claims]
        if problems:
            checker.add("FAIL", "readme_matches_logs", f"{len(problems)} difference(s): " + "; ".join(problems[:8])
                        + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
            return
        others = [line for line in missing if line not in claims]
        agree = (f"{numbers} numbers and hashes in {len(matched)} generated lines"
                 + (f" and {knobs} run-command knobs" if has_command else "") + " agree with the logs")
        notes = ([] if has_command else ["no run command (a `SEED=$s RUN_ID=...` line) found"])
        if others:
            notes.append("not found as generated (reworded or removed), so not compared: "
                         + "; ".join(_quote(line, 60) for line in others[:4])
                         + (f" (+{len(others) - 4} more)" if len(others) > 4 else ""))
        checker.add("WARN" if notes else "PASS", "readme_matches_logs", "; ".join([agree, *notes]))


def check_folder(folder: Path, name: str | None = None) -> list[Check]:
    """Every check on `folder`; `name` stands in for the folder's name (a folder still under a temporary name)."""
    return Checker(Path(folder), name).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="records/check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("folder", type=Path, help="record folder (records/<track>/<date>_<name>)")
    p.add_argument("--quiet", action="store_true", help="print only failures and warnings")
    args = p.parse_args(argv)
    results = check_folder(args.folder)
    for c in results:
        if not args.quiet or c.status != "PASS":
            print(c.line())
    n_fail = sum(c.status == "FAIL" for c in results)
    n_warn = sum(c.status == "WARN" for c in results)
    print(f"check: {args.folder}: {len(results) - n_fail - n_warn} passed, {n_warn} warnings, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
