"""Which BLAS library torch's GEMMs go through on the GPU: torch's own (cuBLAS) while the decode graphs are
captured, whose kernels were measured in sessions 12-24; then $NANOVLLM_BLAS_LIBRARY for eager forwards, the
prefill steps: cublaslt (the default), cublas, or "default" (leave torch's setting alone). A process-wide torch
setting (torch.backends.cuda.preferred_blas_library).

Why (one H200, session 25, claude_docs/performance.md): through cuBLAS, a GEMM of a row count not seen before
took 2.5-4.1 ms of host time on about one call in three (F.linear at Qwen3-0.6B's layer shapes, 16,001 rows: qkv
3.19, o_proj 3.07, gate_up 3.48 ms; 2,177 rows: 4.13 / 3.65 / 2.98), through cuBLASLt 0.13-0.20 ms every time
(0.02-0.03 for a row count seen before). Prefill steps have new row counts all the time: a traced W1-like prefill
step of 16,087 tokens (scripts/trace_tp_prefill.py --tensor-parallel-size 1) left the device idle 16.3 ms of its
50.4 while the host sat in three such calls. End to end, W2 with cascade: prefill 0.686 / 0.697 s through
cuBLASLt against 0.708 through cuBLAS (one pair, within the machines' spread).
"""
import os

import torch

CHOICES = ("cublaslt", "cublas", "default")


def blas_library() -> str:
    """$NANOVLLM_BLAS_LIBRARY, checked (Config checks it before anything loads)."""
    name = os.environ.get("NANOVLLM_BLAS_LIBRARY", "cublaslt")
    if name not in CHOICES:
        raise ValueError(f"NANOVLLM_BLAS_LIBRARY must be cublaslt, cublas or default, got {name!r}")
    return name


def use_for_graph_capture():
    if blas_library() != "default":
        torch.backends.cuda.preferred_blas_library("cublas")


def use_for_eager_forwards():
    name = blas_library()
    if name != "default":
        torch.backends.cuda.preferred_blas_library(name)
