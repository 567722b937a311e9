"""Compare runs: configuration differences, metric deltas, and loss curves.

Usage:
    python records/compare.py logs/a.json logs/b.json                 # config diff + metrics, B - A
    python records/compare.py logs/a.json logs/b.json logs/c.txt      # deltas against the first run
    python records/compare.py logs/*.json --plot curves.png           # train loss and val BPB vs step and time

Runs are given as their JSON (logs/<RUN_ID>.json), their log (.txt, or a record folder's train_seed<S>.log),
or a folder (its run JSONs, else its logs). The configuration is the JSON's resolved `config` (else the
log's `config:` block); SEED, RUN_ID and LOG_DIR are shown but are not part of the config hash.

--plot draws four panels (train loss and val BPB against step and against training time) from the
JSON's `history` when it has one, else from the `step:` lines of the log next to it; the final score
of each run is marked at its last step. It needs matplotlib, an optional dependency
(pip install matplotlib).

A run JSON whose log next to it belongs to another run (a re-run that died or is still running, a
different run_id, seed, code, config or final score) is refused, naming both files; given the log
instead, that JSON is ignored with a warning and the log is read alone.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import runlog  # noqa: E402
from runlog import RecordError  # noqa: E402

# (label, getter) of the metrics table; each getter returns a number or None.
METRICS: list[tuple[str, Any]] = [
    ("val_loss (nats)", lambda r: r.value("val_loss")),
    ("val_bpb", lambda r: r.value("val_bpb")),
    ("pre-quant bpb", lambda r: (r.evaluation("pre_quant") or {}).get("val_bpb")),
    ("round-trip bpb", lambda r: (r.evaluation("roundtrip") or {}).get("val_bpb")),
    ("sliding bpb", lambda r: (r.evaluation("sliding") or {}).get("val_bpb")),
    ("ttt bpb", lambda r: (r.evaluation("ttt") or {}).get("val_bpb")),
    ("steps", lambda r: r.value("steps")),
    ("ms/step", lambda r: (r.value("train_time_ms") / r.value("steps")) if r.value("steps") else None),
    ("train_time_ms", lambda r: r.value("train_time_ms")),
    ("eval_time_ms", lambda r: r.value("eval_time_ms")),
    ("bytes_model", lambda r: r.value("bytes_model")),
    ("bytes_code", lambda r: r.value("bytes_code")),
    ("bytes_total", lambda r: r.value("bytes_total")),
]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 100:
        return f"{int(v):,}"
    return f"{v:.6f}" if abs(v) < 100 else f"{v:,.2f}"


def _delta(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return ""
    d = b - a
    if isinstance(a, int) and isinstance(b, int):
        return f"{d:+,}"
    rel = f" ({d / a:+.2%})" if a else ""
    return f"{d:+.6f}{rel}" if abs(d) < 100 else f"{d:+,.2f}{rel}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def report(runs: list[runlog.Run]) -> list[str]:
    names = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(runs))]
    out = ["runs:"]
    for name, r in zip(names, runs):
        h = (r.metrics or {}).get("config_hash") or (runlog.config_hash(r.config) if r.metrics else None)
        out.append(f"  {name} = {r.label} (run_id {r.run_id}, seed {r.seed}"
                   + (f", config {h[:12]}" if h else "") + ")")
    # A log's config block holds values as text, a JSON typed values: compare and show them as text.
    configs = [{k: str(v) for k, v in r.config.items()} for r in runs]
    everywhere = set.intersection(*(set(c) for c in configs))
    partial = sorted(set().union(*configs) - everywhere)
    diff = [k for k in sorted(everywhere) if len({c[k] for c in configs}) > 1]
    ignored = runlog.config_hash_ignored()
    real = [k for k in diff if k not in ignored]
    out.append(f"config differences ({len(real)} knob(s)" + (f"; plus {', '.join(k for k in diff if k in ignored)}, "
                                                             f"which the config hash ignores" if len(diff) > len(real)
                                                             else "") + "):")
    if diff:
        out += _table([["knob", *names]] + [[k + (" *" if k in ignored else ""), *[c[k] for c in configs]]
                                            for k in diff])
    else:
        out.append("  none")
    if partial:
        out.append(f"  not in every run's config (older script, or a log's config block): {', '.join(partial)}")
    head = ["metric", *names] + [f"{n} - A" for n in names[1:]]
    rows = [head]
    for label, get in METRICS:
        vals = []
        for r in runs:
            try:
                vals.append(get(r))
            except (TypeError, ZeroDivisionError):
                vals.append(None)
        if all(v is None for v in vals):
            continue
        rows.append([label, *[_fmt(v) for v in vals], *[_delta(vals[0], v) for v in vals[1:]]])
    out.append("metrics:")
    out += _table(rows)
    return out


def plot(runs: list[runlog.Run], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RecordError("--plot needs matplotlib, an optional dependency: pip install matplotlib") from exc
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    drawn = 0
    for i, r in enumerate(runs):
        train, val = r.history()
        label, color = r.run_id, f"C{i % 10}"
        if train:
            drawn += 1
            steps = [p["step"] for p in train]
            secs = [p["train_time_ms"] / 1000 for p in train]
            loss = [p["train_loss"] for p in train]
            axes[0][0].plot(steps, loss, label=label, color=color)
            axes[0][1].plot(secs, loss, label=label, color=color)
        vs = [p for p in val if p.get("val_bpb") is not None]
        if vs:
            drawn += 1
            axes[1][0].plot([p["step"] for p in vs], [p["val_bpb"] for p in vs], marker="o", label=label, color=color)
            axes[1][1].plot([p["train_time_ms"] / 1000 for p in vs], [p["val_bpb"] for p in vs], marker="o",
                            label=label, color=color)
        final, steps, t_ms = r.value("val_bpb"), r.value("steps"), r.value("train_time_ms")
        if isinstance(final, (int, float)) and math.isfinite(final) and steps:
            drawn += 1
            axes[1][0].scatter([steps], [final], marker="*", s=120, color=color, label=f"{label} final ({r.value('eval')})")
            if t_ms:
                axes[1][1].scatter([t_ms / 1000], [final], marker="*", s=120, color=color, label=f"{label} final")
    if not drawn:
        plt.close(fig)
        raise RecordError("nothing to plot: no history in the JSONs and no step lines in their logs")
    titles = [("train loss vs step", "step", "train loss (nats)"), ("train loss vs time", "training time (s)",
                                                                     "train loss (nats)"),
              ("val BPB vs step", "step", "val_bpb"), ("val BPB vs time", "training time (s)", "val_bpb")]
    for ax, (title, xl, yl) in zip([a for row in axes for a in row], titles):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="records/compare.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("runs", nargs="+", type=Path, help="run .json / .txt / .log files or folders")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="write loss/BPB curves to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        runs = [runlog.load_run(path) for path in runlog.expand_inputs(args.runs)]
        for w in (w for r in runs for w in r.warnings):
            print(f"warning: {w}", file=sys.stderr)
        for line in report(runs):
            print(line)
        if args.plot:
            plot(runs, args.plot)
            print(f"wrote {args.plot}")
        return 0
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
