"""What the KV cache holds right now, as one JSON-able dict: `LLM.kv_state()` and GET /debug/kv.

Read-only: it walks the block manager's tables (tens of thousands of pages in a few ms), so it is
for debugging and dashboards, not for every step. /metrics takes its counters from `kv_usage()`.
"""


def prefix_groups(running, block_size: int) -> list[dict]:
    """Running requests that share leading pages, grouped by their first page: the shared run of
    pages (the longest common prefix of their block tables) and who uses it."""
    by_first: dict[int, list] = {}
    for seq in running:
        if seq.block_table:
            by_first.setdefault(seq.block_table[0], []).append(seq)
    groups = []
    for first, seqs in by_first.items():
        if len(seqs) < 2:
            continue
        shared = min(len(s.block_table) for s in seqs)
        for i in range(shared):
            if any(s.block_table[i] != seqs[0].block_table[i] for s in seqs):
                shared = i
                break
        groups.append({"first_page": first, "pages": shared, "tokens": shared * block_size,
                       "users": sorted(s.seq_id for s in seqs)})
    groups.sort(key=lambda g: (-len(g["users"]), -g["pages"]))
    return groups


def kv_state(engine, max_pages: int = 64) -> dict:
    bm = engine.scheduler.block_manager
    bytes_per_page = engine.model_runner.page_bytes * engine.config.tensor_parallel_size  # all ranks
    cached_free = [b for b in bm.free_block_ids
                   if bm.blocks[b].hash != -1 and bm.hash_to_block_id.get(bm.blocks[b].hash) == b]
    host_hits = bm.num_host_hit_tokens
    queried = max(bm.num_cache_query_tokens, 1)
    return {
        "block_size": bm.block_size,
        "gpu": {"pages": bm.num_blocks, "free": bm.num_free_blocks, "used": bm.num_blocks - bm.num_free_blocks,
                "cached_free": len(cached_free), "bytes_per_page": bytes_per_page,
                "lru": cached_free[:max_pages]},   # free pages that still hold a prefix, next evicted first
        "host": {"pages": bm.num_host_blocks, "used": bm.num_used_host_blocks, "free": bm.num_free_host_blocks,
                 "protected": len(bm.host_protected), "probation": len(bm.host_probation),
                 "lru": bm.host_eviction_order()[:max_pages]},   # dropped first
        "prefix_groups": prefix_groups(engine.scheduler.running, bm.block_size),
        "hits": {"query_tokens": bm.num_cache_query_tokens, "gpu_hit_tokens": bm.num_cache_hit_tokens - host_hits,
                 "host_hit_tokens": host_hits, "hit_rate": bm.num_cache_hit_tokens / queried,
                 "host_hit_rate": host_hits / queried},
        "copies": {"pages_to_host": bm.num_swapped_out, "pages_from_host": bm.num_swapped_in,
                   "bytes_to_host": bm.num_swapped_out * bytes_per_page,
                   "bytes_from_host": bm.num_swapped_in * bytes_per_page, "host_pages_dropped": bm.num_host_dropped,
                   "copy_seconds": engine.stats["copy_seconds"], "restore_pays": bm.restore_pays,
                   "costs": engine.copy_costs.summary()},
        "scheduler": {"policy": engine.scheduler.policy.name, "max_wait_s": engine.scheduler.policy.max_wait_s,
                      "waiting": len(engine.scheduler.waiting), "running": len(engine.scheduler.running),
                      "preemptions": engine.scheduler.num_preemptions,
                      "max_queue_wait_s": engine.scheduler.max_queue_wait_s,
                      "starved_admissions": engine.scheduler.policy.num_starved},
    }
