"""Cascade attention math in plain PyTorch: the CPU path and the reference for the GPU kernels.

Conventions follow FlashInfer: paged KV cache [num_pages, page_size, num_kv_heads, head_dim] (NHD),
q [rows, num_qo_heads, head_dim], GQA (qo head h reads kv head h // (num_qo_heads // num_kv_heads)),
causal masks are bottom-right aligned (row i of a group with qo_len rows and kv_len keys sees keys
j <= kv_len - qo_len + i), and LSE is base 2: lse = log2(sum_j 2^(s_j)), s_j = q.k_j * sm_scale * log2(e).
"""
import math

import torch

from .planner import CascadePlan

LOG2E = math.log2(math.e)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _attend(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, causal, sm_scale):
    """paged_attention_with_lse without the final cast: out stays in the compute dtype."""
    dev, cdt = q.device, _compute_dtype(q)
    rows, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    qo_indptr, kv_indptr, kv_indices, last = (
        t.to(dev, torch.int64) for t in (qo_indptr, kv_indptr, kv_indices, kv_last_page_len))
    G = qo_indptr.numel() - 1
    q_len = qo_indptr[1:] - qo_indptr[:-1]
    n_pages = kv_indptr[1:] - kv_indptr[:-1]
    kv_len = torch.where(n_pages > 0, (n_pages - 1) * page_size + last, 0)
    max_q = int(q_len.max()) if G else 0
    max_kv = int(kv_len.max()) if G else 0
    out = torch.zeros(rows, hq, d, dtype=cdt, device=dev)
    lse = torch.full((rows, hq), -math.inf, dtype=cdt, device=dev)
    if rows == 0 or max_kv == 0:  # no keys anywhere: every row is an empty state
        return out, lse

    # Pad every group to [max_q] query rows and [max_kv] keys, then mask.
    qi = torch.arange(max_q, device=dev)
    q_valid = qi < q_len[:, None]                                          # [G, max_q]
    q_rows = torch.where(q_valid, qo_indptr[:-1, None] + qi, 0)
    qg = q[q_rows].to(cdt).view(G, max_q, hkv, hq // hkv, d)               # [G, max_q, hkv, grp, d]
    t = torch.arange(max_kv, device=dev)
    kv_valid = t < kv_len[:, None]                                         # [G, max_kv]
    # token t of group g sits in page kv_indices[kv_indptr[g] + t // page_size], slot t % page_size
    page_pos = torch.where(kv_valid, kv_indptr[:-1, None] + t // page_size, 0)
    slot = torch.where(kv_valid, kv_indices[page_pos] * page_size + t % page_size, 0)
    kg = k_cache.reshape(-1, hkv, d)[slot].to(cdt)                         # [G, max_kv, hkv, d]
    vg = v_cache.reshape(-1, hkv, d)[slot].to(cdt)

    s = torch.einsum("gqhmd,gkhd->ghmqk", qg, kg) * sm_scale             # [G, hkv, grp, max_q, max_kv]
    mask = kv_valid[:, None, :]                                            # [G, 1, max_kv]
    if causal:
        mask = mask & (t <= (kv_len - q_len)[:, None, None] + qi[:, None])  # [G, max_q, max_kv]
    s = s.masked_fill(~mask[:, None, None], -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)   # fully masked row: avoid (-inf) - (-inf) = NaN
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)               # 0 for a row that sees no keys
    o = torch.einsum("ghmqk,gkhd->gqhmd", p, vg) / l.clamp_min(torch.finfo(cdt).tiny).permute(0, 3, 1, 2, 4)
    lse_g = (m + torch.log(l)).squeeze(-1) * LOG2E                        # log(0) = -inf for empty rows
    out = o.reshape(G, max_q, hq, d)[q_valid]
    lse = lse_g.permute(0, 3, 1, 2).reshape(G, max_q, hq)[q_valid]
    return out, lse.float() if cdt == torch.float32 else lse


def paged_attention_with_lse(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                             causal: bool, sm_scale: float):
    """FlashInfer BatchPrefillWithPagedKVCache semantics. Returns (out in q's dtype [rows, heads, dim],
    lse base 2 [rows, heads], float32 or float64 for float64 inputs). A group with no keys gives
    out 0 and lse -inf. Computed in float32 (float64 for float64 inputs)."""
    out, lse = _attend(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, causal, sm_scale)
    return out.to(q.dtype), lse


def merge_state(v_a, s_a, v_b, s_b):
    """Merge two partial attention states (v [rows, heads, dim], base-2 lse s [rows, heads]) over
    disjoint key sets. Two empty states (s = -inf) merge to (0, -inf), never NaN."""
    cdt = _compute_dtype(v_a)
    s_a, s_b = s_a.to(cdt), s_b.to(cdt)
    m = torch.maximum(s_a, s_b)
    m = torch.where(torch.isinf(m), 0.0, m)
    w_a, w_b = torch.exp2(s_a - m), torch.exp2(s_b - m)
    w = w_a + w_b
    v = (v_a.to(cdt) * w_a[..., None] + v_b.to(cdt) * w_b[..., None]) / w.clamp_min(torch.finfo(cdt).tiny)[..., None]
    s = m + torch.log2(w)
    return v.to(v_a.dtype), s.float() if cdt == torch.float32 else s


def merge_state_in_place(v, s, v_other, s_other) -> None:
    """v, s <- merge_state(v, s, v_other, s_other)."""
    v_new, s_new = merge_state(v, s, v_other, s_other)
    v.copy_(v_new)
    s.copy_(s_new)


def cascade_attention(q, k_cache, v_cache, plan: CascadePlan, sm_scale: float | None = None) -> torch.Tensor:
    """q rows must already follow plan.order (q[plan.row_order]). Runs every level (only the last
    causal) and merges them in level order. Returns [rows, heads, dim] in q's dtype."""
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    out = lse = None
    for lv in plan.levels:
        o, s = _attend(q, k_cache, v_cache, lv.qo_indptr, lv.kv_indptr, lv.kv_indices,
                       lv.kv_last_page_len, lv.causal, sm_scale)
        out, lse = (o, s) if out is None else merge_state(out, lse, o, s)
    return out.to(q.dtype)


def dense_attention_reference(q, k_cache, v_cache, block_table, kv_lens, q_lens, sm_scale=None,
                              return_lse: bool = False):
    """Plain per-request causal attention in float64 straight from the block tables (no planner).
    q rows in request order (request 0's q_lens[0] rows first). Returns out float64 [rows, heads, dim]
    (and base-2 lse [rows, heads] if return_lse)."""
    rows, hq, d = q.shape
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    outs, lses, row = [], [], 0
    for r in range(len(kv_lens)):
        kvl, qll = int(kv_lens[r]), int(q_lens[r])
        pages = torch.as_tensor(block_table[r][: -(-kvl // page_size)], dtype=torch.long)
        k = k_cache[pages].reshape(-1, hkv, d)[:kvl].double().repeat_interleave(hq // hkv, 1)
        v = v_cache[pages].reshape(-1, hkv, d)[:kvl].double().repeat_interleave(hq // hkv, 1)
        qr = q[row: row + qll].double()
        s = torch.einsum("qhd,khd->hqk", qr, k) * sm_scale
        allowed = torch.arange(kvl)[None] <= torch.arange(qll)[:, None] + (kvl - qll)
        s = s.masked_fill(~allowed, -math.inf)
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v))
        lses.append((torch.logsumexp(s, -1) * LOG2E).T)
        row += qll
    out = torch.cat(outs) if outs else q.new_zeros(0, hq, d, dtype=torch.float64)
    return (out, torch.cat(lses)) if return_lse else out
