"""Cascade planner: find the KV pages that groups of requests share and lay them out as levels.

A plan has up to `max_levels` levels. Levels 0..n-2 are "shared" levels: each group there is a
contiguous run of requests (in `plan.order`) that hold the SAME physical pages at the same place in
their block tables, and the group attends to those pages once, non-causally. The last level is the
usual per-request paged attention (causal) over whatever pages were not shared. The levels' partial
results are merged through their log-sum-exp (see reference.cascade_attention).

Layout contract (FlashInfer MultiLevelCascadeAttentionWrapper):
  * every level partitions ALL query rows into contiguous groups (qo_indptr);
  * a request that is in no sharing group at some shared level gets a singleton group with ZERO pages
    there (kv_indptr step 0, last_page_len 0); attention over no keys gives out 0 and lse -inf,
    which the merge ignores;
  * sharing is nested: once a request drops out of sharing, all its deeper shared levels are empty;
  * each request's pages appear exactly once across its levels, in block-table order.
"""
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class CascadeLevel:
    qo_indptr: torch.Tensor         # int32 [num_groups + 1]: query rows of each group
    kv_indptr: torch.Tensor         # int32 [num_groups + 1]: offsets into kv_indices
    kv_indices: torch.Tensor        # int32 [total pages]: page ids of each group, concatenated
    kv_last_page_len: torch.Tensor  # int32 [num_groups]: tokens used in each group's last page (0 if no pages)
    causal: bool

    @property
    def num_groups(self) -> int:
        return self.qo_indptr.numel() - 1

    def __getstate__(self) -> dict:
        """Pickled (a step shipped to tensor-parallel workers) without what it caches from its own arrays
        (rows_and_pages, ragged_level.level_layout: underscored attributes); a worker computes what it reads.
        Shipping them cost rank 0 ~57 us a step at 1,024 rows (session 20, CPU machine: 297 -> 240 us to pickle a
        two-level plan); workers rebuild them each step (their host time, not timed)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def rows_and_pages(self) -> tuple[np.ndarray, np.ndarray]:
        """Query rows and KV pages of each group (read-only; computed once: a decode batch's shared levels
        serve many steps' plans, and the cost model reads them every step)."""
        cached = self.__dict__.get("_rows_and_pages")
        if cached is None:
            cached = np.diff(self.qo_indptr.numpy()), np.diff(self.kv_indptr.numpy())
            for a in cached:
                a.setflags(write=False)
            self._rows_and_pages = cached
        return cached


@dataclass
class CascadePlan:
    order: torch.Tensor             # int64 [batch]: request order the query rows must follow
    levels: list[CascadeLevel]
    regular_kv_pages: int           # pages read by plain paged attention (sum of every request's pages)
    cascade_kv_pages: int           # pages read by this plan (sum over levels and groups)
    groups_per_level: list[int]
    num_rows: int                   # total query rows
    # int64 [num_rows]: q_plan = q[row_order] puts the original query rows into plan order;
    # out[row_order] = out_plan undoes it. Equals `order` when every q_len is 1 (decode).
    row_order: torch.Tensor = field(default=None, repr=False)

    @property
    def num_shared_levels(self) -> int:
        return len(self.levels) - 1


def _i32(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))


def _make_level(bt_rows, starts, base, pages, cum_q, num_rows, page_size, last_len, causal):
    """Build one level. bt_rows: block-table rows in plan order; starts: first row (request) of each
    group; base/pages: per request, the first page column and the page count it holds at this level
    (all members of a group hold the same). last_len: per-group last_page_len."""
    gbase, gpages = base[starts], pages[starts]
    qo_indptr = np.append(cum_q[starts], num_rows)
    kv_indptr = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(gpages, out=kv_indptr[1:])
    # Page ids of every group, concatenated: a column mask over each group's first row. Boolean
    # indexing walks row-major, i.e. group by group and in column order within a group.
    end = gbase + gpages
    width = int(end.max()) if len(end) else 0
    cols = np.arange(width)
    mask = (cols >= gbase[:, None]) & (cols < end[:, None])
    kv_indices = bt_rows[starts, :width][mask]
    return CascadeLevel(_i32(qo_indptr), _i32(kv_indptr), _i32(kv_indices), _i32(last_len), causal)


def plan_cascade(block_table, kv_lens, q_lens, page_size: int, max_levels: int = 3,
                 min_shared_pages: int = 1, min_group_size: int = 2,
                 fixed_shared_prefix_len: int | None = None) -> CascadePlan:
    """Plan multi-level cascade attention for one batch.

    block_table: int [batch, max_pages] page ids, padded past each row's pages with anything (e.g. -1).
    kv_lens: tokens in cache INCLUDING this step's new tokens; q_lens: this step's query tokens.
    Request r may share at most (kv_lens[r] - q_lens[r]) // page_size leading pages, so shared
    (non-causal) levels only ever hold full pages that precede all of r's query tokens.
    fixed_shared_prefix_len: old-prototype mode, one shared level of exactly that many tokens
    (floored to pages) among requests that hold identical pages there.
    """
    if isinstance(block_table, torch.Tensor):
        block_table = block_table.cpu().numpy()
    bt = np.asarray(block_table)
    kv = np.asarray(kv_lens, dtype=np.int64).reshape(-1)
    ql = np.asarray(q_lens, dtype=np.int64).reshape(-1)
    B = kv.shape[0]
    assert max_levels >= 1 and ql.shape[0] == B and bt.shape[0] == B
    num_pages = (kv + page_size - 1) // page_size
    shareable = np.minimum(np.maximum(kv - ql, 0) // page_size, num_pages)
    if fixed_shared_prefix_len is not None:
        # One level of exactly P pages: clamp rows to P and only link rows that agree on all P.
        P = fixed_shared_prefix_len // page_size
        shareable = np.minimum(shareable, P)
        min_shared_pages, max_levels = max(P, 1), min(max_levels, 2)
    min_shared_pages = max(min_shared_pages, 1)
    min_group_size = max(min_group_size, 2)
    num_rows = int(ql.sum())
    regular = int(num_pages.sum())

    # Clamp: columns a row may not share get a per-row sentinel (-1-r) that matches nothing, since
    # real page ids are >= 0. Then "common prefix of two rows" == pages they may share.
    W = int(shareable.max()) if B else 0
    if W > 0:
        ar = np.arange(B)
        clamped = np.where(np.arange(W) < shareable[:, None], bt[:, :W], -1 - ar[:, None]).astype(np.int32)
        # Quick exit: nothing can be shared if no two rows agree on their first page.
        c0 = np.sort(clamped[:, 0])
        if not (c0[1:] == c0[:-1]).any():
            W = 0
    if W == 0 or max_levels == 1:
        order = np.arange(B)
        lcp = np.zeros(max(B - 1, 0), np.int64)
    else:
        # Lexicographic order of rows: argsort over a raw-bytes (void) view compares rows with memcmp.
        # Rows sharing a k-page prefix share a 4k-byte prefix, so they end up adjacent. ~20x faster than
        # np.lexsort over W keys. Big-endian bytes make it numeric for page ids (>= 0): groups come in the
        # order of their first page, the order a prefill's shared level needs to read its pages as increasing
        # runs of the cache (ragged_level.py).
        order = np.argsort(clamped.astype(">i4").view(np.dtype((np.void, 4 * W))).ravel())
        s = clamped[order]
        eq = s[1:] == s[:-1]
        # Longest common prefix (in pages) of each adjacent pair of sorted rows.
        lcp = np.where(eq.all(1), W, eq.argmin(1))

    bt_rows = bt[order]
    ql_o, kv_o, np_o = ql[order], kv[order], num_pages[order]
    cum_q = np.zeros(B, np.int64)
    np.cumsum(ql_o[:-1], out=cum_q[1:])

    # Hierarchical grouping over sorted rows, one vectorized pass per shared level. A link joins
    # adjacent rows i, i+1 when both still share and they have at least min_shared_pages more pages in
    # common than their previous-level group already shares. (Rows of different previous-level groups
    # never link: their LCP is below the pages those groups already share.) Maximal linked runs are
    # the groups; a group shares up to the minimum LCP inside its run (= LCP of all its members).
    base = np.zeros(B, np.int64)           # pages already consumed by previous levels, per row
    active = np.ones(B, bool)              # still sharing at the previous level
    levels = []
    for _ in range(max_levels - 1):
        if B < 2:
            break
        link = active[:-1] & active[1:] & (lcp >= base[:-1] + min_shared_pages)
        if not link.any():
            break
        new_run = np.ones(B, bool)
        new_run[1:] = ~link
        run = np.cumsum(new_run) - 1
        depth = np.full(run[-1] + 1, np.iinfo(np.int64).max)
        np.minimum.at(depth, run[:-1][link], lcp[link])
        shared = np.bincount(run)[run] >= min_group_size
        if not shared.any():
            break
        pages = np.where(shared, depth[run] - base, 0)
        starts = np.flatnonzero(new_run | ~shared)    # rows left out become singleton (empty) groups
        last_len = np.where(pages[starts] > 0, page_size, 0)
        levels.append(_make_level(bt_rows, starts, base, pages, cum_q, num_rows, page_size, last_len, False))
        base, active = base + pages, shared

    # Final level: every request alone with its remaining pages (always includes its query tokens).
    rest = np_o - base
    last_len = np.where(rest > 0, kv_o - (np_o - 1) * page_size, 0)
    levels.append(_make_level(bt_rows, np.arange(B), base, rest, cum_q, num_rows, page_size, last_len, True))

    # Query-row permutation: the q_lens rows of order[0], then of order[1], ...
    orig_start = np.zeros(B, np.int64)
    np.cumsum(ql[:-1], out=orig_start[1:])
    row_order = np.repeat(orig_start[order] - cum_q, ql_o) + np.arange(num_rows)

    return CascadePlan(
        order=torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64)),
        levels=levels,
        regular_kv_pages=regular,
        cascade_kv_pages=sum(int(l.kv_indptr[-1]) for l in levels),
        groups_per_level=[l.num_groups for l in levels],
        num_rows=num_rows,
        row_order=torch.from_numpy(row_order.astype(np.int64)),
    )
