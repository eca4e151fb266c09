"""Where a decode step's time goes, on the GPU machine: GPU kernels by category and host time.

    python scripts/profile_step.py --model /tmp/qwen3-0.6b [--batch 256] [--context 600] [--cascade]
    python scripts/profile_step.py --model /tmp/qwen3-8b --load-format dummy --tensor-parallel-size 2

Under tensor parallelism the kernels are rank 0's (the other ranks run the same step).

Prefills `batch` requests of `context` random tokens, then profiles decode steps: kernel time by
category (attention, GEMM, KV write, sampling, other) from torch.profiler, step wall time, and the
host's share (wall minus GPU busy). Prints a markdown table (claude_docs/performance.md).
"""
import argparse
import cProfile
import io
import pstats
import random
import time
from collections import defaultdict

import torch

from nanovllm import LLM, SamplingParams

CATEGORIES = [("all-reduce / all-gather", ("nccl", "allreduce", "all_reduce", "allgather", "cross_device_reduce",
                                            "oneshot", "twoshot", "lamport")),
              ("attention", ("flashinfer", "BatchDecode", "BatchPrefill", "Prefill", "merge_state", "Attention",
                             "_decode_kernel", "_merge_kernel", "_shared_level")),
              ("kv write", ("_store_kv",)),
              ("gemm", ("gemm", "Gemm", "tinygemm", "cutlass", "sm90", "xmma", "nvjet", "cublas", "splitK")),
              ("sampling", ("softmax", "exponential", "argmax", "sort", "distribution", "reduce", "radix", "cumsum", "_sample_chunk")),
              ]


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k.lower() in name.lower() for k in keys):
            return cat
    return "other (norm, rope, act, copies)"


def profile_prefill(llm, args):
    """Kernel time by category over all prefill steps, against their wall time."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        while llm.stats["decode_steps"] < 1:
            llm.step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    steps = llm.stats["prefill_steps"]
    times, kernels = defaultdict(float), []
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[category(ev.key)] += ev.self_device_time_total / 1000
            kernels.append((ev.self_device_time_total / 1000, ev.count, ev.key))
    print(f"\nprefill: {steps} steps, {wall * 1000:.1f} ms wall (with the profiler), cascade={args.cascade}")
    print("| part | ms, all prefill steps |\n|---|---|")
    for cat, ms in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {ms:.1f} |")
    print(f"| GPU busy (sum) | {sum(times.values()):.1f} |")
    print("\n| kernel | ms | launches |\n|---|---|---|")
    for ms, n, name in sorted(kernels, reverse=True)[:args.kernels or 12]:
        print(f"| {name[:90]} | {ms:.1f} | {n} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cascade", action="store_true")
    p.add_argument("--shared", type=int, default=0, help="tokens of a system prompt all requests share")
    p.add_argument("--groups", type=int, default=1, help="system prompts (requests are spread over them)")
    p.add_argument("--prefill", action="store_true", help="profile the prefill steps instead (kernels only)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--greedy", action="store_true", help="temperature 0 (W2/W3) instead of 0.6 (W1)")
    p.add_argument("--kernels", type=int, default=0, help="also list the N kernels that take the most time")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) or fp8_e4m3")
    p.add_argument("--decode-attention-kernel", default="auto", choices=["auto", "flashinfer", "triton", "xqa"])
    args = p.parse_args()
    llm = LLM(args.model, enable_cascade_attention=args.cascade, enforce_eager=args.enforce_eager,
              max_num_seqs=max(args.batch, 16), max_model_len=args.context + 4 * args.steps + 64,
              tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
              kv_cache_dtype=args.kv_cache_dtype, decode_attention_kernel=args.decode_attention_kernel)
    rng = random.Random(0)
    systems = [[rng.randint(0, 10000) for _ in range(args.shared)] for _ in range(args.groups)]
    prompts = [systems[i % args.groups] + [rng.randint(0, 10000) for _ in range(args.context - args.shared)]
               for i in range(args.batch)]
    rng.shuffle(prompts)
    sp = SamplingParams(temperature=0 if args.greedy else 0.6, ignore_eos=True, max_tokens=4 * args.steps)
    for prompt in prompts:
        llm.add_request(prompt, sp)
    if args.prefill:
        profile_prefill(llm, args)
        return
    while llm.stats["decode_steps"] < 3:   # prefill all, then a few decode steps
        llm.step()
    torch.cuda.synchronize()

    # Wall time per step, and how much of it the host spent blocked on the device (collect).
    runner, waited = llm.model_runner, [0.0]
    collect = runner.collect

    def timed_collect(step):
        t0 = time.perf_counter()
        try:
            return collect(step)
        finally:
            waited[0] += time.perf_counter() - t0
    runner.collect = timed_collect
    t = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    wall = (time.perf_counter() - t) / args.steps
    runner.collect = collect
    host_busy = wall - waited[0] / args.steps

    prof_host = cProfile.Profile()  # separate run: cProfile slows the host down
    prof_host.enable()
    for _ in range(args.steps):
        llm.step()
    prof_host.disable()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            llm.step()
        torch.cuda.synchronize()
    times = defaultdict(float)
    kernels = []
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[category(ev.key)] += ev.self_device_time_total / 1000 / args.steps  # ms per step
            kernels.append((ev.self_device_time_total / args.steps, ev.count / args.steps, ev.key))
    gpu = sum(times.values())
    while not llm.is_finished():
        llm.step()

    print(f"\nbatch {args.batch}, context ~{args.context}, cascade={args.cascade}, "
          f"eager={args.enforce_eager}, cascade steps={llm.stats['cascade_steps']}")
    print("| part | ms / decode step | share |\n|---|---|---|")
    for cat, ms in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {ms:.3f} | {100 * ms / (wall * 1000):.1f}% |")
    print(f"| GPU busy (sum) | {gpu:.3f} | {100 * gpu / (wall * 1000):.1f}% |")
    print(f"| host, not overlapped (wall - GPU) | {wall * 1000 - gpu:.3f} | {100 - 100 * gpu / (wall * 1000):.1f}% |")
    print(f"| step wall time | {wall * 1000:.3f} | 100% |")
    print(f"| host busy (wall - blocked in collect) | {host_busy * 1000:.3f} | {100 * host_busy / wall:.1f}% |")
    if args.kernels:
        print("\n| kernel | us / step | launches / step |\n|---|---|---|")
        for us, n, name in sorted(kernels, reverse=True)[:args.kernels]:
            print(f"| {name[:90]} | {us:.1f} | {n:.0f} |")
    s = io.StringIO()
    pstats.Stats(prof_host, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:6000])


if __name__ == "__main__":
    main()
