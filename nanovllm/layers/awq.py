"""AWQ int4 linear layers, and the pass that puts them in a model (format: layers/awq_format.py).

`quantize_linears(model, quant)` replaces every Linear / PackedLinear (layers/linear.py) of a model
built under `linear.meta_weights()` with an AWQLinear of the same split, except the modules the
checkpoint keeps dense (modules_to_not_convert), whose weights it allocates. Embeddings and the LM head
are not Linear modules and stay dense, as AutoAWQ leaves them. Mixture-of-experts experts are not
Linears either: they stay stacked dense tensors, filled from the checkpoint's AWQ tensors by
dequantizing at load (layers/moe.py, Experts.expect_awq: 16 bits a weight on the GPU, no int4 kernel).

An AWQLinear holds the checkpoint's tensors as they are (qweight, qzeros, fp16 scales, bias) and
loads them through the regular loader (utils/loader.py): packed q/k/v and gate/up shards concatenate
along the output dimension, which is /8 in qweight/qzeros; under tensor parallelism a column-parallel
rank takes its output columns (whole words: multiples of 8), a row-parallel rank its input rows
(whole groups), checked when the engine is created (awq_format.check_parallel).

forward: on CUDA a W4A16 GEMM: by default (NANOVLLM_AWQ_KERNEL=auto or kpack) layers/awq_kpack.py on
the weights repacked along K by `prepare_kernels` at load (the AWQ words and zeros are then dropped: the
same int4 bytes, before the KV cache takes the free memory); the AWQ-layout kernels
(layers/awq_gemm.awq_matmul, layers/awq_skinny.py) for layers whose K or group size cannot be k-packed or
when chosen; gemlite (layers/awq_gemlite.py) when chosen, with its own copy of the weights; on CPU
the weight is dequantized on each call and F.linear runs in the model dtype. Per call, not once at
load: CPU is the reference path, and this keeps one copy of the weights (the checkpoint's, 4 bits
each) with nothing derived to keep in sync; at the tiny test shapes the unpack costs less than the
matmul."""
import torch
from torch import nn

from nanovllm.distributed.parallel_state import all_reduce, tp_rank
from nanovllm.layers import awq_gemlite, awq_gemm, awq_kpack
from nanovllm.layers.awq_format import PACK, AWQConfig, dequantize
from nanovllm.layers.linear import Linear, PackedLinear
from nanovllm.layers.moe import EXPERT_PROJECTIONS, Experts

# parameter -> (output dim, output units per element, input rows per element or 0: no input dim)
_LAYOUT = {"qweight": (1, PACK, 1), "qzeros": (1, PACK, None), "scales": (1, 1, None), "bias": (0, 1, 0)}


class AWQLinear(nn.Module):
    """A Linear's split (tp_dim, shards) over AWQ tensors. `shards` maps a checkpoint shard id (None for
    a plain layer) to (offset in our columns, columns, first checkpoint column, checkpoint columns)."""

    def __init__(self, in_local: int, in_source: int, in_full: int, shards: dict, tp_dim, tp_size: int,
                 group_size: int, bias: bool, name: str):
        super().__init__()
        out_local = sum(cols for _, cols, _, _ in shards.values())
        if in_local % group_size:
            raise ValueError(f"{name}: {in_local} input rows per rank is not a multiple of AWQ group_size "
                             f"{group_size}")
        for cols in (c for shard in shards.values() for c in shard):
            if cols % PACK:
                raise ValueError(f"{name}: an output slice of {cols} columns is not a multiple of {PACK} "
                                 f"(one packed int32 word)")
        self.tp_dim, self.tp_size, self.group_size = tp_dim, tp_size, group_size
        self.reduce_output = True   # as Linear's (layers/linear.py)
        self.in_source, self.in_full, self.shards = in_source, in_full, shards
        self.in_features, self.out_features = in_local, out_local
        groups = in_local // group_size
        self.qweight = nn.Parameter(torch.empty(in_local, out_local // PACK, dtype=torch.int32), requires_grad=False)
        self.qzeros = nn.Parameter(torch.empty(groups, out_local // PACK, dtype=torch.int32), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(groups, out_local, dtype=torch.float16), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False) if bias else None
        for pname in _LAYOUT:
            param = getattr(self, pname)
            if param is not None:
                param.weight_loader = self.weight_loader
                param.awq_role = pname
        self.kernel = awq_gemm.kernel_choice()
        self._gemlite = None
        self._kpack = None   # (words, zeros, slice, SMs) once prepare_kpack has run

    @classmethod
    def replacing(cls, linear: Linear, group_size: int, name: str) -> "AWQLinear":
        """An AWQLinear with `linear`'s shapes and tensor-parallel split (its weight may be on meta)."""
        out_local, in_local = linear.weight.shape
        n, r = linear.tp_size, tp_rank() if linear.tp_size > 1 else 0
        if isinstance(linear, PackedLinear):
            shards = dict(linear.shard_offsets)
        elif linear.tp_dim == 0:
            shards = {None: (0, out_local, r * out_local, out_local * n)}
        else:
            shards = {None: (0, out_local, 0, out_local)}
        row = linear.tp_dim == 1
        layer = cls(in_local, r * in_local if row else 0, in_local * n if row else in_local, shards,
                    linear.tp_dim, n, group_size, linear.bias is not None, name)
        layer.reduce_output = linear.reduce_output   # a deferred sum stays deferred (layers/linear.py)
        return layer

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        out_dim, unit, in_unit = _LAYOUT[param.awq_role]
        if in_unit is None:
            in_unit = self.group_size
        if shard_id not in self.shards:
            raise ValueError(f"AWQ layer has no shard {shard_id!r} (shards: {list(self.shards)})")
        offset, cols, source, full = self.shards[shard_id]
        expected = [full // unit]
        if in_unit:
            expected.insert(0, self.in_full // in_unit)
        if list(loaded.shape) != expected:
            raise ValueError(f"AWQ {param.awq_role}{'' if shard_id is None else f' shard {shard_id!r}'}: checkpoint "
                             f"shape {tuple(loaded.shape)}, expected {tuple(expected)}")
        src = loaded.narrow(out_dim, source // unit, cols // unit)
        if in_unit:
            src = src.narrow(0, self.in_source // in_unit, self.in_features // in_unit)
        param.data.narrow(out_dim, offset // unit, cols // unit).copy_(src)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W^T without bias, all-reduce or anything else."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._kpack is not None:
            words, zeros, slice, sms = self._kpack
            y = awq_kpack.kpacked_matmul(x2, words, zeros, self.scales, self.group_size, slice, sms)
        elif not x.is_cuda or self.kernel == "dequant":
            w = dequantize(self.qweight, self.qzeros, self.scales, self.group_size).to(x.dtype)
            y = x2 @ w
        elif self.kernel == "gemlite" and x2.shape[0] <= awq_gemlite.MAX_M:
            if self._gemlite is None:
                self.prepare_gemlite(x.dtype)
            y = self._gemlite(x2)
        elif self.kernel == "triton-tile":
            y = awq_gemm.awq_gemm(x2, self.qweight, self.qzeros, self.scales, self.group_size)
        else:
            y = awq_gemm.awq_matmul(x2, self.qweight, self.qzeros, self.scales, self.group_size)
        return y.view(*shape[:-1], self.out_features)

    def prepare_kpack(self) -> None:
        """Repack the AWQ words along K (layers/awq_kpack.py) and drop the checkpoint's words and zeros."""
        slice = awq_kpack.layer_slice(self.in_features, self.group_size)
        words, zeros = awq_kpack.kpack(self.qweight, self.qzeros, self.scales, self.group_size, slice)
        self._kpack = (words, zeros, slice, awq_gemm._num_sms(words.device))
        self.qweight = self.qzeros = None   # the repacked copy replaces them (this path only)

    def prepare_gemlite(self, dtype: torch.dtype) -> None:
        """Repack the weights for gemlite (layers/awq_gemlite.py) for `dtype` activations."""
        self._gemlite = awq_gemlite.GemliteAWQ(self.qweight, self.qzeros, self.scales, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.tp_dim == 1 and self.tp_size > 1:
            if not self.reduce_output:
                return y
            y = all_reduce(y)
        return y + self.bias if self.bias is not None else y


def checkpoint_names(name: str, packed_modules_mapping: dict) -> list[str]:
    """The checkpoint module names behind our module `name` (q/k/v_proj behind qkv_proj)."""
    head, _, last = name.rpartition(".")
    names = [f"{head}.{ckpt}" if head else ckpt for ckpt, (ours, _) in packed_modules_mapping.items() if ours == last]
    return names or [name]


def quantize_linears(model: nn.Module, quant: AWQConfig) -> None:
    """Swap every Linear of `model` (built under meta_weights()) for an AWQLinear, in place; those the
    checkpoint keeps dense get their weight allocated (under the caller's device and dtype). Stacked MoE
    experts (layers/moe.py) stay dense tensors and are told which expert projections arrive as AWQ
    tensors, to be dequantized as they load."""
    mapping = getattr(model, "packed_modules_mapping", {})
    for name, module in list(model.named_modules()):
        if isinstance(module, Experts):
            module.expect_awq(quant.group_size, {(e, p) for e in range(module.num_experts) for p in EXPERT_PROJECTIONS
                                                 if not quant.keeps_dense(f"{name}.{e}.{p}")})
            continue
        if not isinstance(module, Linear):
            continue
        names = checkpoint_names(name, mapping)
        dense = [quant.keeps_dense(n) for n in names]
        if all(dense):
            module.materialize_weight()
            continue
        if any(dense):
            raise ValueError(f"AWQ: {name} packs {names}, but modules_to_not_convert keeps only some of them dense")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AWQLinear.replacing(module, quant.group_size, name))


def prepare_kernels(model: nn.Module, dtype: torch.dtype) -> None:
    """After loading, on CUDA: build what the chosen kernel reads besides the AWQ tensors (the k-packed
    words, which replace them; gemlite's copy of the weights), so that it is allocated before the KV cache
    is sized. `auto` resolves per layer: kpack where the layer's K and group size allow, else triton."""
    for module in model.modules():
        if not (isinstance(module, AWQLinear) and module.qweight is not None and module.qweight.is_cuda):
            continue
        if module.kernel in ("auto", "kpack"):
            if awq_kpack.layer_slice(module.in_features, module.group_size) is not None:
                module.kernel = "kpack"
            elif module.kernel == "kpack":
                raise ValueError(f"NANOVLLM_AWQ_KERNEL=kpack: a layer with {module.in_features} input rows in "
                                 f"groups of {module.group_size} cannot be k-packed (layers/awq_kpack.check_packing); "
                                 f"use auto")
            else:
                module.kernel = "triton"
        if module.kernel == "kpack":
            module.prepare_kpack()
        elif module.kernel == "gemlite":
            module.prepare_gemlite(dtype)
