import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.fused import flashinfer_ops, use_fused


class SiluAndMul(nn.Module):
    """silu(gate) * up over the packed gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            return flashinfer_ops().activation.silu_and_mul(x)
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
