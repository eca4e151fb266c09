"""The policy's cached decode plans equal full plans while the batch decodes on."""
from types import SimpleNamespace

import numpy as np
import torch

from nanovllm.cascade.policy import CascadePolicy
from nanovllm.cascade.reference import cascade_attention
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

FIELDS = ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len")


def decode_batch(rng, page=16):
    """Groups of requests sharing system prompts (and one nested block), plus loners, mid-decode."""
    seqs, next_page = [], [0]

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


def attention_by_request(plan, q, k_cache, v_cache):
    """Cascade attention (reference math) of each request, back in request order."""
    order = plan.order.numpy()
    out = cascade_attention(q[order], k_cache, v_cache, plan, sm_scale=0.125)
    by_request = torch.empty_like(out)
    by_request[order] = out
    return by_request


def test_refreshed_decode_plans_equal_full_plans():
    """Within a group any request order is a valid plan, so compare what matters: the same shared
    levels (groups and their pages) and the same attention output for every request."""
    rng = np.random.default_rng(0)
    seqs, fresh = decode_batch(rng)
    config = SimpleNamespace(kvcache_block_size=16, cascade_max_levels=3, cascade_shared_prefix_len=0,
                             attention_backend="torch")
    policy = CascadePolicy(config)
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(10_400, 16, 2, 64, generator=gen) for _ in range(2))
    q = torch.randn(len(seqs), 4, 64, generator=gen)
    for step in range(40):
        plan = policy.plan(seqs)
        full = policy._full_plan(seqs)
        assert plan is not None and len(plan.levels) == len(full.levels) == 3
        for ours, theirs in zip(plan.levels[:-1], full.levels[:-1]):
            assert np.array_equal(ours.kv_indices.numpy(), theirs.kv_indices.numpy())
            assert np.array_equal(ours.qo_indptr.numpy(), theirs.qo_indptr.numpy())
        assert (plan.regular_kv_pages, plan.cascade_kv_pages) == (full.regular_kv_pages, full.cascade_kv_pages)
        torch.testing.assert_close(attention_by_request(plan, q, k_cache, v_cache),
                                   attention_by_request(full, q, k_cache, v_cache), rtol=1e-5, atol=1e-5)
        for seq in seqs:  # the step ran: one more token each, and a fresh page when one fills
            seq.append_token(7)
            seq.num_computed_tokens += 1
            if len(seq) > 16 * len(seq.block_table):
                seq.block_table.append(fresh(1)[0])
    # A changed batch is planned in full again.
    seqs.pop(3)
    plan = policy.plan(seqs)
    assert plan.num_rows == len(seqs)


def test_shared_level_backend_follows_the_sweep():
    """The shared levels' kernel for the shapes measured by scripts/sweep_shared_kernel.py (H200; the
    fastest of triton / triton-wide / fa3 there, cost_model's comment has the times)."""
    from nanovllm.cascade.cost_model import shared_level_backend

    def choice(groups, rows, hq=16, hkv=8):
        return shared_level_backend(SimpleNamespace(num_rows=groups * rows, groups_per_level=[groups]), hq, hkv)

    for groups, rows, want in ((64, 16, "triton"), (32, 4, "triton"), (256, 4, "triton"), (1, 16, "triton"),
                               (4, 32, "triton-wide"), (8, 32, "triton-wide"), (16, 24, "triton-wide"),
                               (1, 64, "triton-wide"), (1, 128, "triton-wide"), (1, 256, "triton-wide"),
                               (2, 48, "triton-wide"), (16, 64, "fa3"), (8, 128, "fa3"), (1, 1024, "fa3")):
        assert choice(groups, rows) == want, (groups, rows)
    # Under tensor parallelism a rank has half the heads: fa3 gets half the CTAs.
    assert choice(8, 128, 8, 4) == "fa3" and choice(4, 128, 8, 4) == "triton-wide"
    assert shared_level_backend(SimpleNamespace(num_rows=64, groups_per_level=[1], shared_backend="fa2"), 16, 8) == "fa2"
