"""Triton kernel writing each step's new K/V into their cache slots, and the fp8 rule every Triton
KV writer shares (`to_cache`).

One program per token copies its K and V rows (kv_heads x head_dim, contiguous) to slot
`slot_mapping[token]` of the paged caches; slot -1 marks a padded token (CUDA-graph batches padded
up to a captured size) and is skipped. An fp8 cache stores clamp(x / scale, +-448) (attention/
kv_quant.py); the scales are python floats, fixed at load, so a CUDA graph captures them as kernel
arguments. Runs on CPU tensors under TRITON_INTERPRET=1 for tests. The interpreter (Triton 3.9)
rounds to fp8 unlike the GPU and torch in three corners, seen in tests/test_fp8_kv.py: ties go away
from zero, fp8 subnormals (|x / scale| < 2^-6) flush to zero, and a value that rounds up to a power
of two gets half of it (0.4953 -> 0.25). The GPU's conversion rounds to nearest even like torch,
which the GPU tests check bit for bit."""
import torch
import triton
import triton.language as tl

from nanovllm.attention.kv_quant import FP8_MAX, is_fp8

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def to_cache(x, scale, cache_ptr, QUANT: tl.constexpr):
    """x (any float) as the cache stores it: clamp(x / scale) in fp8 when QUANT, else a plain cast."""
    if QUANT:
        x = x.to(tl.float32) / scale
        x = tl.minimum(tl.maximum(x, -_FP8_MAX), _FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_stride, v_stride, k_scale, v_scale,
                     ROW: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, ROW, 0)  # a padded token writes nothing
    k = tl.load(k_ptr + token * k_stride + offs, mask=mask)
    v = tl.load(v_ptr + token * v_stride + offs, mask=mask)
    dst = slot.to(tl.int64) * ROW + offs
    tl.store(k_cache_ptr + dst, to_cache(k, k_scale, k_cache_ptr, QUANT), mask=mask)
    tl.store(v_cache_ptr + dst, to_cache(v, v_scale, v_cache_ptr, QUANT), mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0):
    """k, v: [tokens, kv_heads, head_dim] with each token's row contiguous; caches [pages, page_size, kv_heads,
    head_dim] in the model dtype or fp8 (then quantized with k_scale / v_scale)."""
    num_tokens, kv_heads, head_dim = k.shape
    row = kv_heads * head_dim
    assert k.stride(1) == head_dim and k.stride(2) == 1 and v.stride(1) == head_dim and v.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.numel() == num_tokens
    _store_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    float(k_scale), float(v_scale), ROW=row, BLOCK=triton.next_power_of_2(row),
                                    QUANT=is_fp8(k_cache))
