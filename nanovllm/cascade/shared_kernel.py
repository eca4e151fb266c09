"""A Triton kernel for the shared levels of cascade decode steps with many small groups (W2: 64
system prompts x 16 requests), where FlashInfer's prefill kernel reads each group's pages at ~2.6
TB/s (scripts/bench_kernels.py --only layout).

Work is split into items, one per (group, block of up to 16 query rows), built on the host at plan
time, and each item's pages into `splits` equal parts when there are too few items to fill the GPU
(a few requests sharing a long document). A work unit (item, split), for one kv head, loads the
item's query rows for the q heads of that kv head (all GQA heads at once: they meet the same keys),
streams the split's pages once with an online softmax, and writes a partial (out, base-2 lse) for
those rows to partial row `split * rows + row`. A unit with no pages writes out 0 and lse -inf.
A second kernel merges a row's partials into the running output and lse (the per-request level's),
like merge_state_in_place. Programs loop over the units, whose count is read on the device, so a
CUDA graph captures one fixed grid whatever the step's groups.

Two tile shapes (TILES), each its own CUDA graph (cost_model.shared_level_backend picks one per
step). Measured on the H200 (scripts/sweep_shared_kernel.py, one layer, CUDA graphs, 256 programs per
kv head, merge included; table in claude_docs/cascade.md):
- "triton" (16 rows an item, 128 tokens a tile, 4 warps, 3 stages): groups of <= 16 rows. 64 groups x
  16 rows x 2048 tokens 0.148 ms (3.6 TB/s; FlashInfer fa2 without split-kv 0.215); 32 x 4 x 8192
  4.1 TB/s; no other of 162 tile shapes was more than 1% faster on those.
- "triton-wide" (32 rows an item, 64 tokens a tile, 4 warps, 3 stages, twice the splits): groups of
  17-63 rows, where the narrow tile reads each group's pages once per 16 rows and runs too few
  programs: W5's 4 groups x 32 rows x 16,384 tokens 0.119 ms against 0.181 narrow (1.52x), 8 x 32 x
  4096 0.069 against 0.087, 2 x 48 x 8192 0.054-0.058 against 0.077.

An fp8 KV cache: pages are loaded as fp8 and converted to the query dtype for the dots (exact: fp8
values are bf16 values); k_scale folds into the softmax scale and v_scale multiplies the partial
output (tests/test_fp8_kv.py checks it against float64 attention on the dequantized pages).

Not bit-identical to FlashInfer (other tiling and summation order): held to bf16 tolerance against
float64 attention (tests/test_shared_kernel.py, CPU under TRITON_INTERPRET=1 and GPU) and against
regular paged attention in tests/test_gpu.py.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from nanovllm.utils.transfer import to_device

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tests
BLOCK_ROWS = 16             # the smallest item (max_items counts items of this many rows)
MAX_SPLITS = 32
MIN_SPLIT_TOKENS = 256      # a split reads at least this many tokens
UNIT_OVERHEAD_TOKENS = 290  # a work unit's fixed cost, in tokens' worth of streaming (fit below, choose_splits)
# Programs of either tile resident per SM, measured on the H200 (the sweep prints it): the narrow tile
# takes 200 registers a thread and 82,432 bytes of shared memory a program, the wide one 188 and 82,176;
# registers (65,536 an SM, 128 threads a program) and shared memory (227 KB) each allow two.
PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class SharedTile:
    """A launch shape of the shared-level kernel: query rows per work item, KV tokens per tile,
    warps, pipeline stages."""
    block_rows: int
    block_tokens: int
    num_warps: int
    num_stages: int


TILES = {"triton": SharedTile(16, 128, 4, 3), "triton-wide": SharedTile(32, 64, 4, 3)}


@triton.jit
def _shared_level_kernel(q_ptr, k_ptr, v_ptr, items_ptr, meta_ptr, kv_indptr_ptr, kv_indices_ptr, out_ptr,
                         lse_ptr, sm_scale_log2, v_scale, page_stride, token_stride, num_rows,
                         HQ: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                         M: tl.constexpr, BLOCK_T: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    h = tl.program_id(1)
    offs_m = tl.arange(0, M)             # query rows of an item: (request, GQA head) pairs
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BLOCK_T)
    r = offs_m // GQA
    head = h * GQA + offs_m % GQA
    splits = tl.load(meta_ptr + 1)
    units = tl.load(meta_ptr) * splits
    for unit in range(tl.program_id(0), units, tl.num_programs(0)):
        item = unit // splits
        split = unit % splits
        row0 = tl.load(items_ptr + item * 3)
        nrows = tl.load(items_ptr + item * 3 + 1)
        group = tl.load(items_ptr + item * 3 + 2)
        kv0 = tl.load(kv_indptr_ptr + group)
        tokens = (tl.load(kv_indptr_ptr + group + 1) - kv0) * PAGE  # shared levels hold whole pages only
        chunk = tl.cdiv(tl.cdiv(tokens, splits), BLOCK_T) * BLOCK_T
        t0 = split * chunk
        t1 = tl.minimum(t0 + chunk, tokens)
        row_ok = r < nrows               # items hold at most block_rows rows, so r < block_rows too
        row = (row0 + r).to(tl.int64)
        q = tl.load(q_ptr + (row * HQ + head)[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if DOT_F32:  # exact: bf16 values in float32 (Triton's interpreter multiplies bf16 dots wrongly)
            q = q.to(tl.float32)
        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D], tl.float32)
        for t in range(t0, t1, BLOCK_T):
            tok = t + offs_t
            ok = tok < t1
            page = tl.load(kv_indices_ptr + kv0 + tok // PAGE, mask=ok, other=0).to(tl.int64)
            kv_off = (page * page_stride + (tok % PAGE) * token_stride + h * D)[:, None] + offs_d[None, :]
            k = tl.load(k_ptr + kv_off, mask=ok[:, None], other=0.0).to(q_ptr.dtype.element_ty)  # fp8 pages: exact
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_off, mask=ok[:, None], other=0.0).to(q_ptr.dtype.element_ty)
            p = p.to(q_ptr.dtype.element_ty)  # rounded like the GPU's dot inputs
            if DOT_F32:
                p, v = p.to(tl.float32), v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None] * v_scale
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        part = (split * num_rows + row) * HQ + head
        tl.store(out_ptr + part[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_partials_kernel(out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, meta_ptr, num_rows,
                           HQ: tl.constexpr, HQ_P2: tl.constexpr, D: tl.constexpr):
    """Merge a row's partials (every split) into its running (out, lse), in float32, in place."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HQ_P2)
    offs_d = tl.arange(0, D)
    hmask = heads < HQ
    off = (row * HQ + heads)[:, None] * D + offs_d[None, :]
    o = tl.load(out_ptr + off, mask=hmask[:, None], other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row * HQ + heads, mask=hmask, other=float("-inf"))
    splits = tl.load(meta_ptr + 1)
    for s in range(0, splits):
        part = (s * num_rows + row) * HQ + heads
        p_lse = tl.load(part_lse_ptr + part, mask=hmask, other=float("-inf"))
        p_o = tl.load(part_out_ptr + part[:, None] * D + offs_d[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
        m = tl.maximum(lse, p_lse)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w_a = tl.exp2(lse - m_safe)
        w_b = tl.exp2(p_lse - m_safe)
        total = w_a + w_b
        o = (o * w_a[:, None] + p_o * w_b[:, None]) / tl.where(total > 0, total, 1.0)[:, None]
        lse = tl.where(total > 0, m_safe + tl.log2(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(out_ptr + off, o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    tl.store(lse_ptr + row * HQ + heads, lse, mask=hmask)


def shared_level_items(qo_indptr: np.ndarray, kv_indptr: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
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


def choose_splits(num_items: int, num_kv_heads: int, max_tokens: int, num_rows: int, partial_rows: int,
                  num_sms: int = 132, per_sm: int = PROGRAMS_PER_SM) -> int:
    """Splits per item. Each split of each item and kv head is a work unit, and per_sm x num_sms of them
    run at once (a wave). When the unsplit units already fill a wave, one split; otherwise the split
    count whose units fill whole waves best: a unit costs
    UNIT_OVERHEAD_TOKENS + its share of the tokens, a partly filled last wave costs a whole one.
    Each split reads >= MIN_SPLIT_TOKENS tokens, and every split's partials fit the partial buffer
    (partial_rows rows). Measured (H200, scripts/sweep_shared_kernel.py --tile-splits): W5's 4 groups
    x 32 rows x 16,384 tokens on the wide tile (32 units a split, 264 at once): 8 splits 0.089 ms (one
    wave), 16 splits 0.101 (two), 18 (the old rule, a third wave 18% full) 0.121, 12 0.114, 6 0.104."""
    units = max(num_items * num_kv_heads, 1)
    cap = max(1, min(MAX_SPLITS, max_tokens // MIN_SPLIT_TOKENS, partial_rows // max(num_rows, 1)))
    wave = per_sm * num_sms
    if units >= wave:   # the unsplit units fill the GPU
        return 1

    def cost(splits: int) -> float:
        return -(-units * splits // wave) * (UNIT_OVERHEAD_TOKENS + max_tokens / splits)
    return min(range(1, cap + 1), key=cost)


def require_whole_pages(kv_indptr: np.ndarray, kv_last_page_len: np.ndarray, page_size: int) -> np.ndarray:
    """Each group's page count, after checking that every group with pages fills its last one (shared
    levels hold whole pages only)."""
    pages = np.diff(kv_indptr)
    if (kv_last_page_len[pages > 0] != page_size).any():
        raise ValueError("shared levels hold whole pages only")
    return pages


def partial_rows(max_rows: int) -> int:
    """Rows of a partial buffer for levels of up to max_rows rows: splits are only chosen when few
    items (< 2 x SMs / kv heads) fill the GPU, so splits x rows stays small; 4096 spare rows (16 MB
    for 16 heads of 128) leave W5's 128 rows their 8 splits (choose_splits caps splits to the buffer
    in any case)."""
    return max_rows + 4096


def max_items(max_rows: int, block_rows: int = BLOCK_ROWS) -> int:
    """Most items a level of max_rows rows can have: one per full block, plus a partial block for
    each group (at most max_rows groups)."""
    return max_rows // block_rows + max_rows


def shared_level_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, items: torch.Tensor,
                           meta: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                           part_out: torch.Tensor, part_lse: torch.Tensor, sm_scale: float, programs: int,
                           block_tokens: int = 128, num_warps: int = 4, num_stages: int = 2,
                           block_rows: int = BLOCK_ROWS, k_scale: float = 1.0, v_scale: float = 1.0):
    """q [rows, hq, d]; caches [pages, page_size, hkv, d] (NHD) in q's dtype or fp8 (read as fp8 *
    k_scale / v_scale); items from shared_level_items on q's
    device; meta int32 [2] on the device: (items used, splits). part_out [>= splits * rows, hq, d]
    and part_lse [>= splits * rows, hq] float32 receive each split's partial attention at row
    split * rows + row (base-2 lse, as FlashInfer's). `programs` programs per kv head loop over the
    (item, split) units. Returns the launched kernel (its n_regs and metadata.shared), None if nothing ran."""
    hq, d = q.shape[1], q.shape[2]
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    assert hq % hkv == 0 and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert q.is_contiguous() and part_out.is_contiguous() and part_lse.is_contiguous()
    assert block_rows * (hq // hkv) <= 128, "query rows x GQA heads of an item must fit one tile"
    if programs == 0:
        return
    gqa = hq // hkv
    exact = INTERPRETED or q.dtype == torch.float32
    return _shared_level_kernel[(programs, hkv)](
        q, k_cache, v_cache, items, meta, kv_indptr, kv_indices, part_out, part_lse, sm_scale * k_scale * LOG2E,
        float(v_scale), k_cache.stride(0), k_cache.stride(1), q.shape[0],
        HQ=hq, GQA=gqa, D=d, PAGE=page, M=max(16, triton.next_power_of_2(block_rows * gqa)), BLOCK_T=block_tokens,
        DOT_F32=INTERPRETED, PRECISION="ieee" if exact else "tf32", num_warps=num_warps, num_stages=num_stages)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
                   meta: torch.Tensor):
    """Merge the partials of every split (meta[1] of them) into out [rows, hq, d] and lse [rows, hq]."""
    rows, hq, d = out.shape
    assert out.is_contiguous() and lse.is_contiguous()
    _merge_partials_kernel[(rows,)](out, lse, part_out, part_lse, meta, rows, HQ=hq,
                                    HQ_P2=triton.next_power_of_2(hq), D=d, num_warps=4)


class TritonSharedLevel:
    """A shared (non-causal, whole-page) cascade level on the Triton kernel. plan() runs once per
    step on the host (FlashInfer's wrapper signature); per layer, run(q, kv_cache) writes the
    partials and merge_into(out, lse) folds them into the running output. The partials live in
    caller-given buffers (FlashInferCascadeAttention's level_out/level_lse, shared by all captured
    sizes). In CUDA-graph mode the items, (count, splits) and the level's page arrays live in fixed
    device buffers and the grid is fixed (`programs` per kv head); plan() fills them."""

    def __init__(self, max_rows: int, partials: tuple[torch.Tensor, torch.Tensor], use_cuda_graph: bool = False,
                 kv_indptr_buf=None, kv_indices_buf=None, programs: int = 256, tile: SharedTile = TILES["triton"]):
        self.part_out, self.part_lse = partials
        self.tile = tile
        self.device = self.part_out.device
        self.use_cuda_graph = use_cuda_graph
        self.max_items = max_items(max_rows)
        self.programs = programs
        if use_cuda_graph:
            self.meta = torch.zeros(2, dtype=torch.int32, device=self.device)
            self.items = torch.zeros(self.max_items, 3, dtype=torch.int32, device=self.device)
            self.kv_indptr, self.kv_indices = kv_indptr_buf, kv_indices_buf
        self.sm_scale = None
        self.splits = 1
        self.block_rows = tile.block_rows
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 132)

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, causal=False, sm_scale=None, **_):
        assert not causal, "a shared level is not causal"
        qo, kv = qo_indptr.numpy(), kv_indptr.numpy()
        pages = require_whole_pages(kv, kv_last_page_len.numpy(), page_size)
        self.sm_scale = sm_scale if sm_scale is not None else head_dim ** -0.5
        # An item's rows x GQA heads fill one tile of at most 128 rows: the wide tile narrows for GQA 8.
        self.block_rows = min(self.tile.block_rows, 128 // (num_qo_heads // num_kv_heads))
        items = shared_level_items(qo, kv, self.block_rows)
        n = len(items)
        self.splits = choose_splits(n, num_kv_heads, int(pages.max(initial=0)) * page_size, int(qo[-1]),
                                    self.part_out.shape[0], self.num_sms)
        meta = np.array([n, self.splits], np.int32)
        if self.use_cuda_graph:
            assert n <= self.max_items and kv_indptr.numel() <= self.kv_indptr.numel()
            for buf, x in ((self.items, items), (self.meta, meta), (self.kv_indptr, kv_indptr),
                           (self.kv_indices, kv_indices)):
                if len(x):
                    buf[:len(x)].copy_(to_device(x, self.device), non_blocking=True)
            self.grid = self.programs
        else:
            self.items, self.meta = to_device(items, self.device), to_device(meta, self.device)
            self.kv_indptr, self.kv_indices = to_device(kv_indptr, self.device), to_device(kv_indices, self.device)
            self.grid = min(n * self.splits, self.programs)

    def run(self, q, kv_cache, k_scale: float = 1.0, v_scale: float = 1.0):
        k_cache, v_cache = kv_cache
        t = self.tile
        shared_level_attention(q, k_cache, v_cache, self.items, self.meta, self.kv_indptr, self.kv_indices,
                               self.part_out, self.part_lse, self.sm_scale, self.grid, t.block_tokens, t.num_warps,
                               t.num_stages, self.block_rows, k_scale=k_scale, v_scale=v_scale)

    def merge_into(self, out, lse):
        merge_partials(out, lse, self.part_out, self.part_lse, self.meta)
