"""Prefill under tensor parallelism in two pieces of rows, so that each piece's all-reduces run while the
other piece computes.

Why: a prefill step's two sums over ranks a layer are large (16,384 tokens x hidden 4,096 x 2 bytes = 128 MB
at Qwen3-8B), and NCCL takes them on the compute stream's critical path: on 2 x H200 (session 23, W1's
prefill at TP=2, `python scripts/profile_step.py --model DIR --load-format dummy --tensor-parallel-size 2
--batch 256 --context 562 --prefill`, Qwen3-8B shapes) they were 350 ms of the 1.91 s of prefill kernels,
0.53 ms each, which is most of what keeps W1 at TP=2 under 1.6x TP=1 (8.84 s against 14.02 s).

Every op of a layer but attention works row by row, so a step's rows can go through a layer as two pieces,
A and B, one piece's sum running (parallel_state.all_reduce_start) while the other computes. A prefill step
without cascade levels is cut between requests (split_request, near half its rows) and the model runner plans
each piece's attention on its own (the backend's plan_pieces), so the pieces are independent all the way:

    wait sum(MLP_A): add + RMSNorm, qkv_A, attention_A, o_proj_A, start sum(o_A);   the same for B
    wait sum(o_A): add + RMSNorm, MLP_A, start sum(MLP_A);                           the same for B

Other steps in pieces (one request, cascade levels, or too uneven a cut) are cut in half and attend once over
all rows between the two phases (a piece's sum then has only the other piece's o_proj, or its norm and qkv,
beside it). On two GPUs the pieces' sums go on the copy engines (distributed/copy_engine_all_reduce.py: no SM
taken from the GEMMs), else on NCCL's stream.

Only where each piece's message is past the custom all-reduce's sizes (MIN_PIECE_BYTES: those go through
FlashInfer's kernels at once, in decode's graphs) and on the dense decoder whose o_proj and down_proj leave
their sums to the norm after them (models/llama.py, layers/linear.defer_reduce). The same results as the
whole step up to the GEMMs' rounding of fewer rows (tests/test_tensor_parallel.py: logits within 1e-4 of one
rank, greedy tokens equal). `NANOVLLM_TP_PREFILL_OVERLAP=0` runs every step whole; it,
NANOVLLM_TP_PREFILL_PIECE_BYTES and NANOVLLM_TP_PIECES_ATTEND_APART must be the same on every rank (the pieces'
collectives pair across ranks): the model runner checks them at start (settings()).

Measured (session 23, 2 x H200, `python bench.py --preset qwen3-8b --load-format dummy --workload w1
--tensor-parallel-size 2`, alternating with NANOVLLM_TP_PREFILL_OVERLAP=0 on one machine): halves with one
attention and NCCL sums: prefill 1.924 / 1.926 s against 1.991 / 2.002 whole, W1 15,036 / 15,032 tok/s against
14,903 / 14,850 (+0.9%). Session 25 (same command, alternating with NANOVLLM_CE_ALL_REDUCE=0
NANOVLLM_TP_PIECES_ATTEND_APART=0, two machines): pieces cut between requests with copy-engine sums, prefill
1.849-1.864 s against 1.880-1.909, W1 15,149-15,270 against 15,066-15,196 (+0.5%). A traced 16k-token step
(`python scripts/trace_tp_prefill.py`) shows why no more: the compute stream is busy through the step either way
(181.5 ms of 217 against 182.6 of 215); NCCL's sums cost SMs (the GEMMs 155.8 ms beside them, 148.5 beside the
copy engines), the copy engines' cost is the sums' add (7.9 ms), and the GEMMs run at ~760 TFLOP/s.
"""
import os

import numpy as np
import torch

from nanovllm.distributed.parallel_state import all_reduce_start, tp_size
from nanovllm.utils.context import get_context

# A piece's message from which its sum goes to NCCL (the custom all-reduce's largest size, 8 MB; the
# environment variable lets CPU tests split small steps).
MIN_PIECE_BYTES = int(os.environ.get("NANOVLLM_TP_PREFILL_PIECE_BYTES", 8 << 20))
# Steps without cascade levels cut between requests, each piece attending apart (the model runner plans them);
# 0: every piece pair shares one attention over all rows, as before session 25 (for measurements).
ATTEND_APART = os.environ.get("NANOVLLM_TP_PIECES_ATTEND_APART", "1") == "1"


def settings() -> dict:
    """The switches above as this process resolved them: every rank must share them (the pieces' collectives
    pair across ranks; ModelRunner checks)."""
    return {"NANOVLLM_TP_PREFILL_OVERLAP": os.environ.get("NANOVLLM_TP_PREFILL_OVERLAP", "1"),
            "NANOVLLM_TP_PREFILL_PIECE_BYTES": MIN_PIECE_BYTES, "NANOVLLM_TP_PIECES_ATTEND_APART": ATTEND_APART}


def enabled(layers) -> bool:
    """Steps may run in pieces on this model: tensor parallelism, every layer's sums deferred to its norms,
    and not turned off (NANOVLLM_TP_PREFILL_OVERLAP=0)."""
    flag = os.environ.get("NANOVLLM_TP_PREFILL_OVERLAP", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"NANOVLLM_TP_PREFILL_OVERLAP must be 0 or 1, got {flag!r}")
    return flag == "1" and tp_size() > 1 and all(layer.attn_partial and layer.mlp_partial for layer in layers)


# A step cut between requests gives neither piece more than this share of its rows (split_request).
MAX_PIECE_SHARE = 5 / 8


def piece_bytes(max_rows: int, hidden_size: int, dtype: torch.dtype) -> int:
    """The largest message a piece sums: MAX_PIECE_SHARE of the largest prefill step's rows."""
    return int(max_rows * MAX_PIECE_SHARE + 1) * hidden_size * dtype.itemsize


def split_request(qo_indptr: np.ndarray, hidden_size: int, dtype: torch.dtype) -> int | None:
    """The request boundary at which a prefill step without cascade levels is cut into two pieces that attend
    apart (the backend's plan_pieces): the one nearest half the rows, where both pieces' messages reach
    MIN_PIECE_BYTES and neither piece has more than MAX_PIECE_SHARE of the rows; else None."""
    n = len(qo_indptr) - 1
    if n < 2:
        return None
    rows = int(qo_indptr[-1])
    r = int(np.abs(qo_indptr[1:-1] - rows / 2).argmin()) + 1
    first = int(qo_indptr[r])
    row_bytes = hidden_size * dtype.itemsize
    if min(first, rows - first) * row_bytes < MIN_PIECE_BYTES or max(first, rows - first) > MAX_PIECE_SHARE * rows:
        return None
    return r


def split_for(hidden: torch.Tensor) -> tuple[int | None, bool]:
    """(where the step's rows split, whether each piece attends on its own): the backend's planned pieces
    (plan_pieces: own attention), else half the rows with attention over all of them, else (None, False) to
    run it whole: pieces too small for NCCL, or inside a CUDA graph capture (decode steps are small and graphed)."""
    planned = getattr(get_context().attn, "piece_rows", None)
    if planned:
        return planned, True
    half = hidden.shape[0] // 2
    if half * hidden.shape[1] * hidden.element_size() < MIN_PIECE_BYTES:
        return None, False
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return None, False
    return half, False


def forward_in_pieces(model, hidden: torch.Tensor, positions: torch.Tensor, split: int,
                      own_attention: bool = False) -> torch.Tensor:
    """LlamaModel.forward from the embedding's output on, rows [0, split) and [split, end) as two pieces.
    own_attention: each piece attends on its own (the backend planned them, plan_pieces), so a piece's sums
    run beside the other piece's whole layer; else attention runs once over all rows."""
    pieces = (slice(0, split), slice(split, None))
    parts = [hidden[rows] for rows in pieces]   # each piece's hidden state: before the first layer, then
    residual = [None, None]                     # its MLP's partial sums (summed by sums[i])
    sums = [None, None]
    backend = get_context().attn if own_attention else None
    for layer in model.layers:
        attn = layer.self_attn
        qkv = []
        for i, rows in enumerate(pieces):
            if sums[i] is not None:
                parts[i] = sums[i].wait()
            if residual[i] is None:
                x, residual[i] = layer.input_layernorm(parts[i]), parts[i]
            else:
                x, residual[i] = layer.input_layernorm(parts[i], residual[i])
            if own_attention:
                backend.use_piece(i)
                sums[i] = all_reduce_start(attn.o_proj(attn.attend(positions[rows], attn.qkv_proj(x))))
            else:
                qkv.append(attn.qkv_proj(x))
        if not own_attention:
            out = attn.attend(positions, torch.cat(qkv))
            for i, rows in enumerate(pieces):
                sums[i] = all_reduce_start(attn.o_proj(out[rows]))   # this rank's partial sums
        for i in (0, 1):
            o = sums[i].wait()
            x, residual[i] = layer.post_attention_layernorm(o, residual[i])
            sums[i] = all_reduce_start(layer.mlp(x))
    for i in (0, 1):
        if sums[i] is not None:
            parts[i] = sums[i].wait()
        parts[i], _ = model.norm(parts[i], residual[i])
    return torch.cat(parts)
