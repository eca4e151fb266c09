"""KV pages: allocation, ref counts and the prefix cache.

A full page is identified by a chained hash, xxh64 of its token ids seeded with the previous page's
hash, so equal hashes mean equal prefixes. Hits are confirmed by comparing the page's token ids (as
bytes: a memcmp, since matching 8k-token prompts touches hundreds of pages per request). Prompts that
start alike take the shared pages' hashes from a recent prompt instead of hashing them (`_hash_prompt`:
W3's 1,024 prompts hash their 8,192-token system prompt once). A page is registered under
its hash as soon as it is allocated for a prompt, but it only counts as a hit once its K/V are
computed: a request that would hit a page still being computed waits a step (see `match`), so that
requests arriving together with the same system prompt compute it once, not once each.
Freed pages keep their hash and contents until they are handed out again (least recently freed first).

Host tier (num_host_blocks > 0): a page handed out again while it still holds a cached prefix worth
keeping is first written back to a host page (`swap_out`, GPU page -> host page) instead of being
dropped. The host is a segmented LRU: a page that proved itself (it was hit, restored, or belongs to
a preempted sequence) is PROTECTED; a prompt page never hit yet is on PROBATION, written back into
free host room or in place of older probation pages, never of protected ones (a request's own
question must not push a shared system prompt out). A page filled by decode and never hit (an
answer) is dropped as before, so it costs no copy and no host room.
`match` follows the hash chain through both tiers; a hit in host memory is copied into a fresh GPU
page (`swap_in`, host page -> GPU page), if engine/copy_costs.py's measured choice says a restore is
cheaper than recomputing it (`restore_pays`). A hash may live in both tiers: the host keeps its copy
of a restored or recomputed page (a later eviction then copies nothing), and a host page is dropped
only from the host's LRU end.

This class only decides the copies; `take_copies` hands them to the step (engine/scheduled_step.py)
as one copy batch (`StepCopies`) and every rank's runner executes them on its own pools, on a side
stream, in this order: swap_out (write-backs on eviction), write_ahead (background write-backs),
swap_in (restores). A step's forward waits for its own write-backs (it may reuse those pages) and for
all earlier copies. (With NANOVLLM_HOST_COPY_FEEDBACK=1, `sync_copies` off: it waits only for the
earlier copies of pages it reads or writes, `_uses`, restores count as landed when the runner reports
them, `copies_landed`, and write-backs and restores may go on two streams that wait for each other
where a page says so, `_note_write_back` / `_note_restore`. Measured on W6, no faster: engine/host_tier.py.)
Restores come from two places, and both are handed to a step only once its scheduling is
done (no page is allocated or freed in that step after them):
- a request admitted with host hits (`allocate`): its restores are queued (`restore_backlog`) while
  the step is scheduled and `background_copies` hands all of them to the step, prefill or decode (the
  scheduler charged them against the step's token budget at admission, `restore_token_cost`, so a
  step's restores last about what a full prefill step would). The request stays unscheduled until
  its restores went out in a step launched before this one (`restores_landed`, by ticket; with
  feedback: reported landed): it runs in the next step, whose forward waits for them, with the group
  members that waited for its pages.
  Only when nothing else can run does the scheduler run it in the same step, whose forward then
  waits for the restores (`wait_for_restores`); such a step carries no background copies, which its
  forward would wait for too. (Until W6 on the H200, the queue went out `copy_budget` pages a step,
  which split lpm's groups: claude_docs/memory.md.)
- prefetch (`background_copies`): host pages of waiting requests, into clean free GPU pages.
A restored page counts as computed once the step that issues its copy is launched (`launched`); a
request that matches it before waits (`match`), so only a later step's forward reads it (or, under
`wait_for_restores`, its own step's).

Why this order is safe:
- A host page that a restore will read is pinned (out of the LRU, so no write-back picks it as its
  victim) from when the restore is decided until the copies of the step that issues it are taken; a
  later write into that host page follows the read on the copy stream.
- Nothing else uses a restore's GPU page before the step after the one that issues it, whose forward
  waits for the copy. A queued restore's page belongs to its request from `allocate` on (preempting or
  aborting the request drops its queued restores, `deallocate`). A prefetched page is a clean free
  page (`_is_clean`) that nothing takes in its step (prefetch runs after the step is scheduled) and
  write-ahead skips (not computed yet). A page evicted and restored by the same allocation is written
  back first (swap_out before swap_in, on one stream; on two, `in_after_out` names this batch).
- A write-back's GPU page is not overwritten before it is read: an evicted page is written only by
  its step's restores (queued after the write-backs) and forward (which waits for them); a page
  written ahead is free, and a later step that takes it waits for this step's copies.
- The step in flight may still read or write a page freed since it was scheduled (pages are stamped
  with the scheduling clock). `copy_after_prev` says whether a copy touches such a page (`_note_copy`:
  a write-back on eviction, an issued restore's page): only then must the step's copies wait for the
  step in flight; otherwise they overlap it. Prefetch and write-ahead take only pages freed before it
  (`_is_clean`, `_write_ahead`), so they never make the copies wait.
"""
import struct
from collections import OrderedDict, deque
from typing import NamedTuple

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


DROP, PROBATION, PROTECTED = 0, 1, 2   # Block.keep


class StepCopies(NamedTuple):
    """A step's host-tier copies, as `take_copies` hands them to the step (engine/scheduled_step.py)."""
    swap_out: list          # (GPU page, host page): write-backs of evicted pages, before the forward
    swap_in: list           # (host page, GPU page): restores, after swap_out
    after_prev: bool        # the copies touch a page the step in flight may still use: they wait for it
    wait_for_restores: bool  # this step's forward reads pages its swap_in restores
    write_ahead: list       # (GPU page, host page): background write-backs, after swap_out
    batch: int              # this step's copy batch (its scheduling clock)
    wait_in: int            # the forward waits for the restores of the batches up to this one (-1: none)
    wait_out: int           # ... and for the write-backs of the batches up to this one
    out_after_in: int       # this batch's write-backs wait for the restores of the batches up to this one
    in_after_out: int       # its restores wait for the write-backs up to this batch (its own: its swap_out)
    wait_own_out: bool = True   # the forward waits for this batch's swap_out (False: it writes none of those pages)
# Background write-backs a step at most: scanning 4 x 4,096 free pages a step cost 17 ms of host
# time per step in the W6 simulation (2-core CPU); 2 x 256 keeps it under ~1 ms.
WRITE_AHEAD_PAGES = 256
# Free pages looked at, oldest first, for one a forward may write without waiting for a write-back.
CLEAN_SCAN = 16


def is_host_hit(hit: int) -> bool:
    """`match` returns GPU pages as their ids and host pages h as -1 - h."""
    return hit < 0


class Block:
    """One GPU page's state. Its reference count lives in the block manager's `ref_counts` array (allocation and
    freeing update a request's 500 shared pages with one numpy operation each); `ref_count` reads and writes it."""
    __slots__ = ("block_id", "counts", "hash", "token_key", "computed", "freed_at", "keep", "landing", "read_out")

    def __init__(self, block_id: int, counts: np.ndarray):
        self.block_id = block_id
        self.counts = counts
        self.hash = -1
        self.token_key = b""  # its token ids as int64 bytes, once hashed
        self.computed = False
        self.freed_at = -1    # the scheduling clock when it was last freed
        self.keep = DROP      # what a write-back to the host tier makes of it: DROP, PROBATION, PROTECTED
        self.landing = -1     # the copy batch (scheduling clock) of the last restore into it
        self.read_out = -1    # the copy batch of the last write-back out of it (on eviction or ahead)

    @property
    def ref_count(self) -> int:
        return int(self.counts[self.block_id])

    @ref_count.setter
    def ref_count(self, value: int):
        self.counts[self.block_id] = value

    def reset(self):
        self.counts[self.block_id] = 1
        self.hash = -1
        self.token_key = b""
        self.computed = False
        self.keep = DROP


# Prompts kept for alike prompts to take their page hashes from (BlockManager._hash_prompt): each holds its
# bytes and two lists (an 8k-token prompt: ~75 KB, ~19 MB for 256 of them once their requests are gone).
RECENT_PROMPTS = 256


class BlockManager:

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_host_blocks: int = 0,
                 prefetch: bool = True, write_ahead: bool = True):
        self.block_size = block_size
        self._pack_page = struct.Struct(f"{block_size}q").pack   # one page's token ids as bytes (its key)
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)   # each page's holders (Block.ref_count)
        self.blocks = [Block(i, self.ref_counts) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Recent prompts by the hash of the first page each had to hash itself: (that page's index, prompt
        # bytes, page hashes, page keys), for alike prompts to take their hashes (`_hash_prompt`). Insertion
        # order: the least recently used entry goes first past RECENT_PROMPTS.
        self.prompt_index: dict[int, tuple[int, bytes, list[int], list[bytes]]] = {}
        # Recent matches by their first page's hash: (page hashes, page keys, GPU pages) of the longest run of
        # hits seen, for a request with the same leading pages to take them without a lookup a page (`match`; W3:
        # 512 pages, 1,024 requests). Only without a host tier; emptied whenever a page registered under its hash
        # loses it (`_forget`): the only way a hit stops being one (computed pages stay computed until then).
        self.hit_runs: dict[int, tuple[list[int], list[bytes], list[int]]] = {}
        # Ordered so that the least recently freed page is reused first: cached prefixes live longest.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_cache_hit_tokens = 0   # prompt tokens served from the cache (either tier), for metrics
        self.num_cache_query_tokens = 0
        # The host tier: each host page's hash and token key; occupied pages in LRU order (oldest
        # first); free pages; pages a restore reads this step (out of the LRU until the step's copies
        # are taken, so no write-back can pick them as its victim), with the segment they go back to.
        self.num_host_blocks = num_host_blocks
        self.host_hash = [-1] * num_host_blocks
        self.host_key = [b""] * num_host_blocks
        self.host_hash_to_page: dict[int, int] = {}
        self.host_probation: OrderedDict[int, None] = OrderedDict()   # oldest first; evicted first
        self.host_protected: OrderedDict[int, None] = OrderedDict()
        self.host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))
        self.host_pinned: dict[int, OrderedDict] = {}
        self.prefetch = prefetch          # restore waiting requests' host pages into clean free GPU pages
        self.write_ahead = write_ahead    # copy the LRU end of the free GPU pages to host before eviction
        self.own_out = False              # this step's forward writes a page its batch writes back (_uses)
        self.copy_budget = 128            # pages a step's background copies may move (set per step from `costs`)
        self.costs = None                 # engine/copy_costs.py's CopyCosts (measured), or None: 128 pages a step
        self.write_ahead_pairs: list[tuple[int, int]] = []   # this step's background (GPU page, host page) copies
        # Restores of requests admitted this step wait here until the step is scheduled, then all go
        # out with it; a request runs once all of its restores went out a step before.
        self.restore_backlog: deque[tuple[int, int]] = deque()   # (host page, GPU page), oldest first
        self.restores_queued = 0   # restores ever queued: a request's ticket is the count after its own
        self.restores_issued = 0   # the ticket of the last restore handed to a step
        self.restores_ready = 0    # the ticket of the last restore known landed (`copies_landed`)
        self.issued_batches: deque[tuple[int, int]] = deque()   # (copy batch, ticket issued through) not landed
        # Copy batches: a step's copies are batch `clock`: its write-backs (swap_out, then write_ahead)
        # in order on one stream ("out"), its restores in order on another ("in"), so that neither waits
        # for the other unless a page says so. `in_done` / `out_done`: the last batch whose restores /
        # write-backs are known complete (reported by the runner, `copies_landed`, or waited for by a
        # launched forward). `sync_copies` (the default, and on CUDA unless NANOVLLM_HOST_COPY_FEEDBACK=1:
        # engine/llm_engine.py): a restore counts as landed once its step is launched and every forward
        # waits for all earlier copies (CPU: done by then); off, the runner's reports and per-page waits.
        self.sync_copies = True
        self.in_done = self.out_done = -1
        self.last_copy_batch = -1   # the last batch that had any copies
        self.wait_in = self.wait_out = -1             # this step's forward waits (StepCopies)
        self.out_after_in = self.in_after_out = -1    # this step's copies wait for the other stream
        self.host_read = [-1] * num_host_blocks      # a host page's last restore batch (read by the in stream)
        self.host_written = [-1] * num_host_blocks   # a host page's last write-back batch (out stream)
        self.restore_pays = True        # a host hit is restored (else recomputed): the scheduler's cost choice
        self.swap_out: list[tuple[int, int]] = []   # this step's (GPU page, host page) write-backs
        self.swap_in: list[tuple[int, int]] = []    # this step's (host page, GPU page) restores
        self.copy_after_prev = False
        self.wait_for_restores = False   # this step's forward reads pages it restores (else the next step's does)
        self.restored: list[int] = []    # GPU pages restored this step: computed once the step is launched
        self.clock = 0          # scheduling steps so far
        self.launch_clock = -1  # the clock of the step launched last
        self.num_host_hit_tokens = 0    # prompt tokens restored from the host tier
        self.num_swapped_out = 0        # pages written back to host
        self.num_swapped_in = 0         # pages restored from host
        self.num_host_dropped = 0       # host pages dropped from the LRU end (or not stored: host full this step)
        self.num_prefetched = 0         # pages restored ahead of admission (also in num_swapped_in)
        self.num_written_ahead = 0      # pages written back ahead of eviction (also in num_swapped_out)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self.host_free)

    @property
    def num_used_host_blocks(self) -> int:
        return len(self.host_probation) + len(self.host_protected) + len(self.host_pinned)

    def host_eviction_order(self) -> list[int]:
        """Occupied host pages, the next one dropped first (pages a restore reads this step last)."""
        return list(self.host_probation) + list(self.host_protected) + list(self.host_pinned)

    # ---- steps and copies ---------------------------------------------------------------------
    def begin_step(self):
        self.clock += 1

    def restores_landed(self, seq: Sequence) -> bool:
        """All of `seq`'s restores are known to have landed (CPU: went out in a launched step)."""
        return seq.restore_ticket <= self.restores_ready

    def copies_landed(self, in_batch: int, out_batch: int):
        """The restores of the batches up to `in_batch` and the write-backs up to `out_batch` are complete
        (the runner's report, or a forward waited for them)."""
        self.out_done = max(self.out_done, out_batch)
        if in_batch <= self.in_done:
            return
        self.in_done = in_batch
        while self.issued_batches and self.issued_batches[0][0] <= in_batch:
            self.restores_ready = self.issued_batches.popleft()[1]

    def copies_in_flight(self) -> bool:
        return self.last_copy_batch > min(self.in_done, self.out_done)

    def wait_for_copies(self):
        """Nothing can run until copies land: the next launched step's forward waits for all of them on
        the device (the waits hold until a step is launched), instead of the engine idling until a
        report says they landed; from now on they count as landed."""
        self.wait_in = max(self.wait_in, self.last_copy_batch)
        self.wait_out = max(self.wait_out, self.last_copy_batch)
        self.copies_landed(self.last_copy_batch, self.last_copy_batch)

    def _uses(self, block: Block, writes: bool):
        """This step's forward reads `block` (or writes it): it waits for the restore into it (and for a
        write-back reading it), unless known landed. Its own batch's copies are not waited for here: it
        waits for its write-backs anyway, and reads its restores only under `wait_for_restores`. (`allocate` inlines
        the read case: it runs for every page a request hits.)"""
        if self.in_done < block.landing < self.clock:
            self.wait_in = max(self.wait_in, block.landing)
        if writes and self.out_done < block.read_out < self.clock:
            self.wait_out = max(self.wait_out, block.read_out)
        if writes and block.read_out == self.clock:   # written back in this very batch
            self.own_out = True

    def _note_write_back(self, block: Block, page: int):
        """GPU page `block` goes to host page `page` in this batch (out stream): after any restore into
        that GPU page or out of that host page still in flight."""
        for batch in (block.landing, self.host_read[page]):
            if batch > self.in_done:
                self.out_after_in = max(self.out_after_in, batch)
        block.read_out = self.host_written[page] = self.clock

    def _note_restore(self, page: int, block: Block):
        """Host page `page` comes into GPU page `block` in this batch (in stream): after any write-back
        out of that GPU page or into that host page still in flight (this batch's own: its swap_out)."""
        for batch in (block.read_out, self.host_written[page]):
            if batch > self.out_done:
                self.in_after_out = max(self.in_after_out, batch)
        block.landing = self.host_read[page] = self.clock

    def issue_restores(self) -> int:
        """Hand every queued restore to this step (their pages count as computed once it is
        launched). Returns how many went."""
        n = len(self.restore_backlog)
        for _ in range(n):
            page, block_id = self.restore_backlog.popleft()
            self.swap_in.append((page, block_id))
            self.restored.append(block_id)
            self._note_restore(page, self.blocks[block_id])
            self._note_copy(self.blocks[block_id])
        if n:
            self.issued_batches.append((self.clock, self.restores_queued))
        self.restores_issued = self.restores_queued
        return n

    def restore_token_cost(self, hits: list[int]) -> float:
        """What restoring `hits`' host pages counts against a step's prefill-token budget: their copy
        time in prefill tokens (measured: restore seconds a page over the prefill line's seconds a
        token), `block_size` tokens a page until both are measured (as if recomputed)."""
        pages = sum(hit < 0 for hit in hits) if self.num_host_blocks else 0   # host hits need a host tier
        if not pages:
            return 0.0
        per_page = float(self.block_size)
        costs = self.costs
        if costs is not None and costs.measured:
            restore, line = costs.restore_s_per_page, costs.prefill_line()
            if restore is not None and line is not None and line[1] > 0:
                per_page = min(per_page, restore / line[1])
        return pages * per_page

    def launched(self):
        """The step scheduled at this clock went to the device. Pages it restores count as computed
        from now on; a later step reads them once their batch landed (`match`, `restores_landed`), or
        waits for them (`wait_in`, `wait_out`). The batches its forward waited for count as landed for later steps
        (they run after it); with synchronous copies (CPU), so does its own."""
        self.launch_clock = self.clock
        for block_id in self.restored:
            self.blocks[block_id].computed = True
        self.restored = []
        if self.sync_copies:
            self.copies_landed(self.clock, self.clock)
        else:
            self.copies_landed(self.wait_in, self.wait_out)
        self.wait_in = self.wait_out = self.out_after_in = self.in_after_out = -1

    def take_copies(self) -> "StepCopies":
        """This step's copies (`StepCopies`). Host pages read by this step's restores go back to the
        LRU's recent end (protected: they were hit)."""
        if self.sync_copies:   # every forward waits for all earlier copies (on CPU they are done already)
            self.wait_in = self.wait_out = max(self.wait_in, self.wait_out, self.last_copy_batch)
        copies = StepCopies(self.swap_out, self.swap_in, self.copy_after_prev, self.wait_for_restores,
                            self.write_ahead_pairs, self.clock, self.wait_in, self.wait_out, self.out_after_in,
                            self.in_after_out, self.sync_copies or self.own_out)
        self.own_out = False
        if self.swap_out or self.swap_in or self.write_ahead_pairs:
            self.last_copy_batch = self.clock
        if self.wait_for_restores:   # its forward waits for its own restores: landed once it is launched
            self.wait_in = self.clock
        self.swap_out, self.swap_in, self.copy_after_prev, self.wait_for_restores = [], [], False, False
        self.write_ahead_pairs = []
        waiting = {page for page, _ in self.restore_backlog}   # still to be read: they stay pinned
        for page in [p for p in self.host_pinned if p not in waiting]:
            del self.host_pinned[page]
            self.host_protected[page] = None
        return copies

    def _note_copy(self, block: Block):
        if block.freed_at >= self.launch_clock:  # freed after the step in flight was scheduled
            self.copy_after_prev = True

    def _host_page_for(self, block: Block) -> int | None:
        """A host page for a write-back of `block` (its old contents dropped), or None: free room
        first, else the oldest probation page; only a protected page may replace a protected one."""
        if self.host_free:
            return self.host_free.pop()
        if self.host_probation or (block.keep == PROTECTED and self.host_protected):
            page, _ = (self.host_probation or self.host_protected).popitem(last=False)
            del self.host_hash_to_page[self.host_hash[page]]
            self.num_host_dropped += 1
            return page
        return None

    def _store_on_host(self, block: Block, pairs: list[tuple[int, int]]) -> bool:
        """Write back a cached GPU page (into `pairs`); False when the host has no room for it."""
        page = self._host_page_for(block)
        if page is None:  # probation may not push protected pages out (or every host page is being read)
            return False
        self.host_hash[page], self.host_key[page] = block.hash, block.token_key
        self.host_hash_to_page[block.hash] = page
        (self.host_protected if block.keep == PROTECTED else self.host_probation)[page] = None
        pairs.append((block.block_id, page))
        self._note_write_back(block, page)
        self.num_swapped_out += 1
        return True

    def _on_host(self, block: Block) -> bool:
        """The host holds the same page (a write-back would copy nothing new)."""
        page = self.host_hash_to_page.get(block.hash)
        return page is not None and self.host_key[page] == block.token_key

    def _pin_host_page(self, page: int):
        """A restore reads host page `page` this step: out of the LRU until the step's copies are taken."""
        if page in self.host_pinned:
            return
        segment = self.host_probation if page in self.host_probation else self.host_protected
        del segment[page]
        self.host_pinned[page] = segment

    def _register(self, block: Block):
        self.hash_to_block_id.setdefault(block.hash, block.block_id)

    def _forget(self, block: Block):
        """`block` is no longer the page of its hash (it is evicted or never finished)."""
        del self.hash_to_block_id[block.hash]
        if self.hit_runs:
            self.hit_runs.clear()

    def _is_clean(self, block: Block) -> bool:
        """Handing this free page out loses nothing worth a copy: no cached prefix, an answer page
        (DROP), or a prefix the host holds too. And the step in flight does not use it."""
        if block.freed_at >= self.launch_clock:
            return False
        if block.hash == -1 or self.hash_to_block_id.get(block.hash) != block.block_id or not block.computed:
            return True
        return not block.keep or self._on_host(block)

    def _next_free(self, for_forward: bool) -> int:
        """The free page to hand out: the LRU end; for a page this step's forward writes, with copy
        feedback (`sync_copies` off), the oldest clean one among the CLEAN_SCAN oldest if the LRU end
        is dirty, so that the forward need not wait for a write-back queued behind earlier restores on
        the copy stream (dirty pages go to restores, whose copies follow their write-backs there)."""
        if for_forward and self.num_host_blocks and not self.sync_copies:
            for scanned, block_id in enumerate(self.free_block_ids):
                if scanned == CLEAN_SCAN:
                    break
                if self._is_clean(self.blocks[block_id]):
                    del self.free_block_ids[block_id]
                    return block_id
        return self.free_block_ids.popitem(last=False)[0]

    def _take_free(self, for_forward: bool = False) -> Block:
        """The next free page for a new use (`_next_free`), its cached contents written back to host first
        where they are worth keeping. `for_forward`: this step's forward writes it. (A hit on a free page
        leaves the free list in `allocate`.)"""
        block_id = self._next_free(for_forward)
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            self._forget(block)   # its old contents are about to be overwritten
            if self.num_host_blocks and block.computed and block.keep and not self._on_host(block):
                if self._store_on_host(block, self.swap_out):
                    self._note_copy(block)
                else:
                    self.num_host_dropped += 1
        block.reset()
        return block

    # ---- background copies: prefetch and write-back ahead of eviction -------------------------
    def background_copies(self, waiting, is_prefill: bool = False, step_tokens: int = 0):
        """Called once a step is scheduled (and has rows to carry copies): hand out all queued
        restores, then, within what is left of `copy_budget` pages, restore the host pages of the
        waiting requests at the queue's head into clean free GPU pages (prefetch) and write the LRU
        end of the free GPU pages back to host (write-ahead). A step whose forward waits for its restores (a restoring request
        run at once) gets none of these: its forward would wait for them too."""
        if not self.num_host_blocks or self.wait_for_restores:
            return
        if self.costs is not None:   # as many pages as this step's forward lasts: none of it waits
            self.copy_budget = self.costs.step_budget(is_prefill, step_tokens)
        # Every restore queued while this step was scheduled goes out now: the scheduler bounded them
        # at admission (`restore_token_cost`), and the requests run next step, all together.
        budget = self.copy_budget - self.issue_restores()
        if self.prefetch and self.restore_pays and budget > 0:
            budget -= self._prefetch(waiting, budget)
        if self.write_ahead:   # at most WRITE_AHEAD_PAGES: its scan of the free list is host time every step
            self._write_ahead(min(budget, WRITE_AHEAD_PAGES))

    def _prefetch(self, waiting, budget: int) -> int:
        """Host pages of the waiting requests that would fit in the free pages, in queue order, each
        restored into the next free page if that one is clean (never a write-back, never a page of a
        running request). The restored pages are ordinary cached free pages (at the recent end of the
        free list), computed once this step is launched. Returns the pages restored."""
        restored = 0
        room = self.num_free_blocks
        for seq in waiting:
            room -= seq.num_blocks
            if room < 0 or restored >= budget:
                break
            hits, pending = self.match(seq)
            if pending:
                continue
            for i, hit in enumerate(hits):
                if hit >= 0:
                    continue
                if restored >= budget or not self._is_clean(self.blocks[next(iter(self.free_block_ids))]):
                    return restored
                page = -1 - hit
                block = self._take_free()
                block.hash, block.token_key = self.host_hash[page], self.host_key[page]
                block.keep = PROTECTED
                block.computed = False   # until this step is launched: a request matching it meanwhile waits
                block.ref_count = 0
                block.freed_at = self.clock
                self.free_block_ids[block.block_id] = None   # free, at the recent end
                self._register(block)
                self.restored.append(block.block_id)
                self._note_restore(page, block)
                self._pin_host_page(page)
                self.swap_in.append((page, block.block_id))
                self.num_swapped_in += 1
                self.num_prefetched += 1
                restored += 1
        return restored

    def _write_ahead(self, budget: int):
        """Write back cached prefix pages at the LRU end of the free list that the host lacks, so that
        handing them out later copies nothing. Scans at most 2 x budget pages."""
        scanned = 0
        for block_id in self.free_block_ids:
            if budget <= 0 or scanned >= 2 * budget:
                break
            scanned += 1
            block = self.blocks[block_id]
            if self._is_clean(block) or block.freed_at >= self.launch_clock:
                continue
            if self._store_on_host(block, self.write_ahead_pairs):
                self.num_written_ahead += 1
                budget -= 1

    def match(self, seq: Sequence) -> tuple[list[int], bool]:
        """Leading pages of `seq` already cached, and whether a longer match is still being computed.

        At least one token is always left to compute (a fully cached prompt still needs the logits
        of its last token), so the last page never counts as a hit; nor does any page of a prompt
        whose logprobs are asked (they need the logits of every prompt position)."""
        hits: list[int] = []
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return hits, False
        hashes = self.prefix_hashes(seq)
        keys = seq.block_keys
        run = self.hit_runs.get(hashes[0]) if hashes and not self.num_host_blocks else None
        if run is not None:
            run_hashes, run_keys, run_hits = run
            m = len(run_hits)
            if hashes[:m] == run_hashes and keys[:m] == run_keys:   # list compares in C (keys: often the same objects)
                hits = run_hits.copy()
        start = len(hits)
        host = self.num_host_blocks and self.restore_pays
        gpu_page, blocks, in_done = self.hash_to_block_id.get, self.blocks, self.in_done   # bound: a loop a page
        for i in range(start, len(hashes)):
            h, key = hashes[i], keys[i]
            block_id = gpu_page(h)
            if block_id is not None:
                block = blocks[block_id]
                if block.token_key == key:
                    if not block.computed or block.landing > in_done:   # computed or restored, not landed yet
                        return hits, True
                    hits.append(block_id)
                    continue
            page = self.host_hash_to_page.get(h) if host else None
            if page is None or self.host_key[page] != key:
                break
            hits.append(-1 - page)
        if len(hits) > start and not self.num_host_blocks:
            n = len(hits)
            self.hit_runs.pop(hashes[0], None)
            self.hit_runs[hashes[0]] = (hashes[:n], keys[:n], hits.copy())
            if len(self.hit_runs) > RECENT_PROMPTS:
                del self.hit_runs[next(iter(self.hit_runs))]
        return hits, False

    def prefix_hashes(self, seq: Sequence) -> list[int]:
        """Hashes of the pages that can be prefix hits (all full pages but one token)."""
        n = (len(seq) - 1) // self.block_size
        hashes = self._hashes(seq, n)
        return hashes if len(hashes) == n else hashes[:n]

    def first_page_hash(self, seq: Sequence) -> int | None:
        """The hash of the first page, when it can be a prefix hit: a shared-prefix group's key."""
        return self._hashes(seq, 1)[0] if len(seq) > self.block_size else None

    def cached_prefix_pages(self, seq: Sequence) -> int:
        """Leading pages of `seq` held in either tier (computed or not): the lpm policy's key."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        for h in self.prefix_hashes(seq):
            if h not in self.hash_to_block_id and h not in self.host_hash_to_page:
                break
            n += 1
        return n

    def _hashes(self, seq: Sequence, n: int) -> list[int]:
        """Chained hashes (and token keys, seq.block_keys) of at least the first n full pages, kept
        on the sequence: its tokens only grow. A prompt's pages come from its bytes (converted once, at
        validation), taking over what a recently hashed prompt has alike (`_hash_prompt`); pages past the
        prompt (filled by decode: 1,024 pages in one step of W3) are converted from the token ids."""
        hashes, keys = seq.block_hashes, seq.block_keys
        start = len(hashes)
        if start < n:
            bs = self.block_size
            if seq.prompt_bytes is not None and n * bs <= seq.num_prompt_tokens:
                self._hash_prompt(seq, n)
                return hashes
            # Chained: the previous page's hash seeds this one's (0 for the first page). A page's key is packed
            # with a precompiled Struct, as validation packs prompts: 0.4 us a page with its hash (numpy: 0.9).
            h = hashes[-1] if hashes else 0
            ids, pack, digest = seq.token_ids, self._pack_page, xxhash.xxh64_intdigest   # bound: a loop a page
            for i in range(start, n):
                key = pack(*ids[i * bs:(i + 1) * bs])
                h = digest(key, h)
                hashes.append(h)
                keys.append(key)
        return hashes

    def _hash_prompt(self, seq: Sequence, n: int):
        """Hash seq's first n prompt pages, taking the hashes and keys of the pages a recently hashed prompt
        has alike instead of hashing them: a system prompt shared by 1,024 requests (W3: 519 pages each) is
        hashed once, not 1,024 times (~100 us a request on the CPU machine, all in the first step scheduled,
        before the device has work; a numpy compare of the prompts' bytes instead).

        `prompt_index` is a small radix tree over recent prompts: a prompt is entered under the hash of the
        first page it had to hash itself (its first page, or the first one where it parted from every prompt
        entered before it). Hashing page i, a prompt looks its hash up; a prompt entered there shares its pages
        0..i (the chained hash, and page i's bytes, compared as a hit is), so the pages after i that their bytes
        show equal take its hashes. Where they part, the next page is hashed and looked up again."""
        hashes, keys = seq.block_hashes, seq.block_keys
        data, bs = seq.prompt_bytes, self.block_size
        width = 8 * bs
        index, digest = self.prompt_index, xxhash.xxh64_intdigest
        entered = False
        while len(hashes) < n:
            i = len(hashes)
            key = data[i * width:(i + 1) * width]
            h = digest(key, hashes[-1] if hashes else 0)
            hashes.append(h)
            keys.append(key)
            if entered:
                continue
            ref = index.get(h)
            if ref is None or ref[2] is hashes:
                index[h] = (i, data, hashes, keys)   # the first page no recent prompt has: seq is entered here
                if len(index) > RECENT_PROMPTS:
                    del index[next(iter(index))]
                entered = True
                continue
            page, ref_data, ref_hashes, ref_keys = ref
            if page != i or ref_keys[i] != key:
                entered = True   # a hash collision: hash the rest (and enter nothing)
                continue
            index[h] = index.pop(h)   # least recently used first out: a system prompt's entry stays
            pages = min(n, len(ref_hashes), len(ref_data) // width)
            if pages > i + 1:
                lo, hi = (i + 1) * bs, pages * bs
                differ = np.frombuffer(data, np.int64, hi - lo, lo * 8) != np.frombuffer(ref_data, np.int64, hi - lo,
                                                                                           lo * 8)
                first = int(differ.argmax())   # the first token that differs (0 if none does)
                same = i + 1 + first // bs if differ[first] else pages
                hashes.extend(ref_hashes[i + 1:same])
                keys.extend(ref_keys[i + 1:same])

    def can_allocate(self, seq: Sequence, hits: list[int]) -> bool:
        if self.num_free_blocks >= seq.num_blocks:   # enough whatever its hits (no count over W3's 512 a request)
            return True
        gpu_hits = np.array([hit for hit in hits if hit >= 0], dtype=np.intp)
        hits_in_use = int(np.count_nonzero(self.ref_counts[gpu_hits]))
        return self.num_free_blocks >= seq.num_blocks - hits_in_use

    def allocate(self, seq: Sequence, hits: list[int]):
        """Pages for `seq`: its GPU hits shared, its host hits restored into fresh pages, new pages
        for the rest. GPU hits are taken first, so that taking fresh pages cannot evict them."""
        assert not seq.block_table
        restoring = self.num_host_blocks and hits and min(hits) < 0
        gpu_hits = [hit for hit in hits if hit >= 0] if restoring else hits
        if gpu_hits:   # a request's pages are distinct: one numpy update each (W3: 512 a request)
            pages, counts, free = np.array(gpu_hits, dtype=np.intp), self.ref_counts, self.free_block_ids
            for page in pages[counts[pages] == 0].tolist():   # hits on free pages: in use again
                del free[page]
            counts[pages] += 1
            if self.num_host_blocks:   # what a write-back makes of them, and restores into them not known landed
                blocks, in_done, clock = self.blocks, self.in_done, self.clock
                for hit in gpu_hits:
                    block = blocks[hit]
                    block.keep = PROTECTED
                    if in_done < block.landing < clock:   # _uses(block, writes=False), inlined
                        self.wait_in = max(self.wait_in, block.landing)
            if not restoring:
                seq.block_table.extend(hits)
        if restoring:
            self._restore(seq, hits)
        else:   # no restores of its own: a ticket from an earlier admission must not hold it behind others'
            seq.restore_ticket = 0
        num_full = len(seq) // self.block_size if self.enable_prefix_caching else 0
        hashes = self._hashes(seq, num_full)
        for i in range(len(hits), seq.num_blocks):
            block = self._take_free(for_forward=True)
            self._uses(block, writes=True)
            if i < num_full:
                # Registered now, computed later: a request arriving meanwhile waits for it (see match).
                block.token_key = seq.block_keys[i]
                block.hash = hashes[i]
                block.keep = PROBATION
                self._register(block)
            seq.block_table.append(block.block_id)
        seq.num_computed_tokens = len(hits) * self.block_size
        if not seq.num_completion_tokens:  # a re-admission after preemption also hits its own output
            seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_marked_blocks = len(hits)
        self.num_cache_hit_tokens += seq.num_computed_tokens  # this admission's hits
        self.num_cache_query_tokens += len(seq)

    def _restore(self, seq: Sequence, hits: list[int]):
        """The block table of a request with host hits: each gets a fresh GPU page and a swap_in. The
        host keeps its copy (a later eviction of the GPU page then copies nothing)."""
        # Host hits leave the host LRU before any write-back below could pick them as its victim.
        for hit in hits:
            if hit < 0:
                self._pin_host_page(-1 - hit)
        for hit in hits:
            if hit < 0:
                page = -1 - hit
                block = self._take_free()
                block.hash, block.token_key = self.host_hash[page], self.host_key[page]
                block.keep = PROTECTED
                block.computed = False   # until its restore's step is launched: a request matching it meanwhile waits
                self._register(block)
                self.restores_queued += 1
                self.restore_backlog.append((page, block.block_id))
                self.num_swapped_in += 1
                self.num_host_hit_tokens += self.block_size
                hit = block.block_id
            seq.block_table.append(hit)
        seq.restore_ticket = self.restores_queued

    def preempt(self, seq: Sequence):
        """Free a preempted sequence's pages, marked PROTECTED for the host tier: it will want them again."""
        for block_id in seq.block_table:
            self.blocks[block_id].keep = PROTECTED
        self.deallocate(seq)

    def deallocate(self, seq: Sequence):
        if seq.restore_ticket > self.restores_issued:   # restores still queued: they go with it
            mine = set(seq.block_table)
            kept = deque(entry for entry in self.restore_backlog if entry[1] not in mine)
            dropped = len(self.restore_backlog) - len(kept)
            self.num_swapped_in -= dropped
            self.num_host_hit_tokens -= dropped * self.block_size
            self.restore_backlog = kept
            if not kept:
                self.restores_issued = self.restores_queued
        # One numpy update for its pages (distinct), then the pages nobody holds now join the free list, last pages
        # first, so that a prefix outlives its tails there. Their free time (`freed_at`) matters
        # only to a host tier. (W3's last step frees 1,024 requests of 536 pages: on the CPU machine, with the
        # engine's other host work and no model, that step took 18-19 ms with the loop below for every page
        # freed, 28-31 with a loop for every page.)
        pages, counts = seq.page_array(), self.ref_counts
        counts[pages] -= 1
        freed = pages[counts[pages] == 0].tolist()
        freed.reverse()
        blocks, clock, host, free = self.blocks, self.clock, self.num_host_blocks, self.free_block_ids
        for block_id in freed:
            block = blocks[block_id]
            if not block.computed:  # never finished: nobody may hit it
                if self.hash_to_block_id.get(block.hash) == block_id:
                    self._forget(block)
                block.hash = -1
                block.token_key = b""
            if host:
                block.freed_at = clock
            free[block_id] = None   # (an OrderedDict.update of all of them took twice as long)
        seq.release_pages()

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= seq.num_blocks or self.num_free_blocks > 0

    def may_append(self, seq: Sequence):
        """Give the token a decode step writes a page (a new one when it starts a page)."""
        if len(seq.block_table) < seq.num_blocks:
            block = self._take_free(for_forward=True)
            self._uses(block, writes=True)
            seq.block_table.append(block.block_id)

    def mark_computed(self, seq: Sequence):
        self.mark_computed_all((seq,))

    def mark_computed_all(self, seqs):
        """Pages now fully computed become cache hits for later requests, for each of a step's sequences in one
        call (a call a row, twice a step, was ~0.3 ms of a 1,024-row step's ~2.9 on the CPU machine; most rows
        fill no page). Called when a step is launched and again when its tokens are collected: a page whose
        last token is still a placeholder (sampled by a step in flight) waits, since its hash must cover real
        tokens."""
        bs, blocks, caching = self.block_size, self.blocks, self.enable_prefix_caching
        for seq in seqs:
            full = min(seq.num_computed_tokens, len(seq.token_ids) - seq.num_pending) // bs
            if full <= seq.num_marked_blocks:
                continue   # no page newly full
            table = seq.block_table
            for i in range(seq.num_marked_blocks, full):
                block = blocks[table[i]]
                if block.computed:  # a page computed by another request
                    continue
                block.computed = True
                if caching and block.hash == -1:  # a page filled by decode (1,024 in one W3 step)
                    block.hash = self._hashes(seq, i + 1)[i]
                    block.token_key = seq.block_keys[i]
                if block.hash != -1:
                    self._register(block)
            seq.num_marked_blocks = full

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix in both tiers (LLMEngine.reset_prefix_cache): only while no request holds a
        page and no restore is queued; returns False, changing nothing, otherwise. The pages keep their copy
        stamps (`landing`, `read_out`, `host_written`, ...): a copy still in flight is waited for as before."""
        if self.num_free_blocks != self.num_blocks or self.restore_backlog or self.host_pinned:
            return False
        for block in self.blocks:
            block.hash, block.token_key, block.computed, block.keep = -1, b"", False, DROP
        self.hash_to_block_id.clear()
        self.hit_runs.clear()
        self.prompt_index.clear()
        for page in self.host_eviction_order():
            self.host_hash[page], self.host_key[page] = -1, b""
            self.host_free.append(page)
        self.host_probation.clear()
        self.host_protected.clear()
        self.host_hash_to_page.clear()
        return True

    def check_invariants(self):
        """For tests: ref counts agree with the free list, the hash map points at matching pages; the
        host pages are each free, pinned or in the LRU exactly once; a hash in both tiers has the same
        token key in both (its bytes are equal: tests/test_host_tier.py checks them)."""
        for block in self.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.block_id in self.free_block_ids), block.block_id
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == h
        held = self.host_eviction_order()
        pages = sorted(self.host_free + held)
        assert pages == list(range(self.num_host_blocks)), "a host page lost or held twice"
        assert sorted(self.host_hash_to_page.values()) == sorted(held)
        for h, page in self.host_hash_to_page.items():
            assert self.host_hash[page] == h
            block_id = self.hash_to_block_id.get(h)
            if block_id is not None:
                assert self.blocks[block_id].token_key == self.host_key[page], "a hash in both tiers, different pages"
