"""A prefill's shared level read as ragged KV runs of the cache (nanovllm/cascade/ragged_level.py): the
layout on the CPU against float64 attention over the level's pages (each request of the ragged layout
attends its run of the flat cache), the cases that must fall back to the paged kernel, the planner's
numeric group order, the layout padded to a CUDA graph's fixed request count; on the GPU, FlashInfer's
ragged FA3 level against its paged FA3 level, eager (prefill) and replayed from CUDA graphs (decode)."""
import numpy as np
import pytest
import torch

from nanovllm.cascade.planner import plan_cascade
from nanovllm.cascade.ragged_level import level_layout, pad_layout, ragged_layout, shared_levels_are_runs
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


def test_padded_layout_attends_as_the_level_and_the_padded_rows_read_nothing():
    """A decode batch's shared level (two groups of 3 and 2 rows, a page-less request) padded to a graph of 8
    rows: 16 requests, the level's rows attend as before, rows 6-7 read nothing (out 0, lse -inf)."""
    table = np.array([[4, 5, 30], [4, 5, 31], [4, 5, 32], [9, 10, 33], [9, 10, 34], [35, 0, 0]], np.int32)
    plan = plan_cascade(table, np.array([2 * PAGE + 3] * 5 + [5]), np.ones(6), PAGE, max_levels=2)
    level = plan.levels[0]
    layout = level_layout(level, PAGE)
    assert level_layout(level, PAGE) is layout   # kept on the level: a batch's shared levels serve many steps
    q_ptr, kv_ptr = pad_layout(layout, 8)
    assert len(q_ptr) == len(kv_ptr) == 2 * 8 + 1 and q_ptr[-1] == 8
    torch.manual_seed(1)
    kc, vc = (torch.randn(40, PAGE, HKV, D, dtype=torch.float64) for _ in range(2))
    q = torch.randn(8, HQ, D, dtype=torch.float64)
    qo, kv, idx = level.qo_indptr.numpy(), level.kv_indptr.numpy(), level.kv_indices.numpy()
    want, want_lse = by_pages(q[:6], kc, vc, qo, kv, idx)
    got, got_lse = by_runs(q, kc, vc, q_ptr.numpy(), kv_ptr.numpy())
    assert torch.allclose(got[:6], want, atol=1e-12) and torch.equal(got_lse[:6].isinf(), want_lse.isinf())
    assert (got[6:] == 0).all() and got_lse[6:].isinf().all()


def test_a_level_of_pages_out_of_order_has_no_layout():
    table = np.array([[5, 4, 30], [5, 4, 31]], np.int32)
    plan = plan_cascade(table, np.array([2 * PAGE + 3] * 2), np.ones(2), PAGE, max_levels=2)
    assert level_layout(plan.levels[0], PAGE) is None


def test_a_pickled_level_leaves_its_caches_behind_and_recomputes_them():
    """A step shipped to tensor-parallel workers pickles its plan: the levels' cached layouts and row/page
    counts stay on rank 0 (the same bytes as before they were computed); the worker's copy computes its own,
    equal to rank 0's."""
    import pickle
    table = np.array([list(range(40, 72)) + [200 + 2 * i, 201 + 2 * i] for i in range(96)], np.int32)
    plan = plan_cascade(table, np.full(96, 33 * PAGE + 1), np.ones(96), PAGE, max_levels=2)
    fresh = pickle.dumps(plan)
    for level in plan.levels:
        level.rows_and_pages()
        level_layout(level, PAGE)
    assert "_ragged_layout" in plan.levels[0].__dict__ and pickle.dumps(plan) == fresh
    shipped = pickle.loads(fresh)
    assert "_ragged_layout" not in shipped.levels[0].__dict__
    for a, b in zip(level_layout(shipped.levels[0], PAGE), level_layout(plan.levels[0], PAGE)):
        assert torch.equal(a, b)
    assert all((a == b).all() for a, b in zip(shipped.levels[1].rows_and_pages(), plan.levels[1].rows_and_pages()))


class _GraphBackend:
    """What DecodeGraphs reads of an attention backend outside capture and replay."""
    page_size = PAGE
    key = ("cascade", 2, "fa3-ragged")

    def graph_wrappers(self, bs):
        pass

    def graph_key(self, plan):
        return self.key


def test_a_step_without_its_ragged_graph_replays_the_paged_fa3_one():
    """Capture skips the ragged variant where its dummy batch's pages are not runs (4 levels over a small
    cache); a step whose key names it then takes the paged fa3 graph of its size, not an eager step."""
    from types import SimpleNamespace

    from nanovllm.engine.cuda_graphs import DecodeGraphs
    graphs = DecodeGraphs(None, _GraphBackend(), 64, 8, torch.float32, torch.device("cpu"))
    assert shared_levels_are_runs(graphs._dummy_batch(64, 3, 1000).cascade, PAGE)
    assert not shared_levels_are_runs(graphs._dummy_batch(64, 4, 31).cascade, PAGE)   # page ids wrap
    step = SimpleNamespace(q_lens=np.ones(40), is_prefill=False, cascade=object())
    graphs.graphs = {(48, "cascade", 2, "fa3"): None}
    assert graphs.key(step) == (48, "cascade", 2, "fa3")
    graphs.graphs[(48, "cascade", 2, "fa3-ragged")] = None
    assert graphs.key(step) == (48, "cascade", 2, "fa3-ragged")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU (FA3)")
def test_graphed_ragged_decode_level_equals_the_paged_one_gpu():
    """A cascade decode step (groups of 64-200 one-token rows over 30-250 shared pages, 3 and 2 levels) replayed
    from CUDA graphs captured for another step's layout (other groups, rows and pages: the graph contract): the
    "fa3-ragged" variant against paged "fa3", same output within bf16 rounding; a variant planned for pages that
    are not runs refuses."""
    from nanovllm.cascade.flashinfer_cascade import FlashInferCascadeAttention
    hq, hkv, d, page, dt = 16, 8, 128, 16, torch.bfloat16
    torch.manual_seed(0)
    ws, side_ws = (torch.zeros(n << 20, dtype=torch.uint8, device="cuda") for n in (256, 128))
    kc, vc = (torch.randn(3000, page, hkv, d, dtype=dt, device="cuda") for _ in range(2))
    max_rows, side = 512, torch.cuda.Stream()

    def step(levels, groups):
        """(plan, block table, kv lens) of groups of (rows, shared pages); a second shared level: each group's
        first half shares 2 more pages."""
        rows, table, kv_lens, own, first = 0, [], [], 1000, 0
        for per, pages in groups:
            for i in range(per):
                t = list(range(first, first + pages))
                if levels == 3:
                    t += [first + pages, first + pages + 1] if i < per // 2 else [own + 2, own + 3]
                table.append(t + [own, own + 1])
                kv_lens.append((len(t) + 1) * page + 5)
                own += 4
            first += pages + 2
            rows += per
        width = max(map(len, table))
        table = np.array([t + [0] * (width - len(t)) for t in table], np.int32)
        plan = plan_cascade(table, np.array(kv_lens), np.ones(rows), page, max_levels=levels)
        assert len(plan.levels) == levels
        return plan, table, kv_lens

    for levels in (2, 3):
        captured, _, _ = step(levels, ((100, 40), (150, 200)))
        plan, table, kv_lens = step(levels, ((200, 250), (64, 30), (100, 120)))
        q = torch.randn(max_rows, hq, d, dtype=dt, device="cuda")   # a graph's rows: the step's, then padding
        outs = []
        for shared in ("fa3", "fa3-ragged"):
            casc = FlashInferCascadeAttention(ws, levels, hq, hkv, d, page, dt, max_rows, backend="fa2",
                                              use_cuda_graph=True, max_pages=max_rows * 300,
                                              decode_last_level=True, shared_backend=shared, shared_split_kv=False,
                                              side_stream=side, shared_workspace=side_ws)
            casc.plan(captured)
            casc.run(q, (kc, vc))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = casc.run(q, (kc, vc))
            casc.plan(plan)
            graph.replay()
            outs.append(out[:plan.num_rows].float().clone())
        assert (outs[0] - outs[1]).abs().max().item() < 2e-2
        shuffled = table.copy()
        shuffled[:200, :250] = shuffled[:200, :250][:, ::-1].copy()
        bad = plan_cascade(shuffled, np.array(kv_lens), np.ones(plan.num_rows), page, max_levels=levels)
        with pytest.raises(ValueError, match="not runs"):
            casc.plan(bad)


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
