"""How many KV pages fit, and the cache tensor itself.

On the GPU the cache gets what is left of gpu_memory_utilization after the weights, the activations
of the largest prefill and decode steps (measured by running them, sampler included) and the CUDA
graphs' pool. Under tensor parallelism each rank holds its own KV heads of every page, and all ranks
take the smallest count any of them can hold (one page table serves every rank). The cache dtype is
the model's or fp8 (`kv_cache_dtype`, attention/kv_quant.py): one byte a value, half the page, twice
the pages in the same memory."""
import torch

from nanovllm.attention.kv_quant import is_fp8

CPU_MAX_KV_BLOCKS = 16384  # the CPU path is for tests and small runs: keep the block manager small


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one page (K and V, every layer) on one rank."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def cpu_kv_blocks(config, page_bytes: int) -> int:
    budget = int(config.cpu_kvcache_gb * 2**30) // page_bytes
    needed = config.max_num_seqs * -(-config.max_model_len // config.kvcache_block_size)
    return max(1, min(budget, needed, CPU_MAX_KV_BLOCKS))


def gpu_kv_blocks(config, page_bytes: int, warmup) -> int:
    """warmup(decode: bool) runs the largest prefill or decode step without a cache."""
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    warmup(decode=False)
    prefill_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    warmup(decode=True)
    decode_peak = torch.cuda.max_memory_allocated() - base
    # A graph's private pool keeps one decode step's activations for good, beside the allocator.
    graph_pool = 0 if config.enforce_eager else decode_peak
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    used = total - free
    available = int(total * config.gpu_memory_utilization) - used - max(prefill_peak, decode_peak) - graph_pool
    blocks = available // page_bytes
    if blocks < 1:
        gb = lambda x: f"{x / 2**30:.2f} GB"  # noqa: E731
        raise RuntimeError(f"no GPU memory left for the KV cache at gpu_memory_utilization="
                           f"{config.gpu_memory_utilization}: {gb(total)} in all, {gb(used)} in use (weights, and "
                           f"other processes), {gb(max(prefill_peak, decode_peak))} for the largest step's "
                           f"activations, {gb(graph_pool)} for CUDA graphs")
    return int(blocks)


def allocate_kv_cache(model: torch.nn.Module, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The cache [2, layers, pages, page_size, kv_heads, head_dim], each attention layer bound to its slice.
    Checkpoint KV scales only mean something for an fp8 cache: a cache in the model dtype resets them to 1."""
    shape = (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    # Zeros, not empty: padded reads of unused slots must never see NaN.
    kv_cache = torch.zeros(shape, dtype=dtype, device=device)
    attn_layers = [m for m in model.modules() if type(m).__name__ == "Attention"]
    for i, layer in enumerate(attn_layers):
        layer.k_cache, layer.v_cache = kv_cache[0, i], kv_cache[1, i]
        if not is_fp8(dtype):
            layer.k_scale = layer.v_scale = 1.0
    return kv_cache
