"""KV pages: allocation, ref counts and the prefix cache.

A full page is identified by a chained hash, xxh64 of its token ids seeded with the previous page's
hash, so equal hashes mean equal prefixes. Hits are confirmed by comparing the page's token ids (as
bytes: a memcmp, since matching 8k-token prompts touches hundreds of pages per request). A page is registered under
its hash as soon as it is allocated for a prompt, but it only counts as a hit once its K/V are
computed: a request that would hit a page still being computed waits a step (see `match`), so that
requests arriving together with the same system prompt compute it once, not once each.
Freed pages keep their hash and contents until they are handed out again (least recently freed first).
"""
from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_key", "computed")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_key = b""  # its token ids as int64 bytes, once hashed
        self.computed = False

    def reset(self):
        self.ref_count = 1
        self.hash = -1
        self.token_key = b""
        self.computed = False


class BlockManager:

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Ordered so that the least recently freed page is reused first: cached prefixes live longest.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_cache_hit_tokens = 0   # prompt tokens served from the cache, for metrics
        self.num_cache_query_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id, _ = self.free_block_ids.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]   # its old contents are about to be overwritten
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
        n = (len(seq) - 1) // self.block_size
        hashes = self._hashes(seq, n)
        for i in range(n):
            block_id = self.hash_to_block_id.get(hashes[i])
            if block_id is None or self.blocks[block_id].token_key != seq.block_keys[i]:
                break
            if not self.blocks[block_id].computed:
                return hits, True
            hits.append(block_id)
        return hits, False

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
        hits_in_use = sum(self.blocks[b].ref_count > 0 for b in hits)
        return self.num_free_blocks >= seq.num_blocks - hits_in_use

    def allocate(self, seq: Sequence, hits: list[int]):
        assert not seq.block_table
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._take_free(block_id)
            else:
                block.ref_count += 1
            seq.block_table.append(block_id)
        num_full = len(seq) // self.block_size if self.enable_prefix_caching else 0
        hashes = self._hashes(seq, num_full)
        for i in range(len(hits), seq.num_blocks):
            block = self._take_free()
            if i < num_full:
                # Registered now, computed later: a request arriving meanwhile waits for it (see match).
                block.token_key = seq.block_keys[i]
                block.hash = hashes[i]
                self.hash_to_block_id.setdefault(block.hash, block.block_id)
            seq.block_table.append(block.block_id)
        seq.num_computed_tokens = len(hits) * self.block_size
        if not seq.num_completion_tokens:  # a re-admission after preemption also hits its own output
            seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_marked_blocks = len(hits)
        self.num_cache_hit_tokens += seq.num_computed_tokens  # this admission's hits
        self.num_cache_query_tokens += len(seq)

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
                self.hash_to_block_id.setdefault(block.hash, block.block_id)

    def check_invariants(self):
        """For tests: ref counts agree with the free list, the hash map points at matching pages."""
        for block in self.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.block_id in self.free_block_ids), block.block_id
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == h
