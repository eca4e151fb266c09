"""Does cascade attention pay for this step? A linear model of one attention layer's time.

Regular paged decode reads every request's KV: time ~ fixed + per_token * (tokens read).
Cascade reads each shared run once per group, but launches one kernel per level plus merges and
does more work per KV token (a group's queries all meet the shared KV): time ~ fixed_per_level
* levels + per_token * (tokens read by the plan) + per_qk * (query rows x shared tokens).
Coefficients are fitted to measurements on the H200 (claude_docs/cascade.md has the table and the
command); the engine uses cascade only when the model predicts it faster by a margin.
"""
from dataclasses import dataclass


def shared_qk_pages(plan) -> int:
    """Sum over shared groups of (query rows x pages): the extra work of batching a group's queries."""
    total = 0
    for level in plan.levels[:-1]:
        rows, pages = level.rows_and_pages()
        total += int((rows * pages).sum())
    return total


@dataclass(frozen=True)
class CascadeCostModel:
    # Fitted by scripts/bench_kernels.py --only cascade on the H200 (Qwen3-0.6B heads, page 16, CUDA
    # graphs, cascade as the engine runs it: shared levels on the Triton kernel or fa3, the per-request
    # level on the decode kernel); table in claude_docs/cascade.md. Regular decode's per-token cost is
    # low because shared pages hit L2 across requests.
    regular_fixed_ms: float = 0.0781
    regular_per_token_ms: float = 4.25e-7
    cascade_fixed_ms: float = 0.0143        # per level (a launch, a plan, a merge)
    cascade_per_token_ms: float = 8.92e-7
    cascade_per_qk_ms: float = 1.30e-8      # per (query row x shared KV token)
    margin: float = 0.9                     # cascade must be predicted >= 10% faster

    def regular_ms(self, plan, page_size: int) -> float:
        return self.regular_fixed_ms + self.regular_per_token_ms * plan.regular_kv_pages * page_size

    def cascade_ms(self, plan, page_size: int) -> float:
        return (self.cascade_fixed_ms * len(plan.levels)
                + self.cascade_per_token_ms * plan.cascade_kv_pages * page_size
                + self.cascade_per_qk_ms * shared_qk_pages(plan) * page_size)

    def worth_it(self, plan, page_size: int) -> bool:
        return self.cascade_ms(plan, page_size) < self.margin * self.regular_ms(plan, page_size)


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
WIDE_MIN_ROWS_PER_GROUP = 17
FA3_MIN_ROWS_PER_GROUP = 64
FA3_TILE_ROWS = 128          # query rows (requests x GQA heads) of one fa3 CTA
FA3_MIN_CTAS = 64            # about half an H200's 132 SMs
SHARED_BACKENDS = ("triton", "triton-wide", "fa3")  # the choices below, one CUDA graph each


def shared_level_backend(plan, num_qo_heads: int, num_kv_heads: int) -> str:
    """The shared levels' kernel for a cascade plan over a rank's heads (their GQA ratio and kv heads
    set fa3's CTA count)."""
    if getattr(plan, "shared_backend", None):  # set explicitly (CUDA-graph capture)
        return plan.shared_backend
    groups = max(plan.groups_per_level[0], 1)
    rows_per_group = plan.num_rows / groups
    if rows_per_group < WIDE_MIN_ROWS_PER_GROUP:
        return "triton"
    gqa = num_qo_heads // num_kv_heads
    fa3_ctas = groups * -(-int(rows_per_group * gqa) // FA3_TILE_ROWS) * num_kv_heads
    if rows_per_group >= FA3_MIN_ROWS_PER_GROUP and fa3_ctas >= FA3_MIN_CTAS:
        return "fa3"
    return "triton-wide"
