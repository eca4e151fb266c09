"""Linear layers, tensor parallel when the process belongs to a group (distributed/parallel_state.py).

Column parallel (`tp_dim=0`): each rank holds a slice of the output features; no communication.
Row parallel (`tp_dim=1`): each rank holds a slice of the input features and the partial outputs
are summed with one all-reduce (attention's o_proj and the MLP's down_proj: two a layer). A layer
whose `reduce_output` is False returns its partial sum and leaves the all-reduce to the RMSNorm after
it (models/llama.py: all-reduce + residual add + RMSNorm, one kernel where the custom all-reduce has it).
PackedLinear stores several projections as one matrix (q/k/v, gate/up), each one column parallel:
a rank holds its own rows of every projection. Every weight_loader takes the full checkpoint tensor
and copies this rank's slice of it. The product itself is layers/decode_gemm.py's (cuBLAS, or a small-M kernel for
a decode step's few rows). Under `meta_weights()` the weights are built on the meta device (no
memory): a quantized checkpoint swaps the layers for its own (layers/awq.py)."""
import contextlib

import torch
from torch import nn

from nanovllm.distributed.parallel_state import all_reduce, tp_rank, tp_size
from nanovllm.layers.decode_gemm import linear


_META_WEIGHTS = False


@contextlib.contextmanager
def meta_weights():
    """Linear weights built in this block live on the meta device until materialize_weight()."""
    global _META_WEIGHTS
    before, _META_WEIGHTS = _META_WEIGHTS, True
    try:
        yield
    finally:
        _META_WEIGHTS = before


def _split(size: int, what: str) -> int:
    n = tp_size()
    if size % n:
        raise ValueError(f"{what} ({size}) is not divisible by tensor_parallel_size={n}")
    return size // n


class Linear(nn.Module):
    """y = x W^T (+ b); tp_dim None (replicated), 0 (column parallel) or 1 (row parallel)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_dim: int | None = None):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_size = tp_size()  # fixed at construction: a layer built without a group never joins one
        self.reduce_output = True  # row parallel: False leaves the sum over ranks to the caller (defer_reduce)
        if tp_dim == 0:
            output_size = _split(output_size, "output features")
        elif tp_dim == 1:
            input_size = _split(input_size, "input features")
        self.weight = nn.Parameter(torch.empty(output_size, input_size, device="meta" if _META_WEIGHTS else None))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def materialize_weight(self):
        """Allocate a weight built under meta_weights() (current default device and dtype)."""
        if self.weight.is_meta:
            self.weight = nn.Parameter(torch.empty(self.weight.shape))
            self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        dim = self.tp_dim if param is self.weight or self.tp_dim == 0 else None  # a row-parallel bias is whole
        expected = list(param.shape)
        if dim is not None:
            expected[dim] *= self.tp_size
        if tuple(loaded.shape) != tuple(expected):
            raise ValueError(f"shape mismatch: parameter {tuple(expected)} vs checkpoint {tuple(loaded.shape)}")
        if dim is not None and self.tp_size > 1:
            loaded = loaded.narrow(dim, tp_rank() * param.shape[dim], param.shape[dim])
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_dim == 1 and self.tp_size > 1:
            y = linear(x, self.weight)
            if not self.reduce_output:
                return y
            y = all_reduce(y)
            return y + self.bias if self.bias is not None else y
        return linear(x, self.weight, self.bias)


def defer_reduce(linear) -> bool:
    """Leave a row-parallel layer's sum over ranks to its caller (the RMSNorm after it); True if it
    now returns partial sums. Only layers without a bias (a bias is added once, after the sum)."""
    if getattr(linear, "tp_dim", None) != 1 or linear.tp_size <= 1 or linear.bias is not None:
        return False
    linear.reduce_output = False
    return True


class PackedLinear(Linear):
    """Several projections as one matrix. `shards` maps each checkpoint shard id to (rows on this
    rank, first row of the checkpoint tensor they come from, rows of the checkpoint tensor)."""

    def __init__(self, input_size: int, shards: dict, bias: bool = False):
        super().__init__(input_size, sum(rows for rows, _, _ in shards.values()), bias)
        self.shard_offsets = {}  # shard id -> (offset in our matrix, rows, source row, checkpoint rows)
        offset = 0
        for shard_id, (rows, source, full) in shards.items():
            self.shard_offsets[shard_id] = (offset, rows, source, full)
            offset += rows

    @classmethod
    def column_split(cls, input_size: int, sizes: dict, bias: bool = False) -> "PackedLinear":
        """Each projection (full size `sizes[id]`) split evenly across ranks, e.g. gate/up."""
        shards = {}
        for shard_id, size in sizes.items():
            rows = _split(size, f"projection {shard_id!r}")
            shards[shard_id] = (rows, tp_rank() * rows, size)
        return cls(input_size, shards, bias)

    @classmethod
    def qkv(cls, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> "PackedLinear":
        """q/k/v: this rank's query heads, and its KV heads (replicated when ranks outnumber them)."""
        n, r = tp_size(), tp_rank()
        q_heads = _split(num_heads, "attention heads")
        kv_heads, kv_first = local_kv_heads(num_kv_heads, n, r)
        kv = (kv_heads * head_dim, kv_first * head_dim, num_kv_heads * head_dim)
        return cls(hidden_size, {"q": (q_heads * head_dim, r * q_heads * head_dim, num_heads * head_dim),
                                 "k": kv, "v": kv}, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        offset, rows, source, full = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, rows)
        if loaded.shape != (full,) + target.shape[1:]:
            raise ValueError(f"shape mismatch for shard {shard_id}: checkpoint {tuple(loaded.shape)}, expected "
                             f"{(full,) + tuple(target.shape[1:])}")
        target.copy_(loaded.narrow(0, source, rows))


def local_kv_heads(num_kv_heads: int, n: int, rank: int) -> tuple[int, int]:
    """(KV heads on this rank, index of its first): split when n divides them, else each rank
    holds the one head its query heads read (n must then be a multiple of the KV heads)."""
    if num_kv_heads % n == 0:
        per = num_kv_heads // n
        return per, rank * per
    if n % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={n} neither divides nor is a multiple of the "
                         f"{num_kv_heads} KV heads")
    return 1, rank * num_kv_heads // n
