"""The W4A16 GEMM for few rows (decode, M <= MAX_M) on AWQ-packed weights: y = x @ dequant(qweight, qzeros, scales).

At M <= 16 a linear layer is memory-bound: every weight is read once for a handful of rows, so int4
weights (1/4 of bf16's bytes) should make it up to ~4x faster than bf16 cuBLAS. The tiled kernel
(layers/awq_gemm.py) measured 0.26-0.79x bf16 on an H200 (claude_docs/models.md): its [64 x 64] tiles
keep too few bytes in flight per SM. This one is built for bandwidth:

- Each program owns BLOCK_N output columns for every row and a slice of K (split-K): grid
  (N / BLOCK_N, splits), enough programs to fill the SMs at N = 4096 with wide column blocks.
- Per step it loads a [BLOCK_K, BLOCK_N / 8] block of packed words (each row's words contiguous:
  coalesced), or, with GATHER, each word once per column it holds ([BLOCK_K, BLOCK_N], the 8 loads of
  a word fall in one transaction; no reshape); shifts out the nibbles (column j of a word sits in slot
  SLOT_OF_COLUMN[j], layers/awq_format.py) and dequantizes in float32 as q * s - z * s. BLOCK_K divides
  the group size (one group per step: a row of zeros and scales) or is a multiple of it (zeros and
  scales gathered per row).
- M == 1 (FMA): a float32 [BLOCK_K, BLOCK_N] accumulator of x[k] * w[k, n], summed over K once at the
  end (no tensor cores, no cross-thread reduction per step). Otherwise tl.dot with a BLOCK_M (16 or
  32) row tile, rows past M masked to zero.
- magic (tl.dot configs, fp16/bf16 activations; fp32 runs the float path): the weight tile is built
  without an int -> float conversion, as bits(base) | q in x's dtype (= base + q exactly: bf16 128.0 =
  0x4300, fp16 1024.0 = 0x6400), dotted with x in float32; the step's sum then subtracts
  (base + z) * sum(x) and takes the scale: acc += (x . (base + q) - (base + z) x . 1) * s, one group a
  step. Compiled for sm_90 it trades the float path's I2FP and F2FP a nibble for a LOP3 (tests/test_awq.py
  counts them in the PTX). Timed in session 8's sweep: never the best config here.
- Split-K without zeroing or atomics on the output (layers/split_k.py, shared with layers/awq_kpack.py):
  per-call float32 partials, the last program of a column block sums them in split order; one kernel
  launch per GEMM, capturable (the first split call on a device runs outside capture).

Configs: (BLOCK_N, BLOCK_K, splits, warps, stages, GATHER, FMA), picked per (M bucket, N, K) from TABLE,
filled from scripts/sweep_awq_gemm.py's output on the GPU; shapes not in it use `heuristic_config`.
Measured on one H200 (claude_docs/models.md): TABLE's configs read the int4 bytes at 509-950 GB/s,
0.67-0.93x bf16 cuBLAS's speed at M 1-32 (bf16 reads 2.4-4.1 TB/s), so AWQ decode stays slower than
bf16. CPU: correct under TRITON_INTERPRET=1 against the float64 dequantized matmul (tests/test_awq.py),
compiles for sm_90 within its shared memory (TABLE's configs and the tests'). A config that does not fit
the GPU (shared memory) is refused with a ValueError naming it."""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from nanovllm.layers import split_k
from nanovllm.layers.awq_format import PACK

MAX_M = 32   # rows this kernel serves; more go to the tiled kernel (layers/awq_gemm.py)


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int      # output columns per program (a multiple of 8)
    block_k: int      # K rows per step (a power of two; divides the group size or is a multiple of it)
    splits: int       # programs along K per column block
    warps: int = 4
    stages: int = 3
    gather: bool = False   # load each word once per column (no reshape) instead of once per word
    fma: bool = False      # one row: multiply-add in float32 instead of tl.dot (M == 1 only)
    magic: bool = False    # tl.dot on (base + q) built by bit-or, zeros and scales applied to the step's sum


def m_bucket(M: int) -> int:
    """The row count a config is chosen for: 1, 2, 4, 8, 16 or 32 (the CUDA graph batch sizes)."""
    if not 1 <= M <= MAX_M:
        raise ValueError(f"the skinny AWQ kernel serves 1..{MAX_M} rows, got {M}")
    return 1 << (M - 1).bit_length()


# (M bucket, N, K) -> config: the best of scripts/sweep_awq_gemm.py's candidates on one H200 (group 128,
# bf16, L2-cold, M = 1, 4, 16, 32), pasted from its output (/tmp/s6/sweep_awq.json of session 6). Buckets 2 and 8 and other shapes use
# heuristic_config. Even these reach only 0.67-0.93x bf16 cuBLAS's speed (claude_docs/models.md).
TABLE: dict[tuple[int, int, int], SkinnyConfig] = {
    (1, 6144, 4096): SkinnyConfig(block_n=64, block_k=128, splits=4, warps=4, stages=3, gather=False, fma=True),
    (4, 6144, 4096): SkinnyConfig(block_n=128, block_k=64, splits=8, warps=4, stages=3, gather=False, fma=False),
    (16, 6144, 4096): SkinnyConfig(block_n=128, block_k=64, splits=8, warps=4, stages=4, gather=False, fma=False),
    (32, 6144, 4096): SkinnyConfig(block_n=128, block_k=64, splits=8, warps=4, stages=3, gather=False, fma=False),
    (1, 4096, 4096): SkinnyConfig(block_n=128, block_k=32, splits=16, warps=4, stages=3, gather=False, fma=True),
    (4, 4096, 4096): SkinnyConfig(block_n=128, block_k=64, splits=8, warps=4, stages=3, gather=False, fma=False),
    (16, 4096, 4096): SkinnyConfig(block_n=128, block_k=64, splits=8, warps=4, stages=3, gather=False, fma=False),
    (32, 4096, 4096): SkinnyConfig(block_n=64, block_k=128, splits=4, warps=4, stages=3, gather=False, fma=False),
    (1, 24576, 4096): SkinnyConfig(block_n=64, block_k=128, splits=1, warps=4, stages=4, gather=False, fma=True),
    (4, 24576, 4096): SkinnyConfig(block_n=128, block_k=64, splits=4, warps=4, stages=3, gather=False, fma=False),
    (16, 24576, 4096): SkinnyConfig(block_n=256, block_k=64, splits=4, warps=4, stages=3, gather=False, fma=False),
    (32, 24576, 4096): SkinnyConfig(block_n=128, block_k=64, splits=2, warps=4, stages=4, gather=False, fma=False),
    (1, 4096, 12288): SkinnyConfig(block_n=128, block_k=32, splits=16, warps=4, stages=4, gather=False, fma=True),
    (4, 4096, 12288): SkinnyConfig(block_n=128, block_k=64, splits=16, warps=4, stages=4, gather=False, fma=False),
    (16, 4096, 12288): SkinnyConfig(block_n=128, block_k=64, splits=16, warps=4, stages=3, gather=False, fma=False),
    (32, 4096, 12288): SkinnyConfig(block_n=128, block_k=128, splits=8, warps=4, stages=3, gather=False, fma=False),
}


def heuristic_config(M: int, N: int, K: int, num_sms: int) -> SkinnyConfig:
    """Unmeasured default: 128-column blocks (64 when N is small), 64-row steps for one row (the FMA
    accumulator is BLOCK_K x BLOCK_N float32 registers) and 128 otherwise, K split until about two
    programs per SM while each split keeps at least 4 steps."""
    block_n = 128 if N >= 128 * num_sms // 4 else 64
    block_k = 64 if M == 1 else 128
    blocks = triton.cdiv(N, block_n)
    splits = 1
    while blocks * splits < 2 * num_sms and K // (block_k * splits * 2) >= 4:
        splits *= 2
    return SkinnyConfig(block_n, block_k, splits, warps=8 if M == 1 else 4, fma=M == 1)


# MAGIC: the bits of `base` in the activation dtype, whose last mantissa bit weighs 1, so that bits | q
# (q < 16) is exactly base + q: bf16 128.0 = 0x4300 (7 mantissa bits), fp16 1024.0 = 0x6400 (10 bits).
MAGIC_BITS = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


@triton.jit
def _skinny_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_ym,
                   k_per_split, splits,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   FMA: tl.constexpr, GATHER: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                   MAGIC: tl.constexpr = 0, BASE: tl.constexpr = 0.0):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    words_n = N // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if GATHER:  # word of each column, and its shift: column j of a word sits in slot (j % 2) * 4 + j // 2
        word_of = offs_n // 8
        col = offs_n % 8
        shift_n = ((col % 2) * 4 + col // 2) * 4
    else:
        word_of = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        mask_w = word_of < words_n
        j = tl.arange(0, 8)
        shift_j = ((j % 2) * 4 + j // 2) * 4
    if FMA:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)  # K, k_per_split: multiples of BLOCK_K, no K mask
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if GATHER:
            words = tl.load(qw_ptr + offs_k[:, None] * words_n + word_of[None, :], mask=mask_n[None, :], other=0)
            q = (words >> shift_n[None, :]) & 0xF
        else:
            words = tl.load(qw_ptr + offs_k[:, None] * words_n + word_of[None, :], mask=mask_w[None, :], other=0)
            q = tl.reshape((words[:, :, None] >> shift_j[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
        if BLOCK_K <= GROUP:  # one group this step: a row of zeros and scales (always so with MAGIC)
            g = k0 // GROUP
            if GATHER:
                z = (tl.load(qz_ptr + g * words_n + word_of, mask=mask_n, other=0) >> shift_n) & 0xF
            else:
                zw = tl.load(qz_ptr + g * words_n + word_of, mask=mask_w, other=0)
                z = tl.reshape((zw[:, None] >> shift_j[None, :]) & 0xF, (BLOCK_N,))
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if MAGIC:  # q never goes through an int -> float conversion
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
                w = (q | MAGIC).to(tl.int16).to(a.dtype, bitcast=True)   # base + q, exact
                row_sum = tl.sum(a.to(tl.float32), axis=1)   # x . (base + z) is subtracted from x . (base + q)
                step = tl.dot(a, w) - row_sum[:, None] * (z.to(tl.float32) + BASE)[None, :]
                acc += step * s[None, :]
            else:
                w = q.to(tl.float32) * s[None, :] - (z.to(tl.float32) * s)[None, :]
        else:  # BLOCK_K / GROUP groups this step: zeros and scales per row (cached loads)
            g = offs_k // GROUP
            if GATHER:
                z = (tl.load(qz_ptr + g[:, None] * words_n + word_of[None, :], mask=mask_n[None, :], other=0)
                     >> shift_n[None, :]) & 0xF
            else:
                zw = tl.load(qz_ptr + g[:, None] * words_n + word_of[None, :], mask=mask_w[None, :], other=0)
                z = tl.reshape((zw[:, :, None] >> shift_j[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
            w = (q - z).to(tl.float32) * s
        if FMA:
            a = tl.load(x_ptr + offs_k).to(tl.float32)
            acc += a[:, None] * w
        elif not MAGIC:   # MAGIC accumulated its step above
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(a, w.to(a.dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)
    if FMA:
        out = tl.sum(acc, axis=0)[None, :]   # [1, BLOCK_N]; BLOCK_M is 1
    else:
        out = acc
    split_k.store_tile(out, y_ptr, stride_ym, part_ptr, count_ptr, offs_m, offs_n, M, N, pid_n, pid_k, splits,
                       SPLIT, BLOCK_M, BLOCK_N)


def _block_k(block_k: int, group: int, K: int) -> int:
    """block_k, halved until it divides the group size, or is a multiple of it that divides K."""
    while not (group % block_k == 0 or (block_k % group == 0 and K % block_k == 0)):
        block_k //= 2
    return block_k


def launch_plan(config: SkinnyConfig, M: int, K: int, group_size: int, dtype: torch.dtype) -> tuple[dict, int, int]:
    """How skinny_gemm launches `config` for M rows of x in `dtype`: the kernel's constexprs, the K rows
    a split covers, and the number of splits."""
    block_k = _block_k(config.block_k, group_size, K)
    magic_bits, base = MAGIC_BITS.get(dtype, (0, 0.0)) if config.magic else (0, 0.0)
    if magic_bits and config.fma:
        raise ValueError("magic weights go through tl.dot: fma=False")
    if magic_bits:
        block_k = min(block_k, group_size)   # one group a step
    steps = K // block_k
    k_per_split = triton.cdiv(steps, min(config.splits, steps)) * block_k
    splits = triton.cdiv(K, k_per_split)
    consts = dict(GROUP=group_size, BLOCK_M=1 if config.fma else 16 if M <= 16 else 32, BLOCK_N=config.block_n,
                  BLOCK_K=block_k, FMA=config.fma, GATHER=config.gather, SPLIT=splits > 1,
                  IEEE=dtype == torch.float32, MAGIC=magic_bits, BASE=base)
    return consts, k_per_split, splits


def skinny_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group_size: int, config: SkinnyConfig | None = None, num_sms: int = 132) -> torch.Tensor:
    """x [M <= MAX_M, K] (fp16/bf16/fp32) @ W [K, N] from AWQ tensors -> y [M, N] in x's dtype. config:
    None = TABLE's, else heuristic_config (num_sms: the GPU's)."""
    M, K = x.shape
    N = qweight.shape[1] * PACK
    if qweight.shape[0] != K or K % group_size:
        raise ValueError(f"x has {K} columns, qweight {qweight.shape[0]} rows, group size {group_size}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if config is None:
        config = TABLE.get((m_bucket(M), N, K)) or heuristic_config(M, N, K, num_sms)
    if config.fma and M != 1:
        raise ValueError(f"the FMA path serves one row, got {M}")
    if config.block_n % PACK or config.block_n & (config.block_n - 1):
        raise ValueError(f"block_n {config.block_n} must be a power of two >= {PACK}")
    consts, k_per_split, splits = launch_plan(config, M, K, group_size, x.dtype)
    blocks = triton.cdiv(N, config.block_n)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if splits > 1:
        count = split_k.counters(x.device, blocks)
        part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    else:
        part = count = y  # unused
    try:
        _skinny_kernel[(blocks, splits)](
            x, qweight, qzeros, scales, y, part, count, M, N, K, x.stride(0), y.stride(0), k_per_split, splits,
            **consts, num_warps=config.warps, num_stages=config.stages)
    except OutOfResources as e:
        raise ValueError(f"awq_skinny: {config} at {consts['BLOCK_M']} rows, group {group_size} needs {e.required} "
                         f"bytes of {e.name}, the GPU has {e.limit} (fewer stages, gather=False or a smaller block)"
                         ) from e
    return y
