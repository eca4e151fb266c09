"""Sweep the skinny-M AWQ kernel's configs (layers/awq_skinny.py) on one GPU, Qwen3-8B shapes, random weights.

    python scripts/sweep_awq_gemm.py [--group-size 128] [--ms 1 2 4 8 16 32 64] [--shapes qkv o gate_up down]
                                     [--json out.json]

For each layer (qkv 4096->6144, o 4096->4096, gate_up 4096->24576, down 12288->4096) and M rows it
times bf16 cuBLAS (F.linear on the dequantized weights), the tiled W4A16 kernel (awq_gemm), the skinny
kernel with its unmeasured default (heuristic_config) and every candidate config (M <= 32), each
replayed from a CUDA graph of calls that cycle through enough copies of the weights (>= 256 MB) that
L2 (50 MB) holds none of them between uses, as in a decode step whose layers each read their own
weights. Median of 20 replays. Candidates, in two rounds: (1) block_n (64/128/256) x block_k
(32/64/128) x splits at 4 warps, 3 stages, packed words (splits kept where the grid has 1/2..16
programs per SM); (2) around the best of (1): warps 4/8, stages 2/3/4, packed or gathered words.
M = 1 also tries the tl.dot path; configs that do not fit the SM (shared memory, registers) are
skipped and counted.

Prints, per (layer, M): microseconds and GB/s (weights + scales + zeros + x + y over the time) of each,
the best config, its speed-up over bf16, and the max abs error of the best config and of bf16 cuBLAS
against the float32 matmul of the same dequantized weights (plus the max abs difference between them);
then the TABLE lines for layers/awq_skinny.py (paste them into TABLE)."""
import argparse
import itertools
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from nanovllm.layers.awq_format import dequantize
from nanovllm.layers.awq_gemm import awq_gemm
from nanovllm.layers.awq_skinny import MAX_M, SkinnyConfig, heuristic_config, m_bucket, skinny_gemm

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}  # K, N
FLUSH_BYTES = 256 * 2**20
DEVICE, DTYPE = "cuda", torch.bfloat16   # tests/test_awq.py runs the sweep on the CPU (interpreted, float16)


def graph_us(make_call, copies: int, reps: int = 20) -> float:
    """Median us of one call; make_call(i) -> a function using weight copy i. A CUDA graph of
    >= 12 calls cycling the copies, timed with CUDA events."""
    calls = [make_call(i % copies) for i in range(copies * math.ceil(12 / copies))]
    for c in calls[:copies]:
        c()   # compile, allocate the split-K counters: outside capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls[0]()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del graph
    return float(np.median(times))


def candidates_round1(N: int, K: int, sms: int, fma: bool):
    for bn, bk in itertools.product((64, 128, 256), (32, 64, 128)):
        if fma and bn * bk > 16384:   # the FMA accumulator is BLOCK_K x BLOCK_N float32 registers
            continue
        for splits in (1, 2, 4, 8, 16, 32):
            programs = math.ceil(N / bn) * splits
            if splits * bk <= K and sms // 2 <= programs <= 16 * sms:
                yield SkinnyConfig(bn, bk, splits, fma=fma)


def candidates_round2(best: SkinnyConfig):
    for warps, stages, gather in itertools.product((4, 8), (2, 3, 4), (False, True)):
        yield SkinnyConfig(best.block_n, best.block_k, best.splits, warps, stages, gather, best.fma)


def sweep_shape(name: str, K: int, N: int, group: int, ms: list[int], sms: int, gen: torch.Generator):
    def words(rows):   # random nibbles
        return torch.randint(-2**31, 2**31 - 1, (rows, N // 8), device=DEVICE, dtype=torch.int32, generator=gen)
    awq_bytes = K * N // 2 + (K // group) * N // 2 + (K // group) * N * 2
    copies_awq = max(1, math.ceil(FLUSH_BYTES / awq_bytes))
    copies_bf16 = max(1, math.ceil(FLUSH_BYTES / (K * N * 2)))
    qws = [words(K) for _ in range(copies_awq)]
    qzs = [words(K // group) for _ in range(copies_awq)]
    ss = [(torch.rand(K // group, N, device=DEVICE, generator=gen) * 0.002 + 0.0005).half() for _ in range(copies_awq)]
    w32 = dequantize(qws[0], qzs[0], ss[0], group)                                       # [K, N] float32
    w_bf16 = [w32.t().contiguous().to(DTYPE) for _ in range(copies_bf16)]   # nn.Linear layout [N, K]
    rows = []
    for M in ms:
        x = torch.randn(M, K, device=DEVICE, generator=gen).to(DTYPE)
        io = M * K * 2 + M * N * 2
        gbs = lambda us, weight_bytes: (weight_bytes + io) / us / 1e3   # noqa: E731
        ref = x.float() @ w32
        y_bf16 = F.linear(x, w_bf16[0])
        row = dict(layer=name, K=K, N=N, M=M, group=group)
        row["bf16_us"] = graph_us(lambda i: lambda: F.linear(x, w_bf16[i]), copies_bf16)
        row["bf16_GBs"] = gbs(row["bf16_us"], K * N * 2)
        row["bf16_err"] = (y_bf16.float() - ref).abs().max().item()
        row["tile_us"] = graph_us(lambda i: lambda: awq_gemm(x, qws[i], qzs[i], ss[i], group), copies_awq)
        row["tile_GBs"] = gbs(row["tile_us"], awq_bytes)
        if M <= MAX_M:
            def time_config(config):
                try:
                    return graph_us(lambda i: lambda: skinny_gemm(x, qws[i], qzs[i], ss[i], group, config),
                                    copies_awq)
                except Exception as e:  # noqa: BLE001 (out of shared memory / registers: not a candidate)
                    row["skipped"] = row.get("skipped", 0) + 1
                    row["last_skip"] = f"{type(e).__name__}: {str(e)[:120]}"
                    return float("inf")
            default = heuristic_config(M, N, K, sms)
            row["default"] = repr(default)
            row["default_us"] = time_config(default)
            results = []
            for fma in ([True, False] if M == 1 else [False]):
                r1 = [(time_config(c), c) for c in candidates_round1(N, K, sms, fma)]
                best1 = min(r1, key=lambda t: t[0])[1]
                results += r1 + [(time_config(c), c) for c in candidates_round2(best1)]
            t, best = min(results, key=lambda r: r[0])
            y = skinny_gemm(x, qws[0], qzs[0], ss[0], group, best)
            row.update(best=repr(best), best_fma=best.fma, best_us=t, best_GBs=gbs(t, awq_bytes), tried=len(results),
                       best_err=(y.float() - ref).abs().max().item(),
                       best_vs_bf16=(y.float() - y_bf16.float()).abs().max().item(),
                       speedup=row["bf16_us"] / t, table_line=f"({m_bucket(M)}, {N}, {K}): {best!r},")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--json", help="write every row here too")
    args = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.shapes:
        K, N = SHAPES[name]
        rows += sweep_shape(name, K, N, args.group_size, args.ms, sms, gen)
        torch.cuda.empty_cache()
    print(f"\n### W4A16 skinny kernel sweep, group {args.group_size} ({torch.cuda.get_device_name(0)}, {sms} SMs)\n")
    print("| layer (K x N) | M | bf16 us (GB/s) | tiled us (GB/s) | skinny default us | skinny best us (GB/s) | "
          "best x bf16 | best err | bf16 err | best - bf16 | best config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['layer']} {r['K']} x {r['N']} | {r['M']} | {r['bf16_us']:.1f} ({r['bf16_GBs']:.0f}) | " \
               f"{r['tile_us']:.1f} ({r['tile_GBs']:.0f}) | "
        if "best" in r:
            print(head + f"{r['default_us']:.1f} | {r['best_us']:.1f} ({r['best_GBs']:.0f}) | {r['speedup']:.2f} | "
                  f"{r['best_err']:.1e} | {r['bf16_err']:.1e} | {r['best_vs_bf16']:.1e} | "
                  f"{r['best']} |")
        else:
            print(head + f"- | - | - | - | {r['bf16_err']:.1e} | - | - |")
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        print(f"\n{sum(r['skipped'] for r in skipped)} configs did not launch, e.g. {skipped[0]['last_skip']}")
    fma_rows = [r for r in rows if "best" in r and r["M"] == 1 and not r["best_fma"]]
    print("\n# layers/awq_skinny.py TABLE (M bucket, N, K) -> config" +
          (f"; at M = 1 tl.dot beat FMA for {[r['layer'] for r in fma_rows]}" if fma_rows else ""))
    for r in rows:
        if "best" in r and r["M"] == m_bucket(r["M"]):
            print(f"    {r['table_line']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
