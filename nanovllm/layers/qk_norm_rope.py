"""One Triton kernel for what sits between the QKV projection and attention on the GPU: per-head
RMSNorm of q and k (Qwen3), neox rotary embedding of q and k, and the write of k and v into their
KV-cache slots.

Done separately that is six kernels a layer (two copies of the strided q/k views, two norms, rotary,
the KV write), each a few microseconds even at batch 8 and, at batch 1024, ~1.4 ms of a decode step
(claude_docs/performance.md). Rounding follows FlashInfer's kernels it replaces: the norm in float32
rounded to the model dtype, then the rotation in float32 rounded again.

Grid: one program per token, all its heads at once (a program per head was ~20 us a layer at
batch 1024: too little work each). Slot -1 marks a padded token (CUDA-graph batches): it writes nothing to the cache. Runs on CPU
tensors under TRITON_INTERPRET=1 for tests. An fp8 cache gets k and v rounded to the model dtype
first (the values the unfused path would store), then quantized by attention/triton_kv.py's `to_cache`.
"""
import torch
import triton
import triton.language as tl

from nanovllm.attention.kv_quant import is_fp8
from nanovllm.attention.triton_kv import to_cache


@triton.jit
def _rotate_heads(x_ptr, w_ptr, cos, sin, eps, out_ptr, out_mask, scale, HEADS: tl.constexpr, HEADS_P2: tl.constexpr,
                  HALF: tl.constexpr, HAS_NORM: tl.constexpr, QUANT: tl.constexpr):
    """Norm (optional) and neox rotation of HEADS contiguous heads at x_ptr, stored at out_ptr (in fp8
    with `scale` when QUANT, after rounding to x's dtype)."""
    dim = 2 * HALF
    heads = tl.arange(0, HEADS_P2)[:, None]
    offs = tl.arange(0, HALF)[None, :]
    heads = heads + 0 * offs  # full [heads, HALF] (masks are comparisons of it: no '&', see below)
    mask = heads < HEADS
    x1 = tl.load(x_ptr + heads * dim + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + heads * dim + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / dim + eps)[:, None]
        w1 = tl.load(w_ptr + offs).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs).to(tl.float32)
        x1 = (x1 * rstd * w1).to(x_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * rstd * w2).to(x_ptr.dtype.element_ty).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
    mask = heads < tl.where(out_mask, HEADS, 0)  # '&' of masks gives int32 under TRITON_INTERPRET
    tl.store(out_ptr + heads * dim + offs, to_cache(o1, scale, out_ptr, QUANT), mask=mask)
    tl.store(out_ptr + heads * dim + HALF + offs, to_cache(o2, scale, out_ptr, QUANT), mask=mask)


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, qkv_stride, pos_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
                               slot_ptr, k_cache_ptr, v_cache_ptr, q_out_ptr, k_scale, v_scale,
                               NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, NUM_Q_P2: tl.constexpr,
                               NUM_KV_P2: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
                               STORE: tl.constexpr, QUANT: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    dim = 2 * HALF
    row = qkv_ptr + token * qkv_stride
    offs = tl.arange(0, HALF)[None, :]
    pos = tl.load(pos_ptr + token)
    cos = tl.load(cos_sin_ptr + pos * dim + offs)
    sin = tl.load(cos_sin_ptr + pos * dim + HALF + offs)
    _rotate_heads(row, q_weight_ptr, cos, sin, eps, q_out_ptr + token * NUM_Q * dim, pos >= 0, 1.0,
                  NUM_Q, NUM_Q_P2, HALF, HAS_NORM, False)
    if STORE:
        slot = tl.load(slot_ptr + token)
        dst = tl.maximum(slot, 0) * NUM_KV * dim
        keep = slot >= 0  # a padded token writes nothing
        _rotate_heads(row + NUM_Q * dim, k_weight_ptr, cos, sin, eps, k_cache_ptr + dst, keep, k_scale,
                      NUM_KV, NUM_KV_P2, HALF, HAS_NORM, QUANT)
        v_offs = tl.arange(0, NUM_KV_P2 * 2 * HALF)
        v_mask = v_offs < tl.where(keep, NUM_KV * dim, 0)
        v = tl.load(row + (NUM_Q + NUM_KV) * dim + v_offs, mask=v_mask)
        tl.store(v_cache_ptr + dst + v_offs, to_cache(v, v_scale, v_cache_ptr, QUANT), mask=v_mask)


def qk_norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                       q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                       num_heads: int, num_kv_heads: int, head_dim: int,
                       slot_mapping: torch.Tensor | None, k_cache: torch.Tensor | None,
                       v_cache: torch.Tensor | None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """qkv [tokens, (heads + 2 kv_heads) * head_dim] (rows may be strided); cos_sin [positions, head_dim]
    float32 (cos of each frequency, then sin); caches [pages, page_size, kv_heads, head_dim], in qkv's
    dtype or fp8 (quantized with k_scale / v_scale).
    Returns q [tokens, heads, head_dim]; k and v go to their slots (nowhere when slot_mapping is None)."""
    tokens = qkv.shape[0]
    assert qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    assert head_dim % 2 == 0 and (head_dim // 2) & (head_dim // 2 - 1) == 0, "head_dim / 2 must be a power of two"
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    store = slot_mapping is not None
    if store:
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.numel() == tokens
    has_norm = q_weight is not None
    if tokens:
        _qk_norm_rope_store_kernel[(tokens,)](
            qkv, qkv.stride(0), positions, cos_sin, q_weight if has_norm else qkv, k_weight if has_norm else qkv, eps,
            slot_mapping if store else positions, k_cache if store else q, v_cache if store else q, q,
            float(k_scale), float(v_scale), NUM_Q=num_heads, NUM_KV=num_kv_heads, NUM_Q_P2=triton.next_power_of_2(num_heads),
            NUM_KV_P2=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2, HAS_NORM=has_norm, STORE=store,
            QUANT=store and is_fp8(k_cache))
    return q
