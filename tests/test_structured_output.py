"""Structured output (xgrammar): on the tiny random-weight model, whose unconstrained tokens are arbitrary,
every output that finishes must parse and validate (jsonschema, re.fullmatch, the choice list); the
mask itself equals xgrammar's own apply_token_bitmask_inplace; bad grammars are refused at the edge
(offline ValueError, server 400) and the engine keeps serving; tensor parallelism samples the same
constrained tokens; no page leaks."""
import json
import re

import jsonschema
import numpy as np
import pytest
import torch
import xgrammar as xgr

from nanovllm import SamplingParams, StructuredOutput
from nanovllm.engine.grammar import bitmask_words
from nanovllm.layers.grammar_mask import apply_grammar_mask
from test_tensor_parallel import tp_llm  # noqa: F401  (fixture: closes the workers, checks none is left)

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "active": {"type": "boolean"}},
     "required": ["name", "age", "active"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 9999},
            "role": {"enum": ["admin", "user", "guest"]}},
            "required": ["id", "role"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,5}$"}, "maxItems": 3}},
     "required": ["user", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]}, "minItems": 1, "maxItems": 4}},
     "required": ["color", "sizes"], "additionalProperties": False},
    {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -10, "maximum": 10},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "ok": {"type": "boolean"},
        "note": {"type": "null"}},
     "required": ["x", "ok", "note"], "additionalProperties": False},
    {"type": "object", "properties": {
        "items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "express": {"type": "boolean"}},
     "required": ["items", "express"], "additionalProperties": False},
]

REGEX = r"[0-9]{3}-[a-z]{2,4}( ok)?"
CHOICES = ["yes", "no", "maybe so", "it \"depends\""]


def guided(**kind) -> StructuredOutput:
    return StructuredOutput(**kind)


def prompts(n: int) -> list[list[int]]:
    return [[(11 * i + 7 * j) % 1900 + 1 for j in range(3 + i % 13)] for i in range(n)]


def test_mask_matches_xgrammar_kernel():
    """apply_grammar_mask on a subset of rows == xgrammar's CPU kernel; vocabulary slices (tensor
    parallelism) masked with their offset are the full mask's columns."""
    g = torch.Generator().manual_seed(0)
    rows, vocab = 6, 100  # not a multiple of 32: the last word's high bits are past the vocabulary
    logits = torch.randn(rows, vocab, generator=g)
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, bitmask_words(vocab)), dtype=torch.int32, generator=g)
    masked_rows = np.array([0, 2, 5])
    ours = apply_grammar_mask(logits.clone(), masked_rows, bitmask.numpy())
    expected = logits.clone()
    full = torch.full((rows, bitmask_words(vocab)), -1, dtype=torch.int32)
    full[torch.from_numpy(masked_rows)] = bitmask
    xgr.apply_token_bitmask_inplace(expected, full, vocab_size=vocab)
    assert torch.equal(ours, expected)
    assert torch.isinf(ours[masked_rows]).any() and not torch.isinf(ours[[1, 3, 4]]).any()
    for first, width in ((0, 37), (37, 40), (77, 23)):
        shard = apply_grammar_mask(logits[:, first:first + width].clone(), masked_rows, bitmask.numpy(), first)
        assert torch.equal(shard, expected[:, first:first + width])


def test_structured_output_validation():
    for kwargs in ({}, {"json": {"type": "object"}, "regex": "a"}, {"json_object": True, "choice": ["a"]}):
        with pytest.raises(ValueError, match="exactly one"):
            StructuredOutput(**kwargs)
    with pytest.raises(ValueError, match="json is not valid JSON"):
        StructuredOutput(json="{not json")
    with pytest.raises(ValueError, match="JSON schema object"):
        StructuredOutput(json="[1, 2]")
    with pytest.raises(ValueError, match="choice"):
        StructuredOutput(choice=["a", ""])
    with pytest.raises(ValueError, match="regex"):
        StructuredOutput(regex="")
    with pytest.raises(ValueError, match="structured_output must be a StructuredOutput"):
        SamplingParams(structured_output={"json": {}})
    assert StructuredOutput(json='{"type": "object"}').json == {"type": "object"}
    # key order is kept in the cache key: it is the order properties are written in
    a = StructuredOutput(json={"properties": {"a": {}, "b": {}}}).key()
    b = StructuredOutput(json={"properties": {"b": {}, "a": {}}}).key()
    assert a != b and a == StructuredOutput(json='{"properties": {"a": {}, "b": {}}}').key()


def test_bad_grammars_are_refused_and_the_engine_keeps_serving(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    good = SamplingParams(max_tokens=40, seed=1, structured_output=guided(choice=["yes", "no"]))
    for bad, words in ((guided(json={"type": "foo"}), "json does not compile: Unsupported type"),
                       (guided(regex="(ab"), "regex does not compile"),
                       (guided(grammar="root ::= "), "grammar does not compile")):
        with pytest.raises(ValueError, match=re.escape(words)):
            llm.generate([[1, 2, 3], [4, 5]], [good, SamplingParams(structured_output=bad)], use_tqdm=False)
        assert llm.is_finished() and not llm.seqs  # nothing was queued
    assert llm.generate([[1, 2, 3]], good, use_tqdm=False)[0]["text"] in ("yes", "no")
    # choices are literals: quotes, backslashes, newlines and non-ASCII stay what they are
    odd = ['say "hi"', "back\\slash", "two\nlines", "é ü"]
    compiled = llm.grammar_compiler.compile(guided(choice=odd))
    for text in odd:
        matcher = xgr.GrammarMatcher(compiled)
        assert matcher.accept_string(text) and matcher.is_completed(), text
    assert not xgr.GrammarMatcher(compiled).accept_string("say hi")
    assert llm.grammar_compiler.compile(guided(choice=odd)) is compiled  # cached


@pytest.mark.slow
def test_json_schemas_200_requests(tiny_model, make_llm):
    """200 sampled requests (temperature 1, seeded) over 5 schemas: each output that finishes by the
    grammar parses and validates; length-finished ones are a prefix the grammar still accepts."""
    llm = make_llm(tiny_model, max_num_seqs=256)
    n = 200
    short = set(range(7, n, 20))  # 6 tokens: too few for any schema
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=6 if i in short else 120,
                             structured_output=guided(json=SCHEMAS[i % 5])) for i in range(n)]
    outs = llm.generate(prompts(n), params, use_tqdm=False)
    length = 0
    for i, out in enumerate(outs):
        if out["finish_reason"] == "length":
            if i not in short:
                length += 1
            matcher = xgr.GrammarMatcher(llm.grammar_compiler.compile(params[i].structured_output))
            assert all(matcher.accept_token(t) for t in out["token_ids"]) and not matcher.is_terminated()
            continue
        assert i not in short
        assert out["finish_reason"] == "stop"
        assert out["token_ids"][-1] in llm.config.eos_token_ids  # the grammar's stop token ended it
        jsonschema.validate(json.loads(out["text"]), SCHEMAS[i % 5])
    print(f"json schemas: {n - len(short) - length} of {n - len(short)} completed, {length} hit max_tokens=120")
    assert length <= n // 10, f"{length} of {n} requests hit max_tokens"
    assert llm.grammar_compiler.num_compiled == 5  # one compile per distinct schema


def test_regex_choice_json_object_and_greedy(tiny_model, make_llm):
    """Regex, choice and json_object, sampled (with top-k / top-p after the mask) and greedy; mixed
    with unconstrained rows, whose seeded outputs are what they are without the grammar rows."""
    llm = make_llm(tiny_model)
    n = 24
    free = [SamplingParams(temperature=0.8, seed=100 + i, max_tokens=16) for i in range(4)]
    params = []
    for i in range(n):
        kind = [dict(regex=REGEX), dict(choice=CHOICES), dict(json_object=True)][i % 3]
        params.append(SamplingParams(temperature=0.0 if i % 4 == 0 else 1.0, top_k=50 if i % 4 == 1 else -1,
                                     top_p=0.9 if i % 4 == 2 else 1.0, seed=i, max_tokens=100,
                                     structured_output=guided(**kind)))
    outs = llm.generate(prompts(n + 4), params + free, use_tqdm=False)
    completed = 0
    for i, out in enumerate(outs[:n]):
        if out["finish_reason"] == "length":
            assert i % 3 == 2, "regex and choice outputs are short: they must finish"
            continue
        completed += 1
        if i % 3 == 0:
            assert re.fullmatch(REGEX, out["text"]), out["text"]
        elif i % 3 == 1:
            assert out["text"] in CHOICES
        else:
            assert isinstance(json.loads(out["text"]), dict)
    assert completed >= n - 3
    alone = llm.generate(prompts(n + 4)[n:], free, use_tqdm=False)
    assert [o["token_ids"] for o in outs[n:]] == [o["token_ids"] for o in alone]


def test_grammar_ends_the_request_with_ignore_eos_and_ebnf(tiny_model, make_llm):
    """With ignore_eos the stop token does not end a request, but the terminated matcher does; an EBNF
    grammar; and a preempted grammar request (few pages) resumes where its matcher is."""
    llm = make_llm(tiny_model, num_kvcache_blocks=12, kvcache_block_size=16)
    ebnf = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9] | "x"'
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, ignore_eos=True,
                             structured_output=guided(grammar=ebnf) if i % 2 else guided(choice=CHOICES))
              for i in range(8)]
    outs = llm.generate([[5] * 60 for _ in range(8)], params, use_tqdm=False)
    for i, out in enumerate(outs):
        if i % 2:
            assert out["finish_reason"] == "length" or re.fullmatch(r"\((?:[0-9]|x)(?:,(?:[0-9]|x))*\)", out["text"])
        else:
            assert out["finish_reason"] == "stop" and out["text"] in CHOICES
    assert sum(o["finish_reason"] == "stop" for o in outs) >= 6
    assert llm.scheduler.num_preemptions > 0


@pytest.mark.slow
def test_tensor_parallel_same_constrained_tokens(tiny_model, make_llm, tp_llm):
    """TP=2 on gloo (vocabulary-split sampling for greedy and temperature-only rows, the gathered path
    with top-p): the same tokens as one rank."""
    params = [SamplingParams(temperature=t, top_p=p, seed=i, max_tokens=60, structured_output=guided(**kind))
              for i, (t, p, kind) in enumerate([(0.0, 1.0, dict(json=SCHEMAS[0])), (1.0, 1.0, dict(json=SCHEMAS[2])),
                                                (1.0, 0.9, dict(regex=REGEX)), (1.0, 1.0, dict(choice=CHOICES))])]
    expected = make_llm(tiny_model).generate(prompts(4), params, use_tqdm=False)
    llm = tp_llm(tiny_model, 2)
    got = llm.generate(prompts(4), params, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
    assert any(o["finish_reason"] == "stop" for o in got)
    # all greedy: each rank masks and samples its own vocabulary slice (layers/vocab_parallel_sample.py)
    greedy = [SamplingParams(temperature=0, max_tokens=60, structured_output=guided(json=s)) for s in SCHEMAS]
    expected = make_llm(tiny_model).generate(prompts(5), greedy, use_tqdm=False)
    got = llm.generate(prompts(5), greedy, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
    assert all(o["finish_reason"] == "stop" for o in got)


# ---- through the server, with the official client ---------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_model):
    from conftest import assert_no_leaks, server_idle as idle, wait_until
    from nanovllm.entrypoints.serve import ServerThread
    s = ServerThread(tiny_model, ["tiny"], api_key="k", max_model_len=512, max_num_seqs=64).start()
    yield s
    try:
        wait_until(lambda: idle(s), timeout=10)
    finally:
        s.stop()
    assert_no_leaks(s.engine.engine)


def test_server_json_schema_regex_choice(oai):
    for i, schema in enumerate(SCHEMAS):
        r = oai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"give me JSON {i}"}], max_tokens=150, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # any object: free-text keys and values may run past max_tokens on random weights
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "an object"}], max_tokens=150,
                                    n=6, seed=3, response_format={"type": "json_object"})
    done = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert len(done) >= 3 and all(isinstance(json.loads(text), dict) for text in done)
    r = oai.completions.create(model="tiny", prompt="code:", max_tokens=30, n=4, seed=5, extra_body={"guided_regex": REGEX})
    assert all(re.fullmatch(REGEX, c.text) and c.finish_reason == "stop" for c in r.choices)
    r = oai.completions.create(model="tiny", prompt="well?", max_tokens=30, n=4, seed=6,
                               extra_body={"guided_choice": CHOICES})
    assert all(c.text in CHOICES for c in r.choices)
    r = oai.completions.create(model="tiny", prompt="json as text", max_tokens=60, seed=7,
                               extra_body={"guided_json": json.dumps(SCHEMAS[2])})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS[2])
    # streamed: the chunks add up to the same constrained text as the non-streamed answer
    body = dict(model="tiny", prompt="stream it", max_tokens=60, seed=8, extra_body={"guided_json": SCHEMAS[0]})
    text = "".join(c.choices[0].text for c in oai.completions.create(stream=True, **body))
    assert text == oai.completions.create(**body).choices[0].text
    jsonschema.validate(json.loads(text), SCHEMAS[0])


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "Unsupported type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "type"),
    ({"guided_regex": "(ab"}, "guided_regex", "regex does not compile"),
    ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "grammar does not compile"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
])
def test_server_bad_grammar_is_a_400_and_the_server_keeps_serving(oai, extra, param, words):
    import openai
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                    extra_body=extra)
    assert err.value.status_code == 400 and err.value.body["param"] == param and words in err.value.body["message"]
    r = oai.completions.create(model="tiny", prompt="still there?", max_tokens=10, extra_body={"guided_choice": ["yes"]})
    assert r.choices[0].text == "yes"


def test_cascade_reorders_rows_and_masks_follow(tiny_model, make_llm):
    """With cascade attention the policy reorders a step's rows (shared prefixes first): each mask must
    still land on its own request's row."""
    llm = make_llm(tiny_model, enable_cascade_attention=True, cascade_shared_prefix_len=64)
    shared = [(3 * j) % 1900 + 1 for j in range(80)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40,
                             structured_output=guided(regex=REGEX) if i % 2 else guided(choice=CHOICES))
              for i in range(16)]
    outs = llm.generate([shared + [i + 1, 2 * i + 1] for i in range(16)][::-1], params[::-1], use_tqdm=False)[::-1]
    assert llm.stats["cascade_steps"] > 0
    for i, out in enumerate(outs):
        assert out["finish_reason"] == "stop"
        assert re.fullmatch(REGEX, out["text"]) if i % 2 else out["text"] in CHOICES


def test_sglang_generate_structured_fields(server):
    """SGLang's native /generate: sampling_params json_schema (text), regex, ebnf; errors name its fields."""
    import httpx
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k"}, timeout=60) as c:
        def gen(**extra):
            return c.post("/generate", json={"text": "go", "sampling_params": {"max_new_tokens": 60, **extra}})
        r = gen(json_schema=json.dumps(SCHEMAS[2]), sampling_seed=1)
        assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "stop"
        jsonschema.validate(json.loads(r.json()["text"]), SCHEMAS[2])
        assert re.fullmatch(REGEX, gen(regex=REGEX, sampling_seed=2).json()["text"])
        assert gen(ebnf='root ::= "a" | "b"').json()["text"] in ("a", "b")
        bad = gen(regex="(ab")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "regex", bad.text
        assert bad.json()["error"]["message"].startswith("regex: regex does not compile")
