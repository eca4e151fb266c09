"""Llama (2 and 3.x with llama3 rope scaling) and Mistral against transformers' own LlamaForCausalLM /
MistralForCausalLM on the same random weights: logits, greedy generation (cascade on and off, shared
prefixes), tensor parallelism; and the registry's refusals (models/registry.py)."""
import json
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from nanovllm import SamplingParams
from nanovllm.config import Config
from nanovllm.layers.rotary_embedding import inverse_frequencies, rope_settings
from nanovllm.tools.make_model import make_model
from test_parity import PROMPTS, engine_logits, hf_greedy, hf_model
from test_tensor_parallel import logits_by_step, tp_llm  # noqa: F401 (tp_llm is a fixture)

PRESETS = ["llama-tiny", "llama3-tiny", "mistral-tiny"]


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-models")
    dirs = {p: make_model(p, str(root / p), seed=0) for p in PRESETS}
    # q/k/v/o and MLP biases (Llama's attention_bias / mlp_bias; make_model perturbs them from 0)
    dirs["llama-tiny-bias"] = make_model("llama-tiny", str(root / "bias"), seed=1, attention_bias=True, mlp_bias=True)
    return dirs


def random_prompts(seed: int, lengths, vocab: int = 1900) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("preset", PRESETS + ["llama-tiny-bias"])
def test_logits_match_transformers(llama_dirs, make_llm, preset):
    path = llama_dirs[preset]
    tok = AutoTokenizer.from_pretrained(path)
    ref = hf_model(path)
    assert type(ref).__name__ == json.load(open(f"{path}/config.json"))["architectures"][0]
    # text prompts, and one past llama3-tiny's original context (256) with a decode crossing a page
    token_lists = [tok.encode(p) for p in PROMPTS[:4]] + random_prompts(0, [300])
    llm = make_llm(path)
    for seq, ours in engine_logits(llm, token_lists, num_decode_steps=6):
        with torch.no_grad():
            theirs = ref(torch.tensor([seq.token_ids])).logits[0]
        n = seq.num_prompt_tokens
        expected = theirs[n - 1:n - 1 + len(ours)]  # prefill's last row, then one row per decode step
        assert ours.shape == expected.shape
        diff = (ours - expected).abs().max().item()
        assert diff <= 1e-4, f"{preset}: max abs logit diff {diff}"


def shared_prefix_prompts(seed: int) -> list[list[int]]:
    """8 prompts: 4 behind a 96-token system prompt, 3 behind a 70-token one, one alone."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(1900) for _ in range(n)]
    first, second = words(96), words(70)
    prompts = [first + words(rng.randrange(3, 30)) for _ in range(4)]
    prompts += [second + words(rng.randrange(3, 30)) for _ in range(3)] + [words(41)]
    rng.shuffle(prompts)
    return prompts


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_generate_matches_transformers(llama_dirs, make_llm, preset):
    path = llama_dirs[preset]
    sp = SamplingParams(temperature=0, max_tokens=20)
    mixed = PROMPTS  # 8 prompts of 1 to ~40 tokens
    outs = make_llm(path).generate(mixed, sp, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == hf_greedy(path, mixed, 20)

    shared = shared_prefix_prompts(seed=PRESETS.index(preset))
    expected = hf_greedy(path, shared, 20)
    llm = make_llm(path, enable_cascade_attention=True)
    for _ in range(2):  # prefixes computed in the run, then served from the prefix cache
        outs = llm.generate(shared, sp, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == expected
    assert llm.stats["cascade_steps"] > 0
    assert sum(o["num_cached_tokens"] for o in outs) > 0


@pytest.mark.parametrize("preset", ["llama3-tiny", "llama-tiny-bias"])
def test_tensor_parallel_equals_one_rank(llama_dirs, make_llm, tp_llm, preset):  # noqa: F811
    """llama3-tiny (8 query heads, 2 KV heads, untied, llama3 rope) split over 2 gloo ranks; the biased
    llama keeps o_proj's and down_proj's sums in the layers (a bias is added once, after the sum), the
    unbiased one takes them in the norms (layers/linear.py defer_reduce)."""
    path = llama_dirs[preset]
    prompts = random_prompts(1, [5, 40, 130, 300])
    one = logits_by_step(make_llm(path), prompts)
    llm = tp_llm(path, 2)
    deferred = preset == "llama3-tiny"
    assert all(layer.attn_partial == layer.mlp_partial == deferred for layer in llm.model_runner.model.model.layers)
    two = logits_by_step(llm, prompts)
    ref = hf_model(path)
    for (seq, ours), (seq1, single) in zip(two, one):
        assert seq.token_ids == seq1.token_ids
        assert (ours - single).abs().max().item() <= 1e-4
        with torch.no_grad():
            theirs = ref(torch.tensor([seq.token_ids])).logits[0]
        n = seq.num_prompt_tokens
        assert (ours - theirs[n - 1:n - 1 + len(ours)]).abs().max().item() <= 1e-4


# ---- refusals: ValueError naming the problem, when the engine is created -------------------------

def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_unknown_architecture_refused(llama_dirs, tmp_path):
    path = edited_copy(llama_dirs["llama-tiny"], tmp_path / "m", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPTNeoXForCausalLM'\].*LlamaForCausalLM"):
        Config(path)
    path = edited_copy(llama_dirs["llama-tiny"], tmp_path / "none", architectures=None)
    with pytest.raises(ValueError, match="unsupported architecture"):
        Config(path)


def test_sliding_window_refused_unless_max_model_len_fits(llama_dirs, tmp_path, make_llm):
    path = edited_copy(llama_dirs["mistral-tiny"], tmp_path / "m", sliding_window=512)
    with pytest.raises(ValueError, match=r"MistralForCausalLM: sliding window attention \(sliding_window=512\)"):
        Config(path, max_model_len=1024)
    with pytest.raises(ValueError, match="sliding window"):  # the engine refuses before any worker starts
        make_llm(path, max_model_len=1024, tensor_parallel_size=2)
    # A window as long as every sequence is full attention: served, and equal to the windowless model.
    llm = make_llm(path, max_model_len=512)
    sp = SamplingParams(temperature=0, max_tokens=8)
    assert [o["token_ids"] for o in llm.generate(PROMPTS[:3], sp, use_tqdm=False)] == \
        hf_greedy(llama_dirs["mistral-tiny"], PROMPTS[:3], 8)
    # Qwen2/Qwen3 apply their window only with use_sliding_window
    qwen = edited_copy(llama_dirs["llama-tiny"], tmp_path / "q", sliding_window=256, use_sliding_window=False)
    Config(qwen, max_model_len=1024)
    qwen = edited_copy(llama_dirs["llama-tiny"], tmp_path / "q2", sliding_window=256, use_sliding_window=True)
    with pytest.raises(ValueError, match="sliding_window=256"):
        Config(qwen, max_model_len=1024)


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "rope_theta": 1e4},
     "rope scaling type 'yarn' is not supported"),
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "rope scaling type 'dynamic'"),
])
def test_unsupported_rope_scaling_refused(llama_dirs, tmp_path, rope, match):
    path = edited_copy(llama_dirs["llama-tiny"], tmp_path / "m", rope_parameters=rope, rope_scaling=rope)
    with pytest.raises(ValueError, match=match):
        Config(path)


def test_unsupported_activation_refused(llama_dirs, tmp_path):
    path = edited_copy(llama_dirs["llama-tiny"], tmp_path / "m", hidden_act="gelu")
    with pytest.raises(ValueError, match="LlamaForCausalLM: hidden_act 'gelu' is not supported"):
        Config(path)


def test_rope_settings_read_both_spellings():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = SimpleNamespace(rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling})  # transformers < 5
    new = SimpleNamespace(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    plain = SimpleNamespace(rope_theta=1e6, rope_scaling=None)
    assert rope_settings(old) == rope_settings(new) == (500000.0, {"rope_type": "llama3", **scaling})
    assert rope_settings(plain) == (1e6, None)
    assert rope_settings(SimpleNamespace()) == (10000.0, None)


def test_llama3_frequencies_in_float64():
    """The three bands of llama3 scaling, from the definition, in float64 (Llama 3.1 8B's settings)."""
    import math
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    ours = inverse_frequencies(128, 500000.0, scaling).double()
    bands = set()
    for i, got in enumerate(ours.tolist()):
        f = 500000.0 ** (-2 * i / 128)
        wavelength = 2 * math.pi / f
        if wavelength < 8192 / 4:
            want, band = f, "kept"
        elif wavelength > 8192 / 1:
            want, band = f / 8, "scaled"
        else:
            s = (8192 / wavelength - 1) / (4 - 1)
            want, band = (1 - s) * f / 8 + s * f, "blended"
        bands.add(band)
        assert abs(got - want) <= 1e-6 * want, (i, got, want)
    assert bands == {"kept", "scaled", "blended"}


# ---- real shapes (config only, load_format="dummy") ----------------------------------------------

@pytest.mark.parametrize("preset,billions", [("llama-3.1-8b", 8.03), ("llama-3.2-1b", 1.24),
                                             ("mistral-7b-v0.3", 7.25)])
def test_real_shape_presets(tmp_path, preset, billions):
    """Meta's and Mistral's published shapes: accepted by the registry (llama3 rope, no window) and
    the parameter count of the real checkpoints, ours equal to transformers'."""
    from transformers import AutoConfig

    from nanovllm.models.registry import model_class
    from nanovllm.tools.make_model import num_parameters
    path = make_model(preset, str(tmp_path), weights=False)
    Config(path, load_format="dummy", max_model_len=8192)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = model_class(config)(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == num_parameters(config) and round(n / 1e9, 2) == billions


# ---- GPU: FlashInfer + the fused no-norm kernel, llama3 table ------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["llama3-tiny", "mistral-tiny"])
def test_greedy_flashinfer_equals_torch_reference_gpu(tmp_path, preset, small_batch_kernels_off):
    """bf16 greedy, FlashInfer (fused rope + KV write without q/k norm, CUDA graphs) vs the PyTorch
    backend on the same weights; where they part, FlashInfer's pick must be within a bf16 ulp of the
    reference's best (as tests/test_gpu.py's Qwen3 test). Small batches on cuBLAS and FlashInfer's decode
    (conftest.small_batch_kernels_off: the reference runs on CUDA in bf16 too, so tinygemm2 moved both sides)."""
    from nanovllm import LLM
    from test_gpu import identical_or_at_ties, next_token_logits
    # FlashInfer kernels are built for head_dim 128
    path = make_model(preset, str(tmp_path / preset), seed=0, dtype="bfloat16", hidden_size=256,
                      num_attention_heads=8, head_dim=128, intermediate_size=512, initializer_range=0.02)
    prompts = random_prompts(2, [5, 17, 33, 64, 100, 129, 250, 400])
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = LLM(path, attention_backend="torch", enforce_eager=True, dtype="bfloat16", max_model_len=1024,
              num_kvcache_blocks=2048)
    expected = [o["token_ids"] for o in ref.generate(prompts, sp, use_tqdm=False)]
    llm = LLM(path, dtype="bfloat16", max_model_len=1024, max_num_seqs=64, num_kvcache_blocks=2048)
    got = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    identical = identical_or_at_ties(prompts, got, expected, lambda tokens: next_token_logits(ref, tokens))
    assert identical >= 6, (preset, identical)
