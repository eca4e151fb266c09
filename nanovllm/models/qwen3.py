"""Qwen3 dense and Qwen2: variants of the shared decoder in models/llama.py.

Qwen3 = Llama + per-head RMSNorm of q and k before RoPE (q/k/v/o biases as attention_bias says,
off in released checkpoints). Qwen2 = Llama + q/k/v biases (always on in HF's Qwen2, none on o_proj)."""
from nanovllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
