"""AWQ int4 checkpoints (AutoAWQ gemm layout): the packing by hand, quantize/pack/unpack round trips,
the engine on make_model --awq checkpoints against transformers' own model on the dequantized weights
(written as a dense checkpoint without going through pack/unpack), greedy generation, tensor
parallelism, Qwen3-MoE's experts dequantized at load (exactly the dequantized checkpoint's), refusals,
dummy weights, and the Triton W4A16 kernel interpreted on CPU."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from nanovllm import SamplingParams
from nanovllm.config import Config
from nanovllm.layers.awq import AWQLinear
from nanovllm.layers.awq_format import AWQConfig, dequantize, dequantize_part, pack, quantize, unpack
from nanovllm.layers.linear import Linear
from nanovllm.tools.make_model import make_model
from test_parity import PROMPTS, engine_logits, hf_greedy, hf_model
from test_tensor_parallel import logits_by_step, tp_llm  # noqa: F401 (tp_llm is a fixture)
from triton_script import check_graph_replays, run_interpreted, run_on_gpu


# ---- the format -----------------------------------------------------------------------------------

def random_awq_cuda(K: int, N: int, G: int, seed: int = 0):
    """Random AWQ words, zeros and scales on CUDA, and the dequantized weight [K, N]."""
    g = torch.Generator().manual_seed(seed)
    qw = pack(torch.randint(0, 16, (K, N), generator=g)).cuda()
    qz = pack(torch.randint(0, 16, (K // G, N), generator=g)).cuda()
    scales = (torch.rand(K // G, N, generator=g) * 0.002 + 0.0005).half().cuda()
    return qw, qz, scales, dequantize(qw, qz, scales, G)


def test_pack_hand_example():
    """Slot i (bits 4i..4i+3) holds column PACK_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8],     # slots hold 1,3,5,7,2,4,6,8 -> 0x86427531
                          [15, 0, 0, 0, 0, 0, 0, 0],    # column 0 -> slot 0 -> 0x0000000F
                          [0, 9, 0, 0, 0, 0, 0, 0],     # column 1 -> slot 4 -> 0x00090000
                          [0, 0, 0, 0, 0, 0, 0, 12]])   # column 7 -> slot 7 -> 0xC0000000
    words = pack(codes)
    expected = [0x86427531 - 2**32, 0xF, 0x90000, 0xC0000000 - 2**32]  # int32 holds the same bits signed
    assert words.dtype == torch.int32 and words.shape == (4, 1)
    assert words[:, 0].tolist() == expected
    assert unpack(words).tolist() == codes.tolist()
    # two words side by side: columns 8..15 are the second word's
    wide = torch.cat([codes, codes.flip(0)], dim=1)
    assert pack(wide)[:, 1].tolist() == expected[::-1]


def test_pack_unpack_round_trip_and_dequantize():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (96, 64), generator=g)
    assert torch.equal(unpack(pack(codes)), codes.int())
    with pytest.raises(ValueError, match="0..15"):
        pack(codes + 1)
    # quantize: per group of 32 input rows and output column, min/max to 16 levels
    w = torch.randn(40, 96, generator=g, dtype=torch.float64) * 0.1   # [out, in]
    q, z, s = quantize(w, 32)
    assert q.shape == (96, 40) and z.shape == (3, 40) and s.shape == (3, 40) and s.dtype == torch.float16
    assert q.min() >= 0 and q.max() <= 15 and z.min() >= 0 and z.max() <= 15
    direct = (q - z.repeat_interleave(32, 0)).double() * s.double().repeat_interleave(32, 0)   # no packing
    step = s.double().repeat_interleave(32, 0)
    assert ((direct - w.t()).abs() <= step * 0.5 + 1e-3 * step).all()  # at most half a step away
    packed = dequantize(pack(q), pack(z), s, 32)
    assert packed.dtype == torch.float32 and torch.equal(packed.double(), direct.float().double())
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(w, 64)


def test_dequantize_part_equals_slice_of_whole():
    """A rank's slice, aligned or not to words (8 columns) and groups (32 rows), as the full dequantize's."""
    g = torch.Generator().manual_seed(1)
    K, N, G = 96, 48, 32
    qw, qz = pack(torch.randint(0, 16, (K, N), generator=g)), pack(torch.randint(0, 16, (K // G, N), generator=g))
    s = (torch.rand(K // G, N, generator=g) * 0.01 + 0.001).half()
    whole = dequantize(qw, qz, s, G)
    for rows, cols in [(None, None), ((0, 96), (0, 48)), ((16, 16), None), ((30, 37), None), (None, (12, 12)),
                       (None, (3, 5)), ((95, 1), (47, 1)), ((40, 24), (8, 16))]:
        r0, nr = rows or (0, K)
        c0, nc = cols or (0, N)
        part = dequantize_part(qw, qz, s, G, rows=rows, cols=cols)
        assert part.shape == (nr, nc) and torch.equal(part, whole[r0:r0 + nr, c0:c0 + nc]), (rows, cols)
    for rows, cols in [((90, 7), None), (None, (0, 0)), ((-1, 2), None)]:
        with pytest.raises(ValueError, match="outside a \\[96, 48\\] AWQ weight"):
            dequantize_part(qw, qz, s, G, rows=rows, cols=cols)


def test_keeps_dense_matches_whole_components():
    quant = AWQConfig(32, ("gate", "model.layers.1.mlp"))
    assert quant.keeps_dense("model.layers.0.mlp.gate")
    assert not quant.keeps_dense("model.layers.0.mlp.gate_proj")
    assert quant.keeps_dense("model.layers.1.mlp.down_proj")
    assert not quant.keeps_dense("model.layers.11.mlp.down_proj")


# ---- checkpoints ------------------------------------------------------------------------------------

def dequantized_copy(dense_dir: str, out_dir: str, group_size: int, keep_dense=()) -> str:
    """dense_dir with every weight AWQ would quantize replaced by (q - z) * s, from quantize() directly
    (no pack/unpack): the float model an AWQ checkpoint of the same weights stands for."""
    shutil.copytree(dense_dir, out_dir)
    quant = AWQConfig(group_size, tuple(keep_dense))
    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    for name, t in tensors.items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and t.dim() == 2 and module.startswith("model.layers.") \
                and not quant.keeps_dense(module):
            q, z, s = quantize(t.float(), group_size)
            w = (q - z.repeat_interleave(group_size, 0)).double() * s.double().repeat_interleave(group_size, 0)
            tensors[name] = w.t().to(t.dtype).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    return out_dir


CASES = {  # name -> (preset, group size, modules_to_not_convert)
    "qwen3-g32": ("qwen3-tiny", 32, None),
    "llama-g64": ("llama-tiny", 64, None),
    "qwen2-g32": ("qwen2-tiny", 32, None),           # q/k/v biases, kept in fp16 beside the int4 weights
    "llama3-g32-dense-mlp": ("llama3-tiny", 32, ["down_proj"]),  # a module AWQ leaves dense
    "llama-bias-g32": ("llama-tiny", 32, None),      # attention_bias, mlp_bias: row-parallel biases too
    "qwen3-moe-g32": ("qwen3-moe-tiny", 32, ["gate"]),  # every expert int4, the router dense (make_model's default)
}
OVERRIDES = {"llama-bias-g32": dict(seed=1, attention_bias=True, mlp_bias=True)}


@pytest.fixture(scope="module")
def awq_dirs(tmp_path_factory):
    """name -> (AWQ checkpoint, dense checkpoint of its dequantized weights)."""
    root = tmp_path_factory.mktemp("awq")
    dirs = {}
    for name, (preset, group, keep) in CASES.items():
        kwargs = OVERRIDES.get(name, dict(seed=0))
        awq = make_model(preset, str(root / f"{name}-awq"), awq_group_size=group, awq_keep_dense=keep, **kwargs)
        dense = make_model(preset, str(root / f"{name}-dense-src"), **kwargs)
        dirs[name] = (awq, dequantized_copy(dense, str(root / f"{name}-dequant"), group, keep or ()))
    return dirs


def test_checkpoint_layout(awq_dirs):
    awq, _ = awq_dirs["llama3-g32-dense-mlp"]
    cfg = json.load(open(f"{awq}/config.json"))["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                   "modules_to_not_convert": ["down_proj"]}
    t = load_file(f"{awq}/model.safetensors")
    # llama3-tiny: hidden 64, 8 heads x 16, 2 KV heads, MLP 192
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (64, 128 // 8)
    assert t["model.layers.0.self_attn.k_proj.qzeros"].shape == (64 // 32, 32 // 8)
    assert t["model.layers.0.mlp.gate_proj.scales"].shape == (2, 192)
    assert t["model.layers.0.mlp.gate_proj.scales"].dtype == torch.float16
    assert t["model.layers.0.self_attn.o_proj.qweight"].dtype == torch.int32
    assert "model.layers.0.mlp.down_proj.weight" in t and "model.layers.0.mlp.down_proj.qweight" not in t
    assert "model.embed_tokens.weight" in t and "lm_head.weight" in t  # untied head stays dense
    assert not any(k.endswith("q_proj.weight") for k in t)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_on_dequantized_weights(awq_dirs, make_llm, case):
    awq, dense = awq_dirs[case]
    llm = make_llm(awq)
    layers = llm.model_runner.model.model.layers
    assert isinstance(layers[0].self_attn.qkv_proj, AWQLinear)
    if case == "qwen3-moe-g32":  # layer 0 sparse (experts dequantized, the router dense), layer 1 a dense MLP
        assert type(layers[0].mlp.gate) is Linear and len(layers[0].mlp.experts.awq_quantized) == 8 * 3
        assert isinstance(layers[1].mlp.down_proj, AWQLinear)
    else:
        assert isinstance(layers[0].mlp.down_proj, AWQLinear) == (case != "llama3-g32-dense-mlp")
    ref = hf_model(dense)
    tok = AutoTokenizer.from_pretrained(awq)
    dense_llm = make_llm(dense)
    token_lists = [tok.encode(p) for p in PROMPTS[:4]]
    ours = engine_logits(llm, token_lists, num_decode_steps=5)
    theirs_engine = engine_logits(dense_llm, token_lists, num_decode_steps=5)
    for (seq, rows), (seq_d, rows_d) in zip(ours, theirs_engine):
        assert seq.token_ids == seq_d.token_ids
        with torch.no_grad():
            theirs = ref(torch.tensor([seq.token_ids])).logits[0]
        n = seq.num_prompt_tokens
        expected = theirs[n - 1:n - 1 + len(rows)]
        scale = expected.abs().max().item()
        assert (rows - expected).abs().max().item() <= 1e-3 * scale, case
        assert (rows - rows_d).abs().max().item() <= 1e-3 * scale, case


@pytest.mark.parametrize("case", ["qwen3-g32", "llama-g64", "qwen3-moe-g32"])
def test_greedy_generate_equals_dequantized_model(awq_dirs, make_llm, case):
    awq, dense = awq_dirs[case]
    sp = SamplingParams(temperature=0, max_tokens=16)
    outs = [o["token_ids"] for o in make_llm(awq).generate(PROMPTS, sp, use_tqdm=False)]
    assert outs == [o["token_ids"] for o in make_llm(dense).generate(PROMPTS, sp, use_tqdm=False)]
    assert outs == hf_greedy(dense, PROMPTS, 16)


@pytest.mark.parametrize("case", ["qwen3-g32", "llama-bias-g32", "qwen3-moe-g32"])
def test_tensor_parallel_equals_one_rank(awq_dirs, make_llm, tp_llm, case):  # noqa: F811
    """Group 32 over 2 gloo ranks: q/k/v and gate/up split by output words, o_proj and down_proj by
    input groups (32 of o_proj's 64 rows a rank: one group each); llama-bias: biases on every
    projection, the row-parallel ones added once after the all-reduce; qwen3-moe: each expert's
    32-wide intermediate split 16 a rank, so a rank's down_proj rows are half of one group."""
    awq, _ = awq_dirs[case]
    one = logits_by_step(make_llm(awq), PROMPTS[:4])
    two = logits_by_step(tp_llm(awq, 2), PROMPTS[:4])
    for (seq, ours), (seq1, single) in zip(two, one):
        assert seq.token_ids == seq1.token_ids
        assert (ours - single).abs().max().item() <= 1e-4


# ---- refusals ---------------------------------------------------------------------------------------

def with_quant(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg["quantization_config"].pop(key, None)
        else:
            cfg["quantization_config"][key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("changes,match", [
    ({"bits": 8}, r"AWQ bits=8 is not supported \(4 only\)"),
    ({"version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"version": "marlin"}, "AWQ version 'marlin' is not supported"),
    ({"version": "exllama"}, "AWQ version 'exllama' is not supported"),
    ({"zero_point": False}, "AWQ zero_point=False is not supported"),
    ({"quant_method": "gptq"}, r"quant_method 'gptq' is not supported \(awq only\)"),
    ({"group_size": 24}, "AWQ group_size=24 is not supported"),
    ({"group_size": -1}, "AWQ group_size=-1 is not supported"),
    ({"group_size": 128}, r"AWQ group_size=128: hidden_size \(64\) is not a multiple of it"),
])
def test_unsupported_quantization_refused(awq_dirs, tmp_path, changes, match):
    path = with_quant(awq_dirs["qwen3-g32"][0], tmp_path / "m", **changes)
    with pytest.raises(ValueError, match=match):
        Config(path)


def test_tensor_parallel_split_inside_a_group_refused(awq_dirs, make_llm, tmp_path):
    """group 64 on qwen3-tiny: o_proj's 64 input rows split over 2 ranks would cut a group in half."""
    path = with_quant(awq_dirs["qwen3-g32"][0], tmp_path / "m", group_size=64)
    Config(path)  # one rank: fine
    with pytest.raises(ValueError, match=r"o_proj input rows per rank \(32\) is not a multiple of it "
                                         r"\(tensor_parallel_size=2\)"):
        make_llm(path, tensor_parallel_size=2)  # refused before any worker starts


def test_moe_experts_dequantized_at_load(awq_dirs, make_llm):
    """make_model --awq quantizes every expert (per-expert tensors, as transformers writes them) and keeps
    the router dense; the engine's stacked experts are exactly those of the dequantized float checkpoint
    (small integers times fp16 scales: exact in float32), and so is every other dense tensor."""
    awq, dense = awq_dirs["qwen3-moe-g32"]
    cfg = json.load(open(f"{awq}/config.json"))["quantization_config"]
    assert cfg["modules_to_not_convert"] == ["gate"]
    t = load_file(f"{awq}/model.safetensors")
    experts = [k for k in t if ".mlp.experts." in k]
    assert experts and all(k.endswith((".qweight", ".qzeros", ".scales")) for k in experts)
    assert t["model.layers.0.mlp.experts.7.down_proj.qweight"].shape == (32, 64 // 8)  # moe_intermediate 32
    assert t["model.layers.0.mlp.gate.weight"].is_floating_point()
    ours = make_llm(awq).model_runner.model.state_dict()
    theirs = make_llm(dense).model_runner.model.state_dict()
    stacked = [k for k in theirs if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(stacked) == 2 * 2  # layers 0 and 2 are sparse
    for k in stacked + [k for k in theirs if k in ours]:
        assert torch.equal(ours[k], theirs[k]), k
    # against the original (not quantized) weights: the experts moved, by at most half a step each
    original = load_file(os.path.join(os.path.dirname(awq), "qwen3-moe-g32-dense-src", "model.safetensors"))
    e3_up = ours["model.layers.2.mlp.experts.gate_up_proj"][3, 32:]
    assert not torch.equal(e3_up, original["model.layers.2.mlp.experts.3.up_proj.weight"])
    scales = t["model.layers.2.mlp.experts.3.up_proj.scales"].float().repeat_interleave(32, 0).t()
    assert ((e3_up - original["model.layers.2.mlp.experts.3.up_proj.weight"]).abs() <= scales * 0.5 + 1e-6).all()


def moe_awq_copy(awq_dirs, dst, change_tensors=None, **quant_changes) -> str:
    path = with_quant(awq_dirs["qwen3-moe-g32"][0], dst, **quant_changes)
    if change_tensors is not None:
        t = load_file(f"{path}/model.safetensors")
        change_tensors(t)
        save_file(t, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


def test_moe_quantized_router_refused(tmp_path):
    path = make_model("qwen3-moe-tiny", str(tmp_path / "m"), seed=0, awq_group_size=32, awq_keep_dense=[])
    assert "model.layers.0.mlp.gate.qweight" in load_file(f"{path}/model.safetensors")
    with pytest.raises(ValueError, match=r"AWQ: the mixture-of-experts router model\.layers\.0\.mlp\.gate is quantized"):
        Config(path)


def test_moe_expert_tensors_that_contradict_the_config_refused(awq_dirs, tmp_path):
    from nanovllm import LLM
    # the config keeps the experts dense, the checkpoint holds them as AWQ
    path = moe_awq_copy(awq_dirs, tmp_path / "a", modules_to_not_convert=["gate", "experts"])
    with pytest.raises(ValueError, match=r"expert \d+ \w+_proj: the checkpoint holds its AWQ \w+, but the config's "
                                         r"quantization_config does not quantize it"):
        LLM(path, max_model_len=256)

    # one expert projection stored dense while the config quantizes it
    def dense_expert(t):
        name = "model.layers.2.mlp.experts.3.up_proj"
        w = dequantize(t.pop(f"{name}.qweight"), t.pop(f"{name}.qzeros"), t.pop(f"{name}.scales"), 32)
        t[f"{name}.weight"] = w.t().contiguous()
    path = moe_awq_copy(awq_dirs, tmp_path / "b", dense_expert)
    with pytest.raises(ValueError, match="expert 3 up_proj: the checkpoint holds a dense weight, but the config's "
                                         "quantization_config quantizes it"):
        LLM(path, max_model_len=256)

    # a missing AWQ tensor is named with its part; a malformed one by its shape
    path = moe_awq_copy(awq_dirs, tmp_path / "c", lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.qzeros"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.2\.mlp\.experts\.gate_up_proj "
                                         r"\(5, 'up_proj', 'qzeros'\)"):
        LLM(path, max_model_len=256)

    def short_scales(t):
        name = "model.layers.0.mlp.experts.1.down_proj.scales"
        t[name] = t[name][:, :32].contiguous()
    path = moe_awq_copy(awq_dirs, tmp_path / "d", short_scales)
    with pytest.raises(ValueError, match=r"expert 1 down_proj: AWQ scales \(1, 32\) in the checkpoint, expected \(1, 64\)"):
        LLM(path, max_model_len=256)


def test_make_model_cli_writes_awq(tmp_path):
    from nanovllm.tools.make_model import main
    main(["--preset", "llama-tiny", "--out", str(tmp_path / "m"), "--awq", "--group-size", "64"])
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    assert cfg["quantization_config"]["group_size"] == 64
    assert Config(str(tmp_path / "m")).quantization == AWQConfig(64)
    with pytest.raises(SystemExit):  # 128 does not divide llama-tiny's hidden size 64
        main(["--preset", "llama-tiny", "--out", str(tmp_path / "bad"), "--awq", "--group-size", "128"])


def test_partly_dense_packed_projection_refused(awq_dirs, tmp_path):
    from nanovllm import LLM
    path = with_quant(awq_dirs["qwen3-g32"][0], tmp_path / "m", modules_to_not_convert=["q_proj"])
    with pytest.raises(ValueError, match="qkv_proj packs .* but modules_to_not_convert keeps only some"):
        LLM(path, max_model_len=256)


# ---- dummy weights (load_format="dummy") -------------------------------------------------------------

def test_dummy_awq_weights(tmp_path, make_llm):
    path = make_model("qwen3-tiny", str(tmp_path / "m"), weights=False, awq_group_size=32)
    llm = make_llm(path, load_format="dummy")
    proj = llm.model_runner.model.model.layers[0].mlp.gate_up_proj
    assert isinstance(proj, AWQLinear)
    codes = unpack(proj.qweight)
    assert codes.min() == 0 and codes.max() == 15 and codes.float().std() > 4  # random nibbles
    assert (proj.scales > 0).all()
    w = dequantize(proj.qweight, proj.qzeros, proj.scales, 32)
    assert 0.5 * 0.02 / 3**0.5 < w.std().item() < 1.5 * 0.02 / 3**0.5  # the spread of dense dummies
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert all(len(o["token_ids"]) == 4 for o in out)


# ---- the Triton W4A16 kernel ---------------------------------------------------------------------------

KERNEL_SCRIPT = r"""
import torch
from nanovllm.layers.awq_format import dequantize, pack
from nanovllm.layers.awq_gemm import awq_gemm
device = "{device}"
g = torch.Generator().manual_seed(0)
cases = [(1, 128, 96, 32, None), (5, 128, 96, 64, None), (33, 256, 136, 32, 1), (70, 128, 64, 128, 1),
         (3, 256, 64, 32, 4), (17, 64, 256, 16, 2)]   # M, K, N, group, split_k (None: the heuristic)
dtypes = [(torch.float32, 1e-5), (torch.float16, 1e-2)]
if device == "cuda":  # Triton 3.9's interpreter gets bf16 tl.dot wrong (1e10 errors on a bare 16x16 dot)
    dtypes.append((torch.bfloat16, 2e-2))
for dtype, tol in dtypes:
    for M, K, N, G, split in cases:
        codes = torch.randint(0, 16, (K, N), generator=g)
        zeros = torch.randint(0, 16, (K // G, N), generator=g)
        scales = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half()
        qw, qz = pack(codes).to(device), pack(zeros).to(device)
        x = torch.randn(M, K + 3, generator=g)[:, :K].to(dtype)   # strided rows
        x = x.to(device)
        y = awq_gemm(x, qw, qz, scales.to(device), G, split_k=split)
        assert y.dtype == dtype and y.shape == (M, N)
        ref = x.double() @ dequantize(qw, qz, scales.to(device), G).double()
        err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= tol, (dtype, M, K, N, G, split, err)
print("ok")
"""


def test_triton_kernel_interpreted():
    run_interpreted(KERNEL_SCRIPT)


@pytest.mark.gpu
def test_triton_kernel_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    run_on_gpu(KERNEL_SCRIPT)


@pytest.mark.gpu
def test_awq_engine_gpu_greedy(awq_dirs):
    """On CUDA (the Triton kernel, IEEE float32 dots) greedy equals the dequantized dense model's in
    float32 (the PyTorch attention backend, eager; scripts/bench_awq.py's decode runs CUDA graphs)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from nanovllm import LLM
    awq, dense = awq_dirs["qwen3-g32"]
    sp = SamplingParams(temperature=0, max_tokens=16)
    outs = []
    for path in (awq, dense):
        # A fixed page count (16 sequences x 256 tokens): sized by gpu_memory_utilization, qwen3-tiny's 8 KB
        # float32 pages fill 90% of an H200 with ~16M pages (a Python object each in the block manager),
        # and the first engine's cache, still alive while the second is built, leaves it no memory.
        llm = LLM(path, dtype="float32", attention_backend="torch", enforce_eager=True, max_model_len=256,
                  max_num_seqs=16, num_kvcache_blocks=512)
        outs.append([o["token_ids"] for o in llm.generate(PROMPTS, sp, use_tqdm=False)])
        llm.close()
        del llm
        torch.cuda.empty_cache()
    assert outs[0] == outs[1]


@pytest.mark.gpu
def test_awq_moe_engine_gpu(tmp_path, small_batch_kernels_off):
    """An AWQ Qwen3-MoE checkpoint on CUDA in bf16 (FlashInfer, CUDA graphs, the grouped expert GEMMs):
    the experts, dequantized on the GPU at load, equal the dequantized dense checkpoint's in bf16, and
    greedy text equals that checkpoint's engine (same settings) or parts at a near-tie of its logits
    (attention and the dense MLP run the int4 kernels on one side, bf16 GEMMs on the other). Small batches
    on cuBLAS and FlashInfer's decode (conftest.small_batch_kernels_off; the defaults' paths on this model
    are checked by tests/test_decode_gemm.py)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from nanovllm import LLM
    from test_gpu import identical_or_at_ties, next_token_logits
    from test_llama import random_prompts
    shape = dict(seed=0, hidden_size=256, num_attention_heads=8, head_dim=128, intermediate_size=512,
                 moe_intermediate_size=64)
    awq = make_model("qwen3-moe-tiny", str(tmp_path / "awq"), awq_group_size=32, **shape)
    src = make_model("qwen3-moe-tiny", str(tmp_path / "src"), **shape)
    dense = dequantized_copy(src, str(tmp_path / "deq"), 32, ("gate",))
    prompts = random_prompts(3, [5, 17, 33, 64, 100, 129, 250, 400])
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(dtype="bfloat16", max_model_len=1024, max_num_seqs=64, num_kvcache_blocks=2048)
    ref = LLM(dense, **kw)
    expected = [o["token_ids"] for o in ref.generate(prompts, sp, use_tqdm=False)]
    llm = LLM(awq, **kw)
    assert llm.model_runner.graphs is not None  # decode replays CUDA graphs
    ours, theirs = llm.model_runner.model.state_dict(), ref.model_runner.model.state_dict()
    for k in (k for k in theirs if k.endswith(("experts.gate_up_proj", "experts.down_proj"))):
        assert torch.equal(ours[k], theirs[k]), k
    got = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    identical = identical_or_at_ties(prompts, got, expected, lambda tokens: next_token_logits(ref, tokens))
    assert identical >= 6, identical


def test_triton_kernel_compiles_for_hopper():
    """The interpreter runs the kernel's math, not its lowering: compile it for sm_90 (Triton's own
    ptxas, no GPU needed) with every block shape awq_gemm picks, bf16 with and without split-K."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanovllm.layers.awq_gemm import _awq_gemm_kernel
    for (bm, bn), split in (((16, 64), 4), ((32, 64), 1), ((64, 64), 2), ((64, 128), 1)):
        out = "fp32" if split > 1 else "bf16"
        sig = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "y_ptr": f"*{out}",
               "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
        consts = dict(GROUP=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, SPLIT_K=split, IEEE=False)
        sig.update({name: "constexpr" for name in consts})
        kernel = triton.compile(ASTSource(_awq_gemm_kernel, sig, consts), target=GPUTarget("cuda", 90, 32))
        assert "mma" in kernel.asm["ptx"]  # tl.dot lowered to tensor-core instructions


# ---- the skinny-M W4A16 kernel (layers/awq_skinny.py) ----------------------------------------------------

SKINNY_CASES = """[  # M, K, N, group, config (None: TABLE / heuristic)
    (1, 256, 96, 32, None),                   # heuristic (FMA), N not a multiple of the column block
    (1, 512, 128, 128, C(64, 64, 3, fma=True)),   # 8 steps over 3 splits: 3, 3, 2
    (1, 256, 128, 64, C(32, 128, 2, gather=True, fma=True)),   # BLOCK_K 2 groups, gathered words
    (1, 256, 64, 32, C(64, 32, 1)),           # one row through tl.dot
    (3, 256, 64, 32, None),
    (3, 512, 256, 128, C(128, 64, 4)),
    (3, 256, 136, 64, C(64, 128, 2, gather=True)),   # 136 columns: 3 blocks, the last 8 wide
    (16, 512, 128, 64, C(64, 128, 4, stages=2, gather=True)),   # block_n 128 needs 232 KB in float32 (the H200: 227)
    (16, 256, 64, 32, C(64, 64, 1)),
    (16, 384, 96, 128, C(32, 128, 8)),        # more splits asked than steps (3): 3
    (17, 256, 64, 32, C(64, 32, 2)),          # 32-row tile
    (32, 256, 128, 64, C(64, 128, 2, gather=True)),
    (1, 256, 64, 32, C(64, 32, 1, magic=True)),       # magic weights (fp16/bf16; fp32 runs the float path)
    (3, 512, 256, 128, C(128, 64, 4, magic=True)),
    (16, 512, 128, 64, C(64, 128, 4, stages=2, gather=True, magic=True)),   # BLOCK_K 128 -> one group, 64
    (17, 256, 72, 32, C(64, 32, 2, magic=True)),      # 32-row tile, a partial column block
]
"""

SKINNY_SCRIPT = r"""
import torch
from nanovllm.layers import awq_skinny, split_k
from nanovllm.layers.awq_format import dequantize, pack
from nanovllm.layers.awq_gemm import awq_matmul
from nanovllm.layers.awq_skinny import SkinnyConfig as C, skinny_gemm
device = "{device}"
g = torch.Generator().manual_seed(0)
cases = """ + SKINNY_CASES + r"""
dtypes = [(torch.float32, 1e-5), (torch.float16, 1e-3)]
if device == "cuda":  # Triton 3.9's interpreter gets bf16 tl.dot wrong (see KERNEL_SCRIPT)
    dtypes.append((torch.bfloat16, 8e-3))
for dtype, tol in dtypes:
    for M, K, N, G, config in cases:
        codes = torch.randint(0, 16, (K, N), generator=g)
        zeros = torch.randint(0, 16, (K // G, N), generator=g)
        scales = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half().to(device)
        qw, qz = pack(codes).to(device), pack(zeros).to(device)
        x = torch.randn(M, K + 3, generator=g)[:, :K].to(dtype).to(device)   # strided rows
        ref = x.double() @ dequantize(qw, qz, scales, G).double()
        for y in (skinny_gemm(x, qw, qz, scales, G, config), skinny_gemm(x, qw, qz, scales, G, config)):
            assert y.dtype == dtype and y.shape == (M, N)
            err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
            assert err <= tol, (dtype, M, K, N, G, config, err)
        counters = split_k._COUNTERS.get(x.device)     # allocated by the first split call
        assert counters is None or not counters.any()       # every call leaves them zero
        if config is None:   # the layer's entry point takes this kernel up to MAX_M rows
            assert torch.equal(awq_matmul(x, qw, qz, scales, G), y)
print("ok")
"""


def test_skinny_kernel_interpreted():
    run_interpreted(SKINNY_SCRIPT)


@pytest.mark.gpu
def test_skinny_kernel_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    run_on_gpu(SKINNY_SCRIPT)


@pytest.mark.gpu
def test_skinny_kernel_cuda_graph_replay():
    """Captured after one eager call, replays give the eager result on new inputs: the split-K counters
    are zero again after every replay, the partial buffer is the graph pool's."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from nanovllm.layers.awq_skinny import SkinnyConfig, skinny_gemm
    K, N, G = 4096, 4096, 128
    qw, qz, scales, w = random_awq_cuda(K, N, G)
    for M in (1, 8):
        check_graph_replays(lambda x: skinny_gemm(x, qw, qz, scales, G, SkinnyConfig(64, 128, 8)), M, w)


def test_skinny_kernel_refusals():
    from nanovllm.layers.awq_format import pack
    from nanovllm.layers.awq_skinny import SkinnyConfig, m_bucket, skinny_gemm
    assert [m_bucket(m) for m in (1, 2, 3, 5, 16, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    with pytest.raises(ValueError, match="serves 1..32 rows, got 33"):
        m_bucket(33)
    qw, qz, s = pack(torch.zeros(64, 64, dtype=torch.int32)), pack(torch.zeros(2, 64, dtype=torch.int32)), \
        torch.ones(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="the FMA path serves one row, got 2"):
        skinny_gemm(torch.zeros(2, 64), qw, qz, s, 32, SkinnyConfig(64, 32, 1, fma=True))
    with pytest.raises(ValueError, match="x has 48 columns, qweight 64 rows"):
        skinny_gemm(torch.zeros(1, 48), qw, qz, s, 32)
    with pytest.raises(ValueError, match="block_n 24 must be a power of two"):
        skinny_gemm(torch.zeros(1, 64), qw, qz, s, 32, SkinnyConfig(24, 32, 1))


def _compile_skinny(consts: dict, dtype: str = "bf16", warps: int = 4, stages: int = 3):
    """The skinny kernel compiled for sm_90 on the CPU (Triton's ptxas) with these constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanovllm.layers.awq_skinny import _skinny_kernel
    sig = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "y_ptr": f"*{dtype}",
           "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
           "stride_ym": "i32", "k_per_split": "i32", "splits": "i32"}
    sig.update({name: "constexpr" for name in consts})
    return triton.compile(ASTSource(_skinny_kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def test_skinny_kernel_compiles_for_hopper():
    """Compiled for sm_90 on the CPU (Triton's ptxas): the FMA path (no tensor cores), tl.dot at 16 and
    32 rows, packed and gathered words, one group a step and several, with and without split-K."""
    from nanovllm.layers.awq_skinny import MAGIC_BITS
    int_to_float = {}
    for bm, bn, bk, fma, gather, split, magic in (
            (1, 128, 64, True, False, True, False), (1, 256, 32, True, True, False, False),
            (16, 128, 128, False, False, True, False), (32, 64, 128, False, True, True, False),
            (16, 64, 256, False, False, False, False), (16, 128, 128, False, False, True, True),
            (32, 64, 128, False, True, True, True)):
        bits, base = MAGIC_BITS[torch.bfloat16] if magic else (0, 0.0)
        ptx = _compile_skinny(dict(GROUP=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FMA=fma, GATHER=gather, SPLIT=split,
                                   IEEE=False, MAGIC=bits, BASE=base)).asm["ptx"]
        assert ("mma" in ptx) == (not fma), (bm, bn, bk, fma)   # tensor cores exactly on the tl.dot path
        assert ("atom" in ptx) == split                          # the split-K counter
        int_to_float[(bm, bn, bk, gather, magic)] = ptx.count("cvt.rn.f32.s32") + ptx.count("cvt.rn.f32.u32")
    # magic weights: no int -> float conversion of the nibbles (the zeros' [BLOCK_N] only), the float path one a nibble
    for (bm, bn, bk, gather, magic), count in int_to_float.items():
        if magic:
            plain = int_to_float[(bm, bn, bk, gather, False)]
            assert count < plain / 8, (bm, bn, bk, gather, count, plain)


HOPPER_SHARED_BYTES = 232448   # the most shared memory a program may have on an H100 / H200 (227 KB)


def _skinny_shared_bytes(config, M: int, K: int, group: int, dtype: str) -> int:
    """Shared memory of the skinny kernel compiled for sm_90 on the CPU as skinny_gemm launches it for M rows."""
    from nanovllm.layers.awq_skinny import launch_plan
    consts, _, _ = launch_plan(config, M, K, group, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    return _compile_skinny(consts, dtype, config.warps, config.stages).metadata.shared


def test_skinny_configs_fit_hopper_shared_memory():
    """Every config of awq_skinny.TABLE (bf16, its M bucket, group 128) and of the kernel tests (bf16 and
    fp32, as the GPU test runs them) compiles for sm_90 within an H100/H200 SM's shared memory: the GPU
    test once failed with OutOfResources on a gathered 16 x 128 x 128 tile at 3 stages (292 KB)."""
    from nanovllm.layers.awq_skinny import TABLE, SkinnyConfig as C
    assert TABLE, "the measured table is empty"
    for (bucket, N, K), config in TABLE.items():
        assert N % config.block_n == 0 and (bucket == 1 or not config.fma), (bucket, N, K, config)
        used = _skinny_shared_bytes(config, bucket, K, 128, "bf16")
        assert used <= HOPPER_SHARED_BYTES, ((bucket, N, K), config, used)
    for M, K, N, G, config in eval(SKINNY_CASES, {"C": C}):
        for dtype in ("bf16", "fp32"):
            if config is not None:
                used = _skinny_shared_bytes(config, M, K, G, dtype)
                assert used <= HOPPER_SHARED_BYTES, (M, K, N, G, config, dtype, used)
    assert _skinny_shared_bytes(C(128, 128, 4, gather=True), 16, 512, 64, "bf16") > HOPPER_SHARED_BYTES


def test_skinny_kernel_refuses_config_beyond_shared_memory(monkeypatch):
    """A launch that Triton refuses for lack of shared memory becomes a ValueError naming the config."""
    from triton.runtime.errors import OutOfResources

    from nanovllm.layers import awq_skinny
    from nanovllm.layers.awq_format import pack

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(299008, 232448, "shared memory")
            return launch
    monkeypatch.setattr(awq_skinny, "_skinny_kernel", Refusing())
    qw, qz, s = pack(torch.zeros(64, 64, dtype=torch.int32)), pack(torch.zeros(2, 64, dtype=torch.int32)), \
        torch.ones(2, 64, dtype=torch.float16)
    config = awq_skinny.SkinnyConfig(64, 32, 1, gather=True)
    with pytest.raises(ValueError, match=r"gather=True.*needs 299008 bytes of shared memory, the GPU has 232448"):
        awq_skinny.skinny_gemm(torch.zeros(2, 64), qw, qz, s, 32, config)


SWEEP_SCRIPT = r"""
import sys, time
sys.path.insert(0, "scripts")
import torch
import sweep_awq_gemm as sweep
from nanovllm.layers.awq_skinny import SkinnyConfig
sweep.DEVICE, sweep.DTYPE = "cpu", torch.float16   # the interpreter gets bf16 tl.dot wrong
sweep.candidates_round1 = lambda N, K, sms, fma: [SkinnyConfig(64, 64, s, fma=fma) for s in (1, 2)]
sweep.candidates_round2 = lambda b: [b, SkinnyConfig(b.block_n, b.block_k, b.splits, 8, 2, True, b.fma)]
def wall_us(make_call, copies):
    t = time.perf_counter(); make_call(0)(); return (time.perf_counter() - t) * 1e6
sweep.graph_us = wall_us
class FakeGemlite:   # gemlite needs CUDA: the column's wiring with the dequantized matmul in its place
    def __init__(self, qw, qz, s, group, dtype):
        self.w = sweep.dequantize(qw, qz, s, group).to(dtype)
    def __call__(self, x):
        return x @ self.w
sweep.GemliteAWQ = FakeGemlite
rows = sweep.sweep_shape("tiny", 256, 128, 64, [1, 3, 40], 4, torch.Generator().manual_seed(0), gemlite=True)
assert [r["M"] for r in rows] == [1, 3, 40] and "best" not in rows[2]   # 40 rows: the tiled kernel only
assert "table_us" not in rows[2] and all(r["gemlite_err"] <= 1e-2 and r["gemlite_vs_bf16"] > 0 for r in rows)
for r in rows[:2]:
    assert r["tried"] == (8 if r["M"] == 1 else 4) and not r.get("skipped"), r
    assert r["best_err"] <= 1e-2 and r["table_err"] <= 1e-2, r   # |y| ~ 0.3: float16 rounding, not a wrong kernel
    assert r["table_line"].startswith("(%d, 128, 256): SkinnyConfig(" % (1 if r["M"] == 1 else 4))
quick = sweep.sweep_shape("tiny", 256, 128, 64, [4], 4, torch.Generator().manual_seed(0), candidates=False)
assert "best" not in quick[0] and "default_us" not in quick[0] and "gemlite_us" not in quick[0]
assert quick[0]["table_err"] <= 1e-2 and quick[0]["table_GBs"] > 0
import contextlib, io
out = io.StringIO()
with contextlib.redirect_stdout(out):
    sweep.print_summary(rows + quick, 64, "cpu", True)
text = out.getvalue()
assert text.count("| tiny 256 x 128 |") == 4 and "(1, 128, 256): SkinnyConfig(" in text, text
print("ok")
"""


def test_sweep_script_wiring_interpreted():
    """scripts/sweep_awq_gemm.py's sweep on the CPU (interpreted kernels, wall-clock timer, two
    candidates a round, a stand-in for gemlite): rows per M, the tiled kernel alone past MAX_M, the
    table line of the best, --no-candidates rows, the summary table."""
    run_interpreted(SWEEP_SCRIPT)


# ---- gemlite (optional GPU backend, layers/awq_gemlite.py) -----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemlite_operands_rebuild_the_weight(dtype):
    """What gemlite is handed (codes [N, K], scales and zeros [N, K/G]) gives back AWQ's weight through
    gemlite's formula (W_q - zeros) * scales: exactly in float16, within bf16's rounding of the scales."""
    from nanovllm.layers.awq_gemlite import gemlite_operands
    g = torch.Generator().manual_seed(0)
    K, N, G = 256, 96, 64
    codes = torch.randint(0, 16, (K, N), generator=g)
    zeros = torch.randint(0, 16, (K // G, N), generator=g)
    scales = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half()
    q, s, z = gemlite_operands(pack(codes), pack(zeros), scales, G, dtype)
    assert q.dtype == torch.uint8 and q.shape == (N, K) and torch.equal(q.long(), codes.t())
    assert s.dtype == z.dtype == dtype and s.shape == z.shape == (N, K // G)
    assert torch.equal(z.long(), zeros.t())
    w = (q.double() - z.double().repeat_interleave(G, 1)) * s.double().repeat_interleave(G, 1)
    ref = dequantize(pack(codes), pack(zeros), scales, G).double().t()
    tol = 0 if dtype == torch.float16 else 2**-8 * ref.abs().max().item()
    assert (w - ref).abs().max().item() <= tol


def test_gemlite_refusals():
    from nanovllm.layers.awq_gemlite import GemliteAWQ, gemlite_operands
    qw, qz, s = pack(torch.zeros(64, 64, dtype=torch.int32)), pack(torch.zeros(2, 64, dtype=torch.int32)), \
        torch.ones(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 or bfloat16 activations, got torch.float32"):
        gemlite_operands(qw, qz, s, 32, torch.float32)
    with pytest.raises(ValueError, match="do not match group size 64"):
        gemlite_operands(qw, qz, s, 64, torch.float16)
    with pytest.raises(ValueError, match="gemlite runs on CUDA only"):
        GemliteAWQ(qw, qz, s, 32, torch.float16)


def _need_gemlite():
    import importlib.util
    if not torch.cuda.is_available() or importlib.util.find_spec("gemlite") is None:
        pytest.skip("needs CUDA and gemlite")


@pytest.mark.gpu
def test_gemlite_gpu():
    """gemlite on AWQ weights against the float64 matmul of the dequantized weights, at the M of each of
    its kernels (GEMV <= 4 rows, split-K GEMM 5..63, GEMM 64+), groups 32/64/128, fp16 and bf16."""
    _need_gemlite()
    from nanovllm.layers.awq_gemlite import GemliteAWQ
    g = torch.Generator().manual_seed(0)
    for K, N, G in ((256, 128, 32), (512, 256, 64), (1024, 384, 128)):
        codes = torch.randint(0, 16, (K, N), generator=g)
        zeros = torch.randint(0, 16, (K // G, N), generator=g)
        scales = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half().cuda()
        qw, qz = pack(codes).cuda(), pack(zeros).cuda()
        w = dequantize(qw, qz, scales, G).double()
        for dtype, tol in ((torch.float16, 1e-3), (torch.bfloat16, 8e-3)):
            layer = GemliteAWQ(qw, qz, scales, G, dtype)
            for M in (1, 3, 4, 5, 16, 17, 64):
                x = torch.randn(M, K, generator=g).to(dtype).cuda()
                y = layer(x)
                assert y.dtype == dtype and y.shape == (M, N)
                ref = x.double() @ w
                err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
                assert err <= tol, (K, N, G, dtype, M, err)


@pytest.mark.gpu
def test_gemlite_cuda_graph_replay():
    """Captured after an eager call at the same M, replays follow new inputs; an M never run eagerly is
    refused at capture (gemlite's autotuner would benchmark inside it)."""
    _need_gemlite()
    from nanovllm.layers.awq_gemlite import GemliteAWQ
    K, N, G = 4096, 4096, 128
    qw, qz, scales, w = random_awq_cuda(K, N, G)
    layer = GemliteAWQ(qw, qz, scales, G, torch.bfloat16)
    for M in (1, 8):
        x = torch.randn(M, K, device="cuda").bfloat16()
        layer(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        for _ in range(3):
            x.copy_(torch.randn(M, K, device="cuda"))
            graph.replay()
            ref = x.float() @ w
            assert (y.float() - ref).abs().max().item() <= 8e-3 * ref.abs().max().item()
            assert (y.float() - layer(x).float()).abs().max().item() <= 1e-2 * ref.abs().max().item()
    x = torch.randn(2, K, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match="M=2 captured before it ran eagerly"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            layer(x)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "gemlite"])
def test_awq_engine_gpu_kernels(tmp_path, monkeypatch, kernel):
    """bf16, CUDA graphs, on shapes every kernel takes: the default (auto) k-packs every AWQ layer at load
    (layers/awq_kpack.py; the AWQ words are dropped); NANOVLLM_AWQ_KERNEL=gemlite (when installed) gives
    every layer its gemlite copy and captures the one-row decode graph through it. Either way the logits
    follow the dequantized dense model's within bf16."""
    if kernel == "gemlite":
        _need_gemlite()
    elif not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from nanovllm import LLM
    monkeypatch.setenv("NANOVLLM_AWQ_KERNEL", kernel)
    shape = dict(seed=0, hidden_size=256, num_attention_heads=8, head_dim=128, intermediate_size=512)  # FlashInfer's head_dim
    awq = make_model("qwen3-tiny", str(tmp_path / "awq"), awq_group_size=32, **shape)
    dense = dequantized_copy(make_model("qwen3-tiny", str(tmp_path / "src"), **shape), str(tmp_path / "deq"), 32, ())
    tok = AutoTokenizer.from_pretrained(awq)
    token_lists = [tok.encode(p) for p in PROMPTS[:4]]
    results = []
    for path in (awq, dense):
        llm = LLM(path, dtype="bfloat16", max_model_len=256, max_num_seqs=16, num_kvcache_blocks=512)
        if path == awq:
            layers = [m for m in llm.model_runner.model.modules() if isinstance(m, AWQLinear)]
            if kernel == "gemlite":
                assert layers and all(m.kernel == "gemlite" and m._gemlite is not None for m in layers)
            else:
                assert layers and all(m.kernel == "kpack" and m._kpack is not None and m.qweight is None
                                      for m in layers)
                assert llm.model_runner.graphs is not None
        results.append(engine_logits(llm, token_lists, num_decode_steps=5))
        if path == awq and kernel == "gemlite":
            assert all(m._gemlite.eager_rows == {1} for m in layers)   # one-row steps only (awq_gemlite.MAX_M)
        llm.close()
        del llm
        torch.cuda.empty_cache()
    for (seq, rows), (seq_d, rows_d) in zip(*results):
        n = min(len(rows), len(rows_d))
        scale = rows_d.abs().max().item()
        assert (rows[:1] - rows_d[:1]).abs().max().item() <= 3e-2 * scale   # the prefill's row, same input
        if seq.token_ids == seq_d.token_ids:
            assert (rows[:n] - rows_d[:n]).abs().max().item() <= 3e-2 * scale
