"""The policy's cached decode plans equal full plans while the batch decodes on."""
from types import SimpleNamespace

import numpy as np

from nanovllm.cascade.policy import CascadePolicy
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

FIELDS = ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len")


def decode_batch(rng, page=16):
    """Groups of requests sharing system prompts (and one nested block), plus loners, mid-decode."""
    seqs, next_page = [], [10_000]

    def fresh(n):
        next_page[0] += n
        return list(range(next_page[0] - n, next_page[0]))

    for members, shared in ((5, 12), (3, 30), (4, 8), (1, 0)):
        prefix = fresh(shared)
        nested = prefix + fresh(6)
        for m in range(members):
            mine = (nested if m < 2 and members > 2 else prefix) + fresh(int(rng.integers(1, 4)))
            seq = Sequence([7] * (len(mine) * page - int(rng.integers(0, page))), SamplingParams(max_tokens=99), page)
            seq.block_table = mine
            seq.num_computed_tokens, seq.chunk_len = len(seq) - 1, 1
            seqs.append(seq)
    return seqs, fresh


def test_refreshed_decode_plans_equal_full_plans():
    rng = np.random.default_rng(0)
    seqs, fresh = decode_batch(rng)
    config = SimpleNamespace(kvcache_block_size=16, cascade_max_levels=3, cascade_shared_prefix_len=0,
                             attention_backend="torch")
    policy = CascadePolicy(config, None)
    for step in range(40):
        plan = policy.plan(seqs)
        full = policy._full_plan(seqs)
        assert plan is not None and len(plan.levels) == len(full.levels) == 3
        assert np.array_equal(plan.order.numpy(), full.order.numpy())
        for ours, theirs in zip(plan.levels, full.levels):
            for f in FIELDS:
                assert np.array_equal(getattr(ours, f).numpy(), getattr(theirs, f).numpy()), (step, f)
        assert (plan.regular_kv_pages, plan.cascade_kv_pages) == (full.regular_kv_pages, full.cascade_kv_pages)
        for seq in seqs:  # the step ran: one more token each, and a fresh page when one fills
            seq.append_token(7)
            seq.num_computed_tokens += 1
            if len(seq) > 16 * len(seq.block_table):
                seq.block_table.append(fresh(1)[0])
    # A changed batch is planned in full again.
    seqs.pop(3)
    plan = policy.plan(seqs)
    assert plan.num_rows == len(seqs)
