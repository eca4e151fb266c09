"""Shared fixtures: random-weight checkpoints built once per run, the shipped trained tiny model, and LLMs
checked for leaked pages."""

import time

import pytest
import torch

from nanovllm import LLM
from nanovllm.assets import tiny_trained_path
from nanovllm.tools.make_model import make_model

# Tiny models: one thread beats two, which spin against each other (and against a second test process).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {preset: make_model(preset, str(root / preset), seed=0)
            for preset in ("qwen3-tiny", "qwen3-tiny-hd", "qwen2-tiny")}


@pytest.fixture(scope="session")
def tiny_model(model_dirs):
    return model_dirs["qwen3-tiny"]


@pytest.fixture(scope="session")
def trained_model():
    """The shipped tiny Qwen3 trained on public-domain text (nanovllm/assets/, head_dim 128 so FlashInfer
    runs it): varied greedy paths with wide margins, for token-for-token comparisons."""
    return tiny_trained_path()


def assert_no_leaks(llm: LLM):
    """All pages free, every ref count zero, and the block manager's own invariants hold."""
    bm = llm.scheduler.block_manager
    assert llm.is_finished()
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} pages leaked"
    assert all(b.ref_count == 0 for b in bm.blocks)
    bm.check_invariants()


@pytest.fixture
def small_batch_kernels_off(monkeypatch):
    """cuBLAS and FlashInfer's decode for batches of <= 16 rows (tinygemm2 and the Triton decode are the
    defaults): for the greedy GPU tests whose identical-output floors were measured on those kernels' paths.
    A rounding-level change moves tiny random models' paths to other near-ties (layers/decode_gemm.py's
    header); tests/test_decode_gemm.py checks the defaults' logits against these kernels' instead. GPU only
    (skips the test without CUDA: FlashInfer may be absent)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    import nanovllm.attention.flashinfer_backend as fb
    from nanovllm.layers import decode_gemm
    monkeypatch.setattr(decode_gemm, "CHOICE", "cublas")
    monkeypatch.setattr(fb, "TRITON_SMALL_ROWS", 0)


@pytest.fixture
def make_llm():
    """Build LLMs for a test; after it, each must be back to all pages free."""
    made = []

    def make(model, **kwargs):
        kwargs.setdefault("max_model_len", 1024)
        kwargs.setdefault("max_num_seqs", 64)
        llm = LLM(model, **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        assert_no_leaks(llm)


@pytest.fixture
def oai(server):
    """The official `openai` client on the module's `server` fixture (a ServerThread), with its API key."""
    import openai
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key or "none", max_retries=0,
                       timeout=60) as c:
        yield c


def wait_until(condition, timeout: float, what: str = "condition", interval: float = 0.01) -> float:
    """Poll until condition() is true; returns the seconds it took (fails the test past the timeout)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


def server_metrics(server) -> dict[str, float]:
    """A running server's /metrics, parsed (tests of the server and its fuzzer)."""
    import httpx

    from nanovllm.entrypoints.metrics import parse
    r = httpx.get(f"{server.url}/metrics", timeout=10)
    assert r.status_code == 200
    return parse(r.text)


def server_idle(server) -> bool:
    """No request running, waiting or alive, and every KV page free."""
    m = server_metrics(server)
    return (m["nanovllm_num_requests_running"] == 0 and m["nanovllm_num_requests_waiting"] == 0
            and m["nanovllm_kv_blocks_used"] == 0 and m["nanovllm_live_requests"] == 0)
