"""Qwen3-MoE against transformers' own Qwen3MoeForCausalLM on the same random weights (logits, greedy
text, with and without cascade attention), the expert kernels against a float64 reference, both
checkpoint layouts of the experts, tensor parallelism (gloo) against one rank, and refused configs."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from nanovllm import LLM, SamplingParams
from nanovllm.layers.moe import expert_mlp_grouped, expert_mlp_loop, fused_experts, route
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM
from nanovllm.tools.make_model import make_model, num_parameters
from nanovllm.utils.loader import fill_dummy_weights
from test_parity import PROMPTS, engine_logits, hf_greedy, hf_model
from test_tensor_parallel import logits_by_step, tp_llm  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {"normalized": make_model("qwen3-moe-tiny", str(root / "normalized"), seed=0),
            # norm_topk_prob False (the top-k weights are not rescaled), every second layer sparse,
            # biases on q/k/v/o (attention_bias)
            "unnormalized": make_model("qwen3-moe-tiny", str(root / "unnormalized"), seed=1, norm_topk_prob=False,
                                       mlp_only_layers=[], decoder_sparse_step=2, attention_bias=True)}


@pytest.fixture(scope="module")
def moe_model(moe_dirs):
    return moe_dirs["normalized"]


def max_logit_diff(ref, token_lists_logits):
    worst = 0.0
    for seq, ours in token_lists_logits:
        with torch.no_grad():
            theirs = ref(torch.tensor([seq.token_ids])).logits[0]
        n = seq.num_prompt_tokens
        expected = theirs[n - 1:n - 1 + len(ours)]  # prefill row, then one row per decode step
        assert ours.shape == expected.shape
        worst = max(worst, (ours - expected).abs().max().item())
    return worst


@pytest.mark.parametrize("variant", ["normalized", "unnormalized"])
def test_logits_match_transformers(moe_dirs, make_llm, variant):
    path = moe_dirs[variant]
    ref = hf_model(path)
    kinds = {type(layer.mlp).__name__ for layer in ref.model.layers}
    assert kinds == {"Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP"}  # both layer kinds are covered
    llm = make_llm(path)
    ours = {type(layer.mlp).__name__ for layer in llm.model_runner.model.model.layers}
    assert ours == {"SparseMoeBlock", "LlamaMLP"}
    tok = AutoTokenizer.from_pretrained(path)
    diff = max_logit_diff(ref, engine_logits(llm, [tok.encode(p) for p in PROMPTS[:5]], 6))
    assert diff <= 1e-4, f"max abs logit diff {diff}"


GREEDY = SamplingParams(temperature=0, max_tokens=24)


def test_greedy_generate_matches_transformers(moe_model, make_llm):
    expected = hf_greedy(moe_model, PROMPTS, 24)
    llm = make_llm(moe_model)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected
    assert llm.stats["max_batch_size"] > 1


def test_greedy_with_cascade_attention_matches_transformers(moe_model, make_llm):
    """The 8 prompts behind one 80-token system prompt (5 pages, over the planner's 64-token minimum):
    cascade decode reads it once for the group."""
    tok = AutoTokenizer.from_pretrained(moe_model)
    system = tok.encode(" ".join(PROMPTS[7:1:-1]))[:80]
    assert len(system) == 80
    prompts = [system + tok.encode(p) for p in PROMPTS]
    expected = hf_greedy(moe_model, prompts, 24)
    llm = make_llm(moe_model, enable_cascade_attention=True)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected
    assert llm.stats["cascade_steps"] > 0


def reference_moe(x, router, gate_up, down, top_k, renormalize):
    """float64, token by token: softmax, top-k, optional renormalization, weighted SiLU MLPs."""
    x, router, gate_up, down = (t.double() for t in (x, router, gate_up, down))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(router @ x[t], -1)
        weights, ids = probs.topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, ids):
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out[t] += w * (down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 5, 40])
def test_expert_kernels_match_float64(renormalize, num_tokens):
    """The loop (CPU path) and the grouped GEMM (CUDA path, run here on CPU) against float64; 16
    experts, top-3, so with few tokens most experts get no rows."""
    g = torch.Generator().manual_seed(num_tokens)
    E, H, I, k = 16, 32, 24, 3
    x = torch.randn(num_tokens, H, generator=g)
    router = torch.randn(E, H, generator=g) * 0.3
    gate_up = torch.randn(E, 2 * I, H, generator=g) * 0.2
    down = torch.randn(E, H, I, generator=g) * 0.2
    expected = reference_moe(x, router, gate_up, down, k, renormalize)
    weights, ids = route(x @ router.T, k, renormalize)
    assert ids.unique().numel() < E or num_tokens == 40
    for kernel in (expert_mlp_loop, expert_mlp_grouped):
        got = fused_experts(x, weights, ids, gate_up, down, expert_mlp=kernel)
        assert (got.double() - expected).abs().max().item() < 1e-5, kernel.__name__


def test_stacked_expert_checkpoint_loads_the_same(moe_model, make_llm, tmp_path):
    """A checkpoint holding each layer's experts as transformers' fused tensors (experts.gate_up_proj
    [E, 2I, H], experts.down_proj [E, H, I]) gives the same logits as the per-expert one."""
    stacked = tmp_path / "stacked"
    shutil.copytree(moe_model, stacked)
    (stacked / "model.safetensors").unlink()
    tensors = load_file(f"{moe_model}/model.safetensors")
    config = AutoConfig.from_pretrained(moe_model)
    out = {name: t for name, t in tensors.items() if ".experts." not in name}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.0.gate_proj.weight" not in tensors:
            continue
        experts = range(config.num_experts)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"],
                                                                tensors[f"{prefix}.{e}.up_proj.weight"]]) for e in experts])
        out[f"{prefix}.down_proj"] = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    save_file(out, str(stacked / "model.safetensors"))
    prompts = [[5, 9, 200, 31, 7], list(range(40, 80))]
    a = make_llm(moe_model).model_runner.model.state_dict()
    b = make_llm(str(stacked)).model_runner.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert ([o["token_ids"] for o in make_llm(str(stacked)).generate(prompts, sp, use_tqdm=False)]
            == [o["token_ids"] for o in make_llm(moe_model).generate(prompts, sp, use_tqdm=False)])


def test_missing_expert_tensor_is_named(moe_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(moe_model, broken)
    tensors = load_file(f"{moe_model}/model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.experts\.gate_up_proj \(5, 'up_proj'\)"):
        LLM(str(broken), max_model_len=256)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_one_rank(moe_model, make_llm, tp_llm, tp):  # noqa: F811
    """Each expert's 32-wide intermediate split over tp ranks (gloo): the same logits as one rank and
    as transformers, and the same greedy text."""
    prompts = [[(7 * i + j * 13) % 1900 for j in range(n)] for i, n in enumerate([5, 17, 33, 64])]
    one = logits_by_step(make_llm(moe_model), prompts)
    llm = tp_llm(moe_model, tp)
    many = logits_by_step(llm, prompts)
    for (seq, ours), (seq1, single) in zip(many, one):
        assert seq.token_ids == seq1.token_ids
        assert (ours - single).abs().max().item() <= 1e-4
    assert max_logit_diff(hf_model(moe_model), many) <= 1e-4
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert ([o["token_ids"] for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
            == [o["token_ids"] for o in make_llm(moe_model).generate(PROMPTS, sp, use_tqdm=False)])


def patched_model(moe_model, tmp_path, **fields):
    path = tmp_path / "patched"
    shutil.copytree(moe_model, path)
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("fields,match", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9 must be in"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok=0 must be in"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step=0"),
    # Qwen3's refusals hold for the MoE too
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(use_sliding_window=True, sliding_window=64), "sliding_window=64"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}), "yarn"),
])
def test_unsupported_config_is_refused_by_name(moe_model, tmp_path, fields, match):
    with pytest.raises(ValueError, match=f"Qwen3MoeForCausalLM: .*{match}"):
        LLM(patched_model(moe_model, tmp_path, **fields), max_model_len=256)


def test_tensor_parallel_must_divide_expert_width(moe_model, tmp_path):
    path = patched_model(moe_model, tmp_path, moe_intermediate_size=34)
    with pytest.raises(ValueError, match="does not divide moe_intermediate_size=34"):
        LLM(path, tensor_parallel_size=4)


def test_dummy_weights_real_shapes_and_tiny(tmp_path, make_llm):
    """qwen3-30b-a3b config-only: our parameter count is transformers' (30.5B, on the meta device);
    load_format="dummy" fills every parameter of the tiny MoE, experts and routers included."""
    config = AutoConfig.from_pretrained(make_model("qwen3-30b-a3b", str(tmp_path / "a3b"), weights=False))
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (128, 8, 768)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(config)
    assert round(num_parameters(config) / 1e9, 1) == 30.5
    fill_dummy_weights(model)  # meta: skipped, no error
    path = make_model("qwen3-moe-tiny", str(tmp_path / "tiny"), weights=False)
    llm = make_llm(path, load_format="dummy")
    for name, p in llm.model_runner.model.named_parameters():
        assert p.abs().max() > 0, name
    out = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert all(len(o["token_ids"]) == 8 for o in out)


# ---- GPU: the grouped GEMM path (bf16), in CUDA graphs, against the expert loop -------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 512])
def test_grouped_experts_gpu(num_tokens):
    """expert_mlp_grouped (the CUDA bf16 path) eagerly and replayed from a CUDA graph, against the
    loop computed in float32 on the same bf16 weights; 30B-A3B's expert count, top-k and width."""
    from nanovllm.layers.moe import use_grouped_mm
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    E, k, H, I = 128, 8, 512, 768
    gate_up = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 0.05).bfloat16()
    down = (torch.randn(E, H, I, device="cuda", generator=g) * 0.05).bfloat16()
    x = torch.randn(num_tokens, H, device="cuda", generator=g).bfloat16()
    weights, ids = route(torch.randn(num_tokens, E, device="cuda", generator=g).bfloat16(), k, True)
    assert use_grouped_mm(x)
    ref = fused_experts(x.float(), weights.float(), ids, gate_up.float(), down.float(), expert_mlp_loop)
    tol = 0.02 * ref.abs().max().item()
    eager = fused_experts(x, weights, ids, gate_up, down)
    assert (eager.float() - ref).abs().max().item() <= tol
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_experts(x, weights, ids, gate_up, down)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_experts(x, weights, ids, gate_up, down)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_flashinfer_graphs_equal_torch_loop_reference_gpu(tmp_path, monkeypatch):
    """bf16 greedy: FlashInfer, CUDA graphs and the grouped expert GEMMs against the PyTorch backend,
    eager, with the expert loop; where they part, FlashInfer's pick must be within a bf16 ulp of the
    reference's best (as the dense models' GPU tests)."""
    import nanovllm.layers.moe as moe
    from test_gpu import identical_or_at_ties, next_token_logits
    from test_llama import random_prompts
    path = make_model("qwen3-moe-tiny", str(tmp_path / "moe"), seed=0, dtype="bfloat16", hidden_size=256,
                      num_attention_heads=8, head_dim=128, intermediate_size=512, moe_intermediate_size=64)
    prompts = random_prompts(2, [5, 17, 33, 64, 100, 129, 250, 400])
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = LLM(path, attention_backend="torch", enforce_eager=True, dtype="bfloat16", max_model_len=1024,
              num_kvcache_blocks=2048)
    loop_only = lambda x: False  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(moe, "use_grouped_mm", loop_only)
        expected = [o["token_ids"] for o in ref.generate(prompts, sp, use_tqdm=False)]
    llm = LLM(path, dtype="bfloat16", max_model_len=1024, max_num_seqs=64, num_kvcache_blocks=2048)
    got = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    def loop_logits(tokens):
        with monkeypatch.context() as m:
            m.setattr(moe, "use_grouped_mm", loop_only)
            return next_token_logits(ref, tokens)
    identical = identical_or_at_ties(prompts, got, expected, loop_logits)
    assert identical >= 6, identical
