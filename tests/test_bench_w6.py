"""bench.py's W6 (many tenants beyond the GPU cache), scaled down to run on CPU: with the host tier
each system prompt is prefilled once over all rounds; GPU-only recomputes the evicted ones."""
import functools

from nanovllm import benchmark


def test_w6_host_tier_recomputes_each_system_prompt_once(tiny_model, monkeypatch, tmp_path):
    small = functools.partial(benchmark.w6, rounds=3, tenants=6, system_len=64, per_round=2, question_len=8,
                              output_len=4)
    monkeypatch.setitem(benchmark.WORKLOADS, "w6", (small, dict(max_model_len=256)))
    common = ["--model", tiny_model, "--workload", "w6", "--num-gpu-blocks", "40", "--kvcache-block-size", "8",
              "--max-num-seqs", "4", "--json", str(tmp_path / "r.jsonl")]
    gpu_only = benchmark.main(common)
    tiered = benchmark.main(common + ["--host-kv-cache-gb", "0.01"])
    assert gpu_only["output_tokens"] == tiered["output_tokens"] == 3 * 6 * 2 * 4
    assert gpu_only["leaked_blocks"] == tiered["leaked_blocks"] == 0
    # Ideal: 6 system prompts once (their last page's 8 tokens...) plus every question: the prefix
    # cache serves full pages only, and a prompt's last token is always computed.
    ideal = 6 * 64 + 3 * 6 * 2 * 8
    assert tiered["recomputed_prompt_tokens"] <= ideal
    assert gpu_only["recomputed_prompt_tokens"] > 1.5 * tiered["recomputed_prompt_tokens"]
    assert tiered["host_hit_tokens"] > 0 and tiered["gb_from_host"] >= 0 and tiered["copy_steps"] > 0
    assert len(tiered["round_seconds"]) == 3


def test_scheduler_simulation_of_w6_agrees_with_the_engine(tiny_model, make_llm):
    """scripts/simulate_kv_tiers.py runs the real scheduler without a model: on a scaled-down W6 its
    recompute counts equal an engine run's (the order of steps does not depend on the tokens here:
    ignore_eos, and answer pages are never shared)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "simulate_kv_tiers.py")
    spec = importlib.util.spec_from_file_location("simulate_kv_tiers", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    small = dict(rounds=3, tenants=6, system_len=64, per_round=2, question_len=8, output_len=4)
    for host_gb in (0, 0.01):
        llm = make_llm(tiny_model, num_kvcache_blocks=40, kvcache_block_size=8, max_num_seqs=4, max_model_len=256,
                       host_kvcache_gb=host_gb)
        rounds = benchmark.w6(min(10000, llm.vocab_size - 1), **small)
        for prompts, params in rounds:
            llm.generate(prompts, params, use_tqdm=False)
        bm = llm.scheduler.block_manager
        # Copies modelled as fast as on the CPU (a few us a page): neither side's budget binds; and
        # synchronous, as the CPU engine's are (no copy feedback).
        simulated = sim.simulate(40, bm.num_host_blocks, "fcfs", max_num_seqs=4, block_size=8,
                                 top=min(10000, llm.vocab_size - 1), write_back_us=0.01, restore_us=0.01,
                                 copy_feedback=False, **small)
        assert simulated["cached_prompt_tokens"] == bm.num_cache_hit_tokens, (host_gb, simulated)
        assert simulated["host_hit_tokens"] == bm.num_host_hit_tokens
        assert simulated["pages_to_host"] == bm.num_swapped_out
