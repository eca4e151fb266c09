"""Requests admitted with pages in the host tier, scheduled by lpm: their restores are charged against
the step's token budget when admitted, all go out with that step, and the groups admitted together
start together in the next step (W6 on the H200 split them: claude_docs/memory.md, "Restores split
lpm's groups"). Driven through the real Scheduler and BlockManager, no model."""
from types import SimpleNamespace

from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4
BUDGET = 32   # max_num_batched_tokens: two restoring requests of 3 host pages (12 tokens each, unmeasured)
SP = SamplingParams(max_tokens=100, ignore_eos=True)


def make_scheduler(num_blocks: int = 64, num_host_blocks: int = 64) -> Scheduler:
    config = SimpleNamespace(max_num_seqs=64, max_num_batched_tokens=BUDGET, kvcache_block_size=BS,
                             enable_prefix_caching=True, host_kv_prefetch=False, host_kv_write_ahead=False,
                             schedule_policy="lpm", max_wait_s=1e9, seed=0)
    return Scheduler(config, num_blocks, num_host_blocks)


def put_on_host_only(scheduler: Scheduler, prefixes: list[list[int]]):
    """Compute each prefix, free it, then evict its pages with an allocation never computed: the
    prefixes' full pages end up in host memory only, the GPU's free pages clean."""
    bm = scheduler.block_manager
    bm.begin_step()
    for prefix in prefixes:
        seq = Sequence(prefix + [1], SP, BS)
        bm.allocate(seq, [])
        seq.num_computed_tokens = len(seq)
        bm.mark_computed(seq)
        bm.deallocate(seq)
    bm.take_copies()
    bm.launched()
    bm.begin_step()
    evictor = Sequence(list(range(5000, 5000 + bm.num_blocks * BS)), SP, BS)
    bm.allocate(evictor, [])
    bm.deallocate(evictor)
    bm.take_copies()
    bm.launched()
    for prefix in prefixes:
        hashes = Sequence(prefix + [1], SP, BS)
        assert all(h in bm.host_hash_to_page and h not in bm.hash_to_block_id for h in bm.prefix_hashes(hashes))


def run_steps(scheduler: Scheduler, num_steps: int) -> list[dict]:
    """The engine's loop without a model (every sampled token 0): what each step ran and restored."""
    bm = scheduler.block_manager
    steps, in_flight = [], None
    for _ in range(num_steps):
        batch, is_prefill = scheduler.schedule()
        _, swap_in, _, wait_for_restores, *_ = bm.take_copies()
        steps.append(dict(prefill={s.seq_id for s in batch} if is_prefill else set(),
                          tokens=sum(s.chunk_len for s in batch) if is_prefill else 0,
                          restored={gpu for _, gpu in swap_in}, waits=wait_for_restores,
                          tables={s.seq_id: list(s.block_table) for s in batch},
                          running={s.seq_id for s in scheduler.running}))
        launched = (batch, scheduler.launched(batch)) if batch else None
        if in_flight:
            scheduler.postprocess(in_flight[0], [0] * len(in_flight[0]), in_flight[1])
        in_flight = launched
    return steps


def test_restoring_groups_are_admitted_within_the_token_budget_and_start_together():
    scheduler = make_scheduler()
    bm = scheduler.block_manager
    bm.copy_budget = 2   # background copies a step: before the fix, restores went out 2 pages a step
    prefixes = [[100 * (g + 1) + i for i in range(3 * BS)] for g in range(4)]   # 3 full pages each
    put_on_host_only(scheduler, prefixes)
    other = Sequence([7, 8, 9], SP, BS)   # decoding meanwhile: restoring requests never run alone
    scheduler.add(other)
    run_steps(scheduler, 2)
    groups = [[Sequence(prefix + [60 + 10 * g + i, 61 + 10 * g + i], SP, BS) for i in range(3)]
              for g, prefix in enumerate(prefixes)]
    for group in groups:
        for seq in group:
            scheduler.add(seq)
    steps = run_steps(scheduler, 8)

    for k, step in enumerate(steps):
        # Restores count against the budget at block_size tokens a page until measured.
        assert BS * len(step["restored"]) + step["tokens"] <= BUDGET, (k, step)
        # Nothing reads a page before the step after the one that restores it (no step here runs alone).
        assert not step["waits"]
        for seq_id, table in step["tables"].items():
            assert not set(table) & step["restored"], (k, seq_id)
    first_prefill = {seq.seq_id: next(k for k, s in enumerate(steps) if seq.seq_id in s["prefill"])
                     for group in groups for seq in group}
    admitted = {seq.seq_id: next(k for k, s in enumerate(steps) if seq.seq_id in s["running"])
                for group in groups for seq in group}
    for group in groups:
        ids = [seq.seq_id for seq in group]
        # A group's first member restores in its admission step; all of it prefills in the next.
        assert {first_prefill[i] for i in ids} == {admitted[ids[0]] + 1}, (ids, first_prefill, admitted)
    # Step 0 admits groups 1-2 (24 of 32 tokens of restores); step 1 prefills them (12 tokens) and
    # admits group 3 (12); step 2 prefills group 3 (6) and admits group 4 (12; with 6 more, 30 of 32).
    starts = [first_prefill[group[0].seq_id] for group in groups]
    assert starts == [1, 1, 2, 3], starts
    assert bm.num_swapped_in == 4 * 3
    for seq in [other] + [s for group in groups for s in group]:
        scheduler.finish(seq, "abort")
    bm.take_copies()
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and not bm.restore_backlog


def test_restore_token_cost_follows_the_measured_times():
    """A host page costs block_size tokens until both the restore time a page and the prefill line are
    measured, then restore seconds / prefill seconds a token (never more than block_size: a restore
    dearer than recomputing is turned off by restore_pays, not charged more). GPU hits cost nothing."""
    from nanovllm.engine.block_manager import BlockManager
    bm = BlockManager(8, 16, num_host_blocks=8)
    hits = [3, -1, -5, 2, -2]   # 3 host pages
    assert bm.restore_token_cost([0, 1]) == 0 and bm.restore_token_cost(hits) == 3 * 16
    bm.costs = SimpleNamespace(measured=True, restore_s_per_page=2.5e-5, prefill_line=lambda: (0.004, 1e-5))
    assert abs(bm.restore_token_cost(hits) - 3 * 2.5) < 1e-9
    bm.costs.restore_s_per_page = 1e-3   # 100 tokens' time a page: capped
    assert bm.restore_token_cost(hits) == 3 * 16
    bm.costs = SimpleNamespace(measured=True, restore_s_per_page=None, prefill_line=lambda: (0.004, 1e-5))
    assert bm.restore_token_cost(hits) == 3 * 16
    bm.costs = SimpleNamespace(measured=False, restore_s_per_page=2.5e-5, prefill_line=lambda: (0.004, 1e-5))
    assert bm.restore_token_cost(hits) == 3 * 16   # the CPU path: decisions do not follow its timings
