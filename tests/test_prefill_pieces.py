"""A prefill step in two pieces that attend apart (models/tp_overlap.py under tensor parallelism): where the
step is cut (split_request), the two sub-batches (split_batch), and the backends' plan_pieces / use_piece
against one plan of the whole step: the same K/V written and the same attention output, row for row."""
import numpy as np
import pytest
import torch

from nanovllm.attention.backend import StepBatch, split_batch
from nanovllm.attention.torch_backend import TorchAttentionBackend
from nanovllm.models import tp_overlap

HQ, HKV, D, PAGE = 4, 2, 16, 4


def prefill_step(q_lens, cached, heads=(HQ, HKV, D), device="cpu", seed=0):
    """A prefill step: request i has cached[i] tokens in the cache and q_lens[i] new ones; pages dealt out
    shuffled. Returns (batch, q, k, v) with the new tokens' q/k/v."""
    rng = np.random.default_rng(seed)
    q_lens, cached = np.array(q_lens, np.int32), np.array(cached, np.int32)
    kv_lens = q_lens + cached
    pages = -(-kv_lens // PAGE)
    order = rng.permutation(int(pages.sum())).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    qo_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    slots = [order[kv_indptr[r] + t // PAGE] * PAGE + t % PAGE
             for r in range(len(q_lens)) for t in range(cached[r], kv_lens[r])]
    last = (kv_lens - 1) % PAGE + 1
    batch = StepBatch(True, q_lens, kv_lens, qo_indptr, kv_indptr, order, last.astype(np.int32),
                      torch.tensor(slots, dtype=torch.long, device=device), PAGE)
    g = torch.Generator().manual_seed(seed)
    rows = int(q_lens.sum())
    hq, hkv, d = heads
    q, k, v = (torch.randn(rows, h, d, generator=g).to(device) for h in (hq, hkv, hkv))
    return batch, q, k, v


def caches(batch, hkv=HKV, d=D, device="cpu", dtype=torch.float32, seed=1):
    """K/V caches whose cached tokens are random (the new ones are written by the step)."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(batch.kv_indices), PAGE, hkv, d)
    return torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype)


def test_split_request_cuts_near_half_between_requests(monkeypatch):
    monkeypatch.setattr(tp_overlap, "MIN_PIECE_BYTES", 1024)
    indptr = lambda lens: np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    bf16 = torch.bfloat16
    assert tp_overlap.split_request(indptr([100, 100, 100, 100]), 64, bf16) == 2
    assert tp_overlap.split_request(indptr([200, 50, 150, 200]), 64, bf16) == 2      # 250 | 350: nearest half
    assert tp_overlap.split_request(indptr([400]), 64, bf16) is None                 # one request
    assert tp_overlap.split_request(indptr([390, 10]), 64, bf16) is None             # 97% | 3%: too uneven
    assert tp_overlap.split_request(indptr([66, 34]), 64, bf16) is None              # past 5/8
    assert tp_overlap.split_request(indptr([62, 38]), 64, bf16) == 1
    assert tp_overlap.split_request(indptr([4, 4]), 64, bf16) is None                # messages under the minimum
    assert tp_overlap.split_request(indptr([8, 8]), 64, bf16) == 1                   # 8 rows x 128 B: the minimum


def test_split_batch_makes_two_batches_of_their_own():
    batch, *_ = prefill_step([3, 5, 2], [4, 0, 9])
    a, b = split_batch(batch, 1)
    assert a.q_lens.tolist() == [3] and b.q_lens.tolist() == [5, 2]
    assert b.qo_indptr.tolist() == [0, 5, 7] and b.kv_indptr[0] == 0
    assert np.concatenate([a.kv_indices, b.kv_indices]).tolist() == batch.kv_indices.tolist()
    assert torch.equal(torch.cat([a.slot_mapping, b.slot_mapping]), batch.slot_mapping)
    for r in (0, 3):
        with pytest.raises(ValueError, match="cannot split"):
            split_batch(batch, r)
    batch.cascade = object()
    with pytest.raises(ValueError, match="cannot split"):
        split_batch(batch, 1)


def run_whole_and_pieces(backend, batch, q, k, v, kc, vc, r):
    """(output of one plan, output of the pieces, the caches after each)."""
    kw, vw = kc.clone(), vc.clone()
    backend.plan(batch)
    whole = backend.forward(q, k, v, kw, vw)
    assert backend.piece_rows is None
    backend.plan_pieces(batch, r)
    split = int(batch.qo_indptr[r])
    assert backend.piece_rows == split
    kp, vp = kc.clone(), vc.clone()
    outs = []
    for i, rows in enumerate((slice(0, split), slice(split, None))):
        backend.use_piece(i)
        outs.append(backend.forward(q[rows], k[rows], v[rows], kp, vp))
    backend.plan(batch)   # a plain plan undoes the pieces
    assert backend.piece_rows is None
    return whole, torch.cat(outs), (kw, vw), (kp, vp)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_torch_backend_pieces_equal_the_whole_step(r):
    batch, q, k, v = prefill_step([3, 5, 2, 6], [4, 0, 9, 13])
    kc, vc = caches(batch)
    backend = TorchAttentionBackend(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=PAGE,
                                    dtype=torch.float32, device=torch.device("cpu"))
    whole, pieces, (kw, vw), (kp, vp) = run_whole_and_pieces(backend, batch, q, k, v, kc, vc, r)
    assert torch.equal(kw, kp) and torch.equal(vw, vp)
    assert torch.allclose(whole, pieces, atol=1e-6)


@pytest.mark.gpu
def test_flashinfer_backend_pieces_equal_the_whole_step():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from nanovllm.attention.flashinfer_backend import FlashInferAttentionBackend
    dev = torch.device("cuda")
    hq, hkv, d = 16, 8, 128
    batch, q, k, v = prefill_step([300, 57, 512, 129, 64], [0, 200, 33, 0, 1000], (hq, hkv, d), dev)
    kc, vc = caches(batch, hkv, d, dev, torch.bfloat16)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    backend = FlashInferAttentionBackend(num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=PAGE,
                                         dtype=torch.bfloat16, device=dev, prefill_pieces=True)
    for r in (1, 2, 4):
        whole, pieces, (kw, vw), (kp, vp) = run_whole_and_pieces(backend, batch, q, k, v, kc, vc, r)
        assert torch.equal(kw, kp) and torch.equal(vw, vp)
        # the same kernel on the same rows: a request's work does not depend on the others'
        assert (whole.float() - pieces.float()).abs().max().item() <= 1e-2
    plain = FlashInferAttentionBackend(num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=PAGE,
                                       dtype=torch.bfloat16, device=dev)
    with pytest.raises(ValueError, match="prefill_pieces=True"):
        plain.plan_pieces(batch, 1)
