"""Seed statistics and significance against a baseline, in the challenge's unit.

Usage:
    python records/stats.py logs/myrun_s1337.json logs/myrun_s42.json logs/myrun_s2025.json
    python records/stats.py records/track_10min_16mb/<new folder> --baseline records/track_10min_16mb/<record>
    python records/stats.py 2.8012 2.8020 2.8005 --baseline 2.8101 2.8093 2.8110     # val_loss numbers, nats

Inputs (new runs and --baseline alike): run JSONs, logs (.txt/.log), record folders (their seed logs,
else their submission.json `seed_results`), a submission.json, or plain numbers (val_loss, nats/token).

Per seed it prints val_loss (nats per token) and val_bpb, where BPB = val_loss / ln 2 x tokens / bytes
with each run's own scored tokens and bytes; then the mean and the sample standard deviation (n - 1).

With --baseline it runs two one-sided Welch t-tests (H0: the improvement baseline_mean - new_mean is at
most the margin; t = (improvement - margin) / sqrt(s_new^2/n_new + s_old^2/n_old), Welch-Satterthwaite
degrees of freedom, p = P(T_df >= t)):

- challenge rule (README): improvement >= 0.005 nats at p < 0.01;
- frontier rule (leaderboard curation, PR #1902): improvement > 0 at p < 0.25.

The 0.005 margin is in nats per token (the challenge README's rule). Nats per token compare only
runs with the same tokens per byte (same tokenizer and validation text); when the two sides' ratios
differ, the test runs in BPB with the margin converted with the new runs' ratio
(0.005 x tokens/bytes / ln 2, e.g. 0.00194 BPB for sp8192) and says so. A baseline with one seed is
taken as a fixed value (one-sample t-test, df = n_new - 1). When both sides share seeds, a paired
t-test over the common seeds is printed as well (information, not the rule). With one new seed there is
no sample std, so the tests are reported as not computable (a record needs at least 3 seeds).

A run JSON whose log next to it belongs to another run (a re-run that died) is refused, naming both
files; given the log instead, that JSON is ignored with a warning (records/runlog.py).

The Student-t distribution is computed here (regularized incomplete beta), so scipy is not needed.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import runlog  # noqa: E402
from runlog import RecordError  # noqa: E402

LN2 = math.log(2)
CHALLENGE_MARGIN_NATS = 0.005  # README: a record beats the best by >= 0.005 nats ...
CHALLENGE_ALPHA = 0.01  # ... at p < 0.01
FRONTIER_MARGIN_NATS = 0.0  # leaderboard frontier (PR #1902): any improvement ...
FRONTIER_ALPHA = 0.25  # ... at p < 0.25
SAME_RATIO_RTOL = 1e-3  # tokens/bytes this close = the same tokenizer and validation text


# ---------------------------------------------------------------------------------------------
# Student t distribution
# ---------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, evaluated with the modified Lentz method."""
    floor = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > floor else floor)
    h = d
    for m in range(1, 1000):
        # Even step d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)), then odd step d_{2m+1}.
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > floor else floor)
            c = 1.0 + numerator / c
            c = c if abs(c) > floor else floor
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with `df` degrees of freedom (df may be fractional; inf = normal)."""
    if math.isnan(t) or not df > 0:
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T >= |t|)
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    return 1.0 - t_sf(t, df)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for one value)."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return m, sd


@dataclass
class TestResult:
    method: str  # welch / one-sample / paired
    mean_new: float
    mean_old: float
    improvement: float  # mean_old - mean_new (lower loss is better)
    margin: float
    se: float
    t: float
    df: float
    p: float  # one-sided: P(improvement this large | true improvement = margin)


def _result(method: str, mean_new: float, mean_old: float, margin: float, se: float, df: float) -> TestResult:
    improvement = mean_old - mean_new
    if se > 0:
        t = (improvement - margin) / se
        p = t_sf(t, df)
    else:  # no spread at all: the sign of the excess decides
        t = math.copysign(math.inf, improvement - margin) if improvement != margin else 0.0
        p = 0.0 if improvement > margin else 1.0
    return TestResult(method, mean_new, mean_old, improvement, margin, se, t, df, p)


def welch_from_stats(mean_new: float, sd_new: float, n_new: int, mean_old: float, sd_old: float, n_old: int,
                     margin: float = 0.0) -> TestResult:
    """One-sided Welch t-test of H0: mean_old - mean_new <= margin."""
    if n_new < 2:
        raise RecordError(f"a t-test needs at least 2 new seeds, got {n_new}")
    if n_old < 2:  # a single baseline value: a one-sample test against it
        se = sd_new / math.sqrt(n_new)
        return _result("one-sample", mean_new, mean_old, margin, se, n_new - 1)
    v_new, v_old = sd_new ** 2 / n_new, sd_old ** 2 / n_old
    se = math.sqrt(v_new + v_old)
    denom = v_new ** 2 / (n_new - 1) + v_old ** 2 / (n_old - 1)
    df = (v_new + v_old) ** 2 / denom if denom > 0 else math.inf
    return _result("welch", mean_new, mean_old, margin, se, df)


def welch(new: list[float], old: list[float], margin: float = 0.0) -> TestResult:
    m_new, s_new = mean_std(new)
    m_old, s_old = mean_std(old)
    return welch_from_stats(m_new, s_new, len(new), m_old, s_old if len(old) > 1 else 0.0, len(old), margin)


def paired(new: list[float], old: list[float], margin: float = 0.0) -> TestResult:
    """One-sided paired t-test over matched seeds, H0: mean(old - new) <= margin."""
    diffs = [o - n for n, o in zip(new, old)]
    if len(diffs) < 2:
        raise RecordError(f"a paired t-test needs at least 2 common seeds, got {len(diffs)}")
    m, sd = mean_std(diffs)
    res = _result("paired", sum(new) / len(new), sum(old) / len(old), margin, sd / math.sqrt(len(diffs)),
                  len(diffs) - 1)
    return res


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


@dataclass
class Score:
    """One seed's result; val_loss in nats per token, tokens_per_byte from the run's own counts."""
    seed: int | None
    val_loss: float | None
    val_bpb: float | None
    tokens_per_byte: float | None
    source: str


@dataclass
class Side:
    """The scores of one side (the new runs or the baseline), or only its summary (mean, sd, n)."""
    name: str
    scores: list[Score] = field(default_factory=list)
    summary: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # unit -> (mean, sd, n)
    summary_ratio: float | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. a stale JSON ignored next to a log

    def values(self, unit: str) -> list[float] | None:
        key = "val_loss" if unit == "nats" else "val_bpb"
        vals = [getattr(s, key) for s in self.scores]
        return vals if vals and all(v is not None for v in vals) else None

    def stats(self, unit: str) -> tuple[float, float, int] | None:
        vals = self.values(unit)
        if vals is not None:
            m, sd = mean_std(vals)
            return m, sd, len(vals)
        return self.summary.get(unit)

    @property
    def ratios(self) -> list[float]:
        if self.scores:
            return [s.tokens_per_byte for s in self.scores if s.tokens_per_byte]
        return [self.summary_ratio] if self.summary_ratio else []

    @property
    def n(self) -> int:
        return len(self.scores) or max((v[2] for v in self.summary.values()), default=0)


def score_of_run(run: runlog.Run) -> Score:
    loss, bpb_value = run.value("val_loss"), run.value("val_bpb")
    if loss is None or bpb_value is None:
        raise RecordError(f"{run.label}: no final val_loss/val_bpb (incomplete run?)")
    tb = run.tokens_bytes
    ratio = tb[0] / tb[1] if tb else float(bpb_value) * LN2 / float(loss)
    return Score(run.seed, float(loss), float(bpb_value), ratio, run.label)


def _score_from_entry(seed: Any, entry: dict[str, Any], source: str) -> Score:
    loss, bpb_value = entry.get("val_loss"), entry.get("val_bpb")
    if loss is None and bpb_value is None:
        raise RecordError(f"{source}: seed {seed} has neither val_loss nor val_bpb")
    ratio = float(bpb_value) * LN2 / float(loss) if loss and bpb_value else None
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        seed = None
    return Score(seed, None if loss is None else float(loss), None if bpb_value is None else float(bpb_value), ratio,
                 f"{source}:{seed}")


def side_from_submission(data: dict[str, Any], source: str) -> Side:
    side = Side(source)
    results = data.get("seed_results")
    if isinstance(results, dict) and results:
        side.scores = [_score_from_entry(seed, entry, source) for seed, entry in results.items()
                       if isinstance(entry, dict)]
    elif isinstance(results, list) and results:
        side.scores = [_score_from_entry(e.get("seed"), e, source) for e in results if isinstance(e, dict)]
    if side.scores:
        return side
    n = len(data.get("seeds") or []) or int(data.get("n_seeds") or 0)
    for unit, key in (("nats", "val_loss"), ("bpb", "val_bpb")):
        if isinstance(data.get(key), (int, float)):
            sd = data.get(f"{key}_std")
            side.summary[unit] = (float(data[key]), float(sd) if isinstance(sd, (int, float)) else math.nan,
                                  n if sd is not None else 1)
    if isinstance(data.get("val_loss"), (int, float)) and isinstance(data.get("val_bpb"), (int, float)):
        side.summary_ratio = float(data["val_bpb"]) * LN2 / float(data["val_loss"])
    if not side.summary:
        raise RecordError(f"{source}: no seed_results and no val_loss/val_bpb to compare with")
    return side


def _complete(run: runlog.Run) -> bool:
    return (run.metrics is not None and "val_loss" in run.metrics) or (run.log is not None and run.log.complete)


def load_side(items: list[str], name: str) -> Side:
    """A side from paths and/or numbers (see the module docstring)."""
    side = Side(name)
    numbers = []
    for item in items:
        try:
            numbers.append(float(item))
            continue
        except ValueError:
            pass
        path = Path(item)
        if path.is_dir():
            runs = []
            try:
                runs = [r for r in map(runlog.load_run, runlog.expand_inputs([path])) if _complete(r)]
            except RecordError:
                if not (path / "submission.json").is_file():
                    raise  # e.g. a stale JSON in a logs folder: say so, not "no complete run logs"
            side.warnings += [w for r in runs for w in r.warnings]
            if runs:
                side.scores.extend(score_of_run(r) for r in runs)
            elif (path / "submission.json").is_file():
                sub = side_from_submission(runlog.load_json(path / "submission.json"), str(path / "submission.json"))
                side.scores.extend(sub.scores)
                side.summary, side.summary_ratio = sub.summary, sub.summary_ratio
            else:
                raise RecordError(f"{path}: no complete run logs and no submission.json")
        elif path.suffix == ".json" and path.is_file():
            data = runlog.load_json(path)
            if runlog.is_run_json(data):
                side.scores.append(score_of_run(runlog.load_run(path)))
            elif isinstance(data, dict):
                sub = side_from_submission(data, str(path))
                side.scores.extend(sub.scores)
                side.summary, side.summary_ratio = sub.summary, sub.summary_ratio
            else:
                raise RecordError(f"{path}: expected a run JSON or a submission.json object")
        elif path.is_file():
            run = runlog.load_run(path)
            side.warnings += run.warnings
            if not _complete(run):
                raise RecordError(f"{path}: incomplete log (no final line)")
            side.scores.append(score_of_run(run))
        else:
            raise RecordError(f"{item}: not a number, file or folder")
    side.scores.sort(key=lambda s: (s.seed is None, s.seed if s.seed is not None else 0))
    side.scores.extend(Score(None, v, None, None, f"value {v}") for v in numbers)
    if side.scores and side.summary:
        raise RecordError(f"{name}: mixes per-seed scores with a summary-only submission.json; give one or the other")
    if not side.scores and not side.summary:
        raise RecordError(f"{name}: no scores")
    return side


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class Rule:
    name: str
    margin_nats: float
    alpha: float
    test: TestResult
    unit: str
    margin: float  # in `unit`

    @property
    def passed(self) -> bool:
        return self.test.p < self.alpha and self.test.improvement > self.margin

    def line(self) -> str:
        t = self.test
        u = "nats" if self.unit == "nats" else "BPB"
        df = "inf" if math.isinf(t.df) else f"{t.df:.2f}"
        return (f"{self.name}: improvement {t.improvement:+.5f} {u} (baseline {t.mean_old:.5f} - new {t.mean_new:.5f}) "
                f"vs margin {self.margin:.5f} {u}: {t.method} t={t.t:.3f} df={df} p={t.p:.4g} "
                f"-> {'PASS' if self.passed else 'FAIL'} (needs p < {self.alpha:g})")


@dataclass
class Comparison:
    unit: str
    note: str
    rules: list[Rule]
    paired: TestResult | None
    not_computable: str = ""  # why there are no tests (one new seed)

    def lines(self) -> list[str]:
        if self.not_computable:
            return [f"significance: not computable: {self.not_computable}"]
        out = [f"significance unit: {self.unit} ({self.note})"]
        out += ["  " + r.line() for r in self.rules]
        if self.paired is not None:
            p = self.paired
            out.append(f"  paired over common seeds (information): improvement {p.improvement:+.5f} "
                       f"t={p.t:.3f} df={p.df:.0f} p={p.p:.4g} (margin {self.rules[0].margin:.5f})")
        return out

    def as_dict(self) -> dict[str, Any]:
        if self.not_computable:
            return {"unit": self.unit, "note": self.note, "computable": False, "reason": self.not_computable}
        return {"unit": self.unit, "note": self.note,
                **{r.name: {"improvement": round(r.test.improvement, 8), "margin": round(r.margin, 8),
                            "t": _finite(r.test.t), "df": _finite(r.test.df), "p": _finite(r.test.p),
                            "alpha": r.alpha, "method": r.test.method, "passed": r.passed} for r in self.rules}}


def _finite(x: float) -> float | str:
    return round(x, 6) if math.isfinite(x) else str(x)


def compare(new: Side, old: Side, margins: tuple[tuple[str, float, float], ...] | None = None) -> Comparison:
    """Challenge and frontier rules for `new` against `old` (see the module docstring for the unit)."""
    margins = margins or (("challenge rule", CHALLENGE_MARGIN_NATS, CHALLENGE_ALPHA),
                          ("frontier rule", FRONTIER_MARGIN_NATS, FRONTIER_ALPHA))
    r_new, r_old = new.ratios, old.ratios
    ratio_new = sum(r_new) / len(r_new) if r_new else None
    ratio_old = sum(r_old) / len(r_old) if r_old else None
    both_nats = new.stats("nats") is not None and old.stats("nats") is not None
    both_bpb = new.stats("bpb") is not None and old.stats("bpb") is not None
    same = ratio_new is not None and ratio_old is not None and abs(ratio_new - ratio_old) <= SAME_RATIO_RTOL * ratio_new
    if both_nats and same:
        unit, scale, note = "nats", 1.0, f"same tokens/byte on both sides ({ratio_new:.5f}): nats per token compare"
    elif both_bpb and ratio_new is not None and (not both_nats or ratio_old is not None):
        unit, scale = "bpb", ratio_new / LN2
        why = (f"tokens/byte differ: new {ratio_new:.5f}, baseline {ratio_old:.5f}" if ratio_old is not None
               else "the baseline has no val_loss")
        note = f"{why}; nats per token do not compare, margins converted to BPB with the new runs' ratio"
    elif both_nats:
        unit, scale, note = "nats", 1.0, "tokens/byte unknown on one side: assuming the same tokenizer and val text"
    else:
        raise RecordError("the new runs and the baseline share no unit (need val_loss on both, or val_bpb on both "
                          "with the new runs' tokens/bytes)")
    m_new, s_new, n_new = new.stats(unit)
    m_old, s_old, n_old = old.stats(unit)
    if n_new < 2:
        return Comparison(unit, note, [], None, f"{n_new} new seed: a t-test needs at least 2 (one seed has no sample "
                                                f"std); a record needs at least 3")
    rules = []
    for name, margin_nats, alpha in margins:
        margin = margin_nats * scale
        test = welch_from_stats(m_new, s_new, n_new, m_old, s_old if n_old > 1 else 0.0, n_old, margin)
        rules.append(Rule(name, margin_nats, alpha, test, unit, margin))
    paired_result = None
    new_by_seed = {s.seed: s for s in new.scores if s.seed is not None}
    old_by_seed = {s.seed: s for s in old.scores if s.seed is not None}
    common = sorted(set(new_by_seed) & set(old_by_seed))
    key = "val_loss" if unit == "nats" else "val_bpb"
    if len(common) >= 2 and all(getattr(new_by_seed[c], key) is not None and getattr(old_by_seed[c], key) is not None
                                for c in common):
        paired_result = paired([getattr(new_by_seed[c], key) for c in common],
                               [getattr(old_by_seed[c], key) for c in common], rules[0].margin)
    return Comparison(unit, note, rules, paired_result)


def describe(side: Side) -> list[str]:
    """Per-seed table plus mean and sample std, in nats and BPB."""
    lines = []
    if side.scores:
        lines.append(f"{side.name}: {len(side.scores)} run(s)")
        lines.append(f"  {'seed':>6} {'val_loss (nats)':>16} {'val_bpb':>11} {'tokens/byte':>12}  source")
        for s in side.scores:
            lines.append(f"  {s.seed if s.seed is not None else '-':>6} {_fmt(s.val_loss, 8):>16} "
                         f"{_fmt(s.val_bpb, 8):>11} {_fmt(s.tokens_per_byte, 5):>12}  {s.source}")
    else:
        lines.append(f"{side.name}: summary only (no per-seed results)")
    for unit in ("nats", "bpb"):
        st = side.stats(unit)
        if st is not None:
            m, sd, n = st
            lines.append(f"  mean {'val_loss' if unit == 'nats' else 'val_bpb '} {m:.8f}  std {_fmt(sd, 8)}  (n={n})")
    return lines


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="records/stats.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("new", nargs="+", help="the new runs: .json/.txt/.log files, record folders, or val_loss numbers")
    p.add_argument("--baseline", nargs="+", metavar="B", help="the baseline, in the same forms")
    p.add_argument("--margin", type=float, default=CHALLENGE_MARGIN_NATS,
                   help=f"challenge-rule margin in nats per token (default {CHALLENGE_MARGIN_NATS})")
    p.add_argument("--alpha", type=float, default=CHALLENGE_ALPHA,
                   help=f"challenge-rule significance level (default {CHALLENGE_ALPHA})")
    args = p.parse_args(argv)
    try:
        new = load_side(args.new, "new")
        for w in new.warnings:
            print(f"warning: {w}", file=sys.stderr)
        for line in describe(new):
            print(line)
        if args.baseline:
            old = load_side(args.baseline, "baseline")
            for w in old.warnings:
                print(f"warning: {w}", file=sys.stderr)
            for line in describe(old):
                print(line)
            result = compare(new, old, (("challenge rule", args.margin, args.alpha),
                                        ("frontier rule", FRONTIER_MARGIN_NATS, FRONTIER_ALPHA)))
            for line in result.lines():
                print(line)
        return 0
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
