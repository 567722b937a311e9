"""Run faults and bad input: a score only for the data and tokenizer it claims, runs that never overwrite
each other, misspelt knobs caught, LOG_DIR checked before any work and nothing trained lost when the
artifact cannot be written, progress lines for any run length, and one-line failures (SIGINT, a corrupt
tokenizer, an out-of-range token named by its place in the file)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import tg
from pgolf.shards import write_shard
from pgolf import provenance, runs
from pgolf.locks import Held, Lock, exclusive
from test_run import base_env, error_lines, run_script, tiny_env


def copy_dataset(dataset: dict, dest) -> dict:
    out = dest / "shards"
    shutil.copytree(dataset["dir"], out)
    return {**dataset, "dir": out}


# ---------------------------------------------------------------------------------------------
# the data a score is for
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tokenizer_that_is_not_the_datas_is_refused(dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path)
    (data["dir"] / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": "ab" * 32}}))
    run = run_script(tmp_path, tiny_env(data, tmp_path, "mismatch"))
    assert run.rc == 2, run.describe()
    (line,) = error_lines(run)
    real = tg.sha256_file(data["tokenizer"])
    assert str(data["tokenizer"]) in line and real in line and "ab" * 32 in line and "manifest.json" in line, line
    assert not (tmp_path / "logs" / "mismatch.ptz").exists()


@pytest.mark.slow
def test_the_manifest_of_the_sample_and_of_tokenize_docs_name_their_tokenizer(dataset, tmp_path):
    assert provenance.manifest_tokenizer_sha256({"tokenizer": {"sha256": "x"}}) == "x"
    files = {"datasets/d/fineweb_val_000000.bin": {"sha256": "v"}, "tokenizers/t.model": {"sha256": "t"}}
    assert provenance.manifest_tokenizer_sha256({"files": files}) == "t"
    assert provenance.manifest_tokenizer_sha256({"files": {}}) is None
    data = copy_dataset(dataset, tmp_path)  # no manifest beside the shards: said in the log and the compliance block
    for name in provenance.DATASET_MANIFESTS:
        (data["dir"] / name).unlink(missing_ok=True)
    run = run_script(tmp_path, tiny_env(data, tmp_path, "nomanifest"))
    assert run.rc == 0, run.describe()
    log = "\n".join(run.log_lines)
    assert "WARNING: no manifest.json or download.json beside the shards" in log
    assert "compliance:dataset manifest_sha256:none val_sha256:" in log
    assert run.metrics["dataset"]["manifest"] is None and run.metrics["dataset"]["val_documents"] > 0


def test_reportable_only_for_the_challenge_split():
    raw = tg.CHALLENGE_VAL_TARGETS[8192] + 1 + 700  # the shards hold a little more than whole sequences
    assert tg.challenge_split(8192, raw, 50_000, 0) == (
        True, "the challenge's sp8192 validation split (50,000 documents, 40,540,160 targets)")
    ok, why = tg.challenge_split(8192, raw, 49_999, 0)
    assert not ok and why.startswith("not the challenge's validation split: 49,999 documents")
    ok, why = tg.challenge_split(1024, raw, 50_000, 0)
    assert not ok and "the sp1024 split has 50,000 and 62,021,632" in why
    assert tg.challenge_split(8192, raw, 50_000, 4096) == (False, "MAX_VAL_TOKENS=4096: a prefix of the validation split")
    assert not tg.challenge_split(2048, raw, 50_000, 0)[0]


@pytest.mark.slow
def test_a_run_on_other_data_says_not_reportable_and_why(dataset, tmp_path):
    run = run_script(tmp_path, tiny_env(dataset, tmp_path, "notchallenge"))
    assert run.rc == 0, run.describe()
    line = next(x for x in run.log_lines if x.startswith("compliance:reportable"))
    assert line.startswith("compliance:reportable value:NO how:not the challenge's validation split:"), line
    assert run.metrics["reportable"] is False and "not the challenge" in run.metrics["reportable_reason"]


# ---------------------------------------------------------------------------------------------
# one run, one set of files
# ---------------------------------------------------------------------------------------------


def test_default_run_ids_differ_between_processes_started_in_the_same_second():
    rid = tg.default_run_id("smoke")
    assert re.fullmatch(rf"smoke_\d{{8}}_\d{{6}}_\d{{6}}_{os.getpid()}", rid), rid


@pytest.mark.slow
def test_an_existing_run_id_is_refused_and_a_rerun_that_dies_keeps_the_old_files(dataset, tmp_path):
    first = run_script(tmp_path, tiny_env(dataset, tmp_path, "seed1"))
    assert first.rc == 0, first.describe()
    before = {s: first.path(s).read_bytes() for s in ("txt", "json", "ptz")}
    again = run_script(tmp_path, tiny_env(dataset, tmp_path, "seed1"))
    assert again.rc == 2 and "seed1.txt exists" in error_lines(again)[0] and "OVERWRITE=1" in error_lines(again)[0]
    # OVERWRITE=1, and the rerun dies (a bad knob found after the claim): the finished run's files are intact.
    bad = tiny_env(dataset, tmp_path, "seed1", OVERWRITE=1, TOKENIZER_PATH=str(tmp_path / "missing.model"))
    died = run_script(tmp_path, bad)
    assert died.rc == 2, died.describe()
    assert {s: first.path(s).read_bytes() for s in before} == before
    assert "missing.model" in (tmp_path / "logs" / "seed1.new.txt").read_text()
    # OVERWRITE=1 that finishes replaces all three, and no staging file or lock is left.
    rerun = run_script(tmp_path, tiny_env(dataset, tmp_path, "seed1", OVERWRITE=1, SEED=7))
    assert rerun.rc == 0, rerun.describe()
    assert rerun.metrics["config"]["SEED"] == 7 and rerun.log_lines[-1].startswith("final ")
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["seed1.json", "seed1.ptz", "seed1.txt"]


def test_a_run_id_another_live_process_holds_is_refused_and_a_left_lock_file_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "r.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runs.Refused, match=rf"^RUN_ID='r' is not allowed: another process \({holder.pid} "):
            runs.claim(tmp_path, "r", False, 0)
    finally:
        holder.kill()
        holder.wait()
    # Killed with -9, the holder left its lock file behind: the kernel let go of its lock, and the file is taken.
    assert (tmp_path / "r.lock").read_text().split()[0] == str(holder.pid)
    files = runs.claim(tmp_path, "r", False, 0)
    assert (tmp_path / "r.lock").read_text().split()[0] == str(os.getpid()) and not files.staged
    files.release()
    assert not (tmp_path / "r.lock").exists()


HOLD_LOCK = """
import sys, time
from pgolf.locks import Lock
Lock(sys.argv[1]).acquire(wait=False)
print("held", flush=True)
time.sleep(600)
"""


def test_the_lock_helper_waits_refuses_and_survives_a_deleted_file(tmp_path):
    first = Lock(tmp_path / "x.lock").acquire(wait=False)
    with pytest.raises(Held, match=rf"x.lock is held by {os.getpid()} "):
        Lock(tmp_path / "x.lock").acquire(wait=False)  # another open file: flock conflicts within one process too
    first.release()
    with exclusive(tmp_path / "x.lock"):
        assert (tmp_path / "x.lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / "x.lock").exists()


def test_a_shipped_copy_without_pgolf_refuses_existing_outputs(dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pgolf", None)  # `from pgolf import runs` raises ImportError, as beside a copy
    h = tg.Hyperparameters.from_env({"LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "r"})
    files = tg.claim_run_files(h)
    assert type(files) is tg.RunFiles and files.path(".txt") == tmp_path / "logs" / "r.txt"
    files.path(".txt").write_text("x")
    with pytest.raises(tg.ConfigError, match=r"^RUN_ID='r' is not allowed: .*r\.txt exists"):
        tg.claim_run_files(h)
    assert tg.claim_run_files(dataclasses.replace(h, overwrite=True)).path(".json") == tmp_path / "logs" / "r.json"
    # A LOG_DIR that cannot take the log is refused before any work, as the repository's pgolf/runs.py does.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(tg.ConfigError, match=rf"^LOG_DIR='{blocker / 'logs'}' is not allowed: cannot write there \("):
        tg.claim_run_files(dataclasses.replace(h, log_dir=str(blocker / "logs")))
    ro = tmp_path / "ro"
    ro.mkdir()
    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(type(ro), "touch", read_only)
    with pytest.raises(tg.ConfigError, match=r"is not allowed: cannot write there \(Read-only file system\)$"):
        tg.claim_run_files(dataclasses.replace(h, log_dir=str(ro), run_id="q"))


def test_a_shipped_copy_without_pgolf_refuses_eval_only_and_requantize_and_keeps_no_weights(tmp_path, monkeypatch,
                                                                                           capsys):
    """EVAL_ONLY, REQUANTIZE and keeping the trained weights are the repository's pgolf/recover.py: a copy
    without it refuses those knobs in one line before any work, and an output failure says nothing was kept."""
    monkeypatch.setitem(sys.modules, "pgolf", None)  # `from pgolf import recover` raises ImportError
    logs = tmp_path / "logs"
    weights = tmp_path / "r.weights.pt"
    for env, knob in (({"EVAL_ONLY": "1", "ARTIFACT": str(tmp_path / "r.ptz")}, "EVAL_ONLY=1"),
                      ({"REQUANTIZE": str(weights)}, f"REQUANTIZE={str(weights)!r}")):
        assert tg.main({**env, "LOG_DIR": str(logs), "RUN_ID": "r"}) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: {knob} is not allowed: it needs the repository's pgolf/ beside train_gpt.py; run the "
            f"repository's train_gpt.py, or copy pgolf/ beside this file"]
    assert not logs.exists(), "refused before any work"
    log = SimpleNamespace(failure=f"{logs / 'r.txt'}: could not write the log (No space left on device)")
    rc = SimpleNamespace(log=log, files=tg.RunFiles(logs, "r"))
    with pytest.raises(tg.OutputError) as info:
        tg.stop_on_output_failure(rc, None, lambda: tg.kept_weights(rc, None, None, 6))
    assert str(info.value) == f"{log.failure}; the trained weights were not kept (no pgolf/ beside train_gpt.py)"
    assert tg.kept_artifact(rc) == f"the artifact is kept in {logs / 'r.ptz'}"


# ---------------------------------------------------------------------------------------------
# misspelt knobs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, knob", [("SEEDS", "SEED"), ("SEEED", "SEED"), ("ITERATONS", "ITERATIONS"),
                                        ("COMPRESSER", "COMPRESSOR"), ("seed", "SEED"), ("numlayers", "NUM_LAYERS"),
                                        ("MUON_WDD", "MUON_WD")])
def test_misspelt_knobs_warn_and_fail_under_strict_env(name, knob):
    h = tg.Hyperparameters.from_env({name: "42"})
    assert h.env_warnings == (f"{name}='42' is not a knob of train_gpt.py and is ignored (did you mean {knob}?)",)
    with pytest.raises(tg.ConfigError, match=rf"^unknown knobs: {name}='42' \(did you mean {knob}\?\); STRICT_ENV=1 "
                                             r"refuses them"):
        tg.Hyperparameters.from_env({name: "42", "STRICT_ENV": "1"})


def test_system_variables_are_not_taken_for_knobs():
    env = {n: "x" for n in ("PATH", "HOME", "USER", "SHELL", "TERM", "LANG", "PWD", "HOSTNAME", "PYTHONPATH",
                            "CUDA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM", "HF_TOKEN", "VIRTUAL_ENV", "LOGNAME")}
    assert tg.Hyperparameters.from_env(env).env_warnings == ()


@pytest.mark.slow
def test_typo_warnings_come_before_the_config_block(dataset, tmp_path):
    run = run_script(tmp_path, tiny_env(dataset, tmp_path, "typo", SEEDS="42"))
    assert run.rc == 0, run.describe()
    warn = run.log_lines.index("WARNING: SEEDS='42' is not a knob of train_gpt.py and is ignored (did you mean SEED?)")
    assert warn < run.log_lines.index("config:")


# ---------------------------------------------------------------------------------------------
# LOG_DIR before any work; nothing trained is lost
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_unwritable_or_full_log_dir_is_refused_before_any_work(dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run = run_script(tmp_path, tiny_env(dataset, tmp_path, "x", LOG_DIR=str(blocker / "logs")))
    assert run.rc == 2 and error_lines(run)[0].startswith(f"error: LOG_DIR='{blocker / 'logs'}' is not allowed: "
                                                         f"cannot write there"), run.describe()
    assert "config:" not in run.stdout
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: usage._replace(free=1_000_000))
    with pytest.raises(runs.Refused, match=r"is not allowed: 1,000,000 bytes free, a run needs 83,108,864"):
        runs.claim(tmp_path / "logs", "x", False, 16_000_000)


@pytest.mark.slow
def no_space_for(suffix: str, monkeypatch):
    """Writes of files ending in `suffix` fail as on a full disk; returns the real writer."""
    real = tg.atomic_write_bytes

    def write(path, data):
        if str(path).endswith(suffix):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(tg, "atomic_write_bytes", write)
    return real


def test_an_artifact_that_cannot_be_written_keeps_the_weights_and_requantize_finishes_the_run(dataset, tmp_path,
                                                                                            monkeypatch, capsys):
    env = tiny_env(dataset, tmp_path, "full")
    real = no_space_for(".ptz", monkeypatch)
    threads = tg.torch.get_num_threads()
    tg.torch.set_num_threads(1)  # as the reference subprocess (OMP_NUM_THREADS=1): the same sums, bit for bit
    try:
        assert tg.main(env) == 4
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "could not write the artifact (No space left on device)" in err[0], err
        kept = tmp_path / "logs" / "full.weights.pt"
        assert f"the trained weights are kept in {kept}: REQUANTIZE={kept}" in err[0] and kept.is_file()
        monkeypatch.setattr(tg, "atomic_write_bytes", real)
        assert tg.main({**env, "RUN_ID": "full_requantized", "REQUANTIZE": str(kept)}) == 0
    finally:
        tg.torch.set_num_threads(threads)
    done = json.loads((tmp_path / "logs" / "full_requantized.json").read_text())
    reference = run_script(tmp_path, tiny_env(dataset, tmp_path, "reference"))
    assert reference.rc == 0, reference.describe()
    assert done["val_bpb"] == pytest.approx(reference.metrics["val_bpb"], rel=1e-9)
    assert done["bytes_model"] == reference.metrics["bytes_model"]
    with pytest.raises(tg.ConfigError, match="it was trained with other knobs"):
        tg.run(tg.Hyperparameters.from_env({**env, "RUN_ID": "wrong", "REQUANTIZE": str(kept), "MLP_MULT": "3"}))


# ---------------------------------------------------------------------------------------------
# progress for any run length
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_runs_log_the_first_the_last_and_enough_steps(dataset, tmp_path):
    run = run_script(tmp_path, tiny_env(dataset, tmp_path, "short", ITERATIONS=40, TRAIN_LOG_EVERY=50))
    assert run.rc == 0, run.describe()
    steps = [int(s["step"]) for s in run.steps()]
    assert steps[:2] == [1, 2] and steps[-1] == 40 and len(steps) >= tg.PROGRESS_POINTS
    assert len(run.metrics["history"]["train"]) == len(steps)


def test_progress_is_due_at_least_every_30_seconds():
    h = tg.Hyperparameters.from_env({"ITERATIONS": "100000", "TRAIN_LOG_EVERY": "0"})
    assert not tg.progress_due(h, 7, train_time=100.0, last_line_time=75.0, last_step=False)
    assert tg.progress_due(h, 7, train_time=105.0, last_line_time=75.0, last_step=False)
    assert tg.progress_due(h, 7, train_time=1.0, last_line_time=0.9, last_step=True)


# ---------------------------------------------------------------------------------------------
# one-line failures
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_ends_with_one_line_and_exit_130(dataset, tmp_path):
    env = tiny_env(dataset, tmp_path, "sigint", ITERATIONS=100_000)
    # As a shell starts a foreground job: SIGINT at its default. A non-interactive shell that starts pytest
    # in the background (`cmd &`) leaves SIGINT ignored, which children inherit, and Python then installs
    # no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, str(tg.Path(tg.__file__))], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # wait until it trains
        if line.startswith("step:2/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["error: interrupted (SIGINT); outputs written so far are kept, nothing was "
                                        "finished"]
    assert (tmp_path / "logs" / "sigint.txt").read_text().rstrip().endswith("error: interrupted (SIGINT)")
    assert not (tmp_path / "logs" / "sigint.lock").exists()


@pytest.mark.slow
def test_a_corrupt_tokenizer_is_one_line(dataset, tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(os.urandom(300))
    run = run_script(tmp_path, tiny_env(dataset, tmp_path, "badtok", TOKENIZER_PATH=str(bad)))
    assert run.rc == 2 and len(run.stderr.strip().splitlines()) == 1, run.describe()
    assert error_lines(run)[0].startswith(f"error: {bad}: not a readable SentencePiece model")


@pytest.mark.slow
def test_an_out_of_range_training_token_is_named_by_its_place_in_the_file(dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path)
    shard = sorted(data["dir"].glob("fineweb_train_*.bin"))[0]
    tokens = np.array(tg.load_shard(shard))
    tokens[1234] = 4000  # overlapping windows cover every token: the first batch that reads it stops the run
    write_shard(shard, tokens)
    (data["dir"] / "manifest.json").unlink(missing_ok=True)  # the sample's hashes would name the edited shard first
    for other in sorted(data["dir"].glob("fineweb_train_*.bin"))[1:]:
        other.unlink()
    run = run_script(tmp_path, tiny_env(data, tmp_path, "oor", ITERATIONS=500))
    assert run.rc != 0
    msg = run.stderr + run.stdout
    assert f"{shard}: token id 4000 at token 1234 of the file (byte {1024 + 2 * 1234}) is >= VOCAB_SIZE=1024" in msg, \
        run.describe()


# ---------------------------------------------------------------------------------------------
# The wallclock cap, deterministically: a fake clock instead of a loaded machine's
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wallclock_cap_stops_before_the_cap_with_a_fake_clock(dataset, tmp_path, monkeypatch):
    """Every perf_counter reading advances 50 ms: a step's time is fixed by the code, not the machine."""
    clock = {"t": 0.0}

    def tick() -> float:
        clock["t"] += 0.05
        return clock["t"]

    h = tg.Hyperparameters.from_env(tiny_env(dataset, tmp_path, "fake", ITERATIONS=100_000, MAX_WALLCLOCK_SECONDS=30))
    d = tg.DistInfo(0, 1, tg.torch.device("cpu"))
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    opt = tg.Optimizers(model, h)
    files = sorted(tg.Path(h.dataset_dir).glob("fineweb_train_*.bin"))
    lines: list[str] = []
    log = lines.append

    def make_loader():
        return tg.TrainLoader(files, h.train_seq_len, h.micro_batch_seqs, h.accum_steps, h.seed, h.vocab_size, d)

    monkeypatch.setattr(tg.time, "perf_counter", tick)
    result = tg.train(h, d, tg.Graphs.build(h, model), opt, make_loader, lambda: None, reserve=5.0, log=log)
    monkeypatch.undo()
    assert result.stopped_by == "wallclock" and 2 < result.steps < 100_000
    step_s = result.train_time_ms / 1000 / result.steps
    assert 25.0 - 2 * step_s <= result.train_time_ms / 1000 <= 25.0, (result.train_time_ms, step_s)
    stop = next(i for i, x in enumerate(lines) if x.startswith("stopping_early:wallclock_cap"))
    assert lines[stop - 1].startswith(f"step:{result.steps}/100000 ")  # the last step is logged, then the stop


# ---------------------------------------------------------------------------------------------
# Faults mid-run: a disk that fills, SIGTERM and SIGHUP, a killed rank, a failed run's RUN_ID
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    threads = tg.torch.get_num_threads()
    tg.torch.set_num_threads(1)
    yield
    tg.torch.set_num_threads(threads)


class FillingDisk:
    """A log file whose disk fills once training has logged its first step: every later write, flush and
    the close fail with ENOSPC, as on a full tmpfs."""

    def __init__(self, real):
        self.real, self.full = real, False

    def _check(self):
        if self.full:
            raise OSError(28, "No space left on device")

    def write(self, text):
        self._check()
        self.full = text.startswith("step:1/")
        return self.real.write(text)

    def flush(self):
        self._check()
        self.real.flush()

    def close(self):
        self.real.close()
        self._check()


@pytest.mark.slow
def test_a_log_that_cannot_be_written_mid_run_keeps_the_weights_and_exits_4(dataset, tmp_path, monkeypatch,
                                                                            capsys, one_thread):
    real_init = tg.Logger.__init__

    def filling(self, path, enabled=True):
        real_init(self, path, enabled)
        if self.file is not None:
            self.file = FillingDisk(self.file)

    monkeypatch.setattr(tg.Logger, "__init__", filling)
    assert tg.main(tiny_env(dataset, tmp_path, "fills")) == 4
    out, err = capsys.readouterr()
    logs = tmp_path / "logs"
    kept = logs / "fills.weights.pt"
    assert err.strip().splitlines() == [
        f"error: {logs / 'fills.txt'}: could not write the log (No space left on device); the trained weights are "
        f"kept in {kept}: REQUANTIZE={kept} with the same knobs (and another RUN_ID or LOG_DIR) quantizes, packs and "
        f"scores them"]
    assert "step:6/6 " in out and "pre_quant_val_loss:" in out  # training went on, on the console
    assert tg.torch.load(kept, weights_only=True)["steps"] == 6
    assert sorted(p.name for p in logs.iterdir()) == ["fills.txt", "fills.weights.pt"]  # no lock, no artifact
    assert (logs / "fills.txt").read_text().splitlines()[-1].startswith("step:1/")


@pytest.mark.slow
def test_metrics_that_cannot_be_written_exit_4_and_the_artifact_is_kept_and_rescored(dataset, tmp_path, monkeypatch,
                                                                                   capsys, one_thread):
    real = no_space_for(".json", monkeypatch)
    env = tiny_env(dataset, tmp_path, "nojson")
    assert tg.main(env) == 4
    logs = tmp_path / "logs"
    ptz = logs / "nojson.ptz"
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == (f"error: {logs / 'nojson.json'}: could not write the metrics (No space left on device); the "
                   f"artifact is kept in {ptz}: EVAL_ONLY=1 ARTIFACT={ptz} (and another RUN_ID or LOG_DIR) scores it "
                   f"again")
    assert sorted(p.name for p in logs.iterdir()) == ["nojson.ptz", "nojson.txt"]
    assert (logs / "nojson.txt").read_text().splitlines()[-1] == err
    monkeypatch.setattr(tg, "atomic_write_bytes", real)
    assert tg.main({**env, "RUN_ID": "nojson_rescored", "EVAL_ONLY": "1", "ARTIFACT": str(ptz)}) == 0


def test_a_logger_whose_file_fails_keeps_printing_and_never_raises(tmp_path, capsys):
    log = tg.Logger(tmp_path / "a.txt")
    log.file = FillingDisk(log.file)
    for line in ("config:", "step:1/9", "step:2/9", "step:3/9"):
        log(line)
    log.close()
    assert log.failure == f"{tmp_path / 'a.txt'}: could not write the log (No space left on device)"
    assert capsys.readouterr().out.splitlines()[-1] == "step:3/9"
    (tmp_path / "a_file").write_text("x")
    unwritable = tg.Logger(tmp_path / "a_file" / "b.txt")  # the folder is a file: opening fails
    assert unwritable.failure.startswith(f"{tmp_path / 'a_file' / 'b.txt'}: could not write the log")
    unwritable.close()


@pytest.mark.parametrize("signum, rc", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_release_the_lock_in_process_and_the_handlers_are_restored(
        dataset, tmp_path, monkeypatch, capsys, signum, rc):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def killed(*args):
        assert callable(signal.getsignal(signum)), "no handler: the signal would end pytest"
        try:
            os.kill(os.getpid(), signum)
        finally:
            os.kill(os.getpid(), signum)  # a second signal while the run unwinds is ignored
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(tg, "prepare_data", killed)
    assert tg.main(tiny_env(dataset, tmp_path, "term")) == rc
    name = signal.Signals(signum).name
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: terminated ({name}); outputs written so far are kept, nothing was finished"]
    assert (tmp_path / "logs" / "term.txt").read_text().splitlines()[-1] == f"error: terminated ({name})"
    assert not (tmp_path / "logs" / "term.lock").exists()
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_sigterm_ends_with_one_line_and_exit_143(dataset, tmp_path):
    env = tiny_env(dataset, tmp_path, "sigterm", ITERATIONS=100_000)
    proc = subprocess.Popen([sys.executable, str(tg.Path(tg.__file__))], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:  # wait until it trains
        if line.startswith("step:2/"):
            break
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines() == ["error: terminated (SIGTERM); outputs written so far are kept, nothing was "
                                        "finished"]
    assert (tmp_path / "logs" / "sigterm.txt").read_text().rstrip().endswith("error: terminated (SIGTERM)")
    assert not (tmp_path / "logs" / "sigterm.lock").exists()


def test_the_lock_of_a_process_that_died_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process (until the kernel reuses it, long after this test)
    (tmp_path / "r.lock").write_text(f"{dead.pid} {tg.platform.node()}\n")
    runs.claim(tmp_path, "r", False, 0).release()
    assert not (tmp_path / "r.lock").exists()


def worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers under `parent` (read from /proc: their RANK variable)."""
    found = {}
    for stat in tg.Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [v[5:] for v in environ if v.startswith(b"RANK=")]
        if ppid == parent and rank:
            found[int(rank[0])] = int(stat.parent.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_a_torchrun_rank_killed_with_sigkill_leaves_no_lock(dataset, tmp_path):
    env = tiny_env(dataset, tmp_path, "killed", ITERATIONS=100_000)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tg.Path(tg.__file__))], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        for line in proc.stdout:  # wait until it trains
            if line.startswith("step:2/"):
                break
        os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert not (tmp_path / "logs" / "killed.lock").exists(), err[-3000:]
    assert (tmp_path / "logs" / "killed.txt").read_text().splitlines()[-1].startswith("error: "), err[-3000:]


def test_a_failed_runs_log_does_not_block_its_run_id_and_is_kept(dataset, tmp_path):
    logs = tmp_path / "logs"
    env = tiny_env(dataset, tmp_path, "again", TOKENIZER_PATH=str(tmp_path / "missing.model"))
    assert tg.main(env) == 2  # fails after claiming its outputs: a log that ends in its error
    first = (logs / "again.txt").read_text()
    assert first.splitlines()[-1].startswith("error: ")
    assert tg.main(env) == 2  # the rerun is not refused; the first log is kept aside, and the new log says so
    assert (logs / "again.failed.txt").read_text() == first
    assert (logs / "again.txt").read_text().splitlines()[0] == (
        f"note: {logs / 'again.txt'} held the log of a run that failed; it is kept as {logs / 'again.failed.txt'}")
    files = runs.claim(logs, "again", False, 0)
    assert files.note.endswith(f"it is kept as {logs / 'again.failed2.txt'}") and not files.staged
    files.release()
    # What still blocks: a log that does not end in an error, a failed log beside kept weights, a JSON or artifact.
    for extra, last in ((None, "final val_loss:1.0"), ("again.weights.pt", "error: x"), ("again.ptz", "error: x")):
        (logs / "again.txt").write_text(f"config:\n{last}\n")
        if extra:
            (logs / extra).write_bytes(b"x")
        with pytest.raises(runs.Refused, match="is not allowed: .* exists"):
            runs.claim(logs, "again", False, 0)


@pytest.mark.slow
def test_sample_data_beside_a_copy_without_pgolf_is_one_line(tmp_path):
    """The sample builder writes shards and takes its lock through pgolf/: a copy with data/make_sample.py but no
    pgolf/ beside it is refused in one line, before any work."""
    (tmp_path / "data").mkdir()
    shutil.copy2(tg.Path(tg.__file__), tmp_path / "train_gpt.py")
    shutil.copy2(tg.Path(tg.__file__).parent / "data" / "make_sample.py", tmp_path / "data" / "make_sample.py")
    env = {**base_env(), "PRESET": "smoke", "LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "nopgolf"}
    run = run_script(tmp_path, env, script=tmp_path / "train_gpt.py")
    assert run.rc == 2, run.describe()
    assert error_lines(run) == [f"error: {tmp_path / 'pgolf'}: not found; SAMPLE_DATA=1 needs the repository's "
                                f"data/make_sample.py and pgolf/ beside train_gpt.py"], run.describe()


def test_sample_data_without_the_builder_is_one_line(tmp_path):
    """pgolf.sample beside a train_gpt.py with no data/make_sample.py: the same one-line DataError, naming the script."""
    from pgolf import sample

    fake = SimpleNamespace(__file__=str(tmp_path / "train_gpt.py"), DataError=tg.DataError, barrier=lambda: None)
    h = tg.Hyperparameters.from_env({"PRESET": "smoke", "DATA_DIR": str(tmp_path / "data")})
    with pytest.raises(tg.DataError) as exc:
        sample.ensure(fake, h, SimpleNamespace(is_main=True), print)
    assert str(exc.value) == (f"{tmp_path.resolve() / 'data' / 'make_sample.py'}: not found; SAMPLE_DATA=1 needs the "
                              "repository's data/make_sample.py and pgolf/ beside train_gpt.py")
