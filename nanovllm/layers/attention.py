import torch
from torch import nn

from nanovllm.utils.context import get_context


class Attention(nn.Module):
    """Paged attention over this layer's KV cache, through the backend planned for the step.
    k_scale / v_scale: the layer's per-tensor fp8 KV scales (attention/kv_quant.py), python floats set
    at load (a checkpoint's calibrated scales) and 1.0 for a cache in the model dtype."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.k_cache = self.v_cache = torch.tensor([])  # bound by the model runner
        self.k_scale = self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = get_context().attn.forward(q, k, v, self.k_cache, self.v_cache, self.k_scale, self.v_scale)
        return out.reshape(-1, self.num_heads * self.head_dim)

    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                    q_norm: nn.Module | None, k_norm: nn.Module | None) -> torch.Tensor:
        """The GPU path from the packed projection: one Triton kernel norms (when given) and rotates
        q and k and writes k and v to the cache, then attention runs over the cache."""
        from nanovllm.layers.qk_norm_rope import qk_norm_rope_store  # Triton: GPU machines only
        backend = get_context().attn
        slots = backend.slot_mapping  # None in the memory warm-up: no cache yet
        q = qk_norm_rope_store(qkv, positions, cos_sin, q_norm.weight if q_norm is not None else None,
                               k_norm.weight if k_norm is not None else None,
                               q_norm.eps if q_norm is not None else 0.0, self.num_heads, self.num_kv_heads,
                               self.head_dim, slots, self.k_cache, self.v_cache, self.k_scale, self.v_scale)
        return backend.attend(q, self.k_cache, self.v_cache, self.k_scale,
                              self.v_scale).reshape(-1, self.num_heads * self.head_dim)
