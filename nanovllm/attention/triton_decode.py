"""Paged decode attention in Triton: one query token a request over its pages, for an fp8 KV cache.

Why: FlashInfer 0.7.2's decode kernels on sm90 read an fp8 cache no faster than a bf16 one (one H200,
random Qwen3-0.6B, batch 256 x ~600 tokens: the tensor-core decode kernel 5.47 ms a step on fp8 pages
against 5.26 on bf16 ones, W1 21.4k tok/s against 24.2k; the CUDA-core kernel the same), its FA3 kernels
take fp8 KV only with fp8 queries. Decode is a read of the KV bytes, so an fp8 cache should halve attention's
time. Since session 15 regular fp8 decode runs on FlashInfer's xqa kernel where it builds (attention/xqa_decode.py,
~3.3 TB/s of fp8 pages against ~2.0 here); this kernel serves the rest and cascade's per-request level when asked
(it returns a log-sum-exp, xqa does not).

Layout: the cache is [pages, PAGE, kv_heads, D] (NHD) as the rest of the engine writes it; a request's
pages are kv_indices[kv_indptr[b]:kv_indptr[b + 1]], its last page holding kv_last_page_len[b] tokens
(FlashInfer's page-table format, so the same plan arrays serve both).

Work: one program per (request, kv head, split). It loads the request's query rows of that kv head's GQA
heads (padded to a 16-row tl.dot tile), streams its split of the tokens in BLOCK_T tiles (a tile's page
ids gathered from the page list) with an online softmax in base 2, and writes the output (one split) or
a float32 partial (output, lse) that `_merge_kernel` combines. fp8 pages convert to float16 for the dots
(exact: every e4m3 value is an fp16 value) with queries in float16 (clamped to fp16's range) and the
probabilities in float16; k_scale folds into the softmax scale and v_scale multiplies the output. The
grid depends only on the batch size and the split count, so a CUDA graph captured for a batch size
replays for any page lists (the plan arrays live in fixed device buffers).

Measured on one H200 (scripts/sweep_triton_decode.py: one layer, 16 q / 8 kv heads, d 128, scattered
pages, CUDA graphs; us and TB/s of the cache's bytes), FlashInfer tensor-core decode vs this kernel's
fastest tile (tokens / warps / stages); the default is 128 / 4 / 3:

| cache | batch x context | FlashInfer | fastest here | 128 tokens, 4 warps, 4 stages |
|---|---|---|---|---|
| fp8 | 256 x 600 | 193.3 (1.63) | 140.4 (2.24), 64 / 2 / 4 | 153.1 |
| fp8 | 1024 x 256 | 380.9 (1.41) | 243.0 (2.21), 64 / 2 / 3 | - |
| fp8 | 256 x U(200, 1600) | 279.8 (1.74) | 238.7 (2.04), 128 / 4 / 3 | 239.4 |
| fp8 | 32 x U(100, 1500) | 52.2 (1.05) | 44.3 (1.23), 128 / 4 / 3 | 44.8 |
| bf16 | 256 x 600 | 170.6 (3.69) | 163.3 (3.85), 64 / 4 / 2 | 166.6 |
| bf16 | 256 x U(200, 1600) | 244.1 (3.99) | 254.0 (3.84), 128 / 4 / 4 | 254.0 |

(The bf16 rows ran with fp16 dots; a bf16 cache now takes bf16 dots, not re-timed.)

So on fp8 pages it runs 1.2-1.6x FlashInfer, but at ~2.2e12 KV values a second whatever their width
(bf16: ~1.9e12), so per-value work rather than the bytes bounds it, and fp8 reads only ~2.2 of the
H200's ~4.3 TB/s. The kernel compiled for sm_90 (on the CPU, Triton's ptxas) shows where: a 128-token tile
takes 1,464 PTX instructions a thread, among them 128 `ld.shared.b8` (the V tile read from shared memory a
byte at a time for the P.V dot: sm_90 has no 8-bit transposed ldmatrix) and 128 `cvt.rn.f16x2.e4m3x2`.
`convert="bits"` (below) avoids the byte reads (V through `ldmatrix.trans` as 16-bit values) at 2,420
instructions a tile; which is faster is for the GPU to say (scripts/sweep_triton_decode.py tries both). W1 (one H200, random Qwen3-0.6B):
fp8 cache 24,690 tok/s against bf16's 24,147 in the same call; FlashInfer's fp8 decode 21,936 and this
kernel with 64-token tiles 23,470 in another. bf16 stays on FlashInfer (equal within 5% either way).

CPU: checked under TRITON_INTERPRET=1 against float64 attention on the dequantized pages
(tests/test_triton_decode.py); the same script passed on the H200, CUDA-graph replays included."""
import torch
import triton
import triton.language as tl

from nanovllm.attention.backend import page_lists_on_device

LOG2E = 1.4426950408889634
BLOCK_T = 128         # tokens a tile (with 4 warps, 3 stages: the sweep's best at W1's mixed lengths, below)
ROWS = 16             # query rows a program's tile holds (tl.dot's smallest M); GQA heads beyond it are refused
TARGET_PROGRAMS = 264 # programs wanted (2 per SM on an H200) before tokens are split
MAX_SPLITS = 16


def choose_splits(batch: int, kv_heads: int) -> int:
    """Splits of each request's tokens, a power of two: enough programs to fill the GPU at small batches."""
    splits = 1
    while batch * kv_heads * splits < TARGET_PROGRAMS and splits < MAX_SPLITS:
        splits *= 2
    return splits


@triton.jit
def _fp8_pairs_to_f16(x):
    """int16 words each holding two e4m3 bytes -> [..., 2] float16 of e4m3 * 2^-8, exactly (the sign moves to
    bit 15, exponent and mantissa shift into fp16's fields; e4m3's bias 7 against fp16's 15 leaves the 2^-8,
    subnormals included), the low byte first. Integer ops in the loaded layout, so the dots' operands move
    through shared memory as 16-bit values (`convert="bits"`)."""
    u = x.to(tl.uint16, bitcast=True)
    lo = ((u & 0x80) << 8) | ((u & 0x7F) << 7)
    hi = (u & 0x8000) | ((u >> 1) & 0x3F80)
    return tl.join(lo.to(tl.float16, bitcast=True), hi.to(tl.float16, bitcast=True))


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, kv_indptr_ptr, kv_indices_ptr, kv_last_ptr, out_ptr, part_ptr, lse_ptr,
                   lse_out_ptr, sm_scale_log2, v_scale, page_stride, token_stride, q_stride, q_head_stride, out_stride,
                   batch, HQ: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                   SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, M: tl.constexpr, DOT: tl.constexpr,
                   WRITE_LSE: tl.constexpr, BITS: tl.constexpr = False):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first_page = tl.load(kv_indptr_ptr + b)
    num_pages = tl.load(kv_indptr_ptr + b + 1) - first_page
    num_tokens = tl.where(num_pages > 0, (num_pages - 1) * PAGE + tl.load(kv_last_ptr + b), 0)
    per_split = tl.cdiv(tl.cdiv(num_tokens, SPLITS), BLOCK_T) * BLOCK_T
    t_lo = s * per_split
    t_hi = tl.minimum(num_tokens, t_lo + per_split)

    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BLOCK_T)
    offs_w = tl.arange(0, D // 2)   # int16 words of a row (BITS)
    row_ok = offs_m < GQA
    head = h * GQA + offs_m
    q = tl.load(q_ptr + b.to(tl.int64) * q_stride + head[:, None] * q_head_stride + offs_d[None, :], mask=row_ok[:, None],
                other=0.0).to(tl.float32)
    if DOT == 0:
        dot_dtype = tl.float32
    elif DOT == 1:
        dot_dtype = tl.float16
        q = tl.minimum(tl.maximum(q, -65504.0), 65504.0)
    else:
        dot_dtype = tl.bfloat16
    q = q.to(dot_dtype)
    m_i = tl.full((M,), float("-inf"), tl.float32)
    l_i = tl.zeros((M,), tl.float32)
    acc = tl.zeros((M, D), tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < t_hi
        page = tl.load(kv_indices_ptr + first_page + t // PAGE, mask=t_ok, other=0).to(tl.int64)
        if BITS:  # the caches viewed as int16 (strides in int16 words); values e4m3 * 2^-8, the 2^8 in the scales
            off = page * page_stride + (t % PAGE) * token_stride + h * (D // 2)
            k = tl.reshape(_fp8_pairs_to_f16(tl.load(k_ptr + off[:, None] + offs_w[None, :], mask=t_ok[:, None],
                                                     other=0)), (BLOCK_T, D))
        else:
            off = page * page_stride + (t % PAGE) * token_stride + h * D
            k = tl.load(k_ptr + off[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0).to(dot_dtype)
        if DOT == 0:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(t_ok[None, :], scores * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if BITS:
            v = tl.reshape(_fp8_pairs_to_f16(tl.load(v_ptr + off[:, None] + offs_w[None, :], mask=t_ok[:, None],
                                                     other=0)), (BLOCK_T, D))
        else:
            v = tl.load(v_ptr + off[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0).to(dot_dtype)
        if DOT == 0:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v).to(tl.float32)
        m_i = m_new
    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0) * v_scale
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))   # base 2, as FlashInfer's
    if SPLITS == 1:
        tl.store(out_ptr + b.to(tl.int64) * out_stride + head[:, None] * D + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_LSE:
            tl.store(lse_out_ptr + b.to(tl.int64) * HQ + head, lse, mask=row_ok)
    else:
        row = (s * batch + b).to(tl.int64) * HQ + head   # partial row of (split, request, head)
        tl.store(part_ptr + row[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None])
        tl.store(lse_ptr + row, lse, mask=row_ok)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, lse_out_ptr, out_stride, batch, HQ: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr, WRITE_LSE: tl.constexpr):
    b, head = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    rows = (offs_s * batch + b).to(tl.int64) * HQ + head
    lse = tl.load(lse_ptr + rows)
    top = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)
    parts = tl.load(part_ptr + rows[:, None] * D + offs_d[None, :])
    total = tl.sum(w, axis=0)
    o = tl.sum(parts * w[:, None], axis=0) / tl.maximum(total, 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * out_stride + head * D + offs_d, o.to(out_ptr.dtype.element_ty))
    if WRITE_LSE:
        tl.store(lse_out_ptr + b.to(tl.int64) * HQ + head, tl.where(total > 0, top + tl.log2(tl.maximum(total, 1e-30)),
                                                                    float("-inf")))


def supports(num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> str | None:
    """None when the kernel serves this shape, else why not."""
    if num_qo_heads % num_kv_heads or num_qo_heads // num_kv_heads > ROWS:
        return f"{num_qo_heads} query heads over {num_kv_heads} kv heads (at most {ROWS} a kv head)"
    if head_dim & (head_dim - 1) or page_size & (page_size - 1):
        return f"head_dim ({head_dim}) and page_size ({page_size}) must be powers of two"
    return None


class TritonPagedDecode:
    """plan(kv_indptr, kv_indices, kv_last_page_len) once a step, then run(q, (k_cache, v_cache)) per
    layer, like FlashInfer's decode wrapper. With `buffers` (device indptr [bs + 1], indices, last [bs])
    the plan arrays are copied into them and the grid is fixed at bs rows (CUDA graphs; padded rows read
    what their plan arrays say, as FlashInfer's padded rows do)."""

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, device: torch.device,
                 buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, sm_scale: float | None = None,
                 block_t: int = BLOCK_T, warps: int = 4, stages: int = 3, convert: str = "cast"):
        why = supports(num_qo_heads, num_kv_heads, head_dim, page_size)
        if why:
            raise ValueError(f"Triton decode: {why}")
        self.hq, self.hkv, self.d, self.page = num_qo_heads, num_kv_heads, head_dim, page_size
        self.sm_scale = sm_scale if sm_scale is not None else head_dim ** -0.5
        self.device = device
        if convert not in ("cast", "bits"):
            raise ValueError(f"Triton decode: convert must be cast or bits, got {convert!r}")
        self.block_t, self.warps, self.stages = block_t, warps, stages
        # An fp8 cache's values reach the dots by Triton's fp8 -> fp16 cast ("cast"), or by integer ops on
        # int16 pairs ("bits", _fp8_pairs_to_f16): compiled for sm_90, the cast reads the V tile from shared
        # memory a byte at a time (128 ld.shared.b8 a thread a 128-token tile: there is no 8-bit transposed
        # ldmatrix), "bits" moves 16-bit values. Not yet timed on a GPU: "cast" stays the default.
        self.convert = convert
        self.buffers = buffers
        self.batch = buffers[2].numel() if buffers is not None else 0
        self.arrays = None

    def plan(self, kv_indptr, kv_indices, kv_last_page_len):
        """One step's arrays (numpy, host or device tensors); host-to-device copies are queued from pinned
        memory, never waited on."""
        self.arrays = page_lists_on_device(kv_indptr, kv_indices, kv_last_page_len, self.device, self.buffers,
                                           "Triton decode")
        self.batch = self.arrays[2].numel()

    def run(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], k_scale: float | None = 1.0,
            v_scale: float | None = 1.0, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            return_lse: bool = False) -> torch.Tensor:
        """q [batch, qo_heads, D] -> [batch, qo_heads, D] in q's dtype (into `out` when given). With
        return_lse, also each row's base-2 log-sum-exp of its scaled scores [batch, qo_heads] float32
        (into `lse` when given), FlashInfer's convention, for merging with other levels: (out, lse)."""
        k_scale = 1.0 if k_scale is None else k_scale
        v_scale = 1.0 if v_scale is None else v_scale
        k_cache, v_cache = kv_cache
        assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride(2) == self.d, "rows of D contiguous"
        assert v_cache.stride() == k_cache.stride(), "k and v caches of one layout"
        batch = self.batch
        indptr, indices, last = self.arrays
        if out is None:
            out = torch.empty(batch, self.hq, self.d, dtype=q.dtype, device=q.device)
        if return_lse and lse is None:
            lse = torch.empty(batch, self.hq, dtype=torch.float32, device=q.device)
        assert out.shape[0] >= batch and out.stride(1) == self.d and out.stride(2) == 1, "out rows [qo_heads, D] contiguous"
        assert not return_lse or (lse.shape[0] >= batch and lse.stride(0) == self.hq and lse.stride(1) == 1)
        lse_out = lse if return_lse else out
        splits = choose_splits(batch, self.hkv)
        if splits > 1:
            part = torch.empty(splits * batch * self.hq, self.d, dtype=torch.float32, device=q.device)
            part_lse = torch.empty(splits * batch * self.hq, dtype=torch.float32, device=q.device)
        else:
            part = part_lse = out
        # The dots' dtype: float32 for float32 queries, bfloat16 over a bfloat16 cache, else float16 (an fp8
        # or float16 cache: every value exact, queries clamped to fp16's range).
        dot = 0 if q.dtype == torch.float32 else 2 if k_cache.dtype == torch.bfloat16 else 1
        bits = self.convert == "bits" and k_cache.dtype == torch.float8_e4m3fn and dot == 1
        if bits:   # int16 views; the values come out as e4m3 * 2^-8 (_fp8_pairs_to_f16), the scales take the 2^8
            k_cache, v_cache = k_cache.view(torch.int16), v_cache.view(torch.int16)
            k_scale, v_scale = k_scale * 256.0, v_scale * 256.0
        _decode_kernel[(batch, self.hkv, splits)](
            q, k_cache, v_cache, indptr, indices, last, out, part, part_lse, lse_out,
            float(self.sm_scale * k_scale * LOG2E), float(v_scale), k_cache.stride(0), k_cache.stride(1),
            q.stride(0), q.stride(1), out.stride(0), batch,
            HQ=self.hq, GQA=self.hq // self.hkv, D=self.d, PAGE=self.page, SPLITS=splits, BLOCK_T=self.block_t,
            M=ROWS, DOT=dot, WRITE_LSE=return_lse, BITS=bits, num_warps=self.warps, num_stages=self.stages)
        if splits > 1:
            _merge_kernel[(batch, self.hq)](part, part_lse, out, lse_out, out.stride(0), batch, HQ=self.hq, D=self.d,
                                            SPLITS=splits, WRITE_LSE=return_lse)
        return (out, lse) if return_lse else out
