"""Sampling: seeds reproduce, top-k / top-p restrict the support, temperature 0 is greedy."""
import pytest
import torch

from nanovllm import SamplingParams
from nanovllm.layers.sampler import Sampler

LOGITS = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0]])
PROBS = torch.softmax(LOGITS[0], -1)


def draw(n, **kw):
    sampler = Sampler()
    logits = LOGITS.expand(n, -1).contiguous()
    ones = torch.ones(n)
    top_ks = torch.full((n,), kw["top_k"]) if "top_k" in kw else None
    top_ps = torch.full((n,), kw["top_p"]) if "top_p" in kw else None
    return sampler(logits, ones * kw.get("temperature", 1.0), top_ks, top_ps)


def test_greedy_is_argmax():
    assert draw(64, temperature=0.0).unique().tolist() == [0]


def test_top_k_restricts_support():
    tokens = draw(4000, top_k=3)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    # p=0.75: the two most likely tokens hold 0.42+0.25 = 0.67 < 0.75, so the third is needed too.
    assert PROBS[:2].sum() < 0.75 < PROBS[:3].sum()
    tokens = draw(4000, top_p=0.75)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_top_p_one_keeps_everything():
    assert len(set(draw(20000, top_p=1.0).tolist())) == 8


def test_sampling_follows_the_distribution():
    tokens = draw(40000)
    freq = torch.bincount(tokens, minlength=8).float() / len(tokens)
    assert (freq - PROBS).abs().max() < 0.015


def test_seeded_requests_reproduce_whatever_the_batch(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], sp, use_tqdm=False)[0]["token_ids"]
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batched = llm.generate(["Once upon a time", "noise prompt", "more noise"], [sp, others, others], use_tqdm=False)
    assert batched[0]["token_ids"] == alone
    different = llm.generate(["Once upon a time"], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                                  ignore_eos=True), use_tqdm=False)[0]["token_ids"]
    assert different != alone


def test_stop_strings_and_stop_token_ids(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    free = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert len(free["text"]) > 4
    stop = free["text"][3:5]
    out = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0]
    assert out["finish_reason"] == "stop"
    assert stop not in out["text"] and free["text"].startswith(out["text"])
    tok = free["token_ids"][2]
    out = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok]), use_tqdm=False)[0]
    assert out["finish_reason"] == "stop" and out["token_ids"][-1] == tok
    assert len(out["token_ids"]) == free["token_ids"].index(tok) + 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(max_tokens=0),
                                    dict(top_k=-2), dict(max_tokens=1.5), dict(top_k=2**63), dict(seed=2**64),
                                    dict(top_p=1e-300)])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_stop_string_on_the_last_allowed_token_reports_stop(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    free = llm.generate(["Item 2: value"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    last_piece = llm.tokenizer.decode(free["token_ids"][-1:])
    assert last_piece.strip(), "the test needs a visible last token"
    out = llm.generate(["Item 2: value"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                         stop=[last_piece]), use_tqdm=False)[0]
    assert out["finish_reason"] == "stop"


def test_seeded_output_does_not_depend_on_prompt_chunking(tiny_model, make_llm):
    """A prompt chunk short of the end samples nothing, so it must not draw from the request's generator."""
    sp = SamplingParams(temperature=1.0, seed=123, max_tokens=12, ignore_eos=True)
    prompt = list(range(100, 140))
    alone = make_llm(tiny_model).generate([prompt], sp, use_tqdm=False)[0]["token_ids"]
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    for budget in (64, 16):
        llm = make_llm(tiny_model, max_num_batched_tokens=budget, enable_prefix_caching=False)
        chunked = llm.generate([list(range(300, 350)), prompt], [other, sp], use_tqdm=False)[1]["token_ids"]
        assert chunked == alone, budget
