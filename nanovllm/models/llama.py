"""The dense pre-norm decoder every supported architecture shares: Llama 2/3.x, and its variants
Mistral (here), Qwen2 and Qwen3 (models/qwen3.py), in the Hugging Face weight layout.

A layer: RMSNorm -> qkv_proj -> [q/k RMSNorm] -> RoPE (neox) -> paged attention -> o_proj -> add + RMSNorm
-> gate_up -> SiluAndMul -> down. A variant sets class attributes: `qk_norm` (Qwen3), `qkv_bias`
(None: the config's attention_bias, which also puts a bias on o_proj; True: q/k/v only, Qwen2); it
may refuse more in check_config, and build other modules through make_mlp / make_attention /
make_layer (claude_docs/models.md). Tied or untied embeddings as the config says; rope scaling lives
in layers/rotary_embedding.py.

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
from nanovllm.layers.linear import Linear, PackedLinear, defer_reduce
from nanovllm.layers.rotary_embedding import RotaryEmbedding, check_rope
from nanovllm.models import tp_overlap
from nanovllm.utils.context import get_context


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):

    def __init__(self, config: PretrainedConfig, qk_norm: bool, qkv_bias: bool, o_bias: bool,
                 rotary_emb: RotaryEmbedding):
        super().__init__()
        total_heads = config.num_attention_heads
        self.head_dim = head_dim(config)
        self.qkv_proj = PackedLinear.qkv(config.hidden_size, self.head_dim, total_heads, config.num_key_value_heads,
                                         qkv_bias)
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads = total_heads // tp_size()
        self.num_kv_heads = self.qkv_proj.shard_offsets["k"][1] // self.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = Linear(total_heads * self.head_dim, config.hidden_size, bias=o_bias, tp_dim=1)
        self.rotary_emb = rotary_emb  # one table, shared by every layer of the model
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(hidden)))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """Attention of the step's rows from their q/k/v projection (the KV write included): o_proj's input."""
        if use_fused(qkv) and get_context().attn.fused_qkv:  # GPU: norms, rotary and the KV write in one kernel
            norms = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
            return self.attn.forward_qkv(qkv, positions, self.rotary_emb.cos_sin_half, *norms)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.attn(q, k, v)


class LlamaMLP(nn.Module):

    def __init__(self, config: PretrainedConfig, bias: bool = False):
        super().__init__()
        self.gate_up_proj = PackedLinear.column_split(
            config.hidden_size, {0: config.intermediate_size, 1: config.intermediate_size}, bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias, tp_dim=1)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):

    def __init__(self, config: PretrainedConfig, attn: LlamaAttention, mlp: nn.Module):
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Under tensor parallelism o_proj and down_proj return partial sums and the norm after each takes
        # the sum (all-reduce + residual add + RMSNorm in one kernel where the custom all-reduce has it).
        # `mlp_partial` tells the next layer's input norm (or the model's final norm).
        self.attn_partial = defer_reduce(attn.o_proj)
        self.mlp_partial = isinstance(mlp, LlamaMLP) and defer_reduce(mlp.down_proj)

    def forward(self, positions, hidden, residual, partial: bool = False):
        """`partial`: `hidden` is the previous layer's MLP output before its sum over ranks."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual, reduce=partial)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual, reduce=self.attn_partial)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):

    def __init__(self, config: PretrainedConfig, make_layer):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin table for all layers (one a layer took 42 MB each at 40,960 positions: 2.7 GB for 64 layers).
        rotary_emb = RotaryEmbedding.from_config(config, head_dim(config))
        self.layers = nn.ModuleList([make_layer(config, i, rotary_emb) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Under tensor parallelism a large step's rows go through the layers as two pieces, one's sums over
        # ranks beside the other's work (models/tp_overlap.py).
        self.in_pieces = tp_overlap.enabled(self.layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual, partial = self.embed_tokens(input_ids), None, False
        if self.in_pieces:
            split, own = tp_overlap.split_for(hidden)
            if split:
                return tp_overlap.forward_in_pieces(self, hidden, positions, split, own)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, partial)
            partial = layer.mlp_partial
        hidden, _ = self.norm(hidden, residual, reduce=partial)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our packed parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qk_norm = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    qkv_bias = None  # None: config.attention_bias on q/k/v and o_proj; True: on q/k/v only (Qwen2)

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.model = LlamaModel(config, self.make_layer)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_layer(self, config: PretrainedConfig, index: int, rotary_emb: RotaryEmbedding) -> nn.Module:
        """Decoder layer `index`: this class's attention and MLP between the two RMSNorms."""
        return LlamaDecoderLayer(config, self.make_attention(config, rotary_emb), self.make_mlp(config, index))

    def make_attention(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding) -> LlamaAttention:
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = attention_bias and self.qkv_bias is None
        return LlamaAttention(config, self.qk_norm, qkv_bias, o_bias, rotary_emb)

    def make_mlp(self, config: PretrainedConfig, index: int) -> nn.Module:
        """Layer `index`'s MLP (a mixture-of-experts variant overrides this, e.g. per layer index)."""
        return LlamaMLP(config, bool(getattr(config, "mlp_bias", False)))

    @classmethod
    def check_config(cls, config: PretrainedConfig, max_model_len: int) -> None:
        """ValueError naming what this engine does not implement for the checkpoint; called when the
        engine is created (config.py), before any device work or worker process."""
        name = cls.__name__
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{name}: hidden_act {act!r} is not supported (silu only)")
        try:
            check_rope(config)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        window = sliding_window(config)
        if window is not None and window < max_model_len:
            raise ValueError(f"{name}: sliding window attention (sliding_window={window}) is not supported: "
                             f"pass max_model_len <= {window} (full attention then equals it), or use a "
                             f"checkpoint without a sliding window")
        if head_dim(config) % 2:
            raise ValueError(f"{name}: head_dim {head_dim(config)} must be even for rotary embedding")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """gather=False under tensor parallelism: this rank's vocabulary slice only (embed_head.LMHead)."""
        return self.lm_head(hidden, gather)


def sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window the checkpoint asks for, or None for full attention. Mistral sets
    `sliding_window` (null in v0.2+); Qwen2/Qwen3 set it too but apply it only with use_sliding_window."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's math without biases; a sliding window is refused unless max_model_len fits in it
    (HF's window of W lets a query see its W most recent positions, itself included)."""
