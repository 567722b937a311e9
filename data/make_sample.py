"""Offline, deterministic sample dataset for smoke-testing the training stack.

The real challenge data (FineWeb shards + a SentencePiece tokenizer) is large
and has to be downloaded. For `PRESET=smoke python train_gpt.py` we instead
build a tiny stand-in from English text that ships with every CPython
installation, so the smoke run works without a network:

  * the pydoc help topics (`pydoc_data.topics.topics`), and
  * docstrings of standard-library modules, classes and functions, read
    with `ast` from the stdlib `.py` files.

From that text we train a SentencePiece BPE tokenizer with the challenge
recipe and write shards in the challenge binary format (via
`pgolf.shards.write_shard`):

  DATA_DIR/datasets/sample_sp{V}/fineweb_val_000000.bin
  DATA_DIR/datasets/sample_sp{V}/fineweb_train_000000.bin
  DATA_DIR/datasets/sample_sp{V}/fineweb_train_000001.bin
  DATA_DIR/datasets/sample_sp{V}/manifest.json      (written last)
  DATA_DIR/tokenizers/sample_{V}_bpe.model
  DATA_DIR/tokenizers/sample_{V}_bpe.vocab

The output is byte-identical on every run with the same Python version
(and SentencePiece version). A build takes a few seconds and is reused
afterwards as long as the manifest and the files it lists are intact.

Usage:
  python data/make_sample.py [--data-dir DIR] [--vocab-size N] [--force]

or from Python:
  from data.make_sample import build_sample
  dataset_dir, tokenizer_path = build_sample("data", vocab_size=1024)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:  # imported lazily at run time; only needed for hints here
    import sentencepiece as spm

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

DEFAULT_DATA_DIR = Path(__file__).resolve().parent
DEFAULT_VOCAB_SIZE = 1024

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "parameter-golf-sample"
MANIFEST_VERSION = 1

# ~1.2 MB of UTF-8 text: large enough for a 1024-piece BPE and a few hundred
# thousand tokens, small enough that the whole build stays well under 20 s.
TEXT_CAP_BYTES = 1_200_000

# Documents are packed from paragraphs to land roughly in 1-4 KB, like short
# web documents: flush once a document reaches the target size, and never
# grow one past the maximum by appending another paragraph.
DOC_TARGET_BYTES = 2048
DOC_MAX_BYTES = 4096
# A group's short leftover (a small pydoc topic, a module with one short
# docstring) is carried into the next group instead of becoming a tiny doc.
DOC_MIN_BYTES = 1024

# Fixed seed for the two deterministic shuffles (stdlib file order and final
# document order). random.Random(int).shuffle is stable across Python versions.
SHUFFLE_SEED = 1337

# Stdlib directories that are not English prose or not part of the stdlib
# proper (third-party packages, test suites, GUI/IDE code, bundled wheels).
SKIP_STDLIB_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test",
    "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "__pycache__",
})

VAL_FRACTION = 0.10
NUM_TRAIN_SHARDS = 2
# Smoke runs evaluate a few 256-token sequences; make sure val can hold them.
MIN_VAL_TOKENS = 4096

BOS_ID = 1
MAX_UINT16_VOCAB = 2 ** 16

# SentencePiece "meta space" that marks word starts; byte counting in the
# evaluation relies on it existing as a real piece.
SP_SPACE_PIECE = "\u2581"

Log = Callable[[str], None]

CLI_DESCRIPTION = "Build the offline sample dataset and tokenizer for smoke runs."


# --------------------------------------------------------------------------
# Text collection
# --------------------------------------------------------------------------

def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _split_oversized(text: str, max_bytes: int) -> list[str]:
    """Split one unit that is longer than max_bytes on paragraphs, then lines,
    then raw characters, so no produced piece exceeds max_bytes by much."""
    if _utf8_len(text) <= max_bytes:
        return [text]
    for sep in ("\n\n", "\n"):
        parts = [p for p in text.split(sep) if p.strip()]
        if len(parts) > 1:
            return _pack(parts, sep, DOC_TARGET_BYTES, max_bytes)
    # A single enormous line: cut by characters (max_bytes chars >= max_bytes
    # bytes only for non-ASCII text, where "roughly" is good enough).
    return [text[i:i + max_bytes] for i in range(0, len(text), max_bytes)]


def _pack(units: Iterable[str], sep: str, target_bytes: int, max_bytes: int) -> list[str]:
    """Greedily join consecutive units with `sep` into chunks of about
    target_bytes, never exceeding max_bytes by joining."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for unit in units:
        for piece in _split_oversized(unit, max_bytes):
            piece_size = _utf8_len(piece)
            if current and size + len(sep) + piece_size > max_bytes:
                chunks.append(sep.join(current))
                current, size = [], 0
            size += piece_size + (len(sep) if current else 0)
            current.append(piece)
            if size >= target_bytes:
                chunks.append(sep.join(current))
                current, size = [], 0
    if current:
        chunks.append(sep.join(current))
    return chunks


def _pack_groups(groups: Iterable[list[str]]) -> Iterator[str]:
    """Pack each group (one pydoc topic's paragraphs, one module's
    docstrings) into documents. A leftover shorter than DOC_MIN_BYTES is
    carried over and packed with the next group."""
    carry: list[str] = []
    for units in groups:
        chunks = _pack([*carry, *units], "\n\n", DOC_TARGET_BYTES, DOC_MAX_BYTES)
        carry = []
        if chunks and _utf8_len(chunks[-1]) < DOC_MIN_BYTES:
            carry = [chunks.pop()]
        yield from chunks
    yield from carry


def _pydoc_documents() -> list[str]:
    """The pydoc topics in name order, split on blank-line paragraphs."""
    from pydoc_data.topics import topics  # ships with CPython

    return list(_pack_groups(
        [p for p in topics[name].split("\n\n") if p.strip()] for name in sorted(topics)
    ))


def _stdlib_source_files() -> list[Path]:
    """Stdlib .py files in a deterministic (sorted, then seeded-shuffled)
    order. Shuffling means the text cap samples modules from the whole
    alphabet instead of only the first few letters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of site-packages (can be huge).
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_STDLIB_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    random.Random(SHUFFLE_SEED).shuffle(files)
    return files


def _module_docstrings(path: Path) -> list[str]:
    """Docstrings of the module and all its classes/functions, in source
    order. Returns [] for files that cannot be parsed."""
    try:
        with warnings.catch_warnings():
            # Newer Pythons warn about odd escapes in some stdlib sources.
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    doc_nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, doc_nodes):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append((getattr(node, "lineno", 0), getattr(node, "col_offset", 0), doc))
    found.sort()  # ast.walk is breadth-first; we want source order
    return [doc for _, _, doc in found]


def _docstring_groups() -> Iterator[list[str]]:
    """Each stdlib module's new (not seen before) docstrings, as one group."""
    seen: set[str] = set()
    for path in _stdlib_source_files():
        fresh = []
        for doc in _module_docstrings(path):
            # Many docstrings repeat (overrides, aliases); keep the first one.
            if doc not in seen:
                seen.add(doc)
                fresh.append(doc)
        if fresh:
            yield fresh


def _docstring_documents(budget_bytes: int) -> Iterator[str]:
    """Documents packed from stdlib docstrings, stopping once budget_bytes
    are produced: parsing is the slowest part of collecting the text, so we
    parse only as many modules as the cap needs."""
    produced = 0
    for doc in _pack_groups(_docstring_groups()):
        if produced >= budget_bytes:
            return
        produced += _utf8_len(doc)
        yield doc


def collect_documents(text_cap_bytes: int = TEXT_CAP_BYTES) -> list[str]:
    """The deterministic document list: pydoc topics first, then stdlib
    docstrings, cleaned, deduplicated, capped at text_cap_bytes, and finally
    shuffled with a fixed seed so the validation prefix is a mixed sample."""
    pydoc_docs = _pydoc_documents()
    pydoc_bytes = sum(_utf8_len(d) for d in pydoc_docs)
    candidates = [*pydoc_docs, *_docstring_documents(max(0, text_cap_bytes - pydoc_bytes))]

    docs: list[str] = []
    seen: set[str] = set()
    total = 0
    for raw in candidates:
        # NUL would be a problem for line-based tooling; shard text is prose.
        doc = raw.replace("\0", " ").strip()
        if not doc or doc in seen:
            continue
        size = _utf8_len(doc)
        if total + size > text_cap_bytes:
            break
        seen.add(doc)
        docs.append(doc)
        total += size
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return docs


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def train_tokenizer(docs: list[str], model_path: Path, vocab_size: int) -> spm.SentencePieceProcessor:
    """Train the challenge-recipe SentencePiece BPE; writes model_path
    (.model) and its .vocab next to it, and returns the loaded model."""
    import sentencepiece as spm

    # One sentence per non-empty line: SentencePiece's unit of training
    # (and its default max_sentence_length is ~4 KB, shorter than some docs).
    sentences = [line for doc in docs for line in doc.splitlines() if line.strip()]
    # Train in memory rather than with model_prefix: the trainer records
    # model_prefix (our random temp path) inside the model, which would make
    # the .model bytes differ on every build and between data dirs.
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model_bytes,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,
        character_coverage=0.999,
        hard_vocab_limit=False,
        pad_id=0,
        bos_id=BOS_ID,
        eos_id=2,
        unk_id=3,
        input_sentence_size=0,  # use every sentence; the corpus is tiny
        shuffle_input_sentence=False,
        num_threads=1,  # multi-threaded training is not reproducible
        minloglevel=2,  # keep the trainer's progress chatter off stderr
    )
    model_path.write_bytes(model_bytes.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    # Same "piece<TAB>score" format SentencePiece writes itself (C++ default
    # float formatting == Python's :g for these scores); for humans only.
    model_path.with_suffix(".vocab").write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size())),
        encoding="utf-8",
    )
    if sp.vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer has {sp.vocab_size()} pieces, expected {vocab_size}: the sample "
            f"text ({TEXT_CAP_BYTES} bytes cap) is too small for this vocabulary size"
        )
    if sp.piece_to_id(SP_SPACE_PIECE) == sp.unk_id():
        raise RuntimeError(
            f"tokenizer has no {SP_SPACE_PIECE!r} piece; byte accounting needs it"
        )
    if sp.bos_id() != BOS_ID:
        raise RuntimeError(f"tokenizer bos_id is {sp.bos_id()}, expected {BOS_ID}")
    return sp


# --------------------------------------------------------------------------
# Shards, manifest, install
# --------------------------------------------------------------------------

def _pgolf():
    """The repository's pgolf package (its shard writer and its one lock helper), imported from the repo root
    (the parent of data/) only when needed."""
    repo_root = Path(__file__).resolve().parent.parent
    if str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
    import pgolf.locks
    import pgolf.shards

    return pgolf


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _encode_documents(sp: spm.SentencePieceProcessor, docs: list[str]) -> list[np.ndarray]:
    """[BOS] + ids for each document (no EOS, like the challenge shards)."""
    encoded = [np.array([BOS_ID, *ids], dtype=np.int64) for ids in sp.encode(docs)]
    if any(int(t.max()) >= MAX_UINT16_VOCAB for t in encoded):
        raise ValueError("token id does not fit the uint16 shard format")
    return encoded


def _shard_boundaries(doc_lengths: list[int], num_shards: int) -> list[int]:
    """Document indices cutting the docs into num_shards contiguous runs of
    about equal token count, each holding at least one document."""
    if len(doc_lengths) < num_shards:
        raise RuntimeError(f"need at least {num_shards} documents, got {len(doc_lengths)}")
    cumulative = np.cumsum(doc_lengths)
    cuts = [0]
    for s in range(1, num_shards):
        cut = int(np.searchsorted(cumulative, cumulative[-1] * s / num_shards)) + 1
        # Keep every shard non-empty on both sides of the cut.
        cut = min(max(cut, cuts[-1] + 1), len(doc_lengths) - (num_shards - s))
        cuts.append(cut)
    cuts.append(len(doc_lengths))
    return cuts


def _manifest_is_valid(manifest_path: Path, data_dir: Path, vocab_size: int) -> bool:
    """True if the manifest parses, matches vocab_size, and every file it
    lists exists with the recorded size (sizes are cheap; no re-hashing)."""
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("vocab_size") != vocab_size:
            return False
        files = manifest["files"]
        if not files:
            return False
        for rel, info in files.items():
            path = data_dir / rel
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _paths(data_dir: Path, vocab_size: int) -> tuple[Path, Path]:
    dataset_dir = data_dir / "datasets" / f"sample_sp{vocab_size}"
    tokenizer_path = data_dir / "tokenizers" / f"sample_{vocab_size}_bpe.model"
    return dataset_dir, tokenizer_path


def build_sample(
    data_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    log: Log = print,
    force: bool = False,
) -> tuple[Path, Path]:
    """Build (or reuse) the sample dataset and tokenizer under data_dir.

    Returns (dataset_dir, tokenizer_path). Reuses an existing build when its
    manifest and listed files are intact, unless force=True. Files are built
    in a temporary directory and moved into place at the end, manifest last,
    so an interrupted build never looks complete.
    """
    if not 256 + 4 < vocab_size < MAX_UINT16_VOCAB:
        # byte_fallback needs 256 byte pieces + 4 specials; shards are uint16.
        raise ValueError(f"expected an integer in (260, {MAX_UINT16_VOCAB})")
    data_dir = Path(data_dir).resolve()
    dataset_dir, tokenizer_path = _paths(data_dir, vocab_size)
    manifest_path = dataset_dir / MANIFEST_NAME
    datasets_root = dataset_dir.parent
    datasets_root.mkdir(parents=True, exist_ok=True)
    tokenizer_path.parent.mkdir(parents=True, exist_ok=True)

    if not force and _manifest_is_valid(manifest_path, data_dir, vocab_size):
        log(f"make_sample: reusing {dataset_dir} (manifest intact)")
        return dataset_dir, tokenizer_path

    with _pgolf().locks.exclusive(datasets_root / f".sample_sp{vocab_size}.lock"):  # one builder at a time
        # Another process may have finished the build while we waited.
        if not force and _manifest_is_valid(manifest_path, data_dir, vocab_size):
            log(f"make_sample: reusing {dataset_dir} (built concurrently)")
            return dataset_dir, tokenizer_path
        build_prefix = f".sample_sp{vocab_size}.build-"
        # Holding the lock, any earlier build dir is debris from a killed run.
        for debris in datasets_root.glob(build_prefix + "*"):
            shutil.rmtree(debris, ignore_errors=True)
        # Same filesystem as the destination, so the final moves are renames.
        tmp_dir = Path(tempfile.mkdtemp(prefix=build_prefix, dir=datasets_root))
        try:
            _build_into(tmp_dir, data_dir, vocab_size, log)
            _install(tmp_dir, data_dir, dataset_dir, tokenizer_path, log)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return dataset_dir, tokenizer_path


def _build_into(tmp_dir: Path, data_dir: Path, vocab_size: int, log: Log) -> None:
    """Build every output file (and the manifest) inside tmp_dir, laid out
    with the same relative paths as under data_dir."""
    t_start = time.perf_counter()
    dataset_rel, tokenizer_rel = (p.relative_to(data_dir) for p in _paths(data_dir, vocab_size))
    (tmp_dir / dataset_rel).mkdir(parents=True)
    (tmp_dir / tokenizer_rel.parent).mkdir(parents=True)

    docs = collect_documents()
    text_bytes = sum(_utf8_len(d) for d in docs)
    log(f"make_sample: {len(docs)} documents, {text_bytes} text bytes "
        f"({time.perf_counter() - t_start:.1f}s)")

    n_val = math.ceil(len(docs) * VAL_FRACTION)
    splits = {"val": docs[:n_val], "train": docs[n_val:]}

    t_tok = time.perf_counter()
    sp = train_tokenizer(docs, tmp_dir / tokenizer_rel, vocab_size)
    log(f"make_sample: trained {vocab_size}-piece BPE tokenizer in "
        f"{time.perf_counter() - t_tok:.1f}s")

    encoded = {split: _encode_documents(sp, split_docs) for split, split_docs in splits.items()}
    val_tokens = sum(len(t) for t in encoded["val"])
    if val_tokens <= MIN_VAL_TOKENS:
        raise RuntimeError(f"val split has only {val_tokens} tokens; need more than {MIN_VAL_TOKENS}")

    shards = _pgolf().shards
    shards_per_split = {"val": 1, "train": NUM_TRAIN_SHARDS}
    doc_counts: dict[str, int] = {}
    token_counts: dict[str, int] = {}
    byte_counts: dict[str, int] = {}
    for split, split_docs in splits.items():
        per_doc = encoded[split]
        cuts = _shard_boundaries([len(t) for t in per_doc], shards_per_split[split])
        for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
            shard = np.concatenate(per_doc[lo:hi]).astype(np.uint16)
            path = tmp_dir / dataset_rel / f"fineweb_{split}_{i:06d}.bin"
            shards.write_shard(path, shard)
        doc_counts[split] = len(split_docs)
        byte_counts[split] = sum(_utf8_len(d) for d in split_docs)
        token_counts[split] = sum(len(t) for t in per_doc)
        log(f"make_sample: {split}: {doc_counts[split]} docs, {token_counts[split]} tokens, "
            f"{len(cuts) - 1} shard(s)")

    import sentencepiece as spm

    files = {
        p.relative_to(tmp_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tmp_dir.rglob("*")) if p.is_file()
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "vocab_size": vocab_size,
        "python_version": platform.python_version(),
        "sentencepiece_version": spm.__version__,
        "text_sources": ["pydoc_data.topics", "stdlib docstrings"],
        "text_cap_bytes": TEXT_CAP_BYTES,
        "documents": {**doc_counts, "total": len(docs)},
        "text_bytes": {**byte_counts, "total": text_bytes},
        "tokens": {**token_counts, "total": sum(token_counts.values())},
        "files": files,
    }
    (tmp_dir / dataset_rel / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"make_sample: built in {time.perf_counter() - t_start:.1f}s")


def _install(tmp_dir: Path, data_dir: Path, dataset_dir: Path, tokenizer_path: Path, log: Log) -> None:
    """Move the finished files into place: invalidate the old manifest
    first, then move data files, then the new manifest last."""
    manifest_rel = (dataset_dir / MANIFEST_NAME).relative_to(data_dir)
    (data_dir / manifest_rel).unlink(missing_ok=True)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    # Shards left over from an older build with a different layout would be
    # picked up by glob-based loaders; remove them.
    for stale in dataset_dir.glob("fineweb_*.bin"):
        if not (tmp_dir / stale.relative_to(data_dir)).exists():
            stale.unlink()
    built = [p for p in sorted(tmp_dir.rglob("*")) if p.is_file()]
    for src in built:
        rel = src.relative_to(tmp_dir)
        if rel != manifest_rel:
            os.replace(src, data_dir / rel)
    os.replace(tmp_dir / manifest_rel, data_dir / manifest_rel)
    log(f"make_sample: wrote {dataset_dir} and {tokenizer_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=CLI_DESCRIPTION)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"output root (default: {DEFAULT_DATA_DIR})")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"tokenizer vocabulary size (default: {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid build exists")
    args = parser.parse_args(argv)
    try:
        dataset_dir, tokenizer_path = build_sample(args.data_dir, args.vocab_size, force=args.force)
    except (ValueError, RuntimeError) as exc:  # a vocabulary the sample cannot hold: one line, as the other tools
        print(f"error: --vocab-size={args.vocab_size} is not allowed: {exc}", file=sys.stderr)
        return 2
    print(f"dataset:   {dataset_dir}")
    print(f"tokenizer: {tokenizer_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
