import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nanovllm.tools.make_model import (LARGE_CHECKPOINT_BYTES, PRESETS, default_tiny_model_dir, main,
                                       make_model, num_parameters)

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


# ---------------------------------------------------------------------------------
# Config-only folders (load_format="dummy") and the real-shape presets

# Shapes of Qwen's published config.json for Qwen3-8B / Qwen3-32B.
REAL = {
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32),
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64),
}
COMMON = dict(vocab_size=151936, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
              max_position_embeddings=40960, hidden_act="silu", attention_bias=False, model_type="qwen3",
              architectures=["Qwen3ForCausalLM"])


def expected_params(c: dict) -> int:
    """Qwen3 dense parameter count from the config (untied: embedding and lm_head both counted)."""
    h, i, hd, v = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + 2 * hd  # qkv, o, gate/up/down, 2 norms, q/k norm
    return 2 * v * h + c["num_hidden_layers"] * layer + h


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    return {p: make_model(p, str(tmp_path_factory.mktemp(p)), weights=False) for p in REAL}


@pytest.mark.parametrize("preset", sorted(REAL))
def test_config_only_real_shapes(config_only, preset):
    path = Path(config_only[preset])
    assert not list(path.glob("*.safetensors")) and not list(path.glob("*.index.json"))
    assert sum(f.stat().st_size for f in path.iterdir()) < 1_000_000  # a few KB of json, not GBs
    cfg = json.loads((path / "config.json").read_text())
    for k, v in {**COMMON, **REAL[preset]}.items():
        assert cfg[k] == v, k
    assert cfg["rope_theta"] == 1e6 and cfg["dtype"] == "bfloat16"

    config = AutoConfig.from_pretrained(path)
    assert config.num_hidden_layers == REAL[preset]["num_hidden_layers"] and config.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"
    assert len(tok) <= config.vocab_size and tok.eos_token_id == cfg["eos_token_id"]
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] and gen["pad_token_id"] == tok.pad_token_id


@pytest.mark.parametrize("preset,billions", [("qwen3-8b", 8.2), ("qwen3-32b", 32.8)])
def test_real_preset_parameter_count_on_meta(config_only, preset, billions):
    from nanovllm.models.qwen3 import Qwen3ForCausalLM as Ours
    config = AutoConfig.from_pretrained(config_only[preset])
    with torch.device("meta"):
        model = Ours(config)
    n = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert n == expected_params({**COMMON, **REAL[preset]}) == num_parameters(config)  # ours == HF's
    assert round(n / 1e9, 1) == billions


def test_config_only_matches_full_checkpoint(built, tmp_path):
    """Same config, generation config and tokenizer files as the folder with weights."""
    path = make_model("qwen3-tiny", str(tmp_path), weights=False)
    assert not list(Path(path).glob("*.safetensors"))
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert Path(path, f).read_bytes() == Path(built["qwen3-tiny"], f).read_bytes(), f


def test_large_weights_need_explicit_flag(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--no-weights"):
        make_model("qwen3-8b", str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # refused before writing anything
    with pytest.raises(SystemExit):
        main(["--preset", "qwen3-32b", "--out", str(tmp_path / "cli")])
    assert not (tmp_path / "cli").exists()
    # the guard is about size alone, and allow_large / --allow-large lifts it
    monkeypatch.setattr("nanovllm.tools.make_model.LARGE_CHECKPOINT_BYTES", 1000)
    with pytest.raises(ValueError, match="allow_large"):
        make_model("qwen3-tiny", str(tmp_path / "tiny"))
    make_model("qwen3-tiny", str(tmp_path / "tiny"), allow_large=True)
    main(["--preset", "qwen3-tiny", "--out", str(tmp_path / "tiny-cli"), "--allow-large"])
    for d in ["tiny", "tiny-cli"]:
        assert list((tmp_path / d).glob("*.safetensors"))
    assert LARGE_CHECKPOINT_BYTES < 2 * expected_params({**COMMON, **REAL["qwen3-8b"]})


@pytest.mark.parametrize("flag", ["--no-weights", "--config-only"])
def test_cli_config_only(tmp_path, flag, capsys):
    main(["--preset", "qwen3-32b", "--out", str(tmp_path), flag])
    assert capsys.readouterr().out.strip() == str(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "tokenizer.json").exists()
    assert not list(tmp_path.glob("*.safetensors"))
    assert AutoConfig.from_pretrained(tmp_path).hidden_size == 5120
