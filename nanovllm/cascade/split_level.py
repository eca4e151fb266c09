"""A shared cascade level on FlashInfer's fa3 prefill kernel, each group cut into pieces ("fa3-split").

fa3 has no split-kv: a shared level runs one CTA per (group, 128-row query tile, kv head), so one
document read by 128 requests (256 query rows with GQA 2) runs on 16 CTAs of an H200's 132 SMs
(1 x 128 x 32,768 tokens: 0.452 ms a layer). Here each group's pages are cut into `splits` runs and
each run is a request of its own with a copy of the group's query rows: FlashInfer sees splits x the
CTAs, and each piece's partial (out, base-2 lse) lands at row split * R + row of the partial buffers,
the layout of the Triton shared level (shared_kernel.py), whose merge kernel folds them into the
running output. Measured on the H200 (scripts/sweep_shared_kernel.py, one layer, CUDA graphs, merge
included; claude_docs/cascade.md), ms a layer:

| groups x rows x shared | fa3 | best fa3 cut (pieces) | triton-wide (wave-filling splits) |
|---|---|---|---|
| 1 x 128 x 32768 | 0.452 | 0.087 (8) | 0.180 (old splits) |
| 1 x 256 x 8192  | 0.123 | 0.052 (4) | 0.092 (old splits) |
| 4 x 96 x 16384  | 0.236 | 0.146 (2) | 0.201 |
| 4 x 32 x 16384  | 0.237 | 0.143 (2) | 0.089 |
| 8 x 128 x 4096  | 0.076 (best) | 0.096 (2) | 0.148 |

So the cut pays where groups have many rows (>= 192 query rows x GQA heads) and fa3 alone has fewer
than 128 CTAs; the piece count brings the CTAs to ~128 (choose_fa3_splits). Groups without pages
(requests that share nothing at this level) are merged into runs first: they attend to nothing, and a
level of many singletons does not become thousands of pieces (a merged run is cut like any group,
into pieces without pages).

In CUDA-graph mode the piece count and the query copies are fixed per captured size: `copies` copies
of the rows are made by a Triton kernel that skips those beyond the step's splits (read on the device),
a last piece of no pages takes the rows of unused copies, and pieces are padded to a fixed count with
empty ones (FlashInfer's graph mode wants a fixed batch size).
"""
import numpy as np
import torch
import triton
import triton.language as tl

from nanovllm.cascade.cost_model import FA3_TILE_ROWS
from nanovllm.cascade.shared_kernel import MIN_SPLIT_TOKENS, merge_partials, require_whole_pages
from nanovllm.utils.transfer import pinned, to_device

MAX_SPLITS = 8
TARGET_CTAS = 128        # ~one wave of fa3 CTAs on an H200's 132 SMs
# FlashInfer's FA3 plan keeps one schedule per head up to 4,096 work tiles a head, and its 8 MB int
# workspace holds 24 bytes per (work tile, q head): a graph-mode level stays under both.
MAX_PIECES = 4000
INT_WORKSPACE_BYTES = 8 << 20


def merge_empty_groups(qo_indptr: np.ndarray, kv_indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The level with its groups of no rows dropped (graph-mode padding: they hold no pages either) and
    each run of consecutive page-less groups made one group (attention over no keys: out 0, lse -inf,
    whatever the grouping)."""
    rows, pages = np.diff(qo_indptr), np.diff(kv_indptr)
    keep = rows > 0
    assert not pages[~keep].any(), "a group without rows holds pages"
    pages = pages[keep]
    join = np.zeros(len(pages), bool)
    join[1:] = (pages[1:] == 0) & (pages[:-1] == 0)   # joins the run of the group before it
    first = ~join
    qo = np.append(qo_indptr[:-1][keep][first], qo_indptr[-1]).astype(np.int32)
    kv = np.append(kv_indptr[:-1][keep][first], kv_indptr[-1]).astype(np.int32)
    return qo, kv


def choose_fa3_splits(qo_indptr: np.ndarray, kv_indptr: np.ndarray, num_qo_heads: int, page_size: int,
                      cap: int) -> int:
    """Pieces per group: enough for ~TARGET_CTAS fa3 CTAs (groups' 128-row query tiles x q heads) over
    the groups that have pages, each piece of the longest group reading >= MIN_SPLIT_TOKENS tokens."""
    rows, pages = np.diff(qo_indptr), np.diff(kv_indptr)
    tiles = int(np.sum(-(-rows[pages > 0] // FA3_TILE_ROWS)))
    if tiles == 0:   # nothing to read (an unused level in graph mode)
        return 1
    longest = int(pages.max()) * page_size
    return max(1, min(cap, MAX_SPLITS, longest // MIN_SPLIT_TOKENS, -(-TARGET_CTAS // (tiles * num_qo_heads))))


def split_level_layout(qo_indptr: np.ndarray, kv_indptr: np.ndarray, kv_indices: np.ndarray, splits: int,
                       page_size: int):
    """The level cut into `splits` pieces per group: piece (s, g) holds group g's query rows as rows
    s * R + qo_indptr[g].. of a query tensor of `splits` copies of the R rows, and the s-th of `splits`
    runs of the group's pages (ceil(pages / splits) each, the last ones shorter or empty). Its partial
    (out, lse) thus lands at row split * R + row. Returns (qo_indptr, kv_indptr, kv_indices,
    last_page_len), pieces in split-major order; a piece without pages has last_page_len 0 (it attends
    to nothing: out 0, lse -inf)."""
    rows = int(qo_indptr[-1])
    groups = len(qo_indptr) - 1
    pages = np.diff(kv_indptr)
    chunk = -(-pages // splits)                                   # pages per piece of each group
    start = kv_indptr[:-1][None, :] + np.arange(splits)[:, None] * chunk[None, :]   # [splits, groups]
    end = np.minimum(start + chunk[None, :], kv_indptr[1:][None, :])
    count = np.maximum(end - start, 0).ravel()
    qo = (np.arange(splits)[:, None] * rows + qo_indptr[None, :-1]).ravel()
    qo = np.append(qo, splits * rows).astype(np.int32)
    kv = np.concatenate([[0], np.cumsum(count)]).astype(np.int32)
    take = np.repeat(start.ravel() - kv[:-1], count) + np.arange(kv[-1])
    last = np.where(count > 0, page_size, 0).astype(np.int32)
    assert len(qo) == splits * groups + 1
    return qo, kv, kv_indices[take].astype(np.int32), last


def pad_pieces(qo, kv, last, used_rows: int, total_rows: int, pieces: int):
    """Graph mode: one page-less piece over rows [used_rows, total_rows) (unused copies), then empty
    pieces up to `pieces`."""
    n = len(qo) - 1
    extra = pieces - n - 1
    assert extra >= 0, (pieces, n)
    qo = np.concatenate([qo[:-1], [used_rows], np.full(extra + 1, total_rows)]).astype(np.int32)
    kv = np.concatenate([kv, np.full(extra + 1, kv[-1])]).astype(np.int32)
    last = np.concatenate([last, np.zeros(extra + 1, np.int32)]).astype(np.int32)
    return qo, kv, last


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, meta_ptr, row_elems, rows, BLOCK: tl.constexpr):
    """dst[s * rows + r] = src[r] for copies s < meta[1] (program (r, s), BLOCK elements at a time)."""
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    if s < tl.load(meta_ptr + 1):
        for o in range(0, row_elems, BLOCK):
            offs = o + tl.arange(0, BLOCK)
            ok = offs < row_elems
            x = tl.load(src_ptr + r * row_elems + offs, mask=ok)
            tl.store(dst_ptr + (s * rows + r) * row_elems + offs, x, mask=ok)


def copy_rows(q: torch.Tensor, dst: torch.Tensor, meta: torch.Tensor, copies: int):
    """dst[:copies * rows] = `copies` copies of q, writing only those below meta[1] (graph mode)."""
    assert q.is_contiguous() and dst.is_contiguous()
    rows = q.shape[0]
    elems = q[0].numel()
    _copy_rows_kernel[(rows, copies)](q, dst, meta, elems, rows, BLOCK=min(4096, triton.next_power_of_2(elems)))


def graph_copies(max_rows: int, partial_rows: int, num_qo_heads: int) -> int:
    """Query copies (the most pieces a group) of a graph-mode level of max_rows rows: the partials fit
    the partial buffer, and the level's pieces stay within MAX_PIECES and FA3's int workspace."""
    by_workspace = INT_WORKSPACE_BYTES // (24 * num_qo_heads) - 64   # work tiles a head, with headroom
    pieces = min(MAX_PIECES, by_workspace)
    return max(1, min(MAX_SPLITS, partial_rows // max_rows, (pieces - 1) // max_rows))


def split_level_buffers(max_rows: int, shared_levels: int, max_indices: int, level_out: torch.Tensor,
                        device) -> tuple:
    """Graph-mode buffers for fa3-split levels, shared by every captured size (one graph runs a step):
    (query copies like level_out, [per shared level (qo_indptr, kv_indptr, kv_indices, last_page_len)])
    with room for the pieces of the largest level (FlashInferSplitLevel.pieces_for)."""
    heads = level_out.shape[1]
    pieces = max(FlashInferSplitLevel.pieces_for(rows, graph_copies(rows, level_out.shape[0], heads))
                 for rows in range(1, max_rows + 1))
    i32 = dict(dtype=torch.int32, device=device)
    return torch.empty_like(level_out), [(torch.zeros(pieces + 1, **i32), torch.zeros(pieces + 1, **i32),
                                          torch.zeros(max_indices, **i32), torch.zeros(pieces, **i32))
                                         for _ in range(shared_levels)]


class FlashInferSplitLevel:
    """A shared level on fa3 with its groups cut into pieces (module doc). plan() on the host once per
    step (FlashInfer's wrapper signature), run() writes the pieces' partials into the caller's partial
    buffers (FlashInferCascadeAttention's level_out / level_lse), merge_into() folds them into the
    running output. Graph mode: `buffers` = (q copies [>= copies x max_rows rows], qo_indptr,
    kv_indptr, kv_indices, last_page_len) device buffers, the first four sized for pieces_for(max_rows)."""

    def __init__(self, workspace: torch.Tensor, max_rows: int, partials: tuple[torch.Tensor, torch.Tensor],
                 use_cuda_graph: bool = False, buffers: tuple | None = None, backend: str = "fa3"):
        import flashinfer   # GPU only; the host layout above is CPU-tested
        self.part_out, self.part_lse = partials
        self.max_rows = max_rows
        self.use_cuda_graph = use_cuda_graph
        self.device = workspace.device
        self.copies = graph_copies(max_rows, self.part_out.shape[0], self.part_out.shape[1])
        self.meta = torch.zeros(2, dtype=torch.int32, device=self.device)
        self.splits = 1
        if use_cuda_graph:
            q_copies, qo, kv, idx, last = buffers
            self.pieces = self.pieces_for(max_rows, self.copies)
            assert q_copies.shape[0] >= self.copies * max_rows and qo.numel() >= self.pieces + 1
            self.q_copies = q_copies
            self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=qo[:self.pieces + 1],
                paged_kv_indptr_buf=kv[:self.pieces + 1], paged_kv_indices_buf=idx,
                paged_kv_last_page_len_buf=last[:self.pieces], backend=backend)
        else:
            self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)

    @staticmethod
    def pieces_for(max_rows: int, copies: int) -> int:
        """Pieces of a graph-mode level: `copies` pieces of each of up to max_rows groups (after
        merge_empty_groups every group has a row), and the unused copies' piece."""
        return copies * max_rows + 1

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, causal=False, sm_scale=None, **common):
        assert not causal, "a shared level is not causal"
        require_whole_pages(np.asarray(kv_indptr), np.asarray(kv_last_page_len), page_size)
        qo, kv = merge_empty_groups(np.asarray(qo_indptr), np.asarray(kv_indptr))
        idx = np.asarray(kv_indices)   # host arrays (FlashInferCascadeAttention.plan keeps them so for this level)
        rows = int(qo[-1])
        # eager: as many copies as the partial buffer holds for this step's rows
        cap = self.copies if self.use_cuda_graph else max(1, self.part_out.shape[0] // max(rows, 1))
        self.splits = choose_fa3_splits(qo, kv, num_qo_heads, page_size, cap)
        qo_s, kv_s, idx_s, last_s = split_level_layout(qo, kv, idx, self.splits, page_size)
        if self.use_cuda_graph:
            qo_s, kv_s, last_s = pad_pieces(qo_s, kv_s, last_s, self.splits * rows, self.copies * rows, self.pieces)
            args = (torch.from_numpy(qo_s), torch.from_numpy(kv_s), to_device(idx_s, self.device),
                    torch.from_numpy(last_s))
        else:
            args = tuple(pinned(a) for a in (qo_s, kv_s, idx_s, last_s))
        self.meta.copy_(to_device(np.array([0, self.splits], np.int32), self.device), non_blocking=True)
        self.wrapper.plan(*args, num_qo_heads, num_kv_heads, head_dim, page_size, causal=False, sm_scale=sm_scale,
                          disable_split_kv=True, **common)

    def run(self, q, kv_cache, **scales):
        n = q.shape[0]
        if self.use_cuda_graph:
            copies = self.copies
            q_s = self.q_copies[:copies * n]
            copy_rows(q, q_s, self.meta, copies)
        else:
            copies = self.splits
            q_s = q if copies == 1 else q.repeat(copies, 1, 1)
        self.wrapper.run(q_s, kv_cache, out=self.part_out[:copies * n], lse=self.part_lse[:copies * n],
                         return_lse=True, **scales)

    def merge_into(self, out, lse):
        merge_partials(out, lse, self.part_out, self.part_lse, self.meta)
