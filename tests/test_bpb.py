"""Bits-per-byte accounting tests: byte LUTs, count_target_bytes, bpb_from_sums and eval_val.

Run:  python -m pytest -q tests/test_bpb.py

The ground truth for "bytes of a document" is len(sp.decode(ids).encode("utf-8")) per document.
Tests on the canonical tokenizer, the real corpora and the community tokenizer variants use
../shared/data and skip without it; the `dataset` fixture parts (its tokenizer and its val shard)
always run.

How SentencePiece's decode relates to the LUT rule (sentencepiece 0.2.x, checked on every staged
model; this is the "exact rule" the comparisons rely on):
  * Control pieces (<s>, </s>) decode to "" -- the LUT counts them as 0 bytes (boundary).
  * A '▁' inside the text decodes to one space -- the LUT's +1 for a leading-'▁' piece.
  * At the START of the id list, while nothing visible has been emitted yet, decode strips the
    leading '▁' of the piece (when add_dummy_prefix or remove_extra_whitespaces is set, i.e. for
    every staged model). The LUT drops exactly that space too: no +1 for a piece right after BOS.
    For add_dummy_prefix=True models (alepot55: identity normalizer) every document's first piece
    carries the dummy-prefix '▁' that encode() inserted, and both sides drop it; for the canonical
    model (add_dummy_prefix=False, remove_extra_whitespaces=True) no document starts with '▁'.
    (Decode keeps stripping while its output is still empty: ['▁', '▁the'] decodes to "the" where
    the LUT counts 4 bytes. encode() never produces that: remove_extra_whitespaces, set in every
    staged model, drops leading whitespace before the dummy prefix is added.)
  * A BOS in the MIDDLE of an id list does not re-arm that stripping: decode([BOS]+a+[BOS]+b) keeps
    b's dummy-prefix space, which the LUT (correctly) does not count. So a multi-document stream must
    be split at BOS and decoded one document at a time; decoding the whole stream over-counts by one
    byte per later document whose first piece starts with '▁' (checked explicitly below).
  * <unk> decodes to " ⁇ " (5 bytes), but the LUT counts it as a 0-byte boundary and drops the next
    piece's leading space. Tokenizers without byte_fallback (CiprianFlorin 1024/2048/4096) emit
    <unk> on real text, so for them the LUT genuinely disagrees with decode; the variant test asserts
    the exact size of that disagreement instead of hiding it (see test_variant_tokenizer_luts).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CANONICAL_TOKENIZER, CHALLENGE_DOCS, SHARED_DATA, eval_ctx, read_jsonl_texts

CPU = torch.device("cpu")
ENWIKI = SHARED_DATA / "corpus" / "enwiki_wikiextractor_30MB.jsonl"
VARIANTS_DIR = SHARED_DATA / "tokenizers" / "variants"
VARIANTS = sorted(VARIANTS_DIR.glob("*/*.model")) if VARIANTS_DIR.is_dir() else []
SPACE = "\u2581"


# ---------------------------------------------------------------- helpers

def lut_tensors(luts: tg.ByteLUTs) -> tg.ByteLUTs:
    return luts.to(CPU)


def lut_bytes(luts: tg.ByteLUTs, ids: list[int] | np.ndarray) -> torch.Tensor:
    """Per-target byte counts for targets ids[1:] with prev ids[:-1] (what eval_val sums)."""
    t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    return tg.count_target_bytes(t[:-1], t[1:], luts)


def decoded_bytes(sp, ids: list[int]) -> int:
    return len(sp.decode(list(map(int, ids))).encode("utf-8"))


def split_at_bos(stream: np.ndarray, bos: int) -> list[np.ndarray]:
    """[BOS]+doc pieces of a shard stream (each returned array starts with BOS)."""
    starts = np.flatnonzero(stream == bos)
    assert starts.size and starts[0] == 0, "a challenge stream starts with BOS"
    return [stream[a:b] for a, b in zip(starts, list(starts[1:]) + [stream.size])]


@pytest.fixture(scope="module")
def real_texts(shared_data) -> list[str]:
    """The 200 challenge documents and the first 50 English Wikipedia articles."""
    texts = read_jsonl_texts(CHALLENGE_DOCS)
    if ENWIKI.is_file():
        texts += read_jsonl_texts(ENWIKI, limit=50)
    return texts


def check_docs_against_decode(sp, luts, encoded: list[list[int]]) -> tuple[int, int]:
    """Per document: LUT bytes of [BOS]+ids == decoded bytes of ids. Returns (lut total, decoded total)."""
    lut_total = dec_total = 0
    bad = []
    for i, ids in enumerate(encoded):
        full = [sp.bos_id()] + list(ids)
        n_lut = int(lut_bytes(luts, full).sum())
        n_dec = decoded_bytes(sp, full[1:])
        lut_total += n_lut
        dec_total += n_dec
        if n_lut != n_dec:
            bad.append((i, n_lut, n_dec))
    assert not bad, f"{len(bad)} documents disagree (index, lut, decoded): {bad[:5]}"
    assert lut_total == dec_total
    return lut_total, dec_total


# ---------------------------------------------------------------- hand-built LUT arithmetic

# A fake 7-token vocabulary:   id: piece        base  space  boundary
#                              0:  <s> (BOS)      0     -      yes
#                              1:  "ab"           2     -      -
#                              2:  "▁cd"          2     yes    -
#                              3:  "é"            2     -      -
#                              4:  <0xC3> byte    1     -      -
#                              5:  "▁"            0     yes    -
#                              6:  <unk>          0     -      yes
FAKE = tg.ByteLUTs(
    base_bytes=torch.tensor([0, 2, 2, 2, 1, 0, 0]),
    has_leading_space=torch.tensor([0, 0, 1, 0, 0, 1, 0], dtype=torch.bool),
    is_boundary=torch.tensor([1, 0, 0, 0, 0, 0, 1], dtype=torch.bool),
)


@pytest.mark.parametrize("prev, target, expected", [
    (1, 2, 3),  # leading-space token after a normal token: base + 1
    (3, 2, 3),
    (0, 2, 2),  # after BOS: base + 0
    (6, 2, 2),  # after <unk> (also a boundary): base + 0
    (1, 0, 0),  # BOS target: 0
    (2, 0, 0),
    (0, 1, 2),  # no leading space: base, whatever precedes
    (2, 1, 2),
    (1, 3, 2),
    (1, 4, 1),  # byte piece: one byte
    (1, 5, 1),  # bare '▁': the space only
    (0, 5, 0),
])
def test_count_target_bytes_hand_built(prev, target, expected):
    luts = lut_tensors(FAKE)
    got = tg.count_target_bytes(torch.tensor([prev]), torch.tensor([target]), luts)
    assert got.dtype == torch.int64
    assert got.tolist() == [expected]


def test_count_target_bytes_batch_shape_and_sum():
    luts = lut_tensors(FAKE)
    #          BOS  ab  ▁cd  é  ▁   ▁cd BOS ▁cd  ab
    ids = np.array([0, 1, 2, 3, 5, 2, 0, 2, 1])
    per = lut_bytes(luts, ids)
    assert per.tolist() == [2, 3, 2, 1, 3, 0, 2, 2]
    # 2-D (batch, seq) inputs, as eval_val passes them
    x = torch.as_tensor(ids[:-1]).view(2, 4)
    y = torch.as_tensor(ids[1:]).view(2, 4)
    got = tg.count_target_bytes(x, y, luts)
    assert got.shape == (2, 4) and got.flatten().tolist() == per.tolist()
    # ByteLUTs.to keeps the values and the index-friendly dtypes
    assert luts.base_bytes.dtype == torch.int64 and luts.is_boundary.dtype == torch.bool
    assert luts.base_bytes.tolist() == FAKE.base_bytes.tolist()


@pytest.mark.parametrize("nats, tokens, n_bytes", [(1000.0, 400.0, 1700.0), (6.931471805599453, 1.0, 1.0),
                                                    (123456.789, 50000.0, 98765.0), (0.0, 10.0, 3.0)])
def test_bpb_from_sums(nats, tokens, n_bytes):
    expected = nats / math.log(2) / n_bytes
    assert tg.bpb_from_sums(nats, tokens, n_bytes) == pytest.approx(expected, rel=1e-12, abs=0.0)


# ---------------------------------------------------------------- real tokenizers, real text

def test_canonical_tokenizer_luts_match_decode(shared_data, real_texts):
    sp = tg.load_tokenizer(CANONICAL_TOKENIZER, 1024)
    luts = lut_tensors(tg.build_byte_luts(sp, CANONICAL_TOKENIZER))
    encoded = sp.encode(real_texts)
    lut_total, _ = check_docs_against_decode(sp, luts, encoded)
    assert lut_total > 2_000_000  # ~1.5 MB challenge docs + ~1.2 MB Wikipedia, after NFKC
    # add_dummy_prefix=False and stripped text: no document starts with '▁', so decoding the whole
    # [BOS]+doc stream at once gives the same total.
    stream = [i for ids in encoded for i in [sp.bos_id()] + ids]
    assert int(lut_bytes(luts, stream).sum()) == decoded_bytes(sp, stream) == lut_total


def test_dataset_val_shard_luts_match_decode(dataset):
    """Runs everywhere: the fixture's tokenizer (canonical or sample) and its real val shard."""
    sp = tg.load_tokenizer(dataset["tokenizer"], dataset["vocab_size"])
    luts = lut_tensors(tg.build_byte_luts(sp, dataset["tokenizer"]))
    stream = np.asarray(tg.load_shard(tg.list_shards(dataset["dir"], "val")[0]), dtype=np.int64)
    docs = split_at_bos(stream, sp.bos_id())
    assert len(docs) >= 5
    lut_total, _ = check_docs_against_decode(sp, luts, [d[1:].tolist() for d in docs])
    # The LUT over the whole stream (what eval_val sums) equals the per-document total: BOS targets
    # are 0 bytes and the first piece after BOS gets no space byte.
    assert int(lut_bytes(luts, stream).sum()) == lut_total


def test_double_counted_space_lut_is_detected(dataset):
    """A deliberately wrong LUT (base includes the '▁' byte and the +1 is still added) must fail the
    decode comparison, so the checks above can fail."""
    sp = tg.load_tokenizer(dataset["tokenizer"], dataset["vocab_size"])
    good = tg.build_byte_luts(sp, dataset["tokenizer"])
    wrong = tg.ByteLUTs(good.base_bytes + good.has_leading_space.long(), good.has_leading_space,
                        good.is_boundary)
    stream = np.asarray(tg.load_shard(tg.list_shards(dataset["dir"], "val")[0]), dtype=np.int64)
    doc = split_at_bos(stream, sp.bos_id())[0]
    truth = decoded_bytes(sp, doc[1:])
    good_n = int(lut_bytes(lut_tensors(good), doc).sum())
    wrong_n = int(lut_bytes(lut_tensors(wrong), doc).sum())
    assert good_n == truth
    spaced = int(good.has_leading_space[doc[1:]].sum())
    assert spaced > 0
    assert wrong_n == truth + spaced != truth
    with pytest.raises(AssertionError, match="disagree"):
        check_docs_against_decode(sp, lut_tensors(wrong), [doc[1:].tolist()])


@pytest.mark.parametrize("model", VARIANTS or [None], ids=lambda p: f"{p.parent.name}/{p.name}" if p else "none")
@pytest.mark.slow
def test_variant_tokenizer_luts(shared_data, real_texts, model):
    if model is None:
        pytest.skip(f"no tokenizer variants under {VARIANTS_DIR}")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    if sp.piece_to_id(SPACE) == sp.unk_id():
        # No standalone '▁': build_byte_luts must refuse it (openai/parameter-golf#897), not silently pass.
        with pytest.raises(tg.DataError, match=SPACE):
            tg.build_byte_luts(sp, model)
        pytest.skip(f"{model}: no standalone '{SPACE}' piece; build_byte_luts refuses it (asserted)")
    luts = lut_tensors(tg.build_byte_luts(sp, model))
    encoded = sp.encode(real_texts)
    unk = sp.unk_id()
    unk_surface = len(sp.decode([unk]).encode("utf-8"))
    clean, with_unk = [], []
    for ids in encoded:
        (with_unk if unk in ids else clean).append(ids)
    check_docs_against_decode(sp, luts, clean)

    # Documents with <unk> (only tokenizers without byte_fallback produce it): the LUT disagrees with
    # decode by exactly the unk surface per <unk> plus the leading space of the piece after it.
    # This is a genuine limitation of the LUT rule for such tokenizers (reported, not hidden): the
    # bytes under an <unk> are lost, so BPB is computed over fewer bytes than the text has.
    byte_fallback = any(sp.is_byte(i) for i in range(sp.vocab_size()))
    if byte_fallback:
        assert not with_unk, f"{model.name}: byte-fallback tokenizer emitted <unk>"
        return
    assert with_unk, "the no-byte-fallback variants are known to emit <unk> on this text"
    space = luts.has_leading_space
    for ids in with_unk:
        full = [sp.bos_id()] + ids
        n_lut, n_dec = int(lut_bytes(luts, full).sum()), decoded_bytes(sp, ids)
        positions = [j for j, t in enumerate(ids) if t == unk]
        lost = sum(unk_surface + int(j + 1 < len(ids) and bool(space[ids[j + 1]])) for j in positions)
        assert n_dec - n_lut == lost > 0


def test_dummy_prefix_decode_rule(shared_data):
    """Document the decode rule for add_dummy_prefix=True models (alepot55, identity normalizer)."""
    import sentencepiece as spm

    path = VARIANTS_DIR / "alepot55" / "fineweb_4096_bpe.model"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    luts = lut_tensors(tg.build_byte_luts(sp, path))
    docs = ["Hello world", "Second doc here", "\u20ac uro and more"]
    encoded = sp.encode(docs)
    for text, ids in zip(docs, encoded):
        assert sp.id_to_piece(ids[0]).startswith(SPACE), "encode() inserted the dummy-prefix '▁'"
        assert sp.decode(ids) == text  # ...and decode strips it again
        assert int(lut_bytes(luts, [sp.bos_id()] + ids).sum()) == len(text.encode("utf-8"))
    stream = [i for ids in encoded for i in [sp.bos_id()] + ids]
    # decoding the concatenated stream keeps the dummy prefix of documents 2..n, the LUT does not
    assert decoded_bytes(sp, stream) == int(lut_bytes(luts, stream).sum()) + len(docs) - 1


# ---------------------------------------------------------------- build_byte_luts refusals

def test_build_byte_luts_refuses_tokenizer_without_space_piece(tmp_path):
    """A real SentencePiece model trained in-process on text without whitespace has no '▁' piece;
    with byte_fallback it then spells every space as 3 byte tokens (openai/parameter-golf#897)."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    sentences = ["".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=proto, model_type="bpe", vocab_size=300,
        byte_fallback=True, add_dummy_prefix=False, character_coverage=1.0, hard_vocab_limit=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    path = tmp_path / "nospace_300_bpe.model"
    path.write_bytes(proto.getvalue())
    sp = tg.load_tokenizer(path, 300)
    assert sp.piece_to_id(SPACE) == sp.unk_id()
    pieces = [sp.id_to_piece(i) for i in sp.encode("alpha beta")]
    assert pieces == ["alpha", "<0xE2>", "<0x96>", "<0x81>", "beta"], pieces  # one space = 3 "bytes"
    with pytest.raises(tg.DataError) as ei:
        tg.build_byte_luts(sp, path)
    assert str(path) in str(ei.value) and SPACE in str(ei.value)


def test_build_byte_luts_values_on_dataset_tokenizer(dataset):
    sp = tg.load_tokenizer(dataset["tokenizer"], dataset["vocab_size"])
    luts = tg.build_byte_luts(sp, dataset["tokenizer"])
    V = sp.vocab_size()
    assert luts.base_bytes.shape == luts.has_leading_space.shape == luts.is_boundary.shape == (V,)
    assert luts.is_boundary[sp.bos_id()] and luts.base_bytes[sp.bos_id()] == 0
    space = sp.piece_to_id(SPACE)
    assert luts.has_leading_space[space] and luts.base_bytes[space] == 0
    for i in range(V):
        if sp.is_byte(i):
            assert luts.base_bytes[i] == 1 and not luts.has_leading_space[i]
        elif not luts.is_boundary[i]:
            piece = sp.id_to_piece(i)
            assert luts.base_bytes[i] + luts.has_leading_space[i] == len(piece.replace(SPACE, " ").encode())


# ---------------------------------------------------------------- eval_windows (plain)

class UniformStub:
    """Per-token loss log(V) for every target, as a model with uniform logits; records its inputs."""

    def __init__(self, vocab_size: int):
        self.loss = math.log(vocab_size)
        self.seen_x: list[torch.Tensor] = []
        self.seen_y: list[torch.Tensor] = []

    def __call__(self, x, y, reduction="mean"):
        assert reduction == "none"
        self.seen_x.append(x.clone())
        self.seen_y.append(y.clone())
        return torch.full(y.shape, self.loss, dtype=torch.float64)


@pytest.fixture(scope="module")
def val_setup(dataset):
    sp = tg.load_tokenizer(dataset["tokenizer"], dataset["vocab_size"])
    luts = lut_tensors(tg.build_byte_luts(sp, dataset["tokenizer"]))
    seq = 64
    val = tg.load_validation_tokens(tg.list_shards(dataset["dir"], "val"), seq, dataset["vocab_size"])
    return sp, luts, seq, val


def test_eval_val_uniform_stub(val_setup, dataset):
    sp, luts, seq, val = val_setup
    V = dataset["vocab_size"]
    res = tg.eval_windows(eval_ctx(UniformStub(V), val, luts, seq, batch_seqs=7), seq)
    n_tokens = val.size - 1
    n_bytes = int(lut_bytes(luts, val.astype(np.int64)).sum())
    assert res.tokens == n_tokens and res.bytes == n_bytes
    assert res.val_loss == pytest.approx(math.log(V), rel=1e-12)
    assert res.val_bpb == pytest.approx(math.log2(V) * n_tokens / n_bytes, rel=1e-12)
    # The bytes are the document bytes: decoded per document, for the documents the split covers
    # whole (all but the truncated last one).
    docs = split_at_bos(val.astype(np.int64), sp.bos_id())
    whole = sum(decoded_bytes(sp, d[1:]) for d in docs[:-1])
    assert n_bytes == whole + int(lut_bytes(luts, docs[-1]).sum())


def test_eval_val_zero_gpt_is_uniform(val_setup, dataset):
    _, luts, seq, val = val_setup
    V = dataset["vocab_size"]
    cfg = tg.ModelConfig(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                         tie_embeddings=True, tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0,
                         qk_gain_init=1.5)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.eval()
    part = val[: 6 * seq + 1]
    res = tg.eval_windows(eval_ctx(model, part, luts, seq), seq)
    n_bytes = int(lut_bytes(luts, part.astype(np.int64)).sum())
    assert res.tokens == 6 * seq and res.bytes == n_bytes
    assert res.val_loss == pytest.approx(math.log(V), rel=1e-6)
    assert res.val_bpb == pytest.approx(math.log2(V) * res.tokens / n_bytes, rel=1e-6)


@pytest.mark.parametrize("world_size, batch_seqs", [(2, 3), (3, 2), (4, 5), (5, 1)])
def test_eval_val_rank_split_covers_every_target_once(val_setup, dataset, world_size, batch_seqs):
    _, luts, seq, val = val_setup
    V = dataset["vocab_size"]
    n_seqs = (val.size - 1) // seq
    assert n_seqs >= world_size
    full = tg.eval_windows(eval_ctx(UniformStub(V), val, luts, seq, batch_seqs=batch_seqs), seq)
    xs, ys, tokens, n_bytes, nats = [], [], 0, 0, 0.0
    for rank in range(world_size):  # no process group: each call returns its own rank's sums
        stub = UniformStub(V)
        r = tg.eval_windows(eval_ctx(stub, val, luts, seq, batch_seqs=batch_seqs, rank=rank, world_size=world_size),
                            seq)
        assert all(x.shape == (batch_seqs, seq) for x in stub.seen_x), "one shape: short batches are padded"
        # Padding repeats a batch's last window (masked out): keep each batch's distinct windows.
        xs += [torch.unique_consecutive(x, dim=0) for x in stub.seen_x]
        ys += [torch.unique_consecutive(y, dim=0) for y in stub.seen_y]
        tokens += r.tokens
        n_bytes += r.bytes
        nats += r.val_loss * r.tokens
    v = torch.from_numpy(val.astype(np.int64))
    # in rank order, the windows are exactly the sequences 0..n_seqs-1: every target once
    assert torch.equal(torch.cat(xs), v[:-1].view(n_seqs, seq))
    assert torch.equal(torch.cat(ys), v[1:].view(n_seqs, seq))
    assert tokens == full.tokens == n_seqs * seq
    assert n_bytes == full.bytes
    assert tg.bpb_from_sums(nats, tokens, n_bytes) == pytest.approx(full.val_bpb, rel=1e-12)
