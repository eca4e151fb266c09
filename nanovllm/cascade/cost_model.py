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


# Shared levels with many query rows per group are compute-bound and run faster on fa3 (Hopper's
# wgmma); many small groups are memory-bound and run faster on our Triton kernel (cascade/
# shared_kernel.py), then fa2. Measured per layer, 1024 rows: 1 group of 8192 tokens fa2 0.712 ms / fa3
# 0.387; 8 x 128 rows fa2 0.522 / fa3 0.329; 64 x 16 rows fa2 0.453 / fa3 0.539 (with the per-request
# level); shared level alone, 64 x 16 rows x 2048: fa2 0.215, Triton 0.146; 16 x 64 x 2048: fa2
# 0.110, Triton 0.117 (scripts/bench_kernels.py --only levels, --only triton-shared).
FA3_MIN_ROWS_PER_GROUP = 64
SHARED_BACKENDS = ("triton", "fa3")  # the choices below, one CUDA graph each


def shared_level_backend(plan) -> str:
    if getattr(plan, "shared_backend", None):  # set explicitly (CUDA-graph capture)
        return plan.shared_backend
    rows_per_group = plan.num_rows / max(plan.groups_per_level[0], 1)
    return "fa3" if rows_per_group >= FA3_MIN_ROWS_PER_GROUP else "triton"
