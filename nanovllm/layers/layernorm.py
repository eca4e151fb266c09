import torch
from torch import nn

from nanovllm.layers.fused import flashinfer_ops, use_fused


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; with `residual` it adds first and returns the new residual too."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if use_fused(x):
            fi = flashinfer_ops()
            if residual is None:
                shape = x.shape  # q/k norms see [tokens, heads, head_dim] views: normalize rows
                return fi.rmsnorm(x.reshape(-1, shape[-1]), self.weight, self.eps).view(shape)
            fi.fused_add_rmsnorm(x, residual, self.weight, self.eps)  # in place: residual += x; x = norm
            return x, residual
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
