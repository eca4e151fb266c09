"""Multi-level cascade attention: planner (which pages groups of requests share) and reference math."""
from .planner import CascadeLevel, CascadePlan, plan_cascade
from .reference import (
    cascade_attention,
    dense_attention_reference,
    merge_state,
    merge_state_in_place,
    paged_attention_with_lse,
)

__all__ = [
    "CascadeLevel",
    "CascadePlan",
    "plan_cascade",
    "cascade_attention",
    "dense_attention_reference",
    "merge_state",
    "merge_state_in_place",
    "paged_attention_with_lse",
]
