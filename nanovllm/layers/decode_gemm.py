"""y = x W^T (+ b) for the dense layers: FlashInfer's tinygemm2 (below) for a decode step's few rows
where it beats cuBLAS, F.linear everywhere else (prefill, large batches, CPU, other dtypes: the reference path).

tinygemm2 (TensorRT-LLM's small-M kernel) gives each SM one block of 16 output features x 8 rows; its
weight warps issue TMA loads of the weights *before* the programmatic-dependent-launch wait, and only the
activation loads wait for the kernel before it, so under CUDA graphs most of a GEMM's weight read hides
behind the previous kernel. cuBLAS cannot launch that way, and on these small matrices it picks kernels that
leave most SMs idle (o_proj at one row: 12.8 us for 4 MB).

Measured on one H200 (session 16 call a, `python scripts/bench_decode_gemm.py`, Qwen3-0.6B shapes, one graph
of 28 distinct weights a shape, us per GEMM, cuBLAS / tinygemm2 with PDL):

| rows | qkv 4096 x 1024 | o 1024 x 2048 | gate_up 6144 x 1024 | down 1024 x 3072 | lm_head 151936 x 1024 |
|---|---|---|---|---|---|
| 1 | 5.1 / 4.8 | 12.8 / 2.5 | 6.2 / 7.0 | 6.9 / 3.1 | 82 / 150 |
| 8 | 5.4 / 4.7 | 6.0 / 2.6 | 6.3 / 6.8 | 6.9 / 3.1 | 85 / 154 |
| 16 | 5.4 / 8.3 | 6.0 / 3.4 | 6.2 / 12.4 | 7.1 / 4.2 | 84 / 295 |
| 32 | 5.4 / 15.5 | 6.1 / 5.9 | 6.4 / 22.5 | 7.1 / 7.4 | 86 / 584 |

Its grid is ceil(N/16) x ceil(rows/8) blocks of one per SM: the rule takes it for rows <= 16 (`TINY_MAX_ROWS`)
when that grid fits in about two waves (`TINY_MAX_WAVES`). Every shape it takes measured faster, here and at
Qwen3-8B's shapes (TP 1 and 2, call d); it leaves a few marginal wins to cuBLAS (o at 32 rows 5.9 vs 6.1 us;
8B TP=1 at 8 rows gate_up 50.6 vs 54.6, lm_head 292 vs 305). A step without attention (norms, activation, tinygemm2
for every layer's GEMMs, LM head on cuBLAS) at 1-8 rows: 0.78 ms against cuBLAS's 0.86-1.03 ms; in the
engine (profile_step, batch 1 x 600 tokens) 0.62 ms of GEMMs a step against 0.90. Measured on H200 only:
other GPUs keep cuBLAS (sm90 only).

On by default (NANOVLLM_DECODE_GEMM=cublas turns it off). Session 16 left it opt-in: with it on, two
greedy GPU tests on tiny random-weight models failed (tests/test_llama.py llama3-tiny, 4 of 8 outputs
identical to the reference, 6 required; tests/test_gpu_host_tier.py, 6 and 8 of 64 requests differing with the
host tier, 2 allowed) and passed with it off. tinygemm2's products have cuBLAS's maximum error against float32
at every shape tried (K 256-3072, N 256-1536, 1-16 rows). Session 17 settled it as rounding (calls h, i, k on
one H200): each switch's runs are identical run to run; on the llama test's model with it on, every greedy
path equals cuBLAS's, and the logits differ by at most 0.0078 (one bf16 ulp at these logits) at every step;
the llama test's failure came from its reference, which runs on CUDA in bf16 and so takes tinygemm2 as well
(the two sides' paths moved together to different near-ties). tests/test_decode_gemm.py checks the engine's
logits with both small-batch switches on against both off; the three tests with identical-output floors run
pinned to cuBLAS and FlashInfer's decode (the kernels their floors were measured on)."""
import functools
import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TINY_MAX_ROWS = 16
TINY_MAX_WAVES = 2
CHOICES = ("cublas", "tinygemm")


def gemm_choice() -> str:
    """NANOVLLM_DECODE_GEMM, validated (read once, at import: CHOICE)."""
    choice = os.environ.get("NANOVLLM_DECODE_GEMM", "tinygemm")
    if choice not in CHOICES:
        raise ValueError(f"NANOVLLM_DECODE_GEMM={choice!r}: choose one of {', '.join(CHOICES)}")
    return choice


CHOICE = gemm_choice()


def tiny_fits(rows: int, out_features: int, in_features: int, sms: int) -> bool:
    """The measured rule: few rows, and a grid of at most TINY_MAX_WAVES blocks per SM."""
    if rows < 1 or rows > TINY_MAX_ROWS or out_features % 16 or in_features % 8:
        return False
    blocks = -(-out_features // 16) * -(-rows // 8)
    return blocks <= TINY_MAX_WAVES * sms


@functools.cache
def _device_sms(index: int) -> int | None:
    """SM count of a Hopper (sm90) GPU, None for any other: the rule above was measured on H200 only."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count if props.major == 9 else None


@functools.cache
def _tinygemm2():
    """FlashInfer's tinygemm2 module (built on first use), or None with the reason logged."""
    try:
        from flashinfer.gemm.routergemm import get_tinygemm2_module
        return get_tinygemm2_module()
    except Exception as e:  # no FlashInfer, or its build failed: cuBLAS serves every GEMM
        logger.warning("tinygemm2 unavailable, decode GEMMs stay on cuBLAS: %s: %s", type(e).__name__, e)
        return None


def _use_tiny(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if CHOICE != "tinygemm" or x.dim() != 2 or x.shape[0] > TINY_MAX_ROWS:   # prefill and large batches: no more checks
        return False
    if not (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and x.shape[1] == weight.shape[1] and x.device == weight.device):
        return False  # anything F.linear would refuse stays with F.linear, which says why
    if not (x.is_contiguous() and weight.is_contiguous() and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0):
        return False  # TMA reads whole 16-byte-aligned rows
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()
                             or bias.shape != (weight.shape[0],) or bias.device != x.device):
        return False
    sms = _device_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if sms is None or not tiny_fits(x.shape[0], weight.shape[0], weight.shape[1], sms):
        return False
    return _tinygemm2() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), on tinygemm2 (launched with PDL) where the rule above picks it."""
    if not _use_tiny(x, weight, bias):
        return F.linear(x, weight, bias)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    if bias is None:
        _tinygemm2().tinygemm2_nobias_op(x, weight, out, True)
    else:
        _tinygemm2().tinygemm2_op(x, weight, bias, out, True)
    return out
