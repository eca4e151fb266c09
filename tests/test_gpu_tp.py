"""Tensor parallelism on two GPUs (NCCL, CUDA graphs, FlashInfer's custom all-reduce): greedy tokens
of TP=2 against TP=1 on random Qwen3-0.6B shapes, graphs replayed on every rank, cascade on.
Runs on a machine with two GPUs (scripts/gpu_tp_check.sh)."""
import os
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from test_gpu import PROMPTS, first_divergence, next_token_logits  # the one-GPU parity test's prompts and helpers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]


@pytest.fixture(scope="module")
def model_06b(tmp_path_factory):
    import os
    path = "/tmp/qwen3-0.6b"
    if not os.path.exists(os.path.join(path, "config.json")):
        from nanovllm.tools.make_model import make_model
        make_model("qwen3-0.6b", path, seed=0)
    return path


def compare(ref_llm, got, expected, prompts, what):
    report = []
    for prompt, a, b in zip(prompts, got, expected):
        d = first_divergence(a, b)
        if d is None:
            report.append("identical")
            continue
        logits = next_token_logits(ref_llm, prompt + b[:d])  # the one-rank reference's, at the divergence
        gap = float(logits.max() - logits[a[d]])
        report.append(f"diverges at {d}: pick {gap:.4f} below the reference's best")
        assert gap <= 0.0625, f"{what}: {report[-1]}"  # a bf16 rounding flip, not a bug
    print(f"{what}:", report)  # random weights: bf16 logits tie often, so only ties may part the two


def shared_prompts():
    rng = random.Random(0)
    prompts = []
    for sys_len, members in ((80, 6), (300, 8), (1000, 5), (200, 70)):
        system = [rng.randrange(1900) for _ in range(sys_len)]
        prompts += [system + [rng.randrange(1900) for _ in range(rng.randrange(3, 50))] for _ in range(members)]
    rng.shuffle(prompts)
    return prompts


def test_tp2_greedy_equals_tp1_with_graphs_and_cascade(model_06b):
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    common = dict(dtype="bfloat16", max_model_len=2048, max_num_seqs=128, num_kvcache_blocks=4096)
    one = LLM(model_06b, **common)
    expected = [o["token_ids"] for o in one.generate(PROMPTS, sp, use_tqdm=False)]
    shared = shared_prompts()
    expected_shared = [o["token_ids"] for o in one.generate(shared, sp, use_tqdm=False)]

    two = LLM(model_06b, tensor_parallel_size=2, **common)
    try:
        got = [o["token_ids"] for o in two.generate(PROMPTS, sp, use_tqdm=False)]
        assert two.model_runner.graphs.replays > 0, "decode ran eagerly under TP"
        from nanovllm.distributed.parallel_state import group
        car = group().custom_ar
        print("custom all-reduce:", car)
        if not os.environ.get("NANOVLLM_CUSTOM_AR_BACKEND"):  # the default, "auto": both kernels, the fused one used
            assert type(car).__name__ == "TieredAllReduce" and car.fused_calls > 0, car
        compare(one, got, expected, PROMPTS, "TP=2 vs TP=1 (graphs)")
        bm = two.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    finally:
        two.close()

    on = LLM(model_06b, tensor_parallel_size=2, enable_cascade_attention=True, **common)
    try:
        from nanovllm.cascade.cost_model import AlwaysCascade
        on.step_builder.cascade.cost_model = AlwaysCascade()
        replays = on.model_runner.graphs.replays
        got = [o["token_ids"] for o in on.generate(shared, sp, use_tqdm=False)]
        assert on.stats["cascade_steps"] > 0 and on.model_runner.graphs.replays > replays
        compare(one, got, expected_shared, shared, "TP=2 cascade on vs TP=1 cascade off")
    finally:
        on.close()


def test_tp2_greedy_with_fused_all_reduce_norm(model_06b, monkeypatch):
    """NANOVLLM_CUSTOM_AR_BACKEND=trtllm (every rank inherits it): each layer's o_proj and down_proj sums
    are taken by the norm after them in one all-reduce + residual + RMSNorm kernel (models/llama.py),
    eagerly in prefill and inside the decode graphs; greedy tokens as TP=1's up to near-ties."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    common = dict(dtype="bfloat16", max_model_len=2048, max_num_seqs=128, num_kvcache_blocks=4096)
    one = LLM(model_06b, **common)
    expected = [o["token_ids"] for o in one.generate(PROMPTS, sp, use_tqdm=False)]
    monkeypatch.setenv("NANOVLLM_CUSTOM_AR_BACKEND", "trtllm")
    two = LLM(model_06b, tensor_parallel_size=2, **common)
    try:
        from nanovllm.distributed.parallel_state import group
        car = group().custom_ar
        assert car.backend == "trtllm" and not car.disabled, car
        calls = car.fused_calls   # graph capture ran them once each
        got = [o["token_ids"] for o in two.generate(PROMPTS, sp, use_tqdm=False)]
        assert calls > 0 and car.fused_calls > calls, "no fused all-reduce + norm ran"
        assert two.model_runner.graphs.replays > 0, "decode ran eagerly under TP"
        compare(one, got, expected, PROMPTS, "TP=2 fused all-reduce + norm vs TP=1")
    finally:
        two.close()


def test_tp2_prefill_pieces_on_copy_engines(model_06b, monkeypatch):
    """Every prefill step of 4+ rows in two pieces (the threshold lowered on every rank), those of several requests
    cut between them and attending apart, their sums on the copy engines (distributed/copy_engine_all_reduce.py):
    greedy tokens as TP=1's up to near-ties, with and without cascade (whose prefill steps are cut in half)."""
    from nanovllm.models import tp_overlap
    monkeypatch.setenv("NANOVLLM_TP_PREFILL_PIECE_BYTES", "4096")   # the workers read it as they import tp_overlap
    monkeypatch.setattr(tp_overlap, "MIN_PIECE_BYTES", 4096)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    common = dict(dtype="bfloat16", max_model_len=2048, max_num_seqs=128, num_kvcache_blocks=4096)
    one = LLM(model_06b, **common)
    shared = shared_prompts()
    expected = [o["token_ids"] for o in one.generate(shared, sp, use_tqdm=False)]
    for cascade in (False, True):
        two = LLM(model_06b, tensor_parallel_size=2, enable_cascade_attention=cascade, **common)
        try:
            from nanovllm.distributed.parallel_state import group
            ce = group().ce_ar
            assert ce is not None, "copy-engine all-reduce not set up"
            backend, planned = two.model_runner.backend, []
            plan_pieces = backend.plan_pieces
            monkeypatch.setattr(backend, "plan_pieces", lambda batch, r: planned.append(r) or plan_pieces(batch, r))
            got = [o["token_ids"] for o in two.generate(shared, sp, use_tqdm=False)]
            assert ce.sums_started > 0
            assert planned or cascade, "no prefill step was cut between requests"
            compare(one, got, expected, shared, f"TP=2 prefill pieces on copy engines (cascade {cascade}) vs TP=1")
            bm = two.scheduler.block_manager
            assert bm.num_free_blocks == bm.num_blocks
        finally:
            two.close()
