import torch
from torch import nn

from nanovllm.utils.context import get_context


class Attention(nn.Module):
    """Paged attention over this layer's KV cache, through the backend planned for the step."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.k_cache = self.v_cache = torch.tensor([])  # bound by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = get_context().attn.forward(q, k, v, self.k_cache, self.v_cache)
        return out.reshape(-1, self.num_heads * self.head_dim)
