import time

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.cascade import plan_cascade


# ----------------------------------------------------------------------------------------------
# Batch builders

def build(leaves, page_size, rng):
    """leaves: list of (prefix page list, n_unique_pages >= 1, last_fill, q_len or None=decode).
    Returns a shuffled batch (block_table padded with -1, kv_lens, q_lens) with page ids remapped by a
    random permutation so that sorted order is unrelated to construction order."""
    rows, kv, ql = [], [], []
    next_id = 1 + max((p for lf in leaves for p in lf[0]), default=-1)
    for prefix, n_unique, fill, q in leaves:
        pages = list(prefix) + list(range(next_id, next_id + n_unique))
        next_id += n_unique
        rows.append(pages)
        kv.append((len(pages) - 1) * page_size + fill)
        ql.append(1 if q is None else min(q, kv[-1]))
    remap = rng.permutation(next_id)
    perm = rng.permutation(len(rows))
    width = max(len(r) for r in rows) + 1
    bt = np.full((len(rows), width), -1, np.int32)
    for i, j in enumerate(perm):
        bt[i, : len(rows[j])] = remap[rows[j]]
    return bt, np.array(kv)[perm], np.array(ql)[perm]


@st.composite
def tree_batches(draw):
    """Random forest of shared page runs: each node appends a run of fresh pages to its parent's
    prefix, has child nodes and/or requests (leaves) hanging off it."""
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    counter = [0]
    leaves = []

    def fresh(n):
        counter[0] += n
        return list(range(counter[0] - n, counter[0]))

    def node(prefix, depth):
        prefix = prefix + fresh(draw(st.integers(0 if depth else 1, 4)))
        for _ in range(draw(st.integers(0, 3))):
            q = draw(st.one_of(st.none(), st.integers(1, 40)))  # None = decode
            leaves.append((prefix, draw(st.integers(1, 3)), draw(st.integers(1, page_size)), q))
        if depth < 2:
            for _ in range(draw(st.integers(0, 3))):
                node(prefix, depth + 1)

    for _ in range(draw(st.integers(1, 5))):
        node([], 0)
    if not leaves:
        leaves.append(([], 1, 1, None))
    seed = draw(st.integers(0, 2**32 - 1))
    bt, kv, ql = build(leaves, page_size, np.random.default_rng(seed))
    return bt, kv, ql, page_size


# ----------------------------------------------------------------------------------------------
# Invariants

def shareable_lcp(bt, kv, ql, ps):
    """[B, B] pages two requests may share: common block-table prefix, clamped to each request's
    (kv - q) // ps full pages before its query tokens."""
    sh = np.minimum((kv - ql) // ps, -(-kv // ps))
    W = max(int(sh.max()), 1)
    c = np.where(np.arange(W) < sh[:, None], bt[:, :W], -1 - np.arange(len(kv))[:, None])
    eq = c[:, None, :] == c[None, :, :]
    return np.where(eq.all(-1), W, eq.argmin(-1))


def check_plan(plan, bt, kv, ql, ps, max_levels, min_shared=1, min_group=2, maximal=True):
    B = len(kv)
    n_pages = -(-kv // ps)
    order = plan.order.numpy()
    assert plan.order.dtype == torch.int64 and sorted(order.tolist()) == list(range(B))
    assert 1 <= len(plan.levels) <= max_levels
    assert plan.num_rows == ql.sum() and plan.regular_kv_pages == n_pages.sum()
    assert plan.groups_per_level == [lv.qo_indptr.numel() - 1 for lv in plan.levels]
    assert plan.cascade_kv_pages == sum(int(lv.kv_indptr[-1]) for lv in plan.levels)
    assert plan.cascade_kv_pages <= plan.regular_kv_pages
    cum = np.concatenate([[0], np.cumsum(ql[order])])
    # row_order: the rows of order[0], then order[1], ...
    starts = np.concatenate([[0], np.cumsum(ql)])
    expect_rows = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in order])
    assert np.array_equal(plan.row_order.numpy(), expect_rows)

    got_pages = [[] for _ in range(B)]
    gids, shared_upto = [], []          # per shared level: group of each position, pages shared so far
    done = np.zeros(B, np.int64)
    for li, lv in enumerate(plan.levels):
        last = li == len(plan.levels) - 1
        assert lv.causal == last
        for t in (lv.qo_indptr, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len):
            assert t.dtype == torch.int32 and t.device.type == "cpu"
        qo, kvp = lv.qo_indptr.numpy(), lv.kv_indptr.numpy()
        idx, lpl = lv.kv_indices.numpy(), lv.kv_last_page_len.numpy()
        G = len(qo) - 1
        # groups: contiguous, non-empty row ranges, boundaries at request boundaries, covering all rows
        assert qo[0] == 0 and qo[-1] == cum[-1] and (np.diff(qo) > 0).all()
        assert np.isin(qo, cum).all()
        assert kvp[0] == 0 and (np.diff(kvp) >= 0).all() and kvp[-1] == len(idx) and len(lpl) == G
        gid = np.searchsorted(qo, cum[:-1], "right") - 1
        sizes = np.bincount(gid, minlength=G)
        for pos in range(B):
            r, g = order[pos], gid[pos]
            pages = idx[kvp[g]: kvp[g + 1]].tolist()
            got_pages[r] += pages
            if last:
                assert lpl[g] == (kv[r] - (n_pages[r] - 1) * ps if pages else 0)
            else:  # only full pages entirely before r's query tokens
                assert (done[pos] + len(pages)) * ps <= kv[r] - ql[r]
                assert lpl[g] == (ps if pages else 0)
                if pages:
                    assert sizes[g] >= min_group
            done[pos] += len(pages)
        if last:
            assert G == B
        else:
            gids.append(gid)
            shared_upto.append(done.copy())
    # every request's pages exactly once, in order, equal to its block table
    for r in range(B):
        assert got_pages[r] == bt[r, : n_pages[r]].tolist()

    if not maximal:
        return
    # Groups share everything their members have in common, and no sharing is missed.
    lcp = shareable_lcp(bt, kv, ql, ps)[np.ix_(order, order)]
    nshared = len(gids)
    for li in range(nshared):
        gid, upto = gids[li], shared_upto[li]
        prev = upto - (plan.levels[li].kv_indptr.numpy()[gid + 1] - plan.levels[li].kv_indptr.numpy()[gid])
        active = upto > prev
        for g in np.unique(gid[active]):
            mem = np.flatnonzero(gid == g)
            assert (upto[mem] == lcp[np.ix_(mem, mem)].min()).all()
    if min_group == 2:
        # pairs that could share more than their current group gets a deeper group (if levels allow)
        prev_gid, prev_upto = np.zeros(B, np.int64), np.zeros(B, np.int64)
        prev_active = np.ones(B, bool)
        for li in range(max_levels - 1):
            same = prev_active[:, None] & prev_active[None, :] & (prev_gid[:, None] == prev_gid[None, :])
            want = same & (lcp >= prev_upto[:, None] + min_shared) & ~np.eye(B, dtype=bool)
            if li >= nshared:
                assert not want.any(), "a shared level was missed"
                break
            gid, upto = gids[li], shared_upto[li]
            a, b = np.nonzero(want)
            assert (gid[a] == gid[b]).all() and (upto[a] > prev_upto[a]).all()
            prev_active = upto > prev_upto
            prev_gid, prev_upto = gid, upto


# ----------------------------------------------------------------------------------------------
# Property tests

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree_batches(), st.integers(1, 4), st.integers(1, 2), st.integers(2, 3))
def test_plan_invariants(batch, max_levels, min_shared, min_group):
    bt, kv, ql, ps = batch
    plan = plan_cascade(bt, kv, ql, ps, max_levels=max_levels, min_shared_pages=min_shared,
                        min_group_size=min_group)
    check_plan(plan, bt, kv, ql, ps, max_levels, min_shared, min_group)


@settings(max_examples=30, deadline=None)
@given(tree_batches())
def test_torch_block_table_same_plan(batch):
    bt, kv, ql, ps = batch
    a = plan_cascade(bt, kv, ql, ps)
    b = plan_cascade(torch.from_numpy(bt), torch.from_numpy(kv), torch.from_numpy(ql), ps)
    assert torch.equal(a.order, b.order) and len(a.levels) == len(b.levels)
    for x, y in zip(a.levels, b.levels):
        assert torch.equal(x.kv_indices, y.kv_indices) and torch.equal(x.qo_indptr, y.qo_indptr)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.sampled_from([1, 4, 16]), st.integers(0, 2**32 - 1))
def test_no_sharing_is_one_level(B, ps, seed):
    rng = np.random.default_rng(seed)
    leaves = [([], int(rng.integers(1, 6)), int(rng.integers(1, ps + 1)), None) for _ in range(B)]
    bt, kv, ql = build(leaves, ps, rng)
    plan = plan_cascade(bt, kv, ql, ps)
    assert len(plan.levels) == 1 and plan.levels[0].causal
    assert torch.equal(plan.order, torch.arange(B))  # nothing to reorder
    assert plan.cascade_kv_pages == plan.regular_kv_pages
    check_plan(plan, bt, kv, ql, ps, 3)


# ----------------------------------------------------------------------------------------------
# Explicit cases

def groups_batch(n_groups, per_group, prompt_pages, unique_pages, ps, rng):
    leaves = []
    for g in range(n_groups):
        prefix = list(range(g * prompt_pages, (g + 1) * prompt_pages))
        leaves += [(prefix, unique_pages, int(rng.integers(1, ps + 1)), None) for _ in range(per_group)]
    return build(leaves, ps, rng)


def bench(fn, n=50):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def test_64_groups_of_16():
    rng = np.random.default_rng(0)
    ps = 16
    bt, kv, ql = groups_batch(64, 16, 150, 10, ps, rng)      # 1024 requests x 160 pages
    plan = plan_cascade(bt, kv, ql, ps)
    assert plan.groups_per_level == [64, 1024]
    shared = plan.levels[0]
    assert (torch.diff(shared.kv_indptr) == 150).all() and (torch.diff(shared.qo_indptr) == 16).all()
    assert plan.cascade_kv_pages == 64 * 150 + 1024 * 10
    check_plan(plan, bt, kv, ql, ps, 3, maximal=False)
    ms = bench(lambda: plan_cascade(bt, kv, ql, ps))
    print(f"\nplan_cascade 1024 req x 160 pages, 64 groups of 16: {ms:.3f} ms (median)")


def test_no_sharing_timing():
    rng = np.random.default_rng(1)
    ps = 16
    bt, kv, ql = build([([], 64, int(rng.integers(1, ps + 1)), None) for _ in range(256)], ps, rng)
    plan = plan_cascade(bt, kv, ql, ps)
    assert len(plan.levels) == 1
    ms = bench(lambda: plan_cascade(bt, kv, ql, ps))
    print(f"\nplan_cascade 256 req x 64 pages, no sharing: {ms:.3f} ms (median)")


def system_fewshot_batch(ps, rng):
    system = list(range(8))
    shots = [system + list(range(100 + 10 * i, 104 + 10 * i)) for i in range(3)]
    leaves = [(shots[i % 3], 2, 3, None) for i in range(12)]     # 3 few-shot sets x 4 requests
    leaves += [([], 5, 1, None), ([], 9, 2, 7)]                   # unrelated requests
    return build(leaves, ps, rng)


def test_system_fewshot_suffix_three_levels():
    ps = 4
    bt, kv, ql = system_fewshot_batch(ps, np.random.default_rng(2))
    plan = plan_cascade(bt, kv, ql, ps)
    assert len(plan.levels) == 3
    assert plan.groups_per_level == [3, 5, 14]   # level 0: system + 2 loners; level 1: 3 shots + 2 loners
    l0, l1 = plan.levels[0], plan.levels[1]
    assert sorted(torch.diff(l0.kv_indptr).tolist()) == [0, 0, 8]
    assert sorted(torch.diff(l1.kv_indptr).tolist()) == [0, 0, 4, 4, 4]
    check_plan(plan, bt, kv, ql, ps, 3)
    # two levels allowed: the few-shot pages go to the per-request level
    plan2 = plan_cascade(bt, kv, ql, ps, max_levels=2)
    assert plan2.groups_per_level == [3, 14]
    check_plan(plan2, bt, kv, ql, ps, 2)
    assert plan_cascade(bt, kv, ql, ps, max_levels=1).groups_per_level == [14]


def test_fixed_shared_prefix_len():
    ps = 4
    bt, kv, ql = system_fewshot_batch(ps, np.random.default_rng(3))
    plan = plan_cascade(bt, kv, ql, ps, fixed_shared_prefix_len=6 * ps + 3)   # floors to 6 pages
    assert len(plan.levels) == 2
    assert sorted(torch.diff(plan.levels[0].kv_indptr).tolist()) == [0, 0, 6]
    check_plan(plan, bt, kv, ql, ps, 2, maximal=False)
    # longer than the system prompt: only the requests holding identical pages there (one few-shot set each)
    plan = plan_cascade(bt, kv, ql, ps, fixed_shared_prefix_len=10 * ps)
    assert sorted(torch.diff(plan.levels[0].kv_indptr).tolist()) == [0, 0, 10, 10, 10]
    check_plan(plan, bt, kv, ql, ps, 2, maximal=False)
    assert len(plan_cascade(bt, kv, ql, ps, fixed_shared_prefix_len=ps - 1).levels) == 1


def test_query_tokens_never_shared():
    ps = 4
    # Two requests hold the same 4 pages; one is prefilling its last 9 tokens (the last 2+ pages):
    # only 1 page lies entirely before its query tokens.
    bt = np.array([[0, 1, 2, 3, 4], [0, 1, 2, 3, 5]], np.int32)
    kv = np.array([17, 17])
    plan = plan_cascade(bt, kv, np.array([1, 9]), ps)
    assert plan.groups_per_level == [1, 2] and int(plan.levels[0].kv_indptr[-1]) == 2
    check_plan(plan, bt, kv, np.array([1, 9]), ps, 3)
    # decode into a full page: the page holding the new token is not shared even if identical
    bt = np.array([[0, 1, 2], [0, 1, 2]], np.int32)
    plan = plan_cascade(bt, np.array([12, 12]), np.array([1, 1]), ps)
    assert int(plan.levels[0].kv_indptr[-1]) == 2


def test_tiny_batches():
    for B in (0, 1):
        bt = np.zeros((B, 3), np.int32)
        plan = plan_cascade(bt, np.full(B, 5), np.ones(B, np.int64), 4)
        assert len(plan.levels) == 1 and plan.levels[0].qo_indptr.tolist() == list(range(B + 1))
        assert plan.levels[0].kv_indices.tolist() == [0, 0][:B * 2]
