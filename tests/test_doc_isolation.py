"""DOC_ISOLATION: attention that never crosses a BOS (PR #1530, the 2026-04-10 VarLenAttn record), its FA3
varlen and SDPA-mask forms, the document-packed training order, and evaluation under isolation.

The FA3 path runs against the stand-in `flash_attn_interface` in tests/stubs/fa3, whose varlen call attends one
sequence of cu_seqlens at a time (the varlen semantics, written independently of document_mask), so "the
fallback equals the varlen path" compares two different constructions of the same attention."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import eval_ctx, logits, tg
from pgolf.shards import write_shard
from scoring_trace import WindowTrace
from test_eval import fake_luts, val_stream

BOS = tg.BOS_ID


def iso_model(**kw) -> tg.GPT:
    """A small model with every feature that mixes tokens outside attention (SmearGate, XSA, parallel lanes,
    depth recurrence), trained-like (no zero-initialized no-ops)."""
    torch.manual_seed(0)
    base = dict(vocab_size=96, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                tie_embeddings=True, tied_embed_init_std=0.05, logit_softcap=30.0, rope_base=10000.0,
                qk_gain_init=1.5, smear_gate_enabled=True, xsa_last_n=2, num_loops=1, loop_start=1, loop_end=2,
                parallel_mode="lanes", parallel_start_layer=2, rope_dims=4, doc_isolation=True)
    base.update(kw)
    model = tg.GPT(tg.ModelConfig(**base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.set_looping(True)
    return model


def random_docs(rows: int, cols: int, seed: int, vocab: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, cols), generator=g)
    ids[torch.rand(rows, cols, generator=g) < 0.08] = BOS
    return ids


def doc_of(ids: torch.Tensor) -> torch.Tensor:
    """Per-token document index within its row (a row start opens one, as does every BOS)."""
    return (ids == BOS).cumsum(1)


def test_a_tokens_logits_do_not_change_when_any_other_document_changes():
    model = iso_model()
    ids = random_docs(3, 40, seed=1)
    ids[0, 12], ids[0, 25] = BOS, BOS  # row 0 holds at least three documents
    docs = doc_of(ids)
    with torch.no_grad():
        base = logits(model, ids)
        for row, doc in [(0, docs[0, 12].item()), (1, 0), (2, docs[2, -1].item())]:
            changed = ids.clone()
            others = (torch.arange(3)[:, None] != row) | (docs != doc)
            g = torch.Generator().manual_seed(100 + row)  # not random_docs(seed=1)'s own draw
            fresh = torch.randint(2, 96, ids.shape, generator=g)
            changed[others & (ids != BOS)] = fresh[others & (ids != BOS)]  # every other document rewritten
            out = logits(model, changed)
            mine = (torch.arange(3)[:, None] == row) & (docs == doc)
            assert torch.allclose(out[mine], base[mine], atol=1e-5, rtol=0), (row, doc)
            assert not torch.allclose(out[~mine], base[~mine], atol=1e-3), "the rewrite changed nothing"


def test_without_isolation_the_same_rewrite_leaks_across_documents():
    """The check above can fail: plain causal attention lets a later document see an earlier one."""
    model = iso_model(doc_isolation=False)
    ids = random_docs(1, 40, seed=2)
    ids[0, 20] = BOS
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 94 + 2
    with torch.no_grad():
        assert not torch.allclose(logits(model, changed)[0, 20:], logits(model, ids)[0, 20:], atol=1e-5)


def test_document_mask_is_causal_and_cut_at_row_starts_and_bos():
    ids = torch.tensor([[5, 6, BOS, 7, 8], [BOS, 9, 9, BOS, 4]])
    m = tg.document_mask(tg.document_ids(ids, BOS))[:, 0].int()
    assert m[0].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert m[1].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert tg.document_starts(ids, BOS).tolist() == [0, 2, 5, 8, 10]
    # The same sequences from their cu_seqlens (padded as the loader pads them) give the same mask.
    cu = torch.tensor([0, 2, 5, 8, 10, 10, 10], dtype=torch.int32)
    assert torch.equal(tg.document_mask(tg.document_ids(ids, BOS, cu))[:, 0].int(), m)


def test_packed_cu_seqlens_cut_at_bos_and_every_max_len_from_a_document_start():
    """PR #1855's rule: a document longer than max_len is cut every max_len tokens from its own start, not
    where a row of max_len would end; padded with the total to a multiple of CU_BUCKET."""
    tokens = np.full(40, 9)
    tokens[[3, 30]] = BOS
    cu = tg.packed_cu_seqlens(tokens, BOS, 8)
    assert cu.dtype == np.int32 and cu.size == tg.CU_BUCKET and set(cu[7:].tolist()) == {40}
    assert cu[:7].tolist() == [0, 3, 11, 19, 27, 30, 38]  # 0..3; 3 + 8k up to the BOS at 30; 30..40 as 8 + 2
    # The row rule (host_cu_seqlens) on the same tokens as rows of 8 cuts at 8, 16, 24, 32 instead.
    assert tg.host_cu_seqlens(tokens.reshape(5, 8), BOS)[:8].tolist() == [0, 3, 8, 16, 24, 30, 32, 40]


@pytest.fixture
def fake_fa3(fa3_stub, monkeypatch):
    """The FA3 stand-in (tests/stubs/fa3: upstream's custom ops and autograd.Functions, computed one cu_seqlens
    sequence at a time, written independently of document_mask); its entry points' calls counted."""
    calls = {"varlen": 0, "dense": 0}
    for name, key in (("flash_attn_varlen_func", "varlen"), ("flash_attn_func", "dense")):
        real = getattr(fa3_stub, name)

        def counted(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)

        monkeypatch.setattr(fa3_stub, name, counted)
    yield calls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_sdpa_fallback_equals_the_varlen_path_on_random_documents(fake_fa3, seed):
    sdpa = iso_model()
    fa3 = iso_model(attn_backend="fa3")
    fa3.load_state_dict(sdpa.state_dict())
    fa3.set_looping(True)
    ids = random_docs(2, 48, seed=seed)
    ref_loss = sdpa(ids[:, :-1], ids[:, 1:])
    ref_loss.backward()
    loss = fa3(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert fake_fa3["varlen"] > 0 and fake_fa3["dense"] == 0
    # The stand-in runs in bf16 (FA3 takes bf16); the loss and gradients agree to bf16 precision.
    assert loss.item() == pytest.approx(ref_loss.item(), abs=2e-2)
    for (name, a), b in zip(sdpa.named_parameters(), fa3.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=5e-2, rtol=5e-2), name


def test_cu_seqlens_op_compiles_once_for_every_document_layout():
    """A data-dependent number of documents must not recompile the graph (nothing compiles in a budget)."""
    torch._dynamo.reset()
    compiles = []

    def backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    op = tg.doc_cu_seqlens()
    fn = torch.compile(lambda ids: op(ids, BOS).float().sum(), backend=backend, fullgraph=True, dynamic=False)
    for seed in range(4):
        ids = random_docs(2, 32, seed=seed)
        assert fn(ids).item() == tg.document_starts(ids, BOS).float().sum().item()
    assert len(compiles) == 1


def test_sliding_scoring_with_isolation_scores_every_target_once(monkeypatch):
    model = iso_model()
    val = val_stream(301, vocab=96)
    luts = fake_luts(96)
    starts, first = tg.sliding_windows(300, 32, 8)
    trace = WindowTrace(monkeypatch)
    with torch.no_grad():
        sums = tg.score_windows(eval_ctx(model, val, luts, 32, stride=8), starts, first)
    scored = np.sort(trace.targets())
    assert np.array_equal(scored, np.arange(1, 301)) and int(sums[1]) == 300


def test_a_documents_losses_do_not_depend_on_where_it_sits_in_the_row():
    """With isolation a document is scored as if alone from its BOS: RoPE is relative, so shifting it to
    another position of the row (after other documents) changes none of its losses."""
    model = iso_model()
    ids = random_docs(1, 41, seed=5)
    ids[0, 1:] = ids[0, 1:].clamp_min(2)
    ids[0, 12], ids[0, 30] = BOS, BOS  # documents [0, 12), [12, 30), [30, 41)
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        full = model(x, y, reduction="none")
        alone = model(x[:, 12:30], y[:, 12:30], reduction="none")
    assert torch.allclose(full[:, 12:30], alone, atol=1e-5, rtol=0)


def write_stream(tmp_path, tokens):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.asarray(tokens, dtype=np.uint16))
    return [path]


def batches(loader, n):
    try:
        return [torch.cat(loader.next_batch()[:2], dim=1) for _ in range(n)]
    finally:
        loader.close()


def test_packed_loader_reads_one_contiguous_stream_from_the_first_bos(tmp_path):
    """PR #1855's packing: a micro-batch is one row of 3 x 16 inputs and their targets; the next starts after
    its last target (49 tokens a micro-batch), from the shard's first BOS."""
    tokens = np.arange(3, 3 + 700) % 60000
    tokens[:5] = 7
    tokens[5] = BOS  # the stream starts at the first BOS, not at the file start
    tokens[100::50] = BOS
    files = write_stream(tmp_path, tokens)
    loader = tg.TrainLoader(files, 16, 3, 1, 0, 1 << 16, tg.DistInfo(0, 1, torch.device("cpu")), packed=True)
    got = batches(loader, 4)
    assert all(b.shape == (1, 96) for b in got)
    for i, b in enumerate(got):
        start = 5 + 49 * i
        assert b[0, :48].tolist() == tokens[start: start + 48].tolist()  # inputs
        assert b[0, 48:].tolist() == tokens[start + 1: start + 49].tolist()  # targets


def test_packed_order_is_the_same_for_any_world_size_until_a_shard_ends(tmp_path):
    """One process with 2 micro-batches a step reads what 2 ranks with one each read (spans in order, rank r
    the r-th), until a shard's rest cannot hold a micro-step of the world: 2 ranks then move to the next
    shard's first BOS, where one process still fits one span (PR #1855's DocumentPackingLoader)."""
    tokens = np.arange(2, 2 + 1010) % 60000
    tokens[::40] = BOS
    files = write_stream(tmp_path, tokens)
    cpu = torch.device("cpu")
    one = batches(tg.TrainLoader(files, 8, 2, 2, 0, 1 << 16, tg.DistInfo(0, 1, cpu), packed=True), 60)
    ranks = [batches(tg.TrainLoader(files, 8, 2, 1, 0, 1 << 16, tg.DistInfo(r, 2, cpu), packed=True), 30)
             for r in range(2)]
    # 17 tokens a span: 1010 tokens hold 59 spans, 2 ranks 29 micro-steps of 34 (58 spans): one process reads
    # the 59th where the ranks go back to the (only) shard's first BOS
    assert all(torch.equal(one[2 * s + r], ranks[r][s]) for s in range(29) for r in range(2))
    assert torch.equal(ranks[0][29], ranks[0][0]) and not torch.equal(one[58], ranks[0][29])


def test_a_packed_row_under_sdpas_document_mask_on_cuda_is_refused_before_any_work():
    """The record's 98,304-token packed row would need a 10 GB SDPA mask (CUDA, COMPILE=0, no FA3): one line
    naming the knobs, before any work. FlexAttention (compiled), FA3, a CPU run or rows are allowed."""
    cuda = torch.device("cuda")
    h = tg.Hyperparameters.from_env({"COMPILE": "0"})
    with pytest.raises(tg.ConfigError, match=r"COMPILE=0 is not allowed with DOC_ISOLATION=1, DOC_PACKED_LOADER=1 "
                                             r"and attention on sdpa: .* 98304-token row takes 10 GB"):
        tg.check_packed_mask(h, "sdpa", cuda)
    tg.check_packed_mask(tg.Hyperparameters.from_env({}), "sdpa", cuda)
    tg.check_packed_mask(h, "fa3", cuda)
    tg.check_packed_mask(h, "sdpa", torch.device("cpu"))
    tg.check_packed_mask(tg.Hyperparameters.from_env({"COMPILE": "0", "DOC_PACKED_LOADER": "0"}), "sdpa", cuda)


def test_a_packed_loader_whose_shards_cannot_hold_one_micro_step_says_so(tmp_path):
    """DOC_PACKED_LOADER=1 needs world_size x (micro_seqs x seq_len + 1) tokens after some shard's first BOS."""
    tokens = np.full(200, 9)
    tokens[50] = BOS  # 150 tokens from the first BOS: one rank's span of 3 x 16 + 1 fits, four ranks' do not
    files = write_stream(tmp_path, tokens)
    cpu = torch.device("cpu")
    tg.TrainLoader(files, 16, 3, 1, 0, 1 << 16, tg.DistInfo(0, 1, cpu), packed=True).close()
    with pytest.raises(tg.DataError, match=r"no shard holds one micro-step of every rank from its first BOS "
                                           r"\(4 x 49 tokens\) for DOC_PACKED_LOADER=1"):
        tg.TrainLoader(files, 16, 3, 1, 0, 1 << 16, tg.DistInfo(0, 4, cpu), packed=True)
