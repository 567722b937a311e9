"""COMPRESSOR=pergroup (PR #1855's per-group coder): each role's code matrices (every layer's c_q, ...)
transposed, the rows of tok_emb / c_q / mlp.fc in similarity order, one `lrzip -z -L 9` stream each, the rest
brotli. Round trips give the brotli artifact's tensors exactly; a missing lrzip and a corrupted group are one
line each; PRESET=record falls back to brotli with a warning where lrzip is absent.

    python -m pytest -q tests/test_pergroup.py

Tests that run lrzip skip, with the reason, where it is not installed (`apt-get install -y lrzip`; .ci/run
installs it where it runs as root).
"""

from __future__ import annotations

import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from artifact_helpers import unpack_artifact_full
from pgolf import recover
from test_run import error_lines, run_script, tiny_env

NEEDS_LRZIP = pytest.mark.skipif(shutil.which("lrzip") is None,
                                 reason="lrzip is not installed (apt-get install -y lrzip): pergroup cannot run here")
PREFIX = tg.ARTIFACT_PREFIX.size


def tiny_quantized() -> dict:
    """A 4-layer, 64-wide GPT (init + noise) quantized with asymmetric LQER: every role of the record's layout."""
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=256, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                         tie_embeddings=True, tied_embed_init_std=0.02, logit_softcap=30.0, rope_base=10000.0,
                         qk_gain_init=1.5)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return tg.quantize_state(state, tg.QuantSpec(method="rtn", lqer_rank=2, lqer_top_k=2, lqer_asym_group=64))


def container(chunks: list[bytes], compressor: str = "pergroup") -> bytes:
    """An artifact of these compressed chunks, its CRC32 right (what compress_body writes around them)."""
    body = (bytes([tg.ARTIFACT_COMPRESSOR_IDS[compressor]]) + tg.CHUNK_COUNT.pack(len(chunks))
            + b"".join(tg.CHUNK_COUNT.pack(len(c)) for c in chunks) + b"".join(chunks))
    return tg.ARTIFACT_PREFIX.pack(tg.ARTIFACT_MAGIC, tg.ARTIFACT_VERSION, zlib.crc32(body), len(body)) + body


def chunks_of(blob: bytes) -> list[bytes]:
    (n,) = struct.unpack_from("<I", blob, PREFIX + 1)
    lengths = struct.unpack_from(f"<{n}I", blob, PREFIX + 5)
    bounds = np.cumsum([PREFIX + 5 + 4 * n, *lengths]).tolist()
    return [blob[a:b] for a, b in zip(bounds, bounds[1:])]


def one_line_error(blob: bytes, tmp_path: Path) -> str:
    path = tmp_path / "a.ptz"
    path.write_bytes(blob)
    with pytest.raises(tg.ArtifactError) as info:
        recover.read_artifact(tg, path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    return msg


def without_lrzip(monkeypatch) -> None:
    which = shutil.which
    monkeypatch.setattr(tg.shutil, "which", lambda name, *a, **k: None if name == "lrzip" else which(name, *a, **k))


# ---- The layout: roles, transposition, similarity order (no lrzip needed) ----

def greedy_l1_order(m: np.ndarray) -> list[int]:
    """PR #1855's _similarity_sort_l1, written out: from row 0, always the nearest unused row (L1), lowest index
    on ties."""
    used, order = np.zeros(len(m), bool), [0]
    used[0] = True
    for _ in range(len(m) - 1):
        d = np.abs(m[~used].astype(np.float32) - m[order[-1]].astype(np.float32)).sum(1)
        order.append(int(np.flatnonzero(~used)[np.argmin(d)]))
        used[order[-1]] = True
    return order


def test_similarity_order_is_the_greedy_l1_walk_and_puts_near_rows_together():
    g = np.random.default_rng(0)
    m = g.integers(-3, 4, (40, 16)).astype(np.int8)
    assert tg.similarity_order(m).tolist() == greedy_l1_order(m)
    twins = np.repeat(g.integers(-31, 32, (5, 32)), 2, axis=0)[g.permutation(10)].astype(np.int8)
    order = tg.similarity_order(twins)
    assert sorted(order.tolist()) == list(range(10)) and order.dtype == np.uint16
    assert all((twins[order[i]] == twins[order[i + 1]]).all() for i in range(0, 10, 2))


@pytest.mark.parametrize("role", ["tok_emb.weight", "mlp.proj.weight"])
def test_a_roles_encoding_round_trips_its_matrices(role):
    g = np.random.default_rng(1)
    shapes = [[300, 24], [300, 24], [7, 5]]  # > 256 rows: the uint16 orders matter
    raw = b"".join(g.integers(-31, 32, s).astype(np.int8).tobytes() for s in shapes)
    enc = tg.encode_role(role, raw, shapes)
    assert len(enc) == len(raw) + tg.PERGROUP_HEAD.size + 8 * len(shapes) + (2 * 607 if role in tg.PERGROUP_SORTED else 0)
    assert tg.decode_role(enc) == raw
    if role not in tg.PERGROUP_SORTED:  # the codes column by column
        first = np.frombuffer(raw, np.int8, 300 * 24).reshape(300, 24)
        assert enc[tg.PERGROUP_HEAD.size + 24: tg.PERGROUP_HEAD.size + 24 + 300] == first[:, 0].tobytes()
    with pytest.raises(ValueError):
        tg.decode_role(enc + b"\0")


def test_pieces_are_one_per_role_in_body_order():
    q = tiny_quantized()
    body = tg.serialize_quantized(q, "pergroup")
    pieces = tg.pergroup_pieces(body)
    assert b"".join(p[1] for p in pieces) == body
    roles = [p[0] for p in pieces if p[0]]
    assert roles == ["attn.c_k.weight", "attn.c_q.weight", "attn.c_v.weight", "attn.proj.weight", "mlp.fc.weight",
                     "mlp.proj.weight", "tok_emb.weight"]
    assert all(len(shapes) == 4 for role, _, shapes in pieces if role.startswith(("attn", "mlp")))
    # The brotli container's order (by quantization group) is untouched by pergroup.
    assert tg.serialize_quantized(q, "brotli") != body


# ---- Errors: a missing lrzip, a corrupted group (one line each) ----

def test_a_missing_lrzip_is_one_line_naming_it_and_the_install(tmp_path, monkeypatch):
    blob = container([b"\0\0" + __import__("brotli").compress(b"x"), b"\1mlp.fc.weight\0" + b"lrzip bytes"])
    without_lrzip(monkeypatch)
    msg = one_line_error(blob, tmp_path)
    assert "lrzip" in msg and "apt-get install -y lrzip" in msg and "not installed" in msg, msg


@pytest.mark.slow
def test_a_missing_lrzip_through_main_is_one_error_line(tmp_path, dataset):
    """EVAL_ONLY with PATH holding only the interpreter's folder: exit 2, one `error:` line, no traceback."""
    artifact = tmp_path / "pg.ptz"
    artifact.write_bytes(container([b"\1mlp.fc.weight\0" + b"lrzip bytes"]))
    env = tiny_env(dataset, tmp_path, "nolrzip", EVAL_ONLY=1, ARTIFACT=artifact)
    env["PATH"] = str(Path(sys.executable).parent)
    run = run_script(tmp_path, env)
    assert run.rc == 2, run.describe()
    assert len(error_lines(run)) == 1 and "Traceback" not in run.stderr, run.describe()
    assert "apt-get install -y lrzip" in error_lines(run)[0]


def test_an_unknown_coder_and_a_bad_brotli_group_are_named(tmp_path):
    assert "group 'x' (7)" in one_line_error(container([b"\7x\0data"]), tmp_path)
    assert "(brotli)" in one_line_error(container([b"\0\0not brotli"]), tmp_path)


@NEEDS_LRZIP
@pytest.mark.slow
def test_a_corrupted_group_is_named(tmp_path):
    blob = tg.pack_quantized(tiny_quantized(), "pergroup")
    chunks = chunks_of(blob)
    i = next(i for i, c in enumerate(chunks) if c.startswith(b"\1mlp.fc.weight\0"))
    for flip in (len(chunks[i]) // 2, len(chunks[i]) - 1):  # inside the stream; its last byte (end of data)
        bad = bytearray(chunks[i])
        bad[flip] ^= 0x5A
        msg = one_line_error(container(chunks[:i] + [bytes(bad)] + chunks[i + 1:]), tmp_path)
        assert "corrupted artifact: group 'mlp.fc.weight' (lrzip)" in msg, msg
    # lrzip decodes, but the matrices do not fit their shapes: still that group, never a wrong model.
    good = tg.lrzip(chunks[i][len(b"\1mlp.fc.weight\0"):], "-d")
    short = b"\1mlp.fc.weight\0" + tg.lrzip(good[:-1], "-z", "-L", "9")
    msg = one_line_error(container(chunks[:i] + [short] + chunks[i + 1:]), tmp_path)
    assert "group 'mlp.fc.weight' (lrzip)" in msg, msg


# ---- Round trips ----

@NEEDS_LRZIP
@pytest.mark.slow
def test_pergroup_round_trip_gives_the_brotli_artifacts_tensors():
    q = tiny_quantized()
    blob = tg.pack_quantized(q, "pergroup", {"note": "x"})
    assert blob == tg.pack_quantized(q, "pergroup", {"note": "x"}), "same input, same bytes"
    assert blob[PREFIX] == tg.ARTIFACT_COMPRESSOR_IDS["pergroup"]
    coders = {c[1:].partition(b"\0")[0].decode(): tg.PERGROUP_CODERS[c[0]] for c in chunks_of(blob)}
    assert coders[""] == "brotli" and coders["mlp.fc.weight"] == coders["tok_emb.weight"] == "lrzip"
    assert tg.PERGROUP_SORTED == ("tok_emb.weight",)  # PR #1855 also sorts c_q and mlp.fc: bench/RESULTS.md
    got, meta = unpack_artifact_full(blob)
    want, _ = unpack_artifact_full(tg.pack_quantized(q, "brotli"))
    assert meta == {"note": "x"} and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


@NEEDS_LRZIP
@pytest.mark.slow
def test_a_pergroup_run_and_its_eval_only_rescore_give_the_same_score(dataset, tmp_path):
    env = tiny_env(dataset, tmp_path, "pg", COMPRESSOR="pergroup")
    run = run_script(tmp_path, env)
    assert run.rc == 0, run.describe()
    blob = run.path("ptz").read_bytes()
    assert blob[PREFIX] == tg.ARTIFACT_COMPRESSOR_IDS["pergroup"]
    assert any(re.fullmatch(r"decompress_s:\d+\.\d\d compressor:pergroup", line) for line in run.log_lines)
    assert not any("WARNING" in line for line in run.log_lines if "lrzip" in line)
    again = run_script(tmp_path, tiny_env(dataset, tmp_path, "pg_rescore", EVAL_ONLY=1, ARTIFACT=run.path("ptz")))
    assert again.rc == 0, again.describe()
    assert (again.final["val_loss"], again.final["val_bpb"], again.final["bytes_model"]) == (
        run.final["val_loss"], run.final["val_bpb"], run.final["bytes_model"])


@NEEDS_LRZIP
@pytest.mark.slow
def test_fit_to_size_packs_pergroup_and_predicts_with_its_ratio(monkeypatch):
    """The fit step's entropy rule converts bytes over budget through PERGROUP_RATIO (compressed bytes per
    entropy byte): half the ratio, twice the widening of k (log2) on the second attempt."""
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=256, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                         tie_embeddings=True, tied_embed_init_std=0.02, logit_softcap=30.0, rope_base=10000.0,
                         qk_gain_init=1.5)
    state = {k: v.detach() + 0.02 * torch.randn_like(v) for k, v in tg.GPT(cfg).state_dict().items()}
    spec = tg.QuantSpec(method="rtn", compressor="pergroup")
    full = len(tg.pack_quantized(tg.quantize_state(state, spec), "pergroup"))
    factors = {}
    for ratio in (1.0, 0.5):
        monkeypatch.setattr(tg, "PERGROUP_RATIO", ratio)
        fit = tg.fit_artifact(state, spec, None, int(full * 0.9), {}, lambda _: None)
        assert fit.fits and fit.blob[PREFIX] == tg.ARTIFACT_COMPRESSOR_IDS["pergroup"]
        assert fit.attempts[0]["bytes"] == full and len(fit.attempts) >= 2
        factors[ratio] = fit.attempts[1]["factor"]
    assert np.log2(factors[0.5]) == pytest.approx(2 * np.log2(factors[1.0]))


# ---- PRESET=record without lrzip: brotli, with a warning naming the bytes ----

@pytest.mark.slow
def test_record_uses_pergroup_and_falls_back_to_brotli_with_a_warning(monkeypatch, capsys, tmp_path):
    assert tg.Hyperparameters.from_env({"PRESET": "record"}).compressor == "pergroup"
    without_lrzip(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert tg.main({"PRESET": "record", "DRY_RUN": "1"}) == 0
    warning = [line for line in capsys.readouterr().out.splitlines() if "COMPRESSOR=pergroup" in line]
    assert len(warning) == 1 and warning[0].startswith("WARNING: "), warning
    assert "apt-get install -y lrzip" in warning[0] and "brotli instead" in warning[0]
    lost = int(warning[0].split("~")[1].split(" bytes")[0].replace(",", ""))
    assert lost > 0


@pytest.mark.slow
def test_a_run_without_lrzip_writes_a_brotli_artifact(dataset, tmp_path):
    env = tiny_env(dataset, tmp_path, "nolrzip")
    env["PATH"] = str(Path(sys.executable).parent)
    run = run_script(tmp_path, env)
    assert run.rc == 0, run.describe()
    assert run.path("ptz").read_bytes()[PREFIX] == tg.ARTIFACT_COMPRESSOR_IDS["brotli"]
    assert any(line.startswith("WARNING: COMPRESSOR=pergroup needs lrzip") for line in run.log_lines)
    assert any(re.fullmatch(r"decompress_s:\d+\.\d\d compressor:brotli", line) for line in run.log_lines)
