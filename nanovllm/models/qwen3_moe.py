"""Qwen3-MoE (Qwen3MoeForCausalLM, e.g. Qwen3-30B-A3B) in the Hugging Face weight layout.

Attention, norms, embeddings and the decoder layer's forward are Qwen3's (models/qwen3.py); the
MLP of a layer is a sparse mixture of experts (layers/moe.py) unless the layer is listed in
`mlp_only_layers` or falls between `decoder_sparse_step`s, as in transformers' Qwen3MoeDecoderLayer:
those keep Qwen3's dense MLP of `intermediate_size`. Configs this file does not implement are
refused by name (check_config) instead of running with different math."""
import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.embed_head import LMHead, VocabEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.moe import SparseMoeBlock, expert_checkpoint_target
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.qwen3 import (MODELS, Qwen3Attention, Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3MLP,
                                   Qwen3Model, head_dim, rope_theta)


def check_config(config: PretrainedConfig):
    """ValueError naming the first field of `config` that this implementation does not follow."""
    def refuse(field, why):
        raise ValueError(f"Qwen3MoeForCausalLM: {field}={getattr(config, field, None)!r} is not supported ({why})")

    if getattr(config, "hidden_act", "silu") != "silu":
        refuse("hidden_act", "only silu")
    if getattr(config, "use_sliding_window", False):
        refuse("use_sliding_window", "no sliding-window attention")
    if getattr(config, "attention_bias", False):
        refuse("attention_bias", "q/k/v/o projections without bias")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse("rope_parameters", "plain RoPE only, no scaling")
    num_experts = config.num_experts
    if num_experts < 0:
        refuse("num_experts", "must be >= 0")
    if num_experts and not 1 <= config.num_experts_per_tok <= num_experts:
        refuse("num_experts_per_tok", f"must be in [1, num_experts={num_experts}]")
    if getattr(config, "decoder_sparse_step", 1) < 1:
        refuse("decoder_sparse_step", "must be >= 1")


def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """transformers' rule: experts unless listed in mlp_only_layers, or no experts, or off the step."""
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    """Qwen3's layer (its forward) holding a SparseMoeBlock or a dense MLP as `mlp`."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding):
        nn.Module.__init__(self)  # not Qwen3DecoderLayer's: it would build a dense MLP for every layer
        self.self_attn = Qwen3Attention(config, qk_norm=True, bias=False, rotary_emb=rotary_emb)
        if is_sparse_layer(config, layer_idx):
            self.mlp = SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                                      config.moe_intermediate_size, bool(config.norm_topk_prob))
        else:
            self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3MoeModel(Qwen3Model):
    """Qwen3's model body (its forward) over Qwen3MoeDecoderLayers."""

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(head_dim(config), config.max_position_embeddings, rope_theta(config))
        self.layers = nn.ModuleList([Qwen3MoeDecoderLayer(config, i, rotary_emb)
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3MoeForCausalLM(nn.Module):
    packed_modules_mapping = Qwen3ForCausalLM.packed_modules_mapping  # attention, and the dense layers' MLP

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        check_config(config)
        self.model = Qwen3MoeModel(config)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def checkpoint_target(name: str):
        """Per-expert checkpoint tensors -> a slice of the stacked expert parameters (utils/loader.py)."""
        return expert_checkpoint_target(name)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


MODELS["Qwen3MoeForCausalLM"] = Qwen3MoeForCausalLM
