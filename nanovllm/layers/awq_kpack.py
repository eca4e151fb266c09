"""A W4A16 GEMM on AWQ weights repacked along K at load ("k-packed"): y = x @ dequant(W).

Why a second layout: the AWQ checkpoint packs 8 *output columns* in a word, in an interleaved order
(layers/awq_format.py). A Triton kernel that expands such a word into its 8 columns needs a reshape of
the [BLOCK_K, BLOCK_N / 8] word tile into [BLOCK_K, BLOCK_N], which Triton lowers to a layout conversion
through shared memory, per step, before the conversion into tl.dot's operand layout; our kernels on
that layout (layers/awq_skinny.py, layers/awq_gemm.py) read the int4 bytes at 0.5-0.95 TB/s on an H200,
below bf16 cuBLAS's speed (claude_docs/models.md).

The k-packed layout (built once per layer by `kpack`, from the checkpoint's tensors), for a slice S
(16, 32 or 64 input rows; AWQLinear uses 32 where K and the group size allow, else 16):
  words  int32 [K / 8, N]: for the K block b of 8 S rows, word row S b + r (r < S) holds in its
         nibble i (bits 4i..4i+3) the code of input row 8 S b + S i + r of column n.
  zeros  [K / G, N] in the scales' dtype (fp16: exact small integers), unpacked from qzeros.
  scales [K / G, N] fp16, the checkpoint's.
So the S x BLOCK_N word tile of a K block gives, for each nibble i, the [S, BLOCK_N] code tile of S
consecutive input rows by a shift and a mask: elementwise, no reshape, and every column's words are
contiguous along N (coalesced loads). A K block is 8 tl.dot's of K = S on codes converted exactly to
x's dtype (or built as `base + q` by bit-or with MAGIC, no int -> float conversion). The zeros are
either subtracted from the codes in x's dtype (SUBZ: (base + q) - (base + z), small integers, exact) or
applied to the group's [M, BLOCK_N] sum as z * sum(x); the scale multiplies the group's float32 sum:
acc += (x . (q - z)) * s, which is x . ((q - z) * s) with the dequantized weight never rounded (more
exact than dequantize-then-bf16). Groups smaller than a block (a multiple of S) close after some of the
dots, larger ones (a multiple of 8 S) once a block (`check_packing`).

SWAP computes y^T = W^T x^T: the weight tile is tl.dot's first operand ([BLOCK_N, S], BLOCK_N rows
for the tensor cores' M side) and x the second (M rows on the N side), the usual trick for few rows.
Split-K (SPLIT): layers/split_k.py (per-call partials, the last program of a tile sums them in split
order; one launch, capturable; the first split call on a device runs outside capture).

From DEQUANT_MIN_M rows a layer instead dequantizes its weight into one shared scratch buffer and calls
cuBLAS (`dequant_matmul`): the fused kernel repeats the dequantization for every row tile.

Measured on one H200 (session 10, scripts/sweep_awq_kpack.py, Qwen3-8B shapes, group 128, bf16,
L2-cold CUDA graphs; claude_docs/models.md "The k-packed kernel"): TABLE's configs run 1.31-1.57x bf16
cuBLAS at one row, 1.23-1.57x at 16, 1.15-1.36x at 32, 0.79-1.06x at 64 (the AWQ-layout kernels:
0.67-0.95x); they read the int4 bytes at 1.1-1.7 TB/s. Slice 32 with the zeros subtracted in x's dtype
won the search (slice 16 with z * sum(x) per group: 0.91-1.05x). Decode of qwen3-8b (dummy weights):
1.34x bf16 at batch 1, 1.31x at 16, 1.21x at 32, 0.98x at 64, 0.70x at 256 (dequantize + cuBLAS).
CPU: tested under TRITON_INTERPRET=1 against the float64 matmul of the dequantized weights
(tests/test_awq_kpack.py)."""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.layers import split_k
from nanovllm.layers.awq_format import unpack

SLICES = (16, 32, 64)   # input rows a nibble of a word tile covers (one tl.dot's K); a K block is 8 of them


@dataclass(frozen=True)
class KpackConfig:
    block_n: int       # output columns per program (a power of two >= 16)
    splits: int        # programs along K per tile (each takes a run of whole K blocks)
    slice: int = 16    # the packing's slice (SLICES): K rows per tl.dot; a K block is 8 slices
    block_m: int = 16  # rows per program (16, 32, 64)
    warps: int = 4
    stages: int = 3
    swap: bool = False   # y^T = W^T x^T: the weight tile on tl.dot's M side
    magic: bool = False  # codes as bits(base) | q (fp16/bf16 activations only)
    subz: bool = False   # subtract the zeros from the codes in x's dtype (exact) instead of z * sum(x) per group


def packing_error(K: int, group_size: int, slice: int) -> str | None:
    """Why K rows in groups of group_size cannot be k-packed with this slice (None: they can)."""
    kblock = 8 * slice
    if slice not in SLICES:
        return f"k-packing slice {slice}: choose one of {SLICES}"
    if K % kblock:
        return f"k-packing with slice {slice} needs K ({K}) a multiple of {kblock}"
    if (group_size % slice) if group_size < kblock else (group_size % kblock):
        return (f"k-packing with slice {slice}: the group size ({group_size}) must be a multiple of "
                f"{slice} below {kblock} rows, else of {kblock}")
    return None


def check_packing(K: int, group_size: int, slice: int) -> None:
    """ValueError unless K rows in groups of group_size can be k-packed with this slice."""
    error = packing_error(K, group_size, slice)
    if error:
        raise ValueError(error)


KPACK_CHUNK = 2048   # output columns repacked at a time (Qwen3-8B's down: 100 MB of int32 codes meanwhile)


def kpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, slice: int = 16
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ qweight [K, N/8] and qzeros [K/G, N/8] -> (words int32 [K/8, N] k-packed with `slice`, zeros
    [K/G, N] in scales' dtype). On the tensors' device."""
    K, N = qweight.shape[0], qweight.shape[1] * 8
    check_packing(K, group_size, slice)
    words = torch.empty(K // 8, N, dtype=torch.int32, device=qweight.device)
    for c0 in range(0, N, KPACK_CHUNK):   # a column chunk at a time: the codes take 4 bytes each meanwhile
        q = unpack(qweight[:, c0 // 8:(c0 + KPACK_CHUNK) // 8])          # [K, C] codes
        q = q.view(K // (8 * slice), 8, slice, q.shape[1])               # [block, nibble i, row r, column]
        chunk = torch.zeros(q.shape[0], slice, q.shape[3], dtype=torch.int64, device=q.device)
        for i in range(8):
            chunk |= q[:, i].to(torch.int64) << (4 * i)
        chunk = torch.where(chunk >= 2**31, chunk - 2**32, chunk).to(torch.int32)   # the same 32 bits, signed
        words[:, c0:c0 + q.shape[3]] = chunk.view(K // 8, -1)
    return words, unpack(qzeros).to(scales.dtype).contiguous()


# the bits of `base` in the activation dtype whose last mantissa bit weighs 1 (bits | q == base + q, q < 16)
MAGIC_BITS = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


@triton.jit
def _kpack_kernel(x_ptr, w_ptr, z_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_ym,
                  blocks_per_split, splits,
                  GROUP: tl.constexpr, SLICE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SWAP: tl.constexpr,
                  GROUP_SLICES: tl.constexpr, SUBZ: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, MAGIC: tl.constexpr = 0,
                  BASE: tl.constexpr = 0.0):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    r = tl.arange(0, SLICE)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, K // (8 * SLICE))
    for b in range(b_start, b_end):
        if SWAP:   # [BLOCK_N, SLICE] words, x^T [SLICE, BLOCK_M]
            words = tl.load(w_ptr + (b * SLICE + r)[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0)
        else:      # [SLICE, BLOCK_N] words, x [BLOCK_M, SLICE]
            words = tl.load(w_ptr + (b * SLICE + r)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        for i in tl.static_range(8):
            if i % GROUP_SLICES == 0:   # a group (or the block's part of it) starts: its zeros and scales
                g = (b * 8 * SLICE + i * SLICE) // GROUP
                z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0)
                s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            offs_k = b * 8 * SLICE + i * SLICE + r
            if SWAP:
                a = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=mask_m[None, :], other=0.0)
            else:
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            q = (words >> (4 * i)) & 0xF
            if MAGIC:
                wq = (q | MAGIC).to(tl.int16).to(a.dtype, bitcast=True)   # base + q, exactly
            else:
                wq = q.to(a.dtype)   # 0..15: exact in any float dtype
            if SUBZ:   # (base + q) - (base + z): small integers, exact in x's dtype
                zb = (z.to(tl.float32) + BASE).to(a.dtype)
                wq = wq - (zb[:, None] if SWAP else zb[None, :])
            elif SWAP:
                xs_i = tl.sum(a.to(tl.float32), axis=0)
            else:
                xs_i = tl.sum(a.to(tl.float32), axis=1)
            if i % GROUP_SLICES == 0:
                if not SUBZ:
                    xs = xs_i
                if SWAP:
                    part = tl.dot(wq, a, input_precision="ieee") if IEEE else tl.dot(wq, a)
                else:
                    part = tl.dot(a, wq, input_precision="ieee") if IEEE else tl.dot(a, wq)
            else:
                if not SUBZ:
                    xs += xs_i
                if SWAP:
                    part = tl.dot(wq, a, part, input_precision="ieee") if IEEE else tl.dot(wq, a, part)
                else:
                    part = tl.dot(a, wq, part, input_precision="ieee") if IEEE else tl.dot(a, wq, part)
            if (i + 1) % GROUP_SLICES == 0:   # the group's part in this block is complete
                if SUBZ:
                    acc += part * (s[:, None] if SWAP else s[None, :])
                else:
                    zf = z.to(tl.float32) + BASE
                    if SWAP:
                        acc += (part - zf[:, None] * xs[None, :]) * s[:, None]
                    else:
                        acc += (part - xs[:, None] * zf[None, :]) * s[None, :]
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    split_k.store_tile(out, y_ptr, stride_ym, part_ptr, count_ptr, offs_m, offs_n, M, N,
                       pid_m * tl.num_programs(1) + pid_n, pid_k, splits, SPLIT, BLOCK_M, BLOCK_N)


def m_bucket(M: int) -> int:
    """The row count a TABLE config is chosen for: the next power of two (the CUDA graph batch sizes)."""
    return 1 << (M - 1).bit_length()


def block_m_for(M: int) -> int:
    """Rows a tile covers for M rows: 16, 32 or 64 (a tile keeps two float32 accumulators: larger spill)."""
    return 16 if M <= 16 else 32 if M <= 32 else 64


def heuristic_config(M: int, N: int, K: int, num_sms: int, slice: int = 16) -> KpackConfig:
    """Unmeasured default, shaped like the measured TABLE: 64-column tiles, magic codes with the zeros
    subtracted, 16/32/64-row tiles (two float32 accumulators a tile: larger ones spill), swapped operands
    from 2 rows (TABLE's choice at 10 of its 12 entries of 16-64 rows), K split until about two programs per
    SM while a split keeps two K blocks."""
    block_m = block_m_for(M)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, 64)
    blocks, splits = K // (8 * slice), 1
    while tiles * splits < 2 * num_sms and blocks // (splits * 2) >= 2:
        splits *= 2
    return KpackConfig(64, splits, slice, block_m, swap=M > 1, magic=True, subz=True)


# (M bucket, N, K) -> config: the best of scripts/sweep_awq_kpack.py's candidates on one H200 (group 128,
# bf16, L2-cold CUDA graphs, M = 1, 16, 32, 64; session 10, claude_docs/models.md "k-packed kernel").
# Buckets 2..8 take the 16-row config (the same 16-row tile); other shapes use heuristic_config.
TABLE: dict[tuple[int, int, int], KpackConfig] = {
    (1, 24576, 4096): KpackConfig(block_n=64, splits=1, slice=32, block_m=16, warps=4, stages=3, swap=True, magic=True, subz=True),
    (16, 24576, 4096): KpackConfig(block_n=64, splits=1, slice=32, block_m=16, warps=4, stages=4, swap=True, magic=True, subz=True),
    (1, 6144, 4096): KpackConfig(block_n=64, splits=4, slice=32, block_m=16, warps=4, stages=3, swap=False, magic=True, subz=True),
    (16, 6144, 4096): KpackConfig(block_n=64, splits=4, slice=32, block_m=16, warps=4, stages=3, swap=True, magic=True, subz=True),
    (1, 4096, 12288): KpackConfig(block_n=64, splits=8, slice=32, block_m=16, warps=4, stages=3, swap=False, magic=True, subz=True),
    (16, 4096, 12288): KpackConfig(block_n=64, splits=4, slice=32, block_m=16, warps=4, stages=3, swap=False, magic=True, subz=True),
    (1, 4096, 4096): KpackConfig(block_n=64, splits=4, slice=32, block_m=16, warps=4, stages=3, swap=False, magic=True, subz=True),
    (16, 4096, 4096): KpackConfig(block_n=64, splits=4, slice=32, block_m=16, warps=4, stages=3, swap=False, magic=True, subz=True),
    (32, 24576, 4096): KpackConfig(block_n=64, splits=1, slice=32, block_m=32, warps=4, stages=3, swap=True, magic=True, subz=True),
    (64, 24576, 4096): KpackConfig(block_n=64, splits=1, slice=32, block_m=64, warps=4, stages=2, swap=True, magic=True, subz=True),
    (32, 6144, 4096): KpackConfig(block_n=64, splits=4, slice=32, block_m=32, warps=4, stages=3, swap=True, magic=True, subz=True),
    (64, 6144, 4096): KpackConfig(block_n=64, splits=2, slice=32, block_m=64, warps=4, stages=3, swap=True, magic=True, subz=True),
    (32, 4096, 12288): KpackConfig(block_n=64, splits=4, slice=32, block_m=32, warps=4, stages=3, swap=True, magic=True, subz=True),
    (64, 4096, 12288): KpackConfig(block_n=64, splits=4, slice=32, block_m=64, warps=4, stages=3, swap=True, magic=True, subz=True),
    (32, 4096, 4096): KpackConfig(block_n=64, splits=4, slice=32, block_m=32, warps=4, stages=3, swap=True, magic=True, subz=True),
    (64, 4096, 4096): KpackConfig(block_n=64, splits=4, slice=32, block_m=64, warps=4, stages=3, swap=True, magic=True, subz=True),
}


def layer_slice(K: int, group_size: int) -> int | None:
    """The slice a layer is packed with: 32 (the measured best) where K and the group allow, else 16;
    None: not k-packable (the AWQ-layout kernels serve it)."""
    return next((slice for slice in (32, 16) if packing_error(K, group_size, slice) is None), None)


def config_for(M: int, N: int, K: int, slice: int, num_sms: int) -> KpackConfig:
    """TABLE's config for this shape and M (bucket 16 for 2..8 rows) when it has the layer's slice, else
    heuristic_config."""
    bucket = m_bucket(M)
    config = TABLE.get((16 if 1 < bucket < 16 else bucket, N, K))
    if config is not None and config.slice == slice:
        return config
    return heuristic_config(M, N, K, num_sms, slice)


def kpack_gemm(x: torch.Tensor, words: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               slice: int, config: KpackConfig | None = None, num_sms: int = 132) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ W [K, N] from tensors k-packed with `slice` (`kpack`: the words do not
    say it, so it is asked) -> y [M, N] in x's dtype. config None: config_for (TABLE or heuristic_config)."""
    M, K = x.shape
    N = words.shape[1]
    if words.shape[0] * 8 != K:
        raise ValueError(f"x has {K} columns, the k-packed words {words.shape[0]} rows (K / 8)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if config is None:
        config = config_for(M, N, K, slice, num_sms)
    elif config.slice != slice:
        raise ValueError(f"the words are packed with slice {slice}, the config reads slice {config.slice}")
    check_packing(K, group_size, config.slice)
    if config.block_n < 16 or config.block_n & (config.block_n - 1):
        raise ValueError(f"block_n {config.block_n} must be a power of two >= 16")
    magic_bits, base = MAGIC_BITS.get(x.dtype, (0, 0.0)) if config.magic else (0, 0.0)
    blocks = K // (8 * config.slice)
    per_split = triton.cdiv(blocks, min(config.splits, blocks))
    splits = triton.cdiv(blocks, per_split)
    grid = (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n), splits)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if splits > 1:
        count = split_k.counters(x.device, grid[0] * grid[1])
        part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    else:
        part = count = y   # unused
    _kpack_kernel[grid](x, words, zeros, scales, y, part, count, M, N, K, x.stride(0), y.stride(0), per_split, splits,
                        GROUP=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, SWAP=config.swap,
                        SUBZ=config.subz, SLICE=config.slice, GROUP_SLICES=min(group_size, 8 * config.slice) // config.slice,
                        SPLIT=splits > 1, IEEE=x.dtype == torch.float32, MAGIC=magic_bits, BASE=base,
                        num_warps=config.warps, num_stages=config.stages)
    return y


# ---- many rows: dequantize into a scratch weight, then cuBLAS ------------------------------------------

# Rows from which AWQLinear dequantizes (below) instead of running kpack_gemm. H200, Qwen3-8B shapes, one
# layer of each: at 64 rows TABLE's configs take 113 us (0.98x bf16), dequantize + cuBLAS 248; at 128 the
# heuristic 384, dequantize + cuBLAS 259; at 256: 713 against 285 (bf16 153): the fused kernel repeats the
# dequantization for every 64-row tile, while the layer dequantized once (a read of its int4 bytes and a
# write of the bf16 weight, ~70 us for gate_up) leaves cuBLAS the rest (claude_docs/models.md).
DEQUANT_MIN_M = 65


@triton.jit
def _dequant_kernel(w_ptr, z_ptr, s_ptr, out_ptr, N, GROUP: tl.constexpr, SLICE: tl.constexpr, BLOCK_N: tl.constexpr):
    """out [K, N] = (q - z) * s in out's dtype, one K block (8 slices) x BLOCK_N columns a program."""
    pid_n, b = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    r = tl.arange(0, SLICE)
    words = tl.load(w_ptr + (b * SLICE + r)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    for i in tl.static_range(8):
        k0 = b * 8 * SLICE + i * SLICE
        g = k0 // GROUP
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        q = ((words >> (4 * i)) & 0xF).to(tl.float32)
        w = (q - z[None, :]) * s[None, :]
        tl.store(out_ptr + (k0 + r)[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One weight-sized buffer per device and dtype, shared by every layer (they run one after another on
    one stream), grown to the largest layer: the first call at each size runs outside CUDA graph capture
    (the engine's warm-up and capture run every layer eagerly first)."""
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < numel:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("awq_kpack: the dequantization buffer must grow outside CUDA graph capture; "
                               "run the layer eagerly at this size first")
        buf = _SCRATCH[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def dequantize_kpacked(words: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, slice: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] in `dtype` from k-packed tensors, in the shared scratch buffer (valid until the next call)."""
    K, N = words.shape[0] * 8, words.shape[1]
    check_packing(K, group_size, slice)
    out = _scratch(K * N, dtype, words.device).view(K, N)
    block_n = 128
    _dequant_kernel[(triton.cdiv(N, block_n), K // (8 * slice))](words, zeros, scales, out, N, GROUP=group_size,
                                                                  SLICE=slice, BLOCK_N=block_n)
    return out


def dequant_matmul(x: torch.Tensor, words: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   slice: int) -> torch.Tensor:
    """x [M, K] @ W [K, N] by dequantizing W into the scratch buffer, then one cuBLAS GEMM."""
    return x @ dequantize_kpacked(words, zeros, scales, group_size, slice, x.dtype)


def kpacked_matmul(x: torch.Tensor, words: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   slice: int, num_sms: int) -> torch.Tensor:
    """What an AWQLinear on k-packed weights runs: x [M, K] @ W [K, N] by the fused kernel with config_for's
    config, or from DEQUANT_MIN_M rows by dequantize + cuBLAS."""
    if x.shape[0] >= DEQUANT_MIN_M:
        return dequant_matmul(x, words, zeros, scales, group_size, slice)
    return kpack_gemm(x, words, zeros, scales, group_size, slice, num_sms=num_sms)

