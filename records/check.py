"""Validate a record folder (ours or anyone's) before opening the pull request.

Usage:
    python records/check.py records/track_10min_16mb/2026-05-01_MyRun
    python records/check.py FOLDER --quiet          # only failures and warnings

Prints one line per check, `PASS`, `WARN` or `FAIL`, then a summary; exits 1 when any check fails.

Checks (pitfalls.md F-H, N, P; techniques.md 12-14):
- files: train_gpt.py, submission.json, README.md, one log per seed (train_seed<S>.log), requirements.txt;
- the script compiles; a packed (self-extracting) script is unpacked and its payload compiles too;
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
- per-seed results, means and sample std in submission.json agree with the logs; BPB agrees with
  val_loss / ln 2 x tokens / bytes of each log's own counts;
- at least 3 seeds, 8xH100 hardware, the README lists every seed (warnings).

Logs not written by this repository's train_gpt.py (no `config:` block, no `final` line) cannot be
cross-checked; those checks are reported as warnings, the rest still run.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import pack  # noqa: E402
import runlog  # noqa: E402
from runlog import RecordError  # noqa: E402

LN2 = math.log(2)
REQUIRED_FIELDS = ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code")
RECOMMENDED_FIELDS = ("track", "val_bpb_std", "seeds", "seed_results", "hardware", "pytorch_version")
TRACKS = ("10min_16mb", "non_record_16mb")
FOLDER_RE = re.compile(r"(?P<date>\d{4}-\d{2}-\d{2})_(?P<name>[A-Za-z0-9][A-Za-z0-9._+-]*)")
PLACEHOLDER = "TODO"
MIN_SEEDS = 3


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
            if script.payload is not None:
                compile(script.payload, f"{path} (payload)", "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            self.add("FAIL", "script_compiles", f"{path.name}: {exc}")
            return script
        what = (f"packed ({script.codec}): {len(script.data):,} bytes, payload {len(script.payload):,} bytes "
                f"sha256 {script.payload_sha256[:12]}" if script.payload is not None
                else f"{len(script.data):,} bytes, sha256 {script.sha256[:12]}")
        self.add("PASS", "script_compiles", what)
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
            self.check_claims(runs, sub, code_size)
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

    def check_claims(self, runs: list[runlog.LogInfo], sub: dict[str, Any], code_size: int | None) -> None:
        """submission.json numbers against the logs."""
        problems = []
        seeds = sorted(lg.seed for lg in runs if lg.seed is not None)
        claimed_seeds = sub.get("seeds")
        if claimed_seeds is not None and sorted(int(s) for s in claimed_seeds) != seeds:
            problems.append(f"seeds {claimed_seeds} vs logs {seeds}")
        results = sub.get("seed_results")
        if isinstance(results, dict):
            if sorted(int(k) for k in results) != seeds:
                problems.append(f"seed_results for {sorted(results)} vs logs {seeds}")
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
        self.ok(not problems, "claims_match_logs", "seeds, per-seed results, means, std and bytes agree with the logs",
                "; ".join(problems[:8]))


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
