"""Does cascade attention pay for this step? A linear model of one attention layer's time.

Regular paged decode reads every request's KV: time ~ fixed + per_token * (tokens read) + per_unique *
(distinct tokens: what the plan reads once, the shared pages' first reads; the repeats hit L2 and
cost less) + per_row * (requests).
Cascade reads each shared run once per group, but launches one kernel per level plus merges and
does more work per KV token (a group's queries all meet the shared KV): time ~ fixed_per_level
* levels + per_token * (tokens read by the plan) + per_qk * (query rows x shared tokens), with
coefficients of their own for each shared-level kernel (the Triton tiles stream bytes, fa3 is
tensor-core bound: one line cannot fit both). Coefficients are fitted to measurements on the H200
(`python scripts/bench_kernels.py --only cascade` measures a training grid and a held-out grid,
fits with `fit_cost_model` and prints the held-out errors; claude_docs/cascade.md has the tables);
the engine uses cascade only when the model predicts it faster by a margin. The fit is least squares
on relative errors (each sample weighted by 1 / its measured time): the decision compares two times
of one step, so a 20% error on a 0.04 ms step matters as much as one on a 4 ms step.

Session 8 (H200, 56 training + 16 held-out shapes, claude_docs/cascade.md): plain least squares with
the regular line on tokens read alone gave held-out errors of median 13.7% / max 128% (regular) and
11.7% / 31.8% (cascade); relative least squares with the distinct-token and per-request terms,
refitted on the same measurements (the defaults below), 4.6% / 34% (regular) and 10.0% / 25%
(cascade: 14.0% on the Triton 16-row tile's 11 shapes, 7.1% on the 32-row tile's 5), and the
model's choice matched the measured faster one on 14 of 16 held-out and 49 of 56 training shapes
(37 of 56 before).

Session 13 (same H200 grid, re-measured after the Triton tiles' split counts began to fill whole waves:
claude_docs/data/cascade_grid_h200_s13.md; the defaults below are its fit): held-out errors median
5.8% / max 34% (regular) and 3.8% / 24% (cascade); the choice matched the measured faster one on 16 of
16 held-out and 51 of 56 training shapes.
"""
from dataclasses import dataclass, field

import numpy as np


def shared_qk_pages(plan) -> int:
    """Sum over shared groups of (query rows x pages): the extra work of batching a group's queries."""
    total = 0
    for level in plan.levels[:-1]:
        rows, pages = level.rows_and_pages()
        total += int((rows * pages).sum())
    return total


@dataclass(frozen=True)
class CostSample:
    """One measured decode layer: the plan's features (tokens, not pages), its shared-level kernel,
    and the two measured times."""
    backend: str
    levels: int
    regular_tokens: int
    cascade_tokens: int
    qk_tokens: int
    regular_ms: float
    cascade_ms: float
    rows: int = 1            # query rows (requests at decode)

    @classmethod
    def of(cls, plan, page_size: int, backend: str, regular_ms: float, cascade_ms: float) -> "CostSample":
        return cls(backend, len(plan.levels), plan.regular_kv_pages * page_size, plan.cascade_kv_pages * page_size,
                   shared_qk_pages(plan) * page_size, regular_ms, cascade_ms, plan.num_rows)


@dataclass(frozen=True)
class LevelCosts:
    fixed_ms: float         # per level (a launch, a plan, a merge)
    per_token_ms: float     # per KV token the plan reads
    per_qk_ms: float        # per (query row x shared KV token)

    def ms(self, levels: int, cascade_tokens: int, qk_tokens: int) -> float:
        return self.fixed_ms * levels + self.per_token_ms * cascade_tokens + self.per_qk_ms * qk_tokens


# Session 13's fit on the H200 (Qwen3-0.6B heads, page 16, CUDA graphs; scripts/bench_kernels.py --only
# cascade; the grid is stored in claude_docs/data/cascade_grid_h200_s13.md and scripts/refit_cost_model.py
# refits it: these are that fit, checked by tests/test_cascade_policy.py). fa2 had no training shape of
# its own (the engine picks it only for an fp8 cache or when configured): the all-kernel line.
# SESSION3_COSTS, session 3's one line for every kernel, serves a kernel the table does not name.
SESSION3_COSTS = LevelCosts(0.0143, 8.92e-7, 1.30e-8)
H200_COSTS = {"triton": LevelCosts(0.01105, 9.829e-7, 0.0),
              "triton-wide": LevelCosts(0.01419, 7.675e-7, 1.459e-8),
              "fa3": LevelCosts(0.0, 1.059e-6, 1.190e-8),
              "fa2": LevelCosts(0.01148, 9.219e-7, 1.179e-8)}


# fa3 cut into pieces runs fa3's FLOPs on more SMs: until measured on the grid it takes fa3's line
# (an upper bound where it is picked: its levels are faster than fa3's).
LINE_OF = {"fa3-split": "fa3"}


def _default_costs() -> dict:
    return dict(H200_COSTS)


@dataclass(frozen=True)
class CascadeCostModel:
    # Regular decode's per-token cost is low because shared pages hit L2 across requests; its first
    # read of a page costs per_unique more. Session 13's refit (module doc).
    regular_fixed_ms: float = 0.01267
    regular_per_token_ms: float = 4.037e-7
    regular_per_unique_ms: float = 2.966e-7
    regular_per_row_ms: float = 1.294e-4
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

    def regular_ms(self, plan, page_size: int) -> float:
        return self.regular_line(plan.regular_kv_pages * page_size, plan.cascade_kv_pages * page_size, plan.num_rows)

    def regular_line(self, tokens: int, unique_tokens: int, rows: int) -> float:
        return (self.regular_fixed_ms + self.regular_per_token_ms * tokens + self.regular_per_unique_ms * unique_tokens
                + self.regular_per_row_ms * rows)

    def cascade_ms(self, plan, page_size: int) -> float:
        kernel = self.backend(plan)
        costs = self.cascade.get(LINE_OF.get(kernel, kernel), SESSION3_COSTS)
        return costs.ms(len(plan.levels), plan.cascade_kv_pages * page_size, shared_qk_pages(plan) * page_size)

    def worth_it(self, plan, page_size: int) -> bool:
        return self.cascade_ms(plan, page_size) < self.margin * self.regular_ms(plan, page_size)


def fit_cost_model(samples: list[CostSample], min_samples: int = 4) -> CascadeCostModel:
    """Least squares: the regular line over every sample; the cascade line per shared-level kernel
    over its samples (a kernel with fewer than min_samples keeps the all-kernel fit). Coefficients are
    constrained to >= 0 (a negative cost is noise; `relative_least_squares`)."""
    reg = relative_least_squares([[1.0, s.regular_tokens, s.cascade_tokens, s.rows] for s in samples],
                                 [s.regular_ms for s in samples])

    def line(subset):
        return LevelCosts(*relative_least_squares([[s.levels, s.cascade_tokens, s.qk_tokens] for s in subset],
                                                  [s.cascade_ms for s in subset]))
    every = line(samples)
    costs = _default_costs()
    for name in costs:
        subset = [s for s in samples if s.backend == name]
        costs[name] = line(subset) if len(subset) >= min_samples else every
    return CascadeCostModel(regular_fixed_ms=reg[0], regular_per_token_ms=reg[1], regular_per_unique_ms=reg[2],
                            regular_per_row_ms=reg[3], cascade=costs)


def relative_least_squares(features: list[list[float]], measured: list[float]) -> list[float]:
    """Coefficients >= 0 (a negative cost is noise) minimising the sum of squared relative errors.
    Exact: the constrained optimum is the unconstrained least squares over the columns it leaves
    nonzero, so every subset of columns is solved (2**4 at most here) and the best nonnegative
    solution kept. Clipping the free solution at 0 instead leaves the other coefficients fitted to a
    term that is gone (a clipped fixed cost had the per-token cost 0.56 where 0.40 fits:
    tests/test_cascade_policy.py)."""
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


def relative_errors(model: CascadeCostModel, samples: list[CostSample]) -> list[tuple[float, float]]:
    """(regular, cascade) |predicted - measured| / measured of each sample."""
    out = []
    for s in samples:
        reg = model.regular_line(s.regular_tokens, s.cascade_tokens, s.rows)
        cas = model.cascade.get(s.backend, SESSION3_COSTS).ms(s.levels, s.cascade_tokens, s.qk_tokens)
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
