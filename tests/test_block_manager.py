"""Property tests of the block manager: random allocate / compute / append / free sequences."""
from array import array

import numpy as np
import xxhash
from hypothesis import given, settings, strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4


def key_of(seq: Sequence, i: int) -> bytes:
    """Page i's tokens as the block manager keys them, computed independently."""
    return np.asarray(seq.token_ids[i * BS:(i + 1) * BS], dtype=np.int64).tobytes()

SP = SamplingParams(max_tokens=1000)
# Prompts built from a few shared prefixes so that prefix-cache hits are common.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7] * 12, []]

op = st.one_of(
    st.tuples(st.just("new"), st.integers(0, len(PREFIXES) - 1), st.lists(st.integers(0, 3), min_size=0, max_size=9)),
    st.tuples(st.just("compute"), st.integers(0, 50), st.integers(1, 9)),
    st.tuples(st.just("decode"), st.integers(0, 50), st.integers(0, 3)),
    st.tuples(st.just("free"), st.integers(0, 50), st.just(None)),
)


def reference_match(bm: BlockManager, seq: Sequence) -> tuple[list[int], bool]:
    """`match` by its definition, a lookup a page (no recent runs, no host tier): the leading pages whose
    hash maps to a page holding the same tokens; pending if the first such page not yet computed comes first."""
    hits = []
    for i, h in enumerate(bm.prefix_hashes(seq)):
        block_id = bm.hash_to_block_id.get(h)
        if block_id is None or bm.blocks[block_id].token_key != key_of(seq, i):
            break
        if not bm.blocks[block_id].computed:
            return hits, True
        hits.append(block_id)
    return hits, False


def check(bm: BlockManager, live: list[Sequence], views: dict | None = None):
    """Invariants; `views`: each live sequence's page_array() from earlier checks with a copy of it, which the
    view must still equal (a view's entries never change; pages appended later go past its end)."""
    bm.check_invariants()
    holders = [0] * bm.num_blocks
    for seq in live:
        if views is not None:
            for view, copy in views.get(seq.seq_id, []):
                assert np.array_equal(view, copy)
            pages = seq.page_array()
            assert pages.dtype == np.int32 and pages.tolist() == seq.block_table
            views.setdefault(seq.seq_id, []).append((pages, pages.copy()))
        assert len(seq.block_table) == seq.num_blocks
        assert len(set(seq.block_table)) == len(seq.block_table)
        for b in seq.block_table:
            holders[b] += 1
        for i in range(seq.num_computed_tokens // BS):
            block = bm.blocks[seq.block_table[i]]
            assert block.computed
            if block.hash != -1:  # a hashed page holds exactly this sequence's tokens there
                assert block.token_key == key_of(seq, i)
    assert [b.ref_count for b in bm.blocks] == holders
    assert bm.num_free_blocks == holders.count(0)


@settings(max_examples=300, deadline=None)
@given(st.integers(6, 20), st.lists(op, max_size=40))
def test_random_operations_keep_invariants(num_blocks, ops):
    bm = BlockManager(num_blocks, BS)
    live: list[Sequence] = []
    views: dict[int, list] = {}
    for kind, a, b in ops:
        if kind == "new":
            tokens = PREFIXES[a] + b or [5]
            # As the engine makes them (prompt bytes from validation: hashed through the prompt index) or not.
            seq = Sequence(tokens, SP, BS, array("q", tokens).tobytes() if len(b) % 2 else None)
            expected = reference_match(bm, seq)
            hits, pending = bm.match(seq)
            assert (hits, pending) == expected   # the recent runs (`hit_runs`) change nothing, evictions included
            assert all(bm.blocks[h].computed for h in hits)
            assert all(bm.blocks[h].token_key == key_of(seq, i) for i, h in enumerate(hits))
            assert len(hits) * BS < len(seq)  # at least one token is always left to compute
            if not pending and bm.can_allocate(seq, hits):
                bm.allocate(seq, hits)
                assert seq.num_cached_tokens == len(hits) * BS
                live.append(seq)
        elif live:
            seq = live[a % len(live)]
            if kind == "compute":  # a (chunked) prefill step computes up to b more tokens
                seq.num_computed_tokens = min(len(seq), seq.num_computed_tokens + b)
                bm.mark_computed(seq)
            elif kind == "decode" and seq.num_computed_tokens == len(seq):
                seq.append_token(b)  # the sampled token; the next step writes its K/V
                if bm.can_append(seq):
                    bm.may_append(seq)
                    seq.num_computed_tokens += 1
                    bm.mark_computed(seq)
                else:
                    seq.token_ids.pop()
            elif kind == "free":
                bm.deallocate(seq)
                live.remove(seq)
                for view, copy in views.pop(seq.seq_id, []):
                    assert np.array_equal(view, copy)   # its table started over; the old views did not change
        check(bm, live, views)
    for seq in live:
        bm.deallocate(seq)
    check(bm, [])
    assert bm.num_free_blocks == num_blocks


def test_hit_on_page_still_being_computed_waits():
    bm = BlockManager(16, BS)
    a = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 9], SP, BS)
    bm.allocate(a, bm.match(a)[0])
    b = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 10], SP, BS)
    assert bm.match(b) == ([], True)  # registered, not computed: wait
    a.num_computed_tokens = len(a)
    bm.mark_computed(a)
    hits, pending = bm.match(b)
    assert not pending and hits == a.block_table[:2]


def test_freed_pages_stay_cached_until_reused():
    bm = BlockManager(8, BS)
    a = Sequence(list(range(9)), SP, BS)
    bm.allocate(a, [])
    a.num_computed_tokens = len(a)
    bm.mark_computed(a)
    pages = a.block_table[:2]
    bm.deallocate(a)
    b = Sequence(list(range(9)) + [42], SP, BS)
    hits, pending = bm.match(b)
    assert hits == pages and not pending


def test_recent_hit_runs_are_taken_until_a_page_of_theirs_is_evicted():
    """A request with the leading pages of an earlier match takes that match's pages (`hit_runs`, no lookup a
    page); once one of those pages is handed out for other tokens, the runs are forgotten and the next match
    finds only what is left."""
    bm = BlockManager(6, BS)
    a = Sequence(list(range(13)), SP, BS)   # 4 pages: 3 full, hashed
    bm.allocate(a, [])
    a.num_computed_tokens = len(a)
    bm.mark_computed(a)
    b = Sequence(list(range(12)) + [50], SP, BS)
    hits, pending = bm.match(b)
    assert hits == a.block_table[:3] and not pending
    first = bm.prefix_hashes(b)[0]
    assert bm.hit_runs[first][2] == hits
    c = Sequence(list(range(12)) + [60, 61], SP, BS)
    bm.hash_to_block_id.clear()   # were the runs not taken, c would find nothing
    assert bm.match(c) == (a.block_table[:3], False)
    bm.match(b)   # ... and the map is left as it was for what follows
    for i, h in enumerate(bm.prefix_hashes(a)[:3]):
        bm.hash_to_block_id[h] = a.block_table[i]
    pages = a.block_table[:3]
    bm.deallocate(a)   # its pages are free and cached; the 2 never-used pages go first
    other = Sequence([99] * 11, SP, BS)   # 3 pages: the two never used, then a's last page (never hashed)
    bm.allocate(other, [])
    assert bm.hit_runs   # a's hashed pages are still cached
    more = Sequence([98] * 3, SP, BS)   # a's third page (freed last pages first): evicted
    bm.allocate(more, [])
    assert not bm.hit_runs
    hits, pending = bm.match(b)
    assert hits == pages[:2] and not pending and (hits, pending) == reference_match(bm, b)


def test_uncomputed_pages_are_forgotten_when_freed():
    bm = BlockManager(8, BS)
    a = Sequence(list(range(9)), SP, BS)
    bm.allocate(a, [])
    bm.deallocate(a)  # preempted or aborted before its prefill ran
    b = Sequence(list(range(9)), SP, BS)
    assert bm.match(b) == ([], False)
    assert not bm.hash_to_block_id


def test_page_hashes_from_validated_prompt_bytes_equal_hashes_from_token_ids():
    """The engine hashes prompt pages from the int64 bytes it converted at validation; decode-filled
    pages (and sequences built without them) from the token ids: both give the same chain."""
    from array import array
    prompt = list(range(100, 137))
    with_bytes = Sequence(prompt, SP, BS, array("q", prompt).tobytes())
    plain = Sequence(prompt, SP, BS)
    for seq in (with_bytes, plain):
        seq.token_ids += [7, 8, 9, 10, 11]  # pages that span the prompt's end and the output
    bm = BlockManager(64, BS)
    n = len(with_bytes) // BS
    assert bm._hashes(with_bytes, 2) == bm._hashes(plain, 2)
    assert bm._hashes(with_bytes, n) == bm._hashes(plain, n)
    assert with_bytes.block_keys == plain.block_keys


def chained_hashes(tokens: list[int], n: int, page: int = BS) -> list[int]:
    """The first n pages' chained xxh64 hashes, computed independently of the block manager."""
    out, h = [], 0
    for i in range(n):
        h = xxhash.xxh64_intdigest(np.asarray(tokens[i * page:(i + 1) * page], dtype=np.int64).tobytes(), h)
        out.append(h)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(1, 12), st.booleans()), min_size=1,
                max_size=30),
       st.integers(1, 6))
def test_prompts_taking_hashes_from_alike_prompts_hash_as_if_alone(requests, recent):
    """Prompts that share prefixes of any length (trees of them: a family's common start, then its own
    branches) take their shared pages' hashes from the prompt index; every hash and key equals the chain
    computed alone, whatever the order, the index's size or a first call for one page only."""
    import nanovllm.engine.block_manager as block_manager
    rng = np.random.default_rng(len(requests) * 7 + recent)
    trunks = [list(rng.integers(0, 50, 40)) for _ in range(4)]
    bm = BlockManager(256, BS)
    old, block_manager.RECENT_PROMPTS = block_manager.RECENT_PROMPTS, recent
    try:
        for family, shared, own, first_page_first in requests:
            tokens = [int(t) for t in trunks[family][:shared]] + [int(t) for t in rng.integers(0, 3, own)]
            seq = Sequence(tokens, SP, BS, array("q", tokens).tobytes())
            if first_page_first and len(tokens) > BS:
                bm.first_page_hash(seq)
            n = (len(tokens) - 1) // BS
            assert bm.prefix_hashes(seq) == chained_hashes(tokens, n)
            assert seq.block_keys == [key_of(seq, i) for i in range(n)]
            assert len(bm.prompt_index) <= recent
    finally:
        block_manager.RECENT_PROMPTS = old


def test_a_shared_system_prompt_is_hashed_once(monkeypatch):
    """W3's shape in small: 64 requests share a 2,048-token system prompt and add 40 tokens each; the
    shared pages are hashed for the first request only (the others take them from the prompt index)."""
    rng = np.random.default_rng(0)
    system = [int(t) for t in rng.integers(0, 1000, 2048)]
    prompts = [system + [int(t) for t in rng.integers(0, 1000, 40)] for _ in range(64)]
    pages = (2048 + 40 - 1) // 16   # hashed pages a request: all full ones but the last token's
    expected = [chained_hashes(tokens, pages, 16) for tokens in prompts]
    digests = []
    real = xxhash.xxh64_intdigest
    monkeypatch.setattr(xxhash, "xxh64_intdigest", lambda data, seed: digests.append(1) or real(data, seed))
    bm = BlockManager(4096, 16)
    for tokens, hashes in zip(prompts, expected):
        seq = Sequence(tokens, SP, 16, array("q", tokens).tobytes())
        assert bm.prefix_hashes(seq) == hashes
    # The system prompt's 128 pages once, then each request's own pages and one page looked up at the start.
    assert len(digests) <= 128 + 64 * (pages - 128) + 64


def test_a_hash_collision_in_the_prompt_index_takes_nothing_from_the_other_prompt(monkeypatch):
    """With a digest of 3 values, pages of different prompts collide all the time: a prompt must then hash
    its own pages, never take another's (which would carry that prompt's chain)."""
    import zlib
    weak = lambda data, seed: (seed * 7 + zlib.crc32(data)) % 3   # noqa: E731
    monkeypatch.setattr(xxhash, "xxh64_intdigest", weak)
    rng = np.random.default_rng(1)
    trunk = [int(t) for t in rng.integers(0, 9, 64)]
    bm = BlockManager(256, BS)
    for _ in range(40):
        tokens = [int(t) for t in rng.integers(0, 9, int(rng.integers(0, 12)))] + trunk[:int(rng.integers(8, 64))]
        seq = Sequence(tokens, SP, BS, array("q", tokens).tobytes())
        assert bm.prefix_hashes(seq) == chained_hashes(tokens, (len(tokens) - 1) // BS)
        assert seq.block_keys == [key_of(seq, i) for i in range(len(seq.block_hashes))]


def test_page_array_follows_the_table_through_growth_and_release():
    """Sequence.page_array: the table as int32 numpy after one page, several pages and past its buffer's room;
    arrays handed out earlier keep their entries; a table started over (release_pages) gets a new buffer."""
    seq = Sequence(list(range(9)), SP, BS)
    seq.block_table = [7, 3]
    handed = [(seq.page_array(), [7, 3])]
    for grow in ([11], [5, 6, 8], list(range(100, 140)), [1]):   # one page, a few, past the room, one again
        seq.block_table.extend(grow)
        pages = seq.page_array()
        assert pages.dtype == np.int32 and pages.tolist() == seq.block_table
        handed.append((pages, list(seq.block_table)))
    for pages, table in handed:
        assert pages.tolist() == table
    seq.release_pages()
    seq.block_table = [2]
    assert seq.page_array().tolist() == [2] and handed[-1][0][0] == 7
