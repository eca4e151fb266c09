"""Tile sweep of the Triton paged decode kernel (attention/triton_decode.py) against FlashInfer's decode
wrapper (tensor cores), on the GPU: one layer, 16 q / 8 kv heads, d 128, page 16, scattered pages, CUDA
graphs, median of 30 replays; fp8 and bf16 caches at W1-like and W2-last-level shapes.

    python scripts/sweep_triton_decode.py [--quick]
    python scripts/sweep_triton_decode.py --splits   # bf16 cache, 16-256 rows: split targets x tiles

Prints per shape FlashInfer's time and the four fastest (BLOCK_T, warps, stages) with their TB/s of KV
read and max abs difference to FlashInfer (claude_docs/performance.md, "Session 12"); fp8 caches try both
conversions (`convert`: Triton's cast, or integer ops on int16 pairs)."""
import argparse
import itertools
import statistics

import flashinfer
import numpy as np
import torch

from nanovllm.attention.triton_decode import TritonPagedDecode

HQ, HKV, D, P = 16, 8, 128, 16


def timed(fn, reps=30):
    """Median ms of a CUDA-graph replay of fn()."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fp8 only, 64/128-token tiles, 4/8 warps, 2/3 stages")
    ap.add_argument("--splits", action="store_true", help="bf16 cache at 16-256 rows: TARGET_PROGRAMS x tiles")
    args = ap.parse_args()
    if args.splits:
        return sweep_splits()
    grid = ((64, 128), (4, 8), (2, 3)) if args.quick else ((32, 64, 128), (2, 4, 8), (2, 3, 4))
    rng = np.random.default_rng(0)
    shapes = (("256x600", np.full(256, 600)), ("1024x256", np.full(1024, 256)),
              ("256xU(200,1600)", rng.integers(200, 1600, 256)), ("32xU(100,1500)", rng.integers(100, 1500, 32)))
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    for kvdt in (torch.float8_e4m3fn,) if args.quick else (torch.float8_e4m3fn, torch.bfloat16):
        for label, lens in shapes:
            n = (lens + P - 1) // P
            pages = int(n.sum())
            ind = torch.from_numpy(np.concatenate([[0], np.cumsum(n)]).astype(np.int32))
            idx = torch.randperm(pages + 8).int()[:pages].contiguous()   # scattered pages
            last = torch.from_numpy((lens - (n - 1) * P).astype(np.int32))
            kc = torch.randn(pages + 8, P, HKV, D, device="cuda").to(kvdt)
            vc = torch.randn(pages + 8, P, HKV, D, device="cuda").to(kvdt)
            q = torch.randn(len(lens), HQ, D, device="cuda", dtype=torch.bfloat16)
            gb = float(lens.sum()) * HKV * D * 2 * kvdt.itemsize / 1e9
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
            w.plan(ind, idx, last, HQ, HKV, D, P, q_data_type=torch.bfloat16, kv_data_type=kvdt)
            ref = w.run(q, (kc, vc))
            t_fi = timed(lambda: w.run(q, (kc, vc)))
            res = []
            converts = ("cast", "bits") if kvdt == torch.float8_e4m3fn else ("cast",)
            for bt, warps, stages, convert in itertools.product(*grid, converts):
                td = TritonPagedDecode(HQ, HKV, D, P, torch.device("cuda"), buffers=(ind.cuda(), idx.cuda(), last.cuda()),
                                       block_t=bt, warps=warps, stages=stages, convert=convert)
                td.plan(ind, idx, last)
                try:
                    err = (td.run(q, (kc, vc)).float() - ref.float()).abs().max().item()
                    t = timed(lambda: td.run(q, (kc, vc)))
                except Exception as e:  # a config that does not fit: report and go on
                    print("fail", bt, warps, stages, convert, type(e).__name__)
                    continue
                res.append((t, bt, warps, stages, convert, err))
            res.sort()
            print(f"{str(kvdt)[6:]} {label}: flashinfer tc {t_fi * 1000:.1f} us ({gb / t_fi:.2f} TB/s); triton best: " +
                  "; ".join(f"{t * 1000:.1f} us ({gb / t:.2f}) bt{bt} w{w_} s{st} {cv} err {e:.1e}"
                            for t, bt, w_, st, cv, e in res[:4]),
                  flush=True)


def sweep_splits():
    """How many programs (and so splits of each request's tokens) a bf16 cache wants at 16-256 rows."""
    import nanovllm.attention.triton_decode as td_mod
    rng = np.random.default_rng(0)
    shapes = [(f"{b}x600", np.full(b, 600)) for b in (16, 32, 64, 128)] + \
             [(f"{b}xU(200,1600)", rng.integers(200, 1600, b)) for b in (32, 64, 128, 256)]
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    targets, tiles = (264, 528, 1056, 2112), ((128, 4, 3), (64, 4, 3), (64, 4, 2), (32, 4, 3))
    default_target = td_mod.TARGET_PROGRAMS
    print("| rows x context | FlashInfer tc | " + " | ".join(f"target {t}" for t in targets) + " |")
    print("|---" * (len(targets) + 2) + "|")
    for label, lens in shapes:
        n = (lens + P - 1) // P
        pages = int(n.sum())
        ind = torch.from_numpy(np.concatenate([[0], np.cumsum(n)]).astype(np.int32))
        idx = torch.randperm(pages + 8).int()[:pages].contiguous()
        last = torch.from_numpy((lens - (n - 1) * P).astype(np.int32))
        kc = torch.randn(pages + 8, P, HKV, D, device="cuda").bfloat16()
        vc = torch.randn(pages + 8, P, HKV, D, device="cuda").bfloat16()
        q = torch.randn(len(lens), HQ, D, device="cuda", dtype=torch.bfloat16)
        gb = float(lens.sum()) * HKV * D * 2 * 2 / 1e9
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
        w.plan(ind, idx, last, HQ, HKV, D, P, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
               disable_split_kv=len(lens) >= 64)   # as the engine plans it
        ref = w.run(q, (kc, vc))
        t_fi = timed(lambda: w.run(q, (kc, vc)))
        cells = []
        for target in targets:
            td_mod.TARGET_PROGRAMS = target
            best = None
            for bt, warps, stages in tiles:
                td = TritonPagedDecode(HQ, HKV, D, P, torch.device("cuda"), buffers=(ind.cuda(), idx.cuda(), last.cuda()),
                                       block_t=bt, warps=warps, stages=stages)
                td.plan(ind, idx, last)
                err = (td.run(q, (kc, vc)).float() - ref.float()).abs().max().item()
                assert err < 0.05, (label, target, bt, err)
                t = timed(lambda: td.run(q, (kc, vc)))
                best = min(best or (t, bt, warps, stages), (t, bt, warps, stages))
            t, bt, warps, stages = best
            splits = td_mod.choose_splits(len(lens), HKV)
            cells.append(f"{t * 1000:.1f} ({gb / t:.2f}) x{splits} {bt}/{warps}/{stages}")
        print(f"| {label} | {t_fi * 1000:.1f} ({gb / t_fi:.2f}) | " + " | ".join(cells) + " |", flush=True)
    td_mod.TARGET_PROGRAMS = default_target


if __name__ == "__main__":
    main()
