#!/usr/bin/env python3
"""Where a tensor-parallel prefill step's time goes on rank 0's GPU, stream by stream: the compute stream's
kernels, NCCL's, the copy engine's peer copies, and the compute stream's idle gaps with what ran on the
other streams meanwhile.

    source .devkit/setup.sh && python scripts/trace_tp_prefill.py --model /tmp/q8 --load-format dummy \
        [--tensor-parallel-size 2] [--prompts 30] [--prompt-len 540] [--out $OUT]

One generate of `--prompts` random prompts of `--prompt-len` tokens and one output token each (W1's prefill
steps: ~16k tokens) to warm up, then the same again under torch.profiler (rank 0, this process). Prints the
window's wall time, each stream's busy time, the compute stream's gaps over 20 us (with the kernels around
them and what the other streams ran meanwhile), the peer copies' durations, the longest CUDA runtime calls and
aten ops on the host, and what the caching allocator did. Writes the chrome trace, gzipped, to --out when the raw
trace is under 60 MB.
"""
import argparse
import collections
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402


def intervals_union(iv):
    total, end = 0.0, -1e30
    for a, b in sorted(iv):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def busy(ops) -> float:
    """Microseconds in which at least one of these (start, end, ...) ops runs."""
    return intervals_union([(a, b) for a, b, *_ in ops])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tensor-parallel-size", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=540)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="", help="appended to the trace's file name")
    args = ap.parse_args()
    llm = LLM(args.model, load_format=args.load_format, tensor_parallel_size=args.tensor_parallel_size)
    rng = random.Random(0)
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    make = lambda: [[rng.randrange(10000) for _ in range(rng.randrange(args.prompt_len // 2, args.prompt_len * 3 // 2))]
                    for _ in range(args.prompts)]
    llm.generate(make(), sp, use_tqdm=False)
    prompts = make()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, sp, use_tqdm=False)
        torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    print("allocator during the traced generate: " + ", ".join(
        f"{k} +{after.get(k, 0) - before.get(k, 0)}" for k in ("num_alloc_retries", "segment.all.allocated",
                                                               "segment.all.freed", "num_sync_all_streams")))
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "trace.json"
    prof.export_chrome_trace(str(path))
    llm.close()
    everything = json.load(open(path))["traceEvents"]
    if path.stat().st_size < 60 << 20:
        with open(path, "rb") as f, gzip.open(Path(args.out) / f"trace_tp_prefill{args.tag}.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
    shutil.rmtree(tmp)
    runtime = sorted(((e["dur"], e["name"]) for e in everything if e.get("ph") == "X"
                      and e.get("cat") in ("cuda_runtime", "cuda_driver")), reverse=True)
    print("longest CUDA runtime/driver calls on the host:", [(round(d), n) for d, n in runtime[:12]])
    ops = sorted(((e["dur"], e["name"]) for e in everything if e.get("ph") == "X" and e.get("cat") == "cpu_op"
                  and e["name"].startswith("aten::") and e["name"] not in ("aten::to", "aten::_to_copy")), reverse=True)
    print("longest aten ops on the host:", [(round(d), n) for d, n in ops[:10]])
    events = [e for e in everything
              if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_stream = collections.defaultdict(list)
    for e in events:
        by_stream[e["args"].get("stream")].append((e["ts"], e["ts"] + e["dur"], e["name"], e["cat"]))
    t0 = min(a for iv in by_stream.values() for a, _, _, _ in iv)
    t1 = max(b for iv in by_stream.values() for _, b, _, _ in iv)
    print(f"{sum(len(p) for p in prompts)} prompt tokens, window {(t1 - t0) / 1000:.1f} ms, "
          f"all streams busy (union) {busy([op for ops in by_stream.values() for op in ops]) / 1000:.1f} ms")
    compute = max(by_stream, key=lambda s: len(by_stream[s]))
    for s, iv in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
        kinds = collections.Counter(n.split("(")[0][:40] for _, _, n, c in iv).most_common(3)
        print(f"stream {s}{' (compute)' if s == compute else ''}: {len(iv)} ops, busy {busy(iv) / 1000:.1f} ms; "
              f"{kinds}")
    copies = [b - a for iv in by_stream.values() for a, b, n, c in iv if c == "gpu_memcpy" and b - a > 50]
    if copies:
        copies.sort()
        print(f"copies over 50 us: {len(copies)}, median {copies[len(copies) // 2]:.0f} us, max {copies[-1]:.0f} us")
    iv = sorted(by_stream[compute])
    others = [(a, b, n, s) for s, ops in by_stream.items() if s != compute for a, b, n, _ in ops]
    gaps = []
    for (a0, b0, n0, _), (a1, b1, n1, _) in zip(iv, iv[1:]):
        if a1 - b0 > 20:
            during = [f"{n[:30]}@{s}" for a, b, n, s in others if a < a1 and b > b0]
            gaps.append((a1 - b0, n0[:50], n1[:50], during[:3]))
    total_gap = sum(g for g, *_ in gaps)
    print(f"compute-stream gaps over 20 us: {len(gaps)}, {total_gap / 1000:.1f} ms in all")
    before_kernel = collections.Counter(n1 for _, _, n1, _ in gaps)
    gsum = collections.defaultdict(float)
    for g, _, n1, _ in gaps:
        gsum[n1] += g
    for name, cnt in before_kernel.most_common(8):
        print(f"  before {name}: {cnt} gaps, {gsum[name] / 1000:.1f} ms")
    for g, n0, n1, during in sorted(gaps, reverse=True)[:12]:
        print(f"  {g:.0f} us after {n0} before {n1}; meanwhile {during}")


if __name__ == "__main__":
    main()
