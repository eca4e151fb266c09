"""GB/s of the host tier's page copies (engine/host_tier.HostTier) on one GPU, against the plain
pinned-memory copy of one contiguous buffer, with the GPU idle and with a matmul loop running on the
compute stream (a forward's stand-in: the tier's gather/scatter kernels share the SMs with it).

Why: on W6 (session 8, H200, qwen3-0.6b and qwen3-1.7b) the engine's own copy timer saw 12.8-24 GB/s
of page copies, where session 5 measured 43 GB/s, and its restore-or-recompute rule
(engine/copy_costs.py) then recomputed every host hit. This separates the copy path's own speed from
its contention with the forward.

    python scripts/bench_host_copies.py                 # qwen3-1.7b page shapes, 512 pages a copy
    python scripts/bench_host_copies.py --layers 36     # qwen3-8b's (8 KV heads, head_dim 128 both)
"""
import argparse
import json

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
    tier = HostTier(kv, args.host_pages)
    page_bytes = kv[:, :, 0].numel() * kv.element_size()
    rng = np.random.default_rng(0)
    n = args.pages
    gpu_pages = rng.choice(args.gpu_pages, n, replace=False)
    host_runs = np.arange(n)                                   # consecutive host pages: one memcpy a chunk
    host_scattered = rng.choice(args.host_pages, n, replace=False)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)

    def busy():   # ~100 ms of matmuls on the compute stream
        for _ in range(64):
            a @ a

    rows = []

    def tier_copy(name, swap_out, swap_in, load, record=True):
        torch.cuda.synchronize()
        if load:
            busy()
        timer = tier.copy(swap_out, swap_in, after_prev=False, wait_for_restores=False)
        torch.cuda.synchronize()
        s = timer.copy_seconds()
        if record:
            rows.append(dict(copy=f"{name}, stream priority {tier.stream.priority}", load=load, pages=n,
                             seconds=s, gb_s=n * page_bytes / s / 1e9))

    for load, priority in ((False, -1), (True, 0), (True, -1)):
        tier.stream = torch.cuda.Stream(device=dev, priority=priority)   # HostTier's own: -1 (high)
        for host, label in ((host_runs, "consecutive"), (host_scattered, "scattered")):
            out = np.stack([gpu_pages, host], axis=1)
            back = np.stack([host, gpu_pages], axis=1)
            tier_copy("warm-up", out, None, load, record=False)
            tier_copy("warm-up", None, back, load, record=False)
            tier_copy(f"swap_out, host pages {label}", out, None, load)
            tier_copy(f"swap_in, host pages {label}", None, back, load)
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
            rows.append(dict(copy=name, load=load, pages=n, seconds=sec, gb_s=n * page_bytes / sec / 1e9))
    print(f"\npage {page_bytes / 1e6:.2f} MB ({args.layers} layers x 2 x {args.page_size} x {args.kv_heads} x "
          f"{args.head_dim} bf16), {n} pages a copy, {torch.cuda.get_device_name()}\n")
    print("| copy | compute stream busy | ms | GB/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['copy']} | {'yes' if r['load'] else 'no'} | {1e3 * r['seconds']:.2f} | {r['gb_s']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
