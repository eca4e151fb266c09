from nanovllm.attention.backend import AttentionBackend, StepBatch, make_backend

__all__ = ["AttentionBackend", "StepBatch", "make_backend"]
