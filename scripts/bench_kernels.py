"""Attention kernel measurements on the GPU machine, one layer, Qwen3-0.6B head shapes (16 q heads,
8 kv heads, d=128, bf16). Prints markdown tables for claude_docs/ and fits the cascade cost model.

    python scripts/bench_kernels.py [--quick] [--only SECTION] [--kv-dtype fp8]

1. prefill backend: fa2 vs fa3 (auto) on causal prompt batches;
2. decode: tensor cores on/off and page sizes 16/32/64; every decode kernel at W1-like shapes (`decode-kernels`)
   and at small batches (`decode-kernels-small`);
3. cascade vs regular decode over a training grid of groups x requests x shared length (page 16;
   56 shapes) and 16 held-out shapes, with FlashInferCascadeAttention in CUDA-graph mode as the
   engine runs it (shared levels on the kernel it picks), a least-squares fit of
   nanovllm/cascade/cost_model.py's coefficients per shared-level kernel on the training grid, and the
   held-out errors (`--only cascade`; `--quick`: a quarter of it; `--held-out-seed S --held-out-count N`: N
   fresh held-out shapes drawn from the whole range; `--held-out-only`: measure only those and report the
   defaults on them).
"""
import argparse
import itertools

import flashinfer
import numpy as np
import torch

from nanovllm.cascade.cost_model import shared_level_backend
from nanovllm.cascade.flashinfer_cascade import FlashInferCascadeAttention
from nanovllm.cascade.planner import plan_cascade

HQ, HKV, D = 16, 8, 128
DT = torch.bfloat16
WS = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
SIDE, SIDE_WS = torch.cuda.Stream(), torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
GRAPH_COPIES = 8   # cascade grid: layer copies in one graph (main's --graph-copies)
DISTINCT_CACHES = RAGGED_FA3 = False   # cascade grid: main's --distinct-caches, --ragged-fa3


def timed(fn, reps=30, inner=1):
    """Median ms of one fn() over reps timings of `inner` calls back to back (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record(); b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return float(np.median(times))


def graphed(fn, copies=1):
    """Time fn replayed from a CUDA graph, as the engine's decode runs. copies > 1: the graph holds fn that
    many times back to back (as the engine's holds a step's layers) and the time is one copy's share, without
    the graph launch's host latency, which a single short copy's time carries (a few us)."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(copies):
            fn()
    return timed(g.replay) / copies


def cache(pages, page):
    return (torch.randn(pages, page, HKV, D, device="cuda", dtype=DT), torch.randn(pages, page, HKV, D, device="cuda", dtype=DT))


def paged(lens, page, first_page=0):
    n = (np.asarray(lens) + page - 1) // page
    indptr = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    indices = np.arange(first_page, first_page + indptr[-1], dtype=np.int32)
    last = (np.asarray(lens) - (n - 1) * page).astype(np.int32)
    return torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(last)


def prefill_backends(quick):
    print("\n### Prefill backend (causal, one layer)\n\n| prompts x length | fa2 ms | fa3 ms |\n|---|---|---|")
    rows = {}
    for n, length in ([(8, 2048), (64, 256)] if quick else [(8, 2048), (16, 1024), (64, 256), (2, 8192)]):
        kc, vc = cache(n * length // 16 + 8, 16)
        ind, idx, last = paged([length] * n, 16)
        qo = torch.arange(0, n * length + 1, length, dtype=torch.int32)
        q = torch.randn(n * length, HQ, D, device="cuda", dtype=DT)
        res = []
        for backend in ("fa2", "fa3"):
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(WS, "NHD", backend=backend)
            w.plan(qo, ind, idx, last, HQ, HKV, D, 16, causal=True, q_data_type=DT, kv_data_type=DT)
            res.append(timed(lambda: w.run(q, (kc, vc))))
        rows[f"{n}x{length}"] = res
        print(f"| {n} x {length} | {res[0]:.3f} | {res[1]:.3f} |")
    return rows


def decode_options(quick):
    print("\n### Decode (CUDA graph), batch x context: page size and tensor cores\n\n"
          "| batch x context | page 16 tc | page 16 no-tc | page 32 tc | page 64 tc |\n|---|---|---|---|---|")
    for bs, ctx in ([(256, 600)] if quick else [(256, 600), (64, 2048), (512, 300)]):
        q = torch.randn(bs, HQ, D, device="cuda", dtype=DT)
        res = []
        for page, tc in ((16, True), (16, False), (32, True), (64, True)):
            kc, vc = cache(bs * (ctx // page + 1) + 8, page)
            ind, idx, last = paged([ctx] * bs, page)
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                WS, "NHD", use_cuda_graph=True, use_tensor_cores=tc, paged_kv_indptr_buffer=ind.cuda(),
                paged_kv_indices_buffer=idx.cuda(), paged_kv_last_page_len_buffer=last.cuda())
            w.plan(ind, idx, last, HQ, HKV, D, page, q_data_type=DT, kv_data_type=DT)
            res.append(graphed(lambda: w.run(q, (kc, vc))))
        print(f"| {bs} x {ctx} | " + " | ".join(f"{r:.3f}" for r in res) + " |")


KV_DT = DT  # --kv-dtype fp8: decode-kernels reads an fp8 (e4m3) cache


def decode_kernels(quick, small=False):
    """One decode step's attention on every kernel FlashInfer offers on sm90, at W1-like and
    W2/W3-last-level shapes: ms and effective KV bandwidth (of KV_DT's bytes)."""
    page = 16
    rng = np.random.default_rng(0)
    shapes = [("256 x U(200,1600)", rng.integers(200, 1600, 256)), ("256 x 600", np.full(256, 600)),
              ("1024 x 256", np.full(1024, 256)), ("64 x 2048", np.full(64, 2048)), ("32 x U(100,1500)", rng.integers(100, 1500, 32))]
    if small:  # decode's small batches (W1's tail, interactive use)
        shapes = [("1 x 600", np.full(1, 600)), ("1 x 4000", np.full(1, 4000)), ("8 x 600", np.full(8, 600)),
                  ("8 x 4000", np.full(8, 4000)), ("16 x 1500", np.full(16, 1500))]
    names = ["decode tc", "decode no-tc", "xqa", "prefill fa2", "prefill fa3", "BatchAttention", "triton_decode"]
    print("\n### Decode kernels (one layer, ms; TB/s of KV read)\n\n| batch x context | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1))
    for label, lens in shapes:
        lens = lens.astype(np.int32)
        bs = len(lens)
        kc, vc = (c.to(KV_DT) for c in cache(int(((lens + page - 1) // page).sum()) + 8, page))
        ind, idx, last = paged(lens, page)
        q = torch.randn(bs, HQ, D, device="cuda", dtype=DT)
        gbytes = float(lens.sum()) * HKV * D * 2 * KV_DT.itemsize / 1e9
        res = []
        for tc in (True, False):
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                WS, "NHD", use_cuda_graph=True, use_tensor_cores=tc, paged_kv_indptr_buffer=ind.cuda(),
                paged_kv_indices_buffer=idx.cuda(), paged_kv_last_page_len_buffer=last.cuda())
            w.plan(ind, idx, last, HQ, HKV, D, page, q_data_type=DT, kv_data_type=KV_DT)
            res.append(graphed(lambda: w.run(q, (kc, vc))))
        try:
            width = int(((lens + page - 1) // page).max())
            table = torch.zeros(bs, width, dtype=torch.int32)
            for i in range(bs):
                table[i, :ind[i + 1] - ind[i]] = idx[ind[i]:ind[i + 1]]
            table, seq_lens = table.cuda(), torch.from_numpy(lens).to(torch.uint32).cuda()
            xws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
            out = torch.empty_like(q)
            run = lambda: flashinfer.decode.trtllm_batch_decode_with_kv_cache(
                q, (kc, vc), xws, table, seq_lens, int(lens.max()), bmm1_scale=D ** -0.5, out=out,
                kv_layout="NHD", backend="xqa")
            ref = flashinfer.BatchDecodeWithPagedKVCacheWrapper(WS, "NHD", use_tensor_cores=True)
            ref.plan(ind, idx, last, HQ, HKV, D, page, q_data_type=DT, kv_data_type=KV_DT)
            run()
            err = (out.float() - ref.run(q, (kc, vc)).float()).abs().max().item()
            res.append(graphed(run))
            print(f"xqa max abs diff vs decode wrapper: {err:.2e}")
        except Exception as e:  # report and go on: the others still measure
            print(f"xqa failed: {type(e).__name__}: {str(e)[:300]}")
            res.append(float("nan"))
        qo = torch.arange(bs + 1, dtype=torch.int32)
        for backend in ("fa2", "fa3"):
            if backend == "fa3" and KV_DT != DT:  # FA3 takes fp8 KV only with fp8 queries (its build fails)
                res.append(float("nan"))
                continue
            try:
                w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(WS, "NHD", backend=backend)
                w.plan(qo, ind, idx, last, HQ, HKV, D, page, causal=False, q_data_type=DT, kv_data_type=KV_DT)
                res.append(timed(lambda: w.run(q, (kc, vc))))
            except Exception as e:
                print(f"prefill {backend} failed: {type(e).__name__}: {str(e)[:300]}")
                res.append(float("nan"))
        try:
            w = flashinfer.BatchAttention("NHD")
            w.plan(qo.cuda(), ind.cuda(), idx.cuda(), torch.from_numpy(lens).cuda(), HQ, HKV, D, D, page,
                   causal=False, q_data_type=DT, kv_data_type=KV_DT)
            res.append(timed(lambda: w.run(q, (kc, vc))))
        except Exception as e:
            print(f"BatchAttention failed: {type(e).__name__}: {str(e)[:300]}")
            res.append(float("nan"))
        from nanovllm.attention.triton_decode import TritonPagedDecode
        bufs = (ind.cuda(), idx.cuda(), last.cuda())
        td = TritonPagedDecode(HQ, HKV, D, page, torch.device("cuda"), buffers=bufs)
        td.plan(ind, idx, last)
        ref = flashinfer.BatchDecodeWithPagedKVCacheWrapper(WS, "NHD", use_tensor_cores=True)
        ref.plan(ind, idx, last, HQ, HKV, D, page, q_data_type=DT, kv_data_type=KV_DT)
        err = (td.run(q, (kc, vc)).float() - ref.run(q, (kc, vc)).float()).abs().max().item()
        print(f"triton_decode max abs diff vs decode wrapper: {err:.2e}")
        res.append(graphed(lambda: td.run(q, (kc, vc))))
        print(f"| {label} | " + " | ".join(f"{r:.3f} ({gbytes / r:.2f})" for r in res) + " |")


def cascade_shapes(quick, held_out_seed=None, held_out_count=16):
    """(groups, requests per group, shared tokens): a training grid over the range the engine meets
    (rows per group 2-1024, shared 256-64k tokens, 1-256 groups, at most 1024 rows and 2M KV tokens a
    layer) and a held-out set of seeded off-grid shapes: sessions 8 and 13's (seed None: 16 shapes from
    a short list of values), or `held_out_count` shapes drawn log-uniformly from the whole range issue
    #14 names (groups 1-256, rows per group 2-1024, shared 16-64k tokens, a whole number of pages) with
    `held_out_seed`."""
    fits = lambda g, r, s: g * r <= 1024 and g * s + g * r * 256 <= 2_000_000  # noqa: E731
    train = [(g, r, s) for g in (1, 4, 16, 64, 256) for r in (2, 8, 32, 128, 1024) for s in (256, 2048, 16384, 65536)
             if fits(g, r, s)]
    if held_out_seed is not None:   # the whole range: 4-page shared runs, and every kernel's tiles partly filled
        train += [(g, r, 64) for g in (1, 4, 16, 64, 256) for r in (2, 8, 32, 128, 1024) if fits(g, r, 64)]
        train += [(g, 48, s) for g in (1, 4, 16) for s in (256, 2048, 16384, 65536) if fits(g, 48, s)]   # 32-row tile
        train += [(g, r, s) for g, r in ((16, 64), (8, 128), (4, 256), (2, 512), (4, 64), (8, 64), (8, 96))
                  for s in (256, 2048, 16384) if fits(g, r, s)]                                         # fa3
    held_out = []
    if held_out_seed is None:
        rng = np.random.default_rng(1)
        draw = lambda: (int(rng.choice([2, 3, 6, 12, 24, 48, 96])), int(rng.choice([3, 5, 12, 24, 48, 96, 200])),  # noqa: E731
                        int(rng.choice([512, 1008, 4096, 12000, 30000])))
    else:
        rng = np.random.default_rng(held_out_seed)
        log_int = lambda lo, hi: int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))  # noqa: E731
        draw = lambda: (log_int(1, 256), log_int(2, 1024), 16 * log_int(1, 4096))  # noqa: E731
    while len(held_out) < held_out_count:
        shape = draw()
        if fits(*shape) and shape not in held_out and shape not in train:
            held_out.append(shape)
    return (train[::4], held_out[:4]) if quick else (train, held_out)


def group_table(groups, per, shared_pages, own_pages):
    """Block table of groups x per requests: each group's requests share its run of shared_pages pages (the
    groups' runs first, in order), then each request has own_pages pages of its own."""
    rows = np.arange(groups * per)
    shared = (rows // per)[:, None] * shared_pages + np.arange(shared_pages)
    own = groups * shared_pages + rows[:, None] * own_pages + np.arange(own_pages)
    return np.concatenate([shared, own], axis=1).astype(np.int32)


def two_level_layer(groups, per, shared, own, page=16):
    """One decode layer of groups x per requests over `shared` tokens a group and `own` each, planned in two
    levels: (k cache, v cache, plan, q, the engine's shared-level kernel, max_pages for a graphed cascade)."""
    bs = groups * per
    shared_pages, own_pages = shared // page, own // page
    kc, vc = cache(groups * shared_pages + bs * own_pages + 8, page)
    table = group_table(groups, per, shared_pages, own_pages)
    plan = plan_cascade(table, np.full(bs, shared + own, np.int32), np.ones(bs, np.int32), page, max_levels=2)
    assert len(plan.levels) == 2 and torch.equal(plan.order, torch.arange(bs))
    q = torch.randn(bs, HQ, D, device="cuda", dtype=DT)
    return kc, vc, plan, q, shared_level_backend(plan, HQ, HKV), int(table.size) + bs


def cascade_sample(groups, per, shared, page=16, unique=256):
    """One decode layer of groups x per requests sharing `shared` tokens a group, each with `unique`
    tokens of its own: regular decode and cascade as the engine's graphs run them (shared levels on
    the kernel the engine picks, without split-kv, the first on a side stream). -> CostSample."""
    from nanovllm.cascade.cost_model import CostSample
    bs = groups * per
    shared_pages, own = shared // page, unique // page
    kc, vc = cache(groups * shared_pages + bs * own + 8, page)
    table = group_table(groups, per, shared_pages, own)
    plan = plan_cascade(table, np.full(bs, shared_pages * page + unique, np.int32), np.ones(bs, np.int32), page,
                        max_levels=3)
    q = torch.randn(bs, HQ, D, device="cuda", dtype=DT)
    n = table.shape[1]
    ind = torch.arange(0, bs * n + 1, n, dtype=torch.int32)
    idx = torch.from_numpy(table.reshape(-1).copy())
    last = torch.full((bs,), page, dtype=torch.int32)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        WS, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=ind.cuda(),
        paged_kv_indices_buffer=idx.cuda(), paged_kv_last_page_len_buffer=last.cuda())
    w.plan(ind, idx, last, HQ, HKV, D, page, q_data_type=DT, kv_data_type=DT)
    # --distinct-caches: each copy of the layer in the graph reads a cache of its own, as an engine step's layers
    # do (one cache: a layer whose KV fits L2 finds it there in every copy after the first).
    caches = [(kc, vc)]
    if DISTINCT_CACHES and 2 * kc.numel() * kc.element_size() * GRAPH_COPIES <= 16 << 30:
        caches += [cache(kc.shape[0], page) for _ in range(GRAPH_COPIES - 1)]
    ring = itertools.cycle(caches)
    regular = graphed(lambda: w.run(q, next(ring)), GRAPH_COPIES)
    backend = shared_level_backend(plan, HQ, HKV)
    # --ragged-fa3: fa3 shared levels as the engine's graphs run them where their pages are runs (they are here)
    kernel = "fa3-ragged" if RAGGED_FA3 and backend == "fa3" else backend
    casc = FlashInferCascadeAttention(WS, len(plan.levels), HQ, HKV, D, page, DT, bs, backend="fa2",
                                      use_cuda_graph=True, max_pages=int(table.size) + bs, decode_last_level=True,
                                      shared_backend=kernel, shared_split_kv=False, side_stream=SIDE,
                                      shared_workspace=SIDE_WS)
    casc.plan(plan)
    cascade = graphed(lambda: casc.run(q, next(ring)), GRAPH_COPIES)
    del kc, vc, caches
    return CostSample.of(plan, page, backend, regular, cascade)


def cascade_grid(quick, held_out_seed=None, held_out_count=16, held_out_only=False):
    train, held_out = cascade_shapes(quick, held_out_seed, held_out_count)
    if held_out_only:   # a fresh test of the fitted defaults: only the held-out shapes are measured
        train = []
    print("\n### Cascade vs regular decode, one layer, CUDA graphs, page 16, 256 own tokens a request\n\n"
          "| set | groups x requests | shared | regular ms | cascade ms | speed-up | shared levels on |\n"
          "|---|---|---|---|---|---|---|")
    samples = {"train": [], "held-out": []}
    for name, shapes in (("train", train), ("held-out", held_out)):
        for groups, per, shared in shapes:
            s = cascade_sample(groups, per, shared)
            samples[name].append(((groups, per, shared), s))
            print(f"| {name} | {groups} x {per} | {shared} | {s.regular_ms:.4f} | {s.cascade_ms:.4f} | "
                  f"{s.regular_ms / s.cascade_ms:.2f} | {s.backend} |")
    return samples


def fit(samples, defaults=False):
    """Fit nanovllm/cascade/cost_model.py on the training grid and report (scripts/refit_cost_model.py,
    which refits from a printed table without a GPU); defaults: report cost_model's defaults instead."""
    from nanovllm.cascade.cost_model import CascadeCostModel
    from refit_cost_model import report
    report(samples, CascadeCostModel() if defaults else None)


def cascade_backends(quick):
    """The shared levels on fa2 vs fa3, the per-request level on the decode kernel (CUDA graphs)."""
    page, unique = 16, 256
    print("\n### Cascade shared-level backend (decode step, one layer, CUDA graphs)\n\n"
          "| groups x requests | shared | shared fa2 ms | shared fa3 ms | fa2 no split-kv | fa3 no split-kv | fa2 no split, side stream | fa3 no split, side stream |\n|---|---|---|---|---|---|---|---|")
    side, side_ws = torch.cuda.Stream(), torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    for groups, per, shared in [(64, 16, 2048), (1, 1024, 8192), (8, 128, 4096), (256, 4, 1024), (128, 8, 2048), (16, 64, 2048)]:
        bs = groups * per
        sp, own = shared // page, unique // page
        table = np.zeros((bs, sp + own), np.int32)
        for g in range(groups):
            table[g * per:(g + 1) * per, :sp] = np.arange(g * sp, (g + 1) * sp)
        table[:, sp:] = groups * sp + np.arange(bs * own).reshape(bs, own)
        kc, vc = cache(int(table.max()) + 8, page)
        plan = plan_cascade(table, np.full(bs, shared + unique, np.int32), np.ones(bs, np.int32), page, max_levels=2)
        q = torch.randn(bs, HQ, D, device="cuda", dtype=DT)
        res = []
        ref = None
        for split, stream in ((True, None), (False, None), (False, side)):
            for backend in ("fa2", "fa3"):
                casc = FlashInferCascadeAttention(WS, 2, HQ, HKV, D, page, DT, bs, backend="fa2", use_cuda_graph=True,
                                                  max_pages=int(table.size) + bs, decode_last_level=True,
                                                  shared_backend=backend, shared_split_kv=split, side_stream=stream,
                                                  shared_workspace=side_ws if stream is not None else None)
                casc.plan(plan)
                res.append(graphed(lambda: casc.run(q, (kc, vc))))
                out = casc.run(q, (kc, vc)).clone()
                if ref is None:
                    ref = out
                elif (out.float() - ref.float()).abs().max().item() > 2e-2:
                    print(f"MISMATCH split={split} stream={stream is not None} {backend}")
        print(f"| {groups} x {per} | {shared} | " + " | ".join(f"{r:.3f}" for r in res) + " |")


def kv_layouts(quick):
    """NHD vs HND cache layout and page size, per kernel the engine runs (CUDA graphs, ms; TB/s of
    KV read): regular decode, a cascade step's per-request level (decode kernel, no tensor cores)
    and its shared level (prefill kernel, no split-kv)."""
    rng = np.random.default_rng(0)

    def kv(pages, page, layout):
        shape = (pages, page, HKV, D) if layout == "NHD" else (pages, HKV, page, D)
        return torch.randn(shape, device="cuda", dtype=DT), torch.randn(shape, device="cuda", dtype=DT)

    def decode(lens, page, layout, tc):
        lens = np.asarray(lens, np.int32)
        ind, idx, last = paged(lens, page)
        kc, vc = kv(int(ind[-1]) + 8, page, layout)
        q = torch.randn(len(lens), HQ, D, device="cuda", dtype=DT)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            WS, layout, use_cuda_graph=True, use_tensor_cores=tc, paged_kv_indptr_buffer=ind.cuda(),
            paged_kv_indices_buffer=idx.cuda(), paged_kv_last_page_len_buffer=last.cuda())
        w.plan(ind, idx, last, HQ, HKV, D, page, q_data_type=DT, kv_data_type=DT)
        return graphed(lambda: w.run(q, (kc, vc))), float(lens.sum())

    def shared(groups, rows, length, page, layout, backend):
        ind, idx, last = paged([length] * groups, page)
        kc, vc = kv(int(ind[-1]) + 8, page, layout)
        qo = torch.arange(0, groups * rows + 1, rows, dtype=torch.int32)
        q = torch.randn(groups * rows, HQ, D, device="cuda", dtype=DT)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            WS, layout, use_cuda_graph=True, qo_indptr_buf=qo.cuda(), paged_kv_indptr_buf=ind.cuda(),
            paged_kv_indices_buf=idx.cuda(), paged_kv_last_page_len_buf=last.cuda(), backend=backend)
        w.plan(qo, ind, idx, last, HQ, HKV, D, page, causal=False, disable_split_kv=True, q_data_type=DT, kv_data_type=DT)
        return graphed(lambda: w.run(q, (kc, vc))), float(groups * length)

    cases = [("regular decode tc, 1024 x 2304 (W2 off)", lambda p, l: decode([2304] * 1024, p, l, True)),
             ("regular decode tc, 256 x U(200,1600) (W1)", lambda p, l: decode(rng.integers(200, 1600, 256), p, l, True)),
             ("per-request level, 1024 x 256 (W2 on)", lambda p, l: decode([256] * 1024, p, l, False)),
             ("shared fa2, 64 x 16 rows x 2048 (W2 on)", lambda p, l: shared(64, 16, 2048, p, l, "fa2")),
             ("shared fa3, 1 x 1024 rows x 8192 (W3 on)", lambda p, l: shared(1, 1024, 8192, p, l, "fa3"))]
    pages = (16,) if quick else (16, 32, 64)
    cols = [(p, l) for p in pages for l in ("NHD", "HND")]
    print("\n### KV layout and page size (one layer, CUDA graphs, ms (TB/s))\n\n| kernel | "
          + " | ".join(f"page {p} {l}" for p, l in cols) + " |\n|" + "---|" * (len(cols) + 1))
    for label, fn in cases:
        res = []
        for p, l in cols:
            ms, tokens = fn(p, l)
            res.append(f"{ms:.3f} ({tokens * HKV * D * 2 * DT.itemsize / ms / 1e9:.2f})")
            torch.cuda.empty_cache()
        print(f"| {label} | " + " | ".join(res) + " |")


def triton_shared(quick):
    """A cascade decode step's shared level on the Triton kernel (nanovllm/cascade/shared_kernel.py)
    against FlashInfer's fa2 prefill kernel without split-kv, each merged into an output (CUDA graphs):
    a sweep of tile sizes on W2's shape, then the best configurations on other shapes."""
    from nanovllm.cascade.shared_kernel import choose_splits, merge_partials, shared_level_attention, shared_level_items
    page = 16

    def setup(groups, rows, length):
        torch.manual_seed(0)  # the same inputs for every kernel
        ind, idx, last = paged([length] * groups, page)
        kc, vc = cache(int(ind[-1]) + 8, page)
        qo = torch.arange(0, groups * rows + 1, rows, dtype=torch.int32)
        q = torch.randn(groups * rows, HQ, D, device="cuda", dtype=DT)
        out = torch.randn(groups * rows, HQ, D, device="cuda", dtype=DT)
        lse = torch.randn(groups * rows, HQ, device="cuda", dtype=torch.float32)
        return ind, idx, last, kc, vc, qo, q, out, lse

    def fa2(groups, rows, length, split=False):
        ind, idx, last, kc, vc, qo, q, out, lse = setup(groups, rows, length)
        lo, ll = torch.empty_like(out), torch.empty_like(lse)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            WS, "NHD", use_cuda_graph=True, qo_indptr_buf=qo.cuda(), paged_kv_indptr_buf=ind.cuda(),
            paged_kv_indices_buf=idx.cuda(), paged_kv_last_page_len_buf=last.cuda(), backend="fa2")
        w.plan(qo, ind, idx, last, HQ, HKV, D, page, causal=False, disable_split_kv=not split, q_data_type=DT,
               kv_data_type=DT)

        def fn():
            w.run(q, (kc, vc), out=lo, lse=ll, return_lse=True)
            flashinfer.merge_state_in_place(out, lse, lo, ll)
        fn()
        return graphed(fn), lo.clone(), ll.clone()

    def tri(groups, rows, length, block_tokens, warps, stages, splits, programs=None):
        ind, idx, last, kc, vc, qo, q, out, lse = setup(groups, rows, length)
        items = torch.from_numpy(shared_level_items(qo.numpy(), ind.numpy())).cuda()
        meta = torch.tensor([len(items), splits], dtype=torch.int32, device="cuda")
        programs = programs or len(items) * splits
        po = torch.empty(splits * len(q), HQ, D, device="cuda", dtype=DT)
        pl = torch.empty(splits * len(q), HQ, device="cuda", dtype=torch.float32)
        ind_d, idx_d = ind.cuda(), idx.cuda()

        def fn():
            shared_level_attention(q, kc, vc, items, meta, ind_d, idx_d, po, pl, D ** -0.5, programs, block_tokens,
                                   warps, stages)
            merge_partials(out, lse, po, pl, meta)
        fn()
        # the level's own result: its partials merged into an empty state
        mo, ml = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
        merge_partials(mo, ml, po, pl, meta)
        return graphed(fn), mo, ml

    w2 = (64, 16, 2048)
    gbytes = lambda g, r, l: g * l * HKV * D * 2 * 2 / 1e9
    base, ref_o, ref_l = fa2(*w2)
    print(f"\n### Shared level, Triton kernel sweep on 64 x 16 rows x 2048 (fa2 no split-kv: {base:.3f} ms, "
          f"{gbytes(*w2) / base:.2f} TB/s)\n\n| tokens/tile | warps | stages | splits | ms | TB/s | max diff vs fa2 |\n|---|---|---|---|---|---|---|")
    configs = [(t, w, st, sp) for t in (64, 128) for w in (4, 8) for st in (2, 3) for sp in (1, 2)]
    results = []
    for cfg in configs:
        try:
            ms, o, l = tri(*w2, *cfg)
        except Exception as e:
            print(f"| {' | '.join(map(str, cfg))} | failed: {type(e).__name__} {str(e)[:80]} | | |")
            continue
        diff = (o.float() - ref_o.float()).abs().max().item()
        results.append((ms, cfg))
        print(f"| {' | '.join(map(str, cfg))} | {ms:.3f} | {gbytes(*w2) / ms:.2f} | {diff:.3g} |")
    best = sorted(results)[0][1][:3]
    # As the engine runs it: splits from choose_splits, a fixed grid of 256 programs per kv head.
    print(f"\n| groups x rows x shared | fa2 no split ms | fa2 split-kv ms | triton {best}, engine's splits, 256 programs | splits |\n|---|---|---|---|---|")
    for shape in [(64, 16, 2048), (128, 8, 2048), (256, 4, 1024), (16, 64, 2048), (8, 32, 512), (32, 16, 2048),
                  (4, 64, 4096), (1024, 1, 512), (1, 16, 16384), (2, 8, 8192), (4, 4, 4096)]:
        f, fo, _ = fa2(*shape)
        fs, _, _ = fa2(*shape, split=True)
        groups, rows, length = shape
        sp = choose_splits(-(-rows // 16) * groups, HKV, length, groups * rows, 1 << 20)
        ms, o, _ = tri(*shape, *best, sp, 256)
        print(f"| {' x '.join(map(str, shape))} | {f:.3f} | {fs:.3f} | {ms:.3f} ({(o.float() - fo.float()).abs().max().item():.2g}) | {sp} |")

SECTIONS = {"prefill": prefill_backends, "decode": decode_options, "decode-kernels": decode_kernels,
            "decode-kernels-small": lambda quick: decode_kernels(quick, small=True),
            "levels": cascade_backends, "triton-shared": triton_shared, "layout": kv_layouts,
            "cascade": lambda quick: fit(cascade_grid(quick, HELD_OUT_SEED, HELD_OUT_COUNT, HELD_OUT_ONLY), HELD_OUT_ONLY)}
HELD_OUT_SEED, HELD_OUT_COUNT, HELD_OUT_ONLY = None, 16, False   # --held-out-seed / -count / -only


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=list(SECTIONS))
    p.add_argument("--kv-dtype", choices=["bf16", "fp8"], default="bf16",
                   help="decode-kernels: the KV cache's dtype (fp8: e4m3, the engine's kv_cache_dtype=fp8_e4m3)")
    p.add_argument("--held-out-seed", type=int, default=None,
                   help="cascade: draw the held-out shapes from the whole range with this seed (default: session 8's set)")
    p.add_argument("--held-out-count", type=int, default=16)
    p.add_argument("--graph-copies", type=int, default=8,
                   help="cascade: copies of the layer in one CUDA graph, each timed as its share (grids before "
                        "session 19: 1, each replay's time with its launch latency)")
    p.add_argument("--distinct-caches", action="store_true",
                   help="cascade: each graph copy of the layer reads its own KV cache (up to 16 GB in all)")
    p.add_argument("--ragged-fa3", action="store_true",
                   help="cascade: fa3 shared levels on the engine's ragged graph variant (session 19's grids: paged); "
                        "the samples keep the label fa3, so the fa3 line is then fitted on the ragged kernel, which "
                        "the engine runs wherever a level's pages are runs")
    p.add_argument("--held-out-only", action="store_true",
                   help="cascade: measure only the held-out shapes and report cost_model's defaults on them (no fit)")
    args = p.parse_args()
    global KV_DT, HELD_OUT_SEED, HELD_OUT_COUNT, HELD_OUT_ONLY, GRAPH_COPIES, DISTINCT_CACHES, RAGGED_FA3
    GRAPH_COPIES, DISTINCT_CACHES, RAGGED_FA3 = args.graph_copies, args.distinct_caches, args.ragged_fa3
    HELD_OUT_SEED, HELD_OUT_COUNT, HELD_OUT_ONLY = args.held_out_seed, args.held_out_count, args.held_out_only
    KV_DT = torch.float8_e4m3fn if args.kv_dtype == "fp8" else DT
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            section(args.quick)


if __name__ == "__main__":
    main()
