"""The knob table of docs/knobs.md, generated from train_gpt.py's `Hyperparameters` dataclass.

    python records/knob_table.py                    # print the table
    python records/knob_table.py --write            # replace the table between the markers of docs/knobs.md
    python records/knob_table.py --write FILE.md    # ... of another file

It lives here, not in train_gpt.py, because only the docs need it and every byte of the script ships.
tests/test_static.py keeps docs/knobs.md equal to `knob_table_markdown()`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

START, END = "<!-- knobs:start -->", "<!-- knobs:end -->"
DEFAULT_TARGET = ROOT / "docs" / "knobs.md"
COLUMNS = ("record", "baseline", "smoke")  # the presets the table shows, default first


def format_default(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if value == "":
        return '""'
    return f"`{value}`"


def knob_table_markdown() -> str:
    """One row per knob: its value in each preset of COLUMNS and its help text."""
    rows = ["| Variable | record (default) | baseline | smoke | Meaning |", "|---|---|---|---|---|"]
    resolved = [tg.Hyperparameters.from_env({"PRESET": preset}).knob_values() for preset in COLUMNS]
    for f in tg.Hyperparameters.knob_fields():
        cells = [format_default(values[f.name.upper()]) for values in resolved]
        rows.append(f"| `{f.name.upper()}` | {' | '.join(cells)} | {f.metadata['help'].replace('|', '/')} |")
    return "\n".join(rows)


def replace_table(text: str, table: str, name: str = "docs/knobs.md") -> str:
    """`text` with everything between START and END replaced by `table`."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"error: {name}: needs exactly one {START} followed by one {END}")
    head, rest = text.split(START)
    return f"{head}{START}\n{table}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", type=Path, nargs="?", const=DEFAULT_TARGET, metavar="FILE",
                   help="rewrite the table between the markers of FILE (default docs/knobs.md) instead of printing it")
    args = p.parse_args(argv)
    table = knob_table_markdown()
    if args.write is None:
        print(table)
        return 0
    if not args.write.is_file():
        raise SystemExit(f"error: {args.write}: no such file")
    text = replace_table(args.write.read_text(encoding="utf-8"), table, str(args.write))
    fd, tmp = tempfile.mkstemp(dir=args.write.parent, prefix=f".{args.write.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, args.write)
    print(f"{args.write}: knob table rewritten ({len(table.splitlines()) - 2} knobs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
