"""Sparse mixture-of-experts MLP (Qwen3-MoE): a router picks the top-k experts of each token, each
picked expert runs a SiLU-gated MLP on it, and the outputs are summed with the router's weights.

Routing (`route`): softmax over the router logits in float32, top-k, renormalized to sum to one
when the config says `norm_topk_prob`, cast to the activations' dtype (as transformers does).

Experts are stacked per layer: `gate_up_proj` [E, 2*I, H] (each expert's gate rows, then its up
rows) and `down_proj` [E, H, I], the names and layout of transformers' fused tensors, so a
checkpoint that stores them stacked loads by name; per-expert checkpoint tensors
(`experts.{e}.gate_proj.weight`, what `save_pretrained` writes and Qwen3-30B-A3B ships) go to
their slice through `expert_checkpoint_target`.

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
from nanovllm.layers.linear import Linear, _split

_silu_and_mul = SiluAndMul()  # silu(gate) * up: FlashInfer's kernel on 16-bit CUDA tensors, PyTorch elsewhere
_EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def expert_checkpoint_target(name: str):
    """(our stacked parameter, shard id) of a per-expert checkpoint tensor, or None for other names:
    `...experts.3.up_proj.weight` -> (`...experts.gate_up_proj`, (3, "up_proj"))."""
    m = _EXPERT_TENSOR.fullmatch(name)
    if m is None:
        return None
    prefix, expert, proj = m.groups()
    return f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}", (int(expert), proj)


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
        experts = range(num_experts)
        self.gate_up_proj.shard_ids = [(e, p) for e in experts for p in ("gate_proj", "up_proj")]
        self.down_proj.shard_ids = [(e, "down_proj") for e in experts]
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        """One expert's gate/up/down matrix (shard_id (expert, name)), or the whole stacked tensor."""
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
        expert, proj = shard_id
        shape = (hidden, full) if proj == "down_proj" else (full, hidden)
        if not 0 <= expert < self.num_experts or tuple(loaded.shape) != shape:
            raise ValueError(f"expert {expert} {proj}: checkpoint {tuple(loaded.shape)}, expected {shape} "
                             f"for one of {self.num_experts} experts")
        if proj == "down_proj":
            param.data[expert].copy_(loaded[:, first:first + local])
        else:
            rows = slice(0, local) if proj == "gate_proj" else slice(local, 2 * local)
            param.data[expert, rows].copy_(loaded[first:first + local])

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
