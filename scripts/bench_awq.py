"""AWQ int4 (W4A16) against bf16 on one GPU, Qwen3-8B shapes, random weights. Prints markdown tables.

    python scripts/bench_awq.py [--skip-gemm] [--skip-decode] [--group-size 128] [--max-tokens 129]

1. GEMM: for each Qwen3-8B linear (qkv, o, gate_up, down: K x N) and M = 1, 16, 64, 256 tokens, the
   time of bf16 cuBLAS (x @ W^T), what AWQLinear runs by default (layers/awq_kpack.py: the k-packed
   kernel, dequantize + cuBLAS from DEQUANT_MIN_M rows), the AWQ-layout kernels (awq_gemm.awq_matmul: the skinny kernel of
   layers/awq_skinny.py up to 32 rows, the tiled one above; scripts/sweep_awq_gemm.py tunes the
   skinny one) and gemlite's (layers/awq_gemlite.py, when installed; at every M here), each
   replayed from a CUDA graph (decode runs graphed), and the max error of each
   relative to max |y| of the float32 matmul of the same dequantized weights (bf16 cuBLAS's error
   runs on the dequantized weights rounded to bf16).
2. Decode: qwen3-8b bf16 vs AWQ (group 128) with load_format="dummy" (random codes and scales,
   utils/loader.fill_dummy_weights), one process per variant; batch B = 1, 16, 64, 256 prompts of
   32 tokens, max_tokens tokens each; decode tok/s = decoded tokens / the engine's decode seconds.
   --awq-kernels picks NANOVLLM_AWQ_KERNEL for the AWQ runs (default auto: the k-packed kernel of
   layers/awq_kpack.py; triton: the AWQ-layout kernels; triton-tile: the tiled kernel at every batch, the
   pre-skinny baseline; gemlite: gemlite for one row). For a quick batch <= 16 answer:
   --skip-gemm --batches 1 16 --awq-kernels auto triton.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up_proj": (4096, 24576), "down_proj": (12288, 4096)}
MS = (1, 16, 64, 256)
BATCHES = (1, 16, 64, 256)


def graph_time_ms(fn, reps: int = 50) -> float:
    """Median ms of one call, replayed from a CUDA graph of 10 calls (launch costs as in graphed decode)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b) / 10)
    return float(np.median(times))


def bench_gemm(group: int):
    from nanovllm.layers.awq_format import dequantize, pack
    from nanovllm.layers import awq_kpack
    from nanovllm.layers.awq_gemlite import GemliteAWQ
    from nanovllm.layers.awq_gemm import awq_matmul
    try:
        import gemlite  # noqa: F401
        have_gemlite = True
    except ImportError:
        have_gemlite = False
        print("(gemlite is not installed: no gemlite column)")
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"\n### W4A16 GEMM vs bf16, Qwen3-8B shapes, group {group} ({torch.cuda.get_device_name(0)})\n")
    cols = ["layer", "K x N", "M", "bf16 us", "default us", "default x", "triton us", "triton x"] \
        + (["gemlite us", "gemlite x"] if have_gemlite else []) + ["bf16 err", "default err", "triton err"] \
        + (["gemlite err"] if have_gemlite else [])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name, (K, N) in SHAPES.items():
        codes = torch.randint(0, 16, (K, N), device="cuda", generator=g)
        zeros = torch.randint(0, 16, (K // group, N), device="cuda", generator=g)
        scales = (torch.rand(K // group, N, device="cuda", generator=g) * 0.002 + 0.0005).half()
        qw, qz = pack(codes.cpu()).cuda(), pack(zeros.cpu()).cuda()
        w32 = dequantize(qw, qz, scales, group)                      # [K, N] float32
        w_bf16 = w32.t().contiguous().bfloat16()                      # nn.Linear layout [N, K]
        lite = GemliteAWQ(qw, qz, scales, group, torch.bfloat16) if have_gemlite else None
        slice = awq_kpack.layer_slice(K, group)
        words, kz = awq_kpack.kpack(qw, qz, scales, group, slice)
        sms = torch.cuda.get_device_properties(0).multi_processor_count

        def default(x):   # what AWQLinear runs (NANOVLLM_AWQ_KERNEL=auto)
            return awq_kpack.kpacked_matmul(x, words, kz, scales, group, slice, sms)
        for M in MS:
            x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
            ref = x.float() @ w32
            denom = ref.abs().max().item()
            err = lambda y: (y.float() - ref).abs().max().item() / denom
            t_bf16 = graph_time_ms(lambda: torch.nn.functional.linear(x, w_bf16))
            t_def = graph_time_ms(lambda: default(x))
            t_tri = graph_time_ms(lambda: awq_matmul(x, qw, qz, scales, group))
            row = [name, f"{K} x {N}", M, f"{t_bf16 * 1e3:.1f}", f"{t_def * 1e3:.1f}", f"{t_bf16 / t_def:.2f}",
                   f"{t_tri * 1e3:.1f}", f"{t_bf16 / t_tri:.2f}"]
            errs = [err(torch.nn.functional.linear(x, w_bf16)), err(default(x)), err(awq_matmul(x, qw, qz, scales, group))]
            if lite is not None:
                t_lite = graph_time_ms(lambda: lite(x))
                row += [f"{t_lite * 1e3:.1f}", f"{t_bf16 / t_lite:.2f}"]
                errs.append(err(lite(x)))
            print("| " + " | ".join(str(c) for c in row + [f"{e:.1e}" for e in errs]) + " |", flush=True)


def decode_one(variant: str, group: int, max_tokens: int, preset: str, batches: list[int]) -> list[dict]:
    """One engine (bf16 or awq) on `preset` dummy weights; decode tok/s per batch size."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.tools.make_model import make_model
    path = os.path.join(tempfile.gettempdir(), f"nanovllm-bench-awq-{preset}-{variant}-g{group}")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_model(preset, path, weights=False, awq_group_size=group if variant == "awq" else None)
    llm = LLM(path, load_format="dummy", max_num_seqs=max(batches), max_model_len=1024)
    rng = np.random.default_rng(0)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    results = []
    for batch in batches:
        prompts = [rng.integers(0, min(10000, llm.vocab_size), 32).tolist() for _ in range(batch)]
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        before = dict(llm.stats)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        seconds = llm.stats["decode_seconds"] - before["decode_seconds"]
        decoded = sum(len(o["token_ids"]) - 1 for o in outs)  # the first token comes from the prefill
        results.append(dict(variant=variant, kernel=os.environ.get("NANOVLLM_AWQ_KERNEL", "auto") if variant == "awq"
                            else "cublas", batch=batch, decode_tok_s=round(decoded / seconds, 1),
                            decode_steps=llm.stats["decode_steps"] - before["decode_steps"]))
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")
    results.append(dict(variant=variant, peak_gpu_mem_gb=round(peak, 1)))
    llm.close()
    return results


def bench_decode(group: int, max_tokens: int, kernels: list[str], preset: str, batches: list[int]):
    runs = [("bf16", None)] + [("awq", k) for k in kernels]
    rows = {}
    for variant, kernel in runs:
        env = dict(os.environ, **({"NANOVLLM_AWQ_KERNEL": kernel} if kernel else {}))
        out = subprocess.run([sys.executable, __file__, "--decode-one", variant, "--group-size", str(group),
                              "--max-tokens", str(max_tokens), "--preset", preset,
                              "--batches", *map(str, batches)], env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(f"{variant}/{kernel}: failed\n{out.stderr[-3000:]}")
            continue
        rows[(variant, kernel)] = [json.loads(line) for line in lines]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n### Decode tok/s, {preset} dummy weights, {max_tokens} tokens a request ({device})\n")
    names = [f"{v}" + (f" ({k})" if k else "") for v, k in rows]
    print("| batch | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for i, batch in enumerate(batches):
        print(f"| {batch} | " + " | ".join(str(r[i]["decode_tok_s"]) for r in rows.values()) + " |")
    print("| peak GB | " + " | ".join(str(r[-1]["peak_gpu_mem_gb"]) for r in rows.values()) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=129)
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--awq-kernels", nargs="+", default=["auto"],
                   choices=["auto", "kpack", "triton", "triton-tile", "gemlite", "dequant"])
    p.add_argument("--preset", default="qwen3-8b", help="make_model preset of the decode runs")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--decode-one", choices=["bf16", "awq"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.decode_one:
        for r in decode_one(args.decode_one, args.group_size, args.max_tokens, args.preset, args.batches):
            print(json.dumps(r), flush=True)
        return
    if not args.skip_gemm:
        bench_gemm(args.group_size)
    if not args.skip_decode:
        bench_decode(args.group_size, args.max_tokens, args.awq_kernels, args.preset, args.batches)


if __name__ == "__main__":
    main()
