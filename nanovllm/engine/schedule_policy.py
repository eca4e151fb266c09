"""In which order waiting requests are admitted: the schedule policies and the starvation bound.

  fcfs        arrival order (preempted requests first, as they were); the queue is not touched.
  lpm         longest cached prefix first (pages found in the GPU or host tier), as SGLang's lpm:
              a hit is admitted while its pages are still cached, before newcomers evict them.
  dfs-weight  SGLang's DFS-weight order over the prefix tree of the waiting requests: at every
              branch point the subtree with the most waiting requests goes first, so the requests
              of one shared prefix are admitted one after another, heaviest group first.
  random      a seeded shuffle each step (a baseline).

Cascade-aware admission: lpm and random keep the requests of a shared-prefix group (same first
page) together, at the place of the group's first member; dfs-weight does so by construction. A
group admitted together computes its prefix once (its later members wait one step for the pages,
block_manager.match) and then decodes in one cascade group.

Starvation bound: a request that has waited longer than `max_wait_s` goes before everything else,
oldest first, whatever the policy (lpm at high hit rates otherwise starves cold requests).

Cost: fcfs is free; the others hash every waiting prompt's pages once (kept on the sequence) and
walk them each prefill-scheduling step: O(waiting pages) dictionary lookups (about 50 ms for 1,024
waiting 8k-token prompts, so they suit queues of hundreds, not tens of thousands).
"""
from collections import Counter
from time import monotonic

import numpy as np

from nanovllm.engine.sequence import Sequence

POLICIES = ("fcfs", "lpm", "dfs-weight", "random")


class SchedulePolicy:

    def __init__(self, name: str, max_wait_s: float, seed: int = 0):
        if name not in POLICIES:
            raise ValueError(f"schedule_policy must be one of {', '.join(POLICIES)}, got {name!r}")
        self.name = name
        self.max_wait_s = max_wait_s
        self.rng = np.random.default_rng(seed)
        self.num_starved = 0  # admissions moved to the front by the starvation bound

    def order(self, waiting: list[Sequence], block_manager, now: float | None = None) -> list[Sequence]:
        """The waiting requests in admission order."""
        if self.name == "fcfs" or len(waiting) < 2:
            return waiting
        now = monotonic() if now is None else now
        starved = sorted((s for s in waiting if now - s.arrival_time > self.max_wait_s), key=lambda s: s.arrival_time)
        rest = [s for s in waiting if now - s.arrival_time <= self.max_wait_s] if starved else waiting
        if self.name == "lpm":
            cached = {s.seq_id: block_manager.cached_prefix_pages(s) for s in rest}
            rest = group_by_first_page(sorted(rest, key=lambda s: -cached[s.seq_id]), block_manager)
        elif self.name == "random":
            rest = group_by_first_page([rest[i] for i in self.rng.permutation(len(rest))], block_manager)
        else:
            rest = dfs_weight_order(rest, block_manager)
        self.num_starved += len(starved)
        return starved + rest


def group_by_first_page(seqs: list[Sequence], block_manager) -> list[Sequence]:
    """Stable: each shared-prefix group (same first-page hash) moves up to its first member's place."""
    groups: dict = {}
    for seq in seqs:
        hashes = block_manager.prefix_hashes(seq)
        groups.setdefault(hashes[0] if hashes else ("own", seq.seq_id), []).append(seq)
    return [seq for group in groups.values() for seq in group]


def dfs_weight_order(seqs: list[Sequence], block_manager) -> list[Sequence]:
    """Depth-first over the prefix tree of `seqs` (a node is a page's chained hash, so a node names
    its whole prefix), heaviest child first, ties by the earliest request. A sort key per request
    gives the same order: its path of (-weight, first index) pairs, kept only where the weight
    drops (a node as heavy as its parent is its parent's only child, and adds nothing to the order);
    a request whose path ends at a node comes before the node's subtrees, as a proper prefix sorts
    first."""
    chains = [block_manager.prefix_hashes(seq) for seq in seqs]
    weight: Counter = Counter()
    first: dict[int, int] = {}
    for index, chain in enumerate(chains):
        weight.update(chain)
        for h in chain:
            first.setdefault(h, index)
    keys = []
    for index, chain in enumerate(chains):
        key, parent_weight = [], len(seqs)
        for h in chain:
            w = weight[h]
            if w != parent_weight:
                key.append((-w, first[h]))
                parent_weight = w
        keys.append((key, index))
    return [seqs[index] for _, index in sorted(keys)]
