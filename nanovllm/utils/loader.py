"""Load Hugging Face safetensors checkpoints (single file or sharded with an index) into our modules,
or fill a model with seeded random weights when there is no checkpoint (load_format="dummy")."""
import json
import os
import zlib
from glob import glob

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.attention.kv_quant import checked_scale, kv_scale_name

# Half-width of the uniform range of dummy matrices (see fill_dummy_weights).
DUMMY_WEIGHT_RANGE = 0.02
# AWQ dummy scales relative to DUMMY_WEIGHT_RANGE: 1 / (sqrt(3) * 6.52), 6.52 the std of q - z for uniform codes.
AWQ_DUMMY_SCALE = 0.0886


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no .safetensors files in {path!r}")
    return files


def load_model(model: nn.Module, path: str):
    """Copy every checkpoint tensor into its parameter (or its shard of one). A checkpoint name goes
    to the parameter of the same name, or, in this order: to the slice that the model's own
    `checkpoint_target(name)` returns ((parameter, shard id) or None; MoE experts stacked from
    per-expert tensors), or through `packed_modules_mapping` (q/k/v -> qkv_proj, ...). Calibrated
    KV-cache scales (`...self_attn.k_scale` / `v_scale` / `kv_scale`, attention/kv_quant.py) set the
    layer's Attention k_scale / v_scale floats (used only with an fp8 KV cache). A parameter's
    `weight_loader` gets the tensor in the checkpoint's dtype and casts it as it copies (copy_): an AWQ
    expert's int32 words and fp16 scales reach the MoE layer unrounded (layers/moe.py)."""
    packed = getattr(model, "packed_modules_mapping", {})
    custom = getattr(model, "checkpoint_target", None)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                scale = kv_scale_name(name)
                if scale is not None:
                    attn_name, which = scale
                    if attn_name not in modules:
                        raise ValueError(f"checkpoint tensor {name!r} has no attention layer {attn_name!r}")
                    for attr in which:
                        setattr(modules[attn_name], attr, checked_scale(name, f.get_tensor(name)))
                    continue
                target, shard_id = name, None
                mapped = custom(name) if custom is not None else None
                if mapped is not None:
                    target, shard_id = mapped
                else:
                    for ckpt_name, (our_name, shard) in packed.items():
                        if f".{ckpt_name}." in name:
                            target, shard_id = name.replace(ckpt_name, our_name), shard
                            break
                if target not in params:
                    if "rotary_emb.inv_freq" in name:
                        continue
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
                param = params[target]
                loader = getattr(param, "weight_loader", None)
                tensor = f.get_tensor(name)
                if loader is not None:
                    loader(param, tensor, shard_id)  # as stored: it casts as it copies (AWQ words stay int32)
                else:
                    tensor = tensor.to(param.dtype)
                    if param.shape != tensor.shape:
                        raise ValueError(f"{name}: shape {tuple(tensor.shape)} in checkpoint, {tuple(param.shape)} expected")
                    param.data.copy_(tensor)
                loaded.add(target if shard_id is None else f"{target}#{shard_id}")
    _check_complete(model, params, loaded, path)


def _check_complete(model: nn.Module, params: dict, loaded: set[str], path: str):
    """Every parameter (every shard of a packed one) must have come from the checkpoint. A parameter
    listing its `shard_ids` (stacked experts) came whole, or as every one of those shards."""
    shards: dict[str, list] = {}
    for ckpt_name, (our_name, shard) in getattr(model, "packed_modules_mapping", {}).items():
        shards.setdefault(our_name, []).append((ckpt_name, shard))
    missing = []
    tied = getattr(model, "tie_word_embeddings", False)
    for name in params:
        if tied and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        module_name = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        shard_ids = getattr(params[name], "shard_ids", None)
        if shard_ids is not None:
            if name not in loaded:
                missing += [f"{name} {s}" for s in shard_ids if f"{name}#{s}" not in loaded]
        elif module_name in shards:
            for ckpt_name, shard in shards[module_name]:
                if f"{name}#{shard}" not in loaded:
                    missing.append(name.replace(module_name, ckpt_name))
        elif name not in loaded:
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint {path!r} is missing tensors: {', '.join(sorted(missing)[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int = 0, scale: float = DUMMY_WEIGHT_RANGE):
    """Fill every parameter of a constructed model in place with seeded random values (no checkpoint).

    RMSNorm weights (names ending in "norm.weight") get ones, biases zeros, everything else
    (embeddings, projections, lm_head) uniform(-scale, scale); AWQ layers (layers/awq.py) get random
    4-bit codes and zero points and small positive scales, so dequantized weights have the same spread. With pre-norm layers every block
    sees a unit-RMS input, so each one adds a bounded amount to the residual stream and the
    activations stay finite in bf16 however deep the model; 0.02 keeps the embeddings well above
    RMSNorm's eps and gives logits a spread of about one unit, so greedy choices still depend on
    the input. Parameters are filled where they live (a CUDA tensor, a tensor-parallel shard):
    one in-place op each, nothing built on the host. Each parameter draws from a generator on
    its own device seeded from (seed, its name), so the values do not depend on the order or
    on which other parameters exist; identically named shards on different ranks get the same
    values. Tied parameters (lm_head.weight is model.embed_tokens.weight) are filled once.
    The same seed gives the same weights on the same kind of device (CPU and CUDA generators
    draw different streams). Parameters on the meta device are skipped.
    """
    generators: dict[torch.device, torch.Generator] = {}

    def generator(data: torch.Tensor, name: str) -> torch.Generator:
        gen = generators.get(data.device)
        if gen is None:
            gen = generators[data.device] = torch.Generator(device=data.device)
        # crc32, not hash(): str hashes change per process.
        gen.manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))
        return gen

    for name, param in model.named_parameters():  # remove_duplicate=True: tied weights once
        data = param.data
        if data.is_meta:
            continue  # nothing allocated to fill
        if name.endswith("norm.weight"):
            data.fill_(1.0)
        elif name.endswith(("qweight", "qzeros")):  # AWQ words: 8 random 4-bit codes each
            data.random_(-2**31, 2**31, generator=generator(data, name))
        elif name.endswith("scales"):
            # AWQ scales: (q - z) of independent uniform codes has std 6.5, so s around scale / 11.3 gives
            # dequantized weights the std of uniform(-scale, scale) (scale / sqrt(3)); spread by 0.5x-1.5x.
            data.uniform_(0.5 * AWQ_DUMMY_SCALE * scale, 1.5 * AWQ_DUMMY_SCALE * scale, generator=generator(data, name))
        elif name.endswith("bias") or not data.is_floating_point():
            data.zero_()
        else:
            data.uniform_(-scale, scale, generator=generator(data, name))
