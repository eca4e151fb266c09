"""An optional W4A16 backend on gemlite (PyPI `gemlite`, Mobius Labs' Triton kernels): AWQ weights
(layers/awq_format.py) repacked once per layer into a gemlite layer, used for decode rows (M <= MAX_M)
when NANOVLLM_AWQ_KERNEL=gemlite (layers/awq_gemm.kernel_choice).

gemlite is optional and GPU-only: not a dependency of the project (its wheel needs triton >= 3.6 and
pulls numpy/tqdm, no torch) and imported only here, on first use on CUDA, because its import touches
CUDA (it reads the device's SM count and its name, to load a shipped autotune cache: h100, a100, ...;
none for the H200).

What it is given (read from gemlite 0.6.0's GemLiteLinearTriton.pack, core.py): codes uint8 [N, K]
(nn.Linear's [out, in]; gemlite packs 8 of them per int32 along K itself), scales and zeros [N, K/G] in
the activation dtype, fma_mode=False, so its kernels compute W = (W_q - zeros) * scales ("W_group_mode
3"), AWQ's own formula; fma_mode=True would store -zeros * scales in 16 bits and round it. The only
rounding is the fp16 -> bf16 cast of the scales for bf16 activations (the codes and zeros are small
integers, exact in either). `gemlite_operands` builds these on any device (tests/test_awq.py checks them
on the CPU against awq_format.dequantize); `GemliteAWQ` hands them to gemlite on CUDA.

How gemlite picks a kernel (core.get_matmul_type, 4-bit weights): M <= 4 rows GEMV_REVSPLITK (one row
per program, K split in two halves, atomic adds into a zeroed output), 5..63 GEMM_SPLITK (tl.dot on
16-row tiles, K split), 64+ GEMM. Each is a triton.autotune kernel keyed on (M, N, K, group, ...): the
first call at a new M benchmarks its candidate configs (its "fast" list) unless its config cache
(gemlite.load_config; NANOVLLM_GEMLITE_CONFIG here, scripts/sweep_awq_gemm.py --gemlite-config writes
one) holds that shape at the nearest power-of-two M, in which case it launches that config without
benchmarking. Benchmarking inside CUDA graph capture would break the capture, so a layer refuses to be
captured at an M it has not run eagerly (the engine's capture runs every batch size eagerly first).

Why only one row (MAX_M): measured on the H200 (scripts/sweep_awq_gemm.py --ms 1 4 16, Qwen3-8B shapes,
group 128, CUDA graphs), gemlite's GEMV at M = 1 is 1.26-1.38x bf16 cuBLAS (qkv 12.9 us vs 16.2, o 9.5
vs 12.6, gate_up 35.8 vs 49.6) and 1.33-1.52x our skinny kernel, but its M = 4 kernel is 0.38-0.52x
bf16 and M = 16 0.63-0.79x, behind our skinny kernel (0.80-0.93x). Decode of qwen3-8b (dummy AWQ
weights, scripts/bench_awq.py --skip-gemm --batches 1 16): batch 1 bf16 196.6 tok/s, our kernels
183.9, gemlite 247.0 (1.26x bf16); batch 16 (gemlite then served up to 16 rows) 3058 / 2664 / 2243.
Prefill brings a new M on almost every step, and each would be autotuned besides.

The cost: gemlite keeps its own copy of the int4 weights (the AWQ tensors stay for M > 1), so an AWQ
model's weights take twice their size on the GPU while gemlite is in use. Since session 10 the default
kernel (layers/awq_kpack.py) is as fast at one row (1.38-1.59x bf16) and faster at 2..16, without a
second copy: gemlite runs only when NANOVLLM_AWQ_KERNEL=gemlite asks for it."""
import os

import torch

from nanovllm.layers.awq_format import unpack

MAX_M = 1             # rows served by gemlite; more go to awq_gemm.awq_matmul (measured above)
DTYPES = (torch.float16, torch.bfloat16)


def gemlite_operands(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ tensors -> (codes uint8 [N, K], scales [N, K/G], zeros [N, K/G]) in `dtype`, such that
    W[n, k] = (codes[n, k] - zeros[n, k // G]) * scales[n, k // G] is AWQ's W^T transposed."""
    if dtype not in DTYPES:
        raise ValueError(f"gemlite runs float16 or bfloat16 activations, got {dtype}")
    K, N = qweight.shape[0], scales.shape[1]
    if K % group_size or qzeros.shape[0] != K // group_size or scales.shape[0] != K // group_size:
        raise ValueError(f"AWQ tensors qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                         f"{tuple(scales.shape)} do not match group size {group_size}")
    codes = unpack(qweight).t().contiguous().to(torch.uint8)
    zeros = unpack(qzeros).t().contiguous().to(dtype)
    return codes, scales.t().contiguous().to(dtype), zeros


_gemlite = None


def _import_gemlite():
    """gemlite, imported once; loads NANOVLLM_GEMLITE_CONFIG (a gemlite config cache) when set."""
    global _gemlite
    if _gemlite is None:
        try:
            import gemlite
        except ImportError as e:
            raise ImportError("NANOVLLM_AWQ_KERNEL=gemlite needs the gemlite package (pip install gemlite; "
                              "it needs triton >= 3.6)") from e
        path = os.environ.get("NANOVLLM_GEMLITE_CONFIG")
        if path and not gemlite.load_config(path, print_error=False):
            raise ValueError(f"NANOVLLM_GEMLITE_CONFIG={path!r}: gemlite could not load it")
        _gemlite = gemlite
    return _gemlite


class GemliteAWQ:
    """One AWQ layer repacked for gemlite (its own copy of the weights: the AWQ tensors stay for M > MAX_M
    and the other kernels). Call with x [M, K] in the dtype it was built for."""

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 dtype: torch.dtype):
        if not qweight.is_cuda:
            raise ValueError("gemlite runs on CUDA only")
        codes, s, z = gemlite_operands(qweight, qzeros, scales, group_size, dtype)
        gemlite = _import_gemlite()
        gdtype = {torch.float16: gemlite.DType.FP16, torch.bfloat16: gemlite.DType.BF16}[dtype]
        N, K = codes.shape
        self.dtype, self.shape = dtype, (K, N)
        # float32 output: gemlite's split-K kernels atomically add their partial sums into the output, and
        # in bf16 (native atomics on sm90) each add rounds to 8 bits: 2.7% max error at K=4096, M<=8 on the
        # H200, against 0.4% for a bf16 matmul; fp16's rounding gave 1.05e-3 at K=256. One cast follows.
        self.layer = gemlite.GemLiteLinear(4, group_size=group_size, in_features=K, out_features=N,
                                           input_dtype=gdtype, output_dtype=gemlite.DType.FP32)
        self.layer.pack(codes, s, z, bias=None, fma_mode=False)
        self.eager_rows: set[int] = set()   # the M values run outside capture (autotuned)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype or x.dim() != 2 or x.shape[1] != self.shape[0]:
            raise ValueError(f"gemlite layer built for [M, {self.shape[0]}] {self.dtype}, got "
                             f"{tuple(x.shape)} {x.dtype}")
        M = x.shape[0]
        if torch.cuda.is_current_stream_capturing():
            if M not in self.eager_rows:
                raise RuntimeError(f"gemlite: M={M} captured before it ran eagerly (its autotuner would "
                                   f"benchmark inside the CUDA graph capture); run that batch size eagerly first")
        else:
            self.eager_rows.add(M)
        return self.layer(x).to(self.dtype)
