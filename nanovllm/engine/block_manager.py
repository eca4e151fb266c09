"""KV pages: allocation, ref counts and the prefix cache.

A full page is identified by a chained hash, xxh64 of its token ids seeded with the previous page's
hash, so equal hashes mean equal prefixes. Hits are confirmed by comparing the page's token ids (as
bytes: a memcmp, since matching 8k-token prompts touches hundreds of pages per request). A page is registered under
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
answer) is dropped as before, so it costs no copy and no host room;
`match` follows the hash chain through both tiers, and a hit in host memory is copied into a fresh
GPU page (`swap_in`, host page -> GPU page) before the step that admits the request runs. A hash
lives in one tier at a time (a restore moves it back; a GPU page registered under a hash the host
holds drops the host copy), and a host page is dropped only from the host's LRU end. This class
only decides the copies; `take_copies` hands them to the step (engine/scheduled_step.py) and every
rank's runner executes them on its own pools, swap_out before swap_in, on a side stream. The step's
forward waits for its write-backs (it may reuse those pages) but not for its restores unless
`wait_for_restores` (the scheduler admits a restoring request's prefill one step later, so that the
copy overlaps a step it does not hold up); the next step's forward waits for them. A restored page
counts as computed once its step is launched. Within a step that order is
safe: a host page read by a restore is released only at the end of the step, and restores happen
only in prefill steps, where no GPU page is freed while the step is scheduled (a decode step's
preemptions free pages, but it restores none). `copy_after_prev` says whether a copy touches a page freed since
the step in flight was scheduled (that step may still read or write it): only then must the copy
wait for it; otherwise it may overlap it.
"""
from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


DROP, PROBATION, PROTECTED = 0, 1, 2   # Block.keep


def is_host_hit(hit: int) -> bool:
    """`match` returns GPU pages as their ids and host pages h as -1 - h."""
    return hit < 0


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_key", "computed", "freed_at", "keep")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_key = b""  # its token ids as int64 bytes, once hashed
        self.computed = False
        self.freed_at = -1    # the scheduling clock when it was last freed
        self.keep = DROP      # what a write-back to the host tier makes of it: DROP, PROBATION, PROTECTED

    def reset(self):
        self.ref_count = 1
        self.hash = -1
        self.token_key = b""
        self.computed = False
        self.keep = DROP


class BlockManager:

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_host_blocks: int = 0):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Ordered so that the least recently freed page is reused first: cached prefixes live longest.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_cache_hit_tokens = 0   # prompt tokens served from the cache (either tier), for metrics
        self.num_cache_query_tokens = 0
        # The host tier: each host page's hash and token key; occupied pages in LRU order (oldest
        # first); free pages; pages released this step (reusable from the next step on).
        self.num_host_blocks = num_host_blocks
        self.host_hash = [-1] * num_host_blocks
        self.host_key = [b""] * num_host_blocks
        self.host_hash_to_page: dict[int, int] = {}
        self.host_probation: OrderedDict[int, None] = OrderedDict()   # oldest first; evicted first
        self.host_protected: OrderedDict[int, None] = OrderedDict()
        self.host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))
        self.host_released: list[int] = []
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

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self.host_free) + len(self.host_released)

    @property
    def num_used_host_blocks(self) -> int:
        return len(self.host_probation) + len(self.host_protected)

    def host_eviction_order(self) -> list[int]:
        """Occupied host pages, the next one dropped first."""
        return list(self.host_probation) + list(self.host_protected)

    # ---- steps and copies ---------------------------------------------------------------------
    def begin_step(self):
        self.clock += 1

    def launched(self):
        """The step scheduled at this clock went to the device. Pages it restores count as computed
        from now on: every later step's forward waits for this step's copies."""
        self.launch_clock = self.clock
        for block_id in self.restored:
            self.blocks[block_id].computed = True
        self.restored = []

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]], bool, bool]:
        """This step's swap_out and swap_in pairs, whether they must wait for the step in flight and
        whether this step's forward must wait for its restores; host pages restored this step
        become free for the next."""
        copies = (self.swap_out, self.swap_in, self.copy_after_prev, self.wait_for_restores)
        self.swap_out, self.swap_in, self.copy_after_prev, self.wait_for_restores = [], [], False, False
        self.host_free.extend(self.host_released)
        self.host_released = []
        return copies

    def _note_copy(self, block: Block):
        if block.freed_at >= self.launch_clock:  # freed after the step in flight was scheduled
            self.copy_after_prev = True

    def _store_on_host(self, block: Block):
        """Write back a cached GPU page that is about to be overwritten."""
        if self.host_free:
            page = self.host_free.pop()
        elif self.host_probation or (block.keep == PROTECTED and self.host_protected):
            page, _ = (self.host_probation or self.host_protected).popitem(last=False)
            del self.host_hash_to_page[self.host_hash[page]]
            self.num_host_dropped += 1
        else:  # probation may not push protected pages out (or every host page is being restored)
            self.num_host_dropped += 1
            return
        self.host_hash[page], self.host_key[page] = block.hash, block.token_key
        self.host_hash_to_page[block.hash] = page
        (self.host_protected if block.keep == PROTECTED else self.host_probation)[page] = None
        self.swap_out.append((block.block_id, page))
        self.num_swapped_out += 1
        self._note_copy(block)

    def _drop_from_host(self, h: int):
        """The GPU holds hash h again: its host copy goes (a hash lives in one tier at a time)."""
        page = self.host_hash_to_page.pop(h, None)
        if page is not None:
            if page in self.host_probation:
                del self.host_probation[page]
            else:
                del self.host_protected[page]
            self.host_hash[page], self.host_key[page] = -1, b""
            self.host_released.append(page)  # a restore of this step may still read it

    def _register(self, block: Block):
        if self.hash_to_block_id.setdefault(block.hash, block.block_id) == block.block_id and self.num_host_blocks:
            self._drop_from_host(block.hash)

    def _take_free(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id, _ = self.free_block_ids.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]   # its old contents are about to be overwritten
                if self.num_host_blocks and block.computed and block.keep:
                    self._store_on_host(block)
            block.reset()
        else:
            del self.free_block_ids[block_id]
            block = self.blocks[block_id]
            block.ref_count = 1
        return block

    def match(self, seq: Sequence) -> tuple[list[int], bool]:
        """Leading pages of `seq` already cached, and whether a longer match is still being computed.

        At least one token is always left to compute (a fully cached prompt still needs the logits
        of its last token), so the last page never counts as a hit; nor does any page of a prompt
        whose logprobs are asked (they need the logits of every prompt position)."""
        hits: list[int] = []
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return hits, False
        hashes = self.prefix_hashes(seq)
        host = self.num_host_blocks and self.restore_pays
        for i in range(len(hashes)):
            block_id = self.hash_to_block_id.get(hashes[i])
            if block_id is not None and self.blocks[block_id].token_key == seq.block_keys[i]:
                if not self.blocks[block_id].computed:
                    return hits, True
                hits.append(block_id)
                continue
            page = self.host_hash_to_page.get(hashes[i]) if host else None
            if page is None or self.host_key[page] != seq.block_keys[i]:
                break
            hits.append(-1 - page)
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
        on the sequence: its tokens only grow. New pages are converted in one numpy pass."""
        hashes, keys = seq.block_hashes, seq.block_keys
        start = len(hashes)
        if start < n:
            bs = self.block_size
            width = 8 * bs
            if seq.prompt_bytes is not None and n * bs <= seq.num_prompt_tokens:
                data = seq.prompt_bytes[start * width:n * width]  # converted once, at validation
            else:
                data = np.asarray(seq.token_ids[start * bs:n * bs], dtype=np.int64).tobytes()
            new_keys = [data[offset:offset + width] for offset in range(0, len(data), width)]
            # Chained: the previous page's hash seeds this one's (0 for the first page).
            h = hashes[-1] if hashes else 0
            digest = xxhash.xxh64_intdigest  # bound once: this loop runs for every prompt page
            for key in new_keys:
                h = digest(key, h)
                hashes.append(h)
            keys.extend(new_keys)
        return hashes

    def can_allocate(self, seq: Sequence, hits: list[int]) -> bool:
        hits_in_use = sum(hit >= 0 and self.blocks[hit].ref_count > 0 for hit in hits)
        return self.num_free_blocks >= seq.num_blocks - hits_in_use

    def allocate(self, seq: Sequence, hits: list[int]):
        """Pages for `seq`: its GPU hits shared, its host hits restored into fresh pages, new pages
        for the rest. GPU hits are taken first, so that taking fresh pages cannot evict them."""
        assert not seq.block_table
        restoring = self.num_host_blocks and hits and min(hits) < 0
        for hit in hits:
            if hit >= 0:
                block = self.blocks[hit]
                if block.ref_count == 0:
                    self._take_free(hit)
                else:
                    block.ref_count += 1
                block.keep = PROTECTED
                if not restoring:
                    seq.block_table.append(hit)
        if restoring:
            self._restore(seq, hits)
        num_full = len(seq) // self.block_size if self.enable_prefix_caching else 0
        hashes = self._hashes(seq, num_full)
        for i in range(len(hits), seq.num_blocks):
            block = self._take_free()
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
        """The block table of a request with host hits: each gets a fresh GPU page and a swap_in."""
        # Host hits leave the host LRU before any write-back below could pick them as its victim.
        restored = {hit: (self.host_hash[-1 - hit], self.host_key[-1 - hit]) for hit in hits if hit < 0}
        for h, _ in restored.values():
            self._drop_from_host(h)
        for hit in hits:
            if hit < 0:
                page = -1 - hit
                block = self._take_free()
                block.hash, block.token_key = restored[hit]
                block.keep = PROTECTED
                block.computed = False   # until the step is launched: a request matching it meanwhile waits
                self.restored.append(block.block_id)
                self._register(block)
                self.swap_in.append((page, block.block_id))
                self.num_swapped_in += 1
                self.num_host_hit_tokens += self.block_size
                self._note_copy(block)
                hit = block.block_id
            seq.block_table.append(hit)

    def preempt(self, seq: Sequence):
        """Free a preempted sequence's pages, marked PROTECTED for the host tier: it will want them again."""
        for block_id in seq.block_table:
            self.blocks[block_id].keep = PROTECTED
        self.deallocate(seq)

    def deallocate(self, seq: Sequence):
        # Last pages first, so that a prefix outlives its tails in the free list.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if not block.computed:  # never finished: nobody may hit it
                    if self.hash_to_block_id.get(block.hash) == block_id:
                        del self.hash_to_block_id[block.hash]
                    block.hash = -1
                    block.token_key = b""
                block.freed_at = self.clock
                self.free_block_ids[block_id] = None
        seq.release_pages()

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= seq.num_blocks or self.num_free_blocks > 0

    def may_append(self, seq: Sequence):
        """Give the token a decode step writes a page (a new one when it starts a page)."""
        if len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free().block_id)

    def mark_computed(self, seq: Sequence):
        """Pages now fully computed become cache hits for later requests. Called when a step is
        launched and again when its tokens are collected: a page whose last token is still a
        placeholder (sampled by a step in flight) waits, since its hash must cover real tokens."""
        bs = self.block_size
        real = min(seq.num_computed_tokens, len(seq) - seq.num_pending)
        for i in range(seq.num_marked_blocks, real // bs):
            block = self.blocks[seq.block_table[i]]
            seq.num_marked_blocks = i + 1
            if block.computed:  # a page computed by another request
                continue
            block.computed = True
            if self.enable_prefix_caching and block.hash == -1:  # a page filled by decode
                block.hash = self._hashes(seq, i + 1)[i]
                block.token_key = seq.block_keys[i]
            if block.hash != -1:
                self._register(block)

    def check_invariants(self):
        """For tests: ref counts agree with the free list, the hash map points at matching pages; the
        host pages are each free, released or in the LRU exactly once, and no hash is in both tiers."""
        for block in self.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.block_id in self.free_block_ids), block.block_id
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == h
        held = self.host_eviction_order()
        pages = sorted(self.host_free + self.host_released + held)
        assert pages == list(range(self.num_host_blocks)), "a host page lost or held twice"
        assert sorted(self.host_hash_to_page.values()) == sorted(held)
        for h, page in self.host_hash_to_page.items():
            assert self.host_hash[page] == h
        assert not set(self.host_hash_to_page) & set(self.hash_to_block_id), "a hash in both tiers"
