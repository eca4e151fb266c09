"""FlashInfer's fused norm, rotary and activation kernels, used for CUDA tensors.

The PyTorch versions in the layers stay the CPU path and the reference; on the GPU each of them is
several elementwise kernels, which profiling showed to cost more per decode step than the GEMMs.
FlashInfer's default RMSNorm needs nvidia-cutlass-dsl (absent on our GPU machine): nanovllm/__init__.py
sets FLASHINFER_USE_CUDA_NORM before FlashInfer can be imported, to select its CUDA norm kernels."""
import functools


@functools.cache
def flashinfer_ops():
    """The flashinfer module, or None where it cannot be imported (CPU machines)."""
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer


def use_fused(x) -> bool:
    return x.is_cuda and flashinfer_ops() is not None
