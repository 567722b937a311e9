"""Records tooling: pack.py, make_submission.py, check.py, stats.py, compare.py (records/).

Run:
    python -m pytest -q tests/test_records.py --durations=5
    python -m pytest -q -m "not slow" tests/test_records.py      # no training runs (~15 s)

The slow tests share one tiny 3-seed sweep (test_run.TINY, seeds 1337/42/2025, ~10 s a run on a
2-core CPU) of a snapshot of train_gpt.py, so an edit to the script during the session cannot make
the logs stale. Those runs score a few test documents, not the challenge's validation split, so they
are not reportable: the folders are built with --non-record (under track_non_record_16mb/), and the
record track's refusals are tested on their own. Refusal and validator cases are copies of those
outputs with one thing changed.
Two more runs execute packed scripts (Brotli + minified, and the LZMA file a built folder ships, run
with the README's own command from inside that folder, which sits at records/<track>/<folder>/ of a
stand-in checkout with the data in its data/). matplotlib and scipy are optional: the tests that need them skip.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import lzma
import math
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tg
from test_run import RUN_TIMEOUT_S, base_env, run_script, tiny_env
from test_run import Run as ScriptRun

RECORDS = ROOT / "records"
if str(RECORDS) not in sys.path:
    sys.path.insert(0, str(RECORDS))

import check  # noqa: E402
import compare  # noqa: E402
import make_submission  # noqa: E402
import pack  # noqa: E402
import runlog  # noqa: E402
import stats  # noqa: E402

SEEDS = (1337, 42, 2025)
NON_RECORD = "track_non_record_16mb"  # where the builder puts the sweep's (not reportable) folders
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# The sweep (module scope: three tiny runs, paid for once)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(dataset, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    script = root / "src" / "train_gpt.py"
    script.parent.mkdir()
    shutil.copyfile(ROOT / "train_gpt.py", script)
    runs = {}
    for seed in SEEDS:
        run = run_script(root, tiny_env(dataset, root, f"tiny_s{seed}", SEED=seed), script=script)
        assert run.rc == 0, run.describe()
        runs[seed] = run
    logs = root / "logs"
    return {"root": root, "script": script, "logs": logs, "runs": runs, "dataset": dataset,
            "jsons": [logs / f"tiny_s{s}.json" for s in SEEDS]}


def build(sweep: dict, out: Path, *extra: str, logs: list[Path] | None = None, name: str = "TinyRun") -> int:
    """make_submission on the sweep, as a non-record submission (the sweep is not reportable)."""
    return make_submission.main(["--name", name, "--logs", *map(str, logs or sweep["jsons"]),
                                 "--script", str(sweep["script"]), "--out", str(out), "--author", "Test Author",
                                 "--github-id", "tester", "--blurb", "A tiny CPU sweep.", "--date", "2026-05-01",
                                 "--non-record", *extra])


@pytest.fixture(scope="module")
def packed_folder(sweep, tmp_path_factory) -> Path:
    """The sweep's packed folder where a pull request puts it: records/<track>/<folder>/ of a checkout."""
    checkout = tmp_path_factory.mktemp("checkout")
    assert build(sweep, checkout / "records", "--pack") == 0
    return checkout / "records" / NON_RECORD / "2026-05-01_TinyRun"


def copy_logs(sweep: dict, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sweep["jsons"]:
        for ext in (".json", ".txt"):
            shutil.copyfile(src.with_suffix(ext), dest / src.with_suffix(ext).name)
        out.append(dest / src.name)
    return out


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "config":
            data["config"].update(value)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def edit_log(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def edit_final_line(path: Path, **changes) -> None:
    lines = path.read_text().splitlines()
    fields = lines[-1].split(" ")
    for i, f in enumerate(fields):
        key = f.split(":", 1)[0]
        if key in changes:
            fields[i] = f"{key}:{changes[key]}"
    lines[-1] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# pack.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pack_round_trip_is_exact_for_train_gpt(tmp_path):
    src = (ROOT / "train_gpt.py").read_bytes()
    sizes = {}
    for codec in pack.CODECS:
        packed = pack.pack(src, codec)
        payload, got_codec = pack.unpack(packed)
        assert payload == src and got_codec == codec, "without --minify the payload is the source byte for byte"
        compile(packed, "packed", "exec")
        sizes[codec] = len(packed)
        mini = pack.pack(src, codec, do_minify=True)
        mini_payload = pack.unpack(mini)[0]
        assert ast.dump(ast.parse(mini_payload)) == ast.dump(ast.parse(src))
        assert len(mini) < len(packed) < len(src) / 2
    # CLI: writes a verified file and says what it counts.
    out = tmp_path / "packed.py"
    assert pack.main([str(ROOT / "train_gpt.py"), "-o", str(out), "--codec", "brotli", "--mode", "plain"]) == 0
    assert pack.unpack(out.read_bytes()) == (src, "brotli")
    assert pack.main(["--unpack", str(out), "-o", str(tmp_path / "back.py")]) == 0
    assert (tmp_path / "back.py").read_bytes() == src
    assert pack.main([str(out)]) == 2, "packing a packed file is refused"


@pytest.mark.slow
def test_pack_sizes_cli_prints_every_variant(capsys):
    assert pack.main([]) == 0
    out = capsys.readouterr().out
    for variant in ("raw", "lzma+base85", "lzma+base85, minified", "brotli+base85", "brotli+base85, minified"):
        assert f"  {variant} " in out, variant


TRICKY = '''#!/usr/bin/env python
"""Doc # not a comment
   with trailing spaces   
"""
import os  # comment
x = [1,  # one
     2,
     # a comment line inside brackets

     3]
s = """a
    # kept, inside a string
b  """
t = 'a' \\
    'b'


class A:
    """Class doc."""

    def f(self, y=f"{1 + 1} # no"):
        if y:  # branch
            return {"k": (y,
                          y)}
        return None


def g():
    return "line \\
continued"
'''


def test_minify_keeps_the_syntax_tree_and_string_values():
    mini = pack.minify(TRICKY.encode())
    assert ast.dump(ast.parse(mini)) == ast.dump(ast.parse(TRICKY))
    text = mini.decode()
    assert "# comment" not in text and "# branch" not in text and "# one" not in text
    assert "    # kept, inside a string" in text, "multi-line strings are left alone"
    assert "\n\n" not in text and "\n  def" not in text, "no blank lines, one space per level"
    a, b = {}, {}
    exec(compile(TRICKY, "t", "exec"), a)
    exec(compile(mini, "m", "exec"), b)
    assert (a["s"], a["t"], a["g"](), a["A"].f.__defaults__, a["__doc__"]) == \
           (b["s"], b["t"], b["g"](), b["A"].f.__defaults__, b["__doc__"])


def test_verify_rejects_a_payload_that_differs_and_unpack_knows_public_wrappers():
    src = b"print('hi')\n"
    packed = pack.pack(src)
    with pytest.raises(pack.PackError, match="differs from the source"):
        pack.verify(packed, b"print('bye')\n")
    with pytest.raises(pack.PackError, match="does not compile"):
        pack.pack(b"def (:\n")
    # PR #1394 style: exec(L.decompress(...)) without compile(); an .xz container variant too.
    raw = base64.b85encode(lzma.compress(src, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])).decode()
    public = f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{raw}"),format=L.FORMAT_RAW,' \
             f'filters=[{{"id":L.FILTER_LZMA2}}]))\n'
    assert pack.unpack(public.encode()) == (src, "lzma")
    xz = base64.b85encode(lzma.compress(src)).decode()
    assert pack.unpack(f'import lzma,base64\nexec(lzma.decompress(base64.b85decode("{xz}")))\n'.encode())[0] == src
    assert pack.unpack((ROOT / "train_gpt.py").read_bytes()) is None, "a readable script is not a wrapper"


@pytest.mark.slow
def test_packed_minified_brotli_script_runs_the_same_steps(sweep, tmp_path):
    packed = tmp_path / "pk" / "train_gpt.py"
    packed.parent.mkdir()
    packed.write_bytes(pack.pack(sweep["script"].read_bytes(), "brotli", do_minify=True))
    run = run_script(tmp_path, tiny_env(sweep["dataset"], tmp_path, "packed", SEED=1337), script=packed)
    assert run.rc == 0, run.describe()
    raw = sweep["runs"][1337]
    assert [s["loss"] for s in run.steps()] == [s["loss"] for s in raw.steps()]
    assert run.final["val_loss"] == raw.final["val_loss"] and run.final["val_bpb"] == raw.final["val_bpb"]
    assert int(run.final["bytes_code"]) == packed.stat().st_size, "bytes_code counts the packed file that ran"
    assert run.metrics["code_sha256"] == sha(packed.read_bytes())


# ---------------------------------------------------------------------------------------------
# make_submission.py: a valid folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_builder_writes_a_consistent_packed_folder(sweep, packed_folder, capsys):
    folder = packed_folder
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                     *sorted(f"train_seed{s}.log" for s in SEEDS)]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "no temporary folder left behind"
    raw = sweep["script"].read_bytes()
    shipped = (folder / "train_gpt.py").read_bytes()
    assert pack.unpack(shipped) == (raw, "lzma")
    sub = json.loads((folder / "submission.json").read_text())
    metrics = {s: sweep["runs"][s].metrics for s in SEEDS}
    assert sub["seeds"] == sorted(SEEDS) and sorted(map(int, sub["seed_results"])) == sorted(SEEDS)
    assert sub["bytes_code"] == len(shipped) < len(raw)
    assert sub["code_source_sha256"] == sha(raw) == metrics[1337]["code_sha256"]
    assert sub["code_sha256"] == sha(shipped) and sub["code_packed"] is True
    for s in SEEDS:
        row, m = sub["seed_results"][str(s)], metrics[s]
        assert row["val_loss"] == m["val_loss"] and row["val_bpb"] == m["val_bpb"] and row["steps"] == m["steps"]
        assert row["bytes_total"] == m["bytes_model"] + len(shipped) and row["bytes_code_as_run"] == len(raw)
        assert row["pre_quant_val_bpb"] == m["pre_quant"]["val_bpb"]
        assert (folder / f"train_seed{s}.log").read_bytes() == sweep["logs"].joinpath(f"tiny_s{s}.txt").read_bytes()
    losses = [metrics[s]["val_loss"] for s in SEEDS]
    bpbs = [metrics[s]["val_bpb"] for s in SEEDS]
    assert sub["val_loss"] == pytest.approx(statistics.mean(losses), abs=1e-8)
    assert sub["val_bpb"] == pytest.approx(statistics.mean(bpbs), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(bpbs), abs=1e-8)
    assert sub["bytes_total"] == max(m["bytes_model"] for m in metrics.values()) + len(shipped)
    for key in ("author", "github_id", "name", "blurb", "date", "track", "hardware", "pytorch_version"):
        assert sub[key], key
    assert sub["date"] == "2026-05-01" and sub["track"] == "non_record_16mb" and sub["pytorch_version"] == tg.torch.__version__
    assert sub["config_hash"] == tg.config_hash(metrics[42]["config"])
    c = sub["compliance"]
    assert c["train_under_600s"] and c["eval_under_600s"] and c["artifact_under_16mb"] and c["three_seeds"]
    assert c["reportable"] is False and c["reportable_reason"] == metrics[1337]["reportable_reason"]
    assert c["reportable_reason"].startswith("not the challenge's validation split")
    data = metrics[1337]["dataset"]
    assert sub["dataset"]["val_sha256"] == data["val_sha256"] and sub["dataset"]["tokenizer_sha256"] == data["tokenizer_sha256"]
    assert "tokenizer" not in sub["dataset"] and "manifest" not in sub["dataset"], "local paths are not shipped"
    readme = (folder / "README.md").read_text()
    for s in SEEDS:
        row = sub["seed_results"][str(s)]
        assert f"| {s} | {row['steps']} | {row['step_avg_ms']:.2f} | {row['pre_quant_val_bpb']:.4f} |" in readme
        assert f"{row['bytes_total']:,} |" in readme
    assert "for s in 42 1337 2025; do" in readme and "SEED=$s RUN_ID=TinyRun_s$s" in readme
    assert "reproduce the logged configuration" in readme, "the printed knobs were verified against the config"
    assert "## Compliance" in readme and "payload's sha256 is the logs' `code_sha256`" in readme
    assert "torch==" in (folder / "requirements.txt").read_text()
    # The validator agrees, in-process and as the CLI.
    results = check.check_folder(folder)
    assert not [c for c in results if c.status == "FAIL"], [c.line() for c in results]
    assert {c.name for c in results if c.status == "WARN"} == {"reportable"}, "a non-record folder: only that"
    capsys.readouterr()
    assert check.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out
    identity = next(line for line in out.splitlines() if line.startswith("PASS  data_identity:"))
    assert f"val sha256 {data['val_sha256']}" in identity and f"tokenizer sha256 {data['tokenizer_sha256']}" in identity
    assert "3 log(s): not reportable (not the challenge's validation split" in identity


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


@pytest.mark.slow
def test_readme_run_command_runs_from_the_folder_and_writes_nothing_into_it(sweep, packed_folder, tmp_path):
    """The README's command, as written, from the folder where the pull request puts it, with the data where the
    challenge repository keeps it (data/datasets/, data/tokenizers/ of the checkout): the packed script trains
    the same steps to the same loss, its logs go to the checkout's logs/, and the folder is left as it was."""
    checkout = packed_folder.parents[2]
    data = sweep["dataset"]
    (checkout / "data" / "datasets").mkdir(parents=True, exist_ok=True)
    (checkout / "data" / "tokenizers").mkdir(parents=True, exist_ok=True)
    for link, target in ((checkout / "data" / "datasets" / data["dir"].name, data["dir"]),
                         (checkout / "data" / "tokenizers" / data["tokenizer"].name, data["tokenizer"])):
        if not link.exists():
            link.symlink_to(target)
    readme = (packed_folder / "README.md").read_text()
    command = [line for line in readme.splitlines() if line.lstrip().startswith("SEED=$s RUN_ID=")]
    assert len(command) == 1, readme
    assert "SAMPLE_DATA" not in command[0] and f"DATA_PATH=../../../data/datasets/{data['dir'].name}" in command[0]
    assert "LOG_DIR=../../../logs" in command[0] and "`LOG_DIR=../../../logs`" in readme
    bin_dir = tmp_path / "bin"  # `python` on PATH runs this interpreter (its virtual environment included)
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (bin_dir / "python").chmod(0o755)
    env = {**base_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    before = snapshot(packed_folder)
    proc = subprocess.run(["bash", "-c", f"s=1337; {command[0]}"], cwd=packed_folder, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(packed_folder) == before, "running the README's command writes nothing into the folder"
    run = ScriptRun(packed_folder, {"LOG_DIR": str(checkout / "logs"), "RUN_ID": "TinyRun_s1337"}, proc.returncode,
                    proc.stdout, proc.stderr, 0.0, b"")
    raw = sweep["runs"][1337]
    assert [s["loss"] for s in run.steps()] == [s["loss"] for s in raw.steps()]
    assert run.final["val_loss"] == raw.final["val_loss"]
    sub = json.loads((packed_folder / "submission.json").read_text())
    assert int(run.final["bytes_code"]) == sub["bytes_code"] == (packed_folder / "train_gpt.py").stat().st_size


def test_run_command_reads_the_sample_data_by_path():
    """Runs on the embedded sample (PRESET=smoke turns SAMPLE_DATA on): the command names the sample's files in
    the checkout's data/ and turns SAMPLE_DATA off, which would build the sample with a data/make_sample.py next
    to the folder's train_gpt.py (there is none)."""
    config = json.loads(json.dumps(tg.Hyperparameters.from_env({"PRESET": "smoke", "ITERATIONS": "40"}).knob_values(),
                                   default=str))
    log = runlog.parse_log("dataset:data/datasets/sample_sp1024 manifest:none\nconfig:\n"
                           "  dataset_tokenizer: data/tokenizers/sample_1024_bpe.model\n")
    run = runlog.Run("smoke_s1", metrics={"config": config}, log=log)
    cmd = make_submission.run_command([run], tg)
    assert cmd.place == make_submission.DataPlace("sample_sp1024", "sample_1024_bpe.model", True)
    assert cmd.env[:4] == ["DATA_PATH=../../../data/datasets/sample_sp1024",
                           "TOKENIZER_PATH=../../../data/tokenizers/sample_1024_bpe.model", "SAMPLE_DATA=0",
                           "LOG_DIR=../../../logs"]
    assert "PRESET=smoke" in cmd.env and "ITERATIONS=40" in cmd.env and cmd.verified
    again = tg.Hyperparameters.from_env(dict(kv.split("=", 1) for kv in cmd.env))
    assert not again.sample_data and str(again.dataset_dir) == "../../../data/datasets/sample_sp1024"
    sub = {"dataset": {"val_sha256": "ab" * 32, "tokenizer_sha256": "cd" * 32}, "world_size": 1, "seeds": [1],
           "name": "Smoke"}
    text = "\n".join(make_submission.run_command_text(sub, "records/track_non_record_16mb/2026-05-01_Smoke", cmd))
    assert "python data/make_sample.py --vocab-size 1024" in text and "embedded sample" in text
    # The same sample read through DATA_PATH with SAMPLE_DATA=0 (a shipped copy's run) is still the sample.
    by_path = {**config, "SAMPLE_DATA": False, "DATA_PATH": "/data/datasets/sample_sp1024"}
    cmd = make_submission.run_command([runlog.Run("ship_s1", metrics={"config": by_path}, log=log)], tg)
    assert cmd.place == make_submission.DataPlace("sample_sp1024", "sample_1024_bpe.model", True)
    # The challenge data (the record preset): no SAMPLE_DATA in the command at all.
    h = tg.Hyperparameters.from_env({})
    config = json.loads(json.dumps(h.knob_values(), default=str))
    cmd = make_submission.run_command([runlog.Run("rec_s1", metrics={"config": config}, log=runlog.parse_log(""))], tg)
    assert cmd.place == make_submission.DataPlace(h.dataset_dir.name, h.tokenizer_file.name, False)
    assert not [kv for kv in cmd.env if kv.startswith("SAMPLE_DATA")]


@pytest.mark.slow
def test_builder_ships_the_raw_script_and_the_baseline_test(sweep, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    # A baseline clearly worse than the sweep's mean (0.1 nats, or 12 of the sweep's own standard deviations
    # when its 6-step seeds spread more: 3 seeds give Welch's test 2 degrees of freedom) with a small spread of
    # its own, same tokenizer: both rules pass.
    m = {s: sweep["runs"][s].metrics for s in SEEDS}
    mean = statistics.mean(m[s]["val_loss"] for s in SEEDS)
    gap = max(0.1, 12 * statistics.stdev(m[s]["val_loss"] for s in SEEDS))
    base_results = {}
    for s, d in zip(SEEDS, (0.0, 0.001, 0.002)):
        loss = mean + gap + d
        base_results[str(s)] = {"val_loss": loss, "val_bpb": runlog.bpb(loss, m[s]["val_tokens"], m[s]["val_bytes"])}
    baseline.write_text(json.dumps({"name": "base", "seed_results": base_results}))
    assert build(sweep, tmp_path / "out", "--baseline", str(baseline)) == 0
    out = capsys.readouterr().out
    assert "challenge rule" in out and "frontier rule" in out
    folder = tmp_path / "out" / NON_RECORD / "2026-05-01_TinyRun"
    sub = json.loads((folder / "submission.json").read_text())
    raw = sweep["script"].read_bytes()
    assert (folder / "train_gpt.py").read_bytes() == raw and sub["bytes_code"] == len(raw)
    assert sub["code_packed"] is False and "bytes_code_as_run" not in sub["seed_results"]["42"]
    assert sub["seed_results"]["42"]["bytes_total"] == sweep["runs"][42].metrics["bytes_total"]
    sig = sub["significance"]
    assert sig["unit"] == "nats" and sig["challenge rule"]["passed"] and sig["frontier rule"]["passed"]
    assert sig["challenge rule"]["improvement"] == pytest.approx(gap + 0.001, abs=1e-8)
    assert "## Significance" in (folder / "README.md").read_text()
    # Same name again: refused, unless --force replaces it.
    assert build(sweep, tmp_path / "out") == 2
    assert "already exists" in capsys.readouterr().err
    assert build(sweep, tmp_path / "out", "--force", "--pack") == 0
    assert pack.unpack((folder / "train_gpt.py").read_bytes())[0] == raw
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def hidden(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*")]


@pytest.mark.slow
def test_builder_accepts_one_or_two_seeds_with_a_warning(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    # One seed: built, with a warning; the std and the significance tests are "not computable", not a crash.
    assert build(sweep, out, "--baseline", "9.0", "9.1", logs=sweep["jsons"][:1], name="One") == 0
    captured = capsys.readouterr()
    assert ("warning: --logs: 1 seed (1337): a record needs at least 3 seeds (p < 0.01 on the 0.005-nat margin); the "
            "sample std and the significance tests are not computable with one seed") in captured.err
    assert "± n/a (1 seed)" in captured.out and "significance: not computable: 1 new seed" in captured.out
    folder = out / NON_RECORD / "2026-05-01_One"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seeds"] == [1337] and sub["val_bpb_std"] is None and sub["val_loss_std"] is None
    assert sub["val_bpb"] == pytest.approx(sweep["runs"][1337].metrics["val_bpb"], abs=1e-8)
    assert sub["compliance"]["three_seeds"] is False
    assert sub["significance"]["computable"] is False and "a t-test needs at least 2" in sub["significance"]["reason"]
    readme = (folder / "README.md").read_text()
    assert "± n/a (1 seed)** (mean ± sample std over 1 seed;" in readme and "- [ ] at least 3 seeds (1)" in readme
    results = {c.name: c for c in check.check_folder(folder)}
    assert not [c.line() for c in results.values() if c.status == "FAIL"]
    assert results["seed_count"].status == "WARN"
    # Two seeds: the std and the tests are computed; still the 3-seed warning.
    assert build(sweep, out, "--baseline", "9.0", "9.1", logs=sweep["jsons"][:2], name="Two") == 0
    captured = capsys.readouterr()
    assert "warning: --logs: 2 seeds (1337, 42): a record needs at least 3 seeds" in captured.err
    sub = json.loads((out / NON_RECORD / "2026-05-01_Two" / "submission.json").read_text())
    bpbs = [sweep["runs"][s].metrics["val_bpb"] for s in (1337, 42)]
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(bpbs), abs=1e-8)
    assert sub["significance"]["challenge rule"]["method"] == "welch"
    assert sorted(p.name for p in (out / NON_RECORD).iterdir()) == ["2026-05-01_One", "2026-05-01_Two"]
    assert not hidden(out), "no temporary folder left behind"


@pytest.mark.slow
def test_builder_never_leaves_a_temporary_folder(sweep, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    made = []

    def fail(exc):
        def step(folder, *args, **kwargs):
            made.append(Path(folder))
            assert Path(folder).is_dir() and Path(folder).name.startswith(".2026-05-01_TinyRun.")
            raise exc
        return step

    # A refusal after the temporary folder was written (the validator step fails): nothing stays, not even out/.
    monkeypatch.setattr(check, "check_folder", fail(OSError("disk full")))
    assert build(sweep, out) == 2
    err = capsys.readouterr().err
    assert "error: disk full" in err and "make_submission: nothing written" in err
    assert made and not made[-1].exists() and not out.exists()
    # A bug in a late step (an unexpected exception): it propagates, and the temporary folder still goes.
    monkeypatch.setattr(check, "check_folder", fail(TypeError("unsupported format string passed to NoneType")))
    with pytest.raises(TypeError):
        build(sweep, out)
    assert len(made) == 2 and not made[-1].exists() and not out.exists()
    # With --force over an existing folder: a failure keeps the existing folder as it was.
    monkeypatch.undo()
    assert build(sweep, out) == 0
    folder = out / NON_RECORD / "2026-05-01_TinyRun"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(make_submission, "readme_text", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build(sweep, out, "--force", "--pack")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name] and not hidden(out)


@pytest.mark.slow
def test_builder_makes_a_non_record_folder_from_older_runs(sweep, tmp_path, capsys):
    logs = copy_logs(sweep, tmp_path / "logs")
    for log in logs:
        make_older_run(log)
    # The record track refuses every run (tested above); --non-record builds it, warning about each one.
    assert build(sweep, tmp_path / "out", logs=logs) == 0
    err = capsys.readouterr().err
    for log in logs:
        assert f"warning: {log}: no dataset identity (no dataset.val_documents" in err
    folder = tmp_path / "out" / NON_RECORD / "2026-05-01_TinyRun"
    results = {c.name: c for c in check.check_folder(folder)}
    assert results["data_identity"].status == "WARN" and not [c for c in results.values() if c.status == "FAIL"]
    c = json.loads((folder / "submission.json").read_text())["compliance"]
    assert c["reportable"] is False, "an older run's `reportable: true` is not taken on trust"
    assert c["reportable_reason"].startswith("no dataset.val_documents") and "older train_gpt.py" in c["reportable_reason"]


# ---------------------------------------------------------------------------------------------
# make_submission.py: refusals (nothing written)
# ---------------------------------------------------------------------------------------------


def _config_differs(logs, sweep, tmp):
    old = json.loads(logs[1].read_text())["config_hash"]
    edit_json(logs[1], config={"NUM_LAYERS": 3})
    data = json.loads(logs[1].read_text())
    edit_json(logs[1], config_hash=tg.config_hash(data["config"]))
    txt = logs[1].with_suffix(".txt")  # the log says the same, so the pair is one run
    edit_log(txt, "\n  num_layers: 2\n", "\n  num_layers: 3\n")
    edit_log(txt, f"\n  config_hash: {old}\n", f"\n  config_hash: {tg.config_hash(data['config'])}\n")
    return [], "config differs from"


def _config_hash_tampered(logs, sweep, tmp):
    edit_json(logs[2], config={"MATRIX_LR": 0.5})
    return [], "does not match its config"


def _log_truncated(logs, sweep, tmp):
    txt = logs[0].with_suffix(".txt")
    txt.write_text("\n".join(txt.read_text().splitlines()[:-3]) + "\n")
    return [], "incomplete log"


def _log_missing(logs, sweep, tmp):
    logs[0].with_suffix(".txt").unlink()
    return [], "no log next to it"


def _json_incomplete(logs, sweep, tmp):
    data = json.loads(logs[1].read_text())
    del data["evaluations"]
    logs[1].write_text(json.dumps(data))
    return [], "missing evaluations"


def _stale_json(logs, sweep, tmp):
    edit_json(logs[2], val_loss=1.0)
    return [], f"{logs[2]}: does not belong to the log next to it, {logs[2].with_suffix('.txt')}: val_loss 1.00000000"


def _over_size(logs, sweep, tmp):
    data = json.loads(logs[0].read_text())
    model = tg.ARTIFACT_LIMIT_BYTES - data["bytes_code"] + 1
    edit_json(logs[0], bytes_model=model, bytes_total=model + data["bytes_code"])
    edit_final_line(logs[0].with_suffix(".txt"), bytes_model=model, bytes_total=model + data["bytes_code"])
    return [], "over the 16,000,000-byte limit"


# The time limits hold on the record track only (which also refuses the sweep as not reportable).
def _train_too_long(logs, sweep, tmp):
    edit_json(logs[1], train_time_ms=600_001)
    edit_final_line(logs[1].with_suffix(".txt"), train_time_ms=600_001)
    return ["--track", "10min_16mb"], "over the 600 s limit"


def _data_access_too_late(logs, sweep, tmp):
    edit_json(logs[1], train_data_access_end_ms=600_500)
    return ["--track", "10min_16mb"], "training data was read until 600,500 ms"


def _eval_too_long(logs, sweep, tmp):
    edit_json(logs[2], eval_time_ms=600_001)
    edit_final_line(logs[2].with_suffix(".txt"), eval_time_ms=600_001)
    return ["--track", "10min_16mb"], "eval_time_ms 600,001 is over the 600 s limit"


def _wrong_script(logs, sweep, tmp):
    other = tmp / "edited" / "train_gpt.py"
    other.parent.mkdir()
    other.write_bytes(sweep["script"].read_bytes() + b"\n# edited after the sweep\n")
    return ["--script", str(other)], "does not match the code_sha256"


def _duplicate_seed(logs, sweep, tmp):
    return ["--logs", str(logs[0]), str(logs[0]), str(logs[1])], "seed 1337 appears 2 times"


def _not_reportable(logs, sweep, tmp):
    # The sweep as it is, for the record track: each run is refused with its own reason.
    reason = json.loads(logs[0].read_text())["reportable_reason"]
    assert reason.startswith("not the challenge's validation split: ")
    return ["--track", "10min_16mb"], f"error: {logs[0]}: not reportable: {reason}; a record must score"


def _max_val_tokens(logs, sweep, tmp):
    reason = "MAX_VAL_TOKENS=4096: a prefix of the validation split"
    edit_json(logs[1], reportable_reason=reason)
    return ["--track", "10min_16mb"], f"error: {logs[1]}: not reportable: {reason}"


def _set_dataset_hash(log: Path, key: str, value: str) -> None:
    """One run of the sweep as if it had scored other data: its JSON and its log say so alike."""
    data = json.loads(log.read_text())
    old = data["dataset"][key]
    data["dataset"][key] = value
    log.write_text(json.dumps(data))
    edit_log(log.with_suffix(".txt"), f" {key}:{old}", f" {key}:{value}")


def _mixed_val_data(logs, sweep, tmp):
    _set_dataset_hash(logs[1], "val_sha256", "ab" * 32)
    return [], f"error: {logs[1]}: mixed data: val_sha256 abababababababab vs"


def _mixed_tokenizer(logs, sweep, tmp):
    _set_dataset_hash(logs[2], "tokenizer_sha256", "cd" * 32)
    return [], f"error: {logs[2]}: mixed data: tokenizer_sha256 cdcdcdcdcdcdcdcd vs"


def make_older_run(json_path: Path) -> None:
    """A run as an older train_gpt.py wrote it: `reportable` true with MAX_VAL_TOKENS=0 whatever the data, no
    dataset identity in the JSON, no compliance:dataset line in the log."""
    data = json.loads(json_path.read_text())
    for key in ("val_documents", "challenge_split", "manifest", "manifest_sha256", "manifest_tokenizer_sha256"):
        del data["dataset"][key]
    del data["reportable_reason"]
    data["reportable"] = True
    json_path.write_text(json.dumps(data))
    txt = json_path.with_suffix(".txt")
    lines = [ln for ln in txt.read_text().splitlines() if not ln.startswith("compliance:dataset ")]
    lines = ["compliance:reportable value:yes how:score from eval:roundtrip on the full validation split"
             if ln.startswith("compliance:reportable ") else ln for ln in lines]
    txt.write_text("\n".join(lines) + "\n")


def _older_run(logs, sweep, tmp):
    make_older_run(logs[2])
    return ["--track", "10min_16mb"], (f"error: {logs[2]}: no dataset identity (no dataset.val_documents, "
                                       f"dataset.challenge_split, reportable_reason): written by an older "
                                       f"train_gpt.py, so which data it scored cannot be verified; re-run it")


def _reportable_claim_edited(logs, sweep, tmp):
    data = json.loads(logs[0].read_text())
    data["dataset"]["challenge_split"] = data["reportable"] = True
    data["reportable_reason"] = "the challenge's sp1024 validation split (50,000 documents, 62,021,632 targets)"
    logs[0].write_text(json.dumps(data))
    edit_log(logs[0].with_suffix(".txt"), "compliance:reportable value:NO", "compliance:reportable value:yes")
    return [], f"error: {logs[0]}: claims reportable, but its own counts say not the challenge's validation split"


def _non_record_on_the_record_track(logs, sweep, tmp):
    return ["--track", "10min_16mb", "--non-record"], "--non-record with --track 10min_16mb is not allowed"


def _bad_name(logs, sweep, tmp):
    return ["--name", "my run/1"], "--name 'my run/1' is not allowed"


REFUSALS = [_config_differs, _config_hash_tampered, _log_truncated, _log_missing, _json_incomplete, _stale_json,
            _over_size, _train_too_long, _data_access_too_late, _eval_too_long, _wrong_script, _duplicate_seed,
            _not_reportable, _max_val_tokens, _mixed_val_data, _mixed_tokenizer, _older_run, _reportable_claim_edited,
            _non_record_on_the_record_track, _bad_name]


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSALS, ids=[f.__name__.strip("_") for f in REFUSALS])
def test_builder_refuses_and_writes_nothing(sweep, tmp_path, capsys, case):
    logs = copy_logs(sweep, tmp_path / "logs")
    extra, expected = case(logs, sweep, tmp_path)
    args = ["--name", "TinyRun", "--logs", *map(str, logs), "--script", str(sweep["script"]),
            "--out", str(tmp_path / "out"), "--author", "T", "--github-id", "t", "--date", "2026-05-01"]
    if "--track" not in extra:  # the sweep is not reportable: only the record track's own cases name it
        args.append("--non-record")
    for flag in ("--logs", "--script", "--name"):  # a case's own value replaces the default one
        if flag in extra:
            i = args.index(flag)
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            del args[i:j]
    assert make_submission.main(args + extra) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert all(line.startswith(("error: ", "make_submission: nothing written")) for line in err.splitlines()), err
    assert not (tmp_path / "out").exists(), "a refusal writes nothing"


# ---------------------------------------------------------------------------------------------
# check.py on existing folders
# ---------------------------------------------------------------------------------------------


def _wrong_bytes_code(folder):
    sub = json.loads((folder / "submission.json").read_text())
    sub["bytes_code"] += 1
    (folder / "submission.json").write_text(json.dumps(sub))
    return "bytes_code"


def _stale_script(folder):
    (folder / "train_gpt.py").write_bytes(pack.pack(b"print('a different script')\n"))
    return "script_matches_logs"


def _truncated_log(folder):
    log = folder / "train_seed42.log"
    log.write_text("\n".join(log.read_text().splitlines()[:-1]) + "\n")
    return "logs_complete"


def _seed_from_other_config(folder):
    log = folder / "train_seed2025.log"
    log.write_text(log.read_text().replace("\n  num_layers: 2\n", "\n  num_layers: 3\n"))
    return "same_config"


def _claimed_mean_wrong(folder):
    sub = json.loads((folder / "submission.json").read_text())
    sub["val_bpb"] -= 0.01
    (folder / "submission.json").write_text(json.dumps(sub))
    return "claims_match_logs"


def _missing_readme(folder):
    (folder / "README.md").unlink()
    return "files"


def _over_limit_claim(folder):
    log = folder / "train_seed1337.log"
    text = log.read_text().splitlines()
    model = tg.ARTIFACT_LIMIT_BYTES
    text[-1] = " ".join(f"bytes_model:{model}" if f.startswith("bytes_model:") else f for f in text[-1].split(" "))
    log.write_text("\n".join(text) + "\n")
    return "artifact_bytes"


def _seed_on_other_data(folder):
    log = folder / "train_seed42.log"
    val = runlog.read_log(log).compliance["dataset"]["val_sha256"]
    edit_log(log, f"val_sha256:{val}", f"val_sha256:{'ef' * 32}")
    return "data_identity"


def _dataset_claim_wrong(folder):
    sub = json.loads((folder / "submission.json").read_text())
    sub["dataset"]["tokenizer_sha256"] = "0" * 64
    (folder / "submission.json").write_text(json.dumps(sub))
    return "claims_match_logs"


def edit_readme(folder: Path, old: str, new: str) -> None:
    path = folder / "README.md"
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def _readme_headline_edited(folder):
    sub = json.loads((folder / "submission.json").read_text())
    edit_readme(folder, f"**val_bpb {sub['val_bpb']:.4f} ±", "**val_bpb 2.9000 ±")
    return "readme_matches_logs", f"README.md line 3: 2.9000 where the logs give {sub['val_bpb']:.4f}"


def _readme_table_edited(folder):
    row = json.loads((folder / "submission.json").read_text())["seed_results"]["2025"]
    edit_readme(folder, f"| {row['bytes_total']:,} |", f"| {row['bytes_total'] - 1000:,} |")
    return "readme_matches_logs", f"{row['bytes_total'] - 1000:,} where the logs give {row['bytes_total']:,}"


def _readme_time_edited(folder):
    c = json.loads((folder / "submission.json").read_text())["compliance"]
    old = f"(max {c['max_eval_time_ms'] / 1000:.1f} s:"
    edit_readme(folder, old, "(max 0.1 s:")
    return "readme_matches_logs", f"0.1 where the logs give {c['max_eval_time_ms'] / 1000:.1f}"


def _readme_knob_edited(folder):
    edit_readme(folder, " ITERATIONS=6 ", " ITERATIONS=20 ")
    return "readme_matches_logs", "run command sets ITERATIONS=20 where the logs ran iterations: 6"


def _readme_headline_removed(folder):
    sub = json.loads((folder / "submission.json").read_text())
    text = (folder / "README.md").read_text().splitlines()
    (folder / "README.md").write_text("\n".join(ln for ln in text if not ln.startswith("**val_bpb")) + "\n")
    return "readme_matches_logs", f"the generated line `**val_bpb {sub['val_bpb']:.4f}"


def _json_time_edited(folder):
    sub = json.loads((folder / "submission.json").read_text())
    logged = sub["seed_results"]["42"]["eval_time_ms"]
    sub["seed_results"]["42"]["eval_time_ms"] = logged + 1000
    (folder / "submission.json").write_text(json.dumps(sub))
    return "claims_match_logs", f"submission.json seed_results.42.eval_time_ms: {logged + 1000} where the logs give {logged}"


def _json_hardware_edited(folder):
    sub = json.loads((folder / "submission.json").read_text())
    logged, sub["hardware"] = sub["hardware"], "8xH100 80GB SXM"
    (folder / "submission.json").write_text(json.dumps(sub))
    return "claims_match_logs", f"submission.json hardware: '8xH100 80GB SXM' where the logs give {logged!r}"


def _payload_corrupt(folder):
    path = folder / "train_gpt.py"
    codec, wrapper = pack.unpack_wrapper(path.read_bytes())[1::2]
    path.write_bytes(pack.wrap_compressed(b"not a compressed payload", codec, wrapper))
    return "script_compiles", "a self-extracting file whose wrapper fails when run: _lzma.LZMAError"


VALIDATOR_CASES = [_wrong_bytes_code, _stale_script, _truncated_log, _seed_from_other_config, _claimed_mean_wrong,
                   _missing_readme, _over_limit_claim, _seed_on_other_data, _dataset_claim_wrong,
                   _readme_headline_edited, _readme_table_edited, _readme_time_edited, _readme_knob_edited,
                   _readme_headline_removed, _json_time_edited, _json_hardware_edited, _payload_corrupt]


@pytest.mark.slow
@pytest.mark.parametrize("case", VALIDATOR_CASES, ids=[f.__name__.strip("_") for f in VALIDATOR_CASES])
def test_validator_flags_a_broken_folder(packed_folder, tmp_path, capsys, case):
    folder = tmp_path / NON_RECORD / packed_folder.name
    shutil.copytree(packed_folder, folder)
    failing = case(folder)
    failing, detail = failing if isinstance(failing, tuple) else (failing, "")
    results = check.check_folder(folder)
    assert failing in {c.name for c in results if c.status == "FAIL"}, [c.line() for c in results]
    assert detail in next(c.detail for c in results if c.name == failing and c.status == "FAIL")
    assert check.main([str(folder), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {failing}:" in out and "PASS" not in out


def as_record(packed_folder: Path, tmp_path: Path) -> Path:
    """The sweep's folder claimed for the record track (under track_10min_16mb/, track 10min_16mb)."""
    folder = tmp_path / "track_10min_16mb" / packed_folder.name
    shutil.copytree(packed_folder, folder)
    sub = json.loads((folder / "submission.json").read_text())
    sub["track"] = "10min_16mb"
    (folder / "submission.json").write_text(json.dumps(sub))
    return folder


@pytest.mark.slow
def test_validator_checks_which_data_was_scored(sweep, packed_folder, tmp_path, capsys):
    reason = sweep["runs"][1337].metrics["reportable_reason"]
    # Claimed as a record: not reportable is a failure, each log named with its reason; the identity still passes.
    folder = as_record(packed_folder, tmp_path / "a")
    results = {c.name: c for c in check.check_folder(folder)}
    assert results["reportable"].status == "FAIL", results["reportable"].line()
    assert f"train_seed1337.log: {reason}" in results["reportable"].detail
    assert results["data_identity"].status == "PASS"
    assert check.main([str(folder), "--quiet"]) == 1
    assert f"FAIL  reportable: not reportable: train_seed1337.log: {reason}" in capsys.readouterr().out
    # Logs of an older train_gpt.py (no compliance:dataset line, `reportable: yes` whatever the data): a record
    # fails, naming the logs and what to do; the non-record track warns.
    for root, track in ((tmp_path / "b", "record"), (tmp_path / "c", "non-record")):
        folder = as_record(packed_folder, root) if track == "record" else root / NON_RECORD / packed_folder.name
        if track == "non-record":
            shutil.copytree(packed_folder, folder)
        for s in SEEDS:
            log = folder / f"train_seed{s}.log"
            log.write_text("".join(ln for ln in log.read_text().splitlines(keepends=True)
                                   if not ln.startswith("compliance:dataset ")))
        c = {c.name: c for c in check.check_folder(folder)}["data_identity"]
        assert c.status == ("FAIL" if track == "record" else "WARN"), c.line()
        assert c.detail.startswith("no data identity in train_seed1337.log (no compliance:dataset line)"), c.detail
        assert "written by an older train_gpt.py" in c.detail and "re-run it with the current script" in c.detail
    # A log that claims the challenge's split against its own counts (57 documents): an edited log.
    folder = tmp_path / "d" / NON_RECORD / packed_folder.name
    shutil.copytree(packed_folder, folder)
    edit_log(folder / "train_seed2025.log", "compliance:reportable value:NO", "compliance:reportable value:yes")
    c = {c.name: c for c in check.check_folder(folder)}["data_identity"]
    assert c.status == "FAIL" and c.detail.startswith("train_seed2025.log: claims reportable, but its own counts say "
                                                      "not the challenge's validation split"), c.line()


def test_validator_on_a_folder_from_another_script(tmp_path):
    """A public-style record: packed script, its own log format. What can be checked passes; the log
    cross-checks are warnings, not failures."""
    folder = tmp_path / "track_10min_16mb" / "2026-04-05_Public"
    folder.mkdir(parents=True)
    script = pack.pack(b"print('train')\n")
    (folder / "train_gpt.py").write_bytes(script)
    (folder / "train_seed1337.log").write_text("Hyperparameters:\n  seed: 1337\nstep:1/20000 train_loss: 6.9\n"
                                               "quantized val_loss:2.80407 val_bpb:1.08554\n")
    (folder / "README.md").write_text("# Public\nseed 1337\n")
    (folder / "submission.json").write_text(json.dumps({
        "author": "Someone", "github_id": "someone", "name": "Public", "blurb": "x", "date": "2026-04-05",
        "track": "10min_16mb", "val_loss": 2.80407, "val_bpb": 1.08554, "bytes_total": 15_984_924,
        "bytes_code": len(script)}))
    results = {c.name: c for c in check.check_folder(folder)}
    assert not [c for c in results.values() if c.status == "FAIL"], [c.line() for c in results.values()]
    assert results["bytes_code"].status == "PASS" and results["logs_format"].status == "WARN"
    assert results["script_compiles"].detail.startswith("packed (lzma)")


@pytest.mark.parametrize("wrapper", pack.WRAPPERS)
@pytest.mark.parametrize("codec", pack.available_codecs())
def test_validator_runs_the_wrapper_of_a_packed_script(tmp_path, codec, wrapper):
    """A packed script is decompressed as `python train_gpt.py` would (its wrapper run, the program not): a payload
    that no longer decompresses, or does not compile, fails; compiling the wrapper alone would pass them."""
    folder = tmp_path / "track_10min_16mb" / "2026-04-05_Packed"
    folder.mkdir(parents=True)
    script = folder / "train_gpt.py"
    marker = tmp_path / "ran"
    script.write_bytes(pack.pack(f"open({str(marker)!r}, 'w').close()\n".encode(), codec, wrapper=wrapper))
    c = {c.name: c for c in check.check_folder(folder)}["script_compiles"]
    assert c.status == "PASS" and c.detail.startswith(f"packed ({codec})") and "decompressed by running" in c.detail
    assert not marker.exists(), "the payload itself is not run"
    script.write_bytes(pack.wrap_compressed(b"not a compressed payload", codec, wrapper))
    compile(script.read_bytes(), str(script), "exec")  # the wrapper still compiles
    c = {c.name: c for c in check.check_folder(folder)}["script_compiles"]
    error = "_lzma.LZMAError: Corrupt input data" if codec == "lzma" else "brotli.error: "
    assert c.status == "FAIL" and c.detail.startswith(f"train_gpt.py: a self-extracting file whose wrapper fails when "
                                                      f"run: {error}"), c.line()
    script.write_bytes(pack.wrap(b"def (:\n", codec, wrapper))
    c = {c.name: c for c in check.check_folder(folder)}["script_compiles"]
    assert c.status == "FAIL" and "the payload does not compile" in c.detail, c.line()


# ---------------------------------------------------------------------------------------------
# stats.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [-7.5, -1.3, -0.2, 0.0, 0.4, 1.0, 2.7, 12.0])
def test_student_t_matches_closed_forms(t):
    # df = 1 (Cauchy): P(T >= t) = 1/2 - atan(t)/pi; df = 2: 1/2 - t / (2 sqrt(2 + t^2)).
    assert stats.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)
    assert stats.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # df = 4: 1/2 - (3/4) u (1 - u^2/3), u = t / sqrt(4 + t^2)  (integrating the density by hand).
    u = t / math.sqrt(4 + t * t)
    assert stats.t_sf(t, 4) == pytest.approx(0.5 - 0.75 * u * (1 - u * u / 3), abs=1e-12)
    # Large df: the normal distribution.
    assert stats.t_sf(t, 1e7) == pytest.approx(0.5 * math.erfc(t / math.sqrt(2)), abs=1e-6)
    assert stats.t_cdf(t, 3.5) + stats.t_sf(t, 3.5) == pytest.approx(1.0)


def test_welch_against_hand_computed_values():
    new, old = [1.0, 1.2, 1.1], [1.3, 1.5, 1.4, 1.6]
    # Means 1.1 and 1.45; sample variances 0.01 and 0.05/3; se^2 = 0.01/3 + (0.05/3)/4 = 0.0075.
    r = stats.welch(new, old)
    assert r.method == "welch" and r.improvement == pytest.approx(0.35)
    assert r.se == pytest.approx(math.sqrt(0.0075))
    assert r.t == pytest.approx(0.35 / math.sqrt(0.0075))  # 4.0415
    v1, v2 = 0.01 / 3, (0.05 / 3) / 4
    assert r.df == pytest.approx(0.0075 ** 2 / (v1 ** 2 / 2 + v2 ** 2 / 3))  # 4.959
    assert r.df == pytest.approx(4.9592, abs=1e-4)
    # With a margin: t = (improvement - margin) / se.
    assert stats.welch(new, old, 0.05).t == pytest.approx(0.30 / math.sqrt(0.0075))
    # One baseline value: one-sample test, df = n - 1 = 2; new = 1, 2, 3 (mean 2, sd 1) vs 4:
    # t = 2 / (1/sqrt 3) = 3.4641, p = 1/2 - t / (2 sqrt(2 + t^2)) = 0.037090.
    r = stats.welch([1.0, 2.0, 3.0], [4.0])
    assert r.method == "one-sample" and r.df == 2 and r.t == pytest.approx(2 * math.sqrt(3))
    assert r.p == pytest.approx(0.5 - 2 * math.sqrt(3) / (2 * math.sqrt(14)), abs=1e-12)
    assert r.p == pytest.approx(0.037090, abs=1e-6)
    # No spread: the sign decides.
    assert stats.welch([1.0, 1.0], [2.0, 2.0], 0.005).p == 0.0
    assert stats.welch([1.0, 1.0], [1.001, 1.001], 0.005).p == 1.0
    with pytest.raises(runlog.RecordError, match="at least 2 new seeds"):
        stats.welch([1.0], [2.0, 2.1])


def test_welch_matches_scipy():
    sp = pytest.importorskip("scipy.stats", reason="scipy is optional; the hand-computed tests cover the math")
    import random
    rng = random.Random(7)
    for _ in range(40):
        new = [2.80 + rng.gauss(0, 0.002) for _ in range(rng.randint(2, 6))]
        old = [2.81 + rng.gauss(0, 0.003) for _ in range(rng.randint(2, 6))]
        margin = rng.choice([0.0, 0.005])
        ours = stats.welch(new, old, margin)
        ref = sp.ttest_ind(new, [o - margin for o in old], equal_var=False, alternative="less")
        assert ours.t == pytest.approx(-float(ref.statistic), rel=1e-9)
        assert ours.p == pytest.approx(float(ref.pvalue), rel=1e-8, abs=1e-14)
    for df in (0.7, 1, 2.5, 3.31, 9, 40, 300):
        for t in (-30, -3, -0.5, 0.1, 1.7, 6, 25):
            assert stats.t_sf(t, df) == pytest.approx(float(sp.t.sf(t, df)), rel=1e-9, abs=1e-300)


def test_challenge_margin_is_in_nats_and_converted_for_other_tokenizers():
    ln2 = math.log(2)

    def side(name, losses, ratio):
        return stats.Side(name, [stats.Score(i, x, x / ln2 * ratio, ratio, name) for i, x in enumerate(losses)])

    new = side("new", [2.8000, 2.8002, 2.7998, 2.8001], 0.30)
    # 0.004 nats better, very tight: beats the baseline (frontier) but not by 0.005 nats (challenge).
    old = side("old", [2.8040, 2.8042, 2.8038, 2.8041], 0.30)
    res = stats.compare(new, old)
    assert res.unit == "nats"
    challenge, frontier = res.rules
    assert challenge.margin == 0.005 and not challenge.passed and frontier.passed
    assert res.paired is not None and res.paired.method == "paired"
    # 0.006 nats better: both rules.
    res = stats.compare(new, side("old", [2.8060, 2.8062, 2.8058, 2.8061], 0.30))
    assert all(r.passed for r in res.rules)
    # Another tokenizer (different tokens per byte): BPB, with 0.005 nats converted by the new runs' ratio.
    res = stats.compare(new, side("old", [2.0, 2.001, 2.002], 0.41))
    assert res.unit == "bpb" and res.rules[0].margin == pytest.approx(0.005 * 0.30 / ln2)
    assert "do not compare" in res.note
    # sp8192's ratio (~0.269 tokens/byte on its validation text) gives ~0.00194 BPB.
    assert 0.005 * 0.2690 / ln2 == pytest.approx(0.00194, abs=1e-5)


def test_one_new_seed_makes_the_tests_not_computable(capsys):
    ln2 = math.log(2)
    new = stats.Side("new", [stats.Score(1, 2.80, 2.80 / ln2 * 0.3, 0.3, "a")])
    old = stats.Side("old", [stats.Score(i, x, x / ln2 * 0.3, 0.3, "b") for i, x in enumerate([2.9, 2.91, 2.92])])
    res = stats.compare(new, old)
    assert res.rules == [] and res.paired is None and "1 new seed: a t-test needs at least 2" in res.not_computable
    assert res.lines() == [f"significance: not computable: {res.not_computable}"]
    assert res.as_dict()["computable"] is False
    assert stats.main(["2.80", "--baseline", "2.9", "2.91"]) == 0
    out = capsys.readouterr().out
    assert "std -  (n=1)" in out and "significance: not computable" in out
    # Two new seeds: computable (one degree of freedom against a single baseline value).
    res = stats.compare(stats.Side("new", new.scores * 2), stats.Side("old", old.scores[:1]))
    assert [r.test.method for r in res.rules] == ["one-sample", "one-sample"] and res.rules[0].test.df == 1


@pytest.mark.slow
def test_stats_cli_on_the_sweep(sweep, packed_folder, capsys):
    assert stats.main([*map(str, sweep["jsons"]), "--baseline", "9.0", "9.1", "9.05"]) == 0
    out = capsys.readouterr().out
    for s in SEEDS:
        m = sweep["runs"][s].metrics
        assert f"{m['val_loss']:.8f}" in out and f"{m['val_bpb']:.8f}" in out
        # BPB from the run's own tokens and bytes is the score it reported.
        assert runlog.bpb(m["val_loss"], m["val_tokens"], m["val_bytes"]) == pytest.approx(m["val_bpb"], rel=1e-12)
    bpbs = [sweep["runs"][s].metrics["val_bpb"] for s in SEEDS]
    assert f"std {statistics.stdev(bpbs):.8f}" in out
    assert "challenge rule" in out and "PASS" in out
    # A record folder as the new side and as the baseline: same scores, no improvement.
    assert stats.main([str(packed_folder), "--baseline", str(packed_folder / "submission.json")]) == 0
    out = capsys.readouterr().out
    assert "same tokens/byte" in out and "challenge rule: improvement " in out and "-> FAIL" in out
    improvement = float(out.split("challenge rule: improvement ", 1)[1].split(" ", 1)[0])
    assert abs(improvement) < 1e-6, "the logs' 8-decimal scores against the JSON's own"
    assert stats.main(["not-a-file"]) == 2
    assert "not a number, file or folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# compare.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_shows_config_differences_and_deltas(sweep, tmp_path, capsys):
    logs = copy_logs(sweep, tmp_path / "logs")
    edit_json(logs[1], config={"NUM_LAYERS": 3, "MATRIX_LR": 0.05})
    assert compare.main([str(logs[0]), str(logs[1]), str(logs[2].with_suffix(".txt"))]) == 0
    out = capsys.readouterr().out
    section = out.split("config differences", 1)[1].split("metrics:", 1)[0]
    assert "(2 knob(s); plus RUN_ID, SEED" in section
    assert "MATRIX_LR" in section and "NUM_LAYERS" in section and "VOCAB_SIZE" not in section
    a, b = sweep["runs"][1337].metrics, sweep["runs"][42].metrics
    delta = b["val_bpb"] - a["val_bpb"]
    assert f"{delta:+.6f}" in out and f"{b['bytes_total'] - a['bytes_total']:+,}" in out


@pytest.mark.slow
def test_compare_plot_writes_a_png(sweep, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (pip install matplotlib)")
    out = tmp_path / "plots" / "curves.png"
    assert compare.main([*map(str, sweep["jsons"]), "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 400 and height > 300 and len(data) > 10_000


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / "r.txt"
    run.write_text("config:\n  seed: 1\nstep:1/2 train_loss:6.9 train_time:10ms step_avg:10.00ms tok_s:1\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert compare.main([str(run), "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


FINAL_LINE = ("final val_loss:1.00000000 val_bpb:0.60000000 eval:roundtrip bytes_total:10 bytes_model:4 bytes_code:6 "
              "train_time_ms:20 eval_time_ms:5 steps:2\n")


def test_history_prefers_the_json_and_falls_back_to_the_log(tmp_path):
    log = tmp_path / "r.txt"
    log.write_text("config:\n  seed: 7\n  run_id: r\n"
                   "step:1/4 train_loss:6.9000 train_time:10ms step_avg:10.00ms tok_s:1 lr_scale:1.0\n"
                   "step:2/4 val_loss:6.5000 val_bpb:3.9000 train_time:20ms\n"
                   "step:2/4 train_loss:6.5000 train_time:20ms step_avg:10.00ms tok_s:1 lr_scale:1.0\n" + FINAL_LINE)
    run = runlog.load_run(log)
    train, val = run.history()
    assert [p["step"] for p in train] == [1, 2] and train[1]["train_loss"] == 6.5
    assert val == [{"step": 2, "train_time_ms": 20, "val_loss": 6.5, "val_bpb": 3.9}]
    history = {"train": [{"step": 1, "train_time_ms": 5, "train_loss": 7.0}], "val": []}
    (tmp_path / "r.json").write_text(json.dumps({"val_loss": 1.0, "config": {"SEED": 7}, "history": history}))
    assert runlog.load_run(tmp_path / "r.json").history() == (history["train"], [])


# ---------------------------------------------------------------------------------------------
# runlog.py: a JSON and the log next to it must be one run
# ---------------------------------------------------------------------------------------------


def test_a_json_is_read_only_with_its_own_log(tmp_path, capsys):
    log, js = tmp_path / "r.txt", tmp_path / "r.json"
    head = "config:\n  code_sha256: abc\n  config_hash: h1\n  run_id: r\n  seed: 7\n"
    metrics = {"run_id": "r", "val_loss": 1.0, "val_bpb": 0.6, "steps": 2, "code_sha256": "abc", "config_hash": "h1",
               "config": {"SEED": 7}}
    js.write_text(json.dumps(metrics))
    log.write_text(head + FINAL_LINE)
    assert runlog.load_run(js).metrics == metrics and runlog.load_run(log).warnings == []
    # The same RUN_ID re-run (another seed) and died: the log is new and unfinished, the JSON is the old run's.
    log.write_text(head.replace("seed: 7", "seed: 8") + "step:1/4 train_loss:6.9000 train_time:10ms step_avg:10.00ms\n")
    with pytest.raises(runlog.RecordError) as exc:
        runlog.load_run(js)
    msg = str(exc.value)
    assert msg.startswith(f"{js}: does not belong to the log next to it, {log}: the log has no `final` line")
    assert "give r.txt to read the log alone" in msg
    for tool in (stats, compare):
        assert tool.main([str(js)]) == 2
        assert capsys.readouterr().err == f"error: {msg}\n"
    assert stats.main([str(tmp_path)]) == 2, "a folder of runs too"
    assert "does not belong to the log next to it" in capsys.readouterr().err
    # Given the log, the JSON is ignored with a warning naming both files.
    run = runlog.load_run(log)
    assert run.metrics is None and run.json_path is None and run.seed == 8
    assert run.warnings == [f"{js}: ignored, it does not belong to {log}: {runlog.INCOMPLETE}; reading the log alone"]
    assert compare.main([str(log)]) == 0
    assert f"warning: {js}: ignored, it does not belong to {log}" in capsys.readouterr().err
    # A finished log of another run (seed, scores, code): every difference is named.
    log.write_text(head.replace("seed: 7", "seed: 8").replace("abc", "def") + FINAL_LINE.replace("1.00000000", "1.50000000"))
    with pytest.raises(runlog.RecordError, match=r"seed 7 in the JSON vs 8 in the log; code_sha256 abc in the JSON vs "
                                                 r"def in the log; val_loss 1.00000000 in the JSON vs 1.50000000 in "
                                                 r"the log"):
        runlog.load_run(js)


def test_data_identity_of_a_reportable_run_and_of_a_false_claim():
    val, tok = "a" * 64, "b" * 64
    reason = "the challenge's sp1024 validation split (50,000 documents, 62,021,632 targets)"
    raw = 62_021_632 + 1 + 100  # the split's tokens before truncation to 2048-token sequences
    log = runlog.parse_log(f"config:\n  dataset_val_tokens_raw: {raw}\n  max_val_tokens: 0\n  vocab_size: 1024\n"
                           f"compliance:dataset manifest_sha256:none val_sha256:{val} val_documents:50000 "
                           f"tokenizer_sha256:{tok}\ncompliance:reportable value:yes how:score from eval:sliding on "
                           f"{reason}\n")
    ident, missing = runlog.data_identity_of_log(log)
    assert missing == "" and ident.reportable and not ident.inconsistent and ident.key == (val, tok)
    assert ident.describe() == f"{reason}; val sha256 {val}; tokenizer sha256 {tok}; no manifest"
    metrics = {"reportable": True, "reportable_reason": reason, "config": {"VOCAB_SIZE": 1024, "MAX_VAL_TOKENS": 0},
               "dataset": {"val_sha256": val, "tokenizer_sha256": tok, "val_documents": 50_000, "challenge_split": True,
                           "val_tokens_raw": raw, "manifest_sha256": None}}
    ident, _ = runlog.data_identity_of_metrics(metrics)
    assert ident.reportable and not ident.inconsistent and ident.reason == reason
    # The same claim with one document short is contradicted by its own counts; without the identity: an older run.
    metrics["dataset"]["val_documents"] = 49_999
    ident, _ = runlog.data_identity_of_metrics(metrics)
    assert ident.inconsistent.startswith("claims reportable, but its own counts say not the challenge's validation "
                                         "split: 49,999 documents")
    del metrics["reportable_reason"], metrics["dataset"]["challenge_split"]
    assert runlog.data_identity_of_metrics(metrics) == (None, "no dataset.challenge_split, reportable_reason")
    assert runlog.data_identity_of_log(runlog.parse_log("config:\n  seed: 1\n")) == \
        (None, "no compliance:dataset or compliance:reportable line")


@pytest.mark.slow
def test_stats_and_compare_refuse_a_json_left_by_a_rerun_that_died(sweep, tmp_path, capsys):
    logs = copy_logs(sweep, tmp_path / "logs")
    txt = logs[0].with_suffix(".txt")
    txt.write_text("".join(txt.read_text().splitlines(keepends=True)[:60]))  # the re-run's log, cut short
    assert stats.main([str(logs[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {logs[0]}: does not belong to the log next to it, {txt}: the log has no `final`")
    assert compare.main([str(p) for p in logs]) == 2
    assert f"error: {logs[0]}: does not belong" in capsys.readouterr().err
    # Another finished run's log next to it: named by what differs.
    shutil.copyfile(logs[1].with_suffix(".txt"), txt)
    assert stats.main([str(logs[0]), str(logs[2])]) == 2
    assert "run_id tiny_s1337 in the JSON vs tiny_s42 in the log; seed 1337 in the JSON vs 42 in the log" in \
        capsys.readouterr().err
    assert stats.main([str(logs[1]), str(logs[2])]) == 0, "the runs that are whole still read"


# ---------------------------------------------------------------------------------------------
# CLIs and docs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", [pack, make_submission, check, stats, compare], ids=lambda m: m.__name__)
def test_every_cli_has_help(tool, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: records/")


def test_records_readme_documents_the_path():
    text = (RECORDS / "README.md").read_text()
    assert "for s in 1337 42 2025; do" in text and "SEED=$s RUN_ID=" in text
    for tool in ("make_submission.py", "check.py", "stats.py", "compare.py", "pack.py"):
        assert f"records/{tool}" in text, tool
    assert "0.005 nats" in text and "p < 0.25" in text


def test_a_folder_never_yields_the_staging_files_of_an_overwrite_rerun(tmp_path):
    for name in ("seed1.txt", "seed1.new.txt", "seed2.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in runlog.expand_inputs([tmp_path])] == ["seed1.txt", "seed2.txt"]
    (tmp_path / "seed1.new.json").write_text("{}")
    assert [p.name for p in runlog.expand_inputs([tmp_path])] == ["seed1.txt", "seed2.txt"]


def test_files_that_are_not_runs_are_refused_in_one_line(tmp_path):
    """compare/stats/check read runs through runlog.load_run: a file that is no run of this script is named, not
    listed as a run with every metric missing (another script's seed log, a stray JSON, any text file)."""
    other = tmp_path / "train_seed42.log"
    other.write_text("Hyperparameters:\n  seed: 42\nquantized_ttt_phased val_loss:2.31944212 val_bpb:1.05989454\n")
    with pytest.raises(runlog.RecordError, match=r"train_seed42\.log: not a train_gpt\.py log \(no `config:` block"):
        runlog.load_run(other)
    stray = tmp_path / "x.json"
    stray.write_text("{}")
    with pytest.raises(runlog.RecordError, match=r"x\.json: not a train_gpt\.py run JSON \(no `config` and `val_loss`\)"):
        runlog.load_run(stray)
    failed = tmp_path / "f.txt"
    failed.write_text("error: RUN_ID='f' is not allowed: logs/f.txt exists\n")
    assert not runlog.load_run(failed).log.complete  # ours, failed before its config: read, and incomplete
