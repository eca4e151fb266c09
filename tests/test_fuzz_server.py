"""A seeded fuzz run of the OpenAI-compatible server: many random requests mixing valid and invalid fields
to /v1/completions, /v1/chat/completions and SGLang's /generate (wrong types, out-of-range numbers, NaN and
Infinity, huge ints, empty and too-long prompts, out-of-vocabulary token ids, n / best_of, stop lists,
logprobs, logit_bias keys, broken response_format schemas and grammars, tools, stream_options, unknown
models and fields), malformed bodies and headers, wrong methods and routes, the query parameters of
/debug/kv and /v1/loads, /tokenize and /detokenize; every 100 cases a round of clients that leave (streams
after a few events, sockets closed before any answer, a body that never finishes) beside short requests
that must be answered in full. Checked: no 5xx; each error is OpenAI's shape and names the field that was
made invalid; each 200 is well-formed (choices, finish reasons, logprobs shape, usage, include_usage, [DONE]);
one greedy or seeded answer per batch is asked again alone and must not change; /health 200 after every batch; nothing logged at error level (an exception escaping a handler is logged by
uvicorn); the pages of the requests that left free within 3 s; at the end every KV page free and no
per-request state in the engine. A second server with a 20-page pool runs the same load while preempting.

Deterministic: one `random.Random(seed)` builds every case, so a failure names its seed and case index and
replays: `python tests/test_fuzz_server.py --seed S --cases N` prints every problem. The regression tests
below are the bugs this fuzzer found, one each (claude_docs/serving.md, "Fuzzing").
Measured on the 2-core CPU dev machine (qwen3-tiny, random weights): 1,000 cases in ~8 s, so the default
tests take ~20 s; the `slow` ones (3 x 2,500 cases, 2,500 on the small pool) ~65 s.
"""
import asyncio
import json
import logging
import random
import socket
import sys
import time
from dataclasses import dataclass, field

import httpx
import pytest

from conftest import assert_no_leaks, server_idle as idle, server_metrics as metrics

from nanovllm.entrypoints.serve import ServerThread

MODEL = "fuzz"
API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 2048
ENGINE = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=32)
C, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
WORDS = ("river stone light north quiet engine garden window silver paper morning cloud seven "
         "bread music harbor lantern copper field winter").split()
NAN, INF = float("nan"), float("inf")


@dataclass
class Case:
    """One request and what a correct server answers: a status in `ok`, and for an error the `param`
    it names (None where no field is at fault). `why` says what was made invalid (for failure messages)."""
    path: str
    body: bytes
    ok: set[int]
    params: set | None = None       # allowed values of error.param (None: not checked)
    why: str = "valid"
    stream: bool = False
    headers: dict = field(default_factory=lambda: {"Content-Type": "application/json", **AUTH})
    expect_choices: int | None = None
    request: dict | None = None     # a valid request's fields (what its answer is checked against)
    method: str = "POST"
    answer: dict | None = None      # a 200's JSON body, once sent (non-streamed completions and chats)


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()   # NaN / Infinity written as JSON extensions, as some clients do


# ---- random valid requests ----------------------------------------------------------------------

def words(rng: random.Random, lo=1, hi=12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def token_ids(rng: random.Random, vocab: int, lo=1, hi=20) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))]


def sampling_fields(rng: random.Random, vocab: int, max_tokens: int) -> dict:
    """A random subset of the sampling fields, each with a valid value."""
    choices = {
        "temperature": lambda: rng.choice([0, 0.0, 0.5, 1.0, 2.0, 1e-30]),
        "top_p": lambda: rng.choice([1.0, 0.9, 1e-30, 0.5]),
        "top_k": lambda: rng.choice([-1, 0, 1, 5, 2 ** 31 - 1]),
        "seed": lambda: rng.choice([0, 7, -(2 ** 63), 2 ** 63 - 65]),
        "ignore_eos": lambda: rng.random() < 0.5,
        "stop": lambda: rng.choice([None, "e", ["e", "o"], [words(rng, 1, 2)], "\n"]),
        "stop_token_ids": lambda: [rng.randrange(vocab) for _ in range(rng.randint(0, 3))],
        "presence_penalty": lambda: rng.uniform(-2, 2),
        "frequency_penalty": lambda: rng.choice([-2, 2, 0.3]),
        "repetition_penalty": lambda: rng.choice([0.5, 1.0, 1.3, 100.0]),
        "min_p": lambda: rng.choice([0.0, 0.1, 1.0]),
        "min_tokens": lambda: rng.randint(0, max_tokens),
        "logit_bias": lambda: {str(rng.randrange(vocab)): rng.uniform(-100, 100) for _ in range(rng.randint(0, 3))},
        "include_stop_str_in_output": lambda: rng.random() < 0.5,
        "skip_special_tokens": lambda: rng.random() < 0.5,
        "user": lambda: "fuzzer",
        "model": lambda: MODEL,
        "stream_options": lambda: {"include_usage": rng.random() < 0.5},
    }
    return {name: make() for name, make in choices.items() if rng.random() < 0.25}


def structured(rng: random.Random) -> dict:
    return rng.choice([
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "text"}},
        {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}},
        {"guided_choice": ["yes", "no"]},
        {"guided_regex": "[a-c]{1,3}"},
    ])


def valid_completion(rng: random.Random, vocab: int) -> dict:
    kind = rng.randrange(4)
    prompt = [words(rng), token_ids(rng, vocab), [words(rng), words(rng)],
              [token_ids(rng, vocab), token_ids(rng, vocab)]][kind]
    max_tokens = rng.randint(1, 8)
    body = {"prompt": prompt, "max_tokens": max_tokens, **sampling_fields(rng, vocab, max_tokens)}
    if rng.random() < 0.3:
        body["n"] = rng.randint(1, 3)
        if rng.random() < 0.5:
            body["best_of"] = body["n"]
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.25:
        body["echo"] = True
        if rng.random() < 0.3:
            body["max_tokens"], body["min_tokens"] = 0, 0
    if rng.random() < 0.1:
        body.update(structured(rng))
        body.pop("min_tokens", None)   # the grammar decides where the output ends (a 400 with min_tokens)
    body["stream"] = rng.random() < 0.4
    return body


def valid_chat(rng: random.Random, vocab: int) -> dict:
    roles = ["system", "developer", "user", "assistant"]
    messages = [{"role": "user", "content": words(rng)}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": rng.choice(roles[:2]), "content": words(rng)})
    if rng.random() < 0.2:
        messages[-1]["content"] = [{"type": "text", "text": words(rng)}, {"type": "text", "text": words(rng)}]
    max_tokens = rng.randint(1, 8)
    body = {"messages": messages, rng.choice(["max_tokens", "max_completion_tokens"]): max_tokens,
            **sampling_fields(rng, vocab, max_tokens)}
    if rng.random() < 0.3:
        body["n"] = rng.randint(1, 3)
    if rng.random() < 0.3:
        body["logprobs"] = True
        if rng.random() < 0.7:
            body["top_logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.1:
        body.update(structured(rng))
        body.pop("min_tokens", None)   # the grammar decides where the output ends (a 400 with min_tokens)
    if rng.random() < 0.1:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    if rng.random() < 0.1:
        body["tools"] = []
    body["stream"] = rng.random() < 0.4
    return body


def num_choices(path: str, body: dict) -> int:
    n = body.get("n", 1)
    if path == C and isinstance(body["prompt"], list) and body["prompt"] and not isinstance(body["prompt"][0], int):
        return n * len(body["prompt"])
    return n


# ---- invalid mutations: (field, value, params the error may name, statuses) -----------------------

def invalid_mutations(rng: random.Random, vocab: int, path: str, max_len: int) -> list[tuple]:
    """Each entry breaks exactly one field of a valid request."""
    big = 2 ** 70
    common = [
        ("temperature", -0.5), ("temperature", 2.5), ("temperature", NAN), ("temperature", INF), ("temperature", "1"),
        ("top_p", 0), ("top_p", 1.5), ("top_p", NAN), ("top_p", 1e-300), ("top_p", [0.5]),
        ("top_k", -2), ("top_k", 2 ** 31), ("top_k", big), ("top_k", 1.5), ("top_k", True),
        ("n", 0), ("n", 65), ("n", big), ("n", -1), ("n", 2.0),
        ("seed", 2 ** 64), ("seed", -(2 ** 64)), ("seed", 1.5), ("seed", "7"),
        ("stop", [""]), ("stop", ""), ("stop", 5), ("stop", [1, 2]), ("stop", {"a": 1}),
        ("stop_token_ids", [-1]), ("stop_token_ids", [vocab]), ("stop_token_ids", [big]), ("stop_token_ids", 3),
        ("presence_penalty", 2.5), ("presence_penalty", NAN), ("presence_penalty", -INF),
        ("frequency_penalty", -3), ("frequency_penalty", NAN), ("frequency_penalty", "0"),
        ("repetition_penalty", 0), ("repetition_penalty", -1), ("repetition_penalty", INF),
        ("repetition_penalty", NAN), ("repetition_penalty", 1e39), ("repetition_penalty", 1e-50),
        ("min_p", -0.1), ("min_p", 1.1), ("min_p", NAN),
        ("min_tokens", -1), ("min_tokens", big), ("min_tokens", 9),
        ("logit_bias", {"abc": 1}), ("logit_bias", {"-1": 1}), ("logit_bias", {str(vocab): 1}),
        ("logit_bias", {"5": 101}), ("logit_bias", {"5": NAN}), ("logit_bias", {"5": INF}),
        ("logit_bias", {"1" * 5000: 1}), ("logit_bias", {str(big): 1}), ("logit_bias", {"5": "x"}),
        ("logit_bias", [1, 2]), ("logit_bias", {"1.5": 1}), ("logit_bias", {"": 1}),
        ("stream", "yes"), ("stream", 1),
        ("stream_options", {"include_usage": "yes"}), ("stream_options", [True]),
        ("ignore_eos", "true"), ("include_stop_str_in_output", 0), ("skip_special_tokens", "no"),
        ("user", 5),
        ("response_format", {"type": "json_schema", "json_schema": {}}),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": "x"}}),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                                                "pattern": "("}}}),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5,
                                                                                "maximum": 1}}}),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": {"enum": []}}}),
        ("response_format", {"type": "bogus"}), ("response_format", {"type": 5}), ("response_format", {}),
        ("response_format", "json"), ("response_format", [1]),
        ("guided_regex", "("), ("guided_regex", ""), ("guided_regex", 5),
        ("guided_choice", []), ("guided_choice", [""]), ("guided_choice", "yes"),
        ("guided_json", "not json"), ("guided_json", "[1, 2]"), ("guided_json", 5),
        ("guided_grammar", "root ::= "), ("guided_grammar", "nonsense"),
        ("no_such_field", 1), ("tool_choice", "auto"),
    ]
    if path == C:
        long_text = "word " * (max_len + 10)
        specific = [
            ("prompt", ""), ("prompt", []), ("prompt", [[]]), ("prompt", [""]), ("prompt", [-1]),
            ("prompt", [vocab]), ("prompt", [big]), ("prompt", [2 ** 63]), ("prompt", [1.5]), ("prompt", [True]),
            ("prompt", 5), ("prompt", None), ("prompt", {"text": "x"}), ("prompt", [[1, 2], "x"]),
            ("prompt", long_text), ("prompt", [1] * max_len), ("prompt", [[1, 2], [vocab]]),
            ("prompt", ["a"] * 257), ("prompt", [[1]] * 300),
            ("max_tokens", -1), ("max_tokens", big), ("max_tokens", max_len), ("max_tokens", 1.0),
            ("max_tokens", "8"),
            ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", big),
            ("echo", "yes"), ("best_of", 5), ("best_of", 0), ("suffix", "end"), ("suffix", 5),
        ]
    else:
        specific = [
            ("messages", []), ("messages", "hi"), ("messages", [{"role": "wizard", "content": "x"}]),
            ("messages", [{"content": "x"}]), ("messages", [{"role": "user", "content": 5}]),
            ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ("messages", [{"role": "user", "content": [{"type": "text"}]}]),
            ("messages", [{"role": "user", "content": "word " * (max_len + 10)}]),
            ("messages", None), ("messages", [None]),
            ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", big), ("max_tokens", max_len),
            ("max_completion_tokens", 0), ("max_completion_tokens", big), ("max_completion_tokens", "8"),
            ("logprobs", 5), ("logprobs", "true"), ("top_logprobs", 21), ("top_logprobs", -1),
            ("top_logprobs", 3.0),
            ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tools", "f"),
            ("chat_template_kwargs", "x"), ("chat_template_kwargs", [1]),
        ]
    return common + specific


def mutate(rng: random.Random, body: dict, path: str, vocab: int, max_len: int) -> tuple[dict, str, set]:
    """body with one field made invalid, what was done, and the params the error may name. Fields that
    would make the request invalid in another way first (an echo-only max_tokens 0, a second grammar
    field, n with too many prompts) are taken out."""
    name, value = rng.choice(invalid_mutations(rng, vocab, path, max_len))
    body = dict(body, **{name: value})
    if name == "min_tokens" or name in ("max_tokens", "max_completion_tokens"):
        for other in ("min_tokens", "max_tokens", "max_completion_tokens", "echo"):
            if other != name:
                body.pop(other, None)
        if name == "min_tokens":
            body["max_tokens"] = 8
    if name == "stream_options":
        body["stream"] = True
    if name == "response_format" or name.startswith("guided_"):
        for other in ("response_format", *GUIDED):
            if other != name:
                body.pop(other, None)
    if name == "top_logprobs":
        body["logprobs"] = True
    if name in ("best_of", "prompt"):
        body.pop("n", None)
        body.pop("best_of", None) if name == "prompt" else None
    return body, f"{name}={short(value)}", {name}


GUIDED = ("guided_regex", "guided_choice", "guided_json", "guided_grammar")


def short(value) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


SGLANG_NAMES = {"max_tokens": "max_new_tokens", "seed": "sampling_seed", "min_tokens": "min_new_tokens",
                "include_stop_str_in_output": "no_stop_trim"}
SGLANG_FIELDS = {"temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens", "n",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logit_bias",
                 *SGLANG_NAMES.values()}


def generate_case(rng: random.Random, vocab: int, max_len: int, roll: float) -> Case:
    """SGLang's /generate: a completion's fields under their SGLang names in sampling_params."""
    body = valid_completion(rng, vocab)
    sampling = {SGLANG_NAMES.get(k, k): v for k, v in body.items() if SGLANG_NAMES.get(k, k) in SGLANG_FIELDS}
    if sampling.get("max_new_tokens") == 0:
        sampling["max_new_tokens"] = 1
    prompt = body["prompt"]
    is_ids = isinstance(prompt, list) and prompt and not isinstance(prompt[0], str)
    request = {"input_ids" if is_ids else "text": prompt, "sampling_params": sampling, "stream": body["stream"]}
    prompts = len(prompt) if isinstance(prompt, list) and not is_ids or is_ids and isinstance(prompt[0], list) else 1
    if rng.random() < 0.2:
        request["rid"] = rng.choice(["r1", [f"r{i}" for i in range(prompts)]])
    if roll < 0.5:
        return Case(GEN, dumps(request), {200}, stream=body["stream"])
    if roll < 0.55:
        request["rid"] = rng.choice([[], [f"r{i}" for i in range(prompts + 1)], 5, [1]])
        return Case(GEN, dumps(request), {400}, {"rid"}, f"rid={request['rid']!r}")
    request.pop("rid", None)
    ours = [m for m in invalid_mutations(rng, vocab, C, max_len) if SGLANG_NAMES.get(m[0], m[0]) in SGLANG_FIELDS]
    name, value = rng.choice(ours)
    name = SGLANG_NAMES.get(name, name)
    sampling[name] = value
    if name == "min_new_tokens":
        sampling["max_new_tokens"] = 8
    if name in ("max_new_tokens", "n"):
        sampling.pop("min_new_tokens", None)
    return Case(GEN, dumps(request), {400}, {"sampling_params", name, *SGLANG_NAMES.keys(), *SGLANG_NAMES.values()},
                f"sampling_params.{name}={short(value)}", stream=body["stream"])


def random_case(rng: random.Random, vocab: int, max_len: int) -> Case:
    roll = rng.random()
    if roll < 0.06:
        return raw_case(rng)
    if roll < 0.09:
        return other_endpoint_case(rng, vocab)
    if rng.random() < 0.15:
        return generate_case(rng, vocab, max_len, roll)
    path = C if rng.random() < 0.55 else CHAT
    body = valid_completion(rng, vocab) if path == C else valid_chat(rng, vocab)
    if path == CHAT and rng.random() < 0.1:
        # any order of roles, content null or parts: the chat template may refuse it (a 400 naming messages)
        body["messages"] = [{"role": rng.choice(["system", "developer", "user", "assistant", "tool"]),
                             "content": rng.choice([words(rng), None, [{"type": "text", "text": words(rng)}]])}
                            for _ in range(rng.randint(1, 4))]
        return Case(path, dumps(body), {200, 400}, {"messages"}, "roles in any order", stream=body["stream"],
                    expect_choices=num_choices(path, body), request=body)
    if roll < 0.5:
        return Case(path, dumps(body), {200}, stream=body.get("stream", False),
                    expect_choices=num_choices(path, body), request=body)
    if roll < 0.53:
        body["model"] = rng.choice(["gpt-9", "", MODEL + " ", "FUZZ"])
        return Case(path, dumps(body), {404}, {"model"}, f"model={body['model']!r}")
    body, why, params = mutate(rng, body, path, vocab, max_len)
    return Case(path, dumps(body), {400}, params, why, stream=body.get("stream") is True)


def raw_case(rng: random.Random) -> Case:
    """Bodies that are not a JSON object of the right shape, and wrong headers."""
    path = rng.choice([C, CHAT, GEN])
    body, headers, why, status = rng.choice([
        (b"", None, "empty body", 400),
        (b'{"prompt": "hi",', None, "truncated JSON", 400),
        (b"not json at all", None, "not JSON", 400),
        (b'["hi"]', None, "a JSON array", 400),
        (b"null", None, "JSON null", 400),
        (b"42", None, "a JSON number", 400),
        (b'{"prompt": "\xff\xfe"}', None, "invalid UTF-8", 400),
        (b'{"prompt": "hi", "prompt": 5}', None, "duplicate key", 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 2}', None,
         "both prompt and messages", None),
        (dumps({"prompt": "hi", "max_tokens": 2}), {"Content-Type": "text/plain", **AUTH}, "text/plain", None),
        (dumps({"prompt": "hi", "max_tokens": 2}), {"Content-Type": "application/json"}, "no API key", 401),
        (dumps({"prompt": "hi", "max_tokens": 2}), {"Content-Type": "application/json",
                                                   "Authorization": "Bearer wrong"}, "wrong API key", 401),
        (b"{" * 5000 + b"}" * 5000, None, "deeply nested", 400),
        (b'{"prompt": ' + b'"x", ' * 3 + b'}', None, "trailing comma", 400),
    ])
    if status is None:   # valid for one endpoint, not the other
        status = {200, 400}
    else:
        status = {status}
    return Case(path, body, status, None, why, headers=headers or {"Content-Type": "application/json", **AUTH})


def other_endpoint_case(rng: random.Random, vocab: int) -> Case:
    """Wrong methods and routes, the query parameters of /debug/kv and /v1/loads, /tokenize, /detokenize."""
    method, path, body, status, params = rng.choice([
        ("GET", C, b"", 405, None), ("PUT", CHAT, b"{}", 405, None), ("DELETE", GEN, b"", 405, None),
        ("POST", "/v1/nothing", b"{}", 404, None), ("GET", "/v1/models/gpt-9", b"", 404, {"model"}),
        ("GET", "/debug/kv?max_pages=abc", b"", 400, {"max_pages"}), ("GET", "/debug/kv?max_pages=-1", b"", 400,
                                                                       {"max_pages"}),
        ("GET", "/debug/kv?max_pages=" + "9" * 30, b"", 200, None), ("GET", "/debug/kv?max_pages=1.5", b"", 400,
                                                                      {"max_pages"}),
        ("GET", "/v1/loads?include=nope", b"", 400, {"include"}), ("GET", "/v1/loads?dp_rank=x", b"", 400, {"dp_rank"}),
        ("GET", "/v1/loads?dp_rank=" + "9" * 5000, b"", 400, {"dp_rank"}), ("GET", "/v1/loads?format=text", b"", 400,
                                                                            {"format"}),
        ("GET", "/v1/loads?include=core,queues&dp_rank=0", b"", 200, None), ("GET", "/get_load", b"", 200, None),
        ("POST", "/tokenize", dumps({"prompt": words(rng)}), 200, None),
        ("POST", "/tokenize", dumps({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), 400, {"prompt"}),
        ("POST", "/tokenize", dumps({"prompt": 5}), 400, {"prompt"}),
        ("POST", "/tokenize", dumps({"messages": [{"role": "nobody", "content": "b"}]}), 400, {"messages"}),
        ("POST", "/detokenize", dumps({"tokens": token_ids(rng, vocab)}), 200, None),
        ("POST", "/detokenize", dumps({"tokens": [vocab]}), 400, {"tokens"}),
        ("POST", "/detokenize", dumps({"tokens": [-1]}), 400, {"tokens"}),
        ("POST", "/detokenize", dumps({"tokens": [2 ** 70]}), 400, {"tokens"}),
        ("POST", "/detokenize", dumps({"tokens": "1 2"}), 400, {"tokens"}),
        ("POST", "/detokenize", b"[]", 400, None),
    ])
    return Case(path, body, {status}, params, f"{method} {path[:60]}", method=method)


# ---- checking answers ---------------------------------------------------------------------------

def check_error(case: Case, status: int, text: str) -> list[str]:
    problems = []
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return [f"error body is not OpenAI's shape: {text[:200]!r}"]
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return [f"error body keys: {text[:200]!r}"]
    if not isinstance(error["message"], str) or not error["message"]:
        problems.append(f"error message: {error['message']!r}")
    if case.params is not None and status in (400, 404) and error["param"] not in case.params:
        problems.append(f"error names param {error['param']!r}, expected one of {sorted(case.params)}: "
                        f"{error['message'][:160]}")
    return problems


def logprobs_asked(case: Case) -> int | None:
    """k of the answer's logprobs (None: none asked)."""
    req = case.request or {}
    if case.path == CHAT:
        return req.get("top_logprobs") or 0 if req.get("logprobs") else None
    return req.get("logprobs")


def check_choice_logprobs(case: Case, c: dict, final: bool) -> list[str]:
    k, lp = logprobs_asked(case), c.get("logprobs")
    if k is None:
        return [] if lp is None else [f"logprobs {short(lp)} that nobody asked for"]
    if lp is None:
        return [] if not final and not (c.get("text") or (c.get("delta") or {}).get("content")) else \
            ["logprobs missing"]
    if case.path == CHAT:
        bad = [e for e in lp["content"] if len(e["top_logprobs"]) != k or not isinstance(e["logprob"], float)]
        return [f"chat logprobs entries with other than {k} alternatives: {short(bad)}"] if bad else []
    n = len(lp["tokens"])
    if not (len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n):
        return [f"completion logprobs lists of unequal lengths: {short(lp)}"]
    if final and (case.request or {}).get("echo") and n and lp["token_logprobs"][0] is not None:
        return ["echo: the prompt's first token has a logprob"]
    too_many = any(t and len(t) > k + 1 for t in lp["top_logprobs"])
    return [f"top_logprobs with more than {k + 1} entries"] if too_many else []


def check_completion(case: Case, body: dict) -> list[str]:
    problems = []
    chat = case.path == CHAT
    if body.get("object") != ("chat.completion" if chat else "text_completion"):
        problems.append(f"object {body.get('object')!r}")
    choices = body.get("choices", [])
    if case.expect_choices is not None and len(choices) != case.expect_choices:
        problems.append(f"{len(choices)} choices, expected {case.expect_choices}")
    if [c.get("index") for c in choices] != list(range(len(choices))):
        problems.append("choice indices out of order")
    for c in choices:
        if c.get("finish_reason") not in ("stop", "length"):
            problems.append(f"finish_reason {c.get('finish_reason')!r}")
        text = c["message"]["content"] if chat else c["text"]
        if not isinstance(text, str):
            problems.append(f"text {text!r}")
        problems += check_choice_logprobs(case, c, final=True)
    usage = body.get("usage", {})
    if usage.get("total_tokens") != usage.get("prompt_tokens", -1) + usage.get("completion_tokens", -1):
        problems.append(f"usage {usage}")
    req = case.request or {}
    prompt = req.get("prompt")
    if case.path == C and isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
        lengths = [len(prompt)] if isinstance(prompt[0], int) else [len(p) for p in prompt]
        if usage.get("prompt_tokens") != sum(lengths):   # once per prompt, whatever n is
            problems.append(f"prompt_tokens {usage.get('prompt_tokens')} for token-id prompts of {lengths}")
    max_tokens = req.get("max_tokens", req.get("max_completion_tokens"))
    if max_tokens is not None and usage.get("completion_tokens", 0) > len(choices) * max(max_tokens, 1):
        problems.append(f"{usage['completion_tokens']} completion tokens for {len(choices)} x max_tokens {max_tokens}")
    return problems


def check_stream(case: Case, text: str) -> list[str]:
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return [f"stream does not end with [DONE]: {text[-200:]!r}"]
    problems = []
    finished = set()
    chunks = [json.loads(event) for event in events[:-1]]
    for chunk in chunks:
        if "error" in chunk:
            problems.append(f"error event in a stream: {short(chunk)}")
            continue
        for c in chunk.get("choices", []):
            if c.get("finish_reason") is not None:
                if c["index"] in finished:
                    problems.append(f"choice {c['index']} finished twice")
                finished.add(c["index"])
            if case.path != GEN:
                problems += check_choice_logprobs(case, c, final=False)
    if case.path == GEN:
        return problems
    if case.expect_choices is not None and len(finished) != case.expect_choices:
        problems.append(f"{len(finished)} choices finished in the stream, expected {case.expect_choices}")
    usage_wanted = bool(((case.request or {}).get("stream_options") or {}).get("include_usage"))
    has_usage = bool(chunks) and "usage" in chunks[-1] and chunks[-1]["choices"] == []
    if usage_wanted != has_usage:
        problems.append(f"include_usage {usage_wanted} but the last chunk is {short(chunks[-1:])}")
    return problems


async def send(client: httpx.AsyncClient, case: Case) -> list[str]:
    try:
        r = await client.request(case.method, case.path, content=case.body or None, headers=case.headers)
    except httpx.HTTPError as e:   # e.g. a stream cut short by an exception in the server
        return [f"{type(e).__name__}: {e}"]
    problems = []
    if r.status_code not in case.ok:
        problems.append(f"status {r.status_code}, expected {sorted(case.ok)}: {r.text[:300]}")
    if r.status_code >= 500:
        return problems
    if r.status_code >= 400:
        problems += check_error(case, r.status_code, r.text)
    elif case.stream:
        problems += check_stream(case, r.text)
    elif case.path in (C, CHAT):
        case.answer = r.json()
        problems += check_completion(case, case.answer)
    return problems


def reproducible(case: Case) -> bool:
    """A 200 whose choices must not depend on the batch it ran in: greedy, or seeded sampling (each seeded
    request draws from its own generator, keyed by its seed and token index)."""
    req = case.request or {}
    return case.answer is not None and (req.get("seed") is not None or req.get("temperature") == 0)


def choice_texts(answer: dict) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"] for c in answer["choices"]]


# ---- clients that leave -------------------------------------------------------------------------

LONG = {"prompt": "The heron stood in the shallows", "ignore_eos": True}   # max_tokens: the context less 64
LONG_CHAT = {"messages": [{"role": "user", "content": "Tell a long story"}], "ignore_eos": True}


def raw_post(server, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port), timeout=10)
    head = {"Host": "fuzz", "Content-Type": "application/json", "Content-Length": str(len(data)), **AUTH,
            **(headers or {})}
    sock.sendall(f"POST {path} HTTP/1.1\r\n".encode()
                 + b"".join(f"{k}: {v}\r\n".encode() for k, v in head.items()) + b"\r\n" + data)
    return sock


async def leave_mid_stream(server, events: int, path: str, body: dict) -> list[str]:
    """Open a stream, read that many events, then close the connection."""
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
        async with c.stream("POST", path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return [f"stream to leave ({path}, {short(body)}): status {r.status_code}"]
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data:")
                if seen >= events:
                    break
    return []


LONG_EXTRAS = {C: [{}, {"n": 2}, {"logprobs": 5}, {"echo": True, "logprobs": 2}, {"guided_regex": "[a-z ]+"},
                   {"presence_penalty": 1.0, "logit_bias": {"5": 3.0}}, {"seed": 3, "temperature": 1.0, "top_k": 5}],
               CHAT: [{}, {"n": 2}, {"logprobs": True, "top_logprobs": 3}, {"response_format": {"type": "json_object"}},
                      {"min_p": 0.1, "repetition_penalty": 1.2}]}


def long_request(rng: random.Random, i: int, max_len: int) -> tuple[str, dict]:
    path, body = (C, {**LONG, "max_tokens": max_len - 64}) if i % 2 else (CHAT, LONG_CHAT)
    return path, {**body, **rng.choice(LONG_EXTRAS[path])}


async def disconnect_round(server, rng: random.Random, client: httpx.AsyncClient, vocab: int,
                           max_len: int) -> list[str]:
    """Long requests (1,500 tokens, or the context) that leave: streams after a few events, sockets closed
    before any answer (streamed or not), a body that never finishes; meanwhile short valid requests,
    which must be answered in full. Returns the short requests' problems."""
    tasks = [leave_mid_stream(server, rng.randint(1, 6), *long_request(rng, i, max_len)) for i in range(6)]
    socks = []
    for i in range(6):
        path, body = long_request(rng, i, max_len)
        socks.append(raw_post(server, path, {**body, "stream": i % 3 == 0}))
    # a body announced longer than sent: the server waits for it, then the client leaves
    partial = socket.create_connection((server.host, server.port), timeout=10)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
                    b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"prompt\":")
    bystanders = []
    while len(bystanders) < 4:
        case = random_case(rng, vocab, max_len)
        if case.ok == {200}:
            bystanders.append(case)
    answered = asyncio.gather(*(send(client, c) for c in bystanders))
    await asyncio.sleep(rng.uniform(0, 0.05))
    for s in socks:
        s.close()
    partial.close()
    left = [p for ps in await asyncio.gather(*tasks) for p in ps]
    answers = await answered
    return left + [f"bystander of a disconnect round ({c.path}): {p}" for c, ps in zip(bystanders, answers) for p in ps]


# ---- the server and the run ---------------------------------------------------------------------

def wait_idle(server, timeout: float) -> float:
    start = time.monotonic()
    while not idle(server):
        if time.monotonic() - start > timeout:
            m = metrics(server)
            raise AssertionError(f"not idle after {timeout}s: running {m['nanovllm_num_requests_running']}, "
                                 f"waiting {m['nanovllm_num_requests_waiting']}, "
                                 f"pages used {m['nanovllm_kv_blocks_used']}, live {m['nanovllm_live_requests']}")
        time.sleep(0.02)
    return time.monotonic() - start


def fuzz(server, seed: int, num_cases: int, batch: int = 16, disconnect_every: int = 100) -> list[str]:
    """Run num_cases random cases in concurrent batches; returns every problem found (empty: all good)."""
    vocab, max_len = server.engine.engine.vocab_size, server.engine.engine.config.max_model_len
    rng = random.Random(seed)
    cases = [random_case(rng, vocab, max_len) for _ in range(num_cases)]
    failures = []
    logged = LogRecords()

    async def run():
        limits = httpx.Limits(max_connections=batch)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            for start in range(0, num_cases, batch):
                group = cases[start:start + batch]
                results = await asyncio.gather(*(send(client, c) for c in group))
                for i, (case, problems) in enumerate(zip(group, results), start):
                    failures.extend(f"seed {seed} case {i} ({case.path}, {case.why}): {p}" for p in problems)
                # One reproducible answer per batch, asked again alone: the same choices (batch invariance,
                # also across preemption on the small pool).
                again = next((c for c in group if reproducible(c)), None)
                if again is not None:
                    alone = await client.post(again.path, content=again.body, headers=again.headers)
                    if alone.status_code != 200 or choice_texts(alone.json()) != choice_texts(again.answer):
                        failures.append(f"seed {seed} case {cases.index(again)} ({again.why}): answered "
                                        f"{choice_texts(again.answer)} in a batch, {alone.text[:300]} alone")
                health = await client.get("/health")
                if health.status_code != 200:
                    failures.append(f"seed {seed} after case {start + len(group) - 1}: /health {health.status_code}")
                if disconnect_every and (start // batch + 1) % (disconnect_every // batch) == 0:
                    problems = await disconnect_round(server, rng, client, vocab, max_len)
                    failures.extend(f"seed {seed}: {p}" for p in problems)
                    # every long request left: their pages are free within a few steps, not after 1,500 tokens
                    try:
                        await asyncio.to_thread(wait_idle, server, 3.0)
                    except AssertionError as e:
                        failures.append(f"seed {seed} disconnect round after case {start + len(group) - 1}: {e}")
    with logged:
        asyncio.run(run())
    failures += [f"seed {seed}: logged {r.name} {r.levelname}: {r.getMessage()[:200]}" for r in logged.records]
    return failures


class LogRecords(logging.Handler):
    """While active: the engine's warnings and errors, and uvicorn's errors (an exception that escaped a
    handler is logged there as "Exception in ASGI application")."""

    LOGGERS = {"nanovllm": logging.WARNING, "nanovllm.server": logging.WARNING, "uvicorn.error": logging.ERROR}

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        if record.levelno >= self.LOGGERS.get(record.name, logging.ERROR):
            self.records.append(record)

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


def stop_and_check(s: ServerThread):
    """Stop a server once it is idle; then every KV page is free and no per-request state is left."""
    try:
        wait_idle(s, timeout=10)
    finally:
        s.stop()
    engine = s.engine.engine
    assert_no_leaks(engine)
    assert not engine.seqs and not engine.output_processor.detokenizers, "per-request state left in the engine"


@pytest.fixture(scope="module")
def server(tiny_model):
    s = ServerThread(tiny_model, [MODEL], api_key=API_KEY, **ENGINE).start()
    yield s
    stop_and_check(s)


@pytest.fixture(scope="module")
def small_server(tiny_model):
    """A KV pool of 20 pages (320 tokens) for 16 sequences: the fuzz load preempts all the time."""
    s = ServerThread(tiny_model, [MODEL], api_key=API_KEY, max_model_len=256, max_num_seqs=16,
                     num_kvcache_blocks=20).start()
    yield s
    stop_and_check(s)


def test_fuzz_requests(server):
    failures = fuzz(server, seed=1, num_cases=1000)
    assert not failures, "\n".join(failures[:40])
    wait_idle(server, timeout=10)


def test_fuzz_requests_with_preemption(small_server):
    failures = fuzz(small_server, seed=11, num_cases=600)
    assert not failures, "\n".join(failures[:40])
    assert small_server.engine.snapshot["preemptions"] > 0, "the small pool never preempted: not the case tested"
    wait_idle(small_server, timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_fuzz_requests_long(server, seed):
    failures = fuzz(server, seed=seed, num_cases=2500)
    assert not failures, "\n".join(failures[:40])
    wait_idle(server, timeout=10)


@pytest.mark.slow
def test_fuzz_requests_with_preemption_long(small_server):
    failures = fuzz(small_server, seed=12, num_cases=2500)
    assert not failures, "\n".join(failures[:40])
    wait_idle(small_server, timeout=10)


# ---- regressions: each bug the fuzzer found, alone -----------------------------------------------

@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def error_of(reply: httpx.Response, status: int = 400) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_param_is_the_field_name_not_name_equals_value(client):
    """'SamplingParams: top_p=1e-300 rounds to 0 in float32' named param 'top_p=1e-300'."""
    for path, body in ((C, {"prompt": "hi", "top_p": 1e-300}),
                       (CHAT, {"messages": [{"role": "user", "content": "hi"}], "top_p": 1e-300}),
                       (GEN, {"text": "hi", "sampling_params": {"top_p": 1e-300}})):
        error = error_of(client.post(path, json=body))
        assert error["param"] == "top_p" and "rounds to 0" in error["message"], (path, error)


def test_length_error_names_the_field_the_request_used(client):
    """Chat's max_completion_tokens and /generate's max_new_tokens were reported as 'max_tokens'."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for path, body, name in ((CHAT, {**chat, "max_completion_tokens": 10 ** 6}, "max_completion_tokens"),
                             (CHAT, {**chat, "max_tokens": 10 ** 6}, "max_tokens"),
                             (C, {"prompt": "hi", "max_tokens": 10 ** 6}, "max_tokens"),
                             (GEN, {"text": "hi", "sampling_params": {"max_new_tokens": 10 ** 6}}, "max_new_tokens")):
        error = error_of(client.post(path, json=body))
        assert error["param"] == name and error["message"].startswith(f"{name}=10"), (path, error)


def test_client_leaving_while_sending_the_body_is_not_a_server_error(server):
    """Was an unhandled ClientDisconnect: a 500 in the metrics and 'Exception in ASGI application' with a
    traceback in the log. Now a 499 (nobody reads it), nothing logged, and the server keeps serving."""
    errors = 'nanovllm_http_errors_total{status="%d"}'
    before = metrics(server)
    with LogRecords() as logged:
        for path in (C, CHAT, GEN):
            sock = socket.create_connection((server.host, server.port), timeout=10)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
                         f"Authorization: Bearer {API_KEY}\r\nContent-Length: 1000\r\n\r\n{{\"prompt\":".encode())
            time.sleep(0.05)
            sock.close()
        deadline = time.monotonic() + 5
        while metrics(server).get(errors % 499, 0) < before.get(errors % 499, 0) + 3:
            assert time.monotonic() < deadline, "the three requests were not answered 499"
            time.sleep(0.02)
    after = metrics(server)
    assert after.get(errors % 500, 0) == before.get(errors % 500, 0)
    assert not logged.records, [r.getMessage() for r in logged.records]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_generate_rid_list_needs_one_id_per_prompt(client):
    """rid: [] divided by zero after the request had run (a 500, or a stream cut without [DONE]); a list
    of ids was cycled over the choices instead of following the prompts (choices are prompt-major)."""
    sampling = {"max_new_tokens": 2, "n": 2}
    for rid, stream in (([], False), ([], True), (["a"], False), (["a", "b", "c"], False)):
        body = {"text": ["x", "y"], "rid": rid, "sampling_params": sampling, "stream": stream}
        assert error_of(client.post(GEN, json=body))["param"] == "rid"
    got = client.post(GEN, json={"text": ["x", "y"], "rid": ["a", "b"], "sampling_params": sampling}).json()
    assert [g["meta_info"]["id"] for g in got] == ["a-0", "a-1", "b-2", "b-3"]
    one = client.post(GEN, json={"text": "x", "rid": ["only"], "sampling_params": {"max_new_tokens": 2}}).json()
    assert one["meta_info"]["id"] == "only"


def test_min_tokens_with_a_grammar_is_refused(client, tiny_model):
    """The grammar ends the output; min_tokens then masked EOS too, every logit was -inf, and token 0 came
    out after the choice ("no!" for ["yes", "no"], with "grammar refused sampled token" logged)."""
    from nanovllm.sampling_params import SamplingParams, StructuredOutput
    with pytest.raises(ValueError, match="min_tokens must be 0 with structured_output"):
        SamplingParams(max_tokens=8, min_tokens=8, structured_output=StructuredOutput(choice=["yes", "no"]))
    assert SamplingParams(max_tokens=8, min_tokens=0, structured_output=StructuredOutput(choice=["yes", "no"]))
    body = {"prompt": "hi", "max_tokens": 8, "min_tokens": 8, "guided_choice": ["yes", "no"]}
    assert error_of(client.post(C, json=body))["param"] == "min_tokens"
    with LogRecords() as logged:
        ok = client.post(C, json={**body, "min_tokens": 0, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("yes", "no"), ok.text
    assert not logged.records


def test_repetition_penalty_past_float32_max_is_refused_without_a_warning():
    """np.float32(1e39) warned 'overflow encountered in cast' (an error under -W error) before refusing."""
    import warnings
    from nanovllm.sampling_params import SamplingParams
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for value in (1e39, 3.5e38, 1e308):
            with pytest.raises(ValueError, match="repetition_penalty"):
                SamplingParams(repetition_penalty=value)
        assert SamplingParams(repetition_penalty=3.4e38).repetition_penalty == 3.4e38


def test_bad_query_parameter_is_a_400_in_openai_shape(client):
    """FastAPI's own query parsing answered 422 {"detail": [...]} (not OpenAI's shape, no param)."""
    error = error_of(client.get("/debug/kv", params={"max_pages": "abc"}))
    assert error["param"] == "max_pages" and "max_pages" in error["message"]


def test_usage_counts_each_prompt_once_whatever_n_is(client):
    """n=3 reported 3x the prompt's tokens (OpenAI, vLLM and SGLang count a prompt once per request)."""
    for body, prompt_tokens in (({"prompt": [5, 6, 7, 8], "n": 3}, 4), ({"prompt": [[5, 6], [7, 8, 9]], "n": 2}, 5),
                                ({"prompt": [5, 6, 7], "n": 2, "echo": True, "max_tokens": 0}, 3)):
        body = {"max_tokens": 2, "ignore_eos": True, **body}
        usage = client.post(C, json=body).json()["usage"]
        choices = 2 * (len(body["prompt"]) if isinstance(body["prompt"][0], list) else 1) if body["n"] == 2 else 3
        generated = 0 if body.get("echo") else choices * 2
        assert usage["prompt_tokens"] == prompt_tokens and usage["completion_tokens"] == generated, (body, usage)
        assert usage["total_tokens"] == prompt_tokens + generated
        assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= prompt_tokens
        events = [line[6:] for line in client.post(C, json={**body, "stream": True, "stream_options": {
            "include_usage": True}}).text.split("\n") if line.startswith("data: ")]
        assert json.loads(events[-2])["usage"]["prompt_tokens"] == prompt_tokens, events[-2]
    chat = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 1}).json()
    alone = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]


BAD_CONFIGS = [  # (engine options, words the ValueError must say); each was accepted before
    (dict(max_model_len=0), "max_model_len must be >= 2"),
    (dict(max_model_len=1), "max_model_len must be >= 2"),
    (dict(num_kvcache_blocks=0), "num_kvcache_blocks must be -1"),
    (dict(num_kvcache_blocks=-7), "num_kvcache_blocks must be -1"),
    (dict(cpu_kvcache_gb=0), "cpu_kvcache_gb must be > 0"),
    (dict(cpu_kvcache_gb=float("nan")), "cpu_kvcache_gb must be > 0"),
    (dict(host_kvcache_gb=float("inf")), "host_kvcache_gb must be >= 0 and finite"),
    (dict(seed=-1), "seed must be in"),
    (dict(cascade_shared_prefix_len=-3), "cascade_shared_prefix_len must be >= 0"),
]


@pytest.mark.parametrize("options, words", BAD_CONFIGS, ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                                                            for o, _ in BAD_CONFIGS])
def test_bad_engine_config_is_a_clear_value_error(tiny_model, options, words):
    from nanovllm import LLM
    with pytest.raises(ValueError, match=words):
        LLM(tiny_model, **options)


def test_serve_command_with_a_bad_option_says_so_in_one_line(tiny_model):
    """Was a traceback (exit 1); now one line naming the option, exit 2, as argparse does for its own errors."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "nanovllm.entrypoints.serve", "--model", tiny_model,
                           "--max-model-len", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "nanovllm serve: error: max_model_len must be >= 2 (a prompt token and an output " \
                                  "token), got 0", done.stderr


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="fuzz a live in-process server; prints every problem")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a fresh qwen3-tiny)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=400)
    args = parser.parse_args()
    model = args.model
    if model is None:
        import tempfile
        from nanovllm.tools.make_model import make_model
        model = make_model("qwen3-tiny", tempfile.mkdtemp(), seed=0)
    s = ServerThread(model, [MODEL], api_key=API_KEY, **ENGINE).start()
    try:
        t0 = time.monotonic()
        found = fuzz(s, args.seed, args.cases)
        print(f"{args.cases} cases in {time.monotonic() - t0:.1f}s, {len(found)} problems")
        print("\n".join(found))
        print(f"idle after {wait_idle(s, 30):.2f}s")
    finally:
        s.stop()
    assert_no_leaks(s.engine.engine)
