"""GPU: the host KV tier's CUDA path (pinned pool, side-stream copies ordered by events) and the
engine with it on vs off under a tiny GPU budget. Skipped without CUDA; run by scripts/gpu_check.sh."""
import random
import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.engine.host_tier import HostTier  # noqa: E402


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    from nanovllm.tools.make_model import make_model
    return make_model("qwen3-tiny", str(tmp_path_factory.mktemp("m") / "tiny128"), seed=0, dtype="bfloat16",
                      hidden_size=256, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                      intermediate_size=512, num_hidden_layers=3, initializer_range=0.1)  # not degenerate


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("copy_mode", ["dma", "staged"])
@pytest.mark.parametrize("after_prev", [False, True])
def test_cuda_copies_move_the_exact_bytes(after_prev, copy_mode, dtype):
    kv = torch.randn(2, 3, 200, 16, 8, 128, device="cuda").to(dtype)
    tier = HostTier(kv, 100, copy_mode=copy_mode)
    kv = tier.kv_cache   # fp8: its uint8 view, compared as bytes
    assert tier.pool.is_pinned() and tier.copy_mode == copy_mode
    rng = np.random.default_rng(0)
    gpu = rng.choice(200, size=70, replace=False)
    # a long run of consecutive host pages (one memcpy), then 30 other distinct pages
    others = rng.choice(np.setdiff1d(np.arange(100), np.arange(10, 50)), size=30, replace=False)
    host = np.concatenate([np.arange(10, 50), others])
    saved = kv[:, :, torch.from_numpy(gpu).cuda()].clone()
    if not after_prev:  # the contract without after_prev: no queued work touches these pages
        torch.cuda.synchronize()
    timer = tier.copy(np.stack([gpu, host], 1), None, after_prev)
    kv[:, :, torch.from_numpy(gpu).cuda()] = 0   # the pages are reused by the next step's forward
    back = rng.permutation(200)[:70]
    if not after_prev:
        torch.cuda.synchronize()
    timer2 = tier.copy(None, np.stack([host, back], 1), after_prev)
    torch.cuda.synchronize()
    assert torch.equal(kv[:, :, torch.from_numpy(back).cuda()], saved)
    assert torch.equal(tier.pool[torch.from_numpy(host)], saved.movedim(2, 0).cpu())
    assert timer.copy_seconds() > 0 and timer2.restore_seconds() > 0


def tenants(seed=0):
    rng = random.Random(seed)
    systems = [[rng.randrange(1900) for _ in range(300)] for _ in range(8)]
    prompts = [s + [rng.randrange(1900) for _ in range(rng.randrange(3, 30))] for s in systems for _ in range(4)]
    rng.shuffle(prompts)
    return prompts


@pytest.mark.parametrize("backend,feedback", [("torch", "0"), ("flashinfer", "0"), ("torch", "1")])
def test_greedy_with_host_tier_equals_without(gpu_model, backend, feedback, monkeypatch, small_batch_kernels_off):
    """Eight 300-token system prompts, 4 requests each, twice, through 64 GPU pages: prefixes are
    written back and restored. float32 on the torch backend (exact), bf16 on FlashInfer (a rare
    near-tie flip is allowed, as batches differ; cuBLAS and FlashInfer's decode for small batches, the
    kernels that allowance was measured on: conftest.small_batch_kernels_off). With copy feedback (NANOVLLM_HOST_COPY_FEEDBACK=1) the
    copies overlap other requests' forwards and a forward skips its batch's write-backs when it
    writes none of their pages: still the same tokens."""
    monkeypatch.setenv("NANOVLLM_HOST_COPY_FEEDBACK", feedback)
    kw = dict(max_model_len=512, max_num_seqs=8, num_kvcache_blocks=64)
    if backend == "torch":
        kw.update(attention_backend="torch", dtype="float32", enforce_eager=True)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    results = {}
    for host in (0, 0.05):
        llm = LLM(gpu_model, host_kvcache_gb=host, **kw)
        results[host] = [o["token_ids"] for _ in range(2) for o in llm.generate(tenants(), sp, use_tqdm=False)]
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        bm.check_invariants()
        if host:
            state = llm.kv_state()
            print(backend, "host tier:", state["copies"], state["hits"])
            assert state["copies"]["pages_from_host"] > 0
        llm.close()
        del llm
    diverged = sum(a != b for a, b in zip(results[0], results[0.05]))
    print(backend, "requests whose output differs with the host tier:", diverged, "of", len(results[0]))
    assert diverged == 0 if backend == "torch" else diverged <= 2


def test_dma_is_the_default_on_cuda():
    tier = HostTier(torch.zeros(2, 1, 8, 16, 8, 128, device="cuda", dtype=torch.bfloat16), 4)
    assert tier.copy_mode == "dma" and "libcudart" in tier.memcpy2d.path


@pytest.mark.parametrize("copy_mode", ["dma", "staged"])
def test_restores_land_before_the_next_steps_forward(copy_mode):
    """A step that does not read its restores (wait_for_restores False) leaves them to the copy
    stream; the next step's before_forward orders its forward after them."""
    kv = torch.randn(2, 2, 64, 16, 8, 128, device="cuda").to(torch.bfloat16)
    tier = HostTier(kv, 64, copy_mode=copy_mode)
    tier.pool.copy_(torch.randn(tier.pool.shape).to(torch.bfloat16))
    host = np.arange(40)
    gpu = np.random.default_rng(1).permutation(64)[:40]
    tier.before_forward(None, np.stack([host, gpu], 1), False, False)
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):   # this step's forward: independent work, not waiting for the restores
        busy = busy @ busy / 64
    tier.before_forward(None, None, False, False)   # the next step
    got = kv[:, :, torch.from_numpy(gpu).cuda()].clone()   # its forward reads them
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), tier.pool[torch.from_numpy(host)].movedim(0, 2))


@pytest.mark.parametrize("copy_mode", ["dma", "staged"])
def test_queuing_copies_does_not_wait_for_the_device(copy_mode):
    """before_forward only queues: with the main stream busy (~100 ms of matmuls) and copies that
    must follow it (copy_after_prev), the host returns at once. Before session 6's fix the GPU page
    ids went up from pageable memory once a chunk of 32 pages, which CUDA may order after the copy
    stream's work: the host (and the forward it launches next) waited for the copies. The step's
    timer then reads its stall, forward, copies and restores apart."""
    kv = torch.randn(2, 4, 512, 16, 8, 128, device="cuda").to(torch.bfloat16)
    tier = HostTier(kv, 512, copy_mode=copy_mode)
    rng = np.random.default_rng(2)
    out = np.stack([rng.permutation(512)[:256], np.arange(256)], 1)
    back = np.stack([np.arange(256, 512), rng.permutation(512)[:256]], 1)
    busy = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):   # the step in flight
        busy = busy @ busy / 8192
    queued = time.perf_counter()
    timer = tier.before_forward(out, back, True, True, prefill_tokens=100)
    host_s = time.perf_counter() - queued
    timer.forward_ends()
    torch.cuda.synchronize()
    device_s = time.perf_counter() - start
    times = timer.times()
    print(f"{copy_mode}: host {host_s * 1e3:.1f} ms to queue 512 pages of copies ({host_s / 512 * 1e6:.1f} us a page); "
          f"device {device_s * 1e3:.1f} ms; {times}")
    assert host_s < 0.2 * device_s
    assert copy_mode != "dma" or host_s / 512 < 20e-6   # one ctypes call a page (aim: well under 5 us)
    assert times.copy_pages == 512 and times.restore_pages == 256 and times.prefill_tokens == 100
    assert 0 < times.restore_s < times.copy_s <= times.stall_s + 1e-4   # this forward waited for all of them
