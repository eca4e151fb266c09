"""Sweep the k-packed W4A16 kernel's configs (layers/awq_kpack.py) on one GPU against bf16 cuBLAS and the
AWQ-layout kernels the engine used before (layers/awq_gemm.awq_matmul: skinny TABLE up to 32 rows, tiled
above), Qwen3-8B shapes, random weights, group 128 by default.

    python scripts/sweep_awq_kpack.py [--ms 1 4 16 32 256] [--shapes qkv o gate_up down] [--json out.json]
    python scripts/sweep_awq_kpack.py --quick --ms 1 16 64 256 2048   # what AWQLinear runs, no search

Timing as scripts/sweep_awq_gemm.py (its graph_us): CUDA graphs of calls cycling through enough weight
copies (>= 256 MB) that L2 holds none between uses; median of 20 replays. Every row first times what an
AWQLinear runs (awq_kpack.config_for's config, and dequantize + cuBLAS, which it takes from DEQUANT_MIN_M
rows). Candidates (without --quick): round 1 block_n (64/128/256) x swap x slice (16/32/64; 32 only above
16 rows, the layers' packing) x row tiles (16/32/64 up to M) x splits, magic codes with the zeros
subtracted, 4 warps (8 at slice 64), 3 stages, grids of sms/2 .. 16 sms programs; round 2 around the
best: warps 4/8 x stages 2/3/4, then magic / zeros-subtracted off. Prints per (layer, M) microseconds and
GB/s, the speed-up of the best k-packed config over bf16 and over awq_matmul, its max abs error against
the float32 matmul (and bf16's), then the TABLE lines for layers/awq_kpack.py.
Session 10's runs on an H200: claude_docs/models.md, "The k-packed kernel"."""
import argparse
import itertools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from nanovllm.layers.awq_format import dequantize
from nanovllm.layers.awq_gemm import awq_matmul
from nanovllm.layers.awq_kpack import (SLICES, KpackConfig, block_m_for, config_for, dequant_matmul, heuristic_config,
                                      kpack, kpack_gemm, layer_slice, m_bucket, packing_error)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_awq_gemm import FLUSH_BYTES, SHAPES, graph_us  # noqa: E402

DEVICE, DTYPE = "cuda", torch.bfloat16


def round1(M: int, N: int, K: int, sms: int):
    bm_choices = [bm for bm in (16, 32, 64) if bm <= block_m_for(M)]   # several row tiles may beat one
    for bm, bn, swap, sl in itertools.product(bm_choices, (64, 128, 256), (False, True), SLICES):
        if M > 16 and sl != 32:   # the layers are packed with slice 32 (awq_kpack.layer_slice)
            continue
        tiles = math.ceil(M / bm) * math.ceil(N / bn)
        blocks = K // (8 * sl)
        for splits in (1, 2, 4, 8, 16, 32):
            if splits <= blocks and sms // 2 <= tiles * splits <= 16 * sms:
                yield KpackConfig(bn, splits, sl, bm, warps=8 if sl == 64 else 4, magic=True, subz=True, swap=swap)


def round2(best: KpackConfig):
    for warps, stages in itertools.product((4, 8), (2, 3, 4)):
        yield KpackConfig(best.block_n, best.splits, best.slice, best.block_m, warps, stages, best.swap, True, True)
    for magic, subz in ((False, True), (True, False), (False, False)):
        yield KpackConfig(best.block_n, best.splits, best.slice, best.block_m, best.warps, best.stages, best.swap,
                          magic, subz)


def sweep_shape(name, K, N, group, ms, sms, gen, quick=False):
    def words(rows):
        return torch.randint(-2**31, 2**31 - 1, (rows, N // 8), device=DEVICE, dtype=torch.int32, generator=gen)
    awq_bytes = K * N // 2 + (K // group) * N // 2 + (K // group) * N * 2
    kp_bytes = K * N // 2 + (K // group) * N * 4
    copies = max(1, math.ceil(FLUSH_BYTES / awq_bytes))
    copies_bf16 = max(1, math.ceil(FLUSH_BYTES / (K * N * 2)))
    qws = [words(K) for _ in range(copies)]
    qzs = [words(K // group) for _ in range(copies)]
    ss = [(torch.rand(K // group, N, device=DEVICE, generator=gen) * 0.002 + 0.0005).half() for _ in range(copies)]
    kps = {sl: [kpack(qws[i], qzs[i], ss[i], group, sl) for i in range(copies)] for sl in SLICES
           if packing_error(K, group, sl) is None}
    layer_sl = layer_slice(K, group)   # what an AWQLinear packs with
    w32 = dequantize(qws[0], qzs[0], ss[0], group)
    w_bf16 = [w32.t().contiguous().to(DTYPE) for _ in range(copies_bf16)]
    rows = []
    for M in ms:
        x = torch.randn(M, K, device=DEVICE, generator=gen).to(DTYPE)
        io = M * K * 2 + M * N * 2
        ref = x.float() @ w32
        row = dict(layer=name, K=K, N=N, M=M, group=group)
        row["bf16_us"] = graph_us(lambda i: lambda: F.linear(x, w_bf16[i]), copies_bf16)
        row["bf16_err"] = (F.linear(x, w_bf16[0]).float() - ref).abs().max().item()
        row["awq_us"] = graph_us(lambda i: lambda: awq_matmul(x, qws[i], qzs[i], ss[i], group), copies)

        def time_config(config):
            try:
                kp = kps[config.slice]
                return graph_us(lambda i: lambda: kpack_gemm(x, kp[i][0], kp[i][1], ss[i], group, config.slice, config),
                                copies)
            except Exception as e:  # noqa: BLE001 (does not fit the SM: not a candidate)
                row["skipped"] = row.get("skipped", 0) + 1
                row["last_skip"] = f"{type(e).__name__}: {str(e)[:160]}"
                return float("inf")
        chosen = config_for(M, N, K, layer_sl, sms)   # what an AWQLinear runs below DEQUANT_MIN_M rows
        row["chosen"], row["chosen_us"] = repr(chosen), time_config(chosen)
        row["chosen_x_bf16"] = row["bf16_us"] / row["chosen_us"]
        kp = kps[layer_sl]
        row["dequant_us"] = graph_us(lambda i: lambda: dequant_matmul(x, kp[i][0], kp[i][1], ss[i], group, layer_sl),
                                     copies)
        if quick:
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        row["default_us"] = time_config(heuristic_config(M, N, K, sms))
        r1 = [(time_config(c), c) for c in round1(M, N, K, sms) if c.slice in kps]
        best1 = min(r1, key=lambda t: t[0])[1]
        results = r1 + [(time_config(c), c) for c in round2(best1)]
        t, best = min(results, key=lambda r: r[0])
        kp = kps[best.slice]
        y = kpack_gemm(x, kp[0][0], kp[0][1], ss[0], group, best.slice, best)
        row.update(best=repr(best), best_us=t, tried=len(results), best_err=(y.float() - ref).abs().max().item(),
                   bf16_GBs=(K * N * 2 + io) / row["bf16_us"] / 1e3, awq_GBs=(awq_bytes + io) / row["awq_us"] / 1e3,
                   best_GBs=(kp_bytes + io) / t / 1e3, x_bf16=row["bf16_us"] / t, x_awq=row["awq_us"] / t,
                   table_line=f"({m_bucket(M)}, {N}, {K}): {best!r},")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 32, 256])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="no search: bf16, awq_matmul and config_for's choice only")
    args = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.shapes:
        K, N = SHAPES[name]
        rows += sweep_shape(name, K, N, args.group_size, args.ms, sms, gen, args.quick)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n### AWQLinear's k-packed config (config_for) vs bf16 and awq_matmul, group {args.group_size} "
          f"({torch.cuda.get_device_name(0)}; us)\n")
    print("| layer (K x N) | M | bf16 | awq_matmul | kpack (config_for) | x bf16 | x awq_matmul | dequant + cuBLAS | "
          "config |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} {r['K']} x {r['N']} | {r['M']} | {r['bf16_us']:.1f} | {r['awq_us']:.1f} | "
              f"{r['chosen_us']:.1f} | {r['chosen_x_bf16']:.2f} | {r['awq_us'] / r['chosen_us']:.2f} | "
              f"{r['dequant_us']:.1f} | {r['chosen']} |")
    rows = [r for r in rows if "best" in r]
    if not rows:
        return
    print(f"\n### k-packed W4A16 vs bf16 and awq_matmul, group {args.group_size} ({torch.cuda.get_device_name(0)}; "
          f"us (GB/s))\n")
    print("| layer (K x N) | M | bf16 | awq_matmul | kpack default | kpack best | x bf16 | x awq_matmul | "
          "bf16 err | best err | best config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} {r['K']} x {r['N']} | {r['M']} | {r['bf16_us']:.1f} ({r['bf16_GBs']:.0f}) | "
              f"{r['awq_us']:.1f} ({r['awq_GBs']:.0f}) | {r['default_us']:.1f} | {r['best_us']:.1f} ({r['best_GBs']:.0f}) | "
              f"{r['x_bf16']:.2f} | {r['x_awq']:.2f} | {r['bf16_err']:.1e} | {r['best_err']:.1e} | {r['best']} |")
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        print(f"\n{sum(r['skipped'] for r in skipped)} configs did not launch, e.g. {skipped[0]['last_skip']}")
    print("\n# layers/awq_kpack.py TABLE (M bucket, N, K) -> config")
    for r in rows:
        print(f"    {r['table_line']}")


if __name__ == "__main__":
    main()
