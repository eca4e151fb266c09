import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.cascade import (cascade_attention, dense_attention_reference, merge_state, merge_state_in_place,
                              paged_attention_with_lse, plan_cascade)


# ----------------------------------------------------------------------------------------------
# Independent dense reference: one query row at a time, float64, straight from the block tables.

def dense(q, k_cache, v_cache, bt, kv, ql, scale):
    """q rows in request order. Returns (out [rows, hq, d], lse base 2 [rows, hq]) in float64."""
    hq, d = q.shape[1:]
    ps, hkv = k_cache.shape[1:3]
    outs, lses, row = [], [], 0
    for r in range(len(kv)):
        pages = torch.as_tensor(bt[r][: -(-int(kv[r]) // ps)], dtype=torch.long)
        k = k_cache[pages].reshape(-1, hkv, d)[: kv[r]].double()
        v = v_cache[pages].reshape(-1, hkv, d)[: kv[r]].double()
        for i in range(ql[r]):
            seen = kv[r] - ql[r] + i + 1                    # bottom-right aligned causal mask
            kh = torch.arange(hq) // (hq // hkv)
            s = torch.einsum("hd,khd->hk", q[row].double(), k[:seen, kh]) * scale
            outs.append(torch.einsum("hk,khd->hd", torch.softmax(s, -1), v[:seen, kh]))
            lses.append(torch.logsumexp(s, -1) / math.log(2))
            row += 1
    return torch.stack(outs), torch.stack(lses)


def make_batch(leaves, ps, hq, hkv, d, seed):
    """leaves: (prefix pages, n_unique_pages, last_fill, q_len). Page ids are shuffled; KV cache has
    spare unused pages. Returns q (request order), caches, block table, kv_lens, q_lens."""
    rng = np.random.default_rng(seed)
    n = 1 + max((p for lf in leaves for p in lf[0]), default=-1)
    rows, kv, ql = [], [], []
    for prefix, n_unique, fill, q in leaves:
        rows.append(list(prefix) + list(range(n, n + n_unique)))
        n += n_unique
        kv.append((len(rows[-1]) - 1) * ps + fill)
        ql.append(min(q, kv[-1]))
    remap = rng.permutation(n + 3)
    bt = np.full((len(rows), max(map(len, rows))), -1, np.int32)
    for i, r in enumerate(rows):
        bt[i, : len(r)] = remap[r]
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(n + 3, ps, hkv, d, generator=g)
    v_cache = torch.randn(n + 3, ps, hkv, d, generator=g)
    q = torch.randn(sum(ql), hq, d, generator=g)
    return q, k_cache, v_cache, bt, np.array(kv), np.array(ql)


def run_cascade(q, k_cache, v_cache, bt, kv, ql, **kw):
    ps, d = k_cache.shape[1], q.shape[-1]
    plan = plan_cascade(bt, kv, ql, ps, **kw)
    out_plan = cascade_attention(q[plan.row_order], k_cache, v_cache, plan, d**-0.5)
    out = torch.empty_like(out_plan)
    out[plan.row_order] = out_plan                      # back to request order
    return plan, out


def has_empty_group(plan):
    return any((torch.diff(lv.kv_indptr) == 0).any() for lv in plan.levels[:-1])


def scenario(name, prefill, ps, rng):
    """Leaves for the explicit cases. With prefill, queries stay within the unique pages except for
    one request whose query also covers shared pages (the planner must clamp it)."""
    def q():
        return int(rng.integers(2, 2 * ps)) if prefill else 1
    if name == "two_level":
        leaves = [(list(range(5 * g, 5 * g + 5)), 3, int(rng.integers(1, ps + 1)), q())
                  for g in range(3) for _ in range(3)]
        leaves += [([], 2, 1, q()), ([], 4, ps, q())]            # loners: empty shared groups
    else:
        system = [0, 1, 2]
        leaves = [(system + [3 + 2 * s, 4 + 2 * s], 3, int(rng.integers(1, ps + 1)), q())
                  for s in range(2) for _ in range(3)]
        leaves += [(system, 3, 2, q()), ([], 3, 1, q())]         # system-only (empty at level 1), loner
    if prefill:
        p, u, f, _ = leaves[0]
        leaves[0] = (p, u, f, (u - 1) * ps + f + 2 * ps)         # query reaches 2 pages into the prefix
    return leaves


@pytest.mark.parametrize("name,levels", [("two_level", 2), ("three_level", 3)])
@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_cascade_matches_dense(name, levels, prefill, hq, hkv):
    ps, d = 4, 16
    leaves = scenario(name, prefill, ps, np.random.default_rng(0))
    q, kc, vc, bt, kv, ql = make_batch(leaves, ps, hq, hkv, d, seed=1)
    plan, out = run_cascade(q, kc, vc, bt, kv, ql, max_levels=levels)
    assert len(plan.levels) == levels and has_empty_group(plan)
    ref, _ = dense(q, kc, vc, bt, kv, ql, d**-0.5)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-5


@st.composite
def random_batches(draw):
    ps = draw(st.sampled_from([1, 2, 4]))
    leaves, counter = [], [0]

    def node(prefix, depth):
        k = draw(st.integers(0 if depth else 1, 3))
        prefix = prefix + list(range(counter[0], counter[0] + k))
        counter[0] += k
        for _ in range(draw(st.integers(0, 3))):
            q = draw(st.one_of(st.just(1), st.integers(1, 12)))
            leaves.append((prefix, draw(st.integers(1, 3)), draw(st.integers(1, ps)), q))
        if depth < 2:
            for _ in range(draw(st.integers(0, 2))):
                node(prefix, depth + 1)

    for _ in range(draw(st.integers(1, 3))):
        node([], 0)
    if not leaves:
        leaves.append(([], 1, 1, 1))
    hq, hkv = draw(st.sampled_from([(2, 2), (4, 2), (4, 1)]))
    return leaves, ps, hq, hkv, draw(st.integers(0, 2**31)), draw(st.integers(1, 3))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_batches())
def test_cascade_matches_dense_random(batch):
    leaves, ps, hq, hkv, seed, max_levels = batch
    d = 8
    q, kc, vc, bt, kv, ql = make_batch(leaves, ps, hq, hkv, d, seed)
    plan, out = run_cascade(q, kc, vc, bt, kv, ql, max_levels=max_levels)
    ref, _ = dense(q, kc, vc, bt, kv, ql, d**-0.5)
    assert (out.double() - ref).abs().max() <= 1e-5


def test_paged_attention_lse_matches_dense():
    # 4 groups: multi-row causal prefill, an empty group, a decode row, a 2-row group; non-causal too.
    ps, hq, hkv, d = 4, 6, 2, 8
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(10, ps, hkv, d, generator=g), torch.randn(10, ps, hkv, d, generator=g)
    qo_indptr = torch.tensor([0, 3, 4, 5, 7], dtype=torch.int32)
    kv_indptr = torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32)
    kv_indices = torch.tensor([7, 2, 5, 0, 9, 1], dtype=torch.int32)
    last = torch.tensor([2, 0, 4, 1], dtype=torch.int32)
    q = torch.randn(7, hq, d, generator=g)
    keep = torch.tensor([0, 1, 2, 4, 5, 6])                     # rows of the non-empty groups
    bt, kv, ql = [[7, 2, 5], [0], [9, 1]], np.array([10, 4, 5]), np.array([3, 1, 2])
    scale = 0.3
    for causal in (True, False):
        out, lse = paged_attention_with_lse(q, kc, vc, qo_indptr, kv_indptr, kv_indices, last, causal, scale)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (7, hq)
        assert (out[3] == 0).all() and torch.isneginf(lse[3]).all()        # empty group
        if causal:
            ref_out, ref_lse = dense(q[keep], kc, vc, bt, kv, ql, scale)
            assert (out[keep].double() - ref_out).abs().max() <= 1e-5
            assert (lse[keep].double() - ref_lse).abs().max() <= 1e-5
        else:  # every row of a group sees all its keys: compare against a dense log2-sum-exp
            k = kc[[7, 2, 5]].reshape(-1, hkv, d)[:10].double().repeat_interleave(hq // hkv, 1)
            s = torch.einsum("qhd,khd->qhk", q[:3].double(), k) * scale
            assert (lse[:3].double() - torch.logsumexp(s, -1) / math.log(2)).abs().max() <= 1e-5
    # float64 in -> float64 math and lse; half in -> half out
    out64, lse64 = paged_attention_with_lse(q.double(), kc.double(), vc.double(), qo_indptr, kv_indptr,
                                            kv_indices, last, True, scale)
    assert out64.dtype == lse64.dtype == torch.float64
    outbf, lsebf = paged_attention_with_lse(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), qo_indptr, kv_indptr,
                                            kv_indices, last, True, scale)
    assert outbf.dtype == torch.bfloat16 and lsebf.dtype == torch.float32


def test_all_groups_empty():
    kc = torch.randn(2, 4, 1, 8)
    q = torch.randn(3, 2, 8)
    out, lse = paged_attention_with_lse(q, kc, kc, torch.tensor([0, 2, 3]), torch.tensor([0, 0, 0]),
                                        torch.zeros(0, dtype=torch.int32), torch.tensor([0, 0]), False, 1.0)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_state():
    g = torch.Generator().manual_seed(0)
    v_a, v_b = torch.randn(5, 3, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    s_a, s_b = torch.randn(5, 3, generator=g) * 4, torch.randn(5, 3, generator=g) * 4
    ninf = torch.full((5, 3), -math.inf)
    # two empty states -> (0, -inf), no NaN
    v, s = merge_state(torch.zeros_like(v_a), ninf, torch.zeros_like(v_b), ninf)
    assert (v == 0).all() and torch.isneginf(s).all()
    # empty is the identity
    v, s = merge_state(v_a, s_a, v_b, ninf)
    assert torch.allclose(v, v_a) and torch.allclose(s, s_a)
    v, s = merge_state(v_b, ninf, v_a, s_a)
    assert torch.allclose(v, v_a) and torch.allclose(s, s_a)
    # in place == functional
    v, s = merge_state(v_a, s_a, v_b, s_b)
    v2, s2 = v_a.clone(), s_a.clone()
    merge_state_in_place(v2, s2, v_b, s_b)
    assert torch.equal(v, v2) and torch.equal(s, s2)
    assert torch.allclose(s, torch.logaddexp2(s_a, s_b))


def test_merge_of_split_keys_equals_full():
    # attention over keys A u B == merge(attention over A, attention over B)
    ps, hq, d = 2, 2, 8
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(6, ps, 1, d, generator=g), torch.randn(6, ps, 1, d, generator=g)
    q = torch.randn(1, hq, d, generator=g)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    full = paged_attention_with_lse(q, kc, vc, i32(0, 1), i32(0, 5), i32(4, 0, 3, 1, 5), i32(1), False, 0.5)
    a = paged_attention_with_lse(q, kc, vc, i32(0, 1), i32(0, 2), i32(4, 0), i32(2), False, 0.5)
    b = paged_attention_with_lse(q, kc, vc, i32(0, 1), i32(0, 3), i32(3, 1, 5), i32(1), False, 0.5)
    v, s = merge_state(*a, *b)
    assert (v - full[0]).abs().max() <= 1e-5 and (s - full[1]).abs().max() <= 1e-5


def test_dense_attention_reference_helper():
    ps, d = 4, 16
    leaves = scenario("three_level", True, ps, np.random.default_rng(3))
    q, kc, vc, bt, kv, ql = make_batch(leaves, ps, 8, 2, d, seed=4)
    out, lse = dense_attention_reference(q, kc, vc, bt, kv, ql, d**-0.5, return_lse=True)
    ref_out, ref_lse = dense(q, kc, vc, bt, kv, ql, d**-0.5)
    assert out.dtype == torch.float64
    assert (out - ref_out).abs().max() <= 1e-12 and (lse - ref_lse).abs().max() <= 1e-12
