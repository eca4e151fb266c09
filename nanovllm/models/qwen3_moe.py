"""Qwen3-MoE (Qwen3MoeForCausalLM: Qwen3-30B-A3B, Qwen3-235B-A22B) in the Hugging Face weight layout.

Qwen3 (models/qwen3.py, over the shared decoder in models/llama.py) with a sparse mixture-of-experts
MLP (layers/moe.py) in place of the dense one, except in layers listed in `mlp_only_layers` or
between `decoder_sparse_step`s, which keep the dense MLP of `intermediate_size` (transformers'
Qwen3MoeDecoderLayer rule, `is_sparse_layer`). Experts load from per-expert checkpoint tensors
(`checkpoint_target`) or from transformers' stacked ones. Refused beyond Qwen3's refusals:
`num_experts` < 0, `num_experts_per_tok` outside [1, num_experts], `decoder_sparse_step` < 1."""
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.moe import SparseMoeBlock, expert_checkpoint_target
from nanovllm.models.qwen3 import Qwen3ForCausalLM


def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """transformers' rule: experts unless listed in mlp_only_layers, or no experts, or off the step."""
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):

    def make_mlp(self, config: PretrainedConfig, index: int) -> nn.Module:
        if not is_sparse_layer(config, index):
            return super().make_mlp(config, index)
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                              config.moe_intermediate_size, bool(config.norm_topk_prob))

    @classmethod
    def check_config(cls, config: PretrainedConfig, max_model_len: int) -> None:
        super().check_config(config, max_model_len)
        experts, top_k = config.num_experts, config.num_experts_per_tok
        if experts < 0:
            raise ValueError(f"{cls.__name__}: num_experts={experts} must be >= 0")
        if experts and not 1 <= top_k <= experts:
            raise ValueError(f"{cls.__name__}: num_experts_per_tok={top_k} must be in [1, num_experts={experts}]")
        step = getattr(config, "decoder_sparse_step", 1)
        if step < 1:
            raise ValueError(f"{cls.__name__}: decoder_sparse_step={step} must be >= 1")

    @staticmethod
    def checkpoint_target(name: str):
        """Per-expert checkpoint tensors -> a slice of the stacked expert parameters (utils/loader.py)."""
        return expert_checkpoint_target(name)
