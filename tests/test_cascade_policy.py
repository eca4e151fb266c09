"""The policy's cached decode plans equal full plans while the batch decodes on; the cost model's
kernel choice and fit."""
import dataclasses
import os
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
        full = policy._full_plan(seqs, [s.page_array() for s in seqs])
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
    fastest of triton / triton-wide / fa3 / fa3 cut into pieces there, cost_model's comment has the times)."""
    from nanovllm.cascade.cost_model import shared_level_backend

    def choice(groups, rows, hq=16, hkv=8):
        return shared_level_backend(SimpleNamespace(num_rows=groups * rows, groups_per_level=[groups]), hq, hkv)

    for groups, rows, want in ((64, 16, "triton"), (32, 4, "triton"), (256, 4, "triton"), (1, 16, "triton"),
                               (4, 32, "triton-wide"), (8, 32, "triton-wide"), (16, 24, "triton-wide"),
                               (1, 64, "triton-wide"), (1, 128, "fa3-split"), (1, 256, "fa3-split"),
                               (4, 96, "fa3-split"), (2, 48, "triton-wide"), (16, 64, "fa3"), (8, 128, "fa3"),
                               (1, 1024, "fa3")):
        assert choice(groups, rows) == want, (groups, rows)
    # Under tensor parallelism a rank has half the heads: fa3 gets half the CTAs, so it is cut.
    assert choice(16, 128, 8, 4) == "fa3" and choice(8, 128, 8, 4) == "fa3-split"
    assert shared_level_backend(SimpleNamespace(num_rows=64, groups_per_level=[1], shared_backend="fa2"), 16, 8) == "fa2"


def test_graphs_capture_only_reachable_shared_kernels():
    from nanovllm.cascade.cost_model import SHARED_BACKENDS, reachable_shared_backends
    assert reachable_shared_backends(SHARED_BACKENDS, 8) == ("triton",)
    assert reachable_shared_backends(SHARED_BACKENDS, 32) == ("triton", "triton-wide")
    assert reachable_shared_backends(SHARED_BACKENDS, 64) == ("triton", "triton-wide", "fa3")
    assert reachable_shared_backends(SHARED_BACKENDS, 96) == SHARED_BACKENDS
    assert reachable_shared_backends(("fa3",), 8) == ("fa3",)        # configured: always captured


def test_cost_model_fit_recovers_per_kernel_lines_and_reports_held_out_error():
    """fit_cost_model on synthetic measurements made from known lines (2% noise; the own-token and merged-row
    terms one for all kernels and each kernel's terms those KERNEL_TERMS names, fa3-split with fa3's streaming
    terms and a fixed cost of its own (SAME_KERNEL), as the fit assumes): every kernel's line comes back, and the
    held-out samples are predicted within the noise."""
    from nanovllm.cascade.cost_model import CostSample, LevelCosts, fit_cost_model, relative_errors
    own, merge = 1e-6, 9e-6
    truth = {"triton": LevelCosts(0.010, 9e-7, 0.0, 5e-4, own, merge),
             "triton-wide": LevelCosts(0.012, 7e-7, 2.5e-7, 5e-4, own, merge),
             "fa3": LevelCosts(0.009, 1.7e-6, 0.0, 0.0, own, merge),
             "fa3-split": LevelCosts(0.006, 1.7e-6, 0.0, 0.0, own, merge)}
    rng = np.random.default_rng(0)

    def sample(backend):
        levels, splits = int(rng.integers(2, 4)), int(rng.integers(1, 33))
        shared, own_tokens, rows = int(rng.integers(1e3, 3e5)), int(rng.integers(1e3, 3e5)), int(rng.integers(2, 1025))
        tiles = shared * int(rng.integers(1, 9))
        merged = rows * splits if backend != "fa3" else 0
        unique, crit, waves = int(rng.integers(1e3, 1e6)), int(rng.integers(128, 70000)), int(rng.integers(1, 40))
        noise = lambda: 1 + rng.normal(0, 0.02)  # noqa: E731
        regular = (0.009 + 3e-7 * unique + 1.3e-5 * crit + 5e-3 * waves) * noise()
        cascade = truth[backend].ms(levels, tiles, shared, splits, own_tokens, merged) * noise()
        return CostSample(backend, levels, 0, unique, regular, cascade, rows=rows, crit_tokens=crit, waves=waves,
                          tile_tokens=tiles, shared_tokens=shared, splits=splits, merge_rows=merged,
                          own_tokens=own_tokens)
    train = [sample(b) for b in truth for _ in range(20)]
    held_out = [sample(b) for b in truth for _ in range(5)]
    model = fit_cost_model(train)
    for name, want in truth.items():
        got = model.cascade[name]
        assert abs(got.per_tile_token_ms - want.per_tile_token_ms) < 0.15 * want.per_tile_token_ms, (name, got)
        assert abs(got.per_own_token_ms - want.per_own_token_ms) < 0.15 * want.per_own_token_ms, (name, got)
    split, fa3 = model.cascade["fa3-split"], model.cascade["fa3"]
    assert split.per_tile_token_ms == fa3.per_tile_token_ms and split.per_shared_token_ms == fa3.per_shared_token_ms
    assert abs(model.regular_per_crit_ms - 1.3e-5) < 0.1 * 1.3e-5, model
    errors = relative_errors(model, held_out)
    assert max(max(e) for e in errors) < 0.10, errors
    # One line for every kernel (the pre-session-6 model) misses the kernels' differences.
    as_one = lambda samples: [dataclasses.replace(s, backend="triton") for s in samples]  # noqa: E731
    one_line = fit_cost_model(as_one(train))
    assert max(e[1] for e in relative_errors(one_line, as_one(held_out))) > 0.10


def test_shared_level_terms_split_as_the_triton_level_plans():
    """The split count the cost model charges a Triton shared level is the one the level plans (its own
    rule, shared_kernel.choose_splits, with the partial buffer of a graph of the level's rows)."""
    from nanovllm.cascade.cost_model import shared_level_terms
    from nanovllm.cascade.planner import CascadeLevel
    from nanovllm.cascade.shared_kernel import TILES, TritonSharedLevel, partial_rows
    i32 = lambda a: torch.tensor(a, dtype=torch.int32)  # noqa: E731
    for groups, per, pages in ((4, 32, 1024), (64, 16, 128), (1, 128, 2048), (9, 21, 1929), (72, 3, 711), (2, 2, 4)):
        n = groups * per
        level = CascadeLevel(i32(np.arange(groups + 1) * per), i32(np.arange(groups + 1) * pages),
                             i32(np.arange(groups * pages)), i32([16] * groups), causal=False)
        for kernel in ("triton", "triton-wide"):
            planned = TritonSharedLevel(n, (torch.empty(partial_rows(n), 16, 128), torch.empty(partial_rows(n), 16)),
                                        tile=TILES[kernel])
            planned.plan(level.qo_indptr, level.kv_indptr, level.kv_indices, level.kv_last_page_len, 16, 8, 128, 16)
            tile, distinct, splits, merged = shared_level_terms(level, kernel, 16, 8, 16)
            assert splits == planned.splits and merged == n * splits, (groups, per, pages, kernel)
            assert distinct == groups * pages * 16 and tile == groups * -(-per // planned.block_rows) * pages * 16


def test_relative_least_squares_by_hand():
    """Free fit: a line through points that lie on one is recovered exactly. Constrained: where the free
    fit's fixed cost is negative (-0.257 here), the answer is the per-token line alone, by hand
    c = sum(x / y) / sum((x / y)**2) = 0.3985 (it was the free slope, 0.561, with the fixed cost
    clipped to 0: relative squared error 0.84 against 0.21)."""
    from nanovllm.cascade.cost_model import relative_least_squares
    assert np.allclose(relative_least_squares([[1, x] for x in (1, 2, 4, 8)], [0.1 + 0.5 * x for x in (1, 2, 4, 8)]),
                       [0.1, 0.5])
    x, y = np.array([1.0, 2.0, 4.0, 8.0]), np.array([0.3, 0.9, 2.0, 4.1])
    ratio = x / y
    want = ratio.sum() / (ratio ** 2).sum()
    got = relative_least_squares([[1, xi] for xi in x], y)
    assert got[0] == 0 and abs(got[1] - want) < 1e-12, got
    # Against a brute-force grid over nonnegative coefficients: none does better.
    def error(c):
        return float(np.sum(((c[0] + c[1] * x) / y - 1) ** 2))
    grid = min(error((a, b)) for a in np.linspace(0, 0.5, 101) for b in np.linspace(0, 1, 201))
    assert error(got) <= grid + 1e-12


def test_cost_model_fit_recovers_the_regular_line_terms():
    """The regular line's fitted terms (fixed, per distinct token, per critical-path token, per wave)
    come back from exact synthetic measurements over varied shapes; asked for the per-token and per-request
    terms too, the fit leaves them at 0 where the data has none."""
    from nanovllm.cascade.cost_model import REGULAR_TERMS, CostSample, fit_cost_model
    rng = np.random.default_rng(3)
    want = {"fixed": 0.0092, "per_unique": 2.99e-7, "per_crit": 1.29e-5, "per_wave": 4.97e-3}
    samples = []
    for _ in range(40):
        rows, distinct = int(rng.integers(2, 1025)), int(rng.integers(1e3, 1e5))
        crit, waves = int(rng.integers(128, 70000)), int(rng.integers(1, 40))
        reg = want["fixed"] + want["per_unique"] * distinct + want["per_crit"] * crit + want["per_wave"] * waves
        samples.append(CostSample("triton", 2, distinct + rows * 100, distinct, reg, 0.01, rows, crit, waves,
                                  tile_tokens=distinct, own_tokens=rows * 16))
    for terms in (tuple(want), REGULAR_TERMS):
        model = fit_cost_model(samples, regular_terms=terms)
        got = {t: getattr(model, f"regular_{t}_ms") for t in REGULAR_TERMS}
        assert np.allclose([got[t] for t in want], list(want.values()), rtol=1e-6), got
        assert abs(got["per_token"]) < 1e-12 and abs(got["per_row"]) < 1e-9, got


def test_regular_decode_split_is_flashinfers_chunking():
    """regular_decode_split against the rule written out by brute force (FlashInfer's planner for its
    tensor-core decode, scheduler.cuh: the smallest chunk of >= 128 tokens whose pieces number at most
    2 x SMs / kv heads; more requests than that, or NO_SPLIT_KV_ROWS, where the engine turns the cut off:
    no cut), at every length mix below."""
    from nanovllm.cascade.cost_model import NO_SPLIT_KV_ROWS, regular_decode_split
    rng = np.random.default_rng(5)
    for _ in range(300):
        page, kv_heads = int(rng.choice([16, 32])), int(rng.choice([1, 2, 4, 8]))
        slots, limit, least = 264, 264 // kv_heads, max(128 // page, 1)
        pages = rng.integers(0, int(rng.choice([4, 40, 400, 4000])), int(rng.integers(1, 80))).tolist()
        p = [max(x, 1) for x in pages]
        if len(p) > limit or len(p) >= NO_SPLIT_KV_ROWS:
            chunk = max(least, max(p))
        else:
            chunk = next(c for c in range(least, max(max(p), least) + 1) if sum(-(-x // c) for x in p) <= limit)
        pieces = sum(-(-x // chunk) for x in p)
        assert regular_decode_split(pages, kv_heads, page) == (min(chunk, max(p)), -(-pieces * kv_heads // slots))


def test_cost_sample_features_of_a_plan_match_the_grids_closed_form():
    """The features the engine's plans give (CostSample.of, what worth_it reads) equal the closed form
    scripts/refit_cost_model.py uses for a stored grid's shape, so the defaults fitted there apply to
    the engine's plans."""
    import importlib.util
    import pathlib

    from nanovllm.cascade.cost_model import CostSample, shared_level_backend
    from nanovllm.cascade.planner import plan_cascade
    path = pathlib.Path(__file__).parent.parent / "scripts" / "refit_cost_model.py"
    spec = importlib.util.spec_from_file_location("refit_cost_model", path)
    refit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refit)
    page, own = refit.PAGE, refit.OWN_TOKENS // refit.PAGE
    for groups, per, shared in ((1, 2, 256), (4, 32, 16384), (3, 35, 4160), (16, 64, 2048), (1, 128, 2048),
                                (47, 4, 32), (2, 456, 176)):
        sp, bs = shared // page, groups * per
        table = np.zeros((bs, sp + own), np.int32)
        for g in range(groups):
            for r in range(per):
                row = g * per + r
                table[row, :sp] = np.arange(g * sp, (g + 1) * sp)
                table[row, sp:] = np.arange(groups * sp + row * own, groups * sp + (row + 1) * own)
        plan = plan_cascade(table, np.full(bs, (sp + own) * page, np.int32), np.ones(bs, np.int32), page)
        kernel = shared_level_backend(plan, refit.HQ, refit.HKV)
        assert CostSample.of(plan, page, kernel, 1.0, 2.0) == refit.sample_of(groups, per, shared, 1.0, 2.0, kernel)


def test_cost_model_kernel_choice_follows_the_config():
    from nanovllm.cascade.cost_model import CascadeCostModel
    plan = SimpleNamespace(num_rows=8 * 128, groups_per_level=[8])   # fa3's shape under auto
    assert CascadeCostModel().backend(plan) == "fa3"
    assert CascadeCostModel(kv_fp8=True).backend(plan) == "fa2"   # fp8 KV: no fa3
    assert CascadeCostModel(shared_backend="triton").backend(plan) == "triton"
    one_document = SimpleNamespace(num_rows=128, groups_per_level=[1])   # fa3 cut into pieces
    assert CascadeCostModel().backend(one_document) == "fa3-split"
    assert CascadeCostModel(kv_fp8=True).backend(one_document) == "triton-wide"


def test_default_costs_are_the_refit_of_the_stored_h200_grid():
    """cost_model's defaults equal fit_cost_model on the four stored session-20 H200 grids (4 significant
    digits; measured with --distinct-caches --ragged-fa3), and that fit's errors on all 128 held-out shapes of the
    four grids (`python scripts/refit_cost_model.py` prints them; cost_model's module doc gives them by set: seeds
    2-4, seed 19, the fresh runs)."""
    import importlib.util
    import pathlib

    from nanovllm.cascade.cost_model import REGULAR_TERMS, CascadeCostModel, fit_cost_model, relative_errors
    path = pathlib.Path(__file__).parent.parent / "scripts" / "refit_cost_model.py"
    spec = importlib.util.spec_from_file_location("refit_cost_model", path)
    refit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refit)
    assert all(os.path.join("data", "s20") in p for p in refit.STORED + refit.FRESH)
    samples = refit.parse_table(refit.STORED)
    assert len(samples["train"]) == 4 * 104 and len(samples["held-out"]) == 4 * 32
    fitted, default = fit_cost_model([s for _, s in samples["train"]]), CascadeCostModel()
    close = lambda a, b: abs(a - b) <= 5e-4 * max(abs(a), abs(b)) + 1e-12  # noqa: E731
    for term in REGULAR_TERMS:
        name = f"regular_{term}_ms"
        assert close(getattr(fitted, name), getattr(default, name)), (name, getattr(fitted, name))
    assert set(fitted.cascade) == set(default.cascade)
    for kernel, costs in fitted.cascade.items():
        for a, b in zip(dataclasses.astuple(costs), dataclasses.astuple(default.cascade[kernel])):
            assert close(a, b), (kernel, costs)
    # The 128 held-out shapes (seeds 19, 2, 3, 4): error median and max, regular then cascade (3.5% / 18.8%,
    # 2.9% / 11.5%), both lines within 10% on 120.
    errors = np.array(relative_errors(default, [s for _, s in samples["held-out"]]))
    near = lambda got, want: abs(got - want) < 5e-4  # noqa: E731
    assert near(float(np.median(errors[:, 0])), 0.035) and near(float(np.median(errors[:, 1])), 0.0295)
    assert near(float(errors[:, 0].max()), 0.1885) and near(float(errors[:, 1].max()), 0.1154)
    assert int((errors.max(axis=1) <= 0.10).sum()) == 120
    # The 40 fresh shapes (seed 20, measured twice, used for neither the fit nor the choice of the terms kept; a
    # regular per-CTA term was dropped after them, cost_model's doc): 3.1% / 12.1%, 2.9% / 12.7%, 77 of 80 within 10%.
    fresh = refit.parse_table(refit.FRESH)["held-out"]
    errors = np.array(relative_errors(default, [s for _, s in fresh]))
    assert len(fresh) == 80 and near(float(np.median(errors[:, 1])), 0.0286)
    assert near(float(errors[:, 0].max()), 0.1212) and near(float(errors[:, 1].max()), 0.1271)
    assert int((errors.max(axis=1) <= 0.10).sum()) == 77
