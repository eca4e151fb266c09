"""The Triton shared-level kernel (cascade decode with many small groups) against float64 attention
over each group's pages (CPU under TRITON_INTERPRET=1, and on CUDA)."""
import numpy as np
import pytest
import torch

from nanovllm.cascade.shared_kernel import choose_splits, max_items, shared_level_items
from triton_script import run_interpreted, run_on_gpu


def test_items_cover_every_row_once():
    qo = np.array([0, 3, 3, 40, 41, 58])       # groups of 3, 0, 37, 1, 17 rows
    kv = np.array([0, 2, 2, 2, 9, 12])         # ... with 2, 0, 0, 7, 3 pages
    items = shared_level_items(qo, kv, block_rows=16)
    covered = np.concatenate([np.arange(s, s + n) for s, n, _ in items])
    assert np.array_equal(np.sort(covered), np.arange(58))
    assert (items[:, 1] <= 16).all() and (items[:, 1] > 0).all()
    for s, n, g in items:
        assert qo[g] <= s and s + n <= qo[g + 1]
    assert len(items) <= max_items(58, 16)


def test_splits_fill_whole_waves():
    """The split counts the H200 sweep measured fastest (claude_docs/cascade.md; 264 programs at once):
    the wide tile at 4 x 32 x 16384 (W5), 8 x 32 x 4096, 2 x 48 x 8192 and 4 x 96 x 16384; groups that
    fill the GPU unsplit keep the old rule (W2's 64 x 16 x 2048 on the narrow tile: 1 split)."""
    big = 1 << 20
    assert choose_splits(4, 8, 16384, 128, big) == 8      # 256 units: one wave
    assert choose_splits(8, 8, 4096, 256, big) == 4
    assert choose_splits(4, 8, 8192, 96, big) == 8
    assert choose_splits(12, 8, 16384, 384, big) == 8     # 768 units: three waves
    assert choose_splits(64, 8, 2048, 1024, big) == 1
    assert choose_splits(4, 8, 16384, 128, 128 * 3) == 3  # the partial buffer caps it
    assert choose_splits(4, 8, 600, 128, big) == 2        # >= 256 tokens a split


SCRIPT = r"""
import math
import numpy as np
import torch
from nanovllm.cascade.shared_kernel import merge_partials, shared_level_attention, shared_level_items
device = "{device}"
torch.manual_seed(0)
rng = np.random.default_rng(0)

def reference(q, kc, vc, qo, kv, idx, scale):
    # float64 attention of each group's rows over its pages; lse in base 2
    hq, d = q.shape[1], q.shape[2]
    hkv = kc.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    for g in range(len(qo) - 1):
        pages = idx[kv[g]:kv[g + 1]]
        if qo[g + 1] == qo[g] or len(pages) == 0:
            continue
        k = kc[pages].reshape(-1, hkv, d).double().repeat_interleave(hq // hkv, 1)
        v = vc[pages].reshape(-1, hkv, d).double().repeat_interleave(hq // hkv, 1)
        qq = q[qo[g]:qo[g + 1]].double()
        s = torch.einsum("rhd,thd->rht", qq, k) * scale
        out[qo[g]:qo[g + 1]] = torch.einsum("rht,thd->rhd", torch.softmax(s, -1), v)
        lse[qo[g]:qo[g + 1]] = torch.logsumexp(s, -1) / math.log(2)
    return out, lse

def merge(o1, l1, o2, l2):
    # two attention states (base-2 lse) in float64
    m = torch.maximum(l1, l2).nan_to_num(neginf=0.0)
    w1, w2 = torch.exp2(l1 - m), torch.exp2(l2 - m)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None], m + torch.log2(w1 + w2)

for hq, hkv, d, page, rows_per_group, splits, programs, block_rows in (
        (4, 2, 32, 4, [3, 0, 20, 1, 5], 1, 2, 16), (16, 8, 128, 16, [16, 16, 2], 2, 5, 16), (6, 2, 64, 8, [7, 1], 3, 1, 16),
        (4, 2, 32, 4, [40, 3, 33], 2, 3, 32), (16, 8, 128, 16, [70, 5], 2, 4, 64)):  # the wide tiles
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        groups = len(rows_per_group)
        pages_per_group = rng.integers(0, 40, groups)
        pages_per_group[0] = 37
        pages_per_group[-1] = 0       # a group with no pages: its rows get lse -inf
        qo = np.concatenate([[0], np.cumsum(rows_per_group)])
        kv = np.concatenate([[0], np.cumsum(pages_per_group)])
        total_pages = int(kv[-1]) + 4
        idx = rng.permutation(total_pages)[:kv[-1]].astype(np.int32)  # scattered pages
        rows = int(qo[-1])
        q = torch.randn(rows, hq, d, dtype=dtype, device=device)
        kc = torch.randn(total_pages, page, hkv, d, dtype=dtype, device=device)
        vc = torch.randn(total_pages, page, hkv, d, dtype=dtype, device=device)
        items = shared_level_items(qo, kv, block_rows)
        meta = torch.tensor([len(items), splits], dtype=torch.int32, device=device)
        pad = np.full((3, 3), 7, np.int32)  # past the count (a CUDA graph's fixed buffer): never read
        items = torch.from_numpy(np.concatenate([items, pad])).to(device)
        part_out = torch.full((splits * rows + 2, hq, d), float("nan"), dtype=dtype, device=device)
        part_lse = torch.full((splits * rows + 2, hq), float("nan"), dtype=torch.float32, device=device)
        scale = d ** -0.5
        shared_level_attention(q, kc, vc, items, meta, torch.from_numpy(kv.astype(np.int32)).to(device),
                               torch.from_numpy(idx).to(device), part_out, part_lse, scale, programs,
                               block_tokens=32, block_rows=block_rows)
        assert not torch.isnan(part_out[:splits * rows]).any() and not torch.isnan(part_lse[:splits * rows]).any()
        assert torch.isnan(part_out[splits * rows:]).all(), "nothing written past the partials"
        ref_out, ref_lse = reference(q.cpu(), kc.cpu(), vc.cpu(), qo, kv, idx, scale)
        # Merged into a running state (as the per-request level's), against the same merge in float64.
        out0 = torch.randn(rows, hq, d, dtype=dtype, device=device)
        lse0 = torch.randn(rows, hq, dtype=torch.float32, device=device) * 3
        want_out, want_lse = merge(out0.double().cpu(), lse0.double().cpu(), ref_out, ref_lse)
        out, lse = out0.clone(), lse0.clone()
        merge_partials(out, lse, part_out, part_lse, meta)
        err = (out.double().cpu() - want_out).abs().max()
        assert err <= tol, (hq, dtype, splits, err)
        assert (lse.double().cpu() - want_lse).abs().max() <= tol * 10, (hq, dtype)

# An item's rows x GQA heads fill one 128-row tile: the wide tile narrows to 16 rows at GQA 8 (32 x 8
# would not fit), the 16-row tile to 8 rows at GQA 16 (Qwen3-235B's 64 / 4 heads).
from nanovllm.cascade.shared_kernel import TILES as _TILES, TritonSharedLevel as _Level
for tile_name, hq8, rows8 in (("triton-wide", 16, 16), ("triton", 32, 8)):
    wide = _Level(40, (torch.empty(4096, hq8, 32, device=device), torch.empty(4096, hq8, device=device)),
                  tile=_TILES[tile_name])
    wide.plan(*(torch.tensor(a, dtype=torch.int32) for a in ([0, 40], [0, 2], [0, 1], [16])), hq8, 2, 32, 16)
    assert wide.block_rows == rows8 and wide.items[:, 1].max() == rows8, wide.items
    q8 = torch.randn(40, hq8, 32, device=device)
    kc8, vc8 = (torch.randn(4, 16, 2, 32, device=device) for _ in range(2))
    wide.run(q8, (kc8, vc8))
    out8, lse8 = torch.zeros(40, hq8, 32, device=device), torch.full((40, hq8), float("-inf"), device=device)
    wide.merge_into(out8, lse8)
    ref8, _ = reference(q8.cpu(), kc8.cpu(), vc8.cpu(), np.array([0, 40]), np.array([0, 2]), np.array([0, 1]),
                        32 ** -0.5)
    assert (out8.double().cpu() - ref8).abs().max() <= 1e-5, tile_name

# TritonSharedLevel as FlashInferCascadeAttention drives it: plan() on host arrays (it picks the splits:
# several here, for 1,280 shared tokens and few items, capped at 4 by the 40-row partial buffer), run(),
# merge_into() the running state.
from nanovllm.cascade.shared_kernel import TILES, TritonSharedLevel
hq, hkv, d, page = 4, 2, 32, 16
for tile in TILES.values():
    qo = np.array([0, 3, 5, 9])
    kv = np.array([0, 80, 80, 84])                  # 80 pages, none, 4 pages
    idx = rng.permutation(100)[:84].astype(np.int32)
    last = np.where(np.diff(kv) > 0, page, 0).astype(np.int32)
    q = torch.randn(9, hq, d, device=device)
    kc, vc = (torch.randn(100, page, hkv, d, device=device) for _ in range(2))
    buffers = (torch.empty(40, hq, d, device=device), torch.empty(40, hq, device=device))
    level = TritonSharedLevel(9, buffers, tile=tile)
    level.plan(*(torch.from_numpy(a.astype(np.int32)) for a in (qo, kv, idx, last)), hq, hkv, d, page)
    assert level.splits == 4
    out0 = torch.randn(9, hq, d, device=device)
    lse0 = torch.randn(9, hq, device=device)
    out, lse = out0.clone(), lse0.clone()
    level.run(q, (kc, vc))
    level.merge_into(out, lse)
    ref_out, ref_lse = reference(q.cpu(), kc.cpu(), vc.cpu(), qo, kv, idx, d ** -0.5)
    want_out, want_lse = merge(out0.double().cpu(), lse0.double().cpu(), ref_out, ref_lse)
    assert (out.double().cpu() - want_out).abs().max() <= 1e-5
    assert (lse.double().cpu() - want_lse).abs().max() <= 1e-4
    try:
        level.plan(*(torch.from_numpy(a.astype(np.int32)) for a in (qo, kv, idx, last - 1)), hq, hkv, d, page)
        raise AssertionError("a partial page in a shared level must be refused")
    except ValueError:
        pass
print("ok")
"""


def test_shared_level_kernel_interpreted_on_cpu():
    run_interpreted(SCRIPT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_level_kernel_on_gpu():
    run_on_gpu(SCRIPT)
