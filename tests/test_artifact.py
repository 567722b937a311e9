"""Artifact format: SDClip round-to-nearest rows, byte shuffling, pack/unpack, corruption and atomic writes.

Run:
    python -m pytest -q tests/test_artifact.py          # fast (< 30 s), no data files needed

Everything here calls train_gpt.py in-process (importing it has no side effects): the quantizer
(SDClip scales, range and error bound), byte_shuffle and its undo, pack_artifact/unpack_artifact round trips of a
real tiny GPT and of a hand-made state dict, determinism of the packed bytes, the pickle-free body
layout, ArtifactError for every kind of damaged artifact, and atomic_write_bytes under failures.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch

import train_gpt as tg
from artifact_helpers import dequantize_rows, pack_artifact, unpack_artifact  # noqa: E402
from pgolf import recover

PREFIX = tg.ARTIFACT_PREFIX.size  # magic(8) | version(u16) | crc32(u32) | body length(u64) = 22 bytes
SPEC = tg.QuantSpec()  # what pack_artifact uses without a spec: round to nearest, int6 matrices, int7 tables


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def tiny_config(tie_embeddings: bool = True) -> tg.ModelConfig:
    # Block matrices take the int6 path, the embedding (and the untied head) int7, the control
    # tensors (scales, resid_mix, skip weights) the fp16 path.
    return tg.ModelConfig(vocab_size=1024, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2,
                          mlp_mult=2.0, tie_embeddings=tie_embeddings, tied_embed_init_std=0.005,
                          logit_softcap=30.0, rope_base=10000.0, qk_gain_init=1.5)


def tiny_gpt_state(tie_embeddings: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = tg.GPT(tiny_config(tie_embeddings))
    with torch.no_grad():  # move away from the zero/one inits so every tensor carries information
        for name, p in model.named_parameters():
            if name == "blocks.1.mlp.proj.weight":
                continue  # keep one all-zero matrix (as initialized) on the quantized path
            p.add_(torch.randn_like(p) * 0.02)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hand_made_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    big = torch.randn(300, 256, generator=g)  # a block matrix: int6 rows
    big[3] = 0.0  # an all-zero row must not give NaN
    big[7] *= 1e-3  # a row of tiny values
    big[11, 5] = 40.0  # one outlier, clipped at k standard deviations of its row
    return {
        "blocks.0.mlp.fc.weight": big,
        "blocks.0.attn.c_q.weight": (torch.randn(257, 300, generator=g) * 0.1).to(torch.bfloat16),  # back to bf16
        "tok_emb.weight": (torch.randn(290, 240, generator=g) * 0.05).half(),  # int7 table, back to fp16
        "skip_weights": torch.randn(256, 256, generator=g),  # a 2-D control tensor: fp16 path
        "cube.fp32": torch.randn(2, 200, 200, generator=g),  # 3-D: fp16 path
        "small.fp32": torch.randn(10, 7, generator=g) * 3.0,
        "vec.fp32": torch.randn(33, generator=g),
        "scalar.fp32": torch.tensor(1.2345678),
        "small.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "steps.int64": torch.tensor([0, -1, 2**40 + 3, -(2**62), 7], dtype=torch.int64),
        "ids.int32": torch.arange(-5, 65_787, dtype=torch.int32).reshape(257, 256),  # large 2-D int: raw
        "codes.int8": torch.arange(-128, 128, dtype=torch.int8).reshape(16, 16),
    }


def assert_sdclip_bound(name: str, orig: torch.Tensor, got: torch.Tensor, bits: int, k: float) -> None:
    """Round to nearest on the SDClip grid: within the clip the error is at most half a step; beyond
    it the value comes back as +-clip (plus the rounding to the original dtype)."""
    w = orig.float()
    scale = tg.sdclip_scales(w, bits, k).float()[:, None]
    clip = scale * tg.qmax(bits)
    expected = torch.maximum(torch.minimum(w, clip), -clip)
    err = (got.float() - expected).abs()
    tol = scale / 2 * (1 + 1e-3) + w.abs() * torch.finfo(orig.dtype).eps + 1e-12
    worst = (err - tol).max().item()
    assert worst <= 0, f"{name}: round trip error exceeds scale/2 by {worst}"
    assert torch.isfinite(got).all(), name


def is_quantized(name: str, t: torch.Tensor) -> bool:
    return tg.is_quantized(name, t)


def assert_close_to_original(name: str, orig: torch.Tensor, got: torch.Tensor) -> None:
    assert got.dtype == orig.dtype, name
    assert tuple(got.shape) == tuple(orig.shape), name
    if not orig.is_floating_point():
        assert torch.equal(got, orig), f"{name}: non-float tensor not restored exactly"
    elif is_quantized(name, orig):
        group = tg.quant_group(name)
        assert_sdclip_bound(name, orig, got, dict(SPEC.bits)[group], dict(SPEC.clip)[group])
    else:
        assert torch.equal(got, orig.half().to(orig.dtype)), f"{name}: small tensor != its fp16 rounding"


def body_of(blob: bytes) -> bytes:
    """The serialized body, read by hand: compressor id, chunk count, chunk lengths, brotli chunks."""
    assert blob[PREFIX] == tg.ARTIFACT_COMPRESSOR_IDS["brotli"]
    (n,) = struct.unpack_from("<I", blob, PREFIX + 1)
    lengths = struct.unpack_from(f"<{n}I", blob, PREFIX + 5)
    offset = PREFIX + 5 + 4 * n
    assert offset + sum(lengths) == len(blob)
    chunks = []
    for length in lengths:
        chunks.append(brotli.decompress(blob[offset: offset + length]))
        offset += length
    assert all(len(c) == tg.COMPRESS_CHUNK_BYTES for c in chunks[:-1]), "every chunk but the last is full"
    return b"".join(chunks)


def read_header(blob: bytes) -> tuple[dict, bytes]:
    body = body_of(blob)
    (hlen,) = struct.unpack_from("<I", body)
    return json.loads(body[4: 4 + hlen].decode("utf-8")), body[4 + hlen:]


def reprefix(body: bytes, version: int = tg.ARTIFACT_VERSION) -> bytes:
    """A well-formed prefix (magic, version, CRC, length) around an arbitrary brotli-compressed body."""
    chunk = brotli.compress(body, quality=1)
    compressed = bytes([tg.ARTIFACT_COMPRESSOR_IDS["brotli"]]) + struct.pack("<II", 1, len(chunk)) + chunk
    return tg.ARTIFACT_PREFIX.pack(tg.ARTIFACT_MAGIC, version, zlib.crc32(compressed), len(compressed)) + compressed


@pytest.fixture(scope="module")
def gpt_state() -> dict[str, torch.Tensor]:
    return tiny_gpt_state()


@pytest.fixture(scope="module")
def gpt_blob(gpt_state) -> bytes:
    return pack_artifact(gpt_state)


@pytest.fixture(scope="module")
def hand_state() -> dict[str, torch.Tensor]:
    return hand_made_state()


@pytest.fixture(scope="module")
def hand_blob(hand_state) -> bytes:
    return pack_artifact(hand_state)


# ---------------------------------------------------------------------------------------------
# SDClip scales, round to nearest, dequantize_rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, k", [(6, 12.85), (8, 20.0), (7, 14.0), (4, 3.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sdclip_rtn_range_scale_and_error(dtype, bits, k):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-2, 1, 64)[:, None]
    w[5, 17] = -50.0  # an outlier beyond the clip
    w = w.to(dtype)
    scale = tg.sdclip_scales(w, bits, k)
    q = tg.quantize_rtn(w, scale, bits)
    r = tg.qmax(bits)
    assert r == 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and tuple(q.shape) == tuple(w.shape)
    assert scale.dtype == torch.float16 and tuple(scale.shape) == (w.shape[0],)
    assert int(q.min()) >= -r and int(q.max()) <= r, f"values must stay in [-{r}, {r}]"
    # The step is k * std(row) / qmax, rounded to fp16, with the unbiased std the records use (PR #1394, PR #1855).
    assert torch.equal(scale, (k * w.float().std(dim=1) / r).half())
    deq = dequantize_rows(q, scale, torch.float32)
    assert deq.dtype == torch.float32 and dequantize_rows(q, scale, dtype).dtype == dtype
    assert_sdclip_bound("w", w, deq.to(dtype), bits, k)
    beyond = w.float().abs() >= scale.float()[:, None] * r
    assert torch.equal(q[beyond].abs(), torch.full_like(q[beyond], r)), "values past the clip use the grid's end"
    if bits == 4:
        assert beyond[5, 17], "test setup: at k=3 the outlier lies beyond the clip"


def test_larger_k_means_fewer_levels_and_lower_entropy():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    ent = []
    for k in (4.0, 8.0, 16.0):
        q = tg.quantize_rtn(w, tg.sdclip_scales(w, 6, k), 6)
        ent.append(tg.quant_entropy_bytes({"m": tg.QuantTensor("mlp", 6, q, torch.ones(256).half(), torch.float32,
                                                                "rtn")})["mlp"]["entropy_bits_per_param"])
    assert ent[0] > ent[1] > ent[2], ent
    # Doubling k removes about one bit per parameter (PR #1394's entropy argument).
    assert 0.8 < ent[1] - ent[2] < 1.2 and 0.8 < ent[0] - ent[1] < 1.2, ent


def test_quantize_zero_and_tiny_rows_are_finite():
    w = torch.zeros(4, 100)
    w[1] = 1e-30  # far below fp16's range: the scale must not underflow to 0
    w[2, 3] = -1e-7
    w[3] = torch.linspace(-1, 1, 100)
    scale = tg.sdclip_scales(w, 6, 12.0)
    q = tg.quantize_rtn(w, scale, 6)
    assert torch.isfinite(scale.float()).all() and (scale.float() > 0).all()
    deq = dequantize_rows(q, scale, torch.float32)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], torch.zeros(100)), "a zero row must come back exactly zero"
    assert ((deq[3] - w[3]).abs() <= scale.float()[3] / 2 * (1 + 1e-3)).all()


# ---------------------------------------------------------------------------------------------
# byte_shuffle
# ---------------------------------------------------------------------------------------------


def test_byte_shuffle_groups_bytes():
    assert tg.byte_shuffle(bytes([0, 1, 2, 3, 4, 5]), 2) == bytes([0, 2, 4, 1, 3, 5])
    # fp16-like little-endian values: all low bytes first, then all high bytes.
    data = np.array([0x1101, 0x2202, 0x3303], dtype="<u2").tobytes()
    assert tg.byte_shuffle(data, 2) == bytes([0x01, 0x02, 0x03, 0x11, 0x22, 0x33])
    data4 = np.array([0x04030201, 0x14131211], dtype="<u4").tobytes()
    assert tg.byte_shuffle(data4, 4) == bytes([0x01, 0x11, 0x02, 0x12, 0x03, 0x13, 0x04, 0x14])
    assert tg.byte_shuffle(b"abcdef", 1) == b"abcdef"
    assert tg.byte_shuffle(b"", 4) == b""


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_byte_shuffle_roundtrip_whole_values(stride):
    rng = np.random.default_rng(stride)
    for n_values in (0, 1, 2, 3, 7, 64, 1001):
        data = rng.integers(0, 256, n_values * stride, dtype=np.uint8).tobytes()
        shuffled = tg.byte_shuffle(data, stride)
        assert len(shuffled) == len(data)
        assert sorted(shuffled) == sorted(data)
        assert tg.byte_shuffle(shuffled, stride, undo=True) == data


@pytest.mark.parametrize("stride", [2, 4])
def test_byte_shuffle_roundtrip_every_length_residue(stride):
    """Inverse for lengths of every residue mod the stride, not only whole values."""
    rng = np.random.default_rng(100 + stride)
    for k in (0, 1, 5, 50):
        for r in range(1, stride):
            data = rng.integers(0, 256, k * stride + r, dtype=np.uint8).tobytes()
            shuffled = tg.byte_shuffle(data, stride)
            assert len(shuffled) == len(data), (len(data), stride)
            assert tg.byte_shuffle(shuffled, stride, undo=True) == data, (len(data), stride)


# ---------------------------------------------------------------------------------------------
# pack_artifact / unpack_artifact round trips
# ---------------------------------------------------------------------------------------------


def test_roundtrip_real_tiny_gpt(gpt_state, gpt_blob):
    assert any(is_quantized(n, t) for n, t in gpt_state.items()), "test setup: nothing is quantized"
    assert any(not is_quantized(n, t) for n, t in gpt_state.items())
    out = unpack_artifact(gpt_blob, source="tiny.ptz")
    assert sorted(out) == sorted(gpt_state), "same tensor names as the input"
    for name, orig in gpt_state.items():
        assert_close_to_original(name, orig, out[name])

    model = tg.GPT(tiny_config())
    model.load_state_dict(out, strict=True)
    for name, t in model.state_dict().items():
        assert torch.equal(t, out[name]), name
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(ids[:, :-1], ids[:, 1:])
    assert torch.isfinite(loss)


def test_roundtrip_untied_head_zero_rows():
    # The untied head is zero-initialised: 1024 all-zero rows on the quantized path.
    state = tiny_gpt_state(tie_embeddings=False, seed=1)
    with torch.no_grad():
        state["lm_head.weight"].zero_()
    out = unpack_artifact(pack_artifact(state))
    assert torch.equal(out["lm_head.weight"], torch.zeros_like(state["lm_head.weight"]))
    for name, orig in state.items():
        assert_close_to_original(name, orig, out[name])
    tg.GPT(tiny_config(tie_embeddings=False)).load_state_dict(out, strict=True)


def test_roundtrip_hand_made_dict(hand_state, hand_blob):
    out = unpack_artifact(hand_blob)
    assert set(out) == set(hand_state)
    for name, orig in hand_state.items():
        assert_close_to_original(name, orig, out[name])
    assert torch.equal(out["blocks.0.mlp.fc.weight"][3], torch.zeros(256)), "zero row"
    assert out["scalar.fp32"].shape == torch.Size([])
    # The kinds actually chosen by the packer.
    header, _ = read_header(hand_blob)
    kinds = {e["name"]: e["kind"] for e in header["tensors"]}
    bits = {e["name"]: e.get("bits") for e in header["tensors"]}
    assert kinds["blocks.0.mlp.fc.weight"] == kinds["blocks.0.attn.c_q.weight"] == kinds["tok_emb.weight"] == "intq_row"
    assert bits["blocks.0.mlp.fc.weight"] == bits["blocks.0.attn.c_q.weight"] == 6 and bits["tok_emb.weight"] == 7
    assert kinds["skip_weights"] == kinds["cube.fp32"] == kinds["small.fp32"] == kinds["small.bf16"] == "fp16"
    assert kinds["steps.int64"] == kinds["ids.int32"] == kinds["codes.int8"] == "raw"


def test_unpacked_tensors_are_independent_and_writable(hand_blob):
    a = unpack_artifact(hand_blob)
    b = unpack_artifact(hand_blob)
    a["blocks.0.mlp.fc.weight"].add_(1.0)  # must not raise (non-writable buffer) nor alias the other load
    assert not torch.equal(a["blocks.0.mlp.fc.weight"], b["blocks.0.mlp.fc.weight"])


@pytest.mark.slow
def test_pack_is_deterministic_and_order_independent(gpt_state, gpt_blob, hand_state, hand_blob):
    assert pack_artifact(gpt_state) == gpt_blob, "packing the same state twice must give the same bytes"
    assert pack_artifact(dict(reversed(list(gpt_state.items())))) == gpt_blob
    # Another insertion order, fresh tensor objects, and non-contiguous views with the same values.
    rng = np.random.default_rng(7)
    names = list(hand_state)
    order = [names[i] for i in rng.permutation(len(names))]
    assert order != names
    other = {n: (hand_state[n].t().contiguous().t() if hand_state[n].ndim == 2 else hand_state[n].clone())
             for n in order}
    assert not other["blocks.0.mlp.fc.weight"].is_contiguous()
    assert pack_artifact(other) == hand_blob


def test_blob_layout_is_prefix_plus_pickle_free_body(gpt_state, gpt_blob):
    magic, version, crc, length = tg.ARTIFACT_PREFIX.unpack_from(gpt_blob)
    assert PREFIX == 22
    assert magic == tg.ARTIFACT_MAGIC == b"PGOLFART" and version == tg.ARTIFACT_VERSION
    assert length == len(gpt_blob) - PREFIX
    assert crc == zlib.crc32(gpt_blob[PREFIX:])

    body = body_of(gpt_blob)
    assert body[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), "pickle protocol header"
    assert not body.startswith(b"PK"), "torch.save zip container"
    (hlen,) = struct.unpack_from("<I", body)
    assert 0 < hlen < len(body)
    header = json.loads(body[4: 4 + hlen].decode("utf-8"))  # strict JSON, nothing executable
    assert header["format"] == "pgolf-artifact" and header["version"] == tg.ARTIFACT_VERSION
    assert sorted(e["name"] for e in header["tensors"]) == sorted(gpt_state)
    # The payload is exactly the concatenation of the segments the header describes.
    segs = []
    for e in header["tensors"]:
        segs += [e[k] for k in ("q", "scale", "data") if k in e]
    segs.sort(key=lambda s: s["offset"])
    offset = 0
    for s in segs:
        assert s["offset"] == offset
        offset += s["nbytes"]
    assert offset == len(body) - 4 - hlen


# ---------------------------------------------------------------------------------------------
# Damaged artifacts: ArtifactError, one line, naming the file
# ---------------------------------------------------------------------------------------------


def expect_artifact_error(path: Path, *fragments: str) -> str:
    with pytest.raises(tg.ArtifactError) as info:
        recover.read_artifact(tg, path)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg, f"not one line: {msg!r}"
    assert str(path) in msg, f"message does not name the file: {msg!r}"
    for frag in fragments:
        assert frag.lower() in msg.lower(), f"{frag!r} not in {msg!r}"
    return msg


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_good_artifact_reads_back(tmp_path, gpt_blob, gpt_state):
    out, _ = recover.read_artifact(tg, write(tmp_path, "good.ptz", gpt_blob))
    assert set(out) == set(gpt_state)


@pytest.mark.parametrize("cut", [0, 1, 8, 13, 21, 22, 23, 100, "half", "last"])
def test_truncated_artifact(tmp_path, gpt_blob, cut):
    n = {"half": len(gpt_blob) // 2, "last": len(gpt_blob) - 1}.get(cut, cut)
    path = write(tmp_path, f"cut{n}.ptz", gpt_blob[:n])
    expect_artifact_error(path, "truncated")


@pytest.mark.parametrize("where", [0, 1, "middle", "last"])
def test_flipped_body_byte_fails_crc(tmp_path, gpt_blob, where):
    blob = bytearray(gpt_blob)
    pos = PREFIX + {"middle": (len(blob) - PREFIX) // 2, "last": len(blob) - PREFIX - 1}.get(where, where)
    blob[pos] ^= 0x01
    expect_artifact_error(write(tmp_path, f"flip{pos}.ptz", bytes(blob)), "CRC")


def test_flipped_crc_field(tmp_path, gpt_blob):
    blob = bytearray(gpt_blob)
    blob[10] ^= 0x80  # the CRC32 field itself
    expect_artifact_error(write(tmp_path, "crc.ptz", bytes(blob)), "CRC")


def test_wrong_magic(tmp_path, gpt_blob):
    expect_artifact_error(write(tmp_path, "magic.ptz", b"PK\x03\x04" + gpt_blob[4:]), "magic")
    expect_artifact_error(write(tmp_path, "zeros.ptz", bytes(len(gpt_blob))), "magic")


@pytest.mark.parametrize("version", [0, 1, 2, 3, 5, 65535])  # 1: the walking skeleton's int8; 2: one stream; 3: symmetric LQER only
def test_wrong_version(tmp_path, gpt_blob, version):
    blob = bytearray(gpt_blob)
    struct.pack_into("<H", blob, 8, version)
    msg = expect_artifact_error(write(tmp_path, f"v{version}.ptz", bytes(blob)), "version")
    assert str(version) in msg


@pytest.mark.parametrize("pad", [b"\x00", b"\n", b"x" * 1000], ids=["zero-byte", "newline", "1000-bytes"])
def test_padded_artifact(tmp_path, gpt_blob, pad):
    expect_artifact_error(write(tmp_path, f"pad{len(pad)}.ptz", gpt_blob + pad), "padded")


def test_missing_file(tmp_path):
    expect_artifact_error(tmp_path / "nope" / "missing.ptz", "not found")
    expect_artifact_error(tmp_path, "not found")  # a directory is not an artifact either


def test_unpack_names_its_source(gpt_blob):
    with pytest.raises(tg.ArtifactError, match=r"^somewhere/run\.ptz: "):
        unpack_artifact(gpt_blob[:-1], source="somewhere/run.ptz")


CRAFTED_CASES = ["empty body", "header length past the end", "header not JSON", "payload cut", "header is a list",
                 "no tensors key", "unknown dtype", "unknown kind", "shape does not match bytes"]


def crafted_body(hand_blob: bytes, case: str) -> bytes:
    header, payload = read_header(hand_blob)

    def body(h, pl: bytes = payload) -> bytes:
        raw = h.encode() if isinstance(h, str) else json.dumps(h).encode()
        return struct.pack("<I", len(raw)) + raw + pl

    def edited(**changes) -> dict:
        h = json.loads(json.dumps(header))
        next(e for e in h["tensors"] if e["name"] == "small.fp32").update(changes)
        return h

    if case == "empty body":
        return b""
    if case == "header length past the end":
        return struct.pack("<I", 10_000_000) + b"{}"
    if case == "header not JSON":
        return body("not json at all")
    if case == "payload cut":
        return body(header, payload[: len(payload) // 2])
    if case == "header is a list":
        return body([1, 2, 3])
    if case == "no tensors key":
        return body({"format": "pgolf-artifact", "version": 1})
    if case == "unknown dtype":
        return body(edited(dtype="complex128"))
    if case == "unknown kind":
        return body(edited(kind="int4_magic"))
    if case == "shape does not match bytes":
        return body(edited(shape=[11, 7]))
    raise AssertionError(case)


@pytest.mark.parametrize("case", CRAFTED_CASES)
def test_intact_crc_but_inconsistent_body(tmp_path, hand_blob, case):
    """A correct prefix and CRC around a body that is not a valid artifact (another writer, a bug):
    still ArtifactError naming the file, never KeyError/TypeError/RuntimeError or a wrong tensor."""
    blob = reprefix(crafted_body(hand_blob, case))
    expect_artifact_error(write(tmp_path, "crafted.ptz", blob), "corrupted")


# ---------------------------------------------------------------------------------------------
# atomic_write_bytes
# ---------------------------------------------------------------------------------------------


def test_atomic_write_creates_and_replaces_without_temp_files(tmp_path):
    dest = tmp_path / "sub" / "out.bin"  # parent folder is created
    tg.atomic_write_bytes(dest, b"first")
    assert dest.read_bytes() == b"first"
    tg.atomic_write_bytes(dest, b"second, longer content")
    assert dest.read_bytes() == b"second, longer content"
    tg.atomic_write_bytes(dest, b"")
    assert dest.read_bytes() == b""
    assert [p.name for p in dest.parent.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_write_replace_failure_keeps_old_content(tmp_path, monkeypatch, existing):
    dest = tmp_path / "out.bin"
    if existing:
        dest.write_bytes(b"old")

    def boom(src, dst):
        assert Path(src).read_bytes() == b"new", "the temp file is complete before the rename"
        raise OSError("simulated rename failure")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated rename failure"):
        tg.atomic_write_bytes(dest, b"new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out.bin"] if existing else [])
    if existing:
        assert dest.read_bytes() == b"old"


class _FailingFile:
    """Wraps a real file; write() stores half of the data, then raises (disk full midway)."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(28, "simulated: No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()
        return False


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_write_failing_write_keeps_old_content(tmp_path, monkeypatch, existing):
    dest = tmp_path / "out.bin"
    if existing:
        dest.write_bytes(b"old content")
    real_open = open
    opened = []

    def failing_open(path, mode="r", *args, **kwargs):
        opened.append(Path(path))
        return _FailingFile(real_open(path, mode, *args, **kwargs))

    monkeypatch.setattr(tg, "open", failing_open, raising=False)  # shadows the builtin inside train_gpt
    with pytest.raises(OSError, match="No space left"):
        tg.atomic_write_bytes(dest, b"N" * 10_000)
    monkeypatch.undo()
    assert opened and all(p != dest for p in opened), "must write a temp file, never the destination"
    assert all(p.parent == dest.parent for p in opened), "temp file must be in the destination folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out.bin"] if existing else [])
    if existing:
        assert dest.read_bytes() == b"old content"


def test_atomic_write_fsync_failure_keeps_old_content(tmp_path, monkeypatch):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")

    def bad_fsync(fd):
        raise OSError("simulated fsync failure")

    monkeypatch.setattr(os, "fsync", bad_fsync)
    with pytest.raises(OSError, match="fsync"):
        tg.atomic_write_bytes(dest, b"new")
    monkeypatch.undo()
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_eval_only_accepts_only_the_script_file_that_wrote_the_artifact():
    src = Path(tg.__file__).read_bytes()
    h = tg.Hyperparameters.from_env({})
    meta = {"code_sha256": hashlib.sha256(src).hexdigest(), "config": {"NUM_LAYERS": 13}}
    assert recover.eval_only_config(tg, h, meta, src, "a.ptz").num_layers == 13
    with pytest.raises(tg.ArtifactError, match="a.ptz: written by code sha256"):
        recover.eval_only_config(tg, h, meta, b"print(1)\n", "a.ptz")


def test_the_naive_baselines_artifact_int8_at_each_rows_max_and_zlib_round_trips(hand_state):
    """PRESET=baseline's quantization: per-row int8 at each row's largest magnitude (clip sigmas 0), zlib-9."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    scale = tg.sdclip_scales(w, 8, 0.0)
    assert torch.allclose(scale.float(), (w.abs().amax(-1) / 127).half().float())
    q = tg.quantize_rtn(w, scale, 8)
    assert int(q.abs().max()) == 127 and (w - q.float() * scale.float()[:, None]).abs().max() <= scale.float().max()
    h = tg.Hyperparameters.from_env({"PRESET": "baseline"})
    spec = tg.QuantSpec.from_hparams(h)
    blob = pack_artifact(hand_state, spec)
    assert blob[PREFIX] == tg.ARTIFACT_COMPRESSOR_IDS["zlib"]
    (n,) = struct.unpack_from("<I", blob, PREFIX + 1)
    first = PREFIX + 5 + 4 * n
    zlib.decompressobj().decompress(blob[first: first + 64])  # the chunks are zlib streams (raises otherwise)
    out = unpack_artifact(blob)
    assert set(out) == set(hand_state)
    body = tg.decompress_chunks(blob[PREFIX:], "test")
    (hlen,) = struct.unpack_from("<I", body)
    header = json.loads(body[4: 4 + hlen].decode("utf-8"))
    assert header["compressor"] == "zlib"
    assert {e.get("bits") for e in header["tensors"] if e["kind"] == "intq_row"} == {8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_an_empty_tensor_round_trips(dtype):
    """A zero-size tensor packs to a 0-byte segment; unpacking it used to fail (torch.frombuffer refuses 0 bytes)."""
    state = {"w": torch.randn(4, 8), "empty": torch.zeros(0, 3, dtype=dtype)}
    out = unpack_artifact(pack_artifact(state, tg.QuantSpec(method="rtn", compressor="brotli")))
    assert out["empty"].dtype == dtype and out["empty"].shape == (0, 3)
