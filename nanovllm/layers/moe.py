"""Sparse mixture-of-experts MLP (Qwen3-MoE): a router picks the top-k experts of each token, each
picked expert runs a SiLU-gated MLP on it, and the outputs are summed with the router's weights.

Routing (`route`): softmax over the router logits in float32, top-k, renormalized to sum to one
when the config says `norm_topk_prob`, cast to the activations' dtype (as transformers does).

Experts are stacked per layer: `gate_up_proj` [E, 2*I, H] (each expert's gate rows, then its up
rows) and `down_proj` [E, H, I], the names and layout of transformers' fused tensors, so a
checkpoint that stores them stacked loads by name; per-expert checkpoint tensors
(`experts.{e}.gate_proj.weight`, what `save_pretrained` writes and Qwen3-30B-A3B ships) go to
their slice through `expert_checkpoint_target`.

AWQ int4 checkpoints (layers/awq_format.py) store each expert's projections as qweight / qzeros /
scales. `Experts.expect_awq` (called by layers/awq.quantize_linears) makes the weight loader collect
an expert projection's three tensors and, once all are in, dequantize this rank's slice of it
(awq_format.dequantize_part, on the parameter's device) into the stacked tensors in the model dtype.
So an AWQ MoE checkpoint loads and runs exactly as the float model of its dequantized weights, but
the experts take 16 bits a weight on the GPU (bf16), not 4: no memory saved on the experts
(Qwen3-30B-A3B's are ~29e9 of its ~30.5e9 weights; attention stays int4). An int4 grouped expert
kernel is future work; after load the experts are ordinary tensors, so CUDA graphs are unaffected.

Computation: the token-expert pairs are sorted by expert, so each expert sees one contiguous run
of rows, then
- `expert_mlp_loop` (CPU, and the reference): one pair of matmuls per expert that has rows; it
  reads the row counts on the host.
- `expert_mlp_grouped` (CUDA bf16/fp16): `torch._grouped_mm` over all experts at once from the
  device-side offsets: no host sync, so decode stays capturable in CUDA graphs. UNMEASURED on the
  GPU so far (tests run it on CPU in float32 against the loop).
Each token's k outputs are weighted and summed in a fixed order (no atomics): the same result for
the same input on every rank.

Tensor parallel: each expert's intermediate dimension is split across ranks (gate/up column
parallel, down row parallel), the router is replicated, and the block's partial output is summed
with one all-reduce."""
import re

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed.parallel_state import all_reduce, tp_rank, tp_size
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.awq_format import PACK, dequantize_part
from nanovllm.layers.linear import Linear, _split

_silu_and_mul = SiluAndMul()  # silu(gate) * up: FlashInfer's kernel on 16-bit CUDA tensors, PyTorch elsewhere
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
AWQ_PARTS = ("qweight", "qzeros", "scales")
_EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|qweight|qzeros|scales)")


def expert_checkpoint_target(name: str):
    """(our stacked parameter, shard id) of a per-expert checkpoint tensor, or None for other names:
    `...experts.3.up_proj.weight` -> (`...experts.gate_up_proj`, (3, "up_proj")), and an AWQ tensor
    with its part: `...experts.3.up_proj.qzeros` -> (`...experts.gate_up_proj`, (3, "up_proj", "qzeros"))."""
    m = _EXPERT_TENSOR.fullmatch(name)
    if m is None:
        return None
    prefix, expert, proj, leaf = m.groups()
    shard = (int(expert), proj) if leaf == "weight" else (int(expert), proj, leaf)
    return f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}", shard


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in the logits' dtype, expert ids [T, k]) of each token's top-k experts."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def expert_mlp_loop(x_sorted: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert (counts[e] rows for expert e) through their expert's MLP, one expert
    at a time; experts without rows are skipped. Reads `counts` on the host."""
    out = torch.empty(x_sorted.shape[0], down.shape[1], dtype=x_sorted.dtype, device=x_sorted.device)
    start = 0
    for expert, n in enumerate(counts.tolist()):
        if n:
            rows = x_sorted[start:start + n]
            out[start:start + n] = F.linear(_silu_and_mul(F.linear(rows, gate_up[expert])), down[expert])
            start += n
    return out


def expert_mlp_grouped(x_sorted: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor,
                       down: torch.Tensor) -> torch.Tensor:
    """The same as expert_mlp_loop, as two grouped GEMMs over every expert (torch._grouped_mm,
    offsets on the device: no host sync)."""
    offsets = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=offsets)
    return torch._grouped_mm(_silu_and_mul(h), down.transpose(1, 2), offs=offsets)


def use_grouped_mm(x: torch.Tensor) -> bool:
    """Grouped GEMM on CUDA in 16-bit (what it is built for on sm90); the loop everywhere else."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and hasattr(torch, "_grouped_mm")


def fused_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, expert_mlp=None) -> torch.Tensor:
    """sum_j weights[t, j] * MLP_{ids[t, j]}(x[t]) for every token t (this rank's share of each expert)."""
    num_tokens, top_k = ids.shape
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)  # pair index, grouped by expert
    # rows per expert (not torch.bincount: on CUDA it reads the largest id on the host to size its output)
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    if expert_mlp is None:
        expert_mlp = expert_mlp_grouped if use_grouped_mm(x) else expert_mlp_loop
    y_sorted = expert_mlp(x[order // top_k], counts, gate_up, down)
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted  # back to (token, j) order
    return (y.view(num_tokens, top_k, y.shape[-1]) * weights.unsqueeze(-1)).sum(dim=1)


class Experts(nn.Module):
    """All experts of one layer, stacked; this rank's slice of each expert's intermediate dimension."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.tp_size = tp_size()
        self.intermediate_size = intermediate_size  # the checkpoint's, all ranks together
        local = _split(intermediate_size, "moe_intermediate_size")
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, local))
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self.weight_loader
        self.awq_group_size = None
        self.awq_quantized: frozenset = frozenset()  # (expert, projection)s the checkpoint stores as AWQ
        self._awq_parts: dict[tuple, dict] = {}      # (expert, projection) -> its AWQ tensors read so far
        self._set_shard_ids()

    def expect_awq(self, group_size: int, quantized) -> None:
        """The checkpoint stores these (expert, projection)s as AWQ qweight / qzeros / scales with groups
        of `group_size` input rows: each is dequantized once its three tensors are loaded."""
        self.awq_group_size, self.awq_quantized = group_size, frozenset(quantized)
        self._set_shard_ids()

    def _set_shard_ids(self):
        """The shards the loader must see (utils/loader.py checks them): one per dense expert projection,
        three (its AWQ tensors) per quantized one."""
        def shards(e, proj):
            return [(e, proj, part) for part in AWQ_PARTS] if (e, proj) in self.awq_quantized else [(e, proj)]
        experts = range(self.num_experts)
        self.gate_up_proj.shard_ids = [s for e in experts for p in ("gate_proj", "up_proj") for s in shards(e, p)]
        self.down_proj.shard_ids = [s for e in experts for s in shards(e, "down_proj")]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        """One expert's gate/up/down matrix (shard_id (expert, name)), one of its AWQ tensors (shard_id
        (expert, name, part)), or the whole stacked tensor."""
        full, (hidden, local) = self.intermediate_size, self.down_proj.shape[1:]
        first = tp_rank() * local if self.tp_size > 1 else 0  # this rank's first intermediate row
        if shard_id is None:
            shape = (self.num_experts, 2 * full, hidden) if param is self.gate_up_proj else (self.num_experts, hidden, full)
            if tuple(loaded.shape) != shape:
                raise ValueError(f"shape mismatch: stacked experts {shape} vs checkpoint {tuple(loaded.shape)}")
            if param is self.gate_up_proj:
                param.data[:, :local].copy_(loaded[:, first:first + local])
                param.data[:, local:].copy_(loaded[:, full + first:full + first + local])
            else:
                param.data.copy_(loaded[:, :, first:first + local])
            return
        expert, proj = shard_id[:2]
        part = shard_id[2] if len(shard_id) == 3 else None
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} {proj}: there are {self.num_experts} experts")
        if part is not None and (expert, proj) not in self.awq_quantized:
            raise ValueError(f"expert {expert} {proj}: the checkpoint holds its AWQ {part}, but the config's "
                             f"quantization_config does not quantize it (absent, or modules_to_not_convert)")
        if part is None and (expert, proj) in self.awq_quantized:
            raise ValueError(f"expert {expert} {proj}: the checkpoint holds a dense weight, but the config's "
                             f"quantization_config quantizes it (not in modules_to_not_convert)")
        if part is not None:
            parts = self._awq_parts.setdefault((expert, proj), {})
            parts[part] = loaded
            if len(parts) < len(AWQ_PARTS):
                return
            loaded = self._dequantized(expert, proj, self._awq_parts.pop((expert, proj)), param.device)
            first, full = 0, local  # already this rank's slice
        shape = (hidden, full) if proj == "down_proj" else (full, hidden)
        if tuple(loaded.shape) != shape:
            raise ValueError(f"expert {expert} {proj}: checkpoint {tuple(loaded.shape)}, expected {shape} "
                             f"for one of {self.num_experts} experts")
        if proj == "down_proj":
            param.data[expert].copy_(loaded[:, first:first + local])
        else:
            rows = slice(0, local) if proj == "gate_proj" else slice(local, 2 * local)
            param.data[expert, rows].copy_(loaded[first:first + local])

    def _dequantized(self, expert: int, proj: str, parts: dict, device: torch.device) -> torch.Tensor:
        """This rank's slice of one expert projection's weight W [out, in] (float32, on `device`) from its
        AWQ tensors, which store W^T [in, out]: gate/up_proj's rank slice is columns of W^T, down_proj's
        rows; dequantize_part unpacks only the words and groups holding them."""
        G, hidden, local = self.awq_group_size, self.down_proj.shape[1], self.down_proj.shape[2]
        first = tp_rank() * local if self.tp_size > 1 else 0
        inp, out = (self.intermediate_size, hidden) if proj == "down_proj" else (hidden, self.intermediate_size)
        if inp % G or out % PACK:
            raise ValueError(f"expert {expert} {proj}: [{out}, {inp}] cannot be AWQ with group_size {G} (input "
                             f"rows a multiple of it, output columns of {PACK})")
        expected = {"qweight": (inp, out // PACK), "qzeros": (inp // G, out // PACK), "scales": (inp // G, out)}
        for part, shape in expected.items():
            if tuple(parts[part].shape) != shape:
                raise ValueError(f"expert {expert} {proj}: AWQ {part} {tuple(parts[part].shape)} in the checkpoint, "
                                 f"expected {shape}")
        qweight, qzeros, scales = (parts[p].to(device) for p in AWQ_PARTS)
        mine = (first, local)
        w_t = dequantize_part(qweight, qzeros, scales, G, rows=mine if proj == "down_proj" else None,
                              cols=None if proj == "down_proj" else mine)
        return w_t.t()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fused_experts(x, weights, ids, self.gate_up_proj, self.down_proj)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated) -> top-k -> weighted experts; one all-reduce under tensor parallelism."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Linear(hidden_size, num_experts)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        return all_reduce(out) if self.experts.tp_size > 1 else out
