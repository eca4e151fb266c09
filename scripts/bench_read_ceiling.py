"""How fast can the KV cache be read at all? Triton kernels that only sum what they read, TB/s: one contiguous
4 GiB stream; a copy; and W1's decode step 300 (188 requests, 0.67 GB of K and V pages a layer) read the way the
decode kernels read it (a program per request and kv head looping over its 16-token pages; NHD, several heads a
program, HND, pages in order, software-pipelined) and as balanced chunks (a program per 1-8 pages of one request
and kv head, all its loads issued at once: what a split-kv decode's work units would read).

    source .devkit/setup.sh && python scripts/bench_read_ceiling.py

Session 24 (one H200, performance.md): contiguous 4.63-4.67, copy 4.24; a request a program 3.80-3.95 whatever
the layout or order (the decode kernels' own 3.8-3.9); balanced chunks 4.13-4.26."""
import random
import torch
import triton
import triton.language as tl

from bench_kernels import timed   # median ms (scripts/ is on the path)


@triton.jit
def stream_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.float32)
    base = pid * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def paged_sum(k_ptr, v_ptr, indptr, indices, out_ptr, s_page, s_tok, HKV: tl.constexpr, D: tl.constexpr,
              P: tl.constexpr, PAGES_PER: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(indptr + b)
    end = tl.load(indptr + b + 1)
    t = tl.arange(0, P * PAGES_PER)
    d = tl.arange(0, D)
    acc = tl.zeros((P * PAGES_PER, D), tl.float32)
    for p0 in range(start, end, PAGES_PER):
        pi = p0 + t // P
        page = tl.load(indices + pi, mask=pi < end, other=0)
        off = page[:, None].to(tl.int64) * s_page + (t % P)[:, None] * s_tok + h * D + d[None, :]
        m = (pi < end)[:, None]
        acc += tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32) + tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * HKV + h, tl.sum(acc))


@triton.jit
def paged_sum_hg(k_ptr, v_ptr, indptr, indices, out_ptr, s_page, s_tok, HKV: tl.constexpr, D: tl.constexpr,
                 P: tl.constexpr, HG: tl.constexpr):
    """HG kv heads a program (NHD pages): each token's HG x 256 B contiguous."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    start = tl.load(indptr + b)
    end = tl.load(indptr + b + 1)
    t = tl.arange(0, P)
    c = tl.arange(0, HG * D)
    acc = tl.zeros((P, HG * D), tl.float32)
    for pi in range(start, end):
        page = tl.load(indices + pi).to(tl.int64)
        off = page * s_page + t[:, None] * s_tok + g * HG * D + c[None, :]
        acc += tl.load(k_ptr + off).to(tl.float32) + tl.load(v_ptr + off).to(tl.float32)
    tl.store(out_ptr + b * (HKV // HG) + g, tl.sum(acc))


@triton.jit
def paged_sum_hnd(k_ptr, v_ptr, indptr, indices, out_ptr, s_page, s_head, HKV: tl.constexpr, D: tl.constexpr,
                  P: tl.constexpr):
    """HND pages [page, head, P, D]: a head's page is P x D contiguous (4 KB)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(indptr + b)
    end = tl.load(indptr + b + 1)
    e = tl.arange(0, P * D)
    acc = tl.zeros((P * D,), tl.float32)
    for pi in range(start, end):
        page = tl.load(indices + pi).to(tl.int64)
        off = page * s_page + h * s_head + e
        acc += tl.load(k_ptr + off).to(tl.float32) + tl.load(v_ptr + off).to(tl.float32)
    tl.store(out_ptr + b * HKV + h, tl.sum(acc))


@triton.jit
def chunk_sum(k_ptr, v_ptr, cstart, cend, indices, out_ptr, s_page, s_tok, HKV: tl.constexpr, D: tl.constexpr,
              P: tl.constexpr, C: tl.constexpr):
    """A program per (chunk of <= C pages of one request, kv head), NHD: all its page loads issued at once."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(cstart + c)
    end = tl.load(cend + c)
    t = tl.arange(0, P * C)
    d = tl.arange(0, D)
    pi = start + t // P
    m = (pi < end)[:, None]
    page = tl.load(indices + pi, mask=pi < end, other=0).to(tl.int64)
    off = page[:, None] * s_page + (t % P)[:, None] * s_tok + h * D + d[None, :]
    acc = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32) + tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + c * HKV + h, tl.sum(acc))


def seconds(fn):
    return timed(fn, reps=20, inner=10) / 1e3


dev = "cuda"
n = 2 << 30   # 4 GiB of bf16
x = torch.randn(n, device=dev, dtype=torch.bfloat16)
y = torch.empty_like(x)
for block, iters, warps in ((1024, 8, 4), (2048, 8, 8), (4096, 4, 8), (8192, 2, 16)):
    grid = triton.cdiv(n, block * iters)
    out = torch.empty(grid, device=dev)
    t = seconds(lambda: stream_sum[(grid,)](x, out, n, BLOCK=block, ITERS=iters, num_warps=warps))
    print(f"contiguous read, Triton sum (block {block} x {iters}, {warps} warps): {2 * n / t / 1e12:.2f} TB/s")
t = seconds(lambda: y.copy_(x))
print(f"copy (read + write): {4 * n / t / 1e12:.2f} TB/s")
y = None   # the 4 GiB copy target, freed

random.seed(0)
nreq = 256
prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(nreq)]
outs = [random.randint(100, 1024) for _ in range(nreq)]
ctx = [len(prompts[i]) + 301 for i in range(nreq) if outs[i] > 300]
HKV, D, P = 8, 128, 16
npages = [-(-c // P) for c in ctx]
total = sum(npages)
perm = torch.randperm(total).tolist()
indices = torch.tensor(perm, dtype=torch.int32, device=dev)
indptr = torch.tensor([0] + list(torch.tensor(npages).cumsum(0).tolist()), dtype=torch.int32, device=dev)
k = torch.randn(total, P, HKV, D, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
gb = total * P * HKV * D * 2 * 2   # whole pages (what is read)
out = torch.empty(len(ctx) * HKV, device=dev)
for per, warps in ((1, 4), (2, 4), (4, 8), (8, 8)):
    t = seconds(lambda: paged_sum[(len(ctx), HKV)](k, v, indptr, indices, out, k.stride(0), k.stride(1), HKV=HKV, D=D,
                                                  P=P, PAGES_PER=per, num_warps=warps))
    print(f"paged read, W1 step 300 ({len(ctx)} rows, {gb / 1e9:.3f} GB), {per} pages a load, {warps} warps: "
          f"{gb / t / 1e12:.2f} TB/s ({t * 1e6:.1f} us)")

for hg, warps in ((2, 4), (4, 4), (8, 8), (8, 16)):
    o2 = torch.empty(len(ctx) * HKV // hg, device=dev)
    t = seconds(lambda: paged_sum_hg[(len(ctx), HKV // hg)](k, v, indptr, indices, o2, k.stride(0), k.stride(1), HKV=HKV,
                                                          D=D, P=P, HG=hg, num_warps=warps))
    print(f"paged read NHD, {hg} heads a program, {warps} warps: {gb / t / 1e12:.2f} TB/s ({t * 1e6:.1f} us)")
kh = k.permute(0, 2, 1, 3).contiguous()   # [page, head, P, D]
vh = v.permute(0, 2, 1, 3).contiguous()
for warps in (2, 4, 8):
    t = seconds(lambda: paged_sum_hnd[(len(ctx), HKV)](kh, vh, indptr, indices, out, kh.stride(0), kh.stride(1), HKV=HKV,
                                                     D=D, P=P, num_warps=warps))
    print(f"paged read HND, a head a program, {warps} warps: {gb / t / 1e12:.2f} TB/s ({t * 1e6:.1f} us)")
# the same pages in increasing order (runs), NHD a head a program
inc = torch.arange(total, dtype=torch.int32, device=dev)
t = seconds(lambda: paged_sum[(len(ctx), HKV)](k, v, indptr, inc, out, k.stride(0), k.stride(1), HKV=HKV, D=D, P=P,
                                              PAGES_PER=1, num_warps=4))
print(f"paged read NHD, pages in order (runs), a head a program: {gb / t / 1e12:.2f} TB/s ({t * 1e6:.1f} us)")

for stages in (2, 4, 6):
    t = seconds(lambda: paged_sum[(len(ctx), HKV)](k, v, indptr, indices, out, k.stride(0), k.stride(1), HKV=HKV, D=D,
                                                  P=P, PAGES_PER=1, num_warps=4, num_stages=stages))
    print(f"paged read NHD, a head a program, {stages} stages: {gb / t / 1e12:.2f} TB/s ({t * 1e6:.1f} us)")
ip = indptr.tolist()
for C in (1, 2, 4, 8):
    starts, ends = [], []
    for b in range(len(ctx)):
        for a in range(ip[b], ip[b + 1], C):
            starts.append(a); ends.append(min(a + C, ip[b + 1]))
    cs = torch.tensor(starts, dtype=torch.int32, device=dev); ce = torch.tensor(ends, dtype=torch.int32, device=dev)
    oc = torch.empty(len(starts) * HKV, device=dev)
    for warps in (2, 4):
        t = seconds(lambda: chunk_sum[(len(starts), HKV)](k, v, cs, ce, indices, oc, k.stride(0), k.stride(1), HKV=HKV,
                                                         D=D, P=P, C=C, num_warps=warps))
        print(f"paged read NHD, chunks of {C} pages ({len(starts) * HKV} programs), {warps} warps: "
              f"{gb / t / 1e12:.2f} TB/s ({t * 1e6:.1f} us)")
