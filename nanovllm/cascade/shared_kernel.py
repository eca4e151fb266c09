"""A Triton kernel for the shared levels of cascade decode steps with many small groups (W2: 64
system prompts x 16 requests), where FlashInfer's prefill kernel reads each group's pages at ~2.6
TB/s (scripts/bench_kernels.py --only layout).

Work is split into items, one per (group, block of up to `block_rows` query rows), built on the host
at plan time. Program (item, kv head, split) loads the item's query rows for the q heads of that kv
head (all GQA heads at once: they meet the same keys), streams its split of the group's pages once
with an online softmax, and writes a partial (out, base-2 lse) for those rows to out[split],
lse[split]. The caller merges the splits into the running output with merge_state_in_place, like
any other level. A split with no pages writes out 0 and lse -inf, which a merge ignores.

Not bit-identical to FlashInfer (other tiling and summation order): held to bf16 tolerance against
float64 attention (tests/test_shared_kernel.py, CPU under TRITON_INTERPRET=1 and GPU) and against
FlashInferCascadeAttention's fa2 mode in tests/test_gpu.py.
"""
import os

import numpy as np
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tests


@triton.jit
def _shared_level_kernel(q_ptr, k_ptr, v_ptr, items_ptr, kv_indptr_ptr, kv_indices_ptr, out_ptr, lse_ptr,
                         sm_scale_log2, page_stride, token_stride, split_rows,
                         HQ: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                         BLOCK_R: tl.constexpr, M: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
                         DOT_F32: tl.constexpr):
    item = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    row0 = tl.load(items_ptr + item * 3)
    nrows = tl.load(items_ptr + item * 3 + 1)
    group = tl.load(items_ptr + item * 3 + 2)
    kv0 = tl.load(kv_indptr_ptr + group)
    tokens = (tl.load(kv_indptr_ptr + group + 1) - kv0) * PAGE  # shared levels hold whole pages only
    chunk = tl.cdiv(tl.cdiv(tokens, SPLITS), BLOCK_T) * BLOCK_T
    t0 = split * chunk
    t1 = tl.minimum(t0 + chunk, tokens)
    t1 = tl.where(nrows > 0, t1, t0)  # padded items (CUDA-graph batches) read nothing

    offs_m = tl.arange(0, M)             # query rows of this program: (request, GQA head) pairs
    r = offs_m // GQA
    row_ok = r < nrows                   # items hold at most BLOCK_R rows, so r < BLOCK_R too
    row = (row0 + r).to(tl.int64)
    head = h * GQA + offs_m % GQA
    offs_d = tl.arange(0, D)
    qo_off = (row * HQ + head)[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + qo_off, mask=row_ok[:, None], other=0.0)
    if DOT_F32:  # exact: bf16 values in float32 (Triton's interpreter multiplies bf16 dots wrongly)
        q = q.to(tl.float32)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    for t in range(t0, t1, BLOCK_T):
        tok = t + offs_t
        ok = tok < t1
        page = tl.load(kv_indices_ptr + kv0 + tok // PAGE, mask=ok, other=0).to(tl.int64)
        kv_off = (page * page_stride + (tok % PAGE) * token_stride + h * D)[:, None] + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=ok[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off, mask=ok[:, None], other=0.0)
        p = p.to(v_ptr.dtype.element_ty)  # rounded like the GPU's dot inputs
        if DOT_F32:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    split_off = split.to(tl.int64) * split_rows
    tl.store(out_ptr + split_off * HQ * D + qo_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + split_off * HQ + row * HQ + head, lse, mask=row_ok)


def shared_level_items(qo_indptr: np.ndarray, kv_indptr: np.ndarray, block_rows: int) -> np.ndarray:
    """Work items [n, 3] int32 (first row, rows, group): every group with rows cut into blocks of at
    most block_rows rows. Groups without pages get items too (they write out 0, lse -inf), so that
    every row's partial is written and the merge needs no cleared buffers."""
    rows = np.diff(qo_indptr)
    groups = np.flatnonzero(rows > 0)
    blocks = (rows[groups] + block_rows - 1) // block_rows
    group = np.repeat(groups, blocks)
    first_block = np.repeat(np.cumsum(blocks) - blocks, blocks)
    start = qo_indptr[group] + (np.arange(len(group)) - first_block) * block_rows
    count = np.minimum(block_rows, qo_indptr[group + 1] - start)
    return np.stack([start, count, group], axis=1).astype(np.int32)


def max_items(max_rows: int, block_rows: int) -> int:
    """Most items a level of max_rows rows can have: one per full block, plus a partial block for
    each group (at most max_rows groups)."""
    return max_rows // block_rows + max_rows


def shared_level_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, items: torch.Tensor,
                           kv_indptr: torch.Tensor, kv_indices: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           sm_scale: float, block_rows: int = 16, block_tokens: int = 64, num_warps: int = 4,
                           num_stages: int = 2):
    """q [rows, hq, d]; caches [pages, page_size, hkv, d] (NHD); items from shared_level_items (on q's
    device; padded items have 0 rows); out [splits, >= rows, hq, d] and lse [splits, >= rows, hq]
    float32 receive each split's partial attention (base-2 lse, as FlashInfer's)."""
    hq, d = q.shape[1], q.shape[2]
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    assert hq % hkv == 0 and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert q.is_contiguous() and out.is_contiguous() and lse.is_contiguous()
    assert block_rows * (hq // hkv) <= 128, "query rows x GQA heads of an item must fit one tile"
    splits = out.shape[0]
    if items.shape[0] == 0:
        return
    gqa = hq // hkv
    _shared_level_kernel[(items.shape[0], hkv, splits)](
        q, k_cache, v_cache, items, kv_indptr, kv_indices, out, lse, sm_scale * LOG2E,
        k_cache.stride(0), k_cache.stride(1), out.shape[1],
        HQ=hq, GQA=gqa, D=d, PAGE=page, BLOCK_R=block_rows, M=max(16, triton.next_power_of_2(block_rows * gqa)),
        BLOCK_T=block_tokens, SPLITS=splits, DOT_F32=INTERPRETED, num_warps=num_warps, num_stages=num_stages)
