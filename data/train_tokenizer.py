"""Train a SentencePiece tokenizer with the challenge recipe from a documents JSONL; by default the
CaseOps tokenizer of PR #1729 (spec sp8192_caseops), so that a user can rebuild it.

The recipe is the challenge's (openai/parameter-golf data/download_hf_docs_and_tokenize.py, kept
in data/tokenizer_specs.json): SentencePiece BPE, byte_fallback, split_digits, nmt_nfkc, no dummy
prefix, character_coverage 0.999, hard_vocab_limit false, pad/bos/eos/unk = 0/1/2/3; each document
is one "sentence" (NUL -> space, stripped). A CaseOps spec trains on the lossless_caps_caseops_v1
text (data/caseops.py) and reserves the operators TITLE, ALLCAPS, CAPNEXT, ESC (U+E001..U+E004) as
user_defined_symbols at ids 4-7, the trainer spec stored in the record's
fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model. The record does not say how many documents
trained it; the spec uses sp8192's 5,000,000 (--max-docs changes it).

As in data/tokenize_docs.py --spec, only training documents are read by default (document i is
skipped when i < --val-docs, the challenge's 50,000), so the tokenizer never sees validation text;
--tokenizer-docs all reads from the first document, as the challenge's and the record's exporters
did.

Output (--output DIR): DIR/<spec filename>.model, its .vocab, and DIR/<stem>.json (spec, trainer
arguments, documents used, sha256 of the documents file and of the model). Written to temporary
names and renamed.

Usage:
  python data/train_tokenizer.py --docs docs_selected.jsonl --output data/tokenizers
  python data/train_tokenizer.py --docs docs.jsonl --spec sp8192_caseops --vocab-size 300 --val-docs 10 --output /tmp/tok

Exit codes: 0 done, 1 failed, 2 bad input (one line naming the flag, the value and what is allowed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_SPEC = "sp8192_caseops"
# SentencePiece's failed checks read "INTERNAL: src/file.cc(638) [condition] reason": keep the reason.
SENTENCEPIECE_CHECK = re.compile(r"^(?:INTERNAL: )?\S+\(\d+\) \[.*?\] ")


def tokenize_docs():
    """data/tokenize_docs.py, whose recipe trainer this script runs (data/ is not a package)."""
    if str(DATA_DIR) not in sys.path:
        sys.path.insert(0, str(DATA_DIR))
    import tokenize_docs as td

    return td


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    td = tokenize_docs()
    p = argparse.ArgumentParser(description="Train a SentencePiece tokenizer with the challenge recipe (default: the "
                                            "CaseOps tokenizer of PR #1729) from a documents JSONL.")
    p.add_argument("--docs", type=Path, required=True, help='JSONL file, one {"text": ...} object per line')
    p.add_argument("--output", type=Path, required=True, help="folder for the .model, .vocab and .json")
    p.add_argument("--spec", default=DEFAULT_SPEC, help=f"spec in --specs-file (default {DEFAULT_SPEC})")
    p.add_argument("--vocab-size", type=int, default=None, help="replace the spec's vocabulary size (e.g. a tiny test)")
    p.add_argument("--max-docs", type=int, default=None,
                   help="replace the spec's tokenizer_train_docs: train on at most this many documents")
    p.add_argument("--val-docs", type=int, default=td.DEFAULT_VAL_DOCS,
                   help=f"documents [0, N) are validation and never read unless --tokenizer-docs all "
                        f"(default {td.DEFAULT_VAL_DOCS:,})")
    p.add_argument("--tokenizer-docs", choices=("train", "all"), default="train",
                   help="read training documents only (default) or all documents from the first")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="SentencePiece trainer threads")
    p.add_argument("--specs-file", type=Path, default=td.DEFAULT_SPECS, help=f"spec file (default {td.DEFAULT_SPECS})")
    p.add_argument("--force", action="store_true", help="replace a tokenizer already in --output")
    return p.parse_args(argv)


def check_positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise tokenize_docs().UsageError(f"{flag}={value} is not allowed: expected an integer >= 1")


def resolve_spec(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recipe, spec with the command line's overrides), after checking the flags."""
    td = tokenize_docs()
    if not args.docs.is_file():
        raise td.UsageError(f"--docs={args.docs}: file not found")
    for flag, value in (("--vocab-size", args.vocab_size), ("--max-docs", args.max_docs),
                        ("--val-docs", args.val_docs), ("--workers", args.workers)):
        check_positive(flag, value)
    recipe, specs = td.load_specs(args.specs_file)
    if args.spec not in specs:
        raise td.UsageError(f"--spec={args.spec} is not allowed: expected one of {', '.join(sorted(specs))} "
                            f"({args.specs_file})")
    spec = dict(specs[args.spec])
    td.check_spec(args.spec, spec, args.specs_file)
    if args.vocab_size is not None:
        # The file name says the vocabulary size (fineweb_8192_bpe_...): a smaller test tokenizer must
        # not pass for the real one.
        filename = spec.get("filename", f"{args.spec}.model")
        spec["filename"] = filename.replace(f"_{spec['vocab_size']}_", f"_{args.vocab_size}_", 1)
        spec["vocab_size"] = args.vocab_size
    if args.max_docs is not None:
        spec["tokenizer_train_docs"] = args.max_docs
    return recipe, spec


def check_output(args: argparse.Namespace, model_path: Path) -> None:
    td = tokenize_docs()
    if args.output.exists() and not args.output.is_dir():
        raise td.UsageError(f"--output={args.output}: exists and is not a folder")
    if model_path.exists() and not args.force:
        raise td.UsageError(f"--output={args.output} already holds {model_path.name}; pass --force to replace it")


def check_documents(args: argparse.Namespace) -> None:
    """Reading training documents only needs at least one after --val-docs."""
    td = tokenize_docs()
    if args.tokenizer_docs == "all":
        return
    n = td.count_documents(args.docs, args.val_docs + 1)
    if n <= args.val_docs:
        raise td.UsageError(f"--val-docs={args.val_docs} is not allowed: --docs={args.docs} has {n:,} documents "
                            "(non-blank lines), so no training document is left to train on; pass a smaller "
                            "--val-docs or --tokenizer-docs all")


def run(args: argparse.Namespace) -> int:
    td = tokenize_docs()
    recipe, spec = resolve_spec(args)
    model_path = args.output / spec.get("filename", f"{args.spec}.model")
    check_output(args, model_path)
    check_documents(args)
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        training = td.train_tokenizer(args.docs, args.spec, spec, recipe, args.val_docs, args.tokenizer_docs,
                                      args.workers, model_path)
    except RuntimeError as exc:  # SentencePiece refuses, e.g. a vocabulary smaller than the corpus's characters
        reason = SENTENCEPIECE_CHECK.sub("", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise td.UsageError(f"--vocab-size={spec['vocab_size']} with --docs={args.docs}: SentencePiece cannot train "
                            f"this tokenizer: {reason}") from None
    tg = td.train_gpt()
    record = {"created_by": "data/train_tokenizer.py", "model": model_path.name,
              "model_sha256": tg.sha256_file(model_path), "vocab_size": int(spec["vocab_size"]),
              "docs": {"path": str(args.docs.resolve()), "sha256": tg.sha256_file(args.docs)},
              "val_docs": args.val_docs, **training}
    report = model_path.with_suffix(".json")
    tg.atomic_write_bytes(report, (json.dumps(record, indent=2) + "\n").encode())
    print(f"train_tokenizer: {model_path} vocab:{spec['vocab_size']} transform:{training['text_transform']} "
          f"documents:{training['documents']} from:{training['documents_from']} sha256:{record['model_sha256']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    td = tokenize_docs()
    try:
        return run(args)
    except td.UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.output} holds no half-written file", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
