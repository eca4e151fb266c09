"""The host side of fa3-split shared levels (nanovllm/cascade/split_level.py): the piece layout, the
merge of page-less groups, the graph-mode padding and the split count, checked on the CPU against
float64 attention (each piece attended alone, its partial put where the layout says, partials merged
through their LSE); and the Triton row-copy kernel, interpreted. FlashInfer's run of the pieces is
tests/test_gpu.py's (fa3-split cases)."""
import numpy as np
import torch

from nanovllm.cascade.split_level import (choose_fa3_splits, merge_empty_groups, pad_pieces, split_level_layout)
import pytest

from triton_script import run_interpreted, run_on_gpu

PAGE, HQ, HKV, D = 4, 4, 2, 8


def attend(q, k, v):
    """float64 attention of rows q [n, HQ, D] over k, v [t, HKV, D]: (out, base-2 lse); no keys: 0, -inf."""
    if len(k) == 0:
        return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    k, v = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
    s = torch.einsum("nhd,thd->nht", q, k) * D ** -0.5
    return torch.einsum("nht,thd->nhd", s.softmax(-1), v), torch.logsumexp(s, -1) / np.log(2)


def level_attention(q, kc, vc, qo, kv, idx):
    """Each group's rows over its pages (whole pages)."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    for g in range(len(qo) - 1):
        pages = idx[kv[g]:kv[g + 1]]
        k, v = (c[pages].reshape(-1, HKV, D) for c in (kc, vc))
        out[qo[g]:qo[g + 1]], lse[qo[g]:qo[g + 1]] = attend(q[qo[g]:qo[g + 1]], k, v)
    return out, lse


def test_merge_empty_groups():
    qo = np.array([0, 3, 4, 5, 6, 9, 9, 9])       # 3 rows / 2 pages, three singletons without pages, 3 / 3, two padded
    kv = np.array([0, 2, 2, 2, 2, 5, 5, 5])
    q2, kv2 = merge_empty_groups(qo, kv)
    assert q2.tolist() == [0, 3, 6, 9] and kv2.tolist() == [0, 2, 2, 5]


def test_choose_fa3_splits():
    one = lambda rows, pages: (np.array([0, rows]), np.array([0, pages]))  # noqa: E731
    assert choose_fa3_splits(*one(128, 2048), 16, 16, 8) == 8      # 16 CTAs -> 128
    assert choose_fa3_splits(*one(256, 512), 16, 16, 8) == 4       # 32 CTAs
    assert choose_fa3_splits(np.arange(0, 385, 96), np.arange(0, 4097, 1024), 16, 16, 8) == 2   # 4 x 96: 64 CTAs
    assert choose_fa3_splits(*one(128, 2048), 16, 16, 3) == 3      # capped by the partial buffer
    assert choose_fa3_splits(*one(128, 0), 16, 16, 8) == 1         # nothing to read
    assert choose_fa3_splits(*one(128, 32), 16, 16, 8) == 2        # 512 tokens: >= 256 a piece


def test_graph_copies_keep_fa3_within_its_schedule():
    """Graph-mode copies: the partial buffer, FA3's 4,096 work tiles a head and its int workspace."""
    from nanovllm.cascade.split_level import FlashInferSplitLevel, graph_copies
    assert graph_copies(128, 128 + 4096, 16) == 8
    assert graph_copies(1024, 1024 + 4096, 16) == 3            # 3 x 1024 + 1 pieces < 4,000
    for rows in (1, 64, 448, 512, 1024):
        for heads in (16, 64):
            c = graph_copies(rows, rows + 4096, heads)
            pieces = FlashInferSplitLevel.pieces_for(rows, c)
            assert c >= 1 and pieces <= 4000 and 24 * (pieces + 32) * heads <= 8 << 20, (rows, heads)


def test_pieces_attended_alone_and_merged_equal_the_level():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    kc, vc = (torch.randn(64, PAGE, HKV, D, dtype=torch.float64) for _ in range(2))
    # groups: 5 rows over 7 pages, a page-less singleton, 3 rows over 2 pages, 2 rows over 1 page
    qo = np.array([0, 5, 6, 9, 11])
    kv = np.array([0, 7, 7, 9, 10])
    idx = rng.permutation(64)[:10].astype(np.int32)
    q = torch.randn(11, HQ, D, dtype=torch.float64)
    want, want_lse = level_attention(q, kc, vc, qo, kv, idx)
    for splits in (1, 2, 3, 8):
        mq, mkv = merge_empty_groups(qo, kv)
        qo_s, kv_s, idx_s, last_s = split_level_layout(mq, mkv, idx, splits, PAGE)
        assert sorted(idx_s.tolist()) == sorted(idx.tolist())          # every page once
        assert (last_s == np.where(np.diff(kv_s) > 0, PAGE, 0)).all()
        parts, parts_lse = level_attention(q.repeat(splits, 1, 1), kc, vc, qo_s, kv_s, idx_s)
        # merge the copies' partials through their LSE, as merge_partials does
        lse = torch.logsumexp(parts_lse.view(splits, 11, HQ) * np.log(2), 0) / np.log(2)
        weight = torch.exp2(parts_lse.view(splits, 11, HQ) - torch.where(lse.isinf(), 0, lse))
        out = (parts.view(splits, 11, HQ, D) * torch.nan_to_num(weight)[..., None]).sum(0)
        assert torch.allclose(out, want, atol=1e-12), splits
        assert torch.equal(lse.isinf(), want_lse.isinf()) and torch.allclose(lse[~lse.isinf()], want_lse[~lse.isinf()])


def test_graph_padding():
    qo, kv, idx, last = split_level_layout(np.array([0, 3, 9]), np.array([0, 2, 5]), np.arange(5), 2, PAGE)
    qo_p, kv_p, last_p = pad_pieces(qo, kv, last, used_rows=18, total_rows=36, pieces=10)
    assert len(qo_p) == 11 and len(kv_p) == 11 and len(last_p) == 10
    assert qo_p[:5].tolist() == qo[:5].tolist() and qo_p[4] == 18 and (qo_p[5:] == 36).all()
    assert (np.diff(kv_p)[4:] == 0).all() and (last_p[4:] == 0).all()   # the unused copies' rows: no pages


SCRIPT = r"""
import torch
from nanovllm.cascade.split_level import copy_rows
q = torch.randn(5, 4, 8, device="{device}")
dst = torch.full((4 * 5, 4, 8), 7.0, device="{device}")
meta = torch.tensor([0, 3], dtype=torch.int32, device="{device}")
copy_rows(q, dst, meta, 4)            # 4 copies in the buffer, 3 used this step
for s in range(3):
    assert torch.equal(dst[s * 5:(s + 1) * 5], q)
assert (dst[15:] == 7.0).all()        # the unused copy is not written
print("ok")
"""


def test_copy_rows_interpreted_on_cpu():
    run_interpreted(SCRIPT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copy_rows_on_gpu():
    run_on_gpu(SCRIPT)


class _StubPrefill:
    """FlashInfer's BatchPrefillWithPagedKVCacheWrapper as far as FlashInferSplitLevel uses it: records
    plan()'s arrays and checks graph mode's fixed batch size."""
    def __init__(self, workspace, layout, use_cuda_graph=False, qo_indptr_buf=None, paged_kv_indptr_buf=None,
                 paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None, backend="auto"):
        self.fixed = len(qo_indptr_buf) - 1 if use_cuda_graph else None
        assert not use_cuda_graph or len(paged_kv_indptr_buf) == self.fixed + 1 == len(paged_kv_last_page_len_buf) + 1

    def plan(self, qo, kv, idx, last, hq, hkv, d, page, causal=False, **kwargs):
        assert self.fixed is None or len(qo) - 1 == self.fixed, "graph mode: batch size must stay fixed"
        self.arrays = [np.asarray(a.cpu()) for a in (qo, kv, idx, last)]


def test_plan_of_padded_graph_levels_reads_each_page_once_per_row(monkeypatch):
    """FlashInferSplitLevel.plan on real planner levels, padded as FlashInferCascadeAttention pads them
    in graph mode (padding rows: one page-less group; then row-less groups): the recorded pieces, attended
    in float64 and merged over the copies, equal the level's attention for the real rows."""
    import sys
    import types

    from nanovllm.cascade.planner import plan_cascade
    from nanovllm.cascade.split_level import FlashInferSplitLevel
    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(BatchPrefillWithPagedKVCacheWrapper=_StubPrefill))
    monkeypatch.setattr("nanovllm.cascade.split_level.MIN_SPLIT_TOKENS", PAGE)   # cut short prefixes too
    torch.manual_seed(0)
    kc, vc = (torch.randn(400, PAGE, HKV, D, dtype=torch.float64) for _ in range(2))
    # 3 groups (40 rows over 6 pages, 25 over 3, 7 over 5) and 3 requests sharing nothing; 1 own page each
    sizes, shared_pages = [40, 25, 7], [6, 3, 5]
    table, nxt = [], 0
    for n, p in zip(sizes, shared_pages):
        prefix = list(range(nxt, nxt + p)); nxt += p
        for _ in range(n):
            table.append(prefix + [nxt]); nxt += 1
    for _ in range(3):
        table.append([nxt, nxt + 1]); nxt += 2
    width = max(map(len, table))
    table = np.array([t + [-1] * (width - len(t)) for t in table])
    kv_lens = np.array([(len([x for x in t if x >= 0]) - 1) * PAGE + 1 for t in table])
    plan = plan_cascade(table, kv_lens, np.ones(len(table), np.int32), PAGE, max_levels=2)
    level = plan.levels[0]
    rows, bs = plan.num_rows, 96
    qo, kv = level.qo_indptr.numpy(), level.kv_indptr.numpy()
    # graph-mode padding (flashinfer_cascade._pad_shared): padded rows one group without pages, then
    # groups without rows, up to bs groups
    extra = bs - (len(qo) - 1)
    qo_p = np.concatenate([qo, np.full(extra, bs)]).astype(np.int32)
    kv_p = np.concatenate([kv, np.full(extra, kv[-1])]).astype(np.int32)
    last_p = np.concatenate([level.kv_last_page_len.numpy(), np.zeros(extra, np.int32)]).astype(np.int32)
    partials = (torch.empty(bs + 4096, HQ, D), torch.empty(bs + 4096, HQ))
    for graph in (False, True):
        buffers = None
        if graph:
            pieces = FlashInferSplitLevel.pieces_for(bs, 8)
            buffers = (torch.empty(8 * bs, HQ, D),) + tuple(torch.zeros(n, dtype=torch.int32)
                                                             for n in (pieces + 1, pieces + 1, 4096, pieces))
        split = FlashInferSplitLevel(torch.zeros(8), bs if graph else rows, partials, graph, buffers)
        args = (qo_p, kv_p, level.kv_indices.numpy(), last_p) if graph else \
            (qo, kv, level.kv_indices.numpy(), level.kv_last_page_len.numpy())
        split.plan(*(torch.from_numpy(np.ascontiguousarray(a)) for a in args), HQ, HKV, D, PAGE)
        assert split.splits > 1
        q_rows = bs if graph else rows
        q = torch.randn(q_rows, HQ, D, dtype=torch.float64)
        qo_s, kv_s, idx_s, last_s = split.wrapper.arrays
        copies = split.copies if graph else split.splits
        assert qo_s[-1] == copies * q_rows and kv_s[-1] == len(idx_s)
        assert (np.diff(qo_s) >= 0).all() and (np.diff(kv_s) >= 0).all()
        parts, parts_lse = level_attention(q.repeat(copies, 1, 1), kc, vc, qo_s, kv_s, idx_s)
        s = split.splits   # merge the step's copies (merge_partials reads their count from meta)
        assert int(split.meta[1]) == s
        lse = torch.logsumexp(parts_lse[:s * q_rows].view(s, q_rows, HQ) * np.log(2), 0) / np.log(2)
        weight = torch.nan_to_num(torch.exp2(parts_lse[:s * q_rows].view(s, q_rows, HQ) - torch.where(lse.isinf(), 0, lse)))
        out = (parts[:s * q_rows].view(s, q_rows, HQ, D) * weight[..., None]).sum(0)
        want, _ = level_attention(q[:rows], kc, vc, qo, kv, level.kv_indices.numpy())
        assert torch.allclose(out[:rows], want, atol=1e-12), graph
