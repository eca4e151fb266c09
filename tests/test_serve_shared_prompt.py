"""scripts/serve_shared_prompt.py against a live server: it completes every request, measures TTFT and
ITL, and sees prefix-cache hits when several requests share a system prompt."""
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from nanovllm.entrypoints.metrics import parse
from nanovllm.entrypoints.serve import ServerThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "serve_shared_prompt.py")
API_KEY = "load-key"


@pytest.fixture(scope="module")
def server(tiny_model):
    # Cascade on: requests sharing a system prompt are what it is for, and /metrics should count it.
    with ServerThread(tiny_model, ["tiny"], api_key=API_KEY, max_model_len=512, max_num_seqs=32,
                      enable_cascade_attention=True) as s:
        yield s


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120, env=env)


def run_load(server, tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The script against the test server with the right key; it must succeed. Returns its result."""
    out = tmp_path / "result.json"
    p = run_script("--base-url", f"{server.url}/v1", "--model", "tiny", "--api-key", API_KEY, *args, "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    return p, json.loads(out.read_text())


def test_shared_prompt_load_reports_cache_hits(server, tmp_path):
    p, result = run_load(server, tmp_path, "--concurrency", "4", "--groups", "2", "--system-tokens", "64",
                         "--question-tokens", "8", "--output-tokens", "4", "--requests", "12", "--seed", "1")
    assert result["server_is_nanovllm"] and result["ignore_eos"]
    assert result["completed"] == 12 and result["errors"] == 0
    assert result["total_output_tokens"] == 12 * 4  # ignore_eos: exactly O tokens each
    assert result["request_throughput_rps"] > 0 and result["output_throughput_tok_s"] > 0
    for key in ("ttft_s", "itl_s", "e2e_latency_s"):
        assert result[key]["p50"] is not None and result[key]["p50"] <= result[key]["p99"], key
    assert result["itl_s"]["count"] == 12 * 3
    # 2 system prompts, 12 requests: 10 of them find their system prompt's pages cached.
    assert result["prefix_cache_hit_rate"] > 0
    assert result["usage_cached_token_ratio"] > 0
    assert "ttft" in p.stdout and "prefix_cache_hit_rate" in p.stdout
    assert parse(httpx.get(f"{server.url}/metrics").text)["nanovllm_cascade_steps_total"] > 0
    # Nothing left running or holding pages.
    deadline = time.monotonic() + 5
    while parse(httpx.get(f"{server.url}/metrics").text)["nanovllm_kv_blocks_used"] != 0:
        assert time.monotonic() < deadline, "KV pages still held after the run"
        time.sleep(0.02)


def test_script_reports_errors(server, tmp_path):
    """A wrong key: every request fails, the run still ends, and the exit status says so."""
    p = run_script("--base-url", f"{server.url}/v1", "--model", "tiny", "--api-key", "wrong",
                   "--concurrency", "2", "--groups", "1", "--system-tokens", "8", "--question-tokens", "2",
                   "--output-tokens", "2", "--requests", "3", "--out", str(tmp_path / "r.json"))
    assert p.returncode == 1
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["errors"] == 3 and result["completed"] == 0 and "401" in result["error_samples"][0]
    # The policy comparison's table, for a run whose requests all failed: '-' latencies and the first
    # error (the table itself raised on None latencies before).
    import importlib.util
    import io
    from contextlib import redirect_stdout
    spec = importlib.util.spec_from_file_location("serve_shared_prompt", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = io.StringIO()
    with redirect_stdout(out):
        script.print_comparison({"fcfs": result}, 10.0)
    line, error = out.getvalue().splitlines()[1:]
    assert line.split()[:3] == ["fcfs", "0", "3"] and line.split()[5:7] == ["-", "-"]
    assert "first error: HTTP 401" in error


def test_token_chunks_count_every_token(server, tmp_path):
    """--token-chunks yes asks for logprobs=0: every token streams a chunk with its logprob entry, so a
    token that decodes to no text (make_model's random checkpoints sample ids past their tokenizer's
    vocabulary) still counts; the timings see one event a token. (The tiny model's tokens all decode to
    text, so this checks that the server streams logprobs=0 chunks the script reads; the no-text case is
    the H200 run's, claude_docs/memory.md.)"""
    _, result = run_load(server, tmp_path, "--concurrency", "2", "--groups", "1", "--system-tokens", "16",
                         "--question-tokens", "4", "--output-tokens", "5", "--requests", "4", "--token-chunks", "yes")
    assert result["token_chunks"] and result["completed"] == 4 and result["errors"] == 0
    assert result["itl_s"]["count"] == 4 * 4   # 5 token events a request
