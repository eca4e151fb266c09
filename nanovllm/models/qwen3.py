"""Qwen3 dense decoder (and Qwen2: attention bias, no q/k norm), in the Hugging Face weight layout.

Tensor parallel as in Megatron: q/k/v and gate/up column parallel, o_proj and down_proj row
parallel (two all-reduces a layer), the vocabulary split for the embedding and the LM head; each
rank attends with its own heads over its own KV heads (layers/linear.py, layers/embed_head.py)."""
import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.distributed.parallel_state import tp_size
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import LMHead, VocabEmbedding
from nanovllm.layers.fused import use_fused
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import Linear, PackedLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.context import get_context


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config: PretrainedConfig) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # newer transformers keep it under rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


class Qwen3Attention(nn.Module):

    def __init__(self, config: PretrainedConfig, qk_norm: bool, bias: bool, rotary_emb: RotaryEmbedding):
        super().__init__()
        total_heads = config.num_attention_heads
        self.head_dim = head_dim(config)
        self.qkv_proj = PackedLinear.qkv(config.hidden_size, self.head_dim, total_heads, config.num_key_value_heads, bias)
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads = total_heads // tp_size()
        self.num_kv_heads = self.qkv_proj.shard_offsets["k"][1] // self.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = Linear(total_heads * self.head_dim, config.hidden_size, tp_dim=1)
        self.rotary_emb = rotary_emb  # one table, shared by every layer of the model
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if use_fused(qkv) and get_context().attn.fused_qkv:  # GPU: norms, rotary and the KV write in one kernel
            norms = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
            return self.o_proj(self.attn.forward_qkv(qkv, positions, self.rotary_emb.cos_sin_half, *norms))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class Qwen3MLP(nn.Module):

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.gate_up_proj = PackedLinear.column_split(config.hidden_size,
                                                      {0: config.intermediate_size, 1: config.intermediate_size})
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, tp_dim=1)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):

    def __init__(self, config: PretrainedConfig, qk_norm: bool, bias: bool, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = Qwen3Attention(config, qk_norm, bias, rotary_emb)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3Model(nn.Module):

    def __init__(self, config: PretrainedConfig, qk_norm: bool, bias: bool):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin table for all layers (one a layer took 42 MB each at 40,960 positions: 2.7 GB for 64 layers).
        rotary_emb = RotaryEmbedding(head_dim(config), config.max_position_embeddings, rope_theta(config))
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config, qk_norm, bias, rotary_emb)
                                     for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name -> (our packed parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qk_norm, bias = True, False

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        bias = getattr(config, "attention_bias", False) or self.bias
        self.model = Qwen3Model(config, self.qk_norm, bias)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """gather=False under tensor parallelism: this rank's vocabulary slice only (embed_head.LMHead)."""
        return self.lm_head(hidden, gather)


class Qwen2ForCausalLM(Qwen3ForCausalLM):
    qk_norm, bias = False, True


MODELS = {"Qwen3ForCausalLM": Qwen3ForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM}


def model_class(config: PretrainedConfig) -> type[nn.Module]:
    for arch in getattr(config, "architectures", None) or []:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(f"unsupported architecture {getattr(config, 'architectures', None)}; supported: {sorted(MODELS)}")
