"""A shared cascade level of a prefill step, read in place as ragged KV where its pages lie in order.

Prefill steps over a cached prefix (W2, W3, W5: hundreds to thousands of question tokens a group over
its 2k-16k prefix tokens) spend their attention in the shared level, a non-causal prefill that is
compute-bound. FlashInfer's FA3 kernel runs it faster over a ragged KV tensor (whole tiles loaded by
TMA) than over pages of 16 tokens (gathered loads). One layer on one H200, Qwen3-0.6B heads, bf16
(`python scripts/bench_shared_prefill.py`, session 18; ms, paged fa3 -> ragged fa3):

| groups x question tokens over prefix | paged fa3 | ragged fa3 | paged fa2 |
|---|---|---|---|
| 1 x 16,384 over 8,192 (W3's steps) | 1.969 (558 TFLOP/s) | 1.615 (681) | 3.193 |
| 64 x 256 over 2,048 (W2-like) | 0.663 | 0.570 | 0.938 |
| 4 x 2,048 over 16,384 (W5's step) | 1.979 | 1.630 | 3.447 |
| 16 x 1,024 over 4,096 | 1.135 | 0.932 | 1.773 |

A group's pages usually lie in order in the cache (a prefix is allocated in one piece from a free list
handed out in order), and the planner orders groups by their first page (planner.plan_cascade), so the
level's KV is a set of increasing token runs of the cache viewed as [pages x page_size, kv heads, dim];
the gaps between runs go to query-less requests. Where a group's pages are not one run, or the runs do
not increase, `level_layout` is None and the caller plans the paged kernel instead. Model-dtype caches only
(FlashInfer's FA3 reads fp8 KV only with fp8 queries).

Decode steps' shared levels run in CUDA graphs: where the cost model picks fa3 (groups of >= 64 rows), the
engine captures a ragged variant beside the paged one ("fa3-ragged", a fixed request count: the layout of
a level padded to the graph's rows, `pad_layout`) and replays it when the plan's shared levels are runs
(`level_layout`, cached on the level: a decode batch's shared levels serve many steps). One shared level
replayed from a graph of 8 layers (`python scripts/bench_shared_prefill.py --decode`, session 19, ms, paged
fa3 -> ragged fa3): W3's 1 x 1,024 rows over 8,192 tokens 0.1188 -> 0.0970 (578 -> 708 TFLOP/s); 8 x 128
over 4,096 0.0720 -> 0.0590; 2 x 512 over 16,384 0.2426 -> 0.2015; 16 x 64 over 2,048 0.0725 -> 0.0607.
"""
import numpy as np
import torch


def ragged_layout(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, page_size: int):
    """(qo_indptr, kv_indptr) int32 of a ragged prefill over a shared level's pages as token runs of the flat
    cache: each group's request is preceded by a query-less one over the gap before its run (a group with no
    pages reads nothing). None when a group's pages are not consecutive ids, a group's last page is not full,
    or the runs do not increase."""
    qo, ptr = np.asarray(qo_indptr, np.int64), np.asarray(kv_indptr, np.int64)
    ind = np.asarray(kv_indices, np.int64)[:ptr[-1]]
    pages = np.diff(ptr)
    full = pages > 0
    if (np.asarray(kv_last_page_len)[full] != page_size).any():
        return None
    if len(ind) > 1:
        step = np.diff(ind)
        inner = np.ones(len(step), bool)
        inner[ptr[1:-1][(ptr[1:-1] > 0) & (ptr[1:-1] < len(ind))] - 1] = False   # steps from one group to the next
        if (step[inner] != 1).any():
            return None
    first = ind[np.minimum(ptr[:-1], max(len(ind) - 1, 0))] if len(ind) else np.zeros(len(pages), np.int64)
    ends = np.where(full, (first + pages) * page_size, 0)
    ends = np.maximum.accumulate(ends)   # a group without pages: at the end of the run before it
    starts = np.where(full, first * page_size, ends)
    kv = np.concatenate([[0], np.stack([starts, ends], 1).ravel()])
    if (np.diff(kv) < 0).any() or kv[-1] >= 2 ** 31:
        return None
    q = np.concatenate([[0], np.stack([qo[:-1], qo[1:]], 1).ravel()])
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(kv.astype(np.int32))


def level_layout(level, page_size: int):
    """ragged_layout of a plan's CascadeLevel, computed once and kept on the level (None: not runs)."""
    cache = level.__dict__.setdefault("_ragged_layout", {})
    if page_size not in cache:
        cache[page_size] = ragged_layout(level.qo_indptr, level.kv_indptr, level.kv_indices, level.kv_last_page_len,
                                         page_size)
    return cache[page_size]


def shared_levels_are_runs(plan, page_size: int) -> bool:
    """Whether every shared level of a cascade plan has a ragged layout (the "fa3-ragged" graphs' condition)."""
    return all(level_layout(level, page_size) is not None for level in plan.levels[:-1])


def pad_layout(layout, max_rows: int):
    """A level's ragged layout padded to 2 x max_rows requests (a CUDA graph's fixed count, two a group as in
    the paged level padded to max_rows groups): the query rows past the level's go to one request that
    reads nothing, the other added requests are empty."""
    q, kv = layout
    extra = 2 * max_rows - (q.numel() - 1)
    assert extra >= 0 and int(q[-1]) <= max_rows
    if not extra:
        return q, kv   # the level's cached tensors themselves: FlashInfer's plan only reads them
    return (torch.cat([q, torch.full((extra,), max_rows, dtype=torch.int32)]),
            torch.cat([kv, kv[-1:].expand(extra)]))


class RaggedSharedLevel:
    """FlashInfer's FA3 ragged prefill over a shared level's page runs (module doc). plan_layout() takes the
    level's layout (level_layout; in CUDA graphs padded to the graph's count, pad_layout); run() reads the
    layer's cache in place. With `buffers` ((qo_indptr, kv_indptr) device buffers of 2 x max_rows + 1) it runs
    in CUDA graphs."""

    def __init__(self, workspace: torch.Tensor, buffers: tuple | None = None):
        import flashinfer   # GPU only; the layout above is CPU-tested
        graph = {} if buffers is None else dict(use_cuda_graph=True, qo_indptr_buf=buffers[0], kv_indptr_buf=buffers[1])
        self.wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="fa3", **graph)

    def plan_layout(self, layout, num_qo_heads, num_kv_heads, head_dim, **common):
        self.wrapper.plan(*layout, num_qo_heads, num_kv_heads, head_dim, causal=False, **common)

    def run(self, q, kv_cache, out=None, lse=None, return_lse=True):
        k, v = kv_cache
        return self.wrapper.run(q, k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:]), out=out, lse=lse,
                                return_lse=return_lse)
