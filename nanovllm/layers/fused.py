"""FlashInfer's fused norm, rotary and activation kernels, used for CUDA tensors.

The PyTorch versions in the layers stay the CPU path and the reference; on the GPU each of them is
several elementwise kernels, which profiling showed to cost more per decode step than the GEMMs.
FlashInfer's default RMSNorm needs nvidia-cutlass-dsl (absent on our GPU machine): nanovllm/__init__.py
sets FLASHINFER_USE_CUDA_NORM before FlashInfer can be imported, to select its CUDA norm kernels."""
import functools

import torch


@functools.cache
def flashinfer_ops():
    """The flashinfer module, or None where it cannot be imported (CPU machines)."""
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer


def use_fused(x) -> bool:
    """FlashInfer's kernels serve 16-bit CUDA tensors; float32 (and CPU) take the PyTorch path."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and flashinfer_ops() is not None
