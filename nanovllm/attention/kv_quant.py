"""FP8 KV cache: the names `kv_cache_dtype` accepts, the per-tensor quantization rule, and the
checkpoint names that carry calibrated scales.

A page stores fp8 = clamp(x / scale, -448, 448) as float8_e4m3fn and reads back fp8 * scale, with
one k_scale and one v_scale per attention layer (1.0 unless the checkpoint carries calibrated
ones, vLLM / llm-compressor naming). One byte a value halves the page, so twice the pages fit.
The writers (attention/triton_kv.py's kernel, layers/qk_norm_rope.py's fused kernel, and the CPU
twin `quantize_fp8` below, used by attention/torch_backend.py) apply the rule; readers fold k_scale
into the softmax scale (q . k * s = s * (q . k)) and multiply the output by v_scale (attention is
linear in V, and so is the merge of cascade levels). The Triton writers and the shared-level kernel
use Triton's fp8e4nv, compiled only for GPUs of compute capability 8.9+ (Ada, Hopper and later):
config.py refuses an fp8 cache with FlashInfer on older ones. Measurements: claude_docs/memory.md,
"FP8 KV cache"."""
import re

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
KV_CACHE_DTYPES = {"auto": None, "fp8_e4m3": FP8_DTYPE, "fp8": FP8_DTYPE}  # None: the model dtype

# model.layers.N.self_attn.{k_scale, v_scale, kv_scale} (llm-compressor, vLLM), and the same under
# k_proj / v_proj (ModelOpt). kv_scale (older checkpoints) sets both.
_SCALE_NAME = re.compile(r"^(?P<attn>.*\.self_attn)\.(?:[kv]_proj\.)?(?P<which>k_scale|v_scale|kv_scale)$")


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensor's dtype for a `kv_cache_dtype` setting; ValueError for an unknown one."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype


def is_fp8(t: torch.Tensor | torch.dtype) -> bool:
    return (t if isinstance(t, torch.dtype) else t.dtype) == FP8_DTYPE


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """clamp(x / scale) to the fp8 range, rounded to nearest even (the CPU twin of the Triton store)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(cache: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values a page stands for: fp8 * scale (the identity for a cache in the model dtype)."""
    return cache.to(dtype) * scale if is_fp8(cache) else cache.to(dtype)


def kv_scale_name(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(attention module name, scales it sets) for a checkpoint KV-scale tensor, else None.
    'model.layers.3.self_attn.kv_scale' -> ('model.layers.3.self_attn.attn', ('k_scale', 'v_scale'))."""
    m = _SCALE_NAME.match(name)
    if m is None:
        return None
    which = m["which"]
    return m["attn"] + ".attn", ("k_scale", "v_scale") if which == "kv_scale" else (which,)


def checked_scale(name: str, tensor: torch.Tensor) -> float:
    """A per-tensor scale as a python float (fixed at load: CUDA graphs capture it as a kernel
    argument). Per-head or per-channel scales are refused, as are scales that are not finite and > 0."""
    if tensor.numel() != 1:
        raise ValueError(f"{name}: per-tensor KV scale expected, got shape {tuple(tensor.shape)}")
    value = float(tensor.float().item())
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name}: KV scale must be finite and > 0, got {value}")
    return value
