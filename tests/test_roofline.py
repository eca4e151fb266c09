"""scripts/roofline.py against the floors stated in the project's workloads.md (one H200: 4.3 TB/s,
~700 TFLOP/s GEMM, ~450 TFLOP/s attention; random Qwen3-0.6B, bf16), each recomputed here by plain
arithmetic from the workload's definition and the HF model's own parameter count."""
import importlib.util
import json
import os

import pytest

from nanovllm import benchmark
from nanovllm.tools.make_model import num_parameters

_path = os.path.join(os.path.dirname(__file__), "..", "scripts", "roofline.py")
_spec = importlib.util.spec_from_file_location("roofline", _path)
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)

BW = 4.3e12


@pytest.fixture(scope="module")
def qwen06():
    cfg = roofline.model_shape(preset="qwen3-0.6b")
    from nanovllm.tools.make_model import build_config
    params = num_parameters(build_config("qwen3-0.6b", None, {})[0])   # tied embeddings: counted once
    kv = 2 * 28 * 8 * 128 * 2                                           # K and V, 28 layers, 8 heads of 128, bf16
    return cfg, params * 2, kv


def test_weights_and_kv_bytes_match_the_hf_model(qwen06):
    cfg, weight_bytes, kv = qwen06
    costs = roofline.shape_costs(cfg)
    assert costs["weight_bytes"] == weight_bytes
    assert abs(weight_bytes - 1.2e9) < 0.02e9
    assert costs["kv_bytes_per_token"] == kv == 114688


def test_w5_bytes_per_decode_step_and_floor(qwen06):
    cfg, weight_bytes, kv = qwen06
    r = roofline.workload_floor("w5", cfg)
    steps = 511                                    # 512 output tokens, the first from prefill
    own = sum(128 * (64 + s) for s in range(1, steps + 1)) / steps * kv
    expect = weight_bytes + 4 * 16384 * kv + own   # the 4 documents once per step, each request's own tokens
    assert r["decode_steps"] == steps
    assert r["bytes_per_decode_step"] == pytest.approx(expect, rel=1e-9)
    assert r["shared_kv_bytes_per_step"] == pytest.approx(4 * 16384 * kv, rel=1e-9)
    assert r["bytes_per_decode_step"] == pytest.approx(13.4e9, rel=0.02)       # workloads.md: ~13.4 GB
    assert r["decode_s"] == pytest.approx(expect * steps / BW, rel=1e-9)       # ~1.6 s
    assert r["prefill_tokens"] == 4 * 16384 + 128 * 64 and r["cached_prompt_tokens"] == 124 * 16384
    assert r["prefill_s"] == pytest.approx(0.4, rel=0.15)                      # workloads.md: ~0.4 s
    assert r["seconds"] == pytest.approx(2.0, rel=0.05)
    assert r["output_tok_s"] == pytest.approx(33000, rel=0.05)
    # Without cascade each request reads its document every step.
    off = roofline.workload_floor("w5", cfg, cascade=False)
    assert off["bytes_per_decode_step"] == pytest.approx(expect + (128 - 4) * 16384 * kv, rel=1e-9)


def test_w1_floor_near_3_5_s(qwen06):
    cfg, weight_bytes, kv = qwen06
    prompts, params = benchmark.w1(10000)
    outs = [s.max_tokens for s in params]
    # All 256 run at once (512 seqs allowed, ~34 GB of KV fits the H200); no shared pages.
    kv_reads = sum(sum(len(p) + s for s in range(1, o)) for p, o in zip(prompts, outs))
    steps = max(outs) - 1
    decode = (weight_bytes * steps + kv_reads * kv) / BW
    r = roofline.workload_floor("w1", cfg)
    assert r["decode_steps"] == steps and r["cached_prompt_tokens"] == 0
    assert r["decode_s"] == pytest.approx(decode, rel=1e-9)
    assert r["decode_s"] == pytest.approx(3.5, rel=0.03)                       # workloads.md: ~3.5 s
    assert sum(outs) / r["decode_s"] == pytest.approx(38000, rel=0.03)         # ~38,000 tok/s (decode)
    assert r["seconds"] == pytest.approx(3.5, rel=0.1)                         # with prefill


def test_w2_cascade_floor_near_2_75_s(qwen06):
    cfg, _, _ = qwen06
    assert roofline.workload_floor("w2", cfg)["decode_s"] == pytest.approx(2.75, rel=0.03)
    assert roofline.workload_floor("w2", cfg, cascade=False)["decode_s"] == pytest.approx(16.2, rel=0.03)


def test_memory_budget_serializes_requests():
    costs = dict(weight_bytes=100.0, matmul_params=0, lm_head_params=0, kv_bytes_per_token=1, attn_flops_per_pair=0)
    reqs = [([1] * 8, 5), ([2] * 8, 5)]
    both = roofline.floor(costs, reqs, max_num_seqs=8, bandwidth=1.0, page=4)
    one = roofline.floor(costs, reqs, max_num_seqs=8, bandwidth=1.0, page=4, kv_budget=20)
    assert both["decode_steps"] == 4 and one["decode_steps"] == 8
    # Each step reads the weights and each running request's context (8 + s tokens at step s).
    assert both["decode_s"] == 4 * 100 + 2 * sum(8 + s for s in range(1, 5))
    assert one["decode_s"] == 8 * 100 + 2 * sum(8 + s for s in range(1, 5))


def test_main_prints_fraction_of_the_floor(capsys, tmp_path):
    line = dict(workload="w5", cascade=True, seconds=4.0, output_tok_s=16384.0, gpu="H200")
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps(line) + "\n" + json.dumps({**line, "cascade": False, "seconds": 9.0}) + "\n")
    r = roofline.main(["--preset", "qwen3-0.6b", "--workload", "w5", "--bench", str(bench)])
    out = capsys.readouterr().out
    assert len(r["measured"]) == 1
    assert f"{r['seconds'] / 4.0:.1%} of the floor's speed" in out
    r2 = roofline.main(["--preset", "qwen3-0.6b", "--workload", "w5", "--bench", json.dumps(line),
                        "--bandwidth-tb-s", "8.6"])
    assert r2["decode_s"] == pytest.approx(r["decode_s"] / 2, rel=0.01)


def test_fp8_kv_halves_the_kv_bytes_and_matches_fp8_runs_only(qwen06, tmp_path):
    """--kv-cache-dtype fp8: one byte a KV value (weights stay bf16); --bench pairs fp8 runs with it."""
    cfg, _, _ = qwen06
    bf16, fp8 = roofline.shape_costs(cfg), roofline.shape_costs(cfg, 2, 1)
    assert fp8["kv_bytes_per_token"] * 2 == bf16["kv_bytes_per_token"] == 114_688
    assert fp8["weight_bytes"] == bf16["weight_bytes"]
    line = dict(workload="w5", cascade=True, seconds=4.3, output_tok_s=15244.0, gpu="H200")
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({**line, "kv_cache_dtype": "fp8_e4m3"}) + "\n" + json.dumps({**line, "seconds": 3.6}) + "\n")
    r = roofline.main(["--preset", "qwen3-0.6b", "--workload", "w5", "--kv-cache-dtype", "fp8", "--bench", str(bench)])
    assert [m["seconds"] for m in r["measured"]] == [4.3]
    assert r["bytes_per_decode_step"] == pytest.approx(1.19e9 + 13.41e9 / 2 - 1.19e9 / 2, rel=0.01)
