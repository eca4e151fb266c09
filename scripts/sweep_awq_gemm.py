"""Sweep the skinny-M AWQ kernel's configs (layers/awq_skinny.py) on one GPU, Qwen3-8B shapes, random weights.

    python scripts/sweep_awq_gemm.py [--group-size 128] [--ms 1 2 4 8 16 32 64] [--shapes qkv o gate_up down]
                                     [--no-candidates] [--gemlite-config out.json] [--json out.json]

For each layer (qkv 4096->6144, o 4096->4096, gate_up 4096->24576, down 12288->4096) and M rows it
times bf16 cuBLAS (F.linear on the dequantized weights), the tiled W4A16 kernel (awq_gemm), the skinny
kernel as layers use it (M <= 32: awq_skinny.TABLE's config, else heuristic_config), gemlite
(layers/awq_gemlite.py, when installed: its autotuner runs at the first, eager call; --gemlite-config
saves what it chose, for NANOVLLM_GEMLITE_CONFIG) and, unless --no-candidates, the skinny kernel's
unmeasured default (heuristic_config) and every candidate config (M <= 32), each
replayed from a CUDA graph of calls that cycle through enough copies of the weights (>= 256 MB) that
L2 (50 MB) holds none of them between uses, as in a decode step whose layers each read their own
weights. Median of 20 replays. Candidates, in two rounds: (1) block_n (64/128/256) x block_k
(32/64/128) x splits at 4 warps, 3 stages, packed words (splits kept where the grid has 1/2..16
programs per SM); (2) around the best of (1): warps 4/8, stages 2/3/4, packed or gathered words, float or
magic weights (tl.dot configs).
M = 1 also tries the tl.dot path; configs that do not fit the SM (shared memory, registers) are
skipped and counted.

Prints, per (layer, M): microseconds and GB/s (AWQ: weights + scales + zeros + x + y over the time; gemlite
reads the same int4 codes, with bf16 scales and zeros) of each, speed-ups over bf16, the best config,
and the max abs error of the best config, of gemlite and of bf16 cuBLAS against the float32 matmul of
the same dequantized weights (plus the max abs difference between best and bf16); then the TABLE lines
for layers/awq_skinny.py (paste them into TABLE). A quick bf16 / table-skinny / gemlite comparison:
--ms 1 4 16 --no-candidates (about a minute of GPU time, plus gemlite's autotuning)."""
import argparse
import importlib.util
import itertools
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from nanovllm.layers.awq_format import dequantize
from nanovllm.layers.awq_gemlite import GemliteAWQ
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
    for warps, stages, gather, magic in itertools.product((4, 8), (2, 3, 4), (False, True), (False, True)):
        if not (magic and best.fma):   # magic weights go through tl.dot
            yield SkinnyConfig(best.block_n, best.block_k, best.splits, warps, stages, gather, best.fma, magic)


def sweep_shape(name: str, K: int, N: int, group: int, ms: list[int], sms: int, gen: torch.Generator,
                candidates: bool = True, gemlite: bool = False):
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
    lites = [GemliteAWQ(qws[i], qzs[i], ss[i], group, DTYPE) for i in range(copies_awq)] if gemlite else []
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
        if lites:
            row["gemlite_us"] = graph_us(lambda i: lambda: lites[i](x), copies_awq)
            row["gemlite_GBs"] = gbs(row["gemlite_us"], awq_bytes)
            row["gemlite_vs_bf16"] = row["bf16_us"] / row["gemlite_us"]
            row["gemlite_err"] = (lites[0](x).float() - ref).abs().max().item()
        if M <= MAX_M:
            row["table_us"] = graph_us(lambda i: lambda: skinny_gemm(x, qws[i], qzs[i], ss[i], group), copies_awq)
            row["table_GBs"] = gbs(row["table_us"], awq_bytes)
            row["table_vs_bf16"] = row["bf16_us"] / row["table_us"]
            row["table_err"] = (skinny_gemm(x, qws[0], qzs[0], ss[0], group).float() - ref).abs().max().item()
        if M <= MAX_M and candidates:
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
    p.add_argument("--no-candidates", action="store_true", help="skip the skinny config search")
    p.add_argument("--no-gemlite", action="store_true", help="skip gemlite even when it is installed")
    p.add_argument("--gemlite-config", help="save gemlite's autotuned configs here (NANOVLLM_GEMLITE_CONFIG)")
    args = p.parse_args()
    gemlite = not args.no_gemlite and importlib.util.find_spec("gemlite") is not None
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.shapes:
        K, N = SHAPES[name]
        rows += sweep_shape(name, K, N, args.group_size, args.ms, sms, gen, not args.no_candidates, gemlite)
        torch.cuda.empty_cache()
    print_summary(rows, args.group_size, f"{torch.cuda.get_device_name(0)}, {sms} SMs", gemlite)
    if gemlite and args.gemlite_config:
        import gemlite as gl
        gl.cache_config(args.gemlite_config)
        print(f"\ngemlite configs saved to {args.gemlite_config}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def print_summary(rows: list[dict], group: int, device: str, gemlite: bool):
    def us(r, key):
        return f"{r[key + '_us']:.1f} ({r[key + '_GBs']:.0f})" if key + "_us" in r else "-"

    def num(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"
    print(f"\n### W4A16 GEMM vs bf16, group {group} ({device}; us (GB/s), "
          f"x bf16: speed-up, > 1 is faster than bf16)\n")
    print("| layer (K x N) | M | bf16 | tiled | skinny table | table x bf16 | gemlite | gemlite x bf16 | "
          "skinny default | skinny best | best x bf16 | bf16 err | table err | gemlite err | best config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} {r['K']} x {r['N']} | {r['M']} | {us(r, 'bf16')} | {us(r, 'tile')} | {us(r, 'table')} | "
              f"{num(r, 'table_vs_bf16', '.2f')} | {us(r, 'gemlite')} | {num(r, 'gemlite_vs_bf16', '.2f')} | "
              f"{num(r, 'default_us', '.1f')} | {us(r, 'best')} | {num(r, 'speedup', '.2f')} | "
              f"{r['bf16_err']:.1e} | {num(r, 'table_err', '.1e')} | {num(r, 'gemlite_err', '.1e')} | "
              f"{r.get('best', '-')} |")
    if not gemlite:
        print("\n(gemlite not installed or --no-gemlite: no gemlite column)")
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        print(f"\n{sum(r['skipped'] for r in skipped)} configs did not launch, e.g. {skipped[0]['last_skip']}")
    if any("best" in r for r in rows):
        fma_rows = [r for r in rows if "best" in r and r["M"] == 1 and not r["best_fma"]]
        print("\n# layers/awq_skinny.py TABLE (M bucket, N, K) -> config" +
              (f"; at M = 1 tl.dot beat FMA for {[r['layer'] for r in fma_rows]}" if fma_rows else ""))
        for r in rows:
            if "best" in r and r["M"] == m_bucket(r["M"]):
                print(f"    {r['table_line']}")


if __name__ == "__main__":
    main()
