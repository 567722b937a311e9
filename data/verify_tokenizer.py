"""Prove that a tokenizer and its validation shards score bits per byte correctly.

A submission that changes the tokenizer or the data must show that val_bpb is still measured over
the original text (the challenge README's rule 2). This tool:

  1. loads the tokenizer the way train_gpt.py does (BOS id 1, a standalone '▁' piece) and builds
     the same byte tables (train_gpt.build_byte_luts);
  2. reads every fineweb_val_* shard of --data, checks the token ids and that the stream is
     documents, each starting with BOS;
  3. decodes every validation document and compares its UTF-8 length with the bytes the lookup
     tables give its tokens (train_gpt.count_target_bytes, the function the evaluation uses);
  4. with --docs, compares every decoded document with the source text after the tokenizer's own
     normalization (sp.normalize; for nmt_nfkc that is NFKC plus whitespace folding), and counts
     the documents that round-trip the raw text byte for byte;
  5. prints the totals: tokens, bytes, tokens per byte, for the whole validation stream and exactly
     as train_gpt.py scores it. train_gpt.py scores every token after the first, truncated to a
     whole number of EVAL_SEQ_LEN sequences (`((n - 1) // L) * L` targets), and logs
     `dataset_val_tokens_raw` (n), `dataset_val_tokens` and, on its `roundtrip_val_loss` line,
     `val_tokens` and `val_bytes`; the lines below with the same names carry the same numbers
     for --seq-len L. `--seq-len 1` scores the whole stream.

Usage:
  python data/verify_tokenizer.py --tokenizer data/tokenizers/fineweb_1024_bpe.model \\
      --data data/datasets/fineweb10B_sp1024 [--docs docs_selected.jsonl] [--seq-len 2048] [--report proof.json]

Exit codes: 0 every check passed, 1 a check failed (the report says which), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEQ_LEN = 2048  # EVAL_SEQ_LEN of the record preset (baseline: 1024)
CHUNK_TOKENS = 1 << 22  # byte counting in 4M-token chunks keeps the int64 tensors small
DECODE_BATCH = 256  # documents per decode call
SPACE = "\u2581"


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tool data/tokenize_docs.py
from tokenize_docs import UsageError, read_model  # noqa: E402  (one reader of tokenizer files for both)


def train_gpt():
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_gpt as tg

    return tg


def provenance():
    train_gpt()  # the repository root on sys.path
    from pgolf import provenance

    return provenance


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_texts(path: Path, limit: int) -> Iterator[str]:
    """The "text" of the first `limit` documents of a JSONL file (blank lines are not documents)."""
    n = 0
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if n >= limit:
                return
            if not raw.strip():
                continue
            try:
                text = json.loads(raw)["text"]
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"--docs={path} line {line_no}: expected a JSON object with a string "
                                 '"text"') from None
            if not isinstance(text, str):
                raise UsageError(f"--docs={path} line {line_no}: \"text\" is not a string")
            n += 1
            yield text


def target_bytes(tokens: np.ndarray, luts) -> np.ndarray:
    """bytes[p] = bytes train_gpt counts when token p is the target and p-1 the context; 0 at p=0."""
    import torch

    tg = train_gpt()
    out = np.zeros(tokens.size, dtype=np.int32)  # a few bytes per token: int32 halves the memory of 62M tokens
    for s in range(0, tokens.size - 1, CHUNK_TOKENS):
        e = min(s + CHUNK_TOKENS, tokens.size - 1)
        window = torch.from_numpy(tokens[s:e + 1].astype(np.int64))
        out[s + 1:e + 1] = tg.count_target_bytes(window[:-1], window[1:], luts).numpy()
    return out


def verify(args: argparse.Namespace) -> dict[str, Any]:
    import sentencepiece as spm

    tg = train_gpt()
    if not args.tokenizer.is_file():
        raise UsageError(f"--tokenizer={args.tokenizer}: file not found")
    vocab = read_model(spm, args.tokenizer, "--tokenizer").vocab_size()
    try:
        sp = tg.load_tokenizer(args.tokenizer, vocab)
        luts = tg.build_byte_luts(sp, args.tokenizer)
    except tg.DataError as exc:
        raise UsageError(f"--tokenizer: {exc}") from None
    if not args.data.is_dir():
        raise UsageError(f"--data={args.data}: not a folder")
    try:  # the tokenizer the shards were made with, as their manifest records it (what train_gpt.py checks)
        identity = provenance().dataset_identity(tg, args.data, args.tokenizer, tg.sha256_file(args.tokenizer),
                                                 setting="--tokenizer")
        files = tg.list_shards(args.data, "val")
        tokens = np.concatenate([np.asarray(tg.load_shard(f)) for f in files])
        tg.check_token_range(tokens, vocab, f"{args.data}/fineweb_val_*.bin")
    except tg.DataError as exc:
        raise UsageError(f"--data: {exc}") from None
    plain = tg.Hyperparameters.from_env({"PRESET": "baseline", "DATA_PATH": str(args.data), "CASEOPS_ENABLED": "0"})
    try:  # train_gpt.py's own test of CaseOps data: it refuses CASEOPS_ENABLED=0 for exactly those shards
        tg.check_transform(plain, identity["text_transform"], identity["manifest"])
    except tg.DataError:
        raise UsageError(f"--data={args.data}: CaseOps shards: their BPB counts the byte sidecars "
                         "(fineweb_val_bytes_*.bin), not the lookup tables this tool checks; train_gpt.py's BPB "
                         "self-check (CASEOPS_ENABLED=1) checks the sidecars against the decoded text") from None
    n = int(tokens.size)
    if n < 2:
        raise UsageError(f"--data={args.data}: the validation split has {n} token(s); nothing to score")

    failures: list[str] = []
    starts = np.flatnonzero(tokens == tg.BOS_ID)
    if starts.size == 0 or starts[0] != 0:
        failures.append(f"the validation stream does not start with BOS (id {tg.BOS_ID}); documents cannot be "
                        "delimited")
        starts = np.concatenate([[0], starts]).astype(np.int64)
    n_docs = int(starts.size)
    ends = np.append(starts[1:], n)

    t0 = time.perf_counter()
    per_target = target_bytes(tokens, luts)
    lut_doc_bytes = np.add.reduceat(per_target, starts, dtype=np.int64)

    # sp.normalize spells spaces as '▁' and, with add_dummy_prefix, starts with one that decoding drops.
    dummy_prefix = sp.normalize("a").startswith(SPACE)

    def normalized(src: str) -> str:
        norm = sp.normalize(src)
        if dummy_prefix and norm.startswith(SPACE):
            norm = norm[1:]
        return norm.replace(SPACE, " ")

    source_iter = read_texts(args.docs, n_docs) if args.docs else None
    decoded_bytes = np.zeros(n_docs, dtype=np.int64)
    exact_raw = exact_normalized = source_bytes = source_docs = 0
    text_mismatch: list[int] = []
    examples: list[str] = []
    last_note = time.perf_counter()
    for b in range(0, n_docs, DECODE_BATCH):
        ids = [tokens[starts[d] + 1:ends[d]].tolist() for d in range(b, min(b + DECODE_BATCH, n_docs))]
        for j, text in enumerate(sp.decode(ids)):
            d = b + j
            decoded_bytes[d] = len(text.encode("utf-8"))
            if source_iter is None:
                continue
            src = next(source_iter, None)
            if src is None:
                continue
            source_docs += 1
            source_bytes += len(src.encode("utf-8"))
            exact_raw += text == src
            norm = normalized(src)
            if text == norm:
                exact_normalized += 1
            else:
                text_mismatch.append(d)
                if len(examples) < args.max_examples:
                    at = next((i for i, (x, y) in enumerate(zip(text, norm)) if x != y), min(len(text), len(norm)))
                    examples.append(f"document {d}: decoded text differs from the normalized source at character "
                                    f"{at}: {text[max(0, at - 20):at + 20]!r} vs {norm[max(0, at - 20):at + 20]!r}")
        if time.perf_counter() - last_note > 10:
            last_note = time.perf_counter()
            log(f"verify_tokenizer: {min(b + DECODE_BATCH, n_docs):,}/{n_docs:,} documents decoded")

    byte_mismatch = np.flatnonzero(decoded_bytes != lut_doc_bytes)
    if byte_mismatch.size:
        failures.append(f"{byte_mismatch.size} document(s) whose lookup-table byte count differs from their decoded "
                        f"UTF-8 length (first: document {int(byte_mismatch[0])}, "
                        f"{int(lut_doc_bytes[byte_mismatch[0]])} vs {int(decoded_bytes[byte_mismatch[0]])} bytes)")
    if args.docs:
        if source_docs < n_docs:
            failures.append(f"--docs={args.docs} has {source_docs} documents, the validation split {n_docs}")
        if text_mismatch:
            failures.append(f"{len(text_mismatch)} document(s) whose decoded text differs from the normalized source "
                            f"text (first: document {text_mismatch[0]})")

    manifest_path = args.data / "manifest.json"
    if manifest_path.is_file():  # written by data/tokenize_docs.py: its counts must agree with the shards
        try:
            manifest = json.loads(manifest_path.read_text())
            expected = (manifest["val"]["documents"], manifest["val"]["tokens"])
        except (OSError, ValueError, KeyError, TypeError):
            expected = None
        if expected is not None and expected != (n_docs, n):
            failures.append(f"{manifest_path} records {expected[0]} val documents and {expected[1]} tokens; the "
                            f"shards hold {n_docs} and {n}")

    usable = ((n - 1) // args.seq_len) * args.seq_len
    scored_bytes = int(per_target[1:usable + 1].sum(dtype=np.int64))
    full_bytes = int(per_target.sum(dtype=np.int64))
    return {
        "tokenizer": str(args.tokenizer), "tokenizer_sha256": tg.sha256_file(args.tokenizer), "vocab_size": vocab,
        "data": str(args.data), "val_shards": [f.name for f in files], "docs": str(args.docs) if args.docs else None,
        "val_documents": n_docs, "val_tokens_raw": n,
        "stream": {"targets": n - 1, "bytes": full_bytes, "decoded_utf8_bytes": int(decoded_bytes.sum()),
                   "tokens_per_byte": (n - 1) / max(full_bytes, 1)},
        "scored": {"seq_len": args.seq_len, "val_tokens": usable, "val_bytes": scored_bytes,
                   "tokens_per_byte": usable / max(scored_bytes, 1), "dropped_targets": n - 1 - usable,
                   "dropped_bytes": full_bytes - scored_bytes},
        "source": None if not args.docs else {
            "documents_compared": source_docs, "source_utf8_bytes": source_bytes,
            "equal_to_normalized_source": exact_normalized, "equal_to_raw_source": exact_raw,
            "mismatching_documents": text_mismatch[:100], "examples": examples},
        "byte_count_mismatching_documents": [int(d) for d in byte_mismatch[:100]],
        "failures": failures, "ok": not failures, "seconds": round(time.perf_counter() - t0, 2),
    }


def print_report(r: dict[str, Any]) -> None:
    st, sc = r["stream"], r["scored"]
    print(f"verify_tokenizer: tokenizer {r['tokenizer']} vocab_size:{r['vocab_size']} "
          f"sha256:{r['tokenizer_sha256'][:16]}")
    print(f"verify_tokenizer: data {r['data']} val_shards:{len(r['val_shards'])} val_documents:{r['val_documents']} "
          f"val_tokens_raw:{r['val_tokens_raw']}")
    if r["source"]:
        s = r["source"]
        print(f"verify_tokenizer: text documents_compared:{s['documents_compared']} "
              f"equal_to_normalized_source:{s['equal_to_normalized_source']} "
              f"equal_to_raw_source:{s['equal_to_raw_source']} mismatches:{len(s['mismatching_documents'])} "
              f"source_utf8_bytes:{s['source_utf8_bytes']}")
        for line in s["examples"]:
            print(f"  {line}")
    print(f"verify_tokenizer: bytes decoded_utf8_bytes:{st['decoded_utf8_bytes']} lookup_table_bytes:{st['bytes']} "
          f"mismatching_documents:{len(r['byte_count_mismatching_documents'])}")
    print(f"verify_tokenizer: stream targets:{st['targets']} bytes:{st['bytes']} "
          f"tokens_per_byte:{st['tokens_per_byte']:.8f}")
    print(f"verify_tokenizer: as train_gpt.py scores it (EVAL_SEQ_LEN={sc['seq_len']}): val_tokens:{sc['val_tokens']} "
          f"val_bytes:{sc['val_bytes']} tokens_per_byte:{sc['tokens_per_byte']:.8f} "
          f"(the last {sc['dropped_targets']} targets, {sc['dropped_bytes']} bytes, do not fill a sequence)")
    for f in r["failures"]:
        print(f"verify_tokenizer: FAILED: {f}")
    print("verify_tokenizer:ok" if r["ok"] else f"verify_tokenizer:FAILED ({len(r['failures'])} check(s))")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check that a tokenizer's validation shards decode to the source text "
                                            "and that the bits-per-byte byte count is right.")
    p.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model")
    p.add_argument("--data", type=Path, required=True, help="folder with fineweb_val_*.bin")
    p.add_argument("--docs", type=Path, help="source JSONL; its first documents are the validation split")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"EVAL_SEQ_LEN of the run to match (default {DEFAULT_SEQ_LEN}; 1 = the whole stream)")
    p.add_argument("--report", type=Path, help="also write the results as JSON (attach it to a submission)")
    p.add_argument("--max-examples", type=int, default=5, help="mismatching documents to show (default 5)")
    args = p.parse_args(argv)
    try:
        if args.seq_len < 1:
            raise UsageError(f"--seq-len={args.seq_len} is not allowed: expected an integer >= 1")
        if args.docs is not None and not args.docs.is_file():
            raise UsageError(f"--docs={args.docs}: file not found")
        report = verify(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    if args.report:
        train_gpt().atomic_write_bytes(args.report, (json.dumps(report, indent=2) + "\n").encode())
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
