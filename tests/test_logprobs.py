"""Logprobs and prompt logprobs against transformers' own model on the same weights (float32
log_softmax of its logits): offline with chunked prefill, prefix caching, preemption, a mixed batch
and tensor parallelism; then through the server with the official `openai` client."""
import random

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_no_leaks
from nanovllm import SamplingParams
from nanovllm.entrypoints.serve import ServerThread

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model):
    """token ids -> [len, vocab] float32 log_softmax of transformers' logits (cached per sequence)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    cache = {}

    def run(ids):
        key = tuple(ids)
        if key not in cache:
            with torch.no_grad():
                cache[key] = torch.log_softmax(model(torch.tensor([list(ids)])).logits[0].float(), dim=-1)
        return cache[key]
    return run


def check_position(ours: dict, ref: torch.Tensor, target: int, k: int):
    """ours: {token_id: logprob} of one position; ref: the reference log_softmax row there."""
    assert target in ours
    assert len(ours) in (k, k + 1) and (len(ours) == k) == (target in list(ours)[:k])
    for token, lp in ours.items():
        assert abs(lp - ref[token].item()) <= TOL, (token, lp, ref[token].item())
    top = list(ours.values())[:k]
    assert top == sorted(top, reverse=True)
    assert torch.allclose(torch.tensor(top), ref.topk(k).values, atol=TOL, rtol=0)


def check_output(out: dict, sp: SamplingParams, hf_logprobs):
    prompt, completion = out["prompt_token_ids"], out["token_ids"]
    ref = hf_logprobs(prompt + completion)
    n = len(prompt)
    if sp.logprobs is None:
        assert out["logprobs"] is None
    else:
        assert len(out["logprobs"]) == len(completion)
        for i, (token, ours) in enumerate(zip(completion, out["logprobs"])):
            check_position(ours, ref[n - 1 + i], token, sp.logprobs)
    if sp.prompt_logprobs is None:
        assert out["prompt_logprobs"] is None
    else:
        assert len(out["prompt_logprobs"]) == n and out["prompt_logprobs"][0] is None
        for p in range(1, n):
            check_position(out["prompt_logprobs"][p], ref[p - 1], prompt[p], sp.prompt_logprobs)


def random_prompts(seed, lengths, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(1900) for _ in range(n)] for n in lengths]


def test_mixed_batch_chunked_prefill(tiny_model, make_llm, hf_logprobs):
    """Rows that ask and rows that do not, different k, greedy and sampled rows, prompts chunked over
    several prefill steps (a 48-token budget)."""
    llm = make_llm(tiny_model, max_num_batched_tokens=48)
    prompts = random_prompts(1, [5, 70, 1, 33, 130, 17])
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2),
              SamplingParams(temperature=0.8, seed=3, max_tokens=5, ignore_eos=True, logprobs=0, prompt_logprobs=5),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=5, top_p=0.9, max_tokens=7, ignore_eos=True, logprobs=20,
                             prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=1)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats["prefill_steps"] > 3
    for out, sp in zip(outs, params):
        check_output(out, sp, hf_logprobs)
    assert outs[2]["prompt_logprobs"] == [None]  # a one-token prompt has no prefix to score it with
    # the greedy rows sampled the top token: their own logprob is the largest
    assert all(max(d.values()) == d[t] for d, t in zip(outs[0]["logprobs"], outs[0]["token_ids"]))


def test_prefix_cache_is_bypassed_for_prompt_logprobs(tiny_model, make_llm, hf_logprobs):
    """A cached system prompt serves requests without prompt logprobs; one that asks recomputes it
    (and still shares nothing wrong with the others in the same batch)."""
    llm = make_llm(tiny_model, enable_prefix_caching=True)
    system = random_prompts(2, [64])[0]
    first = random_prompts(3, [9, 12], prefix=system)
    plain = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)
    asks = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=3)
    llm.generate(first[:1], plain, use_tqdm=False)
    outs = llm.generate(first, [plain, asks], use_tqdm=False)
    assert outs[0]["num_cached_tokens"] >= 48  # served from the cache
    assert outs[1]["num_cached_tokens"] == 0   # recomputed: its prompt logprobs need every position
    check_output(outs[0], plain, hf_logprobs)
    check_output(outs[1], asks, hf_logprobs)


def test_preemption_keeps_one_entry_per_token(tiny_model, make_llm, hf_logprobs):
    """Few pages: sequences are preempted and re-prefilled (from their own cached pages); logprobs
    stay one per completion token and prompt logprobs are not computed twice."""
    llm = make_llm(tiny_model, num_kvcache_blocks=24, max_num_batched_tokens=64)
    prompts = random_prompts(4, [40, 50, 45, 60, 35])
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    for out in outs:
        check_output(out, sp, hf_logprobs)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_values_are_refused(tiny_model, make_llm, field, value):
    llm = make_llm(tiny_model)
    with pytest.raises(ValueError, match=field):
        llm.generate([[1, 2, 3]], SamplingParams(**{field: value}), use_tqdm=False)


def test_tensor_parallel_equals_transformers(tiny_model, hf_logprobs):
    """Two gloo ranks: the logits are all-gathered, every rank runs the same LM-head chunks."""
    from nanovllm import LLM
    llm = LLM(tiny_model, tensor_parallel_size=2, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=40)
    try:
        prompts = random_prompts(5, [30, 70, 8])
        sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=4, prompt_logprobs=4)
        for out in llm.generate(prompts, sp, use_tqdm=False):
            check_output(out, sp, hf_logprobs)
        assert_no_leaks(llm)
    finally:
        llm.close()
