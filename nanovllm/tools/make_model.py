"""Build Hugging Face-layout checkpoints (Qwen3, Qwen2, Llama, Mistral) with seeded random weights, offline.

    python -m nanovllm.tools.make_model --preset qwen3-tiny --out /tmp/qwen3-tiny
    python -m nanovllm.tools.make_model --preset qwen3-32b --out /tmp/qwen3-32b --no-weights

The folder holds config.json, generation_config.json, model*.safetensors (sharded
with an index when larger than --max-shard-size) and tokenizer files, and loads with
AutoConfig / AutoTokenizer / AutoModelForCausalLM.from_pretrained(folder). Nothing
is downloaded: the tokenizer is a byte-level BPE trained here on a built-in corpus.

--no-weights (alias --config-only; make_model(..., weights=False)) writes the same
folder without any weight file: real model shapes (qwen3-8b, qwen3-32b, qwen3-30b-a3b) in a few KB,
for the engine's load_format="dummy" (nanovllm.utils.loader.fill_dummy_weights fills
the parameters on the GPU). Writing weights is refused above LARGE_CHECKPOINT_BYTES
(about 10 GB: qwen3-8b is 16 GB, qwen3-32b 66 GB in bf16, and building them first
takes twice that in float32 host memory) unless --allow-large / allow_large=True.
The 8b/32b/30b-a3b presets match Qwen's published config.json shapes (vocab, widths, heads,
layers, rope_theta, eps, untied embeddings; experts for the MoE); llama-3.1-8b, llama-3.2-1b and
mistral-7b-v0.3 match Meta's and Mistral's (llama3 rope scaling included, Mistral
without a sliding window); the tokenizer and its token ids are ours.
qwen3-moe-tiny is Qwen3MoeForCausalLM written by transformers itself (per-expert tensors).

--awq (make_model(..., awq_group_size=G)) writes an AutoAWQ "gemm" checkpoint instead: every linear
weight of the decoder layers (any 2-D `model.layers.*.weight` but norms, experts included, except
modules_to_not_convert: the MoE router `gate`) quantized to 4 bits by per-group min/max and packed as
AutoAWQ packs it (nanovllm/layers/awq_format.py), plus config.json's quantization_config. Embeddings
and lm_head stay dense, as in AutoAWQ's checkpoints. With --no-weights it writes the config only
(load_format="dummy" then fills random codes).
"""
import argparse
import copy
import functools
import itertools
import json
import os
import shutil
import tempfile
import types

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

from nanovllm.layers.awq_format import AWQConfig, pack, quantize, read_quant_config
from nanovllm.layers.awq_format import check_parallel as check_awq_shapes

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_VOCAB_SIZE = 2000  # learned tokens (256 bytes + merges); specials come after
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_QWEN3_06B = dict(
    arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
    max_position_embeddings=40960, dtype="bfloat16", hidden_act="silu", attention_bias=False,
)
# Tiny presets use vocab_size=None: the tokenizer size rounded up to a multiple of 64,
# so the model vocab is (like in real Qwen checkpoints) larger than the tokenizer's.
_QWEN3_TINY = dict(
    arch="qwen3", vocab_size=None, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
    max_position_embeddings=4096, dtype="float32", hidden_act="silu", attention_bias=False,
)
_QWEN3_8B = {**_QWEN3_06B, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
             "num_attention_heads": 32, "tie_word_embeddings": False}
# initializer_range 0.1, not HF's 0.02: at 0.02 a tied tiny model's layers barely move the residual
# stream, so greedy decoding repeats the prompt's last token forever (qwen3-tiny does) and a greedy
# comparison tests little; at 0.1 the 8 test prompts continue with 3 to 19 distinct tokens out of 20.
_LLAMA_TINY = dict(
    arch="llama", vocab_size=None, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    max_position_embeddings=4096, dtype="float32", hidden_act="silu", initializer_range=0.1,
)
_LLAMA31_8B = dict(
    arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    max_position_embeddings=131072, dtype="bfloat16", hidden_act="silu",
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
PRESETS: dict[str, dict] = {
    "qwen3-0.6b": _QWEN3_06B,
    "qwen3-1.7b": {**_QWEN3_06B, "hidden_size": 2048, "intermediate_size": 6144},
    # Real shapes, for load_format="dummy" with a --no-weights folder (see the module docstring).
    "qwen3-8b": _QWEN3_8B,
    "qwen3-32b": {**_QWEN3_8B, "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
                  "num_attention_heads": 64},
    "qwen3-tiny": _QWEN3_TINY,
    # head_dim != hidden_size // num_attention_heads, MQA (1 kv head), separate lm_head
    "qwen3-tiny-hd": {**_QWEN3_TINY, "head_dim": 32, "num_key_value_heads": 1,
                      "tie_word_embeddings": False},
    # Qwen2: bias on q/k/v projections (always, in HF's Qwen2), no q/k RMSNorm
    "qwen2-tiny": dict(
        arch="qwen2", vocab_size=None, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=4096, dtype="float32", hidden_act="silu",
    ),
    # Llama 2 style: plain RoPE, tied embeddings
    "llama-tiny": _LLAMA_TINY,
    # Llama 3.1 style: llama3 rope scaling (original context 256 puts the tiny model's 8 frequency
    # pairs in all three bands: kept, blended, divided by factor), untied lm_head, 8 query heads on 2
    # KV heads, head_dim 16 with 8 heads != hidden_size / heads
    "llama3-tiny": {**_LLAMA_TINY, "num_hidden_layers": 3, "num_attention_heads": 8, "intermediate_size": 192,
                    "rope_theta": 500000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 256}},
    # Mistral v0.2+ style: no sliding window, one KV head (MQA), untied
    "mistral-tiny": {**_LLAMA_TINY, "arch": "mistral", "num_key_value_heads": 1, "rope_theta": 1e6,
                     "tie_word_embeddings": False, "sliding_window": None},
    # Real shapes (config only, load_format="dummy"), as Meta's and Mistral's config.json
    "llama-3.1-8b": _LLAMA31_8B,
    "llama-3.2-1b": {**_LLAMA31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "head_dim": 64, "tie_word_embeddings": True,
                     "rope_scaling": {**_LLAMA31_8B["rope_scaling"], "factor": 32.0}},
    "mistral-7b-v0.3": {**_LLAMA31_8B, "arch": "mistral", "vocab_size": 32768, "rope_theta": 1e6,
                        "max_position_embeddings": 32768, "sliding_window": None, "rope_scaling": None},
    # Qwen3-MoE: 8 experts, top-2 renormalized; layer 1 keeps a dense MLP (mlp_only_layers) to cover both
    "qwen3-moe-tiny": {**_QWEN3_TINY, "arch": "qwen3_moe", "num_hidden_layers": 3, "num_experts": 8,
                       "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
                       "decoder_sparse_step": 1, "mlp_only_layers": [1], "tie_word_embeddings": False},
    # Qwen3-30B-A3B's published shapes (128 experts, 8 active, 48 layers): config-only, load_format="dummy"
    "qwen3-30b-a3b": {**_QWEN3_06B, "arch": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                      "tie_word_embeddings": False, "num_experts": 128, "num_experts_per_tok": 8,
                      "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": []},
}
_ARCHS = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
          "llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
          "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}
# MoE routers are drawn this many times wider than HF's init (std 0.02): top-k then picks clear
# winners with unequal weights, so routing mistakes show in the logits.
ROUTER_INIT_SCALE = 10.0

# ---------------------------------------------------------------------------------
# Tokenizer

_PROSE = """\
The small engine reads a prompt, splits it into tokens, and runs the model one step
at a time. Each step produces a score for every word in the vocabulary; the sampler
turns those scores into a choice, and the chosen token is appended to the sequence.
When the sequence ends with a stop token, or grows past its limit, the request is
finished and the text is returned to the caller.
Memory is the scarce resource. Keys and values for every past position are kept in a
cache that is cut into fixed-size blocks, so that many requests can share one pool
without copying. A scheduler decides which requests run together: new prompts are
prefilled in large batches, while running requests decode a single token per step.
If the pool runs dry, the youngest request is preempted and its blocks are freed.
On a quiet morning the river was grey and still. A heron stood in the shallows,
watching the water with great patience, while the town on the far bank slowly woke:
shutters opened, bread was carried from the bakery, and children ran to school.
By noon the clouds had lifted and the hills were bright with yellow flowers.
Numbers appear everywhere: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 256, 1024, 3.14159,
2025-01-31, 12:30, $19.99, 50% and -7. Questions? Answers! Lists: a, b; c. "Quotes"
and 'apostrophes', (parentheses), [brackets], {braces}, <angles>, a/b, x*y, #tag, @name.
def forward(self, x):
    return self.proj(torch.relu(self.norm(x)))
for i in range(10):
    print(f"step {i}: loss={loss:.4f}")
User: What is the capital of France?
Assistant: The capital of France is Paris.
User: Write a short poem about the sea.
Assistant: Grey waves fold and break, salt wind over sand, the tide keeps its time.
Café, naïve, jalapeño, Grüße, smörgåsbord, 你好世界, こんにちは, привет, 🙂🚀.
"""


def _corpus() -> list[str]:
    # Prose plus deterministic combinatorial sentences: enough distinct words for the
    # trainer to reach BPE_VOCAB_SIZE. No randomness, so the merges never change.
    subjects = ["the model", "a user", "every request", "the scheduler", "our server",
                "this cache", "the teacher", "a student", "my friend", "the city"]
    verbs = ["reads", "writes", "computes", "returns", "allocates", "prefers",
             "remembers", "schedules", "explains", "generates", "measures", "builds"]
    objects = ["long answers", "short prompts", "many tokens", "shared blocks",
               "quick results", "careful plans", "green apples", "old stories",
               "large batches", "new sequences", "tensor shapes", "random numbers"]
    lines = _PROSE.splitlines()
    for s, v, o in itertools.product(subjects, verbs, objects):
        lines.append(f"{s.capitalize()} {v} {o}.")
    lines += [f"Item {n}: value {n * 7 % 1000}, index {n * 13}" for n in range(500)]
    return lines


def train_tokenizer(lines, vocab_size: int = BPE_VOCAB_SIZE) -> str:
    """Train the byte-level BPE on `lines` (vocab_size learned tokens, then SPECIAL_TOKENS) and
    return it serialized. scripts/train_tiny.py trains one on its corpus."""
    tok = Tokenizer(models.BPE())
    # ByteLevel maps every byte to a printable symbol, so any unicode string
    # round-trips through encode/decode and nothing is ever <unk>.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer)
    # Added after training so they get the ids right after the learned vocab (as in Qwen).
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok.to_str()


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    """The built-in corpus's BPE (trained once per process), serialized."""
    return train_tokenizer(_corpus())


def make_tokenizer(tokenizer_json: str | None = None) -> PreTrainedTokenizerFast:
    """The checkpoints' tokenizer: the built-in BPE, or a serialized one from train_tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json or _tokenizer_json()),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, model_max_length=131072,
    )

# ---------------------------------------------------------------------------------
# Model


def _size_bytes(size: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * units[unit])
    return int(s)


# make_model refuses to write weights above this without allow_large (qwen3-8b: 16 GB, qwen3-32b: 66 GB).
LARGE_CHECKPOINT_BYTES = 10 * 10**9
# Real shapes benchmarks run with load_format="dummy" (all but llama-3.2-1b are over LARGE_CHECKPOINT_BYTES).
BIG_PRESETS = ("qwen3-8b", "qwen3-32b", "llama-3.1-8b", "llama-3.2-1b", "mistral-7b-v0.3", "qwen3-30b-a3b")


def build_config(preset: str, dtype: str | None, overrides: dict, tokenizer=None):
    """(config, HF model class, tokenizer, special token ids, preset fields, dtype name) for a preset;
    `tokenizer` (default: make_tokenizer()) sets the vocab size of presets that leave it open."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}, choose from {sorted(PRESETS)}")
    fields = copy.deepcopy({**PRESETS[preset], **overrides})  # HF configs edit the rope dicts they are given
    config_cls, model_cls = _ARCHS[fields.pop("arch")]
    preset_dtype = fields.pop("dtype")
    dtype = dtype or preset_dtype
    tokenizer = tokenizer or make_tokenizer()
    if fields["vocab_size"] is None:
        fields["vocab_size"] = (len(tokenizer) + 63) // 64 * 64
    special = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    fields.setdefault("initializer_range", 0.02)
    config = config_cls(**fields, **special, dtype=dtype)
    config.architectures = [model_cls.__name__]  # what save_pretrained of the model writes
    return config, model_cls, tokenizer, special, fields, dtype


def num_parameters(config) -> int:
    """Parameter count of the HF model for `config` (tied embeddings once), built on the meta device."""
    model_cls = _ARCHS[config.model_type][1]
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def make_model(preset: str, out_dir: str, seed: int = 0, dtype: str | None = None,
               max_shard_size: str = "2GB", weights: bool = True, allow_large: bool = False,
               awq_group_size: int | None = None, awq_keep_dense: list[str] | None = None, **overrides) -> str:
    """Write a random-weight checkpoint for `preset` into out_dir; return out_dir.

    overrides patch config fields (e.g. num_hidden_layers=2). Same seed -> same tensors.
    weights=False writes config, generation config and tokenizer but no weight file (for
    load_format="dummy"). With weights, a checkpoint over LARGE_CHECKPOINT_BYTES (qwen3-8b,
    qwen3-32b) raises ValueError unless allow_large=True. awq_group_size: write an AWQ int4 checkpoint
    with groups of that many input rows (see the module docstring); awq_keep_dense: its
    modules_to_not_convert (default: ["gate"], the MoE router, when the model has experts, else none).
    """
    config, model_cls, tokenizer, special, fields, dtype = build_config(preset, dtype, overrides)
    quant = None
    if awq_group_size is not None:  # checked before anything is written, as the engine will check it
        if awq_keep_dense is None:
            awq_keep_dense = ["gate"] if "num_experts" in fields else None
        quant = {"quant_method": "awq", "bits": 4, "group_size": awq_group_size, "zero_point": True,
                 "version": "gemm", "modules_to_not_convert": awq_keep_dense}
        awq = read_quant_config(types.SimpleNamespace(quantization_config=quant))
        check_awq_shapes(config, awq, 1)
    generation_config = GenerationConfig(**special, pad_token_id=tokenizer.pad_token_id)
    if weights and not allow_large:
        size = num_parameters(config) * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        if size > LARGE_CHECKPOINT_BYTES:
            raise ValueError(
                f"{preset} weights would be {size / 1e9:.0f} GB on disk (and about twice that in host memory "
                f"while building): pass weights=False (--no-weights) for load_format='dummy', "
                f"or allow_large=True (--allow-large) to write them anyway")
    os.makedirs(out_dir, exist_ok=True)

    if not weights:
        config.save_pretrained(out_dir)
        generation_config.save_pretrained(out_dir)
    else:
        # Init in float32 (HF default: normal(0, 0.02) linears/embeddings, ones for norms),
        # then cast, so values are the same rounding of one float32 draw for every dtype.
        torch.manual_seed(seed)
        model = model_cls(config)
        # HF inits RMSNorm weights to 1 and biases to 0, so an engine that forgot to apply
        # them would still match. Perturb them (mildly, to stay numerically tame).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
                elif name.endswith(".bias"):
                    p.copy_(0.1 * torch.randn_like(p))
                elif name.endswith("mlp.gate.weight"):  # MoE router
                    p.mul_(ROUTER_INIT_SCALE)
        model = model.to(getattr(torch, dtype))
        model.generation_config = generation_config
        # Tied models save no lm_head.weight (HF drops tied duplicates).
        model.save_pretrained(out_dir, max_shard_size=_size_bytes(max_shard_size))
    if quant is not None and weights:
        _quantize_awq(out_dir, awq)
    _finish_folder(out_dir, tokenizer, fields, quant)
    return out_dir


def save_checkpoint(model, tokenizer, out_dir: str, rope_theta: float, max_shard_size: str = "2GB") -> str:
    """Write a (trained) HF model and its tokenizer as make_model writes a folder; return out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id,
                                               eos_token_id=model.config.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir, max_shard_size=_size_bytes(max_shard_size))
    _finish_folder(out_dir, tokenizer, {"rope_theta": rope_theta})
    return out_dir


def _finish_folder(out_dir: str, tokenizer, fields: dict, quant: dict | None = None):
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes rope_theta and the scaling only inside "rope_parameters"; real
    # checkpoints (and simple readers of config.json) have them at the top level too.
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["rope_theta"] = fields["rope_theta"]
    if quant is not None:
        cfg["quantization_config"] = quant
    if fields.get("rope_scaling"):
        cfg["rope_scaling"] = {k: v for k, v in fields["rope_scaling"].items() if k != "rope_theta"}
    if "num_local_experts" in cfg:  # transformers 5's name for it; Qwen's config.json says num_experts
        cfg["num_experts"] = cfg["num_local_experts"]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def awq_quantizable(name: str, tensor: torch.Tensor, quant: AWQConfig) -> bool:
    """Whether checkpoint tensor `name` is a linear weight AWQ quantizes (see the module docstring)."""
    module, _, leaf = name.rpartition(".")
    return (leaf == "weight" and tensor.dim() == 2 and module.startswith("model.layers.")
            and not module.endswith("norm") and not quant.keeps_dense(module))


def _quantize_awq(out_dir: str, quant: AWQConfig):
    """Rewrite the dense safetensors of out_dir in AutoAWQ's gemm layout (and the shard index)."""
    from safetensors.torch import load_file, save_file
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    index = json.load(open(index_path)) if os.path.isfile(index_path) else None
    for file in sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors")):
        path = os.path.join(out_dir, file)
        tensors = load_file(path)
        out = {}
        for name, t in tensors.items():
            if not awq_quantizable(name, t, quant):
                out[name] = t
                continue
            codes, zeros, scales = quantize(t.float(), quant.group_size)
            module = name[:-len(".weight")]
            out[f"{module}.qweight"], out[f"{module}.qzeros"] = pack(codes), pack(zeros)
            out[f"{module}.scales"] = scales
            if index is not None:
                del index["weight_map"][name]
                for leaf in ("qweight", "qzeros", "scales"):
                    index["weight_map"][f"{module}.{leaf}"] = file
        save_file(out, path, metadata={"format": "pt"})
    if index is not None:
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)


def default_tiny_model_dir() -> str:
    """Path of a cached qwen3-tiny (seed 0) checkpoint, built on first use.

    Built in a temp dir and renamed into place, so concurrent callers never see a
    half-written folder; the loser of a race just drops its copy.
    """
    root = os.environ.get("NANOVLLM_CACHE") or os.path.expanduser("~/.cache/nanovllm")
    path = os.path.join(root, "qwen3-tiny-seed0")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".qwen3-tiny-", dir=root)
    try:
        make_model("qwen3-tiny", tmp, seed=0)
        os.rename(tmp, path)  # atomic; fails if another process renamed first
    except OSError:
        if not os.path.exists(os.path.join(path, "config.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--no-weights", "--config-only", dest="weights", action="store_false",
                   help="config, generation config and tokenizer only, no weight files (load_format='dummy')")
    p.add_argument("--allow-large", action="store_true",
                   help=f"write weights even above {LARGE_CHECKPOINT_BYTES // 10**9} GB ({', '.join(BIG_PRESETS)})")
    p.add_argument("--awq", action="store_true", help="write an AutoAWQ int4 (gemm) checkpoint")
    p.add_argument("--group-size", type=int, default=128, help="AWQ group size (input rows per scale)")
    args = p.parse_args(argv)
    try:
        make_model(args.preset, args.out, seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   weights=args.weights, allow_large=args.allow_large,
                   awq_group_size=args.group_size if args.awq else None)
    except ValueError as e:
        p.error(str(e))
    print(args.out)


if __name__ == "__main__":
    main()
