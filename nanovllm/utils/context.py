"""The current step's inputs that layers need (attention metadata, which rows get logits).

Set by the model runner once per step, read by every layer: plan once, use in all layers."""
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Context:
    is_prefill: bool = False
    attn: Any = None                              # the attention backend's plan for this step
    logits_indices: torch.Tensor | None = None    # rows whose logits are needed


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(**kwargs):
    global _CONTEXT
    _CONTEXT = Context(**kwargs)


def reset_context():
    global _CONTEXT
    _CONTEXT = Context()
