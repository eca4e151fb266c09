"""GET /debug/kv and the host-tier series of /metrics, on a live server whose tiny GPU budget forces
prefixes out to the host tier and back; real HTTP clients (httpx, openai)."""
import random

import httpx
import openai
import pytest
from conftest import assert_no_leaks

from nanovllm.entrypoints.metrics import parse
from nanovllm.entrypoints.serve import ServerThread, build_parser

ENGINE = dict(max_model_len=256, max_num_seqs=4, num_kvcache_blocks=32, kvcache_block_size=8, host_kvcache_gb=0.01,
              schedule_policy="lpm")


@pytest.fixture(scope="module")
def server(tiny_model):
    s = ServerThread(tiny_model, ["tiny"], **ENGINE).start()
    yield s
    s.stop()
    engine = s.engine.engine
    assert_no_leaks(engine)


def test_debug_kv_and_host_tier_metrics(server):
    rng = random.Random(0)
    systems = [[rng.randint(1, 500) for _ in range(64)] for _ in range(5)]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60) as oai:
        for round_ in range(2):
            for system in systems:
                out = oai.completions.create(model="tiny", prompt=system + [rng.randint(1, 500)], max_tokens=3,
                                             temperature=0)
                assert out.usage.completion_tokens == 3
    state = httpx.get(f"{server.url}/debug/kv", params={"max_pages": 5}, timeout=10).json()
    assert state["host"]["pages"] > 0 and state["host"]["used"] > 0 and len(state["host"]["lru"]) <= 5
    assert state["hits"]["host_hit_tokens"] > 0 and state["copies"]["pages_from_host"] > 0
    assert state["scheduler"]["policy"] == "lpm"
    assert state["gpu"]["used"] == 0   # nothing running: every page free (cached or not)
    m = parse(httpx.get(f"{server.url}/metrics", timeout=10).text)
    assert m["nanovllm_kv_host_blocks_total"] == state["host"]["pages"]
    assert m['nanovllm_kv_host_bytes_copied_total{direction="from_host"}'] == state["copies"]["bytes_from_host"] > 0
    assert m['nanovllm_kv_host_bytes_copied_total{direction="to_host"}'] == state["copies"]["bytes_to_host"] > 0
    assert m["nanovllm_kv_restore_latency_seconds"] > 0
    assert 0 < m["nanovllm_max_queue_wait_seconds"] == state["scheduler"]["max_queue_wait_s"] < 10
    bad = httpx.get(f"{server.url}/debug/kv", params={"max_pages": -1}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_pages"


def test_host_kv_cache_flag_spellings():
    for flag in ("--host-kv-cache-gb", "--host-kvcache-gb"):
        args = build_parser().parse_args(["--model", "m", flag, "2.5", "--schedule-policy", "dfs-weight"])
        assert args.host_kvcache_gb == 2.5 and args.schedule_policy == "dfs-weight"
