"""The OpenAI-compatible server, live on 127.0.0.1: official client, batching parity with the offline
API, aborts on disconnect, error answers, bounded load, and no leaked KV pages at the end."""
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import assert_no_leaks, server_idle as idle, server_metrics as metrics, wait_until

from nanovllm import LLM, SamplingParams
from nanovllm.entrypoints.metrics import parse
from nanovllm.entrypoints.serve import ServerThread

API_KEY = "test-key"
MODEL = "tiny"
ENGINE = dict(max_model_len=512, max_num_seqs=64)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ABORTED = 'nanovllm_sequences_finished_total{reason="abort"}'


@pytest.fixture(scope="module")
def server(tiny_model):
    s = ServerThread(tiny_model, [MODEL], api_key=API_KEY, **ENGINE).start()
    yield s
    try:
        wait_until(lambda: idle(s), timeout=10)
    finally:
        s.stop()
    assert not s.engine.is_alive
    engine = s.engine.engine  # the loop has exited: the engine is ours to inspect
    assert_no_leaks(engine)
    assert not engine.seqs and not engine.output_processor.detokenizers, "per-request state left in the engine"


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def small_request_ok(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# ---- the official client ------------------------------------------------------------------------

def test_openai_client_completions(oai):
    kwargs = dict(model=MODEL, prompt="The small engine reads a prompt", max_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True})
    r = oai.completions.create(**kwargs)
    assert r.object == "text_completion" and r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    u = r.usage
    assert u.completion_tokens == 8 and u.prompt_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0

    chunks = list(oai.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    # Same prompt again: its full pages come from the prefix cache.
    again = oai.completions.create(**kwargs)
    assert again.choices[0].text == r.choices[0].text


def test_openai_client_chat(oai):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    r = oai.chat.completions.create(**kwargs)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.usage.completion_tokens == 8

    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # max_completion_tokens is the newer name; without either, chat may use the whole context.
    r2 = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 3
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_n_choices_and_prompt_lists(client):
    r = client.post("/v1/completions", json={"prompt": "Hello", "n": 3, "max_tokens": 3, "seed": 7,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 9
    for prompt in (["Hello", "World"], [[1, 2, 3], [4, 5]]):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    # A seed makes sampling reproducible.
    seeded = {"prompt": "Hello", "max_tokens": 6, "temperature": 1.0, "seed": 123}
    assert client.post("/v1/completions", json=seeded).json()["choices"] == \
        client.post("/v1/completions", json=seeded).json()["choices"]


def test_stop_strings(client):
    base = {"prompt": "The small engine reads a prompt", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assume_text = full[:full.find(stop)]
    r = client.post("/v1/completions", json={**base, "stop": [stop]}).json()["choices"][0]
    assert r["text"] == assume_text and r["finish_reason"] in ("stop", "length")


# ---- continuous batching across clients ---------------------------------------------------------

SUBJECTS = ["The model", "A user", "Every request", "The scheduler", "Our server", "This cache", "The teacher",
            "A student"]
VERBS = ["reads", "writes", "computes", "returns"]


def test_concurrent_greedy_matches_offline(server, tiny_model):
    prompts = [f"{s} {v} item {i}:" for i, (s, v) in enumerate((s, v) for s in SUBJECTS for v in VERBS)]
    assert len(prompts) == 32
    before = metrics(server)

    async def one(c, prompt):
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                  "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    served = asyncio.run(all_at_once())
    offline = LLM(tiny_model, **ENGINE).generate(prompts, SamplingParams(temperature=0, max_tokens=12),
                                                 use_tqdm=False)
    for got, want in zip(served, offline):
        choice = got["choices"][0]
        assert choice["text"] == want["text"]
        assert got["usage"]["completion_tokens"] == len(want["token_ids"])
        assert choice["finish_reason"] == want["finish_reason"]
    after = metrics(server)
    assert after["nanovllm_max_batch_size"] > 1
    batched = lambda m: m["nanovllm_step_batch_size_count"] - m['nanovllm_step_batch_size_bucket{le="1.0"}']
    assert batched(after) > batched(before), "no step ran more than one of these requests"


# ---- clients that leave -------------------------------------------------------------------------

LONG = {"model": MODEL, "prompt": "A heron stood in the shallows", "max_tokens": 480, "ignore_eos": True}


def test_stream_disconnect_aborts(server):
    aborted = metrics(server)[ABORTED]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            data_lines = 0
            for line in r.iter_lines():
                data_lines += line.startswith("data:")
                if data_lines == 3:
                    break
        # leaving both blocks closes the connection mid-stream
    took = wait_until(lambda: metrics(server)[ABORTED] == aborted + 1, timeout=1.0)
    assert took < 1.0
    wait_until(lambda: idle(server), timeout=1.0)


def test_non_stream_disconnect_aborts(server):
    aborted = metrics(server)[ABORTED]
    body = json.dumps(LONG).encode()
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_until(lambda: metrics(server)["nanovllm_num_requests_running"] == 1, timeout=5)
    sock.close()
    assert wait_until(lambda: metrics(server)[ABORTED] == aborted + 1, timeout=1.0) < 1.0
    wait_until(lambda: idle(server), timeout=1.0)


# ---- errors: OpenAI's shape, the right status, and the server keeps serving ---------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
ERROR_CASES = [
    # (id, path, body (bytes are sent raw), headers, status, words the message must name, param)
    ("malformed-json", C, b'{"prompt": "hi",', AUTH, 400, ["JSON"], None),
    ("not-an-object", C, b'["hi"]', AUTH, 400, ["JSON object"], None),
    ("max-tokens-type", C, {"prompt": "hi", "max_tokens": "ten"}, AUTH, 400, ["max_tokens"], "max_tokens"),
    ("prompt-type", C, {"prompt": 5}, AUTH, 400, ["prompt"], "prompt"),
    ("prompt-missing", C, {"max_tokens": 3}, AUTH, 400, ["prompt"], "prompt"),
    ("stream-type", C, {"prompt": "hi", "stream": "yes"}, AUTH, 400, ["stream"], "stream"),
    ("temperature-range", C, {"prompt": "hi", "temperature": -0.5}, AUTH, 400, ["temperature"], "temperature"),
    ("top-p-range", C, {"prompt": "hi", "top_p": 0}, AUTH, 400, ["top_p"], "top_p"),
    ("top-k-range", C, {"prompt": "hi", "top_k": -5}, AUTH, 400, ["top_k"], "top_k"),
    ("max-tokens-range", C, {"prompt": "hi", "max_tokens": 0}, AUTH, 400, ["max_tokens"], "max_tokens"),
    ("n-range", C, {"prompt": "hi", "n": 0}, AUTH, 400, ["'n'"], "n"),
    ("empty-stop", C, {"prompt": "hi", "stop": [""]}, AUTH, 400, ["stop"], "stop"),
    ("token-id-range", C, {"prompt": [1, 10 ** 9]}, AUTH, 400, ["token ids out of range"], "prompt"),
    ("empty-prompt", C, {"prompt": ""}, AUTH, 400, ["empty"], "prompt"),
    ("prompt-too-long", C, {"prompt": "hello " * 2000}, AUTH, 400, ["too long", "max_model_len"], "prompt"),
    ("output-too-long", C, {"prompt": "hi", "max_tokens": 100000}, AUTH, 400, ["max_tokens", "max_model_len"],
     "max_tokens"),
    ("seed-range", C, {"prompt": "hi", "seed": 2 ** 64}, AUTH, 400, ["seed"], "seed"),
    ("top-k-overflow", C, {"prompt": "hi", "top_k": 2 ** 63}, AUTH, 400, ["top_k"], "top_k"),
    ("logprobs-range", C, {"prompt": "hi", "logprobs": 21}, AUTH, 400, ["logprobs"], "logprobs"),
    ("suffix", C, {"prompt": "hi", "suffix": "end"}, AUTH, 400, ["suffix"], "suffix"),
    ("too-many-sequences", C, {"prompt": ["a", "b", "c", "d", "e"], "n": 64}, AUTH, 400, ["sequences"], "prompt"),
    ("unsupported", C, {"prompt": "hi", "suffix": "x"}, AUTH, 400, ["suffix"], "suffix"),
    ("presence-range", C, {"prompt": "hi", "presence_penalty": 2.5}, AUTH, 400, ["presence_penalty"],
     "presence_penalty"),
    ("frequency-range", C, {"prompt": "hi", "frequency_penalty": -3}, AUTH, 400, ["frequency_penalty"],
     "frequency_penalty"),
    ("repetition-range", C, {"prompt": "hi", "repetition_penalty": 0}, AUTH, 400, ["repetition_penalty"],
     "repetition_penalty"),
    ("min-p-range", C, {"prompt": "hi", "min_p": 1.5}, AUTH, 400, ["min_p"], "min_p"),
    ("min-tokens-range", C, {"prompt": "hi", "min_tokens": -1}, AUTH, 400, ["min_tokens"], "min_tokens"),
    ("min-tokens-over-max", C, {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, AUTH, 400, ["min_tokens"],
     "min_tokens"),
    ("logit-bias-range", C, {"prompt": "hi", "logit_bias": {"5": 101}}, AUTH, 400, ["logit_bias"], "logit_bias"),
    ("logit-bias-key", C, {"prompt": "hi", "logit_bias": {"five": 1}}, AUTH, 400, ["logit_bias"], "logit_bias"),
    ("logit-bias-vocab", C, {"prompt": "hi", "logit_bias": {"999999": 1}}, AUTH, 400, ["logit_bias", "vocabulary"],
     "logit_bias"),
    ("stop-token-vocab", C, {"prompt": "hi", "stop_token_ids": [999999]}, AUTH, 400, ["stop_token_ids"],
     "stop_token_ids"),
    ("chat-min-tokens-range", CHAT, {"messages": USER, "max_tokens": 2, "min_tokens": 3}, AUTH, 400, ["min_tokens"],
     "min_tokens"),
    ("chat-presence-range", CHAT, {"messages": USER, "presence_penalty": -2.5}, AUTH, 400, ["presence_penalty"],
     "presence_penalty"),
    ("chat-messages-empty", CHAT, {"messages": []}, AUTH, 400, ["messages"], "messages"),
    ("chat-messages-type", CHAT, {"messages": "hi"}, AUTH, 400, ["messages"], "messages"),
    ("chat-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, AUTH, 400, ["messages.0.role"],
     "messages"),
    ("chat-max-completion-tokens", CHAT, {"messages": USER, "max_completion_tokens": -1}, AUTH, 400,
     ["max_completion_tokens"], "max_completion_tokens"),
    ("chat-too-long", CHAT, {"messages": [{"role": "user", "content": "hello " * 2000}]}, AUTH, 400,
     ["too long"], "messages"),
    ("no-key", C, {"prompt": "hi"}, {}, 401, ["API key"], None),
    ("wrong-key", C, {"prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, ["API key"], None),
    ("unknown-model", C, {"model": "gpt-9", "prompt": "hi"}, AUTH, 404, ["gpt-9"], "model"),
    ("unknown-model-chat", CHAT, {"model": "gpt-9", "messages": USER}, AUTH, 404, ["gpt-9"], "model"),
    ("unknown-route", "/v1/nothing", {}, AUTH, 404, ["Not Found"], None),
]


@pytest.mark.parametrize("name,path,body,headers,status,words,param", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_answers(server, client, name, path, body, headers, status, words, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=server.url, timeout=30) as bare:  # no default auth header here
        r = bare.post(path, content=content, headers={"Content-Type": "application/json", **headers})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    assert error["param"] == param
    small_request_ok(client)  # the engine kept serving


def test_error_in_openai_client(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="hi", temperature=5)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-9", prompt="hi")
    with openai.OpenAI(base_url=oai.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_engine_failure_fails_requests_not_the_server(server, client, monkeypatch):
    engine = server.engine.engine
    real_step = engine.step
    failures = []

    def step_failing_once():
        if not failures:
            failures.append(1)
            raise RuntimeError("injected step failure")
        return real_step()

    body = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
    monkeypatch.setattr(engine, "step", step_failing_once)
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 500 and "injected step failure" in r.json()["error"]["message"]
    small_request_ok(client)

    failures.clear()
    lines = client.post("/v1/completions", json={**body, "stream": True}).text.split("\n\n")
    assert "injected step failure" in lines[0] and lines[1] == "data: [DONE]"
    small_request_ok(client)
    wait_until(lambda: idle(server), timeout=5)


def test_health_and_metrics_need_no_key(server, client):
    assert client.post("/v1/completions", json={"prompt": "hi", "top_p": 2}).status_code == 400
    repeated = {"prompt": "A heron stood in the shallows, watching the water with great patience " * 3,
                "max_tokens": 1}
    for _ in range(2):  # the second one hits the first one's pages
        assert client.post("/v1/completions", json=repeated).status_code == 200
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    r = httpx.get(f"{server.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m = parse(r.text)
    for name in ("nanovllm_kv_blocks_used", "nanovllm_kv_blocks_free", "nanovllm_prefix_cache_hit_rate",
                 "nanovllm_generation_tokens_total", "nanovllm_cascade_steps_total",
                 'nanovllm_http_errors_total{status="400"}'):
        assert name in m, name
    assert m["nanovllm_prefix_cache_hit_tokens_total"] > 0 and m["nanovllm_prefix_cache_hit_rate"] > 0


# ---- bounded load ---------------------------------------------------------------------------------

def test_bounded_load(server):
    num_requests, num_clients = 200, 64
    prompts = [f"{SUBJECTS[i % 8]} {VERBS[i % 4]} request {i} of the load test" for i in range(num_requests)]

    async def one(c, i):
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 4, "temperature": 0.8, "seed": i,
                "ignore_eos": True, "stream": i % 2 == 0}
        if not body["stream"]:
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["completion_tokens"]
        chunks = 0
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    chunks += bool(json.loads(line[5:])["choices"][0]["text"])
        return chunks

    async def run_load():
        todo = iter(range(num_requests))
        done = []
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120,
                                     limits=httpx.Limits(max_connections=num_clients)) as c:
            async def worker():
                for i in todo:
                    done.append(await one(c, i))
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(num_clients))), timeout=150)
        return done

    done = asyncio.run(run_load())
    assert len(done) == num_requests
    assert all(n >= 1 for n in done)
    wait_until(lambda: idle(server), timeout=5)
    m = metrics(server)
    assert m["nanovllm_kv_blocks_used"] == 0
    assert m["nanovllm_kv_blocks_free"] == m["nanovllm_kv_blocks_total"]


def test_no_leaked_blocks_at_the_end(server):
    wait_until(lambda: idle(server), timeout=5)


# ---- the command lines ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(tiny_model, tmp_path, *args):
    """`python -m nanovllm.entrypoints.serve` on a free port, up and answering /health: (process, url, log)."""
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "nanovllm.entrypoints.serve", "--model", tiny_model, "--port", str(port),
           "--log-level", "warning", *args]
    log = tmp_path / "serve.log"
    with open(log, "w") as out, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT) as proc:
        try:
            url = f"http://127.0.0.1:{port}"

            def up():
                assert proc.poll() is None, log.read_text()
                try:
                    return httpx.get(f"{url}/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_until(up, timeout=60, interval=0.1)
            yield proc, url, log
        finally:
            if proc.poll() is None:
                proc.kill()


def test_serve_command_line(tiny_model, tmp_path):
    """python -m nanovllm.entrypoints.serve: starts, answers, and exits cleanly on Ctrl-C."""
    with serve_process(tiny_model, tmp_path, "--served-model-name", "cli-tiny", "--max-model-len", "256",
                       "--max-num-seqs", "8", "--no-enable-prefix-caching") as (proc, url, log):
        r = httpx.post(f"{url}/v1/completions", json={"model": "cli-tiny", "prompt": "Hello", "max_tokens": 3,
                                                     "ignore_eos": True}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert parse(httpx.get(f"{url}/metrics").text)["nanovllm_kv_blocks_total"] > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()


def test_sigterm_ends_live_streams_cleanly(tiny_model, tmp_path):
    """SIGTERM with a stream in flight: the client gets an error event and [DONE] (not a cut connection),
    the log has no traceback, and the process exits within 10 s."""
    with serve_process(tiny_model, tmp_path, "--served-model-name", "t", "--max-model-len", "4096",
                       "--max-num-seqs", "8") as (proc, url, log):
        body = {"model": "t", "prompt": "Once", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:
                        proc.send_signal(signal.SIGTERM)
                        stopped_at = time.monotonic()
        assert events[-1] == "[DONE]" and "shutting down" in events[-2], events[-3:]
        assert len(events) < 4000
        # uvicorn re-raises the signal it stopped on once it is done: killed by SIGTERM, on time
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM), log.read_text()
        assert time.monotonic() - stopped_at < 10
        assert "Traceback" not in log.read_text(), log.read_text()


def test_generate_command(tiny_model, capsys):
    from nanovllm.cli import main
    prompts = ["Hello", "The small engine reads a prompt"]
    assert main(["generate", "--model", tiny_model, "--max-tokens", "5", "--max-model-len", "128",
                 "--ignore-eos", "--json", *prompts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = LLM(tiny_model, max_model_len=128).generate(
        prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [x["text"] for x in lines] == [w["text"] for w in want]
    assert [x["num_tokens"] for x in lines] == [5, 5]
    assert main(["nonsense"]) == 2


def test_a_megabyte_prompt_does_not_stall_the_server(server, client):
    """Tokenizing 1 MB of text takes a while: it runs off the event loop, so /health answers at once
    while the prompt is tokenized and then rejected (too long)."""
    import threading
    big = {"model": MODEL, "prompt": "word " * 200_000, "max_tokens": 4}
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=client.post("/v1/completions", json=big)))
    worker.start()
    time.sleep(0.05)
    waits = []
    while worker.is_alive():
        start = time.monotonic()
        assert client.get("/health").status_code == 200
        waits.append(time.monotonic() - start)
        time.sleep(0.01)
    worker.join()
    assert result["r"].status_code == 400 and "max_model_len" in result["r"].text
    assert waits, "the big prompt was handled before /health was asked"
    waits.sort()
    # On the event loop this was 326 ms; the median has to stay under 50 ms (the max only bounds noise).
    assert waits[len(waits) // 2] < 0.05 and waits[-1] < 0.2, f"/health waits (s): {waits}"


@pytest.mark.parametrize("field, value", [("spaces_between_special_tokens", False),
                                          ("tool_choice", "auto"), ("functions", [{"name": "f"}]),
                                          ("reasoning_effort", "low"), ("no_such_field", 1)])
def test_fields_we_do_not_implement_get_a_400_naming_them(client, field, value):
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})):
        reply = client.post(path, json={**body, field: value})
        assert reply.status_code == 400 and field in reply.json()["error"]["message"], (path, reply.text)
        assert reply.json()["error"]["param"] == field
    # the value that asks for what the server does anyway, or null, is accepted
    ok = {"spaces_between_special_tokens": True}
    if field in ok:
        assert client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2,
                                                    field: ok[field]}).status_code == 200
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2,
                                                field: None}).status_code == 200


def test_model_tokenize_detokenize_endpoints(server, client, tiny_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/gpt-9").status_code == 404
    text = "The river runs to the sea"
    got = client.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert got["tokens"] == tok.encode(text) and got["count"] == len(got["tokens"])
    chat = client.post("/tokenize", json={"model": MODEL, "messages": USER}).json()["tokens"]
    template = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert chat == tok.encode(template, add_special_tokens=False)
    assert client.post("/detokenize", json={"model": MODEL, "tokens": got["tokens"]}).json()["prompt"] == text
    assert client.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert client.post("/tokenize", json={"prompt": "a", "messages": USER}).status_code == 400
    with httpx.Client(base_url=server.url) as anonymous:  # the API key guards them like /v1
        assert anonymous.post("/tokenize", json={"prompt": "a"}).status_code == 401


def test_stop_string_kept_special_tokens_and_template_kwargs(client, tiny_model):
    """include_stop_str_in_output, skip_special_tokens and chat_template_kwargs do what vLLM's do."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = {"model": MODEL, "prompt": "The river", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    free = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = free[4:6]
    cut = client.post("/v1/completions", json={**base, "stop": [stop]}).json()["choices"][0]["text"]
    kept = client.post("/v1/completions", json={**base, "stop": [stop], "include_stop_str_in_output": True})
    assert kept.json()["choices"][0]["text"] == cut + stop
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2,
                                                     "chat_template_kwargs": {"enable_thinking": False}}
                       ).status_code == 200


def test_skip_special_tokens_in_final_and_streamed_text(tiny_model):
    from nanovllm.engine.detokenizer import IncrementalDetokenizer
    from nanovllm.engine.sequence import Sequence
    llm = LLM(tiny_model, max_model_len=128)
    special = llm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    word = llm.tokenizer.encode("river")
    for skip in (True, False):
        seq = Sequence([1, 2], SamplingParams(skip_special_tokens=skip), 16)
        seq.token_ids += word + [special] + word
        text = llm.output_texts([seq])[0]
        assert ("<|im_end|>" in text) == (not skip) and text.count("river") == 2
        detok = IncrementalDetokenizer(llm.tokenizer, skip_special_tokens=skip)
        assert "".join(detok.add([t]) for t in word + [special] + word) + detok.flush() == text


def test_metrics_answers_head_and_parses_with_prometheus_client(client):
    from prometheus_client.parser import text_string_to_metric_families
    assert client.head("/metrics").status_code == 200
    reply = client.get("/metrics")
    assert reply.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    assert families["nanovllm_kv_blocks_total"].samples[0].value > 0
    assert families["nanovllm_step_batch_size"].type == "histogram"


def test_sglang_native_generate(client):
    """POST /generate (SGLang's native API): the same text as /v1/completions, single and batched, text or
    input_ids, streamed as the text so far; unknown sampling fields refused by name."""
    base = {"model": MODEL, "prompt": "The river", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    want = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    sampling = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    one = client.post("/generate", json={"text": "The river", "sampling_params": sampling}).json()
    assert one["text"] == want and one["meta_info"]["completion_tokens"] == 8
    assert one["meta_info"]["finish_reason"]["type"] == "length"
    many = client.post("/generate", json={"text": ["The river", "The river"], "sampling_params": sampling}).json()
    assert [m["text"] for m in many] == [want, want]
    ids = client.post("/tokenize", json={"prompt": "The river"}).json()["tokens"]
    assert client.post("/generate", json={"input_ids": ids, "sampling_params": sampling}).json()["text"] == want
    events = []
    with client.stream("POST", "/generate", json={"text": "The river", "sampling_params": sampling,
                                                  "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert texts[-1] == want and all(want.startswith(t) for t in texts)
    bad = client.post("/generate", json={"text": "x", "sampling_params": {"no_such_option": 0.5}})
    assert bad.status_code == 400 and "no_such_option" in bad.text
    assert client.post("/generate", json={"sampling_params": sampling}).status_code == 400


CONTROLS = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3, "min_p": 0.05,
            "logit_bias": {"77": 5.0, "292": -2.0}, "min_tokens": 6}


def test_sampling_controls_answer_as_offline(client, oai, tiny_model):
    """Penalties, min_p, logit_bias and min_tokens through /v1/completions (the openai client's
    extra_body for the non-OpenAI ones), chat and SGLang's /generate give what LLM.generate gives."""
    llm = LLM(tiny_model, **ENGINE)
    try:
        prompt = llm.tokenizer.encode("The river runs")
        eos = llm.config.eos_token_ids[0]
        controls = {**CONTROLS, "logit_bias": {**CONTROLS["logit_bias"], str(eos): 50.0}}  # EOS held back
        sp = SamplingParams(temperature=0, max_tokens=10, presence_penalty=1.5, frequency_penalty=0.5,
                            repetition_penalty=1.3, min_p=0.05, logit_bias={77: 5.0, 292: -2.0, eos: 50.0}, min_tokens=6)
        want = llm.generate([prompt], sp, use_tqdm=False)[0]
        assert len(want["token_ids"]) == 7 and want["finish_reason"] == "stop"  # EOS right after min_tokens
    finally:
        llm.close()
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, **controls}
    got = client.post("/v1/completions", json=body)
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["text"] == want["text"] and got.json()["usage"]["completion_tokens"] == 7
    extra = {k: v for k, v in controls.items() if k not in ("presence_penalty", "frequency_penalty", "logit_bias")}
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                               presence_penalty=1.5, frequency_penalty=0.5, logit_bias=controls["logit_bias"],
                               extra_body=extra)
    assert r.choices[0].text == want["text"] and r.choices[0].finish_reason == "stop"
    sampling = {"max_new_tokens": 10, "temperature": 0, **{k: v for k, v in controls.items() if k != "min_tokens"},
                "min_new_tokens": 6}
    native = client.post("/generate", json={"input_ids": prompt, "sampling_params": sampling})
    assert native.status_code == 200, native.text
    assert native.json()["text"] == want["text"] and native.json()["meta_info"]["completion_tokens"] == 7
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 10,
                                                     "temperature": 0, **controls})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 7, chat.text
    bad = client.post("/generate", json={"text": "x", "sampling_params": {"frequency_penalty": 2.5}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sampling_params"
    small_request_ok(client)
