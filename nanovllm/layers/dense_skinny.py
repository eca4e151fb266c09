"""The bf16/fp16 GEMM for decode's few rows: y = x @ W^T, W an nn.Linear weight [N, K] (row-major).

At decode's batch sizes a linear layer is bound by reading its weight once. cuBLAS reads Qwen3-0.6B's
small matrices (2-12 MB a layer) at ~1-1.6 TB/s (claude_docs/performance.md, "Small decode batches":
0.9 ms of GEMMs a step for 1.19 GB of weights at every batch size up to 256); this kernel is built to keep
more bytes in flight per SM:

- Each program owns BLOCK_N output columns for BLOCK_M rows and a slice of K (split-K, layers/split_k.py:
  per-call float32 partials summed by the last program of a tile; one launch, capturable).
- Per step it loads a [BLOCK_N, BLOCK_K] weight tile (each weight row's K contiguous: coalesced) and the
  [BLOCK_M, BLOCK_K] rows of x, and accumulates tl.dot(x, w^T) in float32 (rows past M masked to zero).

Configs (BLOCK_M, BLOCK_N, BLOCK_K, splits, warps, stages) per (M bucket, N, K) come from TABLE, filled
from scripts/bench_dense_gemm.py on the GPU; shapes not in it use `heuristic_config`. CPU: correct under
TRITON_INTERPRET=1 against the float64 matmul (tests/test_dense_skinny.py)."""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.layers import split_k


@dataclass(frozen=True)
class DenseConfig:
    block_m: int      # rows per program (16, 32 or 64: tl.dot's smallest tile is 16)
    block_n: int      # output columns per program
    block_k: int      # K per step (divides K / splits)
    splits: int       # programs along K per tile
    warps: int = 4
    stages: int = 3


def m_bucket(M: int) -> int:
    """The row count a config is chosen for: the next power of two, at least 1."""
    return 1 << max(0, (M - 1).bit_length())


TABLE: dict[tuple[int, int, int], DenseConfig] = {}


def heuristic_config(M: int, N: int, K: int, num_sms: int) -> DenseConfig:
    """Enough programs to fill the SMs twice over: column blocks first, then splits of K."""
    block_m = min(64, max(16, m_bucket(M)))
    block_n, block_k = 64, 128
    tiles = -(-N // block_n) * -(-M // block_m)
    splits = 1
    while tiles * splits < 2 * num_sms and K % (block_k * splits * 2) == 0 and K // (splits * 2) >= 2 * block_k:
        splits *= 2
    return DenseConfig(block_m, block_n, block_k, splits)


def config_for(M: int, N: int, K: int, device: torch.device) -> DenseConfig:
    found = TABLE.get((m_bucket(M), N, K))
    if found is not None:
        return found
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return heuristic_config(M, N, K, sms)


@triton.jit
def _dense_skinny_kernel(x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_ym, k_per_split,
                         splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):   # K, k_per_split: multiples of BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None], other=0.0)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
    tile = pid_m * tl.num_programs(0) + pid_n
    split_k.store_tile(acc, y_ptr, stride_ym, part_ptr, count_ptr, offs_m, offs_n, M, N, tile, pid_k, splits,
                       SPLIT, BLOCK_M, BLOCK_N)


def dense_skinny(x: torch.Tensor, weight: torch.Tensor, config: DenseConfig | None = None) -> torch.Tensor:
    """x [M, K] (last dim contiguous) @ weight[N, K]^T -> [M, N] in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape[1] == K and weight.is_contiguous() and x.stride(1) == 1, "x [M, K], weight [N, K] contiguous"
    c = config or config_for(M, N, K, x.device)
    k_per_split = K // c.splits
    if K % c.splits or k_per_split % c.block_k:
        raise ValueError(f"dense_skinny: K={K} is not split into {c.splits} slices of whole {c.block_k}-wide steps")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, c.block_n), c.splits, triton.cdiv(M, c.block_m))
    split = c.splits > 1
    tiles = grid[0] * grid[2]
    count = split_k.counters(x.device, tiles) if split else y
    part = torch.empty(c.splits, M, N, dtype=torch.float32, device=x.device) if split else y
    _dense_skinny_kernel[grid](x, weight, y, part, count, M, N, K, x.stride(0), y.stride(0), k_per_split, c.splits,
                               BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT=split,
                               num_warps=c.warps, num_stages=c.stages)
    return y
