"""bench.py with the cascade cost model as it was before session 8's refit (98fc0ce: session 3's coefficients,
regular decode = 0.0781 ms + 4.25e-7 ms a KV token, one cascade line for every shared-level kernel), for an
A/B of the refit on one machine (claude_docs/performance.md, session 10):

    python scripts/bench_old_cost_model.py --workload w2 --enable-cascade-attention   # old coefficients
    python bench.py --workload w2 --enable-cascade-attention                          # today's

Takes bench.py's arguments."""
import dataclasses
import sys

import nanovllm.cascade.policy as policy
from nanovllm.cascade.cost_model import CascadeCostModel, shared_qk_pages

_new = policy.cost_model_for


@dataclasses.dataclass(frozen=True)
class Session3CostModel(CascadeCostModel):
    """Regular decode 0.0781 ms + 4.25e-7 ms a KV token read; cascade 0.0143 ms a level + 8.92e-7 ms a
    token the plan reads + 1.30e-8 ms a (query row x shared token), for every shared-level kernel."""

    def predict(self, plan, page_size: int) -> tuple[float, float]:
        return (0.0781 + 4.25e-7 * plan.regular_kv_pages * page_size,
                0.0143 * len(plan.levels) + 8.92e-7 * plan.cascade_kv_pages * page_size
                + 1.30e-8 * shared_qk_pages(plan) * page_size)


def _old(config):
    new = _new(config)
    return Session3CostModel(num_qo_heads=new.num_qo_heads, num_kv_heads=new.num_kv_heads,
                             shared_backend=new.shared_backend, kv_fp8=new.kv_fp8)


if __name__ == "__main__":
    policy.cost_model_for = _old
    from nanovllm.benchmark import main
    main(sys.argv[1:])
