"""Triton kernel writing each step's new K/V into their cache slots.

One program per token copies its K and V rows (kv_heads x head_dim, contiguous) to slot
`slot_mapping[token]` of the paged caches; slot -1 marks a padded token (CUDA-graph batches padded
up to a captured size) and is skipped. Runs on CPU tensors under TRITON_INTERPRET=1 for tests."""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_stride, v_stride,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, ROW, 0)  # a padded token writes nothing
    k = tl.load(k_ptr + token * k_stride + offs, mask=mask)
    v = tl.load(v_ptr + token * v_stride + offs, mask=mask)
    dst = slot.to(tl.int64) * ROW + offs
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor):
    """k, v: [tokens, kv_heads, head_dim] with each token's row contiguous; caches [pages, page_size, kv_heads, head_dim]."""
    num_tokens, kv_heads, head_dim = k.shape
    row = kv_heads * head_dim
    assert k.stride(1) == head_dim and k.stride(2) == 1 and v.stride(1) == head_dim and v.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.numel() == num_tokens
    _store_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    ROW=row, BLOCK=triton.next_power_of_2(row))
