"""Neox-style rotary embedding: one cos/sin table per model, built once, with the model's rope scaling.

The one owner of rope settings: `rope_settings(config)` reads theta and the scaling from a Hugging
Face config in either spelling (transformers 5's `rope_parameters`, or the older top-level
`rope_theta` + `rope_scaling`), and `inverse_frequencies` turns them into the per-pair frequencies.
Scaling types: "default" (none) and "llama3" (Llama 3.1/3.2: low frequencies divided by `factor`,
high ones kept, a smooth blend between). Anything else is refused when the engine is created
(models/llama.py's check_config)."""
import math

import torch
from torch import nn

from nanovllm.layers.fused import flashinfer_ops, use_fused

ROPE_TYPES = ("default", "llama3")  # rope scaling types the table implements
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_settings(config) -> tuple[float, dict | None]:
    """(theta, scaling) from an HF config; scaling is None for plain RoPE, else a dict with "rope_type"."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})  # older spelling (transformers < 5 configs)
    merged = {**scaling, **params}
    theta = merged.pop("rope_theta", None)
    if theta is None:
        theta = getattr(config, "rope_theta", None)
    theta = 10000.0 if theta is None else float(theta)
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return theta, None
    merged["rope_type"] = kind
    merged.pop("type", None)
    return theta, merged


def check_rope(config) -> None:
    """ValueError for a scaling the table does not implement (or a llama3 scaling missing a field)."""
    _, scaling = rope_settings(config)
    if scaling is None:
        return
    kind = scaling["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    missing = [f for f in LLAMA3_FIELDS if scaling.get(f) is None]
    if missing:
        raise ValueError(f"llama3 rope scaling is missing {', '.join(missing)}")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """float32 [head_dim / 2]: theta^(-2i / head_dim), rescaled as `scaling` says."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if scaling is None:
        return inv_freq
    # llama3: a pair whose wavelength exceeds original_len / low_freq_factor (it never completed a
    # turn in pre-training's context) is slowed down by `factor`; one shorter than original_len /
    # high_freq_factor is kept; in between, the two are blended linearly in original_len / wavelength.
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    turns = original * inv_freq / (2 * math.pi)  # turns of each pair over the original context
    blend = ((turns - low) / (high - low)).clamp(0.0, 1.0)  # 0: low frequency (scaled), 1: high (kept)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a cos/sin table for every position, built once."""

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, base, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_sin", torch.stack((emb.cos(), emb.sin())), persistent=False)
        # FlashInfer's layout: [position, cos of each frequency | sin of each frequency], float32.
        self.register_buffer("cos_sin_half", torch.cat((freqs.cos(), freqs.sin()), dim=-1).float(), persistent=False)
        self.head_dim = head_dim

    @classmethod
    def from_config(cls, config, head_dim: int) -> "RotaryEmbedding":
        theta, scaling = rope_settings(config)
        return cls(head_dim, config.max_position_embeddings, theta, scaling)

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
