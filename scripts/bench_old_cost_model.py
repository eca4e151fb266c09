"""bench.py with the cascade cost model as it was before session 8's refit (98fc0ce: session 3's coefficients,
regular decode = 0.0781 ms + 4.25e-7 ms a KV token, one cascade line for every shared-level kernel), for an
A/B of the refit on one machine (claude_docs/performance.md, session 10):

    python scripts/bench_old_cost_model.py --workload w2 --enable-cascade-attention   # old coefficients
    python bench.py --workload w2 --enable-cascade-attention                          # today's

Takes bench.py's arguments."""
import dataclasses
import sys

import nanovllm.cascade.cost_model as cm
import nanovllm.cascade.policy as policy

_new = policy.cost_model_for


def _old(config):
    return dataclasses.replace(_new(config), regular_fixed_ms=0.0781, regular_per_token_ms=4.25e-7,
                               regular_per_unique_ms=0.0, regular_per_row_ms=0.0,
                               cascade={k: cm.SESSION3_COSTS for k in ("triton", "triton-wide", "fa3", "fa2")})


if __name__ == "__main__":
    policy.cost_model_for = _old
    from nanovllm.benchmark import main
    main(sys.argv[1:])
