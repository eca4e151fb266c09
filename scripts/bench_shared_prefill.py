"""The shared level of a cascade prefill step on the GPU: many question tokens over one long prefix a group.

    python scripts/bench_shared_prefill.py [--decode]

Prefill steps of W2, W3 and W5 put hundreds to thousands of question tokens of a group over its 2k-16k
prefix tokens: the shared level is a non-causal prefill of (group rows x prefix) and it is compute-bound.
This times, one layer (Qwen3-0.6B heads, bf16, page 16, eager, median of bench_kernels.timed's runs):
  paged-fa3 / paged-fa2: FlashInfer's paged prefill over the group's pages (what the engine runs today);
  ragged-fa3: FlashInfer's ragged prefill over the same KV, read in place as one run of tokens a group (the
      layout the engine builds, cascade/ragged_level.py: the cache viewed as [pages x page, kv heads, dim],
      a query-less request before each group; session 18's table, claude_docs/performance.md, was measured
      with the same runs without the query-less requests, which the engine's W3 profile then matched);
  regular: the whole step without cascade (each request's paged causal prefill over prefix + own tokens);
and prints ms and TFLOP/s (4 x rows x prefix x heads x dim FLOPs).
"""
import os
import sys

import flashinfer
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DT, HKV, HQ, WS, D, graphed, timed  # noqa: E402

from nanovllm.cascade.ragged_level import ragged_layout  # noqa: E402

PAGE = 16


def level_arrays(groups, rows, pre_pages):
    """(qo_indptr, kv_indptr, kv_indices, last_page_len) of a shared level: groups of `rows` query rows, each over
    its own run of pre_pages full pages, the runs one after another from page 0."""
    return (torch.arange(0, groups * rows + 1, rows, dtype=torch.int32),
            torch.arange(0, groups * pre_pages + 1, pre_pages, dtype=torch.int32),
            torch.arange(groups * pre_pages, dtype=torch.int32), torch.full((groups,), PAGE, dtype=torch.int32))


def shape(groups, rows, prefix, own=128):
    """groups x (rows question tokens, of rows / own requests) over prefix tokens a group."""
    pre_pages = prefix // PAGE
    reqs = rows // own
    own_pages = -(-own // PAGE)
    total_pages = groups * pre_pages + groups * reqs * own_pages + 8
    kc = torch.randn(total_pages, PAGE, HKV, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    q = torch.randn(groups * rows, HQ, D, device="cuda", dtype=DT)
    flops = 4.0 * groups * rows * prefix * HQ * D
    res = {}
    # Shared level, paged.
    qo, kv_ind, idx, last = level_arrays(groups, rows, pre_pages)
    for be in ("fa3", "fa2"):
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(WS, "NHD", backend=be)
        w.plan(qo, kv_ind, idx, last, HQ, HKV, D, PAGE, causal=False, q_data_type=DT, kv_data_type=DT)
        res[f"paged-{be}"] = timed(lambda: w.run(q, (kc, vc), return_lse=True))
        out_ref = w.run(q, (kc, vc))
    # Shared level, ragged over the flat cache: the layout the engine builds (ragged_level.ragged_layout).
    rq, rk = ragged_layout(qo, kv_ind, idx, last, PAGE)
    flat_k, flat_v = kc.view(-1, HKV, D), vc.view(-1, HKV, D)
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(WS, "NHD", backend="fa3")
    w.plan(rq, rk, HQ, HKV, D, causal=False, q_data_type=DT, kv_data_type=DT)
    res["ragged-fa3"] = timed(lambda: w.run(q, flat_k, flat_v, return_lse=True))
    diff = (w.run(q, flat_k, flat_v).float() - out_ref.float()).abs().max().item()
    # The whole step without cascade: each request over its prefix + own pages, causal.
    n = groups * reqs
    table = []
    for g in range(groups):
        for r in range(reqs):
            start = groups * pre_pages + (g * reqs + r) * own_pages
            table.append(list(range(g * pre_pages, (g + 1) * pre_pages)) + list(range(start, start + own_pages)))
    t = torch.tensor(table, dtype=torch.int32)
    ind = torch.arange(0, n * t.shape[1] + 1, t.shape[1], dtype=torch.int32)
    qo_r = torch.arange(0, n * own + 1, own, dtype=torch.int32)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(WS, "NHD", backend="fa3")
    w.plan(qo_r, ind, t.reshape(-1), torch.full((n,), own - (own_pages - 1) * PAGE, dtype=torch.int32), HQ, HKV, D,
           PAGE, causal=True, q_data_type=DT, kv_data_type=DT)
    res["regular (paged-fa3, whole step)"] = timed(lambda: w.run(q, (kc, vc)))
    # The own level: each request's causal prefill over its own pages.
    own_t = t[:, pre_pages:].contiguous()
    ind_o = torch.arange(0, n * own_pages + 1, own_pages, dtype=torch.int32)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(WS, "NHD", backend="fa3")
    w.plan(qo_r, ind_o, own_t.reshape(-1), torch.full((n,), own - (own_pages - 1) * PAGE, dtype=torch.int32), HQ, HKV,
           D, PAGE, causal=True, q_data_type=DT, kv_data_type=DT)
    res["own level (paged-fa3)"] = timed(lambda: w.run(q, (kc, vc), return_lse=True))
    del kc, vc
    return flops, res, diff


def decode_level(groups, rows, prefix, copies=8):
    """A decode step's shared level (rows one-token queries a group over its prefix) replayed from a CUDA graph
    of `copies` layers: paged fa3 (the engine's graphs today) against ragged fa3 over the same runs. -> ms."""
    pre_pages = prefix // PAGE
    kc = torch.randn(groups * pre_pages + 8, PAGE, HKV, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    q = torch.randn(groups * rows, HQ, D, device="cuda", dtype=DT)
    qo, kv_ind, idx, last = level_arrays(groups, rows, pre_pages)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(WS, "NHD", backend="fa3")
    w.plan(qo, kv_ind, idx, last, HQ, HKV, D, PAGE, causal=False, q_data_type=DT, kv_data_type=DT)
    paged = graphed(lambda: w.run(q, (kc, vc), return_lse=True), copies)
    out_ref = w.run(q, (kc, vc))
    rq, rk = ragged_layout(qo, kv_ind, idx, last, PAGE)
    flat_k, flat_v = kc.view(-1, HKV, D), vc.view(-1, HKV, D)
    r = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(WS, "NHD", backend="fa3")
    r.plan(rq, rk, HQ, HKV, D, causal=False, q_data_type=DT, kv_data_type=DT)
    ragged = graphed(lambda: r.run(q, flat_k, flat_v, return_lse=True), copies)
    diff = (r.run(q, flat_k, flat_v).float() - out_ref.float()).abs().max().item()
    flops = 4.0 * groups * rows * prefix * HQ * D
    return paged, ragged, diff, flops


def main():
    if "--decode" in sys.argv:
        print("| decode shared level: groups x rows over prefix | paged fa3 ms (TFLOP/s) | ragged fa3 ms (TFLOP/s) | "
              "max diff |\n|---|---|---|---|")
        for groups, rows, prefix in ((1, 1024, 8192), (1, 512, 8192), (16, 64, 2048), (8, 128, 4096), (4, 256, 2048),
                                     (2, 512, 16384), (64, 16, 2048), (4, 32, 16384)):
            paged, ragged, diff, flops = decode_level(groups, rows, prefix)
            print(f"| {groups} x {rows} over {prefix} | {paged:.4f} ({flops / paged / 1e9:.0f}) | "
                  f"{ragged:.4f} ({flops / ragged / 1e9:.0f}) | {diff:.1e} |", flush=True)
        return
    print("| shape (groups x question tokens over prefix) | kernel | ms | TFLOP/s (shared FLOPs) |\n|---|---|---|---|")
    for groups, rows, prefix in ((1, 16384, 8192), (64, 256, 2048), (4, 2048, 16384), (128, 128, 2048),
                                 (16, 1024, 4096)):
        flops, res, diff = shape(groups, rows, prefix, own=64 if prefix == 16384 else 128)
        for k, ms in res.items():
            print(f"| {groups} x {rows} over {prefix} | {k} | {ms:.3f} | {flops / ms / 1e9:.0f} |")
        print(f"| {groups} x {rows} over {prefix} | ragged vs paged max diff | {diff:.2e} | |")


if __name__ == "__main__":
    main()
