"""One Triton kernel for what sits between the QKV projection and attention on the GPU: per-head
RMSNorm of q and k (Qwen3), neox rotary embedding of q and k, and the write of k and v into their
KV-cache slots.

Done separately that is six kernels a layer (two copies of the strided q/k views, two norms, rotary,
the KV write), each a few microseconds even at batch 8 and, at batch 1024, ~1.4 ms of a decode step
(claude_docs/performance.md). Rounding follows FlashInfer's kernels it replaces: the norm in float32
rounded to the model dtype, then the rotation in float32 rounded again.

Grid: one program per (token, q head or kv head); a kv-head program also copies that head's v.
Slot -1 marks a padded token (CUDA-graph batches): it writes nothing to the cache. Runs on CPU
tensors under TRITON_INTERPRET=1 for tests."""
import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, qkv_stride, pos_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
                               slot_ptr, k_cache_ptr, v_cache_ptr, q_out_ptr,
                               NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr,
                               HAS_NORM: tl.constexpr, STORE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dim = 2 * HALF
    offs = tl.arange(0, HALF)
    row = qkv_ptr + token * qkv_stride
    is_q = head < NUM_Q
    src = row + head * dim  # q heads, then k heads: contiguous in the packed projection
    x1 = tl.load(src + offs).to(tl.float32)
    x2 = tl.load(src + HALF + offs).to(tl.float32)
    if HAS_NORM:
        if is_q:
            w1 = tl.load(q_weight_ptr + offs).to(tl.float32)
            w2 = tl.load(q_weight_ptr + HALF + offs).to(tl.float32)
        else:
            w1 = tl.load(k_weight_ptr + offs).to(tl.float32)
            w2 = tl.load(k_weight_ptr + HALF + offs).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / dim + eps)
        x1 = (x1 * rstd * w1).to(q_out_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * rstd * w2).to(q_out_ptr.dtype.element_ty).to(tl.float32)
    pos = tl.load(pos_ptr + token)
    cos = tl.load(cos_sin_ptr + pos * dim + offs)
    sin = tl.load(cos_sin_ptr + pos * dim + HALF + offs)
    o1 = (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty)
    if is_q:
        dst = q_out_ptr + (token * NUM_Q + head) * dim
        tl.store(dst + offs, o1)
        tl.store(dst + HALF + offs, o2)
    else:
        if STORE:
            slot = tl.load(slot_ptr + token)
            if slot >= 0:
                kv_head = head - NUM_Q
                dst = (slot * NUM_KV + kv_head) * dim
                tl.store(k_cache_ptr + dst + offs, o1)
                tl.store(k_cache_ptr + dst + HALF + offs, o2)
                v = row + (NUM_Q + NUM_KV + kv_head) * dim
                tl.store(v_cache_ptr + dst + offs, tl.load(v + offs))
                tl.store(v_cache_ptr + dst + HALF + offs, tl.load(v + HALF + offs))


def qk_norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                       q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                       num_heads: int, num_kv_heads: int, head_dim: int,
                       slot_mapping: torch.Tensor | None, k_cache: torch.Tensor | None,
                       v_cache: torch.Tensor | None) -> torch.Tensor:
    """qkv [tokens, (heads + 2 kv_heads) * head_dim] (rows may be strided); cos_sin [positions, head_dim]
    float32 (cos of each frequency, then sin); caches [pages, page_size, kv_heads, head_dim].
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
        _qk_norm_rope_store_kernel[(tokens, num_heads + num_kv_heads)](
            qkv, qkv.stride(0), positions, cos_sin, q_weight if has_norm else qkv, k_weight if has_norm else qkv, eps,
            slot_mapping if store else positions, k_cache if store else q, v_cache if store else q, q,
            NUM_Q=num_heads, NUM_KV=num_kv_heads, HALF=head_dim // 2, HAS_NORM=has_norm, STORE=store)
    return q
