"""Forgetting the prefix cache (LLM.reset_prefix_cache, the server's /flush_cache and /reset_prefix_cache): after
it every prompt is computed in full again, in both KV tiers, with the same greedy text; with requests live it
changes nothing and says so; the server also answers SGLang's /health_generate probe."""
import threading

import httpx
import pytest
from conftest import assert_no_leaks, wait_until

from nanovllm import SamplingParams
from nanovllm.entrypoints.serve import ServerThread

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SYSTEMS = [list(range(100 + 64 * s, 164 + 64 * s)) for s in range(4)]   # 8 pages of 8 tokens each
PROMPTS = [SYSTEMS[i % 4] + [7 + i, 300 + i, 9] for i in range(8)]   # two requests a system prompt


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from nanovllm.tools.make_model import make_model
    return make_model("llama-tiny", str(tmp_path_factory.mktemp("m") / "llama-tiny"), seed=0)


def run(llm) -> tuple[list, list]:
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [o["token_ids"] for o in outs], [o["num_cached_tokens"] for o in outs]


# 64 GPU pages hold the 4 system prompts of 8 pages; 24 do not: there the host tier holds what the GPU evicts.
@pytest.mark.parametrize("pages,host_gb", [(64, 0), (24, 0.01)])
def test_reset_forgets_both_tiers_and_keeps_the_text(model, make_llm, pages, host_gb):
    llm = make_llm(model, num_kvcache_blocks=pages, kvcache_block_size=8, max_num_seqs=3, max_model_len=128,
                   host_kvcache_gb=host_gb)
    bm = llm.scheduler.block_manager
    first, cached = run(llm)
    again, cached_again = run(llm)
    assert again == first and min(cached_again) >= len(SYSTEMS[0]), cached_again
    if host_gb:
        assert bm.num_used_host_blocks > 0   # the tier holds pages to forget
    hits_before = bm.num_cache_hit_tokens

    assert llm.reset_prefix_cache() is True
    bm.check_invariants()
    assert not bm.hash_to_block_id and bm.num_used_host_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    after, cached_after = run(llm)
    assert after == first
    assert cached_after[0] == 0, cached_after   # the first request computes the system prompt again
    assert cached_after == cached, (cached_after, cached)   # exactly as on the fresh engine
    assert bm.num_cache_hit_tokens >= hits_before   # metrics' counters keep counting
    assert llm.reset_prefix_cache() is True   # and again, on a cache just refilled
    assert_no_leaks(llm)


def test_reset_refused_while_requests_are_live(model, make_llm):
    llm = make_llm(model, num_kvcache_blocks=64, kvcache_block_size=8, max_num_seqs=4, max_model_len=128)
    run(llm)   # the system prompt is cached
    seq = llm.add_request(PROMPTS[0], GREEDY)
    assert llm.reset_prefix_cache() is False   # queued
    llm.step()
    assert llm.reset_prefix_cache() is False   # running, a step in flight
    while not llm.is_finished():
        llm.step()
    assert seq.num_cached_tokens >= len(SYSTEMS[0])   # nothing was forgotten
    assert llm.scheduler.block_manager.hash_to_block_id
    assert llm.reset_prefix_cache() is True
    assert_no_leaks(llm)


def test_server_flush_cache_and_health_generate(tiny_model):
    key = {"Authorization": "Bearer k"}
    body = {"model": "tiny", "prompt": "A heron stood in the shallows, watching the water with great patience " * 3,
            "max_tokens": 2, "temperature": 0}
    with ServerThread(tiny_model, ["tiny"], api_key="k", max_model_len=512, max_num_seqs=8) as server, \
            httpx.Client(base_url=server.url, headers=key, timeout=60) as c:
        def cached() -> int:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert cached() == 0 and cached() > 0
        for method, path in (("POST", "/flush_cache"), ("GET", "/flush_cache"), ("POST", "/reset_prefix_cache")):
            r = c.request(method, path)
            assert r.status_code == 200 and r.text == "Cache flushed.\n", (path, r.text)
            assert cached() == 0, path   # computed in full again (and cached for the next flush to forget)
        assert httpx.post(f"{server.url}/flush_cache").status_code == 401   # an admin call: the key is needed

        # While a request runs: 400, and the cache is kept.
        long = {**body, "prompt": "Another prompt for the long one", "max_tokens": 400, "ignore_eos": True}
        t = threading.Thread(target=c.post, args=("/v1/completions",), kwargs={"json": long})
        t.start()
        try:
            wait_until(lambda: not server.engine.engine.is_finished(), 30, "the long request started", interval=0.005)
            r = c.post("/flush_cache")
            assert r.status_code == 400 and "running or waiting" in r.text, r.text
        finally:
            t.join(120)
        assert cached() > 0

        r = httpx.get(f"{server.url}/health_generate", timeout=30)   # a probe, like /health: no key
        assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
        # A step that fails: the probe answers 503 with the engine's error, and the next one 200.
        engine, failed = server.engine, []

        def step_failing_once():
            if not failed:
                failed.append(1)
                raise RuntimeError("injected step failure")
            return type(engine.engine).step(engine.engine)
        engine.engine.step = step_failing_once
        r = httpx.get(f"{server.url}/health_generate", timeout=30)
        del engine.engine.step
        assert r.status_code == 503 and "injected step failure" in r.json()["status"], r.text
        assert httpx.get(f"{server.url}/health_generate", timeout=30).status_code == 200
    assert not engine.is_alive
    assert_no_leaks(engine.engine)


def test_flushes_racing_requests(tiny_model):
    """Flushes and probes sent while requests come and go: each flush is done (200) or refused (400), never
    half done; every greedy answer is the one a quiet server gives; no page is left held. Three waves of
    requests, flushes racing each wave, and one flush between waves once the engine is idle (done)."""
    import asyncio
    prompts = [f"System prompt number {i % 3}: answer briefly and precisely. Question {i}?" for i in range(12)]

    def body(i: int) -> dict:
        return {"model": "tiny", "prompt": prompts[i], "max_tokens": 8, "temperature": 0, "ignore_eos": True}

    with ServerThread(tiny_model, ["tiny"], max_model_len=256, max_num_seqs=4) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            quiet = [c.post("/v1/completions", json=body(i)).json()["choices"][0]["text"] for i in range(len(prompts))]

        async def wave():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                async def ask(i):
                    await asyncio.sleep(0.002 * i)
                    r = await c.post("/v1/completions", json=body(i))
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["text"]

                async def flush(k):
                    await asyncio.sleep(0.004 * k)
                    return (await c.request("POST" if k % 2 else "GET", "/flush_cache")).status_code

                async def probe():
                    return (await c.get("/health_generate")).status_code
                return await asyncio.gather(asyncio.gather(*(ask(i) for i in range(len(prompts)))),
                                            asyncio.gather(*(flush(k) for k in range(10))), probe())
        racing = []
        for _ in range(3):
            answers, flushes, probed = asyncio.run(wave())
            assert answers == quiet and probed == 200
            racing += flushes
            # The last step may still be collected after the answers are out.
            wait_until(server.engine.engine.is_finished, 10, "the engine idle", interval=0.005)
            assert httpx.post(f"{server.url}/flush_cache").status_code == 200   # between waves: done
        assert set(racing) <= {200, 400} and 400 in racing, racing
        engine = server.engine
    assert_no_leaks(engine.engine)
