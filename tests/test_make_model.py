import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nanovllm.tools.make_model import PRESETS, default_tiny_model_dir, make_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["qwen3-tiny", "qwen3-tiny-hd", "qwen2-tiny"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each tiny preset built once (seed 0) and shared by the tests below."""
    return {p: make_model(p, str(tmp_path_factory.mktemp(p))) for p in TINY}


def tensors(path):
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("preset", TINY)
def test_loads_in_transformers(built, preset):
    path = built[preset]
    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    fields = PRESETS[preset]
    assert config.num_attention_heads == fields["num_attention_heads"]
    assert config.num_key_value_heads == fields["num_key_value_heads"]
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tok)
    assert config.tie_word_embeddings == fields["tie_word_embeddings"]
    # tied checkpoints carry no lm_head; untied ones do
    assert ("lm_head.weight" in tensors(path)) == (not fields["tie_word_embeddings"])

    ids = tok("Hello, world!", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_preset_shapes(built):
    sd = tensors(built["qwen3-tiny-hd"])
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)  # head_dim 32
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (1 * 32, 64)
    sd = tensors(built["qwen2-tiny"])
    assert "model.layers.0.self_attn.q_proj.bias" in sd
    assert not any("q_norm" in k for k in sd)
    # biases and norm weights are perturbed away from HF's 0 / 1 init
    assert sd["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    assert (sd["model.norm.weight"] != 1).any()


def test_tokenizer_and_special_ids(built):
    path = built["qwen3-tiny"]
    tok = AutoTokenizer.from_pretrained(path)
    for s in ["Grüße, 你好 🙂!\n\tx  y", "cafe\u0301", "", "<|im_end|> literal"]:
        assert tok.decode(tok.encode(s)) == s
    eot, start, end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert len({eot, start, end}) == 3 and tok.eos_token_id == end and tok.pad_token_id == eot
    assert tok.encode("<|im_start|>") == [start]  # a single special token, not bytes

    config = json.loads(Path(path, "config.json").read_text())
    gen = json.loads(Path(path, "generation_config.json").read_text())
    assert config["eos_token_id"] == gen["eos_token_id"] == end
    assert config["bos_token_id"] == eot
    assert config["rope_theta"] == 1e6

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_seed_determinism(built, tmp_path):
    a = tensors(built["qwen3-tiny"])
    b = tensors(make_model("qwen3-tiny", str(tmp_path / "same"), seed=0))
    c = tensors(make_model("qwen3-tiny", str(tmp_path / "other"), seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    # tokenizer files are byte-identical too
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"]:
        assert Path(built["qwen3-tiny"], f).read_bytes() == (tmp_path / "same" / f).read_bytes()


def test_overrides_and_dtype(tmp_path):
    path = make_model("qwen3-tiny", str(tmp_path), dtype="bfloat16", num_hidden_layers=1)
    config = AutoConfig.from_pretrained(path)
    assert config.num_hidden_layers == 1 and config.dtype == torch.bfloat16
    sd = tensors(path)
    assert not any("layers.1." in k for k in sd)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())


def test_sharding(built, tmp_path):
    path = make_model("qwen3-tiny", str(tmp_path), max_shard_size="100KB")
    index = json.loads(Path(path, "model.safetensors.index.json").read_text())
    shards = sorted(Path(path).glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not Path(path, "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    ref = tensors(built["qwen3-tiny"])
    sharded = tensors(path)
    assert ref.keys() == sharded.keys() == index["weight_map"].keys()
    assert all(torch.equal(ref[k], sharded[k]) for k in ref)
    model = AutoModelForCausalLM.from_pretrained(path)
    for k, v in model.state_dict().items():
        if k in ref:
            assert torch.equal(v, ref[k]), k


def test_cli_offline(tmp_path):
    # HF_HUB_OFFLINE is read when huggingface_hub is imported, hence a fresh process.
    out = tmp_path / "m"
    script = (
        "import sys\n"
        "from nanovllm.tools.make_model import main\n"
        "main(['--preset', 'qwen3-tiny', '--out', sys.argv[1]])\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        "AutoConfig.from_pretrained(sys.argv[1])\n"
        "AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print('LOADED')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "LOADED" in r.stdout
    assert (out / "config.json").exists()


def test_default_tiny_model_dir(monkeypatch, tmp_path, built):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    path = default_tiny_model_dir()
    assert path == str(tmp_path / "qwen3-tiny-seed0")
    assert default_tiny_model_dir() == path  # second call reuses the cache
    assert sorted(os.listdir(tmp_path)) == ["qwen3-tiny-seed0"]  # no temp dirs left
    a, b = tensors(path), tensors(built["qwen3-tiny"])
    assert all(torch.equal(a[k], b[k]) for k in a)
