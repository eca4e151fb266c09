"""A prefill's shared level read as ragged KV runs of the cache (nanovllm/cascade/ragged_level.py): the
layout on the CPU against float64 attention over the level's pages (each request of the ragged layout
attends its run of the flat cache), the cases that must fall back to the paged kernel, the planner's
numeric group order; on the GPU, FlashInfer's ragged FA3 level against its paged FA3 level."""
import numpy as np
import pytest
import torch

from nanovllm.cascade.planner import plan_cascade
from nanovllm.cascade.ragged_level import ragged_layout
from test_split_level import D, HKV, HQ, PAGE, attend   # float64 attention, no keys: out 0, lse -inf

def by_pages(q, kc, vc, qo, kv, idx):
    out, lse = torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    for g in range(len(qo) - 1):
        k, v = (c[idx[kv[g]:kv[g + 1]]].reshape(-1, HKV, D) for c in (kc, vc))
        out[qo[g]:qo[g + 1]], lse[qo[g]:qo[g + 1]] = attend(q[qo[g]:qo[g + 1]], k, v)
    return out, lse


def by_runs(q, kc, vc, qo, kv):
    """FlashInfer's ragged semantics over the cache viewed as [pages x PAGE, HKV, D]."""
    flat_k, flat_v = kc.reshape(-1, HKV, D), vc.reshape(-1, HKV, D)
    out, lse = torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    for r in range(len(qo) - 1):
        if qo[r + 1] > qo[r]:
            out[qo[r]:qo[r + 1]], lse[qo[r]:qo[r + 1]] = attend(q[qo[r]:qo[r + 1]], flat_k[kv[r]:kv[r + 1]],
                                                                flat_v[kv[r]:kv[r + 1]])
    return out, lse


def test_runs_with_gaps_and_a_group_without_pages_attend_as_the_pages():
    qo = np.array([0, 3, 4, 6, 9])
    kv = np.array([0, 2, 2, 5, 6])
    idx = np.array([4, 5, 10, 11, 12, 20], np.int32)    # runs 4-5, none, 10-12, 20
    last = np.array([PAGE, 0, PAGE, PAGE])
    q_ptr, kv_ptr = ragged_layout(qo, kv, idx, last, PAGE)
    assert q_ptr.tolist() == [0, 0, 3, 3, 4, 4, 6, 6, 9]       # a query-less request before each group
    assert kv_ptr.tolist() == [0, 16, 24, 24, 24, 40, 52, 80, 84]
    torch.manual_seed(0)
    kc, vc = (torch.randn(24, PAGE, HKV, D, dtype=torch.float64) for _ in range(2))
    q = torch.randn(9, HQ, D, dtype=torch.float64)
    want, want_lse = by_pages(q, kc, vc, qo, kv, idx)
    got, got_lse = by_runs(q, kc, vc, q_ptr.numpy(), kv_ptr.numpy())
    assert torch.allclose(got, want, atol=1e-12) and torch.equal(got_lse.isinf(), want_lse.isinf())
    assert torch.allclose(got_lse[~got_lse.isinf()], want_lse[~want_lse.isinf()], atol=1e-12)


@pytest.mark.parametrize("kv, idx, last, why", [
    ([0, 3], [4, 5, 7], [PAGE], "a gap inside a group"),
    ([0, 2, 4], [10, 11, 4, 5], [PAGE, PAGE], "runs that do not increase"),
    ([0, 2, 4], [4, 5, 5, 6], [PAGE, PAGE], "runs that overlap"),
    ([0, 2], [4, 5], [PAGE - 1], "a partial last page"),
])
def test_layouts_the_ragged_kernel_cannot_read_fall_back(kv, idx, last, why):
    qo = np.arange(len(kv)) * 2
    assert ragged_layout(qo, np.array(kv), np.array(idx), np.array(last), PAGE) is None, why


def test_a_level_without_pages_is_a_layout_too():
    q_ptr, kv_ptr = ragged_layout(np.array([0, 1, 2]), np.array([0, 0, 0]), np.array([], np.int32),
                                  np.array([0, 0]), PAGE)
    assert q_ptr.tolist() == [0, 0, 1, 1, 2] and kv_ptr.tolist() == [0, 0, 0, 0, 0]


def test_planner_orders_groups_by_their_first_page():
    """Page 256's little-endian bytes (00 01 ..) sort before page 1's (01 00 ..): the order must be numeric."""
    table = np.array([[256, 257, 300], [256, 257, 301], [1, 2, 302], [1, 2, 303]], np.int32)
    plan = plan_cascade(table, np.full(4, 3 * PAGE), np.ones(4), PAGE, max_levels=2)
    shared = plan.levels[0]
    assert shared.kv_indices[:4].tolist() == [1, 2, 256, 257]
    assert ragged_layout(shared.qo_indptr, shared.kv_indptr, shared.kv_indices, shared.kv_last_page_len,
                         PAGE) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU (FA3)")
def test_ragged_level_equals_the_paged_level_gpu():
    """A cascade prefill step (two levels) with and without the ragged shared level: same output within
    bf16 rounding; the ragged level is used where the pages are runs, the paged one where they are not."""
    from nanovllm.cascade.flashinfer_cascade import FlashInferCascadeAttention
    from nanovllm.cascade.ragged_level import RaggedSharedLevel
    hq, hkv, d, page, dt = 16, 8, 128, 16, torch.bfloat16
    torch.manual_seed(0)
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    kc, vc = (torch.randn(400, page, hkv, d, dtype=dt, device="cuda") for _ in range(2))
    # three groups of 2-3 requests x 5-17 new tokens over 4-20 shared pages, a page-less request, runs with gaps
    firsts, lens, per = [3, 40, 90], [20, 4, 11], [3, 2, 2]
    table, kv_lens, q_lens, own = [], [], [], 200
    for f, n, r in zip(firsts, lens, per):
        for i in range(r):
            table.append(list(range(f, f + n)) + [own, own + 1]); own += 2
            q_lens.append(5 + 6 * i); kv_lens.append(n * page + q_lens[-1])
    table.append([own] + [0] * 21); q_lens.append(7); kv_lens.append(7)
    width = max(map(len, table))
    table = np.array([t + [0] * (width - len(t)) for t in table], np.int32)
    for shuffle in (False, True):
        t = table.copy()
        if shuffle:   # the first group's pages out of order: the paged kernel must take the level
            t[:3, :20] = t[:3, :20][:, ::-1].copy()
        plan = plan_cascade(t, np.array(kv_lens), np.array(q_lens), page, max_levels=2)
        q = torch.randn(plan.num_rows, hq, d, dtype=dt, device="cuda")
        outs = []
        for ragged in (False, True):
            casc = FlashInferCascadeAttention(ws, 2, hq, hkv, d, page, dt, 256, backend="auto", ragged_shared=ragged)
            casc.plan(plan)
            assert isinstance(casc.active[0], RaggedSharedLevel) == (ragged and not shuffle)
            outs.append(casc.run(q, (kc, vc)).float().clone())
        assert (outs[0] - outs[1]).abs().max().item() < 2e-2
