"""CaseOps: the `lossless_caps_caseops_v1` text transform and its per-token byte sidecar (PR #1729).

The transform lower-cases ASCII letters and records their case with four private-use operator
characters, so a SentencePiece tokenizer spends its vocabulary on lower-case subwords:

    "The NASA Launch" -> TITLE "the " ALLCAPS "nasa " TITLE "launch"
    "iPhone OpenAI"   -> "i" CAPNEXT "phone " TITLE "open" CAPNEXT "a" CAPNEXT "i"

Rules, over maximal runs of ASCII letters ("words"; digits and non-ASCII letters end a word):
  * a lower-case word is unchanged;
  * an all-capitals word of two or more letters becomes ALLCAPS + the word in lower case;
  * any other word becomes (TITLE if its first letter is a capital) + its first letter in lower
    case + every later letter in lower case, each former capital preceded by CAPNEXT; so a
    TitleCase word (and a single capital, "A") is TITLE + the word in lower case;
  * a literal operator character in the text is escaped as ESC + that character;
  * everything else (digits, punctuation, whitespace, non-ASCII text) is unchanged.

`decode(encode(s)) == s` for every Python string. The record's reference implementation is
`encode_lossless_caps_v2` / `decode_lossless_caps_v2` in `lossless_caps.py` (openai/parameter-golf,
records/track_10min_16mb/2026-04-18_PR1626_CaseOps_Taper and later CaseOps records);
`lossless_caps_caseops_v1` is its alias there. This module is an independent implementation whose
output is byte-identical to it (tests/test_caseops.py checks that when CASEOPS_REFERENCE names the
reference file). `decode` is stricter than the record's only on strings `encode` never writes
(CAPNEXT before an ESC, say): it refuses them where the record guesses.

BPB is still charged on the ORIGINAL text's UTF-8 bytes, so each validation token carries the
number of original bytes it stands for (the records' `fineweb_val_bytes_*.bin` sidecar). The rule
is the record's: a token's count is the original bytes of its SentencePiece *surface* (the span of
the transformed input it covers), where an operator counts 0, a letter 1 (case does not change its
size), an ESC 0 and the character it escapes its own UTF-8 size, anything else its UTF-8 size;
BOS counts 0. A multi-byte character split into byte-fallback pieces is counted on the last piece
(SentencePiece gives the earlier pieces an empty surface).

Importing this module has no side effects (no environment, no files, no sentencepiece import).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

TRANSFORM_NAME = "lossless_caps_caseops_v1"
IDENTITY = "identity"

# The operators: private-use characters U+E001..U+E004, as in the record's lossless_caps.py
# (DEFAULT_V2_TITLE ... DEFAULT_V2_ESC).
TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
# The record's tokenizer reserves them as SentencePiece user_defined_symbols, which take the first
# ids after pad/bos/eos/unk (0-3): TITLE=4, ALLCAPS=5, CAPNEXT=6, ESC=7.
RESERVED_PIECE_IDS = {op: 4 + i for i, op in enumerate(OPERATORS)}
OPERATOR_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}

SIDECAR_DTYPE = np.dtype("<u2")  # the sidecar shares the token shards' layout: one uint16 per token
MAX_TOKEN_BYTES = int(np.iinfo(SIDECAR_DTYPE).max)

_OPERATOR_CLASS = "[\ue001-\ue004]"
# Encoding visits the words that hold a capital, and literal operators; everything else (lower-case
# words included: most of the text) is copied as is. The look-behind makes a match start a word.
_ENCODE_TOKEN = re.compile(f"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|{_OPERATOR_CLASS}")
_CAPITAL = re.compile("[A-Z]")
# Decoding: ESC + any character | an optional TITLE/ALLCAPS, then letters each optionally
# preceded by CAPNEXT (one word) | a stray operator (malformed input). Capitals cannot occur in an
# encoding, but a word may hold them in other input and is then decoded as the record decodes it.
_DECODE_TOKEN = re.compile(
    f"{ESC}(.)|([{TITLE}{ALLCAPS}]?)((?:{CAPNEXT}?[A-Za-z])+)|({_OPERATOR_CLASS})", re.DOTALL)
_CAPNEXT_LETTER = re.compile(f"{CAPNEXT}([A-Za-z])")
# UTF-8 of U+E001..U+E004 is EE 80 81..84; a surface without EE 80 holds no operator (fast path).
_OPERATOR_LEAD = TITLE.encode("utf-8")[:2]


class CaseOpsError(ValueError):
    """A transformed string or a token sequence that is not a valid CaseOps encoding."""


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------

def _encode_word(word: str) -> str:
    if word.islower():
        return word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    head = TITLE if word[0].isupper() else ""
    tail = _CAPITAL.sub(lambda m: CAPNEXT + m.group().lower(), word[1:])
    return head + lower[0] + tail


def _encode_token(m: re.Match) -> str:
    token = m.group()
    return ESC + token if token in OPERATORS else _encode_word(token)


def encode(text: str) -> str:
    """`lossless_caps_caseops_v1` of text (the record's encode_lossless_caps_v2)."""
    return _ENCODE_TOKEN.sub(_encode_token, text)


def _decode_word(mode: str, body: str) -> str:
    if mode == ALLCAPS:
        return body.replace(CAPNEXT, "").upper()
    word = _CAPNEXT_LETTER.sub(lambda m: m.group(1).upper(), body)
    return word[0].upper() + word[1:] if mode == TITLE else word


def _decode_token(m: re.Match) -> str:
    escaped, mode, body, stray = m.groups()
    if escaped is not None:
        return escaped
    if stray is not None:
        where = "at the end" if m.end() == len(m.string) else f"before {m.string[m.end()]!r}"
        raise CaseOpsError(f"{OPERATOR_NAMES[stray]} at character {m.start()} is not followed by what it "
                           f"applies to ({where}): not a {TRANSFORM_NAME} encoding")
    if mode and m.start() > 0 and m.string[m.start() - 1].isascii() and m.string[m.start() - 1].isalpha():
        raise CaseOpsError(f"{OPERATOR_NAMES[mode]} at character {m.start()} is inside a word: not a "
                           f"{TRANSFORM_NAME} encoding")
    return _decode_word(mode, body)


def decode(text: str) -> str:
    """The original text of a `lossless_caps_caseops_v1` string. Raises CaseOpsError on an operator
    that applies to nothing (a dangling ESC, a TITLE before a non-letter, ...)."""
    return _DECODE_TOKEN.sub(_decode_token, text)


# ---------------------------------------------------------------------------------------------
# The byte sidecar
# ---------------------------------------------------------------------------------------------

def _surface_bytes_with_operators(surface: str, escaped: bool) -> tuple[int, bool]:
    """Original bytes of a surface that holds operators (or follows an ESC), and whether an ESC is
    still pending after it (the escaped character may be the next piece)."""
    n = 0
    for ch in surface:
        if escaped:
            n += len(ch.encode("utf-8"))
            escaped = False
        elif ch == ESC:
            escaped = True
        elif ch not in OPERATORS:
            n += len(ch.encode("utf-8"))
    return n, escaped


def surface_original_bytes(surfaces: Iterable[str | bytes]) -> list[int]:
    """Original UTF-8 bytes of each piece, from the pieces' surfaces in order (the record's
    `surface_piece_original_byte_counts` for lossless_caps_caseops_v1). Surfaces may be str or
    UTF-8 bytes."""
    counts: list[int] = []
    escaped = False
    for surface in surfaces:
        raw = surface if isinstance(surface, bytes) else surface.encode("utf-8")
        if escaped or _OPERATOR_LEAD in raw:  # rare: most pieces are plain text
            n, escaped = _surface_bytes_with_operators(raw.decode("utf-8"), escaped)
        else:
            n = len(raw)  # letters are lower-cased, and a lower-case ASCII letter is 1 byte like its capital
        counts.append(n)
    if escaped:
        raise CaseOpsError("the pieces end with an ESC that escapes nothing")
    return counts


# A serialized SentencePieceText (sentencepiece.proto) is read here rather than with the protobuf
# package, which sentencepiece does not depend on; recent sentencepiece (0.2.3 here) also refuses
# the `immutable_proto` answer that the record's prepare_caseops_data.py reads. Keys are
# (field number << 3) | wire type: SentencePieceText.pieces = field 2, length-delimited; in a
# piece, id = field 2 (varint) and surface = field 3 (length-delimited).
_KEY_PIECE, _KEY_ID, _KEY_SURFACE = (2 << 3) | 2, (2 << 3) | 0, (3 << 3) | 2
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """The varint at buf[i] and the index after it."""
    b = buf[i]
    value, shift = b & 0x7F, 7
    while b >= 0x80:
        i += 1
        b = buf[i]
        value |= (b & 0x7F) << shift
        shift += 7
    return value, i + 1


def _skip_field(buf: bytes, i: int, wire: int) -> int:
    if wire == _WIRE_VARINT:
        return _varint(buf, i)[1]
    if wire == _WIRE_BYTES:
        size, i = _varint(buf, i)
        return i + size
    if wire in (_WIRE_FIXED64, _WIRE_FIXED32):
        return i + (8 if wire == _WIRE_FIXED64 else 4)
    raise CaseOpsError(f"unexpected protobuf wire type {wire} in a SentencePiece answer")


def _parse_piece(buf: bytes, i: int, end: int) -> tuple[int, bytes]:
    piece_id, surface = 0, b""
    while i < end:
        key, i = _varint(buf, i)
        if key == _KEY_ID:
            piece_id, i = _varint(buf, i)
        elif key == _KEY_SURFACE:
            size, i = _varint(buf, i)
            surface, i = buf[i:i + size], i + size
        else:
            i = _skip_field(buf, i, key & 7)
    return piece_id, surface


def parse_pieces(serialized: bytes) -> list[tuple[int, bytes]]:
    """(id, surface as UTF-8 bytes) of every piece of a serialized SentencePieceText, in order."""
    pieces = []
    i, n = 0, len(serialized)
    while i < n:
        key, i = _varint(serialized, i)
        if key != _KEY_PIECE:
            i = _skip_field(serialized, i, key & 7)
            continue
        size, i = _varint(serialized, i)
        pieces.append(_parse_piece(serialized, i, i + size))
        i += size
    return pieces


def encode_with_surfaces(sp, transformed: Sequence[str], num_threads: int = 1) -> list[list[tuple[int, bytes]]]:
    """SentencePiece pieces (id, surface bytes) of each already-transformed text, one batch call."""
    answers = sp.encode(list(transformed), out_type="serialized_proto", num_threads=num_threads)
    return [parse_pieces(a) for a in answers]


def check_byte_sum(counts: Sequence[int] | np.ndarray, text: str, where: str = "document") -> None:
    """The per-token counts of a document must add up to its original UTF-8 length: otherwise BPB
    would divide by the wrong number of bytes."""
    total, expected = int(np.sum(counts, dtype=np.int64)), len(text.encode("utf-8"))
    if total != expected:
        raise CaseOpsError(
            f"{where}: the per-token original byte counts add up to {total:,} but the text has {expected:,} UTF-8 "
            "bytes; most likely SentencePiece's normalizer dropped characters that no piece's surface covers "
            "(leading or trailing whitespace, U+2581, ...), which the record's surface rule (PR #1729) cannot "
            "attribute to a token")
    if len(counts) and int(np.max(counts)) > MAX_TOKEN_BYTES:
        raise CaseOpsError(f"{where}: a token stands for more than {MAX_TOKEN_BYTES:,} bytes, more than the uint16 "
                           "sidecar holds")


def sidecar_for_pieces(pieces: Sequence[tuple[int, bytes]], text: str, where: str = "document") -> np.ndarray:
    """uint16 original-byte counts of a document's pieces (no BOS), sum-checked against text."""
    counts = np.asarray(surface_original_bytes(s for _, s in pieces), dtype=np.int64)
    check_byte_sum(counts, text, where)
    return counts.astype(SIDECAR_DTYPE)


def token_original_bytes(sp, token_ids: Sequence[int], text: str, where: str = "document") -> np.ndarray:
    """The sidecar of one document: uint16 original-byte counts for token_ids, which must be
    sp.encode(encode(text)), optionally after a BOS (as stored in a shard; BOS counts 0).
    The counts add up to len(text.encode()) (checked)."""
    ids = [int(t) for t in token_ids]
    lead = 1 if ids and ids[0] == sp.bos_id() else 0
    pieces = encode_with_surfaces(sp, [encode(text)])[0]
    if ids[lead:] != [pid for pid, _ in pieces]:
        raise CaseOpsError(f"{where}: token_ids are not the tokenizer's encoding of encode(text) "
                           f"({len(ids) - lead} ids given, {len(pieces)} expected)")
    counts = sidecar_for_pieces(pieces, text, where)
    return np.concatenate([np.zeros(lead, dtype=SIDECAR_DTYPE), counts])


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def reserved_piece_problems(sp) -> list[str]:
    """Why sp is not a CaseOps tokenizer: each operator must be its own piece at the record's id,
    else the model would split or merge it and the case information would be lost."""
    problems = []
    for op, want in RESERVED_PIECE_IDS.items():
        got = sp.piece_to_id(op)
        if got != want:
            found = "absent" if got == sp.unk_id() else f"id {got}"
            problems.append(f"{OPERATOR_NAMES[op]} (U+{ord(op):04X}) should be piece {want}, is {found}")
    return problems


def reserves_operators(sp) -> bool:
    return not reserved_piece_problems(sp)
