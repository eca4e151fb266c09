"""Decode-sized bf16 GEMMs on the GPU: cuBLAS (F.linear) against FlashInfer's tinygemm2 (TensorRT-LLM's small-M
kernel: TMA weight loads, issued before its programmatic-dependent-launch wait), alone and inside a whole
step's chain of norms, GEMMs and activations.

    python scripts/bench_decode_gemm.py [--preset qwen3-0.6b] [--tp 1] [--ms 1 2 4 8 16 32 64 128 256]

1. One GEMM shape at a time: one CUDA graph of `layers` GEMMs over as many distinct weights (weights come from
   HBM, not L2, as in a decode step), median replay / layers = us per GEMM; tinygemm2 with PDL off and on.
2. A step without attention: every layer's fused add + RMSNorm, qkv, o_proj, fused add + RMSNorm, gate_up,
   SiLU-and-mul, down (FlashInfer's norm and activation kernels launch with PDL on sm90), then the LM head; ms a
   step with cuBLAS everywhere and with tinygemm2 (PDL) for the GEMMs. The difference is what the kernel
   choice can take off a decode step at that batch.
Results are checked against F.linear before timing (the script stops on a wrong one).
`--errors`: only tinygemm2's and cuBLAS's max error against a float32 product, K 256-3072 x N 256-1536 x 1-16 rows.
"""
import argparse

import torch
import torch.nn.functional as F
from sweep_triton_decode import timed as graph_ms   # median ms of a CUDA-graph replay of fn() (scripts/ is on the path)

PRESETS = {  # (hidden, q heads, kv heads, head dim, intermediate, layers, vocab)
    "qwen3-0.6b": (1024, 16, 8, 128, 3072, 28, 151936),
    "qwen3-8b": (4096, 32, 8, 128, 12288, 36, 151936),
}


def shapes(preset: str, tp: int) -> dict[str, tuple[int, int]]:
    h, hq, hkv, d, inter, _, _ = PRESETS[preset]
    return {"qkv": ((hq // tp + 2 * max(1, hkv // tp)) * d, h),
            "o": (h, hq // tp * d), "gate_up": (2 * inter // tp, h), "down": (h, inter // tp)}


def main():
    from flashinfer.gemm.routergemm import get_tinygemm2_module
    import flashinfer
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3-0.6b", choices=list(PRESETS))
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--errors", action="store_true", help="only the error table (small K and N included)")
    args = p.parse_args()
    tiny = get_tinygemm2_module()
    if args.errors:
        return error_table(tiny)
    h, _, _, _, _, layers, vocab = PRESETS[args.preset]
    dt, dev = torch.bfloat16, "cuda"
    shp = shapes(args.preset, args.tp)
    weights = {name: [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(layers)]
               for name, (n, k) in shp.items()}
    head = torch.randn(vocab // args.tp, h, device=dev, dtype=dt) * 0.02

    def tg(x, w, out, pdl):
        tiny.tinygemm2_nobias_op(x, w, out, pdl)
        return out

    print(f"\n### Decode GEMMs, {args.preset} TP={args.tp}, {torch.cuda.get_device_name()} "
          f"(us per GEMM, {layers} distinct weights in one graph)\n")
    print("| layer (N x K) | M | cuBLAS | tinygemm2 | tinygemm2 + PDL | TB/s cuBLAS / best tiny |\n"
          "|---|---|---|---|---|---|")
    for M in args.ms:
        for name, (n, k) in list(shp.items()) + [("lm_head", tuple(head.shape))]:
            ws = weights[name] if name != "lm_head" else [head]
            x = torch.randn(M, k, device=dev, dtype=dt)
            out = torch.empty(M, n, device=dev, dtype=dt)
            ref = F.linear(x, ws[0]).float()
            for pdl in (False, True):
                got = tg(x, ws[0], out, pdl).float()
                torch.cuda.synchronize()
                err = (got - ref).abs().max().item()
                if err > 1e-2 * ref.abs().max().item() + 1e-3:
                    raise SystemExit(f"tinygemm2 wrong at M={M} {name}: max error {err}")
            t_cb = graph_ms(lambda: [F.linear(x, w) for w in ws]) / len(ws)
            t_t0 = graph_ms(lambda: [tg(x, w, out, False) for w in ws]) / len(ws)
            t_t1 = graph_ms(lambda: [tg(x, w, out, True) for w in ws]) / len(ws)
            gb = n * k * 2 / 1e9
            print(f"| {name} ({n} x {k}) | {M} | {t_cb * 1e3:.1f} | {t_t0 * 1e3:.1f} | {t_t1 * 1e3:.1f} | "
                  f"{gb / t_cb:.2f} / {gb / min(t_t0, t_t1):.2f} |", flush=True)

    print("\n### A decode step without attention (ms): norms + GEMMs + activation every layer, then the LM head\n")
    print("| M | cuBLAS | tinygemm2 + PDL | tinygemm2 + PDL, LM head on cuBLAS | saved |\n|---|---|---|---|---|")
    nw = torch.ones(h, device=dev, dtype=dt)
    for M in args.ms:
        hidden = torch.randn(M, h, device=dev, dtype=dt)
        residual = torch.randn(M, h, device=dev, dtype=dt)
        bufs = {name: torch.empty(M, n, device=dev, dtype=dt) for name, (n, k) in shp.items()}
        attn_out = torch.randn(M, shp["o"][1], device=dev, dtype=dt)
        act = torch.empty(M, shp["down"][1], device=dev, dtype=dt)
        logits = torch.empty(M, head.shape[0], device=dev, dtype=dt)

        def step(gemm, head_gemm):
            for i in range(layers):
                flashinfer.fused_add_rmsnorm(hidden, residual, nw, 1e-6)
                gemm(hidden, weights["qkv"][i], bufs["qkv"])
                gemm(attn_out, weights["o"][i], bufs["o"])          # attention's output stands in for o_proj's input
                flashinfer.fused_add_rmsnorm(bufs["o"], residual, nw, 1e-6)
                gemm(bufs["o"], weights["gate_up"][i], bufs["gate_up"])
                flashinfer.activation.silu_and_mul(bufs["gate_up"], out=act)
                gemm(act, weights["down"][i], hidden)
            flashinfer.fused_add_rmsnorm(hidden, residual, nw, 1e-6)
            head_gemm(hidden, head, logits)

        def cublas(x, w, out):
            torch.matmul(x, w.t(), out=out)

        def tiny_pdl(x, w, out):
            tg(x, w, out, True)

        t_cb = graph_ms(lambda: step(cublas, cublas))
        t_tp = graph_ms(lambda: step(tiny_pdl, tiny_pdl))
        t_mix = graph_ms(lambda: step(tiny_pdl, cublas))
        best = min(t_tp, t_mix)
        print(f"| {M} | {t_cb:.3f} | {t_tp:.3f} | {t_mix:.3f} | {t_cb - best:.3f} ({(t_cb - best) / t_cb:.0%}) |",
              flush=True)


def error_table(tiny):
    """Max |product - float32 product| for tinygemm2 (PDL) and cuBLAS at shapes down to the tiny test models'."""
    g = torch.Generator(device="cuda").manual_seed(0)
    print("| K | N | rows | tinygemm2 | cuBLAS | max abs of y |\n|---|---|---|---|---|---|")
    for K in (256, 512, 768, 1024, 1536, 2048, 3072):
        for N in (256, 1024, 1536):
            for M in (1, 8, 16):
                w = (torch.randn(N, K, generator=g, device="cuda") * 0.05).bfloat16()
                x = torch.randn(M, K, generator=g, device="cuda").bfloat16()
                ref = x.float() @ w.float().t()
                out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
                tiny.tinygemm2_nobias_op(x, w, out, True)
                e_t = (out.float() - ref).abs().max().item()
                e_c = (F.linear(x, w).float() - ref).abs().max().item()
                print(f"| {K} | {N} | {M} | {e_t:.4f} | {e_c:.4f} | {ref.abs().max().item():.2f} |", flush=True)


if __name__ == "__main__":
    main()
