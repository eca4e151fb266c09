"""Schedule policies: dfs-weight against an explicit prefix-tree walk, lpm's order and groups, and
the starvation bound."""
from hypothesis import given, settings, strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.schedule_policy import SchedulePolicy
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4
SP = SamplingParams(max_tokens=4)
PIECES = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9], [4, 3, 2, 1]]


def reference_dfs(seqs: list[Sequence]) -> list[Sequence]:
    """Build the tree of full-page token tuples (all pages but the last token's) and walk it: a node's
    own requests first (arrival order), then its children, heaviest first, ties by earliest request."""
    root = {"children": {}, "here": [], "weight": 0, "first": -1}
    for index, seq in enumerate(seqs):
        node = root
        node["weight"] += 1
        n = (len(seq) - 1) // BS
        for i in range(n):
            key = tuple(seq.token_ids[i * BS:(i + 1) * BS])
            child = node["children"].setdefault(key, {"children": {}, "here": [], "weight": 0, "first": index})
            child["weight"] += 1
            node = child
        node["here"].append(index)
    out = []

    def walk(node):
        out.extend(node["here"])
        for child in sorted(node["children"].values(), key=lambda c: (-c["weight"], c["first"])):
            walk(child)
    walk(root)
    return [seqs[i] for i in out]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, len(PIECES) - 1), max_size=4), st.integers(0, 6)),
                min_size=1, max_size=14))
def test_dfs_weight_is_a_heaviest_first_walk_of_the_prefix_tree(specs):
    seqs = [Sequence([t for p in pieces for t in PIECES[p]] + [20 + tail], SP, BS) for pieces, tail in specs]
    policy = SchedulePolicy("dfs-weight", max_wait_s=1e9)
    got = policy.order(list(seqs), BlockManager(64, BS), now=seqs[0].arrival_time)
    assert [s.seq_id for s in got] == [s.seq_id for s in reference_dfs(seqs)]


def cached(bm: BlockManager, tokens: list[int]):
    seq = Sequence(tokens, SP, BS)
    bm.allocate(seq, [])
    seq.num_computed_tokens = len(seq)
    bm.mark_computed(seq)
    bm.deallocate(seq)   # stays cached


def test_lpm_takes_the_longest_cached_prefix_first_and_keeps_groups_together():
    bm = BlockManager(64, BS)
    cached(bm, PIECES[0] + PIECES[1] + [0])
    cold = Sequence(PIECES[3] + [1], SP, BS)
    short = Sequence(PIECES[0] + PIECES[2] + [2], SP, BS)       # 1 cached page
    long_a = Sequence(PIECES[0] + PIECES[1] + [3], SP, BS)      # 2 cached pages
    cold_b = Sequence(PIECES[3] + [4], SP, BS)                  # same first page as `cold`
    long_b = Sequence(PIECES[0] + PIECES[1] + [5], SP, BS)
    waiting = [cold, short, long_a, cold_b, long_b]
    order = SchedulePolicy("lpm", max_wait_s=1e9).order(waiting, bm, now=cold.arrival_time)
    # Longest match first; `short` shares long_a's first page, so it joins their group.
    assert order == [long_a, long_b, short, cold, cold_b]


def test_a_request_past_the_starvation_bound_goes_first():
    bm = BlockManager(64, BS)
    cached(bm, PIECES[0] + PIECES[1] + [0])
    cold = Sequence(PIECES[3] + [1], SP, BS)
    hot = Sequence(PIECES[0] + PIECES[1] + [3], SP, BS)
    policy = SchedulePolicy("lpm", max_wait_s=5.0)
    assert policy.order([cold, hot], bm, now=cold.arrival_time + 1) == [hot, cold]
    assert policy.order([cold, hot], bm, now=cold.arrival_time + 6) == [cold, hot]   # waited too long
    assert policy.num_starved == 2   # both are past the bound at +6 s; they go in arrival order


def test_random_is_seeded_and_fcfs_keeps_the_queue():
    seqs = [Sequence([i] * 9, SP, BS) for i in range(10)]
    bm = BlockManager(64, BS)
    a = SchedulePolicy("random", 1e9, seed=3).order(list(seqs), bm)
    b = SchedulePolicy("random", 1e9, seed=3).order(list(seqs), bm)
    assert a == b and sorted(s.seq_id for s in a) == [s.seq_id for s in seqs] and a != seqs
    assert SchedulePolicy("fcfs", 1e9).order(seqs, bm) is seqs
