"""Decode-sized bf16 GEMMs: cuBLAS (F.linear) against layers/dense_skinny.py, on the GPU.

    python scripts/bench_dense_gemm.py [--preset qwen3-0.6b] [--ms 1 8 32 64 128 256] [--quick]

Each timing is one CUDA graph of `layers` GEMMs of one shape over as many distinct weights (the model's
layer count: weights come from HBM, not L2, as in a decode step), replayed 20 times; the median
replay over the layers is one GEMM's microseconds. For each (M, shape) it searches DenseConfig's space,
prints the table (cuBLAS us, best dense_skinny us, speed-up, TB/s of weight read) and the TABLE entries
for layers/dense_skinny.py. Last: a whole step's GEMMs (every layer's four shapes) on each, summed.
"""
import argparse
import itertools
import statistics

import torch
import torch.nn.functional as F

from nanovllm.layers.dense_skinny import DenseConfig, dense_skinny, m_bucket

PRESETS = {  # (hidden, q heads, kv heads, head dim, intermediate, layers)
    "qwen3-0.6b": (1024, 16, 8, 128, 3072, 28),
    "qwen3-1.7b": (2048, 16, 8, 128, 6144, 28),
    "qwen3-8b": (4096, 32, 8, 128, 12288, 36),
}


def shapes(preset: str, tp: int) -> dict[str, tuple[int, int]]:
    h, hq, hkv, d, inter, _ = PRESETS[preset]
    return {"qkv": ((hq // tp + 2 * max(1, hkv // tp)) * d, h),
            "o": (h, hq // tp * d), "gate_up": (2 * inter // tp, h), "down": (h, inter // tp)}


def graph_time(fn, reps=20) -> float:
    """Median ms of one replay of a graph of fn()."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def configs(M: int, K: int, quick: bool):
    bm = min(64, max(16, m_bucket(M)))
    for bn, bk, splits, warps, stages in itertools.product(
            (32, 64, 128) if not quick else (64,), (64, 128, 256), (1, 2, 4, 8), (4,),
            (3, 4) if not quick else (3,)):
        if K % splits or (K // splits) % bk:
            continue
        yield DenseConfig(bm, bn, bk, splits, warps, stages)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3-0.6b", choices=list(PRESETS))
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    layers = PRESETS[args.preset][5]
    dt = torch.bfloat16
    found = {}
    print(f"\n### Decode GEMMs, {args.preset} TP={args.tp}, {torch.cuda.get_device_name()} (us per GEMM, L2-cold)\n")
    print("| layer (N x K) | M | cuBLAS | dense_skinny | x cuBLAS | TB/s cuBLAS / ours | config |\n|---|---|---|---|---|---|---|")
    weights = {name: [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(layers)]
               for name, (n, k) in shapes(args.preset, args.tp).items()}
    for M in args.ms:
        for name, (n, k) in shapes(args.preset, args.tp).items():
            ws = weights[name]
            x = torch.randn(M, k, device="cuda", dtype=dt)
            ref = F.linear(x, ws[0])
            t_cublas = graph_time(lambda: [F.linear(x, w) for w in ws]) / layers
            best = (float("inf"), None)
            for c in configs(M, k, args.quick):
                try:
                    y = dense_skinny(x, ws[0], c)
                    err = (y.float() - ref.float()).abs().max().item()
                    if err > 0.05 * ref.float().abs().max().item() + 1e-3:
                        print(f"  wrong result {c}: {err}")
                        continue
                    t = graph_time(lambda: [dense_skinny(x, w, c) for w in ws]) / layers
                except Exception as e:  # out of shared memory and the like: skip the config
                    print(f"  {c}: {type(e).__name__} {str(e)[:100]}")
                    continue
                best = min(best, (t, c), key=lambda tc: tc[0])
            t, c = best
            gb = n * k * 2 / 1e9
            found[(m_bucket(M), n, k)] = c
            print(f"| {name} ({n} x {k}) | {M} | {t_cublas * 1000:.1f} | {t * 1000:.1f} | {t_cublas / t:.2f} | "
                  f"{gb / t_cublas:.2f} / {gb / t:.2f} | {c} |", flush=True)
    print("\nTABLE = {")
    for key, c in found.items():
        print(f"    {key}: DenseConfig({c.block_m}, {c.block_n}, {c.block_k}, {c.splits}, {c.warps}, {c.stages}),")
    print("}")
    # A whole step's GEMMs: every layer's four shapes, cuBLAS vs the best config (or cuBLAS where it wins).
    print("\n| M | step GEMMs cuBLAS ms | dense_skinny ms |\n|---|---|---|")
    for M in args.ms:
        xs = {name: torch.randn(M, k, device="cuda", dtype=dt) for name, (n, k) in shapes(args.preset, args.tp).items()}
        def step(use):
            for i in range(layers):
                for name, (n, k) in shapes(args.preset, args.tp).items():
                    if use(name):
                        dense_skinny(xs[name], weights[name][i], found[(m_bucket(M), n, k)])
                    else:
                        F.linear(xs[name], weights[name][i])
        tc = graph_time(lambda: step(lambda name: False))
        td = graph_time(lambda: step(lambda name: True))
        print(f"| {M} | {tc:.3f} | {td:.3f} |", flush=True)


if __name__ == "__main__":
    main()
