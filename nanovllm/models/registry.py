"""Which model class serves a checkpoint: config.json's `architectures` -> class, one line each.

To add an architecture (claude_docs/models.md): write the class (usually a variant of
models/llama.py's LlamaForCausalLM), give it a `check_config(config, max_model_len)` classmethod
that raises ValueError for what it does not implement, and add it to MODELS."""
from torch import nn
from transformers import PretrainedConfig

from nanovllm.models.llama import LlamaForCausalLM, MistralForCausalLM
from nanovllm.models.qwen3 import Qwen2ForCausalLM, Qwen3ForCausalLM
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,      # Llama 2, Llama 3 / 3.1 / 3.2 (llama3 rope scaling)
    "MistralForCausalLM": MistralForCausalLM,  # without a sliding window shorter than max_model_len
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,  # Qwen3-30B-A3B, Qwen3-235B-A22B (claude_docs/models_moe.md)
}


def model_class(config: PretrainedConfig) -> type[nn.Module]:
    """The class of the first of config.architectures we know; ValueError naming them otherwise."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(f"unsupported architecture {archs or '(none in config.json)'}; supported: "
                     f"{', '.join(sorted(MODELS))}")


def check_model_config(config: PretrainedConfig, max_model_len: int) -> type[nn.Module]:
    """The model class, once its config check passed (Config calls this before any device work)."""
    cls = model_class(config)
    cls.check_config(config, max_model_len)
    return cls
