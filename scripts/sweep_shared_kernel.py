"""Tile sweep of the Triton shared-level kernel (nanovllm/cascade/shared_kernel.py) over shared-level
shapes, on the GPU machine, one layer, Qwen3-0.6B heads (16 q, 8 kv, d 128), bf16, CUDA graphs, with
the engine's fixed grid (256 programs per kv head) and the partial merge:

    python scripts/sweep_shared_kernel.py [--shapes 4x32x16384,64x16x2048] [--grid] [--top 3] [--prefill]

For each shape (groups x query rows per group x shared tokens) times the engine's tiles
(shared_kernel.TILES), two 64-row tiles, and FlashInfer's fa3/fa2 without split-kv (as the engine's
graphs run them) and fa3 with each group cut into 2-16 pieces (split_level_layout); with --grid also every tile shape (rows per work item, tokens per tile, warps,
stages, splits = choose_splits x 1/2/4; --tile-splits: the engine's tiles at given split counts). Prints each kernel's time, the bytes' rate (each group's K
and V read once) and error against float32 attention, and as a last line JSON of the fastest per
shape (claude_docs/cascade.md records the table; cost_model.shared_level_backend follows it).
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import DT, HKV, HQ, WS, D, cache, graphed, paged  # noqa: E402
import flashinfer  # noqa: E402

from nanovllm.cascade.shared_kernel import (TILES, SharedTile, choose_splits, merge_partials,  # noqa: E402
                                            shared_level_attention, shared_level_items)
from nanovllm.cascade.split_level import split_level_layout  # noqa: E402

PAGE = 16
# groups x query rows per group x shared tokens, over the range the engine meets (rows per group 1-1024,
# shared 16-64k tokens, groups 1-256): W2, W3, W5 and the corners between them.
SHAPES = [(4, 32, 16384), (64, 16, 2048), (1, 1024, 8192), (1, 16, 16384), (1, 128, 32768), (16, 64, 2048),
          (8, 32, 4096), (32, 4, 8192), (256, 4, 1024), (1, 4, 65536), (2, 48, 8192), (8, 128, 4096), (1, 256, 8192),
          (128, 2, 512), (16, 24, 1024), (4, 96, 16384), (64, 2, 16), (1, 64, 2048)]
# Prefill of many short questions over a long prefix (a shared level's rows are every question token):
# W5's 32 questions of 64 tokens a document, W2's 16 x 128, W3's 1,024 x 128 in chunks, a few small ones.
PREFILL_SHAPES = [(4, 32 * 64, 16384), (64, 16 * 128, 2048), (1, 64 * 128, 8192), (1, 4 * 64, 16384),
                  (8, 8 * 32, 4096), (16, 4 * 16, 1024)]


def reference(q, kc, vc, groups, rows, length, max_scores=2**31):
    """float32 attention of each group's rows over its tokens, or None when the score matrix would pass
    max_scores elements (prefill shapes: thousands of rows over long prefixes)."""
    if groups * rows * HQ * length > max_scores:
        return None
    k = kc.view(-1, HKV, D)[:groups * length].view(groups, length, HKV, D).float()
    v = vc.view(-1, HKV, D)[:groups * length].view(groups, length, HKV, D).float()
    qf = q.float().view(groups, rows, HKV, HQ // HKV, D)
    s = torch.einsum("grhkd,gthd->grhkt", qf, k) * D ** -0.5
    return torch.einsum("grhkt,gthd->grhkd", s.softmax(-1), v).reshape(groups * rows, HQ, D)


def max_error(out, ref) -> float:
    return float("nan") if ref is None else (out.float() - ref).abs().max().item()


def flashinfer_level(q, kc, vc, qo, ind, idx, out, lse, backend):
    """The level on FlashInfer's prefill kernel without split-kv, merged into out (as the engine's graphs)."""
    last = torch.full((len(ind) - 1,), PAGE, dtype=torch.int32)
    lo, ll = torch.empty_like(out), torch.empty_like(lse)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        WS, "NHD", use_cuda_graph=True, qo_indptr_buf=qo.cuda(), paged_kv_indptr_buf=ind.cuda(),
        paged_kv_indices_buf=idx.cuda(), paged_kv_last_page_len_buf=last.cuda(), backend=backend)
    w.plan(qo, ind, idx, last, HQ, HKV, D, PAGE, causal=False, disable_split_kv=True, q_data_type=DT, kv_data_type=DT)

    def fn():
        w.run(q, (kc, vc), out=lo, lse=ll, return_lse=True)
        flashinfer.merge_state_in_place(out, lse, lo, ll)
    return fn


def flashinfer_split_level(q, kc, vc, qo, ind, idx, out, lse, backend, splits):
    """The level on FlashInfer's prefill kernel cut into `splits` pieces a group by the layout
    (split_level.split_level_layout): the query rows copied `splits` times, each piece's partial written
    at row split * R + row, merged by the Triton level's merge kernel."""
    qo_s, ind_s, idx_s, last_s = (torch.from_numpy(a) for a in split_level_layout(qo.numpy(), ind.numpy(),
                                                                                   idx.numpy(), splits, PAGE))
    rows = len(q)
    q_s = torch.empty(splits * rows, HQ, D, device="cuda", dtype=DT)
    po, pl = torch.empty_like(q_s), torch.empty(splits * rows, HQ, device="cuda", dtype=torch.float32)
    meta = torch.tensor([0, splits], dtype=torch.int32, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        WS, "NHD", use_cuda_graph=True, qo_indptr_buf=qo_s.cuda(), paged_kv_indptr_buf=ind_s.cuda(),
        paged_kv_indices_buf=idx_s.cuda(), paged_kv_last_page_len_buf=last_s.cuda(), backend=backend)
    w.plan(qo_s, ind_s, idx_s, last_s, HQ, HKV, D, PAGE, causal=False, disable_split_kv=True, q_data_type=DT,
           kv_data_type=DT)

    def fn():
        q_s.view(splits, rows, HQ, D).copy_(q.unsqueeze(0).expand(splits, -1, -1, -1))
        w.run(q_s, (kc, vc), out=po, lse=pl, return_lse=True)
        merge_partials(out, lse, po, pl, meta)
    return fn


def run_shape(groups, rows, length, configs):
    torch.manual_seed(0)
    ind, idx, _ = paged([length] * groups, PAGE)
    kc, vc = cache(int(ind[-1]) + 8, PAGE)
    qo = torch.arange(0, groups * rows + 1, rows, dtype=torch.int32)
    q = torch.randn(groups * rows, HQ, D, device="cuda", dtype=DT)
    out = torch.zeros(groups * rows, HQ, D, device="cuda", dtype=DT)
    lse = torch.full((groups * rows, HQ), float("-inf"), device="cuda", dtype=torch.float32)
    ind_d, idx_d = ind.cuda(), idx.cuda()
    gb = groups * length * HKV * D * 2 * 2 / 1e9
    # float32 dense reference for the level's output
    ref = reference(q, kc, vc, groups, rows, length)
    results = []
    for cfg in configs:
        if isinstance(cfg, str):  # a FlashInfer backend, "fa3-x8": cut into 8 pieces a group
            backend, _, x = cfg.partition("-x")
            fn = (flashinfer_split_level(q, kc, vc, qo, ind, idx, out, lse, backend, int(x)) if x
                  else flashinfer_level(q, kc, vc, qo, ind, idx, out, lse, backend))
            ms = graphed(fn)
            out.zero_(); lse.fill_(float("-inf"))
            fn()
            results.append(dict(ms=ms, name=cfg, tb_s=gb / ms, err=max_error(out, ref)))
            continue
        name = next((n for n, t in TILES.items() if t == SharedTile(*cfg[:4]) and cfg[4] == 1), "")
        block_rows, block_tokens, warps, stages, split_x = cfg
        if block_rows * HQ // HKV > 128:
            continue
        items = torch.from_numpy(shared_level_items(qo.numpy(), ind.numpy(), block_rows)).cuda()
        base = choose_splits(len(items), HKV, length, groups * rows, 1 << 20)
        splits = -split_x if split_x < 0 else max(1, min(32, base * split_x))  # < 0: that many splits
        meta = torch.tensor([len(items), splits], dtype=torch.int32, device="cuda")
        po = torch.empty(splits * len(q), HQ, D, device="cuda", dtype=DT)
        pl = torch.empty(splits * len(q), HQ, device="cuda", dtype=torch.float32)

        launched = []

        def fn():
            launched.append(shared_level_attention(q, kc, vc, items, meta, ind_d, idx_d, po, pl, D ** -0.5, 256,
                                                   block_tokens, warps, stages, block_rows))
            merge_partials(out, lse, po, pl, meta)
        try:
            ms = graphed(fn)
        except Exception as e:  # too much shared memory for the tile, etc.
            print(f"  {block_rows, block_tokens, warps, stages, split_x}: {type(e).__name__} {str(e)[:60]}")
            continue
        out.zero_(); lse.fill_(float("-inf"))
        fn()
        err = max_error(out, ref)
        if name and groups == 4 and rows == 32:  # once: what bounds the tiles' programs per SM (PROGRAMS_PER_SM)
            k = launched[0]
            print(f"  {name}: {getattr(k, 'n_regs', '?')} registers a thread, "
                  f"{getattr(getattr(k, 'metadata', None), 'shared', '?')} bytes of shared memory a program")
        results.append(dict(ms=ms, name=name, block_rows=block_rows, block_tokens=block_tokens, warps=warps, stages=stages,
                            splits=splits, split_x=split_x, tb_s=gb / ms, err=err))
    return results


def describe(r):
    if "block_rows" not in r:
        return r["name"]
    return (f"{r['name'] + ': ' if r['name'] else ''}{r['block_rows']}, {r['block_tokens']}, {r['warps']}, "
            f"{r['stages']}, {r['splits']}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="")
    p.add_argument("--grid", action="store_true", help="every tile shape, not just the engine's and FlashInfer")
    p.add_argument("--prefill", action="store_true", help="prefill shapes: many question tokens over a long prefix")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--tile-splits", default="", help="the engine's tiles also at these split counts (e.g. 8,16)")
    p.add_argument("--fa3-splits", default="2,4,8,16", help="fa3 with each group cut into this many pieces")
    args = p.parse_args()
    shapes = ([tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else PREFILL_SHAPES if args.prefill else SHAPES)
    named = [tuple(vars(t).values()) + (1,) for t in TILES.values()] + [(64, 64, 4, 2, 2), (64, 128, 8, 3, 1), "fa3", "fa2"] + [
        f"fa3-x{s}" for s in args.fa3_splits.split(",") if s]
    named += [tuple(vars(t).values())[:4] + (-int(x),) for t in TILES.values() for x in args.tile_splits.split(",") if x]
    configs = named + (list(itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (2, 3, 4), (1, 2, 4)))
                       if args.grid else [])
    best = {}
    print("| groups x rows x shared | kernel (rows/item, tokens/tile, warps, stages, splits) | ms | TB/s | max err |\n"
          "|---|---|---|---|---|")
    for shape in shapes:
        res = run_shape(*shape, configs)
        ranked = sorted(res, key=lambda r: r["ms"])
        shown = [r for r in res if r["name"] or r.get("split_x", 0) < 0 or "block_rows" in r and (r["block_rows"], r["block_tokens"]) in
                 ((64, 64), (64, 128)) and not args.grid] + ranked[:args.top]
        seen = set()
        for r in shown:
            if describe(r) in seen:
                continue
            seen.add(describe(r))
            tag = " (best)" if r is ranked[0] else ""
            print(f"| {'x'.join(map(str, shape))}{tag} | {describe(r)} | {r['ms']:.4f} | {r['tb_s']:.2f} | {r['err']:.2g} |")
        best["x".join(map(str, shape))] = {k: v for k, v in ranked[0].items()}
    print(json.dumps(best))


if __name__ == "__main__":
    main()
