import os

# FlashInfer reads this when it is imported: its default RMSNorm needs nvidia-cutlass-dsl, which our
# GPU machine lacks, so select its CUDA norm kernels (nanovllm/layers/fused.py) before any import.
os.environ.setdefault("FLASHINFER_USE_CUDA_NORM", "1")

from nanovllm.config import Config
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams, StructuredOutput

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "Config"]
