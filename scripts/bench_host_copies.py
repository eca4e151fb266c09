"""GB/s of the host tier's page copies (engine/host_tier.HostTier) on one GPU, in each copy mode
("dma": one cudaMemcpy2DAsync a page, no kernel; "staged": gather/scatter kernels + memcpy), against
the plain pinned-memory copy of one contiguous buffer, with the GPU idle and with a matmul loop
running on the compute stream (a forward's stand-in: staged copies' kernels share the SMs with it).
Also the host time to queue a copy, a page.

Why: on W6 (session 8, H200, qwen3-0.6b and qwen3-1.7b) the engine's own copy timer saw 12.8-24 GB/s
of page copies, where session 5 measured 43 GB/s, and its restore-or-recompute rule
(engine/copy_costs.py) then recomputed every host hit. This separates the copy path's own speed from
its contention with the forward. Measured then (H200, qwen3-1.7b pages of 1.84 MB, 512 pages a
copy, staged): 42-47 GB/s idle, 11.8-12.2 GB/s beside the loop (the copy stream at high priority:
no better), one contiguous buffer 55.0 GB/s beside the loop. Hence the dma mode.

    python scripts/bench_host_copies.py                 # qwen3-1.7b page shapes, 512 pages a copy
    python scripts/bench_host_copies.py --layers 36     # qwen3-8b's (8 KV heads, head_dim 128 both)
"""
import argparse
import json
from time import perf_counter

import numpy as np
import torch

from nanovllm.engine.host_tier import HostTier, pinned_empty


def timed(fn, stream=None) -> float:
    """Seconds of fn's work on `stream` (default: the current one), by CUDA events."""
    stream = stream or torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--gpu-pages", type=int, default=8192)
    ap.add_argument("--host-pages", type=int, default=2048)
    ap.add_argument("--pages", type=int, default=512, help="pages a copy")
    args = ap.parse_args()
    dev = torch.device("cuda")
    kv = torch.randn(2, args.layers, args.gpu_pages, args.page_size, args.kv_heads, args.head_dim,
                     dtype=torch.bfloat16, device=dev)
    # two copy streams: the both-ways rows put write-backs and restores on a stream each (one-way rows: the same)
    tiers = {mode: HostTier(kv, args.host_pages, copy_mode=mode, copy_streams=2) for mode in ("dma", "staged")}
    page_bytes = kv[:, :, 0].numel() * kv.element_size()
    rng = np.random.default_rng(0)
    n = args.pages
    gpu_pages = rng.choice(args.gpu_pages, n, replace=False)
    host_runs = np.arange(n)                                   # consecutive host pages
    host_scattered = rng.choice(args.host_pages, n, replace=False)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)

    def busy():   # ~100 ms of matmuls on the compute stream
        for _ in range(64):
            a @ a

    rows = []

    def tier_copy(mode, name, swap_out, swap_in, load, record=True):
        tier = tiers[mode]
        torch.cuda.synchronize()
        if load:
            busy()
        queued = perf_counter()
        timer = tier.copy(swap_out, swap_in, after_prev=False, wait_for_restores=False)
        host_s = perf_counter() - queued
        torch.cuda.synchronize()
        s = timer.copy_seconds()
        if record:
            rows.append(dict(copy=f"{mode}: {name}", load=load, pages=n, seconds=s, gb_s=n * page_bytes / s / 1e9,
                             host_us_a_page=1e6 * host_s / n))

    for load in (False, True):
        for mode in tiers:
            for host, label in ((host_runs, "consecutive"), (host_scattered, "scattered")):
                out = np.stack([gpu_pages, host], axis=1)
                back = np.stack([host, gpu_pages], axis=1)
                tier_copy(mode, "warm-up", out, None, load, record=False)
                tier_copy(mode, "warm-up", None, back, load, record=False)
                tier_copy(mode, f"swap_out, host pages {label}", out, None, load)
                tier_copy(mode, f"swap_in, host pages {label}", None, back, load)
    # dma results must equal the pages: the last swap_in put back what swap_out took (same pairs)
    check = tiers["dma"].pool[torch.from_numpy(host_scattered[:8])]
    assert torch.equal(check, kv[:, :, torch.from_numpy(gpu_pages[:8]).to(dev)].movedim(2, 0).cpu())
    # Both directions at once (write-backs on the out stream, restores of other pages on the in stream,
    # no dependency between them), as W6's steps queue them: GB/s of all bytes moved over the span.
    both = rng.choice(args.gpu_pages, 2 * n, replace=False)
    out_pairs = np.stack([both[:n], host_runs], axis=1)
    in_pairs = np.stack([host_runs + n, both[n:]], axis=1)
    for load in (False, True):
        for mode in tiers:
            for record in (False, True):
                torch.cuda.synchronize()
                if load:
                    busy()
                timer = tiers[mode].copy(out_pairs, in_pairs, after_prev=False, wait_for_restores=False)
                torch.cuda.synchronize()
                first = timer.out_start if timer.out_start.elapsed_time(timer.restore_start) >= 0 else timer.restore_start
                span = max(first.elapsed_time(timer.out_end), first.elapsed_time(timer.restore_end)) / 1000
                if record:
                    rows.append(dict(copy=f"{mode}: both ways at once ({n} pages each; restores alone "
                                          f"{n * page_bytes / timer.restore_seconds() / 1e9:.1f} GB/s)", load=load,
                                     pages=2 * n, seconds=span, gb_s=2 * n * page_bytes / span / 1e9, host_us_a_page=None))
    # The bound: one contiguous buffer of the same bytes, each way, on a side stream.
    side = torch.cuda.Stream()
    src = torch.empty(n * page_bytes // 2, dtype=torch.bfloat16, device=dev)
    dst = pinned_empty((src.numel(),), torch.bfloat16)
    for load in (False, True):
        for name, (d, s) in (("one buffer GPU -> host", (dst, src)), ("one buffer host -> GPU", (src, dst))):
            torch.cuda.synchronize()
            if load:
                busy()
            with torch.cuda.stream(side):
                sec = timed(lambda: d.copy_(s, non_blocking=True), side)
            rows.append(dict(copy=name, load=load, pages=n, seconds=sec, gb_s=n * page_bytes / sec / 1e9,
                             host_us_a_page=None))
    print(f"\npage {page_bytes / 1e6:.2f} MB ({args.layers} layers x 2 x {args.page_size} x {args.kv_heads} x "
          f"{args.head_dim} bf16), {n} pages a copy, {torch.cuda.get_device_name()}, "
          f"libcudart {tiers['dma'].memcpy2d.path}\n")
    print("| copy | compute stream busy | ms | GB/s | host us a page to queue |\n|---|---|---|---|---|")
    for r in rows:
        host = "" if r["host_us_a_page"] is None else f"{r['host_us_a_page']:.2f}"
        print(f"| {r['copy']} | {'yes' if r['load'] else 'no'} | {1e3 * r['seconds']:.2f} | {r['gb_s']:.1f} | {host} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
