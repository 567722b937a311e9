"""bench/ttt_cost.py, ours against PR #1855's phased LoRA TTT on the CPU: its main path on a tiny setting (20
short documents: 3 batches of 4 + 8 + 8, a partial batch first, two phases; one timed run per side), the
printed table's structure, and the two losses equal within the parity tolerance (every document's nats, and the
mean). Timing is printed, never asserted. Skipped, with the reason, where PR #1855's folder is absent.
Runtime: ~20 s on 2 shared CPU cores."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from conftest import ROOT
from top_harness import SKIP_WITHOUT_TOP

pytestmark = [SKIP_WITHOUT_TOP, pytest.mark.filterwarnings("ignore:CUDA is not available")]

spec = importlib.util.spec_from_file_location("bench_ttt_cost", ROOT / "bench" / "ttt_cost.py")
ttt_cost = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ttt_cost  # its dataclasses look their module up
spec.loader.exec_module(ttt_cost)

ROWS = ("val_loss (nats/token)", "val_bpb", "wall s, best of 1", "wall s, each run", "chunk steps (forwards) per run",
        "aten ops per chunk step: all (forward / backward / optimizer / other)",
        "aten ops per run (eager total; of which phase SGD)")


@pytest.fixture(scope="module")
def printed():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ttt_cost.main(["--docs", "20", "--max-len", "80", "--repeats", "1", "--ops", "5"]) == 0
    return out.getvalue().splitlines()


def cells(lines: list[str], row: str) -> list[str]:
    line = next(line for line in lines if line.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_the_table_has_every_row_and_the_ratio_last(printed):
    assert printed[0].startswith("# phased LoRA TTT, ours vs PR #1855, 20 documents")
    assert "| | ours (eval_ttt_lora) | top (PR #1855 eval_val_ttt_phased) |" in printed
    for row in ROWS:
        assert len(cells(printed, row)) == 2, row
    assert re.fullmatch(r"ttt ours/top wall: \d+\.\d{3}", printed[-1])
    ours, top = (float(c) for c in cells(printed, "wall s, best of 1"))
    assert float(printed[-1].split()[-1]) == pytest.approx(ours / top, abs=1e-3)
    assert any(line.startswith("| aten op, one chunk step | ours | top | ours - top |") for line in printed)


def test_both_losses_agree_within_the_parity_tolerance(printed):
    ours, top = (float(c) for c in cells(printed, "val_loss (nats/token)"))
    assert abs(ours - top) <= 1e-6  # the mean over 20 documents of per-document sums equal to 1e-4
    ours, top = (float(c) for c in cells(printed, "val_bpb"))
    assert abs(ours - top) <= 1e-6
    line = next(line for line in printed if line.startswith("per-document nats: max |ours - top|"))
    m = re.match(r"per-document nats: max \|ours - top\| (\S+) over (\d+) documents \(tolerance 1e-04: equal\)", line)
    assert m and float(m[1]) <= ttt_cost.NATS_ATOL and int(m[2]) == 20


def test_both_run_the_same_chunk_steps_and_every_part_of_a_step_is_counted(printed):
    ours, top = cells(printed, "chunk steps (forwards) per run")
    assert ours == top and int(ours) > 0
    for cell in cells(printed, "aten ops per chunk step: all (forward / backward / optimizer / other)"):
        total, parts = re.fullmatch(r"([\d,]+) \(([\d, /]+)\)", cell).groups()
        parts = [int(p.replace(",", "")) for p in parts.split(" / ")]
        assert sum(parts) == int(total.replace(",", "")) and all(p > 0 for p in parts)
    for cell in cells(printed, "aten ops per run (eager total; of which phase SGD)"):
        total, sgd = (int(v.replace(",", "")) for v in re.fullmatch(r"([\d,]+) \(([\d,]+)\)", cell).groups())
        assert 0 < sgd < total, "two phases ran on both sides"
