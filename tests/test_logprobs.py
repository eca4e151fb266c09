"""Logprobs and prompt logprobs against transformers' own model on the same weights (float32
log_softmax of its logits): offline with chunked prefill, prefix caching, preemption, a mixed batch
and tensor parallelism; then through the server with the official `openai` client."""
import random

import httpx
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


def hf_greedy(hf_logprobs, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(hf_logprobs(ids)[-1].argmax().item())
    return ids[len(prompt):]


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


def test_cascade_decode_rows_reordered(tiny_model, make_llm, hf_logprobs):
    """Cascade attention reorders the rows of a step (groups sharing a prefix): each row's logprobs
    still reach its own sequence."""
    llm = make_llm(tiny_model, enable_cascade_attention=True, cascade_shared_prefix_len=32)
    system = random_prompts(7, [40])[0]
    prompts = random_prompts(8, [5, 9, 3, 12, 7, 6], prefix=system) + random_prompts(9, [20, 30])
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=k % 4 if k % 3 else None)
              for k in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats["cascade_steps"] > 0
    for out, sp in zip(outs, params):
        check_output(out, sp, hf_logprobs)


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
    """Two gloo ranks: a step with logprobs samples from all-gathered logits (greedy steps without
    them sample from each rank's vocabulary slice); every rank runs the same LM-head chunks."""
    from nanovllm import LLM
    llm = LLM(tiny_model, tensor_parallel_size=2, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=40)
    try:
        prompts = random_prompts(5, [30, 70, 8])
        sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=4, prompt_logprobs=4)
        for out in llm.generate(prompts, sp, use_tqdm=False):
            check_output(out, sp, hf_logprobs)
        # a short request with logprobs beside a longer one without: split-sampled steps follow
        plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2), plain]
        for out, p in zip(llm.generate(prompts[:2], params, use_tqdm=False), params):
            check_output(out, p, hf_logprobs)
            assert out["token_ids"] == hf_greedy(hf_logprobs, out["prompt_token_ids"], len(out["token_ids"]))
        assert_no_leaks(llm)
    finally:
        llm.close()


# ---- through the server, with the official client ------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_model):
    s = ServerThread(tiny_model, ["tiny"], max_model_len=512, max_num_seqs=16, max_num_batched_tokens=64).start()
    yield s
    s.stop()
    assert_no_leaks(s.engine.engine)


def check_legacy(logprobs, ids: list[int], ref: torch.Tensor, k: int, strings):
    """The legacy completions shape for `ids` (prompt first when echoed) against the reference."""
    assert logprobs.tokens == [strings[t] for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for p in range(1, len(ids)):
        assert abs(logprobs.token_logprobs[p] - ref[p - 1, ids[p]].item()) <= TOL
        top = logprobs.top_logprobs[p]
        expected = {strings[t]: ref[p - 1, t].item() for t in ref[p - 1].topk(k).indices.tolist() + [ids[p]]}
        assert top.keys() == expected.keys()
        assert all(abs(top[s] - expected[s]) <= TOL for s in top)
    offsets = [sum(len(strings[t]) for t in ids[:p]) for p in range(len(ids))]
    assert logprobs.text_offset == offsets


def test_completions_echo_logprobs_on_token_id_prompts(tiny_model, oai, hf_logprobs):
    """What lm-eval's loglikelihood sends: a batch of token-id prompts, echo, logprobs, max_tokens 1."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    strings = {t: tok.decode([t]) if t < len(tok) else "" for t in range(len(tok) + 64)}
    ascii_ids = [t for t in range(len(tok)) if strings[t].isascii() and strings[t].strip()]
    rng = random.Random(6)
    prompts = [[rng.choice(ascii_ids) for _ in range(n)] for n in (4, 19, 40)]
    r = oai.completions.create(model="tiny", prompt=prompts, max_tokens=1, logprobs=3, echo=True, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, r.choices):
        token = hf_logprobs(prompt)[-1].argmax().item()  # greedy: the reference's top token
        ids = prompt + [token]
        assert choice.text == tok.decode(prompt) + strings[token]
        check_legacy(choice.logprobs, ids, hf_logprobs(ids), 3, strings)
    # echo only (max_tokens 0): the prompt and its logprobs, nothing generated
    r = oai.completions.create(model="tiny", prompt=prompts[1], max_tokens=0, logprobs=0, echo=True)
    choice = r.choices[0]
    assert choice.text == tok.decode(prompts[1]) and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and len(choice.logprobs.tokens) == len(prompts[1])
    check_legacy(choice.logprobs, prompts[1], hf_logprobs(prompts[1]), 0, strings)
    assert "".join(choice.logprobs.tokens) == choice.text  # ASCII tokens: their strings add up to the text
    # without echo: only the completion, offsets from 0
    r = oai.completions.create(model="tiny", prompt=prompts[2], max_tokens=4, logprobs=2, temperature=0,
                               extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and lp.text_offset[0] == 0
    ids = list(prompts[2])
    for t in range(4):
        ref = hf_logprobs(ids)[-1]
        ids.append(ref.argmax().item())
        assert abs(lp.token_logprobs[t] - ref.max().item()) <= TOL
        assert lp.tokens[t] == strings[ids[-1]]


def test_streamed_completion_equals_whole(oai):
    kwargs = dict(model="tiny", prompt=[[11, 12, 13, 14, 15], [3, 4]], max_tokens=5, logprobs=2, echo=True,
                  temperature=0, extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kwargs)
    parts = {0: [], 1: []}
    for chunk in oai.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            parts[c.index].append(c)
    for choice in whole.choices:
        chunks = parts[choice.index]
        assert "".join(c.text for c in chunks) == choice.text
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            got = [x for c in chunks if c.logprobs for x in getattr(c.logprobs, field)]
            assert got == getattr(choice.logprobs, field), field


def test_chat_logprobs(tiny_model, oai, hf_logprobs):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "The schedule runs"}]
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=4, logprobs=True, top_logprobs=3,
                                    temperature=0, extra_body={"ignore_eos": True})
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    ids = list(prompt)
    for entry in content:
        ref = hf_logprobs(ids)[-1]
        token = ref.argmax().item()
        assert entry.token == tok.decode([token]) and abs(entry.logprob - ref[token].item()) <= TOL
        assert bytes(entry.bytes).decode(errors="replace") == entry.token or not entry.token.isascii()
        top = ref.topk(3)
        assert [e.token for e in entry.top_logprobs] == [tok.decode([t]) if t < len(tok) else ""
                                                        for t in top.indices.tolist()]
        assert all(abs(e.logprob - v) <= TOL for e, v in zip(entry.top_logprobs, top.values.tolist()))
        ids.append(token)
    # logprobs without top_logprobs: the token's own logprob and no alternatives
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=2, logprobs=True, temperature=0)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[], []]
    # streamed: the same entries, chunk by chunk
    streamed = [e for chunk in oai.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                                            logprobs=True, top_logprobs=3, temperature=0,
                                                            stream=True, extra_body={"ignore_eos": True})
                for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": "2"}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1, "echo": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_logprob_requests_get_400(server, path, body, param):
    r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tokenizer_info_and_version(tiny_model, server):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tok.eos_token and info["pad_token"] == tok.pad_token
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == 512
    assert httpx.get(f"{server.url}/version", timeout=30).json()["version"]
