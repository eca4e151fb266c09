"""W4A16 GEMMs on AWQ-packed weights (layers/awq_format.py): y = x @ dequant(qweight, qzeros, scales).

- `awq_matmul`: what a layer calls on CUDA with NANOVLLM_AWQ_KERNEL=triton (or a layer the k-packed default,
  layers/awq_kpack.py, cannot take): the skinny kernel (layers/awq_skinny.py, bandwidth-bound split-K for
  decode) up to awq_skinny.MAX_M rows, the tiled `awq_gemm` above that.
- `awq_gemm`: our tiled Triton kernel. Each program owns a [BLOCK_M, BLOCK_N] tile of y; per K step it loads
  the [BLOCK_K, BLOCK_N / 8] AWQ words of the tile once and expands each into its 8 codes (column 8c + j
  is word c shifted by 4 * SLOT_OF_COLUMN[j]), the group's zero points and scales (one group per K step: BLOCK_K divides the
  group size), dequantizes in registers to the activation dtype and accumulates x @ w with tl.dot in
  float32. Small M (decode) splits K across programs (atomic adds into a float32 buffer) so a 4096-wide
  layer still fills the GPU. Runs on CPU under TRITON_INTERPRET=1 (the tests). On an H200 it is
  0.26-0.79x bf16 cuBLAS's speed at Qwen3-8B's shapes (claude_docs/models.md, scripts/bench_awq.py).
- gemlite (optional, layers/awq_gemlite.py): the same weights repacked for Mobius Labs' Triton kernels.

Which one a layer uses on CUDA: NANOVLLM_AWQ_KERNEL = auto (default: kpack where the layer's K and group
allow, else triton), kpack (layers/awq_kpack.py: the weights repacked along K at load, replacing the AWQ
words; 1.27-1.62x bf16 cuBLAS at 1 and 16 rows on the H200), triton (awq_matmul at every M), triton-tile
(the tiled kernel at every M, for comparison), gemlite (gemlite up to awq_gemlite.MAX_M rows, awq_matmul
above; an ImportError without the package), or dequant (dequantize the whole weight each call, then
cuBLAS: the slow reference). On CPU a layer always dequantizes and
calls F.linear (layers/awq.py says why)."""
import os

import torch
import triton
import triton.language as tl

from nanovllm.layers import awq_skinny
from nanovllm.layers.awq_format import PACK

KERNELS = ("auto", "kpack", "triton", "triton-tile", "gemlite", "dequant")


def kernel_choice() -> str:
    choice = os.environ.get("NANOVLLM_AWQ_KERNEL", "auto")
    if choice not in KERNELS:
        raise ValueError(f"NANOVLLM_AWQ_KERNEL={choice!r}: choose one of {', '.join(KERNELS)}")
    return choice


@triton.jit
def _awq_gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    words_n = N // 8
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # the tile's words, each loaded once
    mask_w = offs_w < words_n
    j = tl.arange(0, 8)
    shift = ((j % 2) * 4 + j // 2) * 4  # column j of a word sits in slot (j % 2) * 4 + j // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # K is a multiple of GROUP, GROUP of BLOCK_K: no K mask
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        words = tl.load(qw_ptr + offs_k[:, None] * words_n + offs_w[None, :], mask=mask_w[None, :], other=0)
        q = tl.reshape((words[:, :, None] >> shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
        g = k0 // GROUP
        zw = tl.load(qz_ptr + g * words_n + offs_w, mask=mask_w, other=0)
        z = tl.reshape((zw[:, None] >> shift[None, :]) & 0xF, (BLOCK_N,))
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(a.dtype)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _block_k(group_size: int) -> int:
    """The largest power of two <= 64 dividing the group size (group sizes are multiples of 16)."""
    b = 64
    while group_size % b:
        b //= 2
    return b


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ W [K, N] from AWQ tensors -> y [M, N] in x's dtype."""
    M, K = x.shape
    N = qweight.shape[1] * PACK
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64 if M <= 64 else 128
    block_k = _block_k(group_size)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if split_k is None:  # small M: split K until about two programs per SM
        split_k = 1
        while tiles * split_k < 2 * _num_sms(x.device) and K // (block_k * split_k * 2) >= 4:
            split_k *= 2
    if split_k == 1:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _awq_gemm_kernel[grid](x, qweight, qzeros, scales, y, M, N, K, x.stride(0), y.stride(0),
                           GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                           SPLIT_K=split_k, IEEE=x.dtype == torch.float32)
    return y if split_k == 1 else y.to(x.dtype)


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """x [M, K] @ W [K, N] from AWQ tensors: the skinny kernel for M <= awq_skinny.MAX_M, else the tiled one."""
    if x.shape[0] <= awq_skinny.MAX_M:
        return awq_skinny.skinny_gemm(x, qweight, qzeros, scales, group_size, num_sms=_num_sms(x.device))
    return awq_gemm(x, qweight, qzeros, scales, group_size)

