"""W6 on the scheduler side alone: the real Scheduler and BlockManager, no model (every sampled token
is 0, which only changes the hashes of answer pages, never shared). Reports the prompt tokens a run
would recompute, the host-tier traffic, preemptions and the scheduler's own host time per step, for
the GPU page cap and host tier given. No GPU needed: the recompute counts are what bench.py's W6
would see on any GPU with the same caps (the order of steps does not depend on their speed).

    python scripts/simulate_kv_tiers.py                              # GPU-only, 16,384 pages
    python scripts/simulate_kv_tiers.py --host-pages 24000           # + host tier (~44 GB at 0.6B pages)
    python scripts/simulate_kv_tiers.py --host-pages 24000 --policy lpm
"""
import argparse
import json
import time
from types import SimpleNamespace

from nanovllm.benchmark import w6
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence


def simulate(gpu_pages: int, host_pages: int, policy: str, max_num_seqs: int = 512,
             max_num_batched_tokens: int = 16384, block_size: int = 16, **workload) -> dict:
    config = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=4352, eos_token_ids=(), kvcache_block_size=block_size,
                             enable_prefix_caching=True, schedule_policy=policy, max_wait_s=1e9, seed=0)
    scheduler = Scheduler(config, gpu_pages, host_pages)
    finishing = OutputProcessor(None, scheduler, (), config.max_model_len)  # the stop rules (length here)
    bm = scheduler.block_manager
    prefilled = steps = 0
    schedule_seconds = 0.0
    prompt_tokens = 0
    for prompts, params in w6(**workload):
        seqs = [Sequence(p, sp, block_size) for p, sp in zip(prompts, params)]
        prompt_tokens += sum(len(p) for p in prompts)
        for seq in seqs:
            scheduler.add(seq)
        in_flight = None   # as the engine: step N+1 is scheduled before step N's tokens come back
        while not all(seq.is_finished for seq in seqs):
            t = time.perf_counter()
            batch, is_prefill = scheduler.schedule()
            bm.take_copies()
            launched = None
            if batch:
                launched = (batch, scheduler.launched(batch))
                finishing.launched(*launched)
            schedule_seconds += time.perf_counter() - t
            if batch:
                steps += 1
                prefilled += sum(s.chunk_len for s in batch) if is_prefill else 0
            if in_flight is not None:
                finishing.process(scheduler.postprocess(in_flight[0], [0] * len(in_flight[0]), in_flight[1]))
            in_flight = launched
        if in_flight is not None:
            finishing.process(scheduler.postprocess(in_flight[0], [0] * len(in_flight[0]), in_flight[1]))
    return dict(gpu_pages=gpu_pages, host_pages=host_pages, policy=policy, prompt_tokens=prompt_tokens,
                prefilled_tokens=prefilled, cached_prompt_tokens=bm.num_cache_hit_tokens,
                host_hit_tokens=bm.num_host_hit_tokens, pages_to_host=bm.num_swapped_out,
                pages_from_host=bm.num_swapped_in, host_pages_dropped=bm.num_host_dropped,
                preemptions=scheduler.num_preemptions, steps=steps,
                scheduler_ms_per_step=round(1000 * schedule_seconds / steps, 3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-pages", type=int, default=16384)
    p.add_argument("--host-pages", type=int, default=0)
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "lpm", "dfs-weight", "random"])
    p.add_argument("--tenants", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    result = simulate(args.gpu_pages, args.host_pages, args.policy, tenants=args.tenants, rounds=args.rounds)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
