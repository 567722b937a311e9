"""Data pipeline tests: shard format, validation split, training loader, fingerprint, tokenizer errors.

Run:  python -m pytest -q tests/test_data.py

Everything runs on CPU in a few seconds. The `dataset` fixture (tests/conftest.py) gives real
1024-token shards and their tokenizer (../shared/data when present, else the embedded sample);
the loader's order/partition properties use small synthetic shards of consecutive (globally unique)
token values, so every window identifies the (shard, start) slot it came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from pgolf.shards import write_shard

CPU = torch.device("cpu")
ONE_CPU = tg.DistInfo(0, 1, CPU)  # rank 0 of 1


# ---------------------------------------------------------------- helpers

def write_raw_shard(path: Path, header_ints: list[int], tokens: np.ndarray | bytes) -> Path:
    """Write a shard byte by byte (for malformed files write_shard refuses to produce)."""
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[: len(header_ints)] = header_ints
    body = tokens if isinstance(tokens, bytes) else np.asarray(tokens, dtype="<u2").tobytes()
    path.write_bytes(header.tobytes() + body)
    return path


def assert_names(exc: BaseException, *needles: object) -> str:
    """The message contains every needle: strings/paths verbatim, integers (expected and found
    values) as whole numbers outside the string needles (so digits in a temp path never count)."""
    msg = rest = str(exc)
    for needle in needles:
        if not isinstance(needle, int):
            assert str(needle) in msg, f"{str(needle)!r} not in message: {msg}"
            rest = rest.replace(str(needle), " ")
    for needle in needles:
        if isinstance(needle, int):
            assert re.search(rf"(?<!\d){needle}(?!\d)", rest), f"{needle!r} not in message: {msg}"
    return msg


@contextlib.contextmanager
def open_loader(files, seq_len, micro_seqs, accum, rank=0, world_size=1, seed=1337, vocab_size=1 << 16,
                cls=None):
    loader = (cls or tg.TrainLoader)(list(files), seq_len, micro_seqs, accum, seed, vocab_size,
                                     tg.DistInfo(rank, world_size, CPU))
    try:
        yield loader
    finally:
        loader.close()
    assert not loader._thread.is_alive(), "close() must stop the prefetch thread"


def windows_of(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The (rows, seq_len+1) token windows a batch was cut from (x plus the last target)."""
    return torch.cat([x, y[:, -1:]], dim=1).numpy()


def check_batch(x: torch.Tensor, y: torch.Tensor, micro_seqs: int, seq_len: int) -> None:
    assert x.shape == y.shape == (micro_seqs, seq_len)
    assert x.dtype == y.dtype == torch.int64
    assert x.device.type == "cpu"
    # y is x shifted by one inside the same window
    assert torch.equal(y[:, :-1], x[:, 1:])


def synthetic_shards(tmp_path: Path, sizes: list[int]) -> tuple[list[Path], list[np.ndarray]]:
    """Shards whose tokens are consecutive integers (globally unique): a window's first token
    identifies its shard and start, and a real window is always an arithmetic run."""
    files, arrays, base = [], [], 0
    for i, n in enumerate(sizes):
        tokens = np.arange(base, base + n, dtype=np.int64)
        f = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(f, tokens)
        files.append(f)
        arrays.append(tokens)
        base += n
    assert base <= 1 << 16
    return files, arrays


def slot_of(window: np.ndarray, arrays: list[np.ndarray]) -> tuple[int, int]:
    """(shard index, start) of a window from synthetic_shards; asserts it is a real contiguous slice."""
    first = int(window[0])
    for sid, tokens in enumerate(arrays):
        if tokens[0] <= first <= tokens[-1]:
            start = first - int(tokens[0])
            assert start + window.size <= tokens.size, f"window {window} runs past the end of shard {sid}"
            np.testing.assert_array_equal(window, tokens[start: start + window.size])
            return sid, start
    raise AssertionError(f"window {window} is not from any shard")


def step_slots(files, arrays, seq_len, micro_seqs, accum, world_size, steps, seed=7) -> list[list[list[tuple]]]:
    """slots[k][rank] = the (shard, start) slots rank `rank` is fed in global step k (all micro-batches)."""
    out = [[[] for _ in range(world_size)] for _ in range(steps)]
    for rank in range(world_size):
        with open_loader(files, seq_len, micro_seqs, accum, rank, world_size, seed) as loader:
            for k in range(steps):
                for _ in range(accum):
                    x, y, _ = loader.next_batch()
                    check_batch(x, y, micro_seqs, seq_len)
                    out[k][rank].extend(slot_of(w, arrays) for w in windows_of(x, y))
    return out


# ---------------------------------------------------------------- shard format

def test_shard_round_trip_header_size_and_atomic_write(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1 << 16, size=1001, dtype=np.int64)
    tokens[:2] = (0, 65535)  # both ends of uint16
    path = tmp_path / "shards" / "fineweb_train_000000.bin"  # the folder is created
    write_shard(path, tokens)

    raw = path.read_bytes()
    assert len(raw) == path.stat().st_size == 256 * 4 + 2 * tokens.size
    assert struct.unpack_from("<3i", raw, 0) == (20240520, 1, tokens.size)
    assert raw[12:1024] == bytes(1024 - 12), "header ints 3..255 must be zero"
    assert raw[1024:] == tokens.astype("<u2").tobytes(), "tokens are little-endian uint16"
    assert tg.read_shard_header(path) == tokens.size

    loaded = tg.load_shard(path)
    assert loaded.dtype == np.dtype("<u2") and loaded.shape == tokens.shape
    np.testing.assert_array_equal(np.asarray(loaded, dtype=np.int64), tokens)
    del loaded
    # atomic: nothing but the shard in its folder (no .tmp file left behind)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    # overwrite in place, and an empty shard
    write_shard(path, tokens[:10])
    np.testing.assert_array_equal(np.asarray(tg.load_shard(path), dtype=np.int64), tokens[:10])
    empty = tmp_path / "shards" / "fineweb_val_000000.bin"
    write_shard(empty, np.zeros(0, dtype=np.int64))
    assert empty.stat().st_size == 1024 and tg.load_shard(empty).size == 0
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, empty.name])


def test_write_shard_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(5))
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(tg.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_shard(path, np.arange(50))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # out-of-range ids are refused before anything is written
    with pytest.raises(ValueError):
        write_shard(tmp_path / "neg.bin", np.array([1, -1]))
    with pytest.raises(ValueError):
        write_shard(tmp_path / "big.bin", np.array([65536]))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_bad_magic(tmp_path):
    path = write_raw_shard(tmp_path / "fineweb_train_000000.bin", [12345, 1, 4], np.arange(4))
    for fn in (tg.read_shard_header, tg.load_shard):
        with pytest.raises(tg.DataError) as ei:
            fn(path)
        assert_names(ei.value, path, "magic", 20240520, 12345)
    assert issubclass(tg.DataError, tg.ConfigError)


def test_bad_version(tmp_path):
    path = write_raw_shard(tmp_path / "fineweb_train_000000.bin", [20240520, 7, 4], np.arange(4))
    with pytest.raises(tg.DataError) as ei:
        tg.load_shard(path)
    msg = assert_names(ei.value, path, "version", 7)
    assert re.search(r"expected\D*1\b", msg) and re.search(r"found\D*7\b", msg), msg


@pytest.mark.parametrize("count, body_tokens, extra", [
    (100, 50, b""),      # truncated: header promises more tokens than the file holds
    (10, 20, b""),       # trailing data
    (10, 10, b"\x00"),   # odd trailing byte
    (-1, 0, b""),        # negative count
])
def test_size_mismatch(tmp_path, count, body_tokens, extra):
    path = write_raw_shard(tmp_path / "fineweb_val_000000.bin", [20240520, 1, count],
                           np.arange(body_tokens).astype("<u2").tobytes() + extra)
    size = 1024 + 2 * body_tokens + len(extra)
    with pytest.raises(tg.DataError) as ei:
        tg.load_shard(path)
    # names the file, the size the header implies and the size found
    assert_names(ei.value, path, 1024 + 2 * count, size)


def test_file_shorter_than_header(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(struct.pack("<3i", 20240520, 1, 0) + bytes(88))  # 100 bytes
    with pytest.raises(tg.DataError) as ei:
        tg.load_shard(path)
    assert_names(ei.value, path, 100, 1024)
    path.write_bytes(b"")
    with pytest.raises(tg.DataError) as ei:
        tg.read_shard_header(path)
    assert_names(ei.value, path, 0, 1024)


def test_list_shards_sorted_and_empty(tmp_path):
    with pytest.raises(tg.DataError) as ei:
        tg.list_shards(tmp_path, "train")
    assert_names(ei.value, tmp_path / "fineweb_train_*.bin", "no files")
    for name in ("fineweb_train_000002.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin",
                 "fineweb_train_000001.bin", "other.bin", "fineweb_val_bytes_000000.bin"):  # a CaseOps sidecar
        write_shard(tmp_path / name, np.arange(3))
    assert [p.name for p in tg.list_shards(tmp_path, "train")] == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [p.name for p in tg.list_shards(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    with pytest.raises(tg.DataError):
        tg.list_shards(tmp_path / "missing_dir", "val")


# ---------------------------------------------------------------- token range and validation split

def test_check_token_range_1d_and_2d():
    tg.check_token_range(np.array([0, 5, 9], dtype=np.uint16), 10, "ok")
    tg.check_token_range(np.zeros((0,), dtype=np.uint16), 10, "empty")
    with pytest.raises(tg.DataError) as ei:
        tg.check_token_range(np.array([0, 5, 10, 3], dtype=np.uint16), 10, "shard.bin")
    assert_names(ei.value, "shard.bin", 10, "VOCAB_SIZE")
    # The training loader calls it on a 2-D (rows, seq_len+1) block: it must raise DataError there too.
    block = np.array([[1, 2, 3], [4, 70, 6]], dtype=np.uint16)
    with pytest.raises(tg.DataError) as ei:
        tg.check_token_range(block, 64, "train.bin")
    assert_names(ei.value, "train.bin", 70, 64)


def test_validation_token_out_of_range(tmp_path):
    good = tmp_path / "fineweb_val_000000.bin"
    bad = tmp_path / "fineweb_val_000001.bin"
    write_shard(good, np.arange(50) % 100)
    tokens = np.arange(50) % 100
    tokens[17] = 100
    write_shard(bad, tokens)
    with pytest.raises(tg.DataError) as ei:
        tg.load_validation_tokens(tg.list_shards(tmp_path, "val"), 8, 100)
    msg = assert_names(ei.value, bad, 100, "VOCAB_SIZE")
    assert str(good) not in msg
    assert tg.load_validation_tokens([good], 8, 100).size == 49


def test_load_validation_tokens_concat_sorted_and_truncated(tmp_path):
    parts = {1: np.arange(1000, 1040), 0: np.arange(0, 30), 2: np.arange(2000, 2031)}  # 101 tokens
    for i, toks in parts.items():  # written out of order
        write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", toks)
    files = tg.list_shards(tmp_path, "val")
    full = np.concatenate([parts[0], parts[1], parts[2]])
    for seq in (1, 7, 10, 50, 100):
        out = tg.load_validation_tokens(files, seq, 4096)
        n = ((full.size - 1) // seq) * seq + 1
        assert out.size == n, seq
        np.testing.assert_array_equal(out.astype(np.int64), full[:n])
        assert out.flags.c_contiguous


def test_validation_shorter_than_one_sequence(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(64))
    assert tg.load_validation_tokens([path], 63, 1024).size == 64  # exactly one sequence + 1
    for seq in (64, 1000):
        with pytest.raises(tg.DataError) as ei:
            tg.load_validation_tokens([path], seq, 1024)
        assert_names(ei.value, tmp_path, 64, seq, "EVAL_SEQ_LEN")


# ---------------------------------------------------------------- training loader

def test_loader_batches_are_real_shifted_windows(dataset):
    files = tg.list_shards(dataset["dir"], "train")
    shards = [np.asarray(tg.load_shard(f), dtype=np.int64) for f in files]
    seq, micro, accum = 32, 4, 2
    offs = np.arange(seq + 1)
    with open_loader(files, seq, micro, accum, vocab_size=dataset["vocab_size"]) as loader:
        for _ in range(12):
            x, y, _ = loader.next_batch()
            check_batch(x, y, micro, seq)
            assert int(x.max()) < dataset["vocab_size"] and int(x.min()) >= 0
            for w in windows_of(x, y):
                found = False
                for tokens in shards:  # a contiguous slice of one shard
                    cand = np.flatnonzero(tokens[: tokens.size - seq] == w[0])
                    if cand.size and (tokens[cand[:, None] + offs] == w).all(axis=1).any():
                        found = True
                        break
                assert found, f"window {w[:8]}... is not a contiguous slice of any shard"


def test_loader_deterministic_and_seed_dependent(dataset):
    files = tg.list_shards(dataset["dir"], "train")

    def first_batches(seed, n=6):
        with open_loader(files, 16, 3, 2, seed=seed, vocab_size=dataset["vocab_size"]) as loader:
            return [torch.cat(loader.next_batch()[:2], dim=1) for _ in range(n)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b)), "same seed must give identical batches"
    assert not all(torch.equal(p, q) for p, q in zip(a, c)), "different seeds must give different orders"


@pytest.mark.parametrize("micro_seqs", [1, 3])
def test_loader_world_size_invariance(tmp_path, micro_seqs):
    files, arrays = synthetic_shards(tmp_path, [700, 523, 900])
    seq, steps = 16, 4
    runs = {w: step_slots(files, arrays, seq, micro_seqs, 4 // w, w, steps) for w in (1, 2, 4)}
    for k in range(steps):
        union = {w: sorted(s for rank in runs[w][k] for s in rank) for w in runs}
        assert len(union[1]) == 4 * micro_seqs
        assert len(set(union[1])) == len(union[1]), "a step never repeats a slot"
        assert union[2] == union[1] and union[4] == union[1], f"step {k}: data depends on world size"
        r0, r1 = set(runs[2][k][0]), set(runs[2][k][1])
        assert len(r0) == len(r1) == 2 * micro_seqs and not (r0 & r1), "world 2: rank chunks overlap"
    # consecutive steps use different slots
    assert not set(s for r in runs[1][0] for s in r) & set(s for r in runs[1][1] for s in r)


def test_loader_refills_epochs_with_new_order(tmp_path):
    # Shards of 2*seq+1 tokens get phase 0, so an epoch is exactly 12 slots = 6 steps of 2.
    seq = 8
    files, arrays = synthetic_shards(tmp_path, [2 * seq + 1] * 6)
    epochs = []
    with open_loader(files, seq, 2, 1, seed=3) as loader:
        for e in range(4):
            order = []
            for _ in range(6):
                x, y, _ = loader.next_batch()
                check_batch(x, y, 2, seq)
                order.extend(slot_of(w, arrays) for w in windows_of(x, y))
            epochs.append(order)
    every_slot = sorted((sid, k * seq) for sid in range(6) for k in range(2))
    for order in epochs:
        assert sorted(order) == every_slot, "each epoch visits every slot exactly once"
    assert len({tuple(o) for o in epochs}) == 4, "each epoch must have a different order"


def test_loader_tiny_single_shard_many_epochs(tmp_path):
    # One shard of 81 tokens, seq 8: 9 or 10 slots per epoch depending on the random phase.
    seq = 8
    files, arrays = synthetic_shards(tmp_path, [81])
    seen, phases = [], set()
    with open_loader(files, seq, 2, 1, seed=11) as loader:
        for _ in range(60):  # >= 12 epochs
            x, y, _ = loader.next_batch()
            check_batch(x, y, 2, seq)
            for w in windows_of(x, y):
                _, start = slot_of(w, arrays)
                seen.append(start)
                phases.add(start % seq)
    assert len(seen) == 120
    assert len(phases) > 1, "the random phase must change between epochs"


@pytest.mark.parametrize("sizes, micro_seqs, accum", [([25], 3, 1), ([33, 33, 33], 4, 3)])
def test_loader_never_returns_unfilled_rows_when_an_epoch_is_short(tmp_path, sizes, micro_seqs, accum):
    """Shards of k*seq+1 tokens hold k slots at phase 0 but k-1 at any other phase. When the data is
    just one step's worth, the loader must either refuse it up front (DataError) or keep returning
    real windows -- never rows of its ring buffer that no window was copied into."""
    seq = 8
    files, arrays = synthetic_shards(tmp_path, sizes)
    try:
        loader = tg.TrainLoader(files, seq, micro_seqs, accum, 0, 1 << 16, ONE_CPU)
    except tg.DataError as exc:
        assert_names(exc, "fineweb_train_*.bin")
        return
    try:
        for _ in range(12):
            for _ in range(accum):
                x, y, _ = loader.next_batch()
                check_batch(x, y, micro_seqs, seq)
                for w in windows_of(x, y):
                    slot_of(w, arrays)  # fails on uninitialised / stale rows
    finally:
        loader.close()


def test_loader_raises_data_error_for_bad_token_naming_the_shard(tmp_path):
    vocab, seq = 1000, 8
    good, bad = tmp_path / "fineweb_train_000000.bin", tmp_path / "fineweb_train_000001.bin"
    write_shard(good, np.arange(200) % vocab)
    tokens = np.arange(200) % vocab
    tokens[100] = vocab + 5  # covered by a window in every epoch (phase < seq)
    write_shard(bad, tokens)
    returned = 0
    with open_loader([good, bad], seq, 2, 1, seed=5, vocab_size=vocab) as loader:
        with pytest.raises(tg.DataError) as ei:
            for _ in range(30):  # one epoch is < 25 steps
                x, y, _ = loader.next_batch()
                assert int(torch.cat([x, y], 1).max()) < vocab, "a bad id reached the model"
                returned += 1
    msg = assert_names(ei.value, bad, vocab + 5, vocab)
    assert str(good) not in msg
    assert returned < 25


def test_loader_wait_seconds_accumulates(tmp_path):
    files, _ = synthetic_shards(tmp_path, [500])

    class SlowLoader(tg.TrainLoader):
        def _fill(self, out, shard_ids, starts):
            import time
            time.sleep(0.05)
            super()._fill(out, shard_ids, starts)

    with open_loader(files, 8, 2, 1, cls=SlowLoader) as loader:
        assert loader.wait_seconds == 0.0
        history = []
        for _ in range(4):
            loader.next_batch()
            history.append(loader.wait_seconds)
    assert history == sorted(history)
    assert history[-1] >= 0.1, f"the consumer waited ~0.2 s for a slow producer, recorded {history}"


def test_loader_too_little_data(tmp_path):
    files, _ = synthetic_shards(tmp_path, [17])  # 2*seq+1 tokens: exactly 2 windows, no random phase
    with pytest.raises(tg.DataError) as ei:
        tg.TrainLoader(files, 8, 3, 1, 0, 1 << 16, ONE_CPU)
    assert_names(ei.value, tmp_path / "fineweb_train_*.bin", 2, 3)
    with pytest.raises(tg.DataError):  # 2 ranks x 1 micro-batch of 2 sequences
        tg.TrainLoader(files, 8, 2, 1, 0, 1 << 16, tg.DistInfo(0, 2, CPU))
    with open_loader(files, 8, 2, 1) as loader:  # exactly enough
        check_batch(*loader.next_batch()[:2], 2, 8)


# ---------------------------------------------------------------- fingerprint and tokenizer

def test_dataset_fingerprint(dataset):
    train = tg.list_shards(dataset["dir"], "train")
    val = tg.list_shards(dataset["dir"], "val")
    fp = tg.dataset_fingerprint(train, val, dataset["tokenizer"])
    assert fp["train_shards"] == len(train) >= 1
    assert fp["val_shards"] == len(val) >= 1
    assert fp["train_tokens"] == sum((f.stat().st_size - 1024) // 2 for f in train)
    assert fp["train_tokens"] == sum(tg.load_shard(f).size for f in train)
    assert fp["val_tokens_raw"] == sum(tg.load_shard(f).size for f in val)
    assert fp["tokenizer"] == str(dataset["tokenizer"])
    assert fp["tokenizer_sha256"] == hashlib.sha256(Path(dataset["tokenizer"]).read_bytes()).hexdigest()
    assert fp["val_sha256"] == hashlib.sha256(b"".join(f.read_bytes() for f in val)).hexdigest()


def test_load_tokenizer_errors(dataset, tmp_path):
    path = Path(dataset["tokenizer"])
    sp = tg.load_tokenizer(path, dataset["vocab_size"])
    assert sp.vocab_size() == dataset["vocab_size"]
    with pytest.raises(tg.DataError) as ei:
        tg.load_tokenizer(path, 512)
    assert_names(ei.value, path, 512, dataset["vocab_size"])
    missing = tmp_path / "no_such_tokenizer.model"
    with pytest.raises(tg.DataError) as ei:
        tg.load_tokenizer(missing, 1024)
    assert_names(ei.value, missing)
    assert not missing.exists()
    assert os.path.isfile(path)


def test_the_writer_in_pgolf_and_the_reader_in_train_gpt_agree_on_the_format(tmp_path):
    from pgolf import shards
    assert (shards.SHARD_MAGIC, shards.SHARD_VERSION, shards.SHARD_HEADER_INTS, shards.SHARD_TOKEN_DTYPE) == (
        tg.SHARD_MAGIC, tg.SHARD_VERSION, tg.SHARD_HEADER_INTS, tg.SHARD_TOKEN_DTYPE)
    tokens = np.array([1, 0, 65535, 7], dtype=np.uint16)
    write_shard(tmp_path / "s.bin", tokens)
    assert tg.read_shard_header(tmp_path / "s.bin") == 4 and np.array_equal(tg.load_shard(tmp_path / "s.bin"), tokens)


def test_make_sample_refuses_a_vocabulary_it_cannot_hold_in_one_line(tmp_path):
    import subprocess
    import sys

    tool = Path(tg.__file__).parent / "data" / "make_sample.py"
    for vocab in ("100000", "200"):  # past uint16 shards; fewer pieces than the 256 byte pieces + 4 specials
        r = subprocess.run([sys.executable, str(tool), "--vocab-size", vocab, "--data-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.splitlines() == [
            f"error: --vocab-size={vocab} is not allowed: expected an integer in (260, 65536)"], r.stderr
    assert not (tmp_path / "datasets").exists()
