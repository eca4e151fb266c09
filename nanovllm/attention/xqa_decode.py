"""Paged decode attention on FlashInfer's xqa kernel (TensorRT-LLM's decode kernel), for an fp8 KV cache.

Why: on sm90 with fp8 pages, xqa runs its Hopper kernel (TMA loads, fp8 tensor-core MMAs) and reads the
cache at ~3-3.8 TB/s of fp8 bytes, where FlashInfer's decode wrappers reach ~1.5-1.8 and the project's
Triton kernel (attention/triton_decode.py) ~2.0. One H200, one layer of Qwen3-0.6B shapes (16 q / 8 kv
heads, d 128, page 16, scattered pages, CUDA graphs; `python scripts/bench_kernels.py --only
decode-kernels --kv-dtype fp8`, session 15 call a), ms and TB/s of the cache's bytes:

| batch x context | FlashInfer decode (tc) | Triton decode | xqa |
|---|---|---|---|
| 256 x U(200, 1600) | 0.284 (1.72) | 0.239 (2.04) | 0.129 (3.79) |
| 256 x 600 | 0.204 (1.54) | 0.154 (2.05) | 0.098 (3.22) |
| 1024 x 256 | 0.397 (1.35) | 0.271 (1.98) | 0.163 (3.30) |
| 64 x 2048 | 0.128 (2.10) | 0.126 (2.13) | 0.088 (3.04) |
| 32 x U(100, 1500) | 0.053 (1.04) | 0.046 (1.19) | 0.028 (1.94) |

On a bf16 cache xqa runs its generic kernel, slower than FlashInfer's (0.290 vs 0.248 ms at 256 x U(200,
1600)): only fp8 caches use xqa (Config and supports() refuse the rest). The price: the Hopper kernel multiplies in fp8, queries and
probabilities rounded to e4m3 (max |difference| to FlashInfer's decode 1-3e-2 against Triton's 2e-3 on
random data): scripts/fp8_kv_agreement.py reports its greedy agreement with a float32 reference.
xqa returns no log-sum-exp, so cascade's per-request level (merged with the shared levels) stays on the
Triton kernel; this serves regular decode steps.

Layout: xqa reads a dense page table [batch, pages a sequence may hold] and each sequence's length. plan()
takes FlashInfer's page-list arrays (indptr, indices, last page length), queues their copies to the device
and builds the table and lengths there with one small Triton kernel (`_table_kernel`), so the host does no
per-request work and a CUDA graph captured for a batch size replays for any page lists: the table's width
is fixed (max_model_len's pages), and xqa's grid depends only on the batch and that width.
Ordering: with programmatic dependent launch on (the default), xqa's Hopper kernel reads the sequence
lengths (and from them the page table) before its griddepcontrol.wait, which guards only the queries and
the KV tiles (mha_sm90.cu, ENABLE_PDL == 2), so they must be written at least two kernels earlier. The
engine plans before the model's forward, whose embedding, norm, projection and KV-write kernels come
between; a caller that runs plan() right before run() passes pdl=False (the GPU test does).
Scales: scores are q.k * sm_scale * k_scale and the output is scaled by v_scale; xqa takes them as
q_scale * kv_scale / sqrt(d) and kv_scale, so kv_scale = v_scale and q_scale = sm_scale * sqrt(d) * k_scale
/ v_scale.

CPU: the table kernel is checked under TRITON_INTERPRET=1 (tests/test_xqa_decode.py); xqa itself only on a
GPU, against float64 attention on the dequantized pages (the same file, marked gpu)."""
import numpy as np
import torch
import triton
import triton.language as tl

from nanovllm.attention.backend import page_lists_on_device

SCRATCH_BYTES = 32 << 20     # xqa's partial results when it splits a sequence (small batches); ~3 MB used
SEMAPHORE_BYTES = 1 << 20    # one counter per (sequence, kv head) for those splits; xqa resets them itself
TABLE_BLOCK = 128            # page-table entries a program copies at a time


@triton.jit
def _table_kernel(indptr, indices, last, table, seq_lens, width, PAGE: tl.constexpr, BLOCK: tl.constexpr):
    """Row b of the dense page table <- indices[indptr[b]:indptr[b + 1]]; seq_lens[b] <- its token count."""
    b = tl.program_id(0)
    start = tl.load(indptr + b)
    n = tl.load(indptr + b + 1) - start
    for off in range(0, n, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        keep = cols < n
        tl.store(table + b.to(tl.int64) * width + cols, tl.load(indices + start + cols, mask=keep), mask=keep)
    tl.store(seq_lens + b, (n - 1) * PAGE + tl.load(last + b))


def page_table(indptr: torch.Tensor, indices: torch.Tensor, last: torch.Tensor, table: torch.Tensor,
               seq_lens: torch.Tensor, page_size: int):
    """Fill table [batch, width] (int32) and seq_lens [batch] (int32) from the page-list arrays, on their
    device; entries past a row's pages are left as they were (xqa reads only up to its length)."""
    batch = last.numel()
    if batch:
        _table_kernel[(batch,)](indptr, indices, last, table, seq_lens, table.stride(0), PAGE=page_size,
                                BLOCK=TABLE_BLOCK)


def supports(num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
             kv_dtype: torch.dtype = torch.float8_e4m3fn) -> str | None:
    """None when xqa serves this shape and cache dtype on this machine, else why not."""
    if kv_dtype != torch.float8_e4m3fn:
        return f"a {kv_dtype} cache (xqa serves fp8 caches here)"
    if num_qo_heads % num_kv_heads:
        return f"{num_qo_heads} query heads over {num_kv_heads} kv heads"
    if page_size not in (16, 32, 64, 128):
        return f"page_size {page_size} (xqa takes 16, 32, 64 or 128)"
    if head_dim not in (64, 128, 256):
        return f"head_dim {head_dim} (xqa's Hopper kernel here: 64, 128 or 256)"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10, 12):
        return "no sm90 / sm100 / sm120 GPU"
    try:
        from flashinfer.jit import env
    except ImportError:
        return "FlashInfer is not installed"
    if not (env.FLASHINFER_CSRC_DIR / "xqa" / "mha_sm90.cu").exists():
        return f"FlashInfer's xqa sources are missing from {env.FLASHINFER_CSRC_DIR} (a trimmed package)"
    return None


def load_module(q_dtype: torch.dtype, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int):
    """FlashInfer's xqa module for these shapes (JIT-built on first use, ~10 s; cached), so that a shape it
    cannot build fails at engine start, not in the first decode step. Measured: Qwen3-0.6B's (2 query heads a
    kv head, head_dim 128, page 16); other shapes build on first use."""
    from flashinfer.xqa import get_xqa_module
    return get_xqa_module(q_dtype, torch.float8_e4m3fn, page_size, head_dim, num_qo_heads // num_kv_heads, False,
                          q_dtype, 1)


def usable(q_dtype: torch.dtype, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
           kv_dtype: torch.dtype = torch.float8_e4m3fn) -> str | None:
    """None when xqa serves this shape here and its module builds and loads, else why not."""
    why = supports(num_qo_heads, num_kv_heads, head_dim, page_size, kv_dtype)
    if why:
        return why
    try:
        load_module(q_dtype, num_qo_heads, num_kv_heads, head_dim, page_size)
    except Exception as e:  # a build or load failure: the caller falls back or reports it
        return f"its module did not build or load ({type(e).__name__}: {str(e)[:300]})"
    return None


class XqaPagedDecode:
    """plan(kv_indptr, kv_indices, kv_last_page_len) once a step, then run(q, (k_cache, v_cache)) per layer,
    like TritonPagedDecode. With `buffers` (device indptr [bs + 1], indices, last [bs], table [bs, width],
    seq_lens [bs]) the plan goes into them (CUDA graphs); without, each plan allocates its own.
    `work` = (scratch, semaphores), shared by every instance of one backend (one decode runs at a time)."""

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, max_pages: int,
                 device: torch.device, work: tuple[torch.Tensor, torch.Tensor], buffers: tuple | None = None,
                 sm_scale: float | None = None, pdl: bool = True):
        why = supports(num_qo_heads, num_kv_heads, head_dim, page_size)
        if why:
            raise ValueError(f"xqa decode: {why}")
        self.hq, self.hkv, self.d, self.page = num_qo_heads, num_kv_heads, head_dim, page_size
        self.max_pages = max_pages
        self.sm_scale = sm_scale if sm_scale is not None else head_dim ** -0.5
        self.device = device
        self.scratch, self.semaphores = work
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        self.buffers = buffers
        self.batch = buffers[2].numel() if buffers is not None else 0
        self.table = self.seq_lens = None
        self.pdl = pdl

    @staticmethod
    def make_work(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(SCRATCH_BYTES, dtype=torch.uint8, device=device),
                torch.zeros(SEMAPHORE_BYTES // 4, dtype=torch.int32, device=device).view(torch.uint32))

    def plan(self, kv_indptr, kv_indices, kv_last_page_len):
        """One step's page lists (numpy, host or device); the copies and the table kernel are queued on the
        stream, never waited on."""
        if not (isinstance(kv_indptr, torch.Tensor) and kv_indptr.is_cuda) and len(kv_indptr) > 1:
            widest = int(np.diff(np.asarray(kv_indptr)).max())
            if widest > self.max_pages:
                raise ValueError(f"xqa decode: a sequence of {widest} pages on a table of {self.max_pages}")
        indptr, indices, last = page_lists_on_device(kv_indptr, kv_indices, kv_last_page_len, self.device,
                                                     self.buffers, "xqa decode")
        self.batch = last.numel()
        if self.buffers is None:
            table = torch.zeros(self.batch, self.max_pages, dtype=torch.int32, device=self.device)
            seq_lens = torch.empty(self.batch, dtype=torch.int32, device=self.device)
        else:
            table, seq_lens = self.buffers[3:]
        page_table(indptr, indices, last, table, seq_lens, self.page)
        self.table, self.seq_lens = table, seq_lens

    def run(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], k_scale: float | None = 1.0,
            v_scale: float | None = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """q [batch, qo_heads, D] contiguous over an fp8 cache -> [batch, qo_heads, D] in q's dtype (into `out`
        when given)."""
        if kv_cache[0].dtype != torch.float8_e4m3fn:
            raise ValueError(f"xqa decode: a {kv_cache[0].dtype} cache (fp8 only)")
        from flashinfer.xqa import xqa
        k_scale = 1.0 if k_scale is None else float(k_scale)
        v_scale = 1.0 if v_scale is None else float(v_scale)
        assert q.is_contiguous() and q.shape[0] == self.batch, "q [batch, qo_heads, D], contiguous"
        if out is None:
            out = torch.empty_like(q)
        xqa(q.unsqueeze(1), kv_cache[0], kv_cache[1], self.table, self.seq_lens.view(torch.uint32).unsqueeze(1),
            out.unsqueeze(1), self.scratch, self.semaphores, self.hkv, self.page,
            q_scale=self.sm_scale * self.d ** 0.5 * k_scale / v_scale, kv_scale=v_scale, sm_count=self.sm_count,
            enable_pdl=self.pdl)
        return out
