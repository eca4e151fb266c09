"""A Triton GEMM for decode's 32-256 rows against cuBLAS, at Qwen3-0.6B's layer shapes: is cuBLAS's ~5-8 us a
GEMM (against 1-3 us of weight bytes at 4.3 TB/s) the library's choice of kernel, or the cost of a kernel?

    source .devkit/setup.sh && python scripts/bench_triton_gemm.py [32 64 128 256]

Each case is one CUDA graph of 28 GEMMs over distinct weights (as a decode step's layers read them), median
replay / 28 = us a GEMM. The Triton kernel (y = x W^T, bf16 in and out, fp32 accumulation) is searched over tiles
(BM 64/128, BN 32-256, BK 64/128; at most 20 waves of programs), warps (4/8), split-K (1/2/4/8; the partial sums in fp32, the tile's last
program to finish adds them up, counted with an atomic) and programmatic dependent launch (PDL: the program lets
the next kernel start, prefetches its weight slice into L2, then waits for the kernel before it). It prints the
best time per case, the best without and with PDL, the config, and the max error against cuBLAS and float32.

Measured on one H200 (session 24, performance.md): at 32-64 rows the best Triton kernel (with PDL) is 0.5-0.8 us
faster a GEMM than cuBLAS (4.7-5.9 against 5.5-6.6), at 128 rows level, at 256 rows slower (6.4-9.4 against
6.6-8.1); without PDL it is never faster. So a layer's GEMMs cost ~5 us each whatever the kernel: what is left is
per-kernel latency, which only chaining every kernel of a layer with PDL (or fewer kernels) would take away.
At W2/W3's 1,024 rows (an H100): cuBLAS 60.3 us a layer's four GEMMs, the best Triton 70.7."""
import itertools
import sys
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def skinny(x_ptr, w_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, sxm, swn, sym,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr, NLINES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_len = K // SPLIT
    k0 = pid_k * k_len
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        # this CTA's weight slice into L2 (one address per 128-byte line) before waiting for the kernel before
        lines = tl.arange(0, NLINES)
        row = lines // (k_len // 64)
        col = (lines % (k_len // 64)) * 64
        pp = tl.where(lines < BN * (k_len // 64), w_ptr + (pid_n * BN + row) * swn + k0 + col, w_ptr)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pp], dtype=tl.int32,
                                  is_pure=False, pack=1)
        tl.extra.cuda.gdc_wait()
    xp = x_ptr + rm[:, None] * sxm + (k0 + rk)[None, :]
    wp = w_ptr + rn[:, None] * swn + (k0 + rk)[None, :]
    mm = rm[:, None] < M
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, k_len, BK):
        x = tl.load(xp, mask=mm, other=0.0)
        w = tl.load(wp)
        acc = tl.dot(x, tl.trans(w), acc)
        xp += BK
        wp += BK
    yp = y_ptr + rm[:, None] * sym + rn[None, :]
    if SPLIT == 1:
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mm)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        tl.store(part_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=mm)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            for s in range(SPLIT):
                if s != pid_k:
                    acc += tl.load(part_ptr + (s * M + rm[:, None]) * N + rn[None, :], mask=mm, other=0.0,
                                   cache_modifier=".cg")
            tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mm)
            tl.atomic_xchg(cnt_ptr + tile, 0)


PART = None
CNT = None


def run(x, w, y, cfg):
    BM, BN, BK, SPLIT, warps, stages, pdl = cfg
    M, K = x.shape
    N = w.shape[0]
    grid = (N // BN, triton.cdiv(M, BM), SPLIT)
    skinny[grid](x, w, y, PART, CNT, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                 BM=BM, BN=BN, BK=BK, SPLIT=SPLIT, PDL=pdl, NLINES=triton.next_power_of_2(BN * (K // SPLIT) // 64), num_warps=warps, num_stages=stages, launch_pdl=pdl)
    return y


def graph_us(fn, n, reps=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2] * 1e3 / n


def main():
    global PART, CNT
    dev, dt = "cuda", torch.bfloat16
    L = 28
    PART = torch.empty(16 * 512 * 8192, device=dev, dtype=torch.float32)
    CNT = torch.zeros(65536, device=dev, dtype=torch.int32)
    shapes = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
    ms = [int(a) for a in sys.argv[1:]] or [32, 64, 128, 256]
    print("| shape | M | cuBLAS us | best Triton us | config (BM BN BK split warps stages) | max err vs cuBLAS / vs fp32 |")
    print("|---|---|---|---|---|---|")
    tot = {}
    for name, (N, K) in shapes.items():
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(L)]
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=dt)
            ys = [torch.empty(M, N, device=dev, dtype=dt) for _ in range(L)]
            cub = graph_us(lambda: [torch.matmul(x, w.t(), out=y) for w, y in zip(ws, ys)], L)
            best = (1e9, None)
            bestp = {False: (1e9, None), True: (1e9, None)}
            for BM, BN, BK, SPLIT, warps, stages, pdl in itertools.product((64, 128), (32, 64, 128, 256), (64, 128), (1, 2, 4, 8),
                                                                      (4, 8), (4,), (False, True)):
                if K % (BK * SPLIT) or N % BN or (BM == 128 and M <= 64) or (BM * BN >= 128 * 128 and warps == 4):
                    continue
                ctas = N // BN * -(-M // BM) * SPLIT
                if ctas > 20 * 132 or ctas < 32:
                    continue
                cfg = (BM, BN, BK, SPLIT, warps, stages, pdl)
                try:
                    run(x, ws[0], ys[0], cfg)
                    torch.cuda.synchronize()
                    t = graph_us(lambda: [run(x, w, y, cfg) for w, y in zip(ws, ys)], L)
                except Exception:  # out of shared memory etc.
                    continue
                if t < best[0]:
                    best = (t, cfg)
                if t < bestp[pdl][0]:
                    bestp[pdl] = (t, cfg)
            t, cfg = best
            ref = F.linear(x, ws[0])
            ref32 = F.linear(x.float(), ws[0].float())
            out = run(x, ws[0], torch.empty_like(ref), cfg)
            e1 = (out.float() - ref.float()).abs().max().item()
            e2 = (out.float() - ref32).abs().max().item()
            e3 = (ref.float() - ref32).abs().max().item()
            tot.setdefault(M, [0, 0])
            tot[M][0] += cub; tot[M][1] += t
            print(f"| {name} {N}x{K} | {M} | {cub:.2f} | {t:.2f} (no PDL {bestp[False][0]:.2f}, PDL {bestp[True][0]:.2f}) | {cfg} | {e1:.4f} / {e2:.4f} (cuBLAS {e3:.4f}) |", flush=True)
    for M, (a, b) in tot.items():
        print(f"M={M}: a layer's 4 GEMMs cuBLAS {a:.1f} us, Triton best {b:.1f} us; x28 = {a*28/1e3:.3f} / {b*28/1e3:.3f} ms a step")


if __name__ == "__main__":
    main()
