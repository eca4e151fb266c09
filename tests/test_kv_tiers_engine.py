"""End to end on CPU: the host KV tier, swap-preemption and the schedule policies change which
pages are computed and in which order requests run, never the text: greedy outputs must equal those
of the plain engine. A tiny GPU budget forces evictions, restores and preemptions.

The model is llama-tiny (initializer_range 0.1), whose greedy tokens depend on the whole prefix:
qwen3-tiny's repeat the prompt's last token whatever the cache holds, so it could not tell a wrong
restore from a right one (test_wrong_restores_change_the_outputs is the control)."""
import random

import numpy as np
import pytest
import torch

from nanovllm import SamplingParams
from nanovllm.engine.host_tier import HostTier, runs

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def tenants(n_systems=5, per=3, system_len=48, question_len=6, seed=0):
    rng = random.Random(seed)
    systems = [[rng.randint(1, 500) for _ in range(system_len)] for _ in range(n_systems)]
    prompts = [s + [rng.randint(1, 500) for _ in range(question_len)] for s in systems for _ in range(per)]
    rng.shuffle(prompts)
    return prompts


def run_rounds(llm, prompts, rounds=2, params=GREEDY):
    return [o["token_ids"] for _ in range(rounds) for o in llm.generate(prompts, params, use_tqdm=False)]


TIGHT = dict(num_kvcache_blocks=32, kvcache_block_size=8, max_num_seqs=4, max_model_len=256)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from nanovllm.tools.make_model import make_model
    return make_model("llama-tiny", str(tmp_path_factory.mktemp("m") / "llama-tiny"), seed=0)


@pytest.fixture(scope="module")
def reference_outputs(model):
    from nanovllm import LLM
    llm = LLM(model, **TIGHT)
    outputs = run_rounds(llm, tenants())
    assert len({tuple(o) for o in outputs}) > len(outputs) // 4   # not a degenerate model (2 rounds)
    return outputs


def test_wrong_restores_change_the_outputs(model, make_llm, reference_outputs):
    """The control: an engine whose restores copy nothing (the GPU pages keep stale K/V) must fail
    the comparison the other tests make."""
    llm = make_llm(model, host_kvcache_gb=0.01, **TIGHT)
    tier = llm.model_runner.host_tier
    copy = tier.copy
    tier.copy = lambda swap_out, swap_in, *flags: copy(swap_out, None, *flags)
    assert run_rounds(llm, tenants()) != reference_outputs


def test_host_tier_gives_the_same_outputs_and_serves_evicted_prefixes(model, make_llm, reference_outputs):
    llm = make_llm(model, host_kvcache_gb=0.01, **TIGHT)
    assert run_rounds(llm, tenants()) == reference_outputs
    state = llm.kv_state()
    assert state["copies"]["pages_to_host"] > 0 and state["copies"]["pages_from_host"] > 0
    assert state["hits"]["host_hit_tokens"] > 0
    assert state["copies"]["bytes_from_host"] == state["copies"]["pages_from_host"] * state["gpu"]["bytes_per_page"]
    llm.scheduler.block_manager.check_invariants()
    # Every step's times reached the cost decisions: restores timed apart, forwards of both kinds, no stalls on CPU.
    costs = llm.copy_costs
    assert llm.scheduler.block_manager.costs is costs
    assert 0 < costs.restore_pages <= state["copies"]["pages_from_host"] and costs.restore_s > 0
    assert costs.copy_pages >= costs.restore_pages and costs.copy_s >= costs.restore_s
    # The prefill line takes only steps of copy_costs.MIN_LINE_TOKENS or more (none in these tiny steps).
    assert costs.n <= llm.stats["prefill_steps"] and costs.decode_steps == llm.stats["decode_steps"]
    assert costs.stall_s == 0 and state["copies"]["costs"]["restore_pays"] is state["copies"]["restore_pays"]
    assert llm.stats["forward_seconds"] >= costs.ss + costs.decode_s


def long_decodes(n=6, prompt_len=20, seed=1):
    rng = random.Random(seed)
    return [[rng.randint(1, 500) for _ in range(prompt_len)] for _ in range(n)]


PREEMPT = dict(num_kvcache_blocks=16, kvcache_block_size=8, max_num_seqs=6, max_model_len=256)
LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_swap_preemption_equals_recompute_preemption(model, make_llm):
    """Six requests that outgrow 16 pages: preempted ones come back from host memory (swap) or are
    prefilled again (recompute, the tier off or restores refused): the same tokens either way."""
    prompts = long_decodes()
    recompute = make_llm(model, **PREEMPT)
    expected = [o["token_ids"] for o in recompute.generate(prompts, LONG, use_tqdm=False)]
    assert recompute.scheduler.num_preemptions > 0
    swap = make_llm(model, host_kvcache_gb=0.01, **PREEMPT)
    assert [o["token_ids"] for o in swap.generate(prompts, LONG, use_tqdm=False)] == expected
    bm = swap.scheduler.block_manager
    assert swap.scheduler.num_preemptions > 0 and bm.num_swapped_in > 0
    refused = make_llm(model, host_kvcache_gb=0.01, **PREEMPT)
    refused.scheduler.block_manager.restore_pays = False   # the cost choice says recompute
    refused.copy_costs.restore_pays = lambda: False
    assert [o["token_ids"] for o in refused.generate(prompts, LONG, use_tqdm=False)] == expected
    assert refused.scheduler.block_manager.num_swapped_in == 0


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight", "random"])
def test_every_policy_gives_the_same_outputs(model, make_llm, reference_outputs, policy):
    llm = make_llm(model, schedule_policy=policy, host_kvcache_gb=0.01 if policy == "lpm" else 0, **TIGHT)
    assert run_rounds(llm, tenants()) == reference_outputs


@pytest.mark.parametrize("policy,lag", [("fcfs", 2), ("lpm", 2), ("lpm", 1000)])
def test_copies_reported_late_give_the_same_outputs(model, make_llm, reference_outputs, policy, lag):
    """The CUDA bookkeeping on CPU: copies count as landed only when the runner reports them (here
    `lag` launched steps late; 1000: never, so only the scheduler's waits make progress), so restoring
    requests and hits on restored pages wait, and steps run with waits for earlier copies. The copies
    themselves are synchronous here: this checks the scheduling (no row without its pages, no request
    lost or run twice), the property tests in test_host_tier.py check the waits."""
    import dataclasses
    llm = make_llm(model, schedule_policy=policy, host_kvcache_gb=0.01, **TIGHT)
    bm = llm.scheduler.block_manager
    bm.sync_copies = False
    collect = llm.executor.collect

    def late_report(pending):
        done = bm.launch_clock - lag
        return dataclasses.replace(collect(pending), copies_done=(done, done))
    llm.executor.collect = late_report
    assert run_rounds(llm, tenants()) == reference_outputs
    assert bm.num_swapped_in > 0
    bm.check_invariants()


def test_kv_state_reports_prefix_groups_of_running_requests(model, make_llm):
    llm = make_llm(model, kvcache_block_size=8)
    system = list(range(10, 42))   # 4 pages
    seqs = [llm.add_request(system + [100 + i, 200 + i], GREEDY) for i in range(3)]
    while any(s.num_completion_tokens < 2 for s in seqs):
        llm.step()
    groups = llm.kv_state()["prefix_groups"]
    assert groups and groups[0]["users"] == sorted(s.seq_id for s in seqs) and groups[0]["pages"] == 4
    for s in seqs:
        llm.abort_request(s.seq_id)
    llm.drain()


def test_host_tier_copies_move_the_exact_bytes():
    """HostTier on CPU: random write-backs and restores, checked against a plain dict of pages."""
    torch.manual_seed(0)
    kv = torch.randn(2, 3, 10, 4, 2, 8)
    tier = HostTier(kv, 7)
    rng = np.random.default_rng(0)
    host_copy = {}
    for _ in range(30):
        gpu = rng.choice(10, size=rng.integers(1, 6), replace=False)
        host = rng.choice(7, size=len(gpu), replace=False)
        tier.copy(np.stack([gpu, host], 1), None, False)
        for g, h in zip(gpu, host):
            host_copy[int(h)] = kv[:, :, g].clone()
        kv[:, :, rng.integers(0, 10)] = torch.randn(2, 3, 4, 2, 8)   # the GPU page is reused
        back_host = rng.choice(sorted(host_copy), size=min(3, len(host_copy)), replace=False)
        back_gpu = rng.choice(10, size=len(back_host), replace=False)
        tier.copy(None, np.stack([back_host, back_gpu], 1), False)
        for h, g in zip(back_host, back_gpu):
            assert torch.equal(kv[:, :, g], host_copy[int(h)])
    assert runs([4, 5, 6, 9, 2, 3]) == [(0, 4, 3), (3, 9, 1), (4, 2, 2)]


def test_tensor_parallel_ranks_run_the_same_copies(model, reference_outputs):
    """TP=2 on CPU: each rank holds half the KV heads and its own host pool; were a worker to skip
    or misplace a copy, its heads would be wrong and the tokens would change."""
    from conftest import assert_no_leaks

    from nanovllm import LLM
    llm = LLM(model, tensor_parallel_size=2, host_kvcache_gb=0.01, **TIGHT)
    try:
        assert run_rounds(llm, tenants()) == reference_outputs
        assert llm.scheduler.block_manager.num_swapped_in > 0
        assert_no_leaks(llm)
    finally:
        llm.close()


def test_restores_overlap_a_step_or_run_alone(model, make_llm):
    """A request admitted with host pages is prefilled in a step after the one that issued its
    restores, so that its copies overlap a step of the others (the forward does not wait); alone, it
    runs at once and its step waits for them. One request at a time gives the second case, a batch the first: the same tokens as
    without the tier either way."""
    prompts = tenants()
    plain = make_llm(model, **TIGHT)
    expected = [plain.generate(p, GREEDY, use_tqdm=False)[0]["token_ids"] for p in prompts + prompts]
    expected_batch = run_rounds(plain, prompts)
    llm = make_llm(model, host_kvcache_gb=0.01, **TIGHT)
    waited = []
    execute = llm.executor.execute

    def spy(step):
        if step.swap_in is not None:
            waited.append(step.wait_for_restores)
        return execute(step)
    llm.executor.execute = spy
    assert [llm.generate(p, GREEDY, use_tqdm=False)[0]["token_ids"] for p in prompts + prompts] == expected
    assert waited and all(waited)          # alone: the step waits for its own restores
    waited.clear()
    assert run_rounds(llm, prompts) == expected_batch
    assert False in waited                 # with others: the restore overlaps their step


@pytest.mark.parametrize("prefetch,write_ahead", [(False, False), (True, False), (False, True), (True, True)])
def test_prefetch_and_write_ahead_give_the_same_outputs(model, make_llm, reference_outputs, prefetch, write_ahead):
    """Prefetch (host pages of waiting requests restored into clean free pages) and write-back ahead of
    eviction change only when pages move, never what the steps read: greedy outputs equal the plain
    engine's with each on or off, and each one that is on did move pages; no page leaks."""
    from conftest import assert_no_leaks
    # Two running requests leave free pages while others wait, so prefetch has room (TIGHT leaves none).
    roomy = dict(TIGHT, num_kvcache_blocks=28, max_num_seqs=2)
    llm = make_llm(model, host_kvcache_gb=0.01, host_kv_prefetch=prefetch, host_kv_write_ahead=write_ahead, **roomy)
    assert run_rounds(llm, tenants(), rounds=3) == reference_outputs + reference_outputs[:len(tenants())]
    bm = llm.scheduler.block_manager
    assert (bm.num_prefetched > 0) == prefetch and (bm.num_written_ahead > 0) == write_ahead, \
        (bm.num_prefetched, bm.num_written_ahead)
    bm.check_invariants()
    assert_no_leaks(llm)
