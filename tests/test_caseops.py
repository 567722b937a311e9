"""data/caseops.py: the lossless_caps_caseops_v1 transform and its per-token byte sidecar (PR #1729).

    python -m pytest -q tests/test_caseops.py
    CASEOPS_REFERENCE=/path/to/lossless_caps.py python -m pytest -q tests/test_caseops.py

- round trip: decode(encode(s)) == s for 20,000 seeded random strings over an alphabet with both
  cases, digits, whitespace, the operator characters themselves, U+E000, non-ASCII letters,
  combining marks, emoji and a lone surrogate, and for random case patterns of words;
- the record's documented examples and edge cases by hand; malformed encodings are refused;
- the sidecar rule on hand-made surfaces, and on the 200 challenge documents with the record's
  tokenizer from ../shared/data (skipped, saying why, when it is absent): every document's counts
  add up to its UTF-8 length, BOS and operators count 0;
- byte identity with the record's own lossless_caps.py (encode, decode, sidecar) and, when the
  record's prepare_caseops_data.py sits next to it, identical shard files (tokens and byte sidecar): against
  the leaderboard top's folder (PR #1855, ../shared/anchors/top1855) when it is present, or the
  lossless_caps.py the environment variable CASEOPS_REFERENCE names (from a CaseOps records folder of
  openai/parameter-golf; the file is the same in all of them; for the shard check use the
  2026-04-27 or 2026-04-29 record, whose prepare script uses the surface rule; the 2026-04-19 to
  04-23 ones approximated the sidecar and differ); nothing of it is kept in this repository.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CHALLENGE_DOCS, ROOT, SHARED_DATA, read_jsonl_texts


def load_caseops():
    """data/caseops.py as a module (data/ is not a package)."""
    spec = importlib.util.spec_from_file_location("pg_caseops", ROOT / "data" / "caseops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


co = load_caseops()
T, A, C, E = co.TITLE, co.ALLCAPS, co.CAPNEXT, co.ESC
RECORD_TOKENIZER = (SHARED_DATA / "tokenizers" / "variants" / "openai-parameter-golf-caseops"
                    / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
REFERENCE_ENV = "CASEOPS_REFERENCE"
# The leaderboard top's record folder (PR #1855): its lossless_caps.py and prepare_caseops_data.py are the
# reference when CASEOPS_REFERENCE is not set.
TOP_CASEOPS = ROOT.parent / "shared" / "anchors" / "top1855" / "lossless_caps.py"
# Characters the random strings draw from: every class the transform treats differently.
ALPHABET = (list("abcxyzABCXYZ") * 3 + list("0123456789 \t\n\r.,;'\"-_()") + list(co.OPERATORS) * 2
            + ["\ue000", "\ue005", "é", "É", "ß", "ǅ", "İ", "ﬁ", "Ａ", "中", "\u0301", "\U0001F600", "\x00",
               "\u2581", "\u200b", "\ufeff", "\ud800"])


def random_strings(n: int, seed: int, max_len: int = 30) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


def random_word_texts(n: int, seed: int) -> list[str]:
    """Words of every case pattern (lower, Title, ALLCAPS, mIxEd, single letters) between separators."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(1, 8)):
            word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 7)))
            pattern = rng.choice(["lower", "title", "upper", "mixed"])
            word = {"lower": word, "title": word.title(), "upper": word.upper(),
                    "mixed": "".join(ch.upper() if rng.random() < 0.5 else ch for ch in word)}[pattern]
            words.append(word + rng.choice(["", "", "1", "é", E, "'"]))
        texts.append("".join(w + rng.choice([" ", "", "-", ". ", "\n"]) for w in words))
    return texts


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, encoded", [
    ("The NASA Launch", f"{T}the {A}nasa {T}launch"),  # the record's README example
    ("iPhone OpenAI", f"i{C}phone {T}open{C}a{C}i"),  # the record's README example
    ("McDonald", f"{T}mc{C}donald"),
    ("A", f"{T}a"),  # a single capital: TITLE (ALLCAPS needs two letters)
    ("a I x", f"a {T}i x"),
    ("AB", f"{A}ab"),
    ("ABc", f"{T}a{C}bc"),
    ("aBC", f"a{C}b{C}c"),
    ("", ""),
    ("already lower case, 123.", "already lower case, 123."),
    ("ABC1DEF", f"{A}abc1{A}def"),  # digits end a word
    ("COVID-19 B2B", f"{A}covid-19 {T}b2{T}b"),
    ("Élan ÉCOLE naïve", f"Élan É{A}cole naïve"),  # non-ASCII letters are not part of a word
    ("École", "École"),
    ("HeLLo", f"{T}he{C}l{C}lo"),
    (f"x{T}y", f"x{E}{T}y"),  # a literal operator is escaped
    (f"{E}{E}", f"{E}{E}{E}{E}"),
    (f"{C}A", f"{E}{C}{T}a"),
    ("\ue000Q", f"\ue000{T}q"),  # U+E000 (the v1 sentinel) is no operator here
])
def test_hand_examples(text, encoded):
    assert co.encode(text) == encoded
    assert co.decode(encoded) == text


def test_round_trip_on_random_strings():
    texts = random_strings(20_000, seed=1729) + random_word_texts(5_000, seed=1730)
    for text in texts:
        encoded = co.encode(text)
        assert co.decode(encoded) == text, (text, encoded)
        assert not any("A" <= ch <= "Z" for ch in encoded), encoded  # the lexical stream is lower case
    assert any(op in co.encode(t) for t in texts for op in co.OPERATORS)  # the generator exercises every path


ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def test_encode_only_lowers_ascii_capitals_and_adds_operators():
    """Without its operators (an escaped character kept) an encoding is the text with A-Z lower-cased."""
    unescape = re.compile(f"{E}(.)|[{T}{A}{C}]", re.DOTALL)
    for text in random_strings(5_000, seed=7):
        assert unescape.sub(lambda m: m.group(1) or "", co.encode(text)) == text.translate(ASCII_LOWER)
        plain = "".join(ch for ch in text if not ("A" <= ch <= "Z") and ch not in co.OPERATORS)
        assert co.encode(plain) == plain


@pytest.mark.parametrize("bad, needle", [
    (E, "ESC at character 0 is not followed"),
    (f"{T} x", "TITLE at character 0 is not followed by what it applies to (before ' ')"),
    (f"ab{C}", "CAPNEXT at character 2"),
    (f"ab{T}cd", "TITLE at character 2 is inside a word"),
    (f"{A}", "ALLCAPS at character 0 is not followed by what it applies to (at the end)"),
])
def test_decode_refuses_what_encode_never_writes(bad, needle):
    with pytest.raises(co.CaseOpsError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        co.decode(bad)


def test_import_has_no_side_effects(tmp_path):
    """Importing caseops reads no environment variable (beyond what numpy reads at its own import) and
    imports neither sentencepiece nor torch."""
    probe = ("import os, re, sys\nimport numpy\n"  # what caseops imports reads the environment itself
             "class Guard(dict):\n"
             "    def __getitem__(self, k): raise AssertionError(f'environment read: {k}')\n"
             "    def get(self, k, d=None): raise AssertionError(f'environment read: {k}')\n"
             "os.environ = Guard()\n"
             f"sys.path.insert(0, {str(ROOT / 'data')!r})\n"
             "import caseops\n"
             "print(sorted(m for m in ('sentencepiece', 'torch') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The sidecar rule
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("surfaces, counts", [
    ([T, "the", " ", A, "nas", "a"], [0, 3, 1, 0, 3, 1]),  # operators 0, letters 1
    ([E, T, "x"], [0, 3, 1]),  # ESC 0, the escaped operator its own 3 bytes, across pieces
    ([E + T + "x"], [4]),
    (["", "é", "", "", "中"], [0, 2, 0, 0, 3]),  # byte fallback: the last byte piece carries the character
    ([b"\xc3\xa9", "\ue000"], [2, 3]),  # bytes surfaces; U+E000 is text
    ([], []),
])
def test_surface_rule(surfaces, counts):
    assert co.surface_original_bytes(surfaces) == counts


def test_a_trailing_esc_is_refused():
    with pytest.raises(co.CaseOpsError, match="ESC that escapes nothing"):
        co.surface_original_bytes(["a", E])


def test_parse_pieces_reads_a_serialized_sentencepiece_text():
    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    def piece(pid: int, surface: bytes) -> bytes:
        body = b"\x0a\x01p" + b"\x10" + varint(pid) + b"\x1a" + varint(len(surface)) + surface + b"\x20\x00\x28\x05"
        return b"\x12" + varint(len(body)) + body

    msg = b"\x0a\x03abc" + piece(4, T.encode()) + piece(300, b"") + piece(8191, b"xyz") + b"\x1d\x00\x00\x80\x3f"
    assert co.parse_pieces(msg) == [(4, T.encode()), (300, b""), (8191, b"xyz")]


@pytest.fixture(scope="module")
def record_sp():
    if not RECORD_TOKENIZER.is_file() or not CHALLENGE_DOCS.is_file():
        pytest.skip(f"the record's CaseOps tokenizer or the challenge documents are not in {SHARED_DATA}")
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(RECORD_TOKENIZER))


def test_record_tokenizer_reserves_the_operators(record_sp, shared_data):
    import sentencepiece as spm

    assert co.reserved_piece_problems(record_sp) == []
    assert [record_sp.id_to_piece(i) for i in range(4, 8)] == list(co.OPERATORS)
    plain = spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizers" / "fineweb_1024_bpe.model"))
    assert len(co.reserved_piece_problems(plain)) == 4 and not co.reserves_operators(plain)


@pytest.mark.slow
def test_sidecar_sums_on_the_challenge_documents(record_sp):
    texts = read_jsonl_texts(CHALLENGE_DOCS)
    transformed = [co.encode(t) for t in texts]
    ids_all = record_sp.encode(transformed)
    total = exact = 0
    for text, encoded, ids in zip(texts, transformed, ids_all):
        counts = co.token_original_bytes(record_sp, [record_sp.bos_id()] + ids, text)
        assert counts.dtype == np.dtype("<u2") and counts.size == len(ids) + 1
        assert counts[0] == 0 and int(counts.sum()) == len(text.encode("utf-8"))
        ops = np.isin(np.asarray(ids), list(co.RESERVED_PIECE_IDS.values()))
        assert not counts[1:][ops].any() or E in text  # operators count 0 (an escaped one counts its bytes)
        total += int(counts.sum())
        # The tokens' surfaces spell the transformed text, which decodes to the document byte for byte
        # (sp.decode would give SentencePiece's normalized text: NFKC, newlines folded to spaces).
        pieces = co.encode_with_surfaces(record_sp, [encoded])[0]
        assert [pid for pid, _ in pieces] == ids
        assert co.decode(b"".join(s for _, s in pieces).decode("utf-8")) == text
        if record_sp.normalize(encoded).replace("\u2581", " ") == encoded:
            assert co.decode(record_sp.decode(ids)) == text
            exact += 1
    assert total == 1_489_515  # shared/data/SOURCES.md: the 200 documents' UTF-8 text bytes
    assert exact >= 1, exact


def test_token_original_bytes_refuses_other_ids_and_unattributable_bytes(record_sp):
    ids = record_sp.encode(co.encode("The NASA Launch"))
    assert co.token_original_bytes(record_sp, ids, "The NASA Launch").tolist() == [0, 3, 1, 0, 3, 1, 1, 0, 2, 4]
    with pytest.raises(co.CaseOpsError, match="are not the tokenizer's encoding"):
        co.token_original_bytes(record_sp, ids[:-1], "The NASA Launch")
    # SentencePiece drops leading whitespace from every surface: the record's rule cannot count it.
    text = "  leading spaces"
    with pytest.raises(co.CaseOpsError, match="add up to 14 but the text has 16 UTF-8 bytes"):
        co.token_original_bytes(record_sp, record_sp.encode(co.encode(text)), text, where="doc 7")


# ---------------------------------------------------------------------------------------------
# Byte identity with the record's own code (CASEOPS_REFERENCE=/path/to/lossless_caps.py, else PR #1855's)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    path = os.environ.get(REFERENCE_ENV) or (str(TOP_CASEOPS) if TOP_CASEOPS.is_file() else "")
    if not path:
        pytest.skip(f"{REFERENCE_ENV} is not set and {TOP_CASEOPS} is absent: point it at a record's "
                    "lossless_caps.py (PR #1855's folder, or openai/parameter-golf records/track_10min_16mb/"
                    "2026-04-18_PR1626_CaseOps_Taper/) to check byte identity")
    if not Path(path).is_file():
        pytest.fail(f"{REFERENCE_ENV}={path}: file not found")
    spec = importlib.util.spec_from_file_location("caseops_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_texts() -> list[str]:
    texts = random_strings(20_000, seed=2026) + random_word_texts(5_000, seed=2027)
    if CHALLENGE_DOCS.is_file():
        texts += read_jsonl_texts(CHALLENGE_DOCS)
    return texts


@pytest.mark.slow
def test_reference_encode_and_decode_agree(reference):
    assert reference.get_text_transform(co.TRANSFORM_NAME) is reference.encode_lossless_caps_v2
    assert reference.get_text_transform_control_symbols(co.TRANSFORM_NAME) == list(co.OPERATORS)
    for text in reference_texts():
        encoded = co.encode(text)
        assert encoded == reference.encode_lossless_caps_v2(text), text
        assert reference.decode_lossless_caps_v2(encoded) == text


@pytest.mark.slow
def test_reference_sidecar_agrees(reference, record_sp):
    # SentencePiece takes UTF-8: leave out strings with the lone surrogate.
    texts = reference_texts()[-200:] + [t for t in random_strings(3_000, seed=5) if "\ud800" not in t]
    for text in texts:
        pieces = co.encode_with_surfaces(record_sp, [co.encode(text)])[0]
        ours = co.surface_original_bytes(s for _, s in pieces)
        theirs = reference.surface_piece_original_byte_counts((s.decode() for _, s in pieces),
                                                              text_transform_name=co.TRANSFORM_NAME)
        assert ours == theirs, text


@pytest.mark.slow
def test_reference_prepare_script_writes_the_same_shards(reference, record_sp, tmp_path):
    """The record's prepare_caseops_data.py (next to CASEOPS_REFERENCE) and tokenize_docs.py --caseops on the
    first 60 challenge documents, val = 20, at its shard size (10^7): byte-identical files."""
    script = Path(reference.__file__).with_name("prepare_caseops_data.py")
    if not script.is_file():
        pytest.skip(f"{script} is not there: the byte-identical shard check needs the record's prep script")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                            for t in read_jsonl_texts(CHALLENGE_DOCS, limit=60)), encoding="utf-8")
    # The script reads surfaces with encode_as_immutable_proto, which recent sentencepiece no longer has:
    # give it the same pieces (ids and surfaces as SentencePiece's serialized answer spells them).
    shim = ("import runpy, sys, types\nimport sentencepiece as spm\n"
            f"sys.path.insert(0, {str(ROOT / 'data')!r})\nimport caseops\n"
            "def immutable(self, text):\n"
            "    pieces = caseops.encode_with_surfaces(self, [text])[0]\n"
            "    return types.SimpleNamespace(pieces=[types.SimpleNamespace(id=i, surface=s.decode()) for i, s in pieces])\n"
            "if not hasattr(spm.SentencePieceProcessor, 'encode_as_immutable_proto'):\n"
            "    spm.SentencePieceProcessor.encode_as_immutable_proto = immutable\n"
            f"sys.argv = ['prepare_caseops_data.py', '--docs', {str(docs)!r}, '--out', {str(tmp_path / 'ref')!r}, "
            f"'--sp', {str(RECORD_TOKENIZER)!r}, '--val-docs', '20']\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "data" / "tokenize_docs.py"), "--docs", str(docs), "--caseops",
                        "--tokenizer", str(RECORD_TOKENIZER), "--output", str(tmp_path / "ours"), "--val-docs", "20",
                        "--shard-tokens", "10000000", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    theirs = tmp_path / "ref" / "datasets" / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("fineweb_*.bin"))}

    assert digests(tmp_path / "ours") == digests(theirs)
    assert set(digests(theirs)) == {"fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"}
