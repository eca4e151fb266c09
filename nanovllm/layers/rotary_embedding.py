import torch
from torch import nn

from nanovllm.layers.fused import flashinfer_ops, use_fused


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a cos/sin table for every position, built once."""

    def __init__(self, head_dim: int, max_position: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_sin", torch.stack((emb.cos(), emb.sin())), persistent=False)
        # FlashInfer's layout: [position, cos of each frequency | sin of each frequency], float32.
        self.register_buffer("cos_sin_half", torch.cat((freqs.cos(), freqs.sin()), dim=-1).float(), persistent=False)
        self.head_dim = head_dim

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]
        if use_fused(q):
            q, k = q.contiguous(), k.contiguous()
            flashinfer_ops().apply_rope_with_cos_sin_cache_inplace(
                positions, q.view(len(q), -1), k.view(len(k), -1), self.head_dim, self.cos_sin_half, is_neox=True)
            return q, k
        cos, sin = self.cos_sin[:, positions].unsqueeze(2)
        q_out = q.float() * cos + _rotate_half(q.float()) * sin
        k_out = k.float() * cos + _rotate_half(k.float()) * sin
        return q_out.to(q.dtype), k_out.to(k.dtype)

