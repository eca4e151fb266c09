"""Prefill under tensor parallelism in two pieces of rows, so that each piece's all-reduces run while the
other piece computes.

Why: a prefill step's two sums over ranks a layer are large (16,384 tokens x hidden 4,096 x 2 bytes = 128 MB
at Qwen3-8B), and NCCL takes them on the compute stream's critical path: on 2 x H200 (session 23, W1's
prefill at TP=2, `python scripts/profile_step.py --model DIR --load-format dummy --tensor-parallel-size 2
--batch 256 --context 562 --prefill`, Qwen3-8B shapes) they were 350 ms of the 1.91 s of prefill kernels,
0.53 ms each, which is most of what keeps W1 at TP=2 under 1.6x TP=1 (8.84 s against 14.02 s).

Every op of a layer but attention works row by row, so a step's rows can go through a layer as two pieces,
A and B: A's sum runs on NCCL's own stream (parallel_state.all_reduce_start) while B's o_proj, MLP or qkv
computes on this one, and the other way round. Attention runs once over all rows (pieces of it would need
plans of their own). A layer, piece by piece:

    wait sum(MLP_A of the layer before): add + RMSNorm, qkv_A;   wait sum(MLP_B): add + RMSNorm, qkv_B
    attention over all rows
    o_A = o_proj(A), start sum(o_A);   o_B = o_proj(B), start sum(o_B)
    wait sum(o_A): add + RMSNorm, MLP_A, start sum(MLP_A);   wait sum(o_B): ..., start sum(MLP_B)

Only where each piece's message is past the custom all-reduce's sizes (MIN_PIECE_BYTES: those go through
FlashInfer's kernels at once, in decode's graphs) and on the dense decoder whose o_proj and down_proj leave
their sums to the norm after them (models/llama.py, layers/linear.defer_reduce). The same results as the
whole step up to the GEMMs' rounding of fewer rows (tests/test_tensor_parallel.py: logits within 1e-4 of one
rank, greedy tokens equal). `NANOVLLM_TP_PREFILL_OVERLAP=0` runs every step whole; it and
NANOVLLM_TP_PREFILL_PIECE_BYTES must be the same on every rank (the pieces' collectives pair across ranks).

Measured (session 23, 2 x H200, `python bench.py --preset qwen3-8b --load-format dummy --workload w1
--tensor-parallel-size 2`, alternating with NANOVLLM_TP_PREFILL_OVERLAP=0 on one machine): prefill 1.924 / 1.926 s
against 1.991 / 2.002 whole, W1 15,036 / 15,032 tok/s against 14,903 / 14,850 (+0.9%). Only ~70 of the 350 ms of
sums are hidden: cuBLAS's prefill GEMMs are persistent kernels (nvjet "coop", one CTA an SM) that hold every SM, so
NCCL's kernel mostly runs between them. Leaving it SMs (torch's experimental SM carveout, 16 SMs, on cuBLASLt)
made the prefill slower instead: 1.972 / 1.976 s against 1.903 / 1.891 in another call.
"""
import os

import torch

from nanovllm.distributed.parallel_state import all_reduce_start, tp_size

# A piece's message from which its sum goes to NCCL (the custom all-reduce's largest size, 8 MB; the
# environment variable lets CPU tests split small steps).
MIN_PIECE_BYTES = int(os.environ.get("NANOVLLM_TP_PREFILL_PIECE_BYTES", 8 << 20))


def enabled(layers) -> bool:
    """Steps may run in pieces on this model: tensor parallelism, every layer's sums deferred to its norms,
    and not turned off (NANOVLLM_TP_PREFILL_OVERLAP=0)."""
    flag = os.environ.get("NANOVLLM_TP_PREFILL_OVERLAP", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"NANOVLLM_TP_PREFILL_OVERLAP must be 0 or 1, got {flag!r}")
    return flag == "1" and tp_size() > 1 and all(layer.attn_partial and layer.mlp_partial for layer in layers)


def split_row(hidden: torch.Tensor) -> int | None:
    """Where the step's rows split (half of them), or None to run it whole: pieces too small for NCCL, or
    inside a CUDA graph capture (decode steps are small and graphed)."""
    half = hidden.shape[0] // 2
    if half * hidden.shape[1] * hidden.element_size() < MIN_PIECE_BYTES:
        return None
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return half


def forward_in_pieces(model, hidden: torch.Tensor, positions: torch.Tensor, split: int) -> torch.Tensor:
    """LlamaModel.forward from the embedding's output on, rows [0, split) and [split, end) as two pieces."""
    pieces = (slice(0, split), slice(split, None))
    parts = [hidden[rows] for rows in pieces]   # each piece's hidden state: before the first layer, then
    residual = [None, None]                     # its MLP's partial sums (summed by sums[i])
    sums = [None, None]
    for layer in model.layers:
        attn = layer.self_attn
        qkv = []
        for i in (0, 1):
            if sums[i] is not None:
                sums[i].wait()
            if residual[i] is None:
                x, residual[i] = layer.input_layernorm(parts[i]), parts[i]
            else:
                x, residual[i] = layer.input_layernorm(parts[i], residual[i])
            qkv.append(attn.qkv_proj(x))
        out = attn.attend(positions, torch.cat(qkv))
        o = []
        for i, rows in enumerate(pieces):
            o.append(attn.o_proj(out[rows]))   # this rank's partial sums
            sums[i] = all_reduce_start(o[i])
        for i in (0, 1):
            if sums[i] is not None:
                sums[i].wait()
            x, residual[i] = layer.post_attention_layernorm(o[i], residual[i])
            parts[i] = layer.mlp(x)
            sums[i] = all_reduce_start(parts[i])
    for i in (0, 1):
        if sums[i] is not None:
            sums[i].wait()
        parts[i], _ = model.norm(parts[i], residual[i])
    return torch.cat(parts)
