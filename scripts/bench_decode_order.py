"""Does the order of a decode batch's rows change the decode kernel's time (the tail of its last wave)? W1's rows
at decode steps 100/300/500/700 (their real context lengths), each request's pages fixed, rows in W1's order,
longest first, shortest first; FlashInfer's tensor-core decode without and with its own split-kv, and the Triton
decode kernel. One layer (16 q / 8 kv heads, d 128, page 16, bf16), us per call (median) and TB/s of KV.

    source .devkit/setup.sh && python scripts/bench_decode_order.py

Session 24 (one H200): within 2-4% either way and in no consistent direction (a list-scheduling model of the
waves predicted 10-25% for longest first): the kernels read W1's KV at 3.6-4.0 TB/s whatever the order."""
import random
import torch
import flashinfer
from nanovllm.attention.triton_decode import TritonPagedDecode
from bench_kernels import timed   # median ms (scripts/ is on the path)

random.seed(0)
n = 256
prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(n)]
outs = [random.randint(100, 1024) for _ in range(n)]
L = [len(p) for p in prompts]
dev, dt = "cuda", torch.bfloat16
HQ, HKV, D, P = 16, 8, 128, 16


def timed_us(fn):
    return timed(fn, reps=25, inner=20) * 1e3


for s in (100, 300, 500, 700):
    ctx = [L[i] + s + 1 for i in range(n) if outs[i] > s]
    b = len(ctx)
    npages = [-(-c // P) for c in ctx]
    total = sum(npages)
    perm = torch.randperm(total).tolist()
    pages, at = [], 0
    for k in npages:
        pages.append(perm[at:at + k]); at += k
    k_cache = torch.randn(total, P, HKV, D, device=dev, dtype=dt)
    v_cache = torch.randn(total, P, HKV, D, device=dev, dtype=dt)
    q = torch.randn(b, HQ, D, device=dev, dtype=dt)
    gb = sum(ctx) * HKV * D * 2 * 2 / 1e9
    orders = {"W1 order": list(range(b)), "longest first": sorted(range(b), key=lambda i: -ctx[i]),
              "shortest first": sorted(range(b), key=lambda i: ctx[i])}
    rows = {}
    for name, order in orders.items():
        indptr = torch.tensor([0] + [sum(npages[i] for i in order[:j + 1]) for j in range(b)], dtype=torch.int32)
        indices = torch.tensor([p for i in order for p in pages[i]], dtype=torch.int32)
        last = torch.tensor([ctx[i] - (npages[i] - 1) * P for i in order], dtype=torch.int32)
        fi = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.zeros(128 << 20, dtype=torch.uint8, device=dev), "NHD", use_tensor_cores=True)
        fi.plan(indptr, indices, last, HQ, HKV, D, P, disable_split_kv=True, q_data_type=dt, kv_data_type=dt)
        fis = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.zeros(128 << 20, dtype=torch.uint8, device=dev), "NHD", use_tensor_cores=True)
        fis.plan(indptr, indices, last, HQ, HKV, D, P, disable_split_kv=False, q_data_type=dt, kv_data_type=dt)
        tr = TritonPagedDecode(HQ, HKV, D, P, torch.device(dev))
        tr.plan(indptr.to(dev), indices.to(dev), last.to(dev))
        rows[name] = (fi, fis, tr)
    res = {name: [[], [], []] for name in orders}
    for _ in range(3):   # interleaved rounds
        for name, (fi, fis, tr) in rows.items():
            res[name][0].append(timed_us(lambda: fi.run(q, (k_cache, v_cache))))
            res[name][1].append(timed_us(lambda: fis.run(q, (k_cache, v_cache))))
            res[name][2].append(timed_us(lambda: tr.run(q, (k_cache, v_cache))))
    print(f"\nstep {s}: {b} rows, contexts {min(ctx)}-{max(ctx)}, {gb:.3f} GB of KV")
    print("| order | FlashInfer tc, no split | FlashInfer tc, its splits | Triton |")
    print("|---|---|---|---|")
    for name in orders:
        cells = [sorted(x)[1] for x in res[name]]
        print(f"| {name} | " + " | ".join(f"{t:.1f} ({gb / t * 1e3:.2f} TB/s)" for t in cells) + " |", flush=True)
