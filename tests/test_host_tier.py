"""Property tests of the two-tier block manager (GPU pages + host pages).

Random allocate / compute / decode / free / preempt / re-admit sequences over a tiny GPU pool and a
tiny host pool, one scheduling step per operation. An independent model of the page contents
(`Store`: one token id per KV slot, in each tier) executes the copies each step hands out, swap_out
before swap_in, and then the step's forward writes; after every step every computed token of every
live sequence must be found, through its block table, in the GPU store: restored bytes are the
evicted ones. Every step also runs the background copies (prefetch for the preempted requests
waiting to come back, write-back ahead of eviction), executed after the step's restores as the
runner does. In the asynchronous mode (the engine on CUDA) the copies are queued as batches that
land later, in order, as a random schedule says; the block manager hears of them only as the runner
would report them (`copies_landed`), and a step's forward first lands the batches its step waits for
(`wait_in`, `wait_out`, its write-backs unless it writes none of their pages, its restores if it reads
them), then must read the right tokens in
every page of the rows it runs. The block manager's own invariants (a hash in both tiers only with equal bytes, every
host page free / pinned / in the LRU exactly once, ref counts) are checked too, and nothing leaks."""
import random

import numpy as np
from hypothesis import given, settings, strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4
SP = SamplingParams(max_tokens=1000)
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7] * 12, [3] * 16, []]


class Store:
    """What the device and host pools hold, one token id per slot (-1: never written)."""

    def __init__(self, num_gpu: int, num_host: int):
        self.gpu = np.full((num_gpu, BS), -1, dtype=np.int64)
        self.host = np.full((max(num_host, 1), BS), -1, dtype=np.int64)

        # Asynchronous mode: the copies not landed yet, as the runner queues them: write-backs (swap_out,
        # write_ahead) in order on one stream, restores on another; each entry is (batch, part, pairs, dep),
        # dep: what it waits for on the other stream (engine/block_manager.StepCopies).
        self.queues: dict[str, list] = {"out": [], "in": []}

    def copy(self, bm: BlockManager):
        copies = bm.take_copies()
        for part in ("swap_out", "swap_in", "write_ahead"):
            self.run(part, getattr(copies, part))
        return copies.swap_out, copies.swap_in

    def run(self, part: str, pairs: list):
        for a, b in pairs:
            if part == "swap_in":
                self.gpu[b] = self.host[a]
            else:
                self.host[b] = self.gpu[a]

    def queue_copies(self, bm: BlockManager):
        """Asynchronous mode: queue the step's copies, then land what its forward waits for."""
        c = bm.take_copies()
        for part, stream in (("swap_out", "out"), ("write_ahead", "out"), ("swap_in", "in")):
            if getattr(c, part):
                dep = ("in", c.out_after_in) if stream == "out" else ("out", c.in_after_out)
                self.queues[stream].append((c.batch, part, getattr(c, part), dep))
        self.land_up_to("in", c.wait_in)
        self.land_up_to("out", c.wait_out)
        if c.swap_out and c.wait_own_out:   # else the forward writes none of the pages written back
            self.land_up_to("out", c.batch, "swap_out")
        if c.wait_for_restores:
            self.land_up_to("in", c.batch)

    def land_up_to(self, stream: str, batch: int, last_part: str | None = None):
        """Land `stream`'s entries up to `batch` (of that batch only up to `last_part`, if given)."""
        queue = self.queues[stream]
        while queue and (queue[0][0] < batch or queue[0][0] == batch and (last_part is None or
                                                                           queue[0][1] == last_part)):
            self.land_first(stream)

    def land_first(self, stream: str):
        batch, part, pairs, (other, after) = self.queues[stream][0]
        self.land_up_to(other, after, "swap_out" if other == "out" and after == batch else None)
        self.queues[stream].pop(0)
        self.run(part, pairs)

    def land_some(self, rng: random.Random, clock: int) -> tuple[int, int]:
        """Land a random number of each stream's first entries; returns what the runner would report."""
        for stream in ("in", "out"):
            for _ in range(rng.randint(0, len(self.queues[stream]))):
                if self.queues[stream]:
                    self.land_first(stream)
        return self.done(clock)

    def done(self, clock: int) -> tuple[int, int]:
        return tuple(self.queues[s][0][0] - 1 if self.queues[s] else clock for s in ("in", "out"))

    def pending_host_writes(self) -> set:
        return {b for _, _, pairs, _ in self.queues["out"] for _, b in pairs}

    def write(self, seq: Sequence, start: int, end: int):
        """The forward pass writes tokens [start, end) of seq into its pages."""
        for p in range(start, end):
            self.gpu[seq.block_table[p // BS], p % BS] = seq.token_ids[p]


def check(bm: BlockManager, store: Store, live: list[Sequence]):
    bm.check_invariants()
    holders = [0] * bm.num_blocks
    for seq in live:
        assert len(seq.block_table) == seq.num_blocks
        for b in seq.block_table:
            holders[b] += 1
        if not bm.restores_landed(seq):
            continue   # restores still queued or in flight: its pages are filled by copies not landed yet
        check_pages(store, seq, seq.num_computed_tokens)
    assert [b.ref_count for b in bm.blocks] == holders
    assert bm.num_free_blocks == holders.count(0)
    # Every cached page holds what its hash says, in either tier (so a hash in both holds equal bytes).
    for block_id in bm.hash_to_block_id.values():
        block = bm.blocks[block_id]
        if block.computed and block.landing <= bm.in_done:
            assert store.gpu[block_id].tobytes() == block.token_key
    pending = store.pending_host_writes()
    for page in bm.host_eviction_order():
        if page not in pending:
            assert store.host[page].tobytes() == bm.host_key[page]


def check_pages(store: Store, seq: Sequence, end: int):
    for p in range(end):
        assert store.gpu[seq.block_table[p // BS], p % BS] == seq.token_ids[p], (seq.seq_id, p)


op = st.one_of(
    st.tuples(st.just("new"), st.integers(0, len(PREFIXES) - 1), st.lists(st.integers(0, 3), max_size=9)),
    st.tuples(st.just("compute"), st.integers(0, 50), st.integers(1, 9)),
    st.tuples(st.just("decode"), st.integers(0, 50), st.integers(0, 3)),
    st.tuples(st.just("free"), st.integers(0, 50), st.just(None)),
    st.tuples(st.just("preempt"), st.integers(0, 50), st.just(None)),
    st.tuples(st.just("readmit"), st.integers(0, 50), st.just(None)),
)


def admit(bm: BlockManager, store: Store, seq: Sequence) -> bool:
    hits, pending = bm.match(seq)
    if pending or not bm.can_allocate(seq, hits):
        return False
    bm.allocate(seq, hits)
    return True


@settings(max_examples=300, deadline=None)
@given(st.integers(6, 12), st.integers(0, 6), st.lists(op, min_size=20, max_size=80), st.booleans(), st.booleans(),
       st.integers(1, 6))
def test_two_tier_operations_keep_invariants_and_bytes(num_blocks, num_host, ops, prefetch, write_ahead, budget):
    run_operations(num_blocks, num_host, ops, prefetch, write_ahead, budget)


@settings(max_examples=300, deadline=None)
@given(st.integers(6, 12), st.integers(1, 6), st.lists(op, min_size=20, max_size=80), st.booleans(), st.booleans(),
       st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_asynchronous_copies_land_before_every_forward_that_needs_them(num_blocks, num_host, ops, prefetch,
                                                                        write_ahead, budget, seed):
    run_operations(num_blocks, num_host, ops, prefetch, write_ahead, budget, landing=random.Random(seed))


def test_seeded_soak_of_the_same_operations_moves_pages_both_ways():
    """Hypothesis favours short, simple operation lists, in which pages seldom get evicted twice:
    the same checker over 300 seeded lists of 60 operations, which must move pages both ways."""
    rng = random.Random(0)
    moved = [0, 0, 0, 0]
    for i in range(300):
        ops = []
        for _ in range(60):
            kind = rng.choice(["new", "new", "compute", "compute", "decode", "free", "preempt", "readmit"])
            b = ([rng.randrange(4) for _ in range(rng.randrange(10))] if kind == "new" else
                 rng.randint(1, 9) if kind == "compute" else rng.randrange(4) if kind == "decode" else None)
            ops.append((kind, rng.randrange(len(PREFIXES)) if kind == "new" else rng.randrange(51), b))
        bm = run_operations(rng.randint(6, 12), rng.randint(1, 6), ops, prefetch=i % 3 != 1, write_ahead=i % 3 != 2,
                            budget=rng.randint(1, 4), landing=random.Random(i) if i % 2 else None)
        moved[0] += bm.num_swapped_out
        moved[1] += bm.num_swapped_in
        moved[2] += bm.num_prefetched
        moved[3] += bm.num_written_ahead
    assert moved[0] > 100 and moved[1] > 20 and moved[2] > 10 and moved[3] > 20, moved


def run_operations(num_blocks: int, num_host: int, ops: list, prefetch: bool = False, write_ahead: bool = False,
                   budget: int = 4, landing: random.Random | None = None) -> BlockManager:
    """`landing`: asynchronous copies, landed at random (else each step's copies land before its forward)."""
    bm = BlockManager(num_blocks, BS, num_host_blocks=num_host, prefetch=prefetch, write_ahead=write_ahead)
    bm.copy_budget = budget
    bm.sync_copies = landing is None
    store = Store(num_blocks, num_host)
    live: list[Sequence] = []
    preempted: list[Sequence] = []
    for kind, a, b in ops:
        bm.begin_step()
        writes = []
        if kind == "new":
            seq = Sequence(PREFIXES[a] + b or [5], SP, BS)
            if admit(bm, store, seq):
                live.append(seq)
        elif kind == "readmit" and preempted:
            seq = preempted[a % len(preempted)]
            if admit(bm, store, seq):
                preempted.remove(seq)
                live.append(seq)
        elif kind in ("compute", "decode", "free", "preempt") and live:
            seq = live[a % len(live)]
            if kind in ("compute", "decode") and not bm.restores_landed(seq):
                pass   # the scheduler runs it only once its restores went out in an earlier step
            elif kind == "compute":
                start = seq.num_computed_tokens
                seq.num_computed_tokens = min(len(seq), start + b)
                bm.mark_computed(seq)
                writes.append((seq, start, seq.num_computed_tokens))
            elif kind == "decode" and seq.num_computed_tokens == len(seq):
                seq.append_token(b)
                if bm.can_append(seq):
                    bm.may_append(seq)
                    seq.num_computed_tokens += 1
                    bm.mark_computed(seq)
                    writes.append((seq, len(seq) - 1, len(seq)))
                else:
                    seq.token_ids.pop()
            elif kind == "free":
                bm.deallocate(seq)
                live.remove(seq)
            elif kind == "preempt":
                bm.preempt(seq)
                seq.reset_for_recompute()
                live.remove(seq)
                preempted.append(seq)
        bm.background_copies(preempted)   # prefetch for the requests waiting to come back, write-ahead
        if landing is None:
            store.copy(bm)    # the step's copies, then its forward
        else:
            store.queue_copies(bm)   # queued; lands what the forward waits for
        for seq, start, end in writes:
            check_pages(store, seq, start)   # the forward reads its rows' earlier tokens...
            store.write(seq, start, end)     # ...and writes the new ones
        bm.launched()
        if landing is not None:   # some copies land; the runner reports them
            bm.copies_landed(*store.land_some(landing, bm.clock))
        check(bm, store, live)
    for stream in ("in", "out"):
        store.land_up_to(stream, bm.clock)
    bm.copies_landed(*store.done(bm.clock))
    for seq in live:
        bm.deallocate(seq)
    bm.take_copies()
    check(bm, store, [])
    assert bm.num_free_blocks == num_blocks
    assert bm.num_free_host_blocks + bm.num_used_host_blocks == num_host
    return bm


def computed_seq(bm, tokens):
    seq = Sequence(tokens, SP, BS)
    assert admit(bm, None, seq)
    seq.num_computed_tokens = len(seq)
    bm.mark_computed(seq)
    return seq


def test_evicted_prefix_is_written_back_and_restored():
    bm = BlockManager(4, BS, num_host_blocks=8)
    a = computed_seq(bm, list(range(9)))          # 3 pages, 2 of them full and cached
    bm.preempt(a)                                 # preempted: its pages are worth a write-back
    bm.take_copies()
    b = computed_seq(bm, [50 + i for i in range(13)])  # 4 pages: evicts a's two cached pages
    swap_out, swap_in, *_ = bm.take_copies()
    assert len(swap_out) == 2 and not swap_in
    assert bm.num_used_host_blocks == 2
    bm.deallocate(b)
    c = Sequence(list(range(9)) + [77], SP, BS)
    hits, pending = bm.match(c)
    assert not pending and len(hits) == 2 and all(h < 0 for h in hits)   # both in host memory
    bm.allocate(c, hits)
    assert not bm.swap_in and len(bm.restore_backlog) == 2   # queued: they go out once the step is scheduled
    bm.issue_restores()
    swap_out, swap_in, *_ = bm.take_copies()
    assert swap_in == [(-1 - hits[0], c.block_table[0]), (-1 - hits[1], c.block_table[1])]
    assert len(swap_out) == 2   # the pages it takes held b's prompt pages: written back in turn
    assert c.num_computed_tokens == 8 and bm.num_host_hit_tokens == 8
    assert set(c.block_hashes[:2]) <= set(bm.host_hash_to_page)   # the host keeps its copies
    bm.deallocate(c)
    bm.check_invariants()
    bm.launched()
    computed_seq(bm, [90 + i for i in range(13)])   # evicts c's restored pages: the host has them already
    swap_out, *_ = bm.take_copies()
    assert not {bm.host_hash[h] for _, h in swap_out} & set(c.block_hashes[:2])


def test_host_hits_ignored_when_restoring_does_not_pay():
    bm = BlockManager(4, BS, num_host_blocks=8)
    a = computed_seq(bm, list(range(9)))
    bm.preempt(a)
    b = computed_seq(bm, [50 + i for i in range(13)])
    bm.deallocate(b)
    bm.take_copies()
    bm.restore_pays = False
    c = Sequence(list(range(9)), SP, BS)
    assert bm.match(c) == ([], False)
    bm.allocate(c, [])        # recomputed: the GPU registers the hashes, the host copies stay (equal bytes)
    bm.take_copies()
    assert set(c.block_hashes[:2]) <= set(bm.host_hash_to_page)
    assert set(c.block_hashes[:2]) <= set(bm.hash_to_block_id)
    bm.check_invariants()


def test_copy_waits_for_the_step_in_flight_only_for_pages_freed_since_it_was_scheduled():
    bm = BlockManager(4, BS, num_host_blocks=8)
    bm.begin_step()
    a = computed_seq(bm, list(range(9)))
    bm.launched()                    # a's prefill is in flight
    bm.preempt(a)                    # a preempted while it runs
    bm.take_copies()
    bm.begin_step()
    computed_seq(bm, [50 + i for i in range(13)])   # evicts a's pages: the copy must follow a's step
    swap_out, _, after_prev, *_ = bm.take_copies()
    assert swap_out and after_prev


def test_decode_pages_never_hit_are_dropped_prompt_pages_are_written_back():
    bm = BlockManager(6, BS, num_host_blocks=8)
    seq = computed_seq(bm, list(range(9)))               # 2 full prompt pages
    for t in range(7):                                   # decode fills pages 3 and 4
        seq.append_token(100 + t)
        bm.may_append(seq)
        seq.num_computed_tokens += 1
        bm.mark_computed(seq)
    assert len(bm.hash_to_block_id) == 4   # 2 prompt pages, 2 filled by decode
    bm.deallocate(seq)
    bm.take_copies()
    computed_seq(bm, [200 + i for i in range(23)])       # 6 pages: evicts everything
    swap_out, *_ = bm.take_copies()
    assert sorted(bm.host_hash[h] for _, h in swap_out) == sorted(seq.block_hashes[:2])


def test_probation_pages_never_push_protected_ones_out_of_the_host():
    """Segmented LRU: a prompt page never hit (probation) is written back only into free room or in
    place of older probation pages; a page that was hit (protected) evicts probation pages first."""
    bm = BlockManager(4, BS, num_host_blocks=2)
    shared = computed_seq(bm, list(range(9)))                 # 2 full prompt pages
    other = Sequence(list(range(8)) + [42], SP, BS)
    assert admit(bm, None, other)                             # hits them: protected
    bm.deallocate(shared)
    bm.deallocate(other)
    bm.take_copies()
    once = computed_seq(bm, [60 + i for i in range(13)])      # 4 pages: evicts the shared ones
    assert len(bm.host_protected) == 2 and not bm.host_probation
    bm.deallocate(once)                                       # its 3 full pages: probation, never hit
    bm.take_copies()
    computed_seq(bm, [90 + i for i in range(13)])             # evicts once's pages: host full of protected
    assert len(bm.host_protected) == 2 and not bm.host_probation
    assert set(bm.host_hash_to_page) == set(shared.block_hashes[:2])   # the shared prefix stayed
    assert bm.num_host_dropped == 3
    bm.check_invariants()


def test_write_ahead_skips_pages_the_step_in_flight_may_use_and_spares_the_eviction_its_copy():
    bm = BlockManager(6, BS, num_host_blocks=8)
    bm.begin_step()
    a = computed_seq(bm, list(range(9)))   # 2 full prompt pages, cached
    bm.launched()
    bm.deallocate(a)                       # freed while its step is in flight: it may still write them
    bm.take_copies()
    bm.background_copies([])
    assert not bm.write_ahead_pairs
    bm.take_copies()
    bm.begin_step()
    bm.launched()                          # a later step is in flight now
    bm.background_copies([])
    ahead = bm.take_copies().write_ahead
    assert sorted(bm.host_hash[h] for _, h in ahead) == sorted(a.block_hashes[:2])
    bm.begin_step()
    computed_seq(bm, [50 + i for i in range(23)])   # 6 pages: evicts a's pages, already on host
    swap_out, *_ = bm.take_copies()
    assert not swap_out
    assert set(a.block_hashes[:2]) <= set(bm.host_hash_to_page)
    bm.check_invariants()


def host_only_prefixes(bm, *prompts):
    """Compute each prompt, free it, then evict its pages with an allocation that is never computed
    (so the pages it leaves free are clean): each prompt's full pages end up in host memory only.
    Ends with a launched step, so that pages freed before count as unused by the step in flight."""
    bm.begin_step()
    seqs = [computed_seq(bm, p) for p in prompts]
    for seq in seqs:
        bm.deallocate(seq)
    bm.take_copies()
    bm.launched()
    bm.begin_step()
    evictor = Sequence([900 + i for i in range(bm.num_blocks * BS)], SP, BS)
    bm.allocate(evictor, [])
    bm.deallocate(evictor)
    bm.take_copies()
    bm.launched()
    bm.begin_step()
    bm.launched()
    for seq in seqs:
        assert set(seq.block_hashes[:2]) <= set(bm.host_hash_to_page) and not set(seq.block_hashes[:2]) & set(bm.hash_to_block_id)


def test_readmission_without_host_hits_does_not_wait_behind_other_requests_restores():
    """A request preempted while its restores were queued, re-admitted with no host hits, runs at once:
    its old ticket must not hold it until restores queued by others have gone out."""
    bm = BlockManager(8, BS, num_host_blocks=8)
    x, y = list(range(9)), [100 + i for i in range(9)]
    host_only_prefixes(bm, x, y)
    bm.begin_step()
    other = Sequence(y + [5], SP, BS)
    assert admit(bm, None, other)      # 2 restores queued, tickets 1 and 2
    seq = Sequence(x + [5], SP, BS)
    assert admit(bm, None, seq)        # 2 more, tickets 3 and 4
    assert len(bm.restore_backlog) == 4 and not bm.restores_landed(seq)
    bm.preempt(seq)                    # its queued restores go; the other request's stay
    seq.reset_for_recompute()
    assert len(bm.restore_backlog) == 2
    bm.take_copies()
    bm.restore_pays = False            # re-admitted as a recompute: no host hits
    assert admit(bm, None, seq)
    bm.begin_step()
    assert bm.restores_landed(seq) and not bm.restores_landed(other)
    bm.check_invariants()


def test_step_that_waits_for_its_restores_carries_no_background_copies():
    """A restoring request with nothing else to run is prefilled at once and its step's forward waits
    for its restores: that step must not carry prefetches (nor write-aheads) it would wait for too."""
    from types import SimpleNamespace
    from nanovllm.engine.scheduler import Scheduler
    config = SimpleNamespace(max_num_seqs=1, max_num_batched_tokens=64, kvcache_block_size=BS,
                             enable_prefix_caching=True, host_kv_prefetch=True, host_kv_write_ahead=True,
                             schedule_policy="fcfs", max_wait_s=10.0, seed=0)
    scheduler = Scheduler(config, num_blocks=6, num_host_blocks=8)
    bm = scheduler.block_manager
    x, y = list(range(9)), [100 + i for i in range(9)]
    host_only_prefixes(bm, x, y)
    restoring, waiting = Sequence(x + [5], SP, BS), Sequence(y + [5], SP, BS)
    scheduler.add(restoring)
    scheduler.add(waiting)   # max_num_seqs 1: it stays waiting, its host pages would fit the free pages
    scheduled, is_prefill = scheduler.schedule()
    assert scheduled == [restoring] and is_prefill
    swap_out, swap_in, _, wait_for_restores, write_ahead, *_ = bm.take_copies()
    assert wait_for_restores
    assert [gpu for _, gpu in swap_in] == restoring.block_table[:2]   # its own restores, nothing else
    assert not write_ahead and not swap_out and bm.num_prefetched == 0
    bm.check_invariants()


def test_background_copies_stay_within_the_copy_budget():
    """Queued restores take the budget first; write-ahead gets what is left, and nothing when they
    used it all (before, it sent a quarter of the budget regardless: a step's copies could outlast it)."""
    for budget, expected_ahead in ((4, 0), (5, 1), (8, 2)):
        bm = BlockManager(8, BS, num_host_blocks=16, prefetch=False)
        bm.copy_budget = budget
        x, y, z = list(range(9)), [100 + i for i in range(9)], [200 + i for i in range(9)]
        host_only_prefixes(bm, x, z)
        bm.begin_step()
        cached = computed_seq(bm, y)   # 2 cached prompt pages the host lacks: write-ahead's candidates
        bm.deallocate(cached)
        bm.take_copies()
        bm.launched()
        bm.begin_step()
        bm.launched()
        bm.begin_step()
        assert admit(bm, None, Sequence(x + [5], SP, BS)) and admit(bm, None, Sequence(z + [5], SP, BS))
        assert len(bm.restore_backlog) == 4
        bm.background_copies([])
        swap_out, swap_in, _, _, write_ahead, *_ = bm.take_copies()
        assert not swap_out and len(swap_in) == min(budget, 4) and len(write_ahead) == expected_ahead, \
            (budget, swap_in, write_ahead)
        bm.check_invariants()


def test_asynchronous_restores_run_only_once_reported_landed():
    """CUDA (sync_copies off): a restoring request, and a request hitting a page restored or
    prefetched, wait until the runner reports the copy batch landed (`copies_landed`), not just until
    a step carrying it was launched; until then they would make a forward wait on the device."""
    bm = BlockManager(8, BS, num_host_blocks=16)
    x, z = list(range(9)), [200 + i for i in range(9)]
    host_only_prefixes(bm, x, z)
    bm.sync_copies = False
    bm.begin_step()
    a = Sequence(x + [5], SP, BS)
    assert admit(bm, None, a)
    bm.background_copies([Sequence(z + [6], SP, BS)])   # a's restores, and z's pages prefetched
    copies = bm.take_copies()
    assert len(copies.swap_in) == 4 and copies.wait_in == copies.wait_out == -1
    bm.launched()
    for _ in range(2):   # launched steps later, nothing reported: still in flight
        bm.begin_step()
        assert not bm.restores_landed(a)
        assert bm.match(Sequence(x + [7], SP, BS))[1] and bm.match(Sequence(z + [7], SP, BS))[1]   # pending
        bm.take_copies()
        bm.launched()
    bm.copies_landed(copies.batch, copies.batch)
    assert bm.restores_landed(a)
    hits, pending = bm.match(Sequence(z + [7], SP, BS))
    assert not pending and len(hits) == 2 and min(hits) >= 0   # the prefetched pages, now GPU hits
    bm.deallocate(a)
    bm.check_invariants()


def test_a_page_written_ahead_is_waited_for_only_by_the_step_that_writes_it():
    """A free page whose write-back ahead is in flight may be read (a hit) without waiting; the step
    that takes it for new tokens waits for that copy batch, unless it was reported landed."""
    for reported in (False, True):
        bm = BlockManager(4, BS, num_host_blocks=16)
        bm.begin_step()
        cached = computed_seq(bm, list(range(9)))   # 2 cached prompt pages the host lacks
        bm.deallocate(cached)
        bm.take_copies()
        bm.launched()
        bm.begin_step()
        bm.launched()   # a step launched since they were freed: write-ahead may take them
        bm.sync_copies = False
        bm.begin_step()
        bm.background_copies([])
        copies = bm.take_copies()
        assert len(copies.write_ahead) == 2
        bm.launched()
        if reported:
            bm.copies_landed(-1, copies.batch)   # the write-backs landed
        bm.begin_step()
        reader = Sequence(list(range(9)) + [1], SP, BS)
        assert admit(bm, None, reader) and bm.wait_out == -1   # hits only read the pages
        bm.deallocate(reader)
        writer = Sequence([50 + i for i in range(13)], SP, BS)   # 4 pages: takes the two written ahead
        assert admit(bm, None, writer)
        taken = bm.take_copies()
        assert taken.wait_out == (-1 if reported else copies.batch) and taken.wait_in == -1
        bm.launched()
        assert bm.out_done == copies.batch   # waited for by a launched forward: landed for later steps
        bm.deallocate(writer)
        bm.check_invariants()


def test_with_copy_feedback_the_forward_writes_clean_pages_and_skips_its_batchs_write_backs():
    """Copy feedback (sync_copies off): a page the step's forward writes is taken clean when one is among
    the oldest free pages, past dirty ones (a write-back would queue behind earlier restores on the copy
    stream, and the forward would wait for it); the dirty ones go to restores, whose copies follow their
    write-backs on the stream. A step whose forward writes none of its batch's write-back pages does not
    wait for them (`wait_own_out`); one that does, waits. The property tests above check the bytes."""
    bm = BlockManager(6, BS, num_host_blocks=16)
    x = list(range(9))
    host_only_prefixes(bm, x)   # x's two full pages are in host memory only
    bm.sync_copies = False
    bm.begin_step()
    run = computed_seq(bm, [400 + i for i in range(4)])    # one full page; its next token starts another
    y = computed_seq(bm, [300 + i for i in range(8)])      # two full cached pages the host lacks (dirty)
    z = computed_seq(bm, [500 + i for i in range(5)])      # a dirty full page and a clean partial one
    w = computed_seq(bm, [600])                            # a clean partial page
    free = [y.block_table[1], y.block_table[0], z.block_table[1], z.block_table[0], w.block_table[0]]
    for seq in (y, z, w):   # last pages first: y1, y0 (dirty), z1 (clean), z0 (dirty), w0 (clean), oldest first
        bm.deallocate(seq)
    assert list(bm.free_block_ids) == free
    bm.take_copies()
    bm.launched()
    bm.begin_step()
    bm.launched()   # a step since they were freed: none is used by the step in flight

    bm.begin_step()
    run.append_token(7)
    bm.may_append(run)
    assert run.block_table[-1] == free[2]   # past the two dirty pages at the LRU end
    assert not bm.take_copies().swap_out
    bm.launched()

    bm.begin_step()
    c = Sequence(x + [77], SP, BS)          # two host hits to restore, and one page of its own
    assert admit(bm, None, c)
    bm.issue_restores()
    copies = bm.take_copies()
    assert sorted(g for g, _ in copies.swap_out) == sorted(free[:2])   # the restores' pages: y's, written back
    assert c.block_table[2] == free[4] and not copies.wait_own_out     # its own page: clean, past z0
    bm.launched()

    bm.begin_step()
    d = Sequence([700 + i for i in range(3)], SP, BS)   # its one page can only be z0, dirty
    assert admit(bm, None, d)
    copies = bm.take_copies()
    assert [g for g, _ in copies.swap_out] == [free[3]] and copies.wait_own_out
    bm.check_invariants()
