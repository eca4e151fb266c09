"""RMSNorm: the float32 reference and FlashInfer's fused kernels; under tensor parallelism also the
sum over ranks of the layer before it (`reduce`: one all-reduce + residual + RMSNorm kernel where the
custom all-reduce has it, distributed/custom_all_reduce.py)."""
import torch
from torch import nn

from nanovllm.distributed.parallel_state import all_reduce, all_reduce_add_rmsnorm
from nanovllm.layers.fused import flashinfer_ops, use_fused


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; with `residual` it adds first and returns the new residual too.
    With `reduce`, x is this rank's partial sum (a row-parallel layer's deferred output,
    layers/linear.py defer_reduce) and the sum over ranks is taken first."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, reduce: bool = False):
        if reduce:
            if residual is not None:
                fused = all_reduce_add_rmsnorm(x, residual, self.weight, self.eps)
                if fused is not None:
                    return fused
            x = all_reduce(x)
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
