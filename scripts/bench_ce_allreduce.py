#!/usr/bin/env python3
"""Prefill's large sums over two GPUs: NCCL against the copy-engine all-reduce
(nanovllm/distributed/copy_engine_all_reduce.py), alone and beside the GEMMs of a step in two pieces.

    source .devkit/setup.sh && python scripts/bench_ce_allreduce.py [--tokens 8192] [--layers 36]

Two processes, one per GPU, NCCL for the reference sums, gloo for the IPC handles. It prints:
1. correctness: the copy-engine sum of random bf16 messages (1, 16 and 64 MB, two in flight at once, 20
   rounds) against NCCL's, which must be equal bit for bit at two ranks (one bf16 addition either way);
2. one sum alone, per size (ms, median of 5 timings of 20 back-to-back sums): NCCL, copy engine;
3. a step of `--layers` layers at Qwen3-8B's TP=2 shapes (hidden 4,096, 16 heads' o_proj of 2,048 columns,
   MLP 6,144 a rank) in two pieces of `--tokens` rows, as models/tp_overlap.py runs it: o_proj(A), sum(A),
   o_proj(B), sum(B); wait A, MLP(A), sum(A); wait B, MLP(B), sum(B); (attention is left out). Median of 5
   steps (ms): no sums at all (the GEMMs' own time), NCCL's async sums, the copy engine's. What the sums add
   to the GEMMs' time is what is exposed. "own-nccl" / "own-ce": each piece through the whole layer on its own
   (its own attention: qkv and o_proj GEMMs stand for it), so a piece's sum has the other piece's work beside
   it; "own-none" is that schedule's GEMMs alone.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MB = 1 << 20


def timed(fn, reps=5):
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def worker(rank, world, port, args, q):
    from nanovllm.distributed.copy_engine_all_reduce import CopyEngineAllReduce
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=dev)
    cpu = dist.new_group(backend="gloo")
    hidden = 4096
    msg_bytes = args.tokens * hidden * 2
    ce = CopyEngineAllReduce(cpu, rank, world, dev, max_bytes=max(64 * MB, msg_bytes))
    lines = []
    if ce.disabled:
        q.put((rank, [f"copy-engine all-reduce disabled: {ce.disabled_reason}"]))
        dist.destroy_process_group()
        return
    # 1. correctness
    bad = 0
    for size in (1 * MB, 16 * MB, 64 * MB):
        for it in range(20):
            g = torch.Generator(device=dev).manual_seed(1000 * rank + it)
            xs = [torch.randn(size // 2 // hidden, hidden, device=dev, dtype=torch.bfloat16, generator=g)
                  for _ in range(2)]
            refs = [x.clone() for x in xs]
            for r in refs:
                dist.all_reduce(r)
            hs = [ce.start(x) for x in xs]
            outs = [h.wait() for h in hs]
            bad += sum(int(not torch.equal(o, r)) for o, r in zip(outs, refs))
    torch.cuda.synchronize()
    lines.append(f"correctness: {bad} of 120 sums differ from NCCL's")
    # 2. alone
    lines.append("| size | NCCL ms | copy engine ms |")
    lines.append("|---|---|---|")
    for size in (8 * MB, 16 * MB, 32 * MB, 64 * MB):
        x = torch.randn(size // 2 // hidden, hidden, device=dev, dtype=torch.bfloat16)
        def nccl():
            for _ in range(20):
                dist.all_reduce(x)
        def copy():
            for _ in range(20):
                ce.start(x).wait()
        nccl(); copy()
        lines.append(f"| {size // MB} MB | {timed(nccl) / 20:.3f} | {timed(copy) / 20:.3f} |")
    # 3. a step in two pieces
    t = args.tokens
    w_o = torch.randn(hidden, 2048, device=dev, dtype=torch.bfloat16) * 0.02
    w_gu = torch.randn(2 * 3072, hidden, device=dev, dtype=torch.bfloat16) * 0.02
    w_d = torch.randn(hidden, 3072, device=dev, dtype=torch.bfloat16) * 0.02
    attn_out = [torch.randn(t, 2048, device=dev, dtype=torch.bfloat16) for _ in range(2)]

    w_qkv = torch.randn(3072, hidden, device=dev, dtype=torch.bfloat16) * 0.02

    def step_own_attention(mode):
        """Each piece through the whole layer on its own (its own attention, here only qkv and o_proj): a
        piece's sum has the other piece's work to hide behind."""
        sums = [None, None]
        mode = mode[len("own-"):]
        if mode == "none":
            start = finish = (lambda x: x)
        elif mode == "ce":
            start, finish = (lambda x: ce.start(x)), (lambda h: h.wait())
        else:
            start, finish = (lambda x: (x, dist.all_reduce(x, async_op=True))), (lambda h: (h[1].wait(), h[0])[1])
        for _ in range(args.layers):
            for i in (0, 1):
                x = finish(sums[i]) if sums[i] is not None else attn_out[i].new_ones(t, hidden)
                qkv = x @ w_qkv.t()
                sums[i] = start(qkv[:, :2048] @ w_o.t())
            for i in (0, 1):
                x = finish(sums[i])
                gu = x @ w_gu.t()
                act = torch.nn.functional.silu(gu[:, :3072]) * gu[:, 3072:]
                sums[i] = start(act @ w_d.t())
        return [finish(s) for s in sums]

    def step(mode):
        if mode.startswith("own-"):
            return step_own_attention(mode)
        sums = [None, None]
        parts = [None, None]
        def start(x):
            if mode == "none":
                return x
            if mode == "nccl":
                return (x, dist.all_reduce(x, async_op=True))
            return ce.start(x)
        def finish(h):
            if mode == "none":
                return h
            if mode == "nccl":
                h[1].wait()
                return h[0]
            return h.wait()
        for _ in range(args.layers):
            for i in (0, 1):
                if sums[i] is not None:
                    parts[i] = finish(sums[i])
                o = attn_out[i] @ w_o.t()
                sums[i] = start(o)
            for i in (0, 1):
                x = finish(sums[i])
                gu = x @ w_gu.t()
                act = torch.nn.functional.silu(gu[:, :3072]) * gu[:, 3072:]
                sums[i] = start(act @ w_d.t())
        for i in (0, 1):
            parts[i] = finish(sums[i])
        return parts

    lines.append(f"| step ({args.layers} layers, 2 x {t} rows, {t * hidden * 2 // MB} MB sums) | ms |")
    lines.append("|---|---|")
    modes = ("none", "nccl", "ce", "own-none", "own-nccl", "own-ce")
    for mode in modes:
        step(mode)
    results = {m: [] for m in modes}
    for _ in range(3):
        for mode in modes:
            results[mode].append(timed(lambda: step(mode), reps=3))
    for mode, ts in results.items():
        lines.append(f"| {mode} | {statistics.median(ts):.2f} ({', '.join(f'{v:.2f}' for v in ts)}) |")
    torch.cuda.synchronize()
    ce.close()
    q.put((rank, lines))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=36)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 2, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    for rank in sorted(out):
        print(f"rank {rank}:")
        print("\n".join(out[rank]))


if __name__ == "__main__":
    main()
