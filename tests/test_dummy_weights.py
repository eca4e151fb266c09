"""fill_dummy_weights (load_format="dummy"): seeded random weights from config.json alone, on CPU."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from nanovllm.models.qwen3 import Qwen2ForCausalLM, Qwen3ForCausalLM
from nanovllm.tools.make_model import make_model
from nanovllm.utils.context import reset_context, set_context
from nanovllm.utils.loader import DUMMY_WEIGHT_RANGE, fill_dummy_weights


class DenseCausalAttention:
    """Stands in for the attention backend: one sequence, dense causal attention, no KV cache."""

    slot_mapping = None
    fused_qkv = False

    def forward(self, q, k, v, k_cache, v_cache, k_scale=1.0, v_scale=1.0):
        rep = q.shape[1] // k.shape[1]  # GQA / MQA: repeat kv heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        return out.transpose(0, 1)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """Config-only (no weight files) folders of the tiny presets."""
    root = tmp_path_factory.mktemp("dummy")
    return lambda preset: make_model(preset, str(root / preset), weights=False)


def build(config_dir, preset="qwen3-tiny", dtype=torch.float32, seed=0, cls=Qwen3ForCausalLM, **overrides):
    config = AutoConfig.from_pretrained(config_dir(preset))
    for k, v in overrides.items():
        setattr(config, k, v)
    model = cls(config).to(dtype)
    fill_dummy_weights(model, seed=seed)
    return model


def logits(model, n=12):
    ids = torch.arange(3, 3 + 7 * n, 7) % model.lm_head.weight.shape[0]
    set_context(is_prefill=True, attn=DenseCausalAttention())
    try:
        with torch.inference_mode():
            return model.compute_logits(model(ids, torch.arange(n))).float()
    finally:
        reset_context()


def test_finite_logits_and_fill_scheme(config_dir):
    model = build(config_dir)
    out = logits(model)
    assert out.shape == (12, model.lm_head.weight.shape[0]) and torch.isfinite(out).all()
    assert out.std() > 0.01  # not degenerate: logits depend on the weights
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        else:
            assert p.abs().max() <= DUMMY_WEIGHT_RANGE and p.std() > DUMMY_WEIGHT_RANGE / 3, name


def test_biases_zero(config_dir):
    model = build(config_dir, "qwen2-tiny", cls=Qwen2ForCausalLM)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases and all(torch.all(b == 0) for b in biases)
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("layers", [64])
def test_deep_bf16_stays_finite(config_dir, layers):
    model = build(config_dir, dtype=torch.bfloat16, num_hidden_layers=layers)
    assert len(model.model.layers) == layers
    out = logits(model)
    assert torch.isfinite(out).all() and out.abs().max() < 100
    assert out.argmax(-1).unique().numel() > 1  # the input still matters after 64 layers


def test_deterministic_per_seed(config_dir):
    a, b, c = build(config_dir, seed=0), build(config_dir, seed=0), build(config_dir, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(logits(a), logits(b))
    for k in sa:
        if k.endswith("norm.weight"):
            assert torch.equal(sa[k], sc[k])
        else:
            assert not torch.equal(sa[k], sc[k]), k
    assert not torch.equal(logits(a), logits(c))
    # each parameter is seeded by its name: no dependence on the other parameters
    short = build(config_dir, seed=0, num_hidden_layers=1)
    assert all(torch.equal(v, sa[k]) for k, v in short.state_dict().items())


def test_tied_weights_filled_once(config_dir, monkeypatch):
    tied = build(config_dir)  # qwen3-tiny ties lm_head to the embedding
    assert tied.tie_word_embeddings
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = build(config_dir, tie_word_embeddings=False)
    assert not untied.tie_word_embeddings
    # the shared tensor holds the embedding's draw, not a second one made under the name lm_head.weight
    assert torch.equal(tied.model.embed_tokens.weight, untied.model.embed_tokens.weight)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    calls = []
    orig = torch.Tensor.uniform_

    def counting(self, *a, **k):
        calls.append(self.data_ptr())
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "uniform_", counting)
    fill_dummy_weights(tied)
    monkeypatch.undo()
    assert len(calls) == len(set(calls))  # one draw per tensor
    assert calls.count(tied.model.embed_tokens.weight.data_ptr()) == 1


def test_meta_parameters_are_skipped(config_dir):
    config = AutoConfig.from_pretrained(config_dir("qwen3-tiny"))
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    fill_dummy_weights(model)  # nothing allocated: no error, nothing to fill
    assert all(p.is_meta for p in model.parameters())
