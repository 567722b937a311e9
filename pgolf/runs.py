"""Claiming a run's outputs before any work: LOG_DIR/<RUN_ID>.txt, .json and .ptz.

LOG_DIR must exist (it is created), be writable and have room for the artifact and the logs; no other process
may hold the RUN_ID (LOG_DIR/<RUN_ID>.lock, a `pgolf.locks.Lock`); outputs that exist are refused unless
OVERWRITE=1, in which case the run writes <RUN_ID>.new.* and `publish` replaces the old files only once it
has finished, so a rerun that dies loses nothing. A failed run's log alone (its last line `error:`, no kept
weights beside it) does not block its RUN_ID: it is kept as <RUN_ID>.failed.txt (.failed2.txt, ...).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pgolf.locks import Held, Lock

RUN_OUTPUTS = (".txt", ".json", ".ptz")
OUTPUT_HEADROOM_BYTES = 64 << 20  # room a run needs in LOG_DIR beyond its artifact: log, JSON, temporary files
_HELD: dict[Path, Lock] = {}  # the locks this process holds (a RunFiles is pickled to the other ranks; a lock is not)


class Refused(ValueError):
    """One line naming the variable, the value and what is wrong (train_gpt.py raises it as a ConfigError)."""


@dataclass(frozen=True)
class RunFiles:
    """Where a run writes (`path`: now; `final`: once published) and its lock. `note`: what claiming did that
    the log must say."""
    log_dir: Path
    run_id: str
    staged: bool = False
    note: str = ""

    def path(self, suffix: str) -> Path:
        return self.log_dir / f"{self.run_id}{'.new' if self.staged else ''}{suffix}"

    def final(self, suffix: str) -> Path:
        return self.log_dir / f"{self.run_id}{suffix}"

    @property
    def lock(self) -> Path:
        return self.log_dir / f"{self.run_id}.lock"

    def publish(self) -> None:
        for suffix in RUN_OUTPUTS if self.staged else ():
            if self.path(suffix).exists():
                os.replace(self.path(suffix), self.final(suffix))

    def release(self) -> None:
        held = _HELD.pop(self.lock, None)
        if held is not None:
            held.release()


def claim(log_dir: Path, run_id: str, overwrite: bool, artifact_bytes: int) -> RunFiles:
    """The checks of the module docstring, in that order; raises Refused naming what is wrong."""
    check_log_dir(log_dir, run_id, OUTPUT_HEADROOM_BYTES + artifact_bytes)
    files = RunFiles(log_dir, run_id)
    existing = [p for p in map(files.final, RUN_OUTPUTS) if p.exists()]
    failed = existing == [files.final(".txt")] and failed_log(files)  # a rerun of a run that failed
    if existing and not (overwrite or failed):
        raise Refused(f"RUN_ID={run_id!r} is not allowed: {existing[0]} exists; choose another RUN_ID, or "
                      f"OVERWRITE=1 to replace it once this run has finished")
    lock = Lock(files.lock)
    try:
        lock.acquire(wait=False)
    except Held as exc:
        raise Refused(f"RUN_ID={run_id!r} is not allowed: another process ({exc.owner or '?'}) is writing it "
                      f"({files.lock}); choose another RUN_ID") from None
    _HELD[files.lock] = lock
    if failed:
        return RunFiles(log_dir, run_id, False, set_aside(files.final(".txt")))
    return RunFiles(log_dir, run_id, bool(existing))


def check_log_dir(log_dir: Path, run_id: str, need_bytes: int) -> None:
    """LOG_DIR exists (created), takes a file and has `need_bytes` free."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        probe = log_dir / f".{run_id}.probe{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise Refused(f"LOG_DIR={str(log_dir)!r} is not allowed: cannot write there ({exc.strerror or exc})") from None
    free = shutil.disk_usage(log_dir).free
    if free < need_bytes:
        raise Refused(f"LOG_DIR={str(log_dir)!r} is not allowed: {free:,} bytes free, a run needs {need_bytes:,}; "
                      f"an artifact of TARGET_BYTES plus logs: free space or choose another LOG_DIR")


def failed_log(files: RunFiles) -> bool:
    """The log of a run that stopped with an error (its last line), and left no kept weights to protect."""
    lines = files.final(".txt").read_text(errors="replace").rstrip().splitlines()
    return bool(lines) and lines[-1].startswith("error:") and not files.final(".weights.pt").exists()


def set_aside(log: Path) -> str:
    """Rename a failed run's log to <RUN_ID>.failed[N].txt, so a rerun loses nothing; says so."""
    n = 1
    while (aside := log.with_suffix(f".failed{n if n > 1 else ''}.txt")).exists():
        n += 1
    os.replace(log, aside)
    return f"{log} held the log of a run that failed; it is kept as {aside}"
