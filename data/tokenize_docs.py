"""Tokenize a documents JSONL into challenge shards: validation = the first --val-docs documents,
training = every document after them.

The challenge's validation split is the first 50,000 documents of `docs_selected.jsonl`. A prep
script whose default split point is anything else puts validation documents into the training
shards (openai/parameter-golf#2127: `--val-docs 10000` leaked 80% of val into train in 15 of 34
audited CaseOps-lineage PRs). Here the split is structural: document i goes to val when i < --val-docs and
to train otherwise, there is no other path, the default is the challenge's 50,000, and the
manifest states the document ranges, counts, token counts, hashes, and how many training documents
repeat a validation document's exact text (duplicates inside the source file). A --val-docs that
would leave no training document is refused before anything is trained or encoded.

Input: one JSON object per line with a string "text" (the schema of the challenge's
`docs_selected.jsonl`); other fields are ignored, blank lines are skipped. Each document is stored
as [BOS] + sp.encode(text), no EOS, concatenated and cut into shards of --shard-tokens tokens in
the challenge format (pgolf.shards.write_shard). The tokenizer is a given SentencePiece `.model`
(--tokenizer) or trained here with the challenge recipe from `data/tokenizer_specs.json` (--spec);
a trained tokenizer reads only training documents unless --tokenizer-docs all.

With --caseops (or a --spec whose text_transform is lossless_caps_caseops_v1) every document is
first rewritten with the CaseOps transform (data/caseops.py, PR #1729), and each validation token
gets its number of ORIGINAL UTF-8 bytes in a parallel sidecar shard `fineweb_val_bytes_NNNNNN.bin`
(same format, BOS = 0), the record's file names and layout, so that BPB is charged on the original
text. Every validation document's counts must add up to its UTF-8 length (checked per document).

Output (--output DIR), built in a temporary folder next to DIR and moved in at the end, manifest
last, so an interrupted run leaves DIR as it was (or without a manifest), never a half-written shard:

  DIR/fineweb_val_000000.bin ...    DIR/fineweb_train_000000.bin ...
  DIR/fineweb_val_bytes_000000.bin ...  (with --caseops: one per val shard, same token counts)
  DIR/<spec filename>.model/.vocab  (with --spec)
  DIR/manifest.json

Usage:
  python data/tokenize_docs.py --docs docs_selected.jsonl --tokenizer data/tokenizers/fineweb_1024_bpe.model \\
      --output data/datasets/fineweb10B_sp1024_local
  python data/tokenize_docs.py --docs docs_selected.jsonl --spec sp4096 --output data/datasets/fineweb10B_sp4096_mine
  python data/tokenize_docs.py --docs docs_selected.jsonl --caseops \\
      --tokenizer data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \\
      --output data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved

Exit codes: 0 done, 1 failed, 2 bad input (the message names the flag or file line).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPECS = Path(__file__).resolve().parent / "tokenizer_specs.json"
DEFAULT_VAL_DOCS = 50_000  # the challenge's validation split: the first 50,000 documents
DEFAULT_SHARD_TOKENS = 100_000_000  # the challenge's shard size (10^8 tokens, 200 MB)
BATCH_DOCS = 512  # documents per SentencePiece encode call: enough to keep every thread busy
MAX_VOCAB = 2 ** 16  # shards store uint16 token ids
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "parameter-golf-tokenized"
MANIFEST_VERSION = 1
# The CaseOps validation byte sidecar: fineweb_val_bytes_NNNNNN.bin, the record's name (PR #1729).
SIDECAR_SPLIT = "val_bytes"


class UsageError(ValueError):
    """Bad input: the message names the flag or the file line, the value and what is allowed."""


def train_gpt():
    """train_gpt.py owns the shard reader, tokenizer checks and byte tables."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_gpt as tg

    return tg


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """The challenge shard format, written by the repository's pgolf/shards.py (train_gpt() put it on sys.path)."""
    from pgolf.shards import write_shard as write

    write(path, tokens)


def caseops():
    """data/caseops.py: the CaseOps transform and byte sidecar (data/ is not a package)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import caseops as co

    return co


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Doc:
    index: int  # 0-based document number (blank lines are not documents)
    line: int  # 1-based line in the file, for error messages
    text: str


class DocReader:
    """Streams documents from a JSONL file, hashing the raw bytes and tracking the read offset
    (for progress) as it goes. Never holds more than one line in memory."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.offset = 0
        self.sha256 = hashlib.sha256()
        self.complete = False

    def __iter__(self) -> Iterator[Doc]:
        index = 0
        with open(self.path, "rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                self.offset += len(raw)
                self.sha256.update(raw)
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError as exc:
                    raise UsageError(f"--docs={self.path} line {line_no}: not valid JSON ({exc})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UsageError(f"--docs={self.path} line {line_no}: expected a JSON object with a string "
                                     '"text" field')
                yield Doc(index, line_no, obj["text"])
                index += 1
        self.complete = True


def count_documents(path: Path, limit: int) -> int:
    """Documents in path by DocReader's rule (a non-blank line is a document), counting no further
    than `limit`: enough to check --val-docs without reading a 40 GB file to its end."""
    n = 0
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                n += 1
                if n >= limit:
                    break
    return n


def batched(docs: Iterator[Doc], n: int) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def load_specs(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return dict(raw["recipe"]), dict(raw["specs"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--specs-file={path}: not a tokenizer spec file ({exc})") from None


def read_model(spm, path: Path, flag: str):
    """path loaded as a SentencePiece model with every piece read once, so a damaged file (random
    bytes, a truncated download, a piece that is not UTF-8) is refused here in one line."""
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0].removeprefix("INTERNAL: ") if str(exc) else type(exc).__name__
        raise UsageError(f"{flag}={path} is not a readable SentencePiece model ({first}): expected a .model "
                         "file written by SentencePiece; fetch or build it again") from None
    for i in range(sp.vocab_size()):
        try:
            sp.id_to_piece(i)
        except UnicodeDecodeError:
            raise UsageError(f"{flag}={path} is not a readable SentencePiece model (piece {i} is not UTF-8): the "
                             "file is damaged; fetch or build it again") from None
    return sp


def load_model(path: Path, flag: str):
    """A SentencePiece model that train_gpt.py accepts: BOS id 1, a standalone '▁' piece (so its
    byte tables are right), and ids that fit uint16 shards."""
    import sentencepiece as spm

    tg = train_gpt()
    if not path.is_file():
        raise UsageError(f"{flag}={path}: file not found")
    vocab = read_model(spm, path, flag).vocab_size()
    if vocab > MAX_VOCAB:
        raise UsageError(f"{flag}={path}: vocab_size {vocab} does not fit uint16 shards (at most {MAX_VOCAB})")
    try:
        sp = tg.load_tokenizer(path, vocab)
        tg.build_byte_luts(sp, path)
    except tg.DataError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    return sp


def spec_transform(spec: dict[str, Any]) -> str:
    """The text transform a spec's tokenizer expects: "identity" or caseops.TRANSFORM_NAME."""
    return str(spec.get("text_transform") or caseops().IDENTITY)


def check_spec(spec_name: str, spec: dict[str, Any], specs_file: Path) -> None:
    co = caseops()
    if spec_transform(spec) not in (co.IDENTITY, co.TRANSFORM_NAME):
        raise UsageError(f"--specs-file={specs_file}: spec {spec_name} has text_transform="
                         f"{spec_transform(spec)!r}; expected {co.TRANSFORM_NAME!r} or none")


def trainer_kwargs(spec: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe with the spec's overrides. A CaseOps tokenizer also gets the four operators as
    user_defined_symbols, first, so that each is one piece at ids 4-7 (right after pad/bos/eos/unk),
    as in the record's tokenizer (PR #1729, reserve_text_transform_controls)."""
    kwargs = {**recipe, **(spec.get("trainer_overrides") or {})}
    co = caseops()
    if spec_transform(spec) == co.TRANSFORM_NAME:
        symbols = kwargs.get("user_defined_symbols") or []
        symbols = symbols.split(",") if isinstance(symbols, str) else list(symbols)
        kwargs["user_defined_symbols"] = list(co.OPERATORS) + [x for x in symbols if x and x not in co.OPERATORS]
    return kwargs


def train_tokenizer(reader_path: Path, spec_name: str, spec: dict[str, Any], recipe: dict[str, Any],
                    val_docs: int, docs_from: str, workers: int, model_path: Path) -> dict[str, Any]:
    """Train the recipe's SentencePiece BPE, writing model_path and its .vocab. Returns what the
    manifest records about the training run.

    As in the challenge's exporter, each document is one SentencePiece "sentence" (NUL replaced by
    a space, stripped), and the trainer's defaults apply otherwise, including max_sentence_length
    (4192 bytes): SentencePiece skips longer documents while training. A CaseOps spec trains on the
    transformed text (after the stripping, as the record's exporter does)."""
    import sentencepiece as spm

    co = caseops()
    transform = co.encode if spec_transform(spec) == co.TRANSFORM_NAME else (lambda text: text)
    limit = spec.get("tokenizer_train_docs")
    used = {"documents": 0}
    failure: list[BaseException] = []

    def sentences() -> Iterator[str]:
        try:
            for doc in DocReader(reader_path):
                if docs_from == "train" and doc.index < val_docs:
                    continue
                if limit is not None and used["documents"] >= limit:
                    return
                text = doc.text.replace("\x00", " ").strip()
                used["documents"] += 1
                if text:
                    yield transform(text)
        except UsageError as exc:  # SentencePiece's C++ loop would swallow or mangle it
            failure.append(exc)

    kwargs = trainer_kwargs(spec, recipe)
    model = io.BytesIO()
    t0 = time.perf_counter()
    log(f"tokenize_docs: training {spec_name} (vocab {spec['vocab_size']}) on "
        f"{'training documents' if docs_from == 'train' else 'all documents'}"
        f"{f', at most {limit:,}' if limit is not None else ''} ...")
    spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model,
                                   vocab_size=int(spec["vocab_size"]), num_threads=workers, minloglevel=1,
                                   **kwargs)
    if failure:
        raise failure[0]
    tg = train_gpt()
    tg.atomic_write_bytes(model_path, model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    # The "piece<TAB>score" listing SentencePiece writes next to a model, for humans.
    vocab_text = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    tg.atomic_write_bytes(model_path.with_suffix(".vocab"), vocab_text.encode("utf-8"))
    if sp.vocab_size() != int(spec["vocab_size"]):
        log(f"warning: the trained tokenizer has {sp.vocab_size()} pieces, not {spec['vocab_size']}: the corpus is "
            f"too small for this vocabulary; set VOCAB_SIZE={sp.vocab_size()} when training on it")
    problems = co.reserved_piece_problems(sp) if spec_transform(spec) == co.TRANSFORM_NAME else []
    if problems:  # trainer_kwargs reserved them: SentencePiece did not honour user_defined_symbols
        raise RuntimeError(f"{model_path}: the CaseOps operators did not get their pieces: {'; '.join(problems)}")
    log(f"tokenize_docs: trained in {time.perf_counter() - t0:.1f}s on {used['documents']:,} documents")
    return {"spec": spec_name, "text_transform": spec_transform(spec), "documents": used["documents"],
            "documents_from": docs_from,
            "trainer": {**kwargs, "vocab_size": int(spec["vocab_size"]), "num_threads": workers},
            "sentencepiece_version": spm.__version__}


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------

class ShardWriter:
    """Fills fixed-size shards of one split in order; a document may continue into the next shard
    (train_gpt.py reads each split as one stream). Records every shard it writes."""

    def __init__(self, out_dir: Path, split: str, capacity: int):
        self.out_dir, self.split, self.capacity = out_dir, split, capacity
        self.buf: np.ndarray | None = None  # allocated on first use: a split may stay empty
        self.fill = 0
        self.docs_started = 0
        self.first_doc: int | None = None
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray, doc_index: int) -> None:
        if self.buf is None:
            self.buf = np.empty(self.capacity, dtype=np.uint16)
        if self.first_doc is None:
            self.first_doc = doc_index
        self.docs_started += 1
        pos = 0
        while pos < tokens.size:
            n = min(self.capacity - self.fill, tokens.size - pos)
            self.buf[self.fill:self.fill + n] = tokens[pos:pos + n]
            self.fill += n
            pos += n
            if self.fill == self.capacity:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        tg = train_gpt()
        path = self.out_dir / f"fineweb_{self.split}_{len(self.shards):06d}.bin"
        write_shard(path, self.buf[:self.fill])
        if tg.read_shard_header(path) != self.fill:  # the reader must accept what the writer wrote
            raise RuntimeError(f"{path}: shard reads back with a different token count")
        self.shards.append({"file": path.name, "tokens": self.fill, "bytes": path.stat().st_size,
                            "sha256": tg.sha256_file(path), "first_doc": self.first_doc,
                            "docs_started": self.docs_started})
        self.fill, self.docs_started, self.first_doc = 0, 0, None


@dataclasses.dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    first_doc: int | None = None
    last_doc: int | None = None


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """One stderr status line: rewritten in place on a terminal, a new line every 15 s otherwise."""

    def __init__(self, total_bytes: int):
        self.total = max(total_bytes, 1)
        self.tty = sys.stderr.isatty()
        self.every = 0.5 if self.tty else 15.0
        self.t0 = self.last = time.perf_counter()

    def update(self, offset: int, docs: int, tokens: int, val: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        line = (f"tokenize_docs: {100 * offset / self.total:5.1f}%  {docs:,} docs (val {val:,})  {tokens:,} tokens  "
                f"{docs / dt:,.0f} docs/s  {tokens / dt:,.0f} tokens/s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tokenize a documents JSONL into challenge shards: val = the first "
                                            "--val-docs documents, train = the rest, never overlapping.")
    p.add_argument("--docs", type=Path, required=True, help='JSONL file, one {"text": ...} object per line')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", type=Path, help="an existing SentencePiece .model")
    src.add_argument("--spec", help="train a tokenizer with this spec from --specs-file (sp1024, sp4096, sp8192, "
                                    "sp8192_caseops)")
    p.add_argument("--caseops", action="store_true",
                   help="rewrite every document with the lossless_caps_caseops_v1 transform (PR #1729) before "
                        "tokenizing, and write the validation byte sidecar fineweb_val_bytes_*.bin; the tokenizer "
                        "must reserve the four operators (implied by a CaseOps --spec)")
    p.add_argument("--output", type=Path, required=True, help="folder for the shards, tokenizer and manifest.json")
    p.add_argument("--val-docs", type=int, default=None,
                   help=f"the first N documents are the validation split (default {DEFAULT_VAL_DOCS:,}, "
                        "the challenge's)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, the challenge's)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="SentencePiece encoding/training threads (default: all cores)")
    p.add_argument("--tokenizer-docs", choices=("train", "all"), default="train",
                   help="with --spec: train the tokenizer on training documents only (default) or on all "
                        "documents from the first, as the challenge's exporter did (it read validation text)")
    p.add_argument("--drop-val-duplicates", action="store_true",
                   help="leave out training documents whose text is identical to a validation document's")
    p.add_argument("--specs-file", type=Path, default=DEFAULT_SPECS, help=f"spec file (default {DEFAULT_SPECS})")
    p.add_argument("--force", action="store_true", help="replace a dataset already in --output")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    args.val_docs_is_default = args.val_docs is None
    if args.val_docs is None:
        args.val_docs = DEFAULT_VAL_DOCS
    if not args.docs.is_file():
        raise UsageError(f"--docs={args.docs}: file not found")
    if args.val_docs < 1:
        raise UsageError(f"--val-docs={args.val_docs} is not allowed: expected an integer >= 1 "
                         f"(the challenge's split is {DEFAULT_VAL_DOCS:,})")
    if args.shard_tokens < 1:
        raise UsageError(f"--shard-tokens={args.shard_tokens} is not allowed: expected an integer >= 1")
    if args.workers < 1:
        raise UsageError(f"--workers={args.workers} is not allowed: expected an integer >= 1")
    if args.tokenizer is not None and not args.tokenizer.is_file():
        raise UsageError(f"--tokenizer={args.tokenizer}: file not found")
    if args.spec is not None:
        check_spec_arg(args)
    out = args.output
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output={out}: exists and is not a folder")
    if out.is_dir() and not args.force:
        existing = sorted(p.name for p in out.iterdir() if p.name == MANIFEST_NAME or p.name.startswith("fineweb_"))
        if existing:
            raise UsageError(f"--output={out} already holds a dataset ({', '.join(existing[:3])}"
                             f"{', ...' if len(existing) > 3 else ''}); pass --force to replace it")
    check_val_docs(args)  # last: it reads the file


def check_spec_arg(args: argparse.Namespace) -> None:
    """--spec must name a spec; a CaseOps spec turns --caseops on, and --caseops needs one."""
    _, specs = load_specs(args.specs_file)
    if args.spec not in specs:
        raise UsageError(f"--spec={args.spec} is not allowed: expected one of {', '.join(sorted(specs))} "
                         f"({args.specs_file})")
    spec = specs[args.spec]
    check_spec(args.spec, spec, args.specs_file)
    transformed = spec_transform(spec) == caseops().TRANSFORM_NAME
    if args.caseops and not transformed:
        allowed = sorted(n for n, other in specs.items() if spec_transform(other) == caseops().TRANSFORM_NAME)
        raise UsageError(f"--spec={args.spec} is not allowed with --caseops: its tokenizer does not reserve the CaseOps "
                         f"operators; expected one of {', '.join(allowed) or 'none'} ({args.specs_file})")
    args.caseops = args.caseops or transformed


def check_val_docs(args: argparse.Namespace) -> None:
    """--val-docs must leave at least one training document: checked against the file before any
    tokenizer is trained or document encoded (reading at most --val-docs + 1 documents)."""
    n = count_documents(args.docs, args.val_docs + 1)
    if n > args.val_docs:
        return
    value = f"--val-docs={args.val_docs}"
    if args.val_docs_is_default:
        value += " (the default, the challenge's split)"
    if n < 2:
        raise UsageError(f"{value} is not allowed: --docs={args.docs} has {n} document(s) (non-blank lines); a "
                         "split needs at least 2, one for validation and one for training")
    if args.val_docs_is_default:
        raise UsageError(f"{value} is not allowed: --docs={args.docs} has only {n:,} documents (non-blank lines), "
                         f"fewer than the default; pass --val-docs with a value from 1 to {n - 1:,}")
    raise UsageError(f"{value} is not allowed: --docs={args.docs} has {n:,} documents (non-blank lines), so it "
                     f"leaves no training documents; expected a value from 1 to {n - 1:,}")


def install(tmp_dir: Path, out: Path) -> None:
    """Move the finished build into out: old manifest first (so a half-installed folder never looks
    complete), then stale shards of an older build, then the new files, the manifest last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in out.glob("fineweb_*.bin"):
        if not (tmp_dir / stale.name).exists():
            stale.unlink()
    for src in sorted(tmp_dir.iterdir()):
        if src.name != MANIFEST_NAME:
            os.replace(src, out / src.name)
    os.replace(tmp_dir / MANIFEST_NAME, out / MANIFEST_NAME)


def check_caseops_tokenizer(sp, args: argparse.Namespace) -> None:
    """With --caseops the tokenizer must hold each operator as one piece at the record's id; without
    it, a tokenizer that does is probably meant for CaseOps text (say so, do not refuse)."""
    co = caseops()
    flag, path = ("--spec", args.spec) if args.spec is not None else ("--tokenizer", args.tokenizer)
    problems = co.reserved_piece_problems(sp)
    if args.caseops and problems:
        raise UsageError(f"{flag}={path} is not allowed with --caseops: it is not a CaseOps tokenizer "
                         f"({'; '.join(problems)}); expected one trained with the operators reserved "
                         "(data/train_tokenizer.py --spec sp8192_caseops, or the record's "
                         "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model)")
    if not args.caseops and not problems:
        log(f"warning: {flag}={path} reserves the CaseOps operator pieces (ids 4-7) but --caseops is off: the "
            "text is tokenized as is, without the case transform or a byte sidecar")


def encode_batch(sp, batch: list[Doc], args: argparse.Namespace) -> list[tuple[list[int], np.ndarray | None]]:
    """Token ids of each document (no BOS), and with --caseops, for each validation document, the
    original UTF-8 bytes of each token (its sidecar, checked to add up to the document's length)."""
    if not args.caseops:
        return [(ids, None) for ids in sp.encode([d.text for d in batch], num_threads=args.workers)]
    co = caseops()
    texts = [co.encode(d.text) for d in batch]
    n_val = sum(d.index < args.val_docs for d in batch)  # validation documents come first in file order
    val_pieces = co.encode_with_surfaces(sp, texts[:n_val], args.workers) if n_val else []
    train_ids = sp.encode(texts[n_val:], num_threads=args.workers) if n_val < len(batch) else []
    encoded = []
    for doc, pieces in zip(batch, val_pieces):
        try:
            counts = co.sidecar_for_pieces(pieces, doc.text, f"--docs={args.docs} line {doc.line} (document {doc.index})")
        except co.CaseOpsError as exc:
            raise UsageError(str(exc)) from None
        encoded.append(([piece_id for piece_id, _ in pieces], counts))
    return encoded + [(ids, None) for ids in train_ids]


def check_sidecar(writers: dict[str, ShardWriter], val: SplitStats, sidecar_bytes: int) -> None:
    """One sidecar shard per validation shard with the same token count, and the sidecar adds up to
    the validation documents' UTF-8 bytes: checked rather than assumed from the loop."""
    tokens = [s["tokens"] for s in writers["val"].shards]
    sidecar = [s["tokens"] for s in writers[SIDECAR_SPLIT].shards]
    if tokens != sidecar or sidecar_bytes != val.text_bytes:
        raise RuntimeError(f"internal error: sidecar shards hold {sidecar} tokens and {sidecar_bytes:,} bytes, the "
                           f"validation shards {tokens} tokens and {val.text_bytes:,} bytes")


def sidecar_manifest(writers: dict[str, ShardWriter], sidecar_bytes: int) -> dict[str, Any]:
    return {
        "files": f"fineweb_{SIDECAR_SPLIT}_*.bin",
        "format": "the shard format of fineweb_val_*.bin (uint16 per token), one sidecar shard per validation shard",
        "rule": "original UTF-8 bytes of each token's SentencePiece surface: operators and ESC 0, an escaped "
                "character its size, letters 1, BOS 0 (PR #1729's surface_piece_original_byte_counts)",
        "original_bytes": sidecar_bytes,
        "shards": writers[SIDECAR_SPLIT].shards,
    }


def build(args: argparse.Namespace, tmp_dir: Path) -> dict[str, Any]:
    """Everything into tmp_dir; returns the manifest (also written there, last)."""
    import sentencepiece as spm

    tg = train_gpt()
    training = None
    if args.spec is not None:
        recipe, specs = load_specs(args.specs_file)
        spec = specs[args.spec]  # check_args made sure it exists
        model_path = tmp_dir / spec.get("filename", f"{args.spec}.model")
        training = train_tokenizer(args.docs, args.spec, spec, recipe, args.val_docs, args.tokenizer_docs,
                                   args.workers, model_path)
        sp = load_model(model_path, "--spec")
        tokenizer_path, tokenizer_out = model_path, model_path.name
    else:
        sp = load_model(args.tokenizer, "--tokenizer")
        tokenizer_path, tokenizer_out = args.tokenizer, str(args.tokenizer.resolve())
    check_caseops_tokenizer(sp, args)
    vocab = sp.vocab_size()
    bos = sp.bos_id()

    reader = DocReader(args.docs)
    splits = ("val", "train", SIDECAR_SPLIT) if args.caseops else ("val", "train")
    writers = {s: ShardWriter(tmp_dir, s, args.shard_tokens) for s in splits}
    stats = {s: SplitStats() for s in ("val", "train")}
    val_texts: set[bytes] = set()  # 16-byte digests of every validation text
    repeats = dropped = sidecar_bytes = 0
    progress = Progress(reader.size)
    t0 = time.perf_counter()
    for batch in batched(iter(reader), BATCH_DOCS):
        for doc, (ids, counts) in zip(batch, encode_batch(sp, batch, args)):
            split = "val" if doc.index < args.val_docs else "train"
            raw = doc.text.encode("utf-8")
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            if split == "val":
                val_texts.add(digest)
            elif digest in val_texts:
                repeats += 1
                if args.drop_val_duplicates:
                    dropped += 1
                    continue
            tokens = np.empty(len(ids) + 1, dtype=np.uint16)
            tokens[0] = bos
            tokens[1:] = ids
            writers[split].add(tokens, doc.index)
            if counts is not None:  # a CaseOps validation document: its sidecar, BOS first (0 bytes)
                writers[SIDECAR_SPLIT].add(np.concatenate([np.zeros(1, dtype=np.uint16), counts]), doc.index)
                sidecar_bytes += int(counts.sum(dtype=np.int64))
            st = stats[split]
            st.documents += 1
            st.tokens += tokens.size
            st.text_bytes += len(raw)
            st.first_doc = doc.index if st.first_doc is None else st.first_doc
            st.last_doc = doc.index
        progress.update(reader.offset, stats["val"].documents + stats["train"].documents,
                        stats["val"].tokens + stats["train"].tokens, stats["val"].documents)
    progress.update(reader.offset, stats["val"].documents + stats["train"].documents,
                    stats["val"].tokens + stats["train"].tokens, stats["val"].documents, force=True)
    progress.done()
    seconds = time.perf_counter() - t0
    total_docs = stats["val"].documents + stats["train"].documents + dropped
    if stats["train"].documents == 0:  # check_val_docs left one: all were dropped as validation repeats
        raise UsageError(f"--drop-val-duplicates left no training documents: all {dropped:,} documents after "
                         f"--val-docs={args.val_docs} repeat a validation document's text in --docs={args.docs}")
    for w in writers.values():
        w.flush()
    if args.caseops:
        check_sidecar(writers, stats["val"], sidecar_bytes)

    # Disjointness, checked rather than assumed from the loop above.
    val_range = range(stats["val"].first_doc, stats["val"].last_doc + 1)
    train_range = range(stats["train"].first_doc, stats["train"].last_doc + 1)
    shared = len(range(max(val_range.start, train_range.start), min(val_range.stop, train_range.stop)))
    if shared or stats["val"].documents != len(val_range):
        raise RuntimeError(f"internal error: val documents {val_range} and train documents {train_range} overlap")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": tg.sha256_file(p)}
             for p in sorted(tmp_dir.iterdir()) if p.is_file()}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": "data/tokenize_docs.py",
        "docs": {"path": str(args.docs.resolve()), "bytes": reader.size, "sha256": reader.sha256.hexdigest(),
                 "documents": total_docs},
        "tokenizer": {"path": tokenizer_out, "sha256": tg.sha256_file(tokenizer_path), "vocab_size": vocab,
                      "bos_id": bos, "trained": training},
        "split": {
            "rule": "val = documents [0, val_docs) in file order, train = documents [val_docs, end); "
                    "blank lines are not documents",
            "val_docs": args.val_docs,
            "val_doc_range": [stats["val"].first_doc, stats["val"].last_doc],
            "train_doc_range": [stats["train"].first_doc, stats["train"].last_doc],
            "shared_documents": shared,
            "train_docs_repeating_val_text": repeats,
            "train_docs_dropped_as_val_repeats": dropped,
        },
        "text_transform": caseops().TRANSFORM_NAME if args.caseops else caseops().IDENTITY,
        "document_format": f"[BOS] + sp.encode({'caseops.encode(text)' if args.caseops else 'text'}) per document, "
                           "no EOS, concatenated in file order",
        "byte_sidecar": sidecar_manifest(writers, sidecar_bytes) if args.caseops else None,
        "shard_tokens": args.shard_tokens,
        **{s: {**dataclasses.asdict(stats[s]), "shards": writers[s].shards} for s in ("val", "train")},
        "encode_seconds": round(seconds, 3),
        "workers": args.workers,
        "sentencepiece_version": spm.__version__,
        "files": files,
    }
    tg.atomic_write_bytes(tmp_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def run(args: argparse.Namespace) -> int:
    check_args(args)
    out = args.output.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as the destination, so the final moves are renames.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        manifest = build(args, tmp_dir)
        install(tmp_dir, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    val, train, split = manifest["val"], manifest["train"], manifest["split"]
    secs = max(manifest["encode_seconds"], 1e-9)
    docs = val["documents"] + train["documents"]
    tokens = val["tokens"] + train["tokens"]
    print(f"tokenize_docs: val docs:{val['documents']} tokens:{val['tokens']} shards:{len(val['shards'])} "
          f"doc_range:{val['first_doc']}-{val['last_doc']}")
    print(f"tokenize_docs: train docs:{train['documents']} tokens:{train['tokens']} shards:{len(train['shards'])} "
          f"doc_range:{train['first_doc']}-{train['last_doc']}")
    print(f"tokenize_docs: docs:{docs} tokens:{tokens} encode_seconds:{secs:.2f} docs_per_s:{docs / secs:.0f} "
          f"tokens_per_s:{tokens / secs:.0f} workers:{manifest['workers']}")
    print(f"tokenize_docs: shared_documents:{split['shared_documents']} "
          f"train_docs_repeating_val_text:{split['train_docs_repeating_val_text']} "
          f"dropped:{split['train_docs_dropped_as_val_repeats']}")
    if split["train_docs_repeating_val_text"] and not split["train_docs_dropped_as_val_repeats"]:
        log(f"warning: {split['train_docs_repeating_val_text']} training document(s) have the exact text of a "
            "validation document (duplicates in --docs); --drop-val-duplicates leaves them out")
    tok = manifest["tokenizer"]
    tok_path = out / Path(tok["path"]).name if tok["trained"] else Path(tok["path"])
    how, caseops = "train on it with", 0
    sidecar = manifest["byte_sidecar"]
    if sidecar is not None:
        print(f"tokenize_docs: byte_sidecar shards:{len(sidecar['shards'])} original_bytes:{sidecar['original_bytes']} "
              f"(= the validation documents' UTF-8 bytes) transform:{manifest['text_transform']}")
        how, caseops = "CaseOps data (BPB counts the bytes in fineweb_val_bytes_*.bin); train on it with", 1
    print(f"tokenize_docs: wrote {out} ({MANIFEST_NAME}); {how}: DATA_PATH={out} "
          f"TOKENIZER_PATH={tok_path} VOCAB_SIZE={tok['vocab_size']} CASEOPS_ENABLED={caseops} python train_gpt.py")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.output} was left as it was", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
