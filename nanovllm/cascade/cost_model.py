"""Does cascade attention pay for this step? A linear model of one attention layer's time.

Regular paged decode (FlashInfer's tensor-core decode, as the engine runs it) cuts each request's pages
into chunks so that its CTAs fit two an SM (`regular_decode_split`, the rule of FlashInfer's planner), and
its time follows the critical path more than the total: time ~ fixed + per_unique * (distinct tokens:
the first reads of pages from HBM; the repeats hit L2) + per_crit * (tokens on the longest CTA chain:
waves x chunk, the chunk in whole 128-token KV tiles, the step of the kernel's loop: `regular_crit_tokens`)
+ per_wave * waves (+ per_token * tokens read and per_row * requests, which the fit may keep at 0).
Cascade reads each shared run once per group, but launches one kernel per level plus merges, and its
shared-level kernel streams a group's run once per tile of query rows (16 or 32 rows for the Triton tiles,
128 for fa3): time ~ fixed_per_level * levels + per_tile_token * (KV tokens the level's busiest SM streams,
tile after tile: `shared_level_crit`) + per_shared_token * (shared tokens once: first reads from HBM; the
32-row tile's sibling tiles and fa3's q heads re-read a group's pages from L2) + per_split * splits (the
kernel's own split rule; the merge walks a row's splits one after another) + per_own_token * (the
requests' own tokens) + per_merge_row * (rows x splits partials merged), with coefficients of their own
for each shared-level kernel (the Triton tiles stream bytes, fa3 is tensor-core bound: one line cannot fit
both) and the own-token and merged-row terms one for all (`shared_level_terms`, KERNEL_TERMS).
Coefficients are fitted to measurements on the H200 (`python scripts/bench_kernels.py --only cascade` measures a training grid and a held-out grid,
fits with `fit_cost_model` and prints the held-out errors; claude_docs/cascade.md has the tables);
the engine uses cascade only when the model predicts it faster by a margin. The fit is least squares
on relative errors (each sample weighted by 1 / its measured time): the decision compares two times
of one step, so a 20% error on a 0.04 ms step matters as much as one on a 4 ms step.

Session 8 (H200, 56 training + 16 held-out shapes, claude_docs/cascade.md): plain least squares with
the regular line on tokens read alone gave held-out errors of median 13.7% / max 128% (regular) and
11.7% / 31.8% (cascade); relative least squares with the distinct-token and per-request terms 4.6% / 34%
(regular) and 10.0% / 25% (cascade). Session 13 (re-measured after the Triton tiles' split counts began
to fill whole waves): 5.8% / 34% and 3.8% / 24%.

Session 17 (three grids on the H200, claude_docs/data/cascade_grid_h200_s17*.md: session 13's shapes plus
4-page shared runs, 48-row groups and fa3 at 256-1,024 rows, 270 training shapes; 96 held-out shapes drawn
over issue #14's whole range, 32 a grid): session 13's terms, refitted on the first grid, gave its held-out
7.6% / 27.1% (regular) and 7.2% / 30.9% (cascade). Its worst regular points had few requests (18-52) over
2,000-14,000-token contexts, where FlashInfer splits each request and the time follows the longest chunk
(3 x 6 x 2,432 tokens took as long as 4 x 8 x 2,048: one 2,688-token chunk a CTA against one of 2,304);
its worst cascade points had groups of 35-85 rows on the 32-row tile, which streams the shared run once
per 32 rows (5 x 42 x 26,592 took as long as 4 x 32 x 65,536: 266k tile tokens against 262k). The terms
above are those two mechanisms. On all 96 held-out shapes: session 13's defaults 5.9% / 39.1% (regular),
7.3% / 32.5% (cascade), the decision right on 89; session 13's terms refitted on the 270 shapes 5.2% /
38.7% and 6.0% / 29.9%, 88; these terms (the defaults: that fit) 3.1% / 16.9% and 6.0% / 25.9%, 90. The
third grid's 32 held-out shapes were measured after the terms were chosen: 2.5% / 16.9% and 5.1% / 25.9%.
Run to run, the same shape moves up to 11% (median 1%) at 15-100 us, which bounds any model's largest
error there. claude_docs/cascade.md has the tables.

Session 18 (no new measurement: the same three grids, terms chosen on grids one and two, grid three's 32
held-out shapes the test): the query-rows x shared-tokens term went (it put 8 x 62 x 18,592 on the 32-row
tile 27% high: a tile's compute does not grow with how full it is), and the split, merged-row and (32-row
tile) distinct-token terms came in. Cascade error on all 96 held-out shapes median 4.7% / max 17.4% (6.0% /
25.9% before), both lines within 10% on 70 (65), decision right on 91 (90); grid three's 32: 3.3% / 14.1%
(5.1% / 25.9%); held-out shapes of >= 0.1 ms: 2.8% / 14.1% (4.3% / 25.9%). The worst left are grid two's
small shapes (0.03-0.07 ms, measured 3-15% slower than grid one's on every small shape, both lines: a
machine offset) and shapes whose last wave of Triton units is sparse (72 x 3 x 11,376: 2 full waves of
264 and 48 units; no training shape has one).

Session 19 (four new grids, claude_docs/data/s19: each layer timed as its share of a CUDA graph of 8 copies, so
without the graph launch's latency; the same 104 training shapes in each, measured on two H200s, 416 samples
fitted together; 3 x 32 held-out shapes (seeds 2-4) to choose terms on; seed 19's 32 and 40 fresh shapes measured
twice the test). Two critical paths came in. Regular: the chunk in whole 128-token KV tiles (KV_TILE_TOKENS;
9 x 18 x 288, 1,296 CTAs of a 544-token chunk, took 0.092 ms, 4 x 48 x 256, 1,536 of 512 tokens, 0.089).
Shared level: tile tokens became the busiest SM's tokens (shared_level_crit). fa3 runs one persistent CTA an SM
and deals its works (piece x 128-row query tile x q head) head after head to the least loaded (FlashInfer's
PrefillSM90Plan): 160 works put two 6,496-token works on one CTA, which 5 x 204 x 6,496 took (a tokens-x-tiles
line was 14% low there, 18% on 11 x 78 x 7,408). The Triton tiles: a full wave of 264 units runs two an SM, and
two share an SM's streaming, so it costs two chunks; a last, partial wave at least one (72 x 3 x 11,376: 2 full
waves and 48 units; 47 x 15 x 8,560: one and 112; the tokens-x-tiles line was 16% and 15% low there, now 4% and
11%). fa3 gained the distinct-token term (8 x 128 x 16,384 took 8% longer than 1 x 1,024 x 16,384: eight
documents from HBM, not one). Compared on the 96 held-out shapes of seeds 2-4 (the fit on the 416 training
samples; error median / max, regular then cascade; shapes within 10% on both lines; decision right): session
18's terms 3.6% / 17.4%, 4.2% / 18.4%, 71, 91 (session 18's defaults: 3.6% / 35.8%, 7.4% / 53.9%, 58, 86: they
carried the graph launch); these terms 3.0% / 22.2%, 2.7% / 11.7%, 88, 93. Measured there and dropped (no better,
or worse): a max() of the critical path and the distinct tokens (an HBM bound) on the regular line, the total
tokens, fractional waves (regular max 19.0%, the same shapes within 10%); the two levels' streams overlapping (a
max() of the shared and own levels); Triton tiles' tokens x tiles or distinct tokens beside the critical path.
The test, after the terms were chosen (112
shapes: seed 19's 32, the 40 fresh ones twice): 3.3% / 22.2% and 2.5% / 20.0%, 105 within 10% on both, decision
right on 109 (session 18's terms refitted: 4.0% / 16.2%, 3.1% / 23.8%, 88, 107). The worst misses left are small
shapes whose KV (K and V of every page the layer reads) fits L2: 8 back-to-back copies of one layer find it there,
an engine step's 28 layers would not (36 requests over 288-432 tokens, 39-42 MB, took 0.022-0.025 ms where 40-49
requests over 272-400 tokens, 45-52 MB, took 0.028-0.030: the regular line is 20-22% high on the 36-request
ones); held-out shapes of more than 45 MB: regular max 12.7% (seeds 2-4) and 7.7% (test), cascade 11.7% and
11.5% (1 x 86 x 41,680 on the 32-row tile, 11 splits: one full wave, charged two chunks). Below 45 MB the test's
3 x 7 x 992 (both lines 13-20% low, both runs) and 6 x 3 x 784 miss too.

Session 20 (four new grids, claude_docs/data/s20, measured with --distinct-caches --ragged-fa3: each of the graph's 8
copies of the layer reads its own KV cache, as an engine step's layers do, and fa3 shared levels run on the ragged
kernel the engine uses; the same 104 training shapes, 416 samples fitted together; terms chosen on seeds 2-4's 96
held-out shapes, seed 19's 32 and 40 fresh shapes measured twice the test). Two changes, both on the cascade line:
a partial last wave of Triton units costs at least LONE_UNIT_CHUNKS = 1.25 chunks (was 1: 47 x 15 x 8,560, a full wave
and 112 units, was 12.5% low), and fa3-split shares fa3's streaming terms (SAME_KERNEL: its own line, fitted on 10
shapes of one work a CTA, was 13-15% low where 192 works put two on a CTA). Error median / max, regular then cascade;
shapes within 10% on both lines; decision right (session 19's terms refitted on the 416 samples -> these terms):
seeds 2-4 held-out 3.3% / 12.6%, 3.2% / 15.0%, 89, 93 -> 3.3% / 12.6%, 2.9% / 8.9%, 92, 92; the test, after the
choice: seed 19's 32 4.2% / 18.8%, 2.5% / 11.9%, 27, 31 -> 4.2% / 18.8%, 3.1% / 11.5%, 28, 31; fresh run a 3.0% / 10.0%,
2.6% / 13.9%, 38, 39 -> 3.0% / 10.0%, 3.0% / 12.7%, 39, 39; run b 3.1% / 12.1%, 2.5% / 15.0%, 38, 39 -> 3.1% / 12.1%,
2.6% / 11.9%, 38, 39. The regular line is session 19's, refitted. Measured and dropped: a regular per-CTA term
(each CTA's prologue and epilogue; seeds 2-4: regular 2.8% / 11.3%, but on the test the regular median went from
3.0% to 3.8% and 3 decisions of each fresh run flipped at the margin: dropped after the test); a max(), p-norm or
per-wave max of the critical path and the distinct tokens (HBM bound); a cheaper last wave of fewer than 133 CTAs;
a term for 8 copies' KV fitting L2; the own level run beside fa3's idle SMs (own tokens x idle fraction); an
average-per-SM fa3 token term (fixes 4 x 64 x 16,384, worse held out); the Triton tile's distinct tokens; a per-unit
Triton term. Left above 10%: regular 1 x 14 x 6,288 (19% low: 14 requests cut in 2 pieces each) and 1 x 49 x 32
(14% low), 17 x 3 x 5,408 and 16 x 2 x 16,384 (12-15% high: HBM-bound, where the distinct-token and critical-path
terms add though they overlap), 9 x 18 x 288 and 31 x 3 x 112 (12% low: short chunks over several waves); cascade
4 x 64 x 16,384 on fa3 (19% high, training: 64 works leave half the SMs to the own level, which runs beside),
16 x 2 x 256 (both lines 14-29% low, training, all four grids: 50 MB a cache, at L2's size), 1 x 2 x 256 (28% high,
training: 8 copies' KV fit L2, which no engine step's would), 6 x 3 x 784 and 3 x 7 x 992 (fresh, 11-13% low),
1 x 904 x 60,464 on fa3 (12% low).
"""
import heapq
from dataclasses import dataclass, field

import numpy as np


def shared_qk_pages(plan) -> int:
    """Sum over shared groups of (query rows x pages): the extra work of batching a group's queries (session 3's
    model, scripts/bench_old_cost_model.py)."""
    total = 0
    for level in plan.levels[:-1]:
        rows, pages = level.rows_and_pages()
        total += int((rows * pages).sum())
    return total


def pages_per_row(levels, num_rows: int) -> np.ndarray:
    """Pages each query row (in plan order) reads over `levels`: a plan's levels, what regular decode reads
    for it; its shared levels (plan.levels[:-1]), what the cascade policy keeps between steps."""
    total = np.zeros(num_rows, np.int64)
    for level in levels:
        rows, pages = level.rows_and_pages()
        total += np.repeat(pages, rows)
    return total


SLOTS_PER_SM = 2     # FlashInfer's tensor-core decode plans two CTAs an SM (scheduler.cuh, PrefillPlan)
NUM_SMS = 132        # the H200 the coefficients were measured on
# Regular decode batches of this many rows or more read each request's KV in one CTA per (request, KV
# head), without split-kv (attention/flashinfer_backend.py asks FlashInfer for that; the cost model cuts the
# same way): 256 rows x 8 KV heads already fill the SMs, and the split's partial outputs and its merge kernel
# (4.5 us a layer at 256 rows) cost more than they give. W1 on one H200, random Qwen3-0.6B: 23,825-24,168
# tok/s with splits at every size, 24,509-24,731 without at >= 64 rows (24,572 at >= 32, 24,581 at >= 128).
# Cascade's per-request level keeps its splits (W2/W3 cascade lost 7-9% without them: 1,024 rows of ~256 own
# tokens).
NO_SPLIT_KV_ROWS = 64


def regular_decode_split(pages, kv_heads: int, page_size: int, num_sms: int = NUM_SMS) -> tuple[int, int]:
    """(chunk pages, waves) of FlashInfer's tensor-core paged decode over requests of `pages`
    pages each: its planner picks the smallest chunk (>= 128 tokens) that cuts the requests into at most
    2 x SMs / kv heads pieces, or no cut when there are more requests than that (or NO_SPLIT_KV_ROWS,
    where the engine turns the cut off); each (piece, kv head) is a CTA, two an SM at a time. The longest
    CTA chain is waves x the chunk. A Python loop: <= 20 us at <= 33 requests, where it searches (numpy's
    per-call cost was 30 us). Batches of <= 16 rows decode on the Triton kernel by default
    (flashinfer_backend.TRITON_SMALL_ROWS), which cuts tokens its own way: this is the nearest rule."""
    slots = SLOTS_PER_SM * num_sms
    limit = max(slots // kv_heads, 1)
    chunk = max(128 // page_size, 1)
    if len(pages) <= limit and len(pages) < NO_SPLIT_KV_ROWS:
        p = [max(int(x), 1) for x in pages]
        longest = max(p, default=1)
        chunk = max(chunk, -(-sum(p) // limit))   # no chunk below this can fit
        hi = max(chunk, longest)
        while chunk < hi:
            mid = (chunk + hi) // 2
            if sum(-(-x // mid) for x in p) > limit:
                chunk = mid + 1
            else:
                hi = mid
        pieces = sum(-(-x // chunk) for x in p)
    else:
        longest = max(int(np.max(pages)), 1)
        chunk, pieces = max(chunk, longest), len(pages)
    return min(chunk, longest), -(-pieces * kv_heads // slots)


# KV tokens FlashInfer's tensor-core decode (its prefill kernel with a 16-row query tile, head dim 128, 16-bit KV)
# loads per step of a CTA's loop: NUM_MMA_KV 2 x 4 KV warps x 16 (prefill.cuh picks NUM_MMA_KV from shared
# memory for two CTAs an SM). A chunk of 17 pages (272 tokens) costs three steps, as 384 tokens would (session 19).
KV_TILE_TOKENS = 128


def regular_crit_tokens(chunk_pages: int, waves: int, page_size: int) -> int:
    """Regular decode's longest CTA chain in KV tokens: waves x the chunk, in whole KV_TILE_TOKENS steps."""
    return waves * -(-chunk_pages * page_size // KV_TILE_TOKENS) * KV_TILE_TOKENS


# Query rows one CTA of each shared-level kernel takes (shared_kernel.TILES; FlashInfer's fa3 and fa2 tiles):
# a group's shared run is streamed once per tile of its rows.
TILE_ROWS = {"triton": 16, "triton-wide": 32, "fa3": 128, "fa3-split": 128, "fa2": 64}


def tile_rows(kernel: str, gqa: int) -> int:
    rows = TILE_ROWS.get(kernel, 16)
    return min(rows, max(128 // gqa, 1)) if kernel.startswith("triton") else rows   # the Triton tile narrows for GQA 8


# Shared-level kernels that write split partials and merge them in a kernel of their own (a row's partials
# merged one split after another); fa3 and fa2 write one partial a row and merge it in place (a launch: the
# fixed term).
MERGING_KERNELS = ("triton", "triton-wide", "fa3-split")


def shared_level_terms(level, kernel: str, num_qo_heads: int, num_kv_heads: int, page_size: int) -> tuple:
    """(tile tokens, distinct tokens, splits, merged partial rows) of one shared level on `kernel`: its
    groups' tokens once per tile of query rows and once; the split count of the kernel's own rule (the
    Triton kernel's choose_splits, fa3-split's choose_fa3_splits under the graph cap), which the merge
    walks for each row; and rows x splits partials merged (0 for fa3/fa2). The partial buffer and the graph
    cap are the engine's for a graph of the level's rows (a captured graph may be a little larger).
    Cached on the level: a decode batch's shared levels serve many steps, and worth_it reads them each step
    (choose_splits' loop is ~8 us). Since session 19 the line charges the level's critical path
    (shared_level_crit) in place of the tile tokens, the tokens all its tiles stream."""
    key = (kernel, num_qo_heads, num_kv_heads, page_size)
    cache = level.__dict__.setdefault("_cost_terms", {})
    terms = cache.get(key)
    if terms is None:
        from nanovllm.cascade.shared_kernel import choose_splits, partial_rows
        from nanovllm.cascade.split_level import choose_fa3_splits, graph_copies   # imports this module
        rows, pages = level.rows_and_pages()
        n = int(rows.sum())
        tiles = -(-rows // tile_rows(kernel, num_qo_heads // num_kv_heads))
        splits = 1
        if kernel in ("triton", "triton-wide"):
            splits = choose_splits(int(tiles.sum()), num_kv_heads, int(pages.max(initial=0)) * page_size, n,
                                   partial_rows(n))
        elif kernel == "fa3-split":
            splits = choose_fa3_splits(level.qo_indptr.numpy(), level.kv_indptr.numpy(), num_qo_heads, page_size,
                                       graph_copies(n, partial_rows(n), num_qo_heads))
        terms = (int((tiles * pages).sum()) * page_size, int(pages.sum()) * page_size, splits,
                 n * splits if kernel in MERGING_KERNELS else 0)
        cache[key] = terms
    return terms


def fa3_busiest_cta_tokens(rows, pages, splits: int, num_qo_heads: int, page_size: int,
                           num_ctas: int = NUM_SMS) -> int:
    """KV tokens the busiest CTA of FlashInfer's fa3 (sm90) plan streams: one persistent CTA an SM, and the works
    (a group's piece (fa3-split cuts each group into `splits` runs, split_level.split_level_layout) x 128-row
    query tile x q head: FA3 does not pack GQA heads) dealt head after head, longest first, each to the CTA of
    least cost so far (cost 2 x 128 + its tokens: scheduler.cuh's PrefillSM90Plan). A CTA's works run one after
    another: 128 works of 16,384 tokens are one each, 160 put two on 28 CTAs."""
    jobs = []
    for r, p in zip(rows.tolist(), pages.tolist()):
        if r and p:
            chunk, tiles = -(-p // splits), -(-r // FA3_TILE_ROWS)
            jobs += [(min(chunk, p - s * chunk) * page_size, tiles) for s in range(splits) if p > s * chunk]
    if not jobs:
        return 0
    jobs.sort(reverse=True)
    if num_qo_heads * sum(t for _, t in jobs) <= num_ctas:   # a CTA each
        return jobs[0][0]
    heap = [(0, i, 0) for i in range(num_ctas)]   # (cost, CTA, tokens)
    for _ in range(num_qo_heads):
        for tokens, tiles in jobs:
            for _ in range(tiles):
                cost, cta, got = heapq.heappop(heap)
                heapq.heappush(heap, (cost + 2 * FA3_TILE_ROWS + tokens, cta, got + tokens))
    return max(got for _, _, got in heap)


# Chunks a partial last wave of Triton units costs at least (session 20): a unit alone on its SM streams its chunk
# in 1.25 of the chunk times of which two units sharing an SM take 2 (one unit does not keep an SM's loads in flight
# as two do). Session 19's 1.0 put 47 x 15 x 8,560 (one full wave and 112 units) 12% low, 72 x 3 x 11,376 4% low.
LONE_UNIT_CHUNKS = 1.25


def shared_level_crit(level, kernel: str, num_qo_heads: int, num_kv_heads: int, page_size: int,
                      num_sms: int = NUM_SMS) -> int:
    """KV tokens on one shared level's critical path, the busiest SM's (session 19), cached on the level like
    shared_level_terms. fa3 / fa3-split: the busiest persistent CTA's (fa3_busiest_cta_tokens). The Triton
    tiles (and fa2, by the same rule): a work unit (item of tile_rows query rows x split, per kv head) streams
    its split of the group's pages (the longest group's, in whole tiles of the kernel's block_tokens); units run
    PROGRAMS_PER_SM an SM, and two on one SM share its streaming: each full wave of 2 x SMs units costs two
    chunks, the last, partial wave max(LONE_UNIT_CHUNKS, its units / SMs) chunks (a unit alone on its SM still
    takes 1.25 chunks: 72 x 3 x 11,376, 576 units, two full waves and 48, costs 5.25 chunks). Units past the 256
    programs a kv head loop in their programs; counted as units all the same."""
    key = ("crit", kernel, num_qo_heads, num_kv_heads, page_size, num_sms)
    cache = level.__dict__.setdefault("_cost_terms", {})
    crit = cache.get(key)
    if crit is None:
        from nanovllm.cascade.shared_kernel import PROGRAMS_PER_SM, TILES
        splits = shared_level_terms(level, kernel, num_qo_heads, num_kv_heads, page_size)[2]
        rows, pages = level.rows_and_pages()
        if kernel.startswith("fa3"):
            crit = fa3_busiest_cta_tokens(rows, pages, splits, num_qo_heads, page_size, num_sms)
        else:
            block = TILES[kernel].block_tokens if kernel in TILES else page_size
            units = int((-(-rows // tile_rows(kernel, num_qo_heads // num_kv_heads))).sum()) * splits * num_kv_heads
            chunk = -(-(-(-int(pages.max(initial=0)) * page_size // splits)) // block) * block
            full, last = divmod(units, PROGRAMS_PER_SM * num_sms)
            crit = round((PROGRAMS_PER_SM * full + (max(LONE_UNIT_CHUNKS, last / num_sms) if last else 0.0)) * chunk)
        cache[key] = crit
    return crit


@dataclass(frozen=True)
class CostSample:
    """One measured decode layer: the plan's features (tokens, not pages), its shared-level kernel,
    and the two measured times."""
    backend: str
    levels: int
    regular_tokens: int      # every request's tokens
    cascade_tokens: int      # the plan's tokens: each shared run once, plus the requests' own
    regular_ms: float
    cascade_ms: float
    rows: int = 1            # query rows (requests at decode)
    crit_tokens: int = 0     # regular decode's longest CTA chain (regular_decode_split, regular_crit_tokens)
    waves: int = 1           # its waves of CTAs
    tile_tokens: int = 0     # shared levels: KV tokens their busiest SM streams, tile after tile (shared_level_crit)
    shared_tokens: int = 0   # shared levels: their distinct tokens
    splits: int = 0          # shared levels: their split counts, summed
    merge_rows: int = 0      # shared levels: partial rows merged
    own_tokens: int = 0      # the last level's tokens

    @classmethod
    def of(cls, plan, page_size: int, backend: str, regular_ms: float, cascade_ms: float,
           num_qo_heads: int = 16, num_kv_heads: int = 8) -> "CostSample":
        chunk, waves = regular_decode_split(pages_per_row(plan.levels, plan.num_rows), num_kv_heads, page_size)
        own = int(plan.levels[-1].kv_indptr[-1])   # the last level's pages
        shared = [shared_level_terms(level, backend, num_qo_heads, num_kv_heads, page_size)
                  for level in plan.levels[:-1]]
        _, distinct, splits, merged = (sum(t[i] for t in shared) for i in range(4))
        crit = sum(shared_level_crit(level, backend, num_qo_heads, num_kv_heads, page_size)
                   for level in plan.levels[:-1])
        return cls(backend, len(plan.levels), plan.regular_kv_pages * page_size, plan.cascade_kv_pages * page_size,
                   regular_ms, cascade_ms, plan.num_rows, regular_crit_tokens(chunk, waves, page_size), waves, crit,
                   distinct, splits, merged, own * page_size)


@dataclass(frozen=True)
class LevelCosts:
    fixed_ms: float            # per level (a launch, a plan, a merge)
    per_tile_token_ms: float   # per shared KV token on the level's critical path (CostSample.tile_tokens)
    per_shared_token_ms: float  # per shared KV token, once (the first read of a page its sibling tiles share)
    per_split_ms: float        # per split of a shared level (the merge's chain a row)
    per_own_token_ms: float    # per token of the requests' own level (every kernel alike)
    per_merge_row_ms: float    # per partial row merged (every kernel alike)

    def ms(self, levels: int, tile_tokens: int, shared_tokens: int, splits: int, own_tokens: int,
           merge_rows: int) -> float:
        return (self.fixed_ms * levels + self.per_tile_token_ms * tile_tokens
                + self.per_shared_token_ms * shared_tokens + self.per_split_ms * splits
                + self.per_own_token_ms * own_tokens + self.per_merge_row_ms * merge_rows)


# Session 20's terms fitted on session 20's measurements on the H200 (Qwen3-0.6B heads, page 16, CUDA graphs, each
# layer timed as its share of a graph of 8 copies, each copy reading its own KV cache, fa3 shared levels on the ragged
# kernel; scripts/bench_kernels.py --only cascade --distinct-caches --ragged-fa3; the four grids are stored in
# claude_docs/data/s20/grid_s20_seed*.md and scripts/refit_cost_model.py refits their training rows together: these
# are that fit, checked by tests/test_cascade_policy.py). fa3-split shares fa3's streaming terms (SAME_KERNEL). fa2
# had no training shape of its own (the engine picks it only for an fp8 cache or when configured): the all-kernel
# line, its critical path by the Triton tiles' rule with 64-row items (shared_level_crit), which also serves a kernel
# the table does not name (FALLBACK_COSTS).
H200_COSTS = {"triton": LevelCosts(0.004822, 1.565e-05, 0.0, 6.914e-4, 1.026e-06, 5.733e-06),
              "triton-wide": LevelCosts(0.00517, 1.565e-05, 1.061e-07, 4.909e-4, 1.026e-06, 5.733e-06),
              "fa3": LevelCosts(0.002146, 1.112e-05, 4.449e-07, 0.0, 1.026e-06, 5.733e-06),
              "fa3-split": LevelCosts(0.005811, 1.112e-05, 4.449e-07, 0.0, 1.026e-06, 5.733e-06),
              "fa2": LevelCosts(0.005241, 1.246e-05, 2.287e-07, 6.051e-4, 1.004e-06, 6.5e-06)}
FALLBACK_COSTS = H200_COSTS["fa2"]


# A kernel without a line of its own takes another's (fa3 cut into pieces runs fa3's FLOPs on more SMs:
# an upper bound where it is picked).
LINE_OF = {"fa3-split": "fa3"}


def _default_costs() -> dict:
    return dict(H200_COSTS)


@dataclass(frozen=True)
class CascadeCostModel:
    # Regular decode: session 20's refit (module doc).
    regular_fixed_ms: float = 0.006545
    regular_per_token_ms: float = 0.0
    regular_per_unique_ms: float = 3.367e-7
    regular_per_row_ms: float = 0.0
    regular_per_crit_ms: float = 1.288e-5
    regular_per_wave_ms: float = 0.004072
    cascade: dict = field(default_factory=_default_costs)   # shared-level kernel -> LevelCosts
    margin: float = 0.9                     # cascade must be predicted >= 10% faster
    num_qo_heads: int = 16                  # a rank's heads: they decide the shared-level kernel
    num_kv_heads: int = 8
    shared_backend: str = "auto"            # the configured kernel ("auto": shared_level_backend's pick)
    kv_fp8: bool = False                    # an fp8 KV cache (no fa3: shared_level_backend)

    def backend(self, plan) -> str:
        if self.shared_backend != "auto":
            return self.shared_backend
        return shared_level_backend(plan, self.num_qo_heads, self.num_kv_heads, self.kv_fp8)

    def line(self, kernel: str) -> LevelCosts:
        return self.cascade.get(kernel) or self.cascade.get(LINE_OF.get(kernel, ""), FALLBACK_COSTS)

    def regular_line(self, tokens: int, unique_tokens: int, rows: int, crit_tokens: int, waves: int) -> float:
        return (self.regular_fixed_ms + self.regular_per_token_ms * tokens + self.regular_per_unique_ms * unique_tokens
                + self.regular_per_row_ms * rows + self.regular_per_crit_ms * crit_tokens
                + self.regular_per_wave_ms * waves)

    def predict(self, plan, page_size: int) -> tuple[float, float]:
        """(regular, cascade) ms of one layer for this plan: its features (CostSample.of, the ones the
        coefficients were fitted on) through the lines."""
        return predicted(self, CostSample.of(plan, page_size, self.backend(plan), 0.0, 0.0, self.num_qo_heads,
                                             self.num_kv_heads))

    def worth_it(self, plan, page_size: int) -> bool:
        """11-14 us a step on the development CPU (session 18, W2/W3/W5 decode plans; session 13's terms: 6-7);
        session 19's CPU: 18-26 us with session 19's terms, 18-25 with session 18's (W5, W3, W2); session 20's terms
        cost the same (14 us a step of 1,024 rows in 64 groups, 46 us a fresh plan, before and after). A shared level's
        rows, pages and terms are computed once (CascadeLevel.rows_and_pages, shared_level_terms,
        shared_level_crit: 0.04-0.06 ms a fresh W2/W3/W5 plan on session 19's CPU), a step's new last level's
        each step."""
        regular, cascade = self.predict(plan, page_size)
        return cascade < self.margin * regular


# The regular line's terms, in CascadeCostModel's field order; REGULAR_FIT the ones fit_cost_model fits
# (session 17: with the total-tokens and per-request terms too, call h's held-out max was 16.2%, without them
# 14.1%).
REGULAR_TERMS = ("fixed", "per_token", "per_unique", "per_row", "per_crit", "per_wave")
REGULAR_FIT = ("fixed", "per_unique", "per_crit", "per_wave")


def regular_features(s: CostSample) -> dict:
    return {"fixed": 1.0, "per_token": s.regular_tokens, "per_unique": s.cascade_tokens, "per_row": s.rows,
            "per_crit": s.crit_tokens, "per_wave": s.waves}


def cascade_features(s: CostSample) -> list:
    """The cascade line's features, in LevelCosts' order."""
    return [s.levels, s.tile_tokens, s.shared_tokens, s.splits, s.own_tokens, s.merge_rows]


# The terms each shared-level kernel's line fits (session 18): the Triton tiles' splits (the merge walks
# them), the 32-row tile's first reads of pages its sibling tiles re-read from L2 (distinct tokens); fa3 runs
# no split, fa3-split's pieces cost through the merged rows. Session 19: fa3 and fa3-split fit distinct tokens
# too (a document's pages come from HBM once, its 16 q heads' works re-read them from L2); session 20: fa3-split
# takes fa3's tile and distinct-token coefficients and fits its fixed term only (SAME_KERNEL; its own terms here
# serve where no fa3 samples are fitted). Then one own-token and one merged-row term for every kernel. A kernel
# not named here fits fixed and tile terms.
KERNEL_TERMS = {"triton": ("fixed", "tile", "split"), "triton-wide": ("fixed", "tile", "shared", "split"),
                "fa3": ("fixed", "tile", "shared"), "fa3-split": ("fixed", "tile", "shared")}
CASCADE_TERMS = ("fixed", "tile", "shared", "split")   # LevelCosts' per-kernel fields, in order
# Kernels that run another's kernel and fit only their fixed term of their own (session 20): fa3-split is fa3 over
# pieces of each group, so its busiest CTA's tokens and its distinct tokens cost what fa3's do (its pieces' copies
# of the queries and the merge launch are its fixed term; the merged rows the joint term). Fitted apart, its line
# (10 training shapes, all one work a CTA) was 13-15% low where 192 works put two on a CTA (3 x 241 x 39,008).
SAME_KERNEL = {"fa3-split": "fa3"}


def fit_cost_model(samples: list[CostSample], min_samples: int = 4, regular_terms=REGULAR_FIT) -> CascadeCostModel:
    """Least squares: the regular line over every sample; the cascade lines jointly, each shared-level
    kernel with its own terms (KERNEL_TERMS) over its samples, and one own-token and one merged-row term for
    all (the requests' own level is the same decode kernel whatever runs the shared levels, and the merge
    kernel is one: fitted per kernel, fa3's samples, whose row counts hardly vary, put that level's cost in
    its fixed term; session 17). A kernel with fewer than min_samples keeps the line fitted to every sample
    as one kernel's. Coefficients are constrained to >= 0 (a negative cost is noise; `relative_least_squares`)."""
    reg = relative_least_squares([[regular_features(s)[t] for t in regular_terms] for s in samples],
                                 [s.regular_ms for s in samples])
    coef = dict(zip(regular_terms, reg))
    every = LevelCosts(*relative_least_squares([cascade_features(s) for s in samples], [s.cascade_ms for s in samples]))
    kernels = sorted(k for k in {s.backend for s in samples} if sum(s.backend == k for s in samples) >= min_samples)
    fitted = [s for s in samples if s.backend in kernels]
    owner = {k: SAME_KERNEL[k] if SAME_KERNEL.get(k) in kernels else k for k in kernels}   # whose streaming terms
    terms = {k: KERNEL_TERMS.get(k, ("fixed", "tile")) if owner[k] == k else ("fixed",) for k in kernels}

    def row(s):   # each kernel's terms (zero but its own, or its SAME_KERNEL's but fixed), then the joint ones
        f = dict(zip(CASCADE_TERMS, cascade_features(s)[:4]))
        out = [f[t] if s.backend == k or (t != "fixed" and owner[s.backend] == k) else 0.0
               for k in kernels for t in terms[k]]
        return out + [s.own_tokens, s.merge_rows]
    joint = relative_least_squares([row(s) for s in fitted], [s.cascade_ms for s in fitted]) if fitted else []
    got, i = {}, 0
    for k in kernels:
        got[k] = dict(zip(terms[k], joint[i:i + len(terms[k])]))
        i += len(terms[k])
    costs = {}
    for k in kernels:
        line = {**got[owner[k]], "fixed": got[k]["fixed"]} if owner[k] != k else got[k]
        costs[k] = LevelCosts(*(line.get(t, 0.0) for t in CASCADE_TERMS), joint[-2], joint[-1])
    for name in TILE_ROWS:
        if name not in costs and name not in LINE_OF:
            costs[name] = every
    return CascadeCostModel(**{f"regular_{t}_ms": coef.get(t, 0.0) for t in REGULAR_TERMS}, cascade=costs)


def relative_least_squares(features: list[list[float]], measured: list[float]) -> list[float]:
    """Coefficients >= 0 (a negative cost is noise) minimising the sum of squared relative errors.
    Exact: the constrained optimum is the unconstrained least squares over the columns it leaves
    nonzero, so every subset of columns is solved (2**15 for four kernels' cascade lines in session 19, 2**13 since
    session 20's SAME_KERNEL: < 1 s) and the best nonnegative solution kept. Clipping the free solution at 0
    instead leaves the other coefficients fitted to a term that is gone (a clipped fixed cost had the per-token
    cost 0.56 where 0.40 fits: tests/test_cascade_policy.py)."""
    a, y = np.array(features, dtype=float), np.array(measured, dtype=float)
    a = a / y[:, None]   # relative: each row divided by its measured time, fitted to 1
    ones = np.ones_like(y)
    best, best_residual = np.zeros(a.shape[1]), float(ones @ ones)   # all zero: every error 100%
    for mask in range(1, 2 ** a.shape[1]):
        cols = [j for j in range(a.shape[1]) if mask >> j & 1]
        coef = np.linalg.lstsq(a[:, cols], ones, rcond=None)[0]
        if (coef < 0).any():
            continue
        residual = float(np.sum((a[:, cols] @ coef - ones) ** 2))
        if residual < best_residual - 1e-12 * best_residual:
            best, best_residual = np.zeros(a.shape[1]), residual
            best[cols] = coef
    return [float(c) for c in best]


def predicted(model: CascadeCostModel, s: CostSample) -> tuple[float, float]:
    """(regular, cascade) ms the model predicts for a sample."""
    reg = model.regular_line(s.regular_tokens, s.cascade_tokens, s.rows, s.crit_tokens, s.waves)
    return reg, model.line(s.backend).ms(*cascade_features(s))


def relative_errors(model: CascadeCostModel, samples: list[CostSample]) -> list[tuple[float, float]]:
    """(regular, cascade) |predicted - measured| / measured of each sample."""
    out = []
    for s in samples:
        reg, cas = predicted(model, s)
        out.append((abs(reg - s.regular_ms) / s.regular_ms, abs(cas - s.cascade_ms) / s.cascade_ms))
    return out


class AlwaysCascade:
    """The CPU reference path: use cascade whenever anything is shared (there it is for correctness)."""

    def worth_it(self, plan, page_size: int) -> bool:
        return plan.cascade_kv_pages < plan.regular_kv_pages


# The shared levels' kernel, from scripts/sweep_shared_kernel.py on the H200 (one layer, CUDA graphs,
# Qwen3-0.6B heads; claude_docs/cascade.md has the table):
# - groups of <= 16 rows: the Triton kernel's 16-row tile (64 x 16 x 2048 tokens 0.145 ms, fa2 0.217,
#   fa3 0.282; 32 x 4 x 8192 0.266, fa2 0.409);
# - 17 rows or more: its 32-row tile (4 x 32 x 16384 0.120 ms, fa3 0.234; 1 x 128 x 32768 0.176, fa3
#   0.448; 1 x 256 x 8192 0.093, fa3 0.123), unless fa3 (without split-kv, as the graphs run it) has
#   CTAs for about half the SMs: groups x 128-row query tiles x kv heads >= 64 (16 x 64 x 2048 fa3
#   0.080 vs 0.093; 8 x 128 x 4096 0.078 vs 0.146; 1 x 1024 x 8192 0.128 vs 0.243; at 4 x 96 x 16384,
#   64 CTAs, both ~0.24; 1 x 256 x 8192, 32 CTAs, fa3 0.123 vs 0.093).
# - Session 13: fa3 with each group cut into pieces (cascade/split_level.py) where groups have many rows
#   (>= 96) but fa3 alone has fewer than 128 CTAs (groups x 128-row query tiles x q heads): 1 x 128 x
#   32768 0.087 ms (fa3 0.452, the 32-row tile 0.180), 1 x 256 x 8192 0.052, 4 x 96 x 16384 0.146 (fa3
#   0.236, the 32-row tile with its wave-filling splits 0.201); not at 4 x 32 x 16384 (0.143 against the
#   32-row tile's 0.089).
WIDE_MIN_ROWS_PER_GROUP = 17
FA3_MIN_ROWS_PER_GROUP = 64
FA3_TILE_ROWS = 128          # query rows of one fa3 CTA (FlashInfer's FA3 gives each q head its own CTAs)
FA3_MIN_CTAS = 64            # about half an H200's 132 SMs
FA3_FULL_CTAS = 128          # fa3 unsplit from here
FA3_SPLIT_MIN_ROWS = 96      # rows a group, for fa3 cut into pieces
SHARED_BACKENDS = ("triton", "triton-wide", "fa3", "fa3-split")  # the choices below, one CUDA graph each
# cascade_shared_backend's values: auto (the choice below), or one kernel for every step (fa2 only then)
SHARED_BACKEND_CHOICES = ("auto", "triton", "triton-wide", "fa2", "fa3", "fa3-split")


def reachable_shared_backends(backends: tuple, max_rows: int) -> tuple:
    """The kernels shared_level_backend can pick for a level of at most max_rows rows (a CUDA graph of
    that size needs no others): fa3 and its fp8 stand-in fa2 from FA3_MIN_ROWS_PER_GROUP rows a group, its
    pieces from FA3_SPLIT_MIN_ROWS, the 32-row tile from WIDE_MIN_ROWS_PER_GROUP. A single configured kernel
    is always kept."""
    if len(backends) == 1:
        return backends
    least = {"triton-wide": WIDE_MIN_ROWS_PER_GROUP, "fa3": FA3_MIN_ROWS_PER_GROUP,
             "fa3-split": FA3_SPLIT_MIN_ROWS, "fa2": FA3_MIN_ROWS_PER_GROUP}
    return tuple(b for b in backends if max_rows >= least.get(b, 1))


def fp8_capable(kernel: str, kv_fp8: bool) -> str:
    """`kernel`, or for an fp8 KV cache fa2 in fa3's place and the 32-row Triton tile in fa3-split's
    (FlashInfer's FA3 reads fp8 KV only with fp8 queries)."""
    if not kv_fp8:
        return kernel
    return {"fa3": "fa2", "fa3-split": "triton-wide"}.get(kernel, kernel)


def shared_level_backend(plan, num_qo_heads: int, num_kv_heads: int, kv_fp8: bool = False) -> str:
    """The shared levels' kernel for a cascade plan over a rank's heads (their GQA ratio and kv heads
    set fa3's CTA count), fa2 in fa3's place for an fp8 KV cache."""
    if getattr(plan, "shared_backend", None):  # set explicitly (CUDA-graph capture)
        return plan.shared_backend
    groups = max(plan.groups_per_level[0], 1)
    rows_per_group = plan.num_rows / groups
    if rows_per_group < WIDE_MIN_ROWS_PER_GROUP:
        return "triton"
    fa3_ctas = groups * -(-int(rows_per_group) // FA3_TILE_ROWS) * num_qo_heads
    if rows_per_group >= FA3_MIN_ROWS_PER_GROUP:
        if fa3_ctas < FA3_FULL_CTAS and rows_per_group >= FA3_SPLIT_MIN_ROWS:
            return fp8_capable("fa3-split", kv_fp8)
        if fa3_ctas >= FA3_MIN_CTAS:
            return fp8_capable("fa3", kv_fp8)
    return "triton-wide"
