"""The host tier's DMA copy plan (utils/memcpy2d.py): one 2D memcpy a page between the GPU cache
[2, layers, pages, ...] and the pool [host pages, 2, layers, ...]. The plan's CPU executor (strided
byte views) is held byte for byte against plain tensor indexing (kv[:, :, g] <-> pool[h]) and
against hand-computed offsets; HostTier in "dma" mode on CPU against "staged" mode."""
import numpy as np
import pytest
import torch

from nanovllm.engine.host_tier import HostTier
from nanovllm.utils.memcpy2d import cache_pitch, page_copy_plan, run_plan_cpu

SHAPES = [  # (layers, gpu pages, page_size, kv_heads, head_dim, host pages)
    (3, 20, 4, 2, 8, 11),
    (1, 7, 5, 3, 7, 5),      # odd everything, one layer
    (2, 33, 1, 1, 1, 40),    # one-element rows
]
DTYPES = [torch.bfloat16, torch.float32, torch.float8_e4m3fn]


def random_cache(shape, num_host, dtype, gen):
    layers, pages, page_size, kv_heads, head_dim = shape
    kv = torch.randint(0, 256, (2, layers, pages, page_size, kv_heads, head_dim, torch.finfo(dtype).bits // 8),
                       dtype=torch.uint8, generator=gen)
    pool = torch.randint(0, 256, (num_host, 2, layers, page_size, kv_heads, head_dim, torch.finfo(dtype).bits // 8),
                         dtype=torch.uint8, generator=gen)
    # random bytes reinterpreted: NaN patterns included, compared as bytes
    return kv.view(dtype).squeeze(-1), pool.view(dtype).squeeze(-1)


def page_lists(rng, num_gpu, num_host):
    n = int(rng.integers(1, min(num_gpu, num_host) + 1))
    scattered = (rng.choice(num_gpu, n, replace=False), rng.choice(num_host, n, replace=False))
    g0, h0 = int(rng.integers(0, num_gpu - n + 1)), int(rng.integers(0, num_host - n + 1))
    consecutive = (np.arange(g0, g0 + n), np.arange(h0, h0 + n))
    mixed = (np.arange(g0, g0 + n), rng.choice(num_host, n, replace=False))
    return [scattered, consecutive, mixed]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_plan_moves_the_same_bytes_as_indexing(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    *cache_shape, num_host = shape
    for trial in range(8):
        kv, pool = random_cache(cache_shape, num_host, dtype, gen)
        for gpu, host in page_lists(rng, kv.shape[2], num_host):
            # out: kv[:, :, g] -> pool[h]
            want_pool = pool.view(torch.uint8).clone()
            for g, h in zip(gpu, host):
                want_pool[h] = kv.view(torch.uint8)[:, :, g]
            kv_before = kv.view(torch.uint8).clone()
            run_plan_cpu(pool, kv, page_copy_plan(kv, pool, np.stack([gpu, host], 1), to_host=True))
            assert same_bytes(pool, want_pool) and same_bytes(kv, kv_before)
            # back: pool[h] -> kv[:, :, g'] with g' a fresh permutation of pages
            back = rng.permutation(kv.shape[2])[:len(host)]
            want_kv = kv.view(torch.uint8).clone()
            for h, g in zip(host, back):
                want_kv[:, :, g] = pool.view(torch.uint8)[h]
            pool_before = pool.view(torch.uint8).clone()
            run_plan_cpu(kv, pool, page_copy_plan(kv, pool, np.stack([host, back], 1), to_host=False))
            assert same_bytes(kv, want_kv) and same_bytes(pool, pool_before)


def test_plan_offsets_by_hand():
    """float32, 2 layers, 5 GPU pages, a row of 3 x 2 x 1 elements = 24 bytes; a page is 4 rows."""
    kv = torch.zeros(2, 2, 5, 3, 2, 1)
    pool = torch.zeros(6, 2, 2, 3, 2, 1)
    out = page_copy_plan(kv, pool, np.array([[3, 4], [0, 1]]), to_host=True)
    # pool page 4 starts at 4 x 96 bytes, rows packed (pitch 24); GPU page 3 at 3 x 24, rows 5 x 24 apart
    assert out.tolist() == [[384, 24, 72, 120, 24, 4], [96, 24, 0, 120, 24, 4]]
    back = page_copy_plan(kv, pool, np.array([[4, 3]]), to_host=False)
    assert back.tolist() == [[72, 120, 384, 24, 24, 4]]
    assert page_copy_plan(kv, pool, np.zeros((0, 2), dtype=np.int64), to_host=True).shape == (0, 6)
    assert cache_pitch(kv) == 120


def test_plan_rejects_what_it_cannot_copy():
    kv = torch.zeros(2, 2, 5, 3, 2, 4)
    pool = torch.zeros(6, 2, 2, 3, 2, 4)
    with pytest.raises(ValueError, match="GPU page ids"):
        page_copy_plan(kv, pool, np.array([[5, 0]]), to_host=True)
    with pytest.raises(ValueError, match="host page ids"):
        page_copy_plan(kv, pool, np.array([[6, 0]]), to_host=False)
    with pytest.raises(ValueError, match="host page ids"):
        page_copy_plan(kv, pool, np.array([[0, -1]]), to_host=True)
    with pytest.raises(ValueError, match="pool must be"):
        page_copy_plan(kv, torch.zeros(6, 2, 2, 3, 2, 5), np.array([[0, 0]]), to_host=True)
    with pytest.raises(ValueError, match="item size"):
        page_copy_plan(kv, pool.to(torch.bfloat16), np.array([[0, 0]]), to_host=True)
    with pytest.raises(ValueError, match="contiguous"):
        page_copy_plan(kv.transpose(4, 5).contiguous().transpose(4, 5), pool, np.array([[0, 0]]), to_host=True)
    with pytest.raises(ValueError, match="kv_cache must be"):
        page_copy_plan(kv[0], pool, np.array([[0, 0]]), to_host=True)
    with pytest.raises(ValueError, match="leaves its tensors"):
        run_plan_cpu(pool, kv, np.array([[6 * 2 * 2 * 3 * 2 * 4 * 4 - 8, 32, 0, 32, 16, 1]]))


def test_plan_on_a_cache_that_is_a_view_with_an_offset():
    """Offsets count from the tensor's first byte, not its storage's."""
    big = torch.arange(3 * 2 * 2 * 4 * 2 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2, 4, 2, 2, 2)
    kv = big[1]   # storage offset 128 elements
    pool = torch.zeros(3, 2, 2, 2, 2, 2)
    run_plan_cpu(pool, kv, page_copy_plan(kv, pool, np.array([[3, 2], [1, 0]]), to_host=True))
    assert torch.equal(pool[2], kv[:, :, 3]) and torch.equal(pool[0], kv[:, :, 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_tier_dma_mode_on_cpu_equals_staged_mode(dtype):
    """The same random write-backs, restores and background write-backs through two tiers over
    equal caches, one per copy mode: the caches and pools stay byte-identical."""
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    kv, pool0 = random_cache((3, 24, 4, 2, 8), 16, dtype, gen)
    tiers = {mode: HostTier(kv.clone(), 16, copy_mode=mode) for mode in ("dma", "staged")}
    assert tiers["dma"].copy_mode == "dma" and tiers["staged"].copy_mode == "staged"
    assert HostTier(kv.clone(), 4).copy_mode == "staged"   # the CPU default: plain copies
    for tier in tiers.values():
        tier.pool.copy_(pool0.view(tier.pool.dtype))
    for step in range(25):
        n = int(rng.integers(0, 9))
        out = np.stack([rng.choice(24, n, replace=False), rng.choice(16, n, replace=False)], 1) if n else None
        m = int(rng.integers(0, 9))
        back = np.stack([rng.choice(16, m, replace=False), rng.choice(24, m, replace=False)], 1) if m else None
        ahead = np.stack([rng.choice(24, 3, replace=False), rng.choice(16, 3, replace=False)], 1) if step % 3 else None
        fresh = torch.randint(0, 256, tiers["dma"].kv_cache[:, :, 0].view(torch.uint8).shape, dtype=torch.uint8,
                              generator=gen)
        for tier in tiers.values():
            timer = tier.before_forward(out, back, after_prev=True, wait_for_restores=True, write_ahead=ahead)
            tier.kv_cache.view(torch.uint8)[:, :, step % 24] = fresh   # the forward writes a page
            timer.forward_ends()
        assert same_bytes(tiers["dma"].kv_cache, tiers["staged"].kv_cache), step
        assert same_bytes(tiers["dma"].pool, tiers["staged"].pool), step


def test_host_tier_copy_mode_by_argument_or_environment(monkeypatch):
    kv = torch.zeros(2, 1, 4, 2, 1, 2)
    with pytest.raises(ValueError, match="copy_mode"):
        HostTier(kv, 2, copy_mode="kernel")
    monkeypatch.setenv("NANOVLLM_HOST_COPY_MODE", "dma")
    assert HostTier(kv, 2).copy_mode == "dma"
    assert HostTier(kv, 2, copy_mode="staged").copy_mode == "staged"   # the argument wins
    monkeypatch.setenv("NANOVLLM_HOST_COPY_MODE", "fast")
    with pytest.raises(ValueError, match="NANOVLLM_HOST_COPY_MODE"):
        HostTier(kv, 2)
    monkeypatch.delenv("NANOVLLM_HOST_COPY_MODE")
    with pytest.raises(ValueError, match="copy_streams .* must be 1 or 2, got 3"):
        HostTier(kv, 2, copy_streams=3)
    monkeypatch.setenv("NANOVLLM_HOST_COPY_STREAMS", "two")
    with pytest.raises(ValueError, match="NANOVLLM_HOST_COPY_STREAMS.*'two'"):
        HostTier(kv, 2)


def test_cuda_executor_passes_absolute_pointers_and_raises_on_an_error_code():
    """CudaMemcpy2D.run with the ctypes function replaced by a recorder: each plan row becomes one
    call at data_ptr + offset, cudaMemcpyDefault (4), the stream's handle; a nonzero return code is a
    RuntimeError naming the call, the code and its string."""
    from types import SimpleNamespace

    from nanovllm.utils.memcpy2d import CudaMemcpy2D
    kv = torch.zeros(2, 2, 5, 3, 2, 1)
    pool = torch.zeros(6, 2, 2, 3, 2, 1)
    plan = page_copy_plan(kv, pool, np.array([[3, 4], [0, 1]]), to_host=True)
    calls, codes = [], iter([0, 0, 0, 700])
    runner = CudaMemcpy2D.__new__(CudaMemcpy2D)   # no CUDA here: only the call loop is exercised
    runner.memcpy2d = lambda *args: (calls.append(args), next(codes))[1]
    runner.error_string = lambda rc: b"an illegal memory access was encountered"
    runner.path = "libcudart.so.test"
    stream = SimpleNamespace(cuda_stream=0xabc)
    runner.run(pool, kv, plan, stream)
    assert calls == [(pool.data_ptr() + 384, 24, kv.data_ptr() + 72, 120, 24, 4, 4, 0xabc),
                     (pool.data_ptr() + 96, 24, kv.data_ptr(), 120, 24, 4, 4, 0xabc)]
    runner.run(pool, kv, plan[:0], stream)
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match=r"cudaMemcpy2DAsync\(.*returned 700 \(an illegal memory access"):
        runner.run(pool, kv, plan, stream)



def mapped_libm_or_skip() -> str:
    """The libm this Python has mapped: a real shared library to stand in for libcudart (skips on a CUDA
    build of torch, which maps its own runtime, or where none is mapped)."""
    import os
    if torch.version.cuda:
        pytest.skip("a CUDA build of torch maps its own libcudart on import")
    with open("/proc/self/maps") as maps:
        libm = next((line.split()[-1] for line in maps if os.path.basename(line.split()[-1]).startswith("libm")), None)
    if libm is None:
        pytest.skip("no libm mapped to stand in for a runtime library")
    return libm

def test_find_cudart_prefers_the_library_mapped_in_the_process(tmp_path):
    """In a fresh process: a libcudart.so.* loaded before the call (here a copy of the libm this
    Python has mapped, standing in) is the one found, wherever it lies."""
    import shutil
    import subprocess
    import sys
    libm = mapped_libm_or_skip()
    fake = tmp_path / "libcudart.so.99"
    shutil.copy(libm, fake)
    code = ("import ctypes, sys; ctypes.CDLL(sys.argv[1]); "
            "from nanovllm.utils.memcpy2d import find_cudart; print(find_cudart())")
    out = subprocess.run([sys.executable, "-c", code, str(fake)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(fake)


def test_engine_with_dma_copies_on_cpu_gives_the_plain_engines_outputs(tmp_path, make_llm, monkeypatch):
    """End to end: llama-tiny through 32 GPU pages with the host tier's copies run as the dma plan
    (on CPU, by byte views): greedy outputs equal the engine without the tier, pages went both ways.
    The control (restores that copy nothing change the outputs) is test_kv_tiers_engine's."""
    import random

    from nanovllm import SamplingParams
    from nanovllm.tools.make_model import make_model
    model = make_model("llama-tiny", str(tmp_path / "llama-tiny"), seed=0)
    rng = random.Random(0)
    systems = [[rng.randint(1, 500) for _ in range(48)] for _ in range(5)]
    prompts = [s + [rng.randint(1, 500) for _ in range(6)] for s in systems for _ in range(3)]
    rng.shuffle(prompts)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tight = dict(num_kvcache_blocks=32, kvcache_block_size=8, max_num_seqs=4, max_model_len=256)

    def rounds(llm):
        return [o["token_ids"] for _ in range(2) for o in llm.generate(prompts, greedy, use_tqdm=False)]

    want = rounds(make_llm(model, **tight))
    llm = make_llm(model, host_kvcache_gb=0.01, **tight)
    tier = llm.model_runner.host_tier
    assert tier.copy_mode == "staged"   # the CPU default
    tier.copy_mode = "dma"
    planned = []   # pages a plan, counted on their way through
    monkeypatch.setattr("nanovllm.engine.host_tier.page_copy_plan",
                        lambda *a: planned.append(len(a[2])) or page_copy_plan(*a))
    assert rounds(llm) == want
    copies = llm.kv_state()["copies"]
    assert copies["pages_to_host"] > 0 and copies["pages_from_host"] > 0
    assert sum(planned) == copies["pages_to_host"] + copies["pages_from_host"]


class PlanBinding:
    """A CPU stand-in for CudaMemcpy2D: runs each plan through run_plan_cpu after `mutate` (a wrong binding)."""

    def __init__(self, mutate=lambda plan: plan):
        self.mutate, self.calls = mutate, 0

    def run(self, dst, src, plan, stream):
        self.calls += 1
        run_plan_cpu(dst, src, self.mutate(plan.copy()))


def zeroed_tier(num_gpu: int, num_host: int, dtype=torch.bfloat16) -> HostTier:
    return HostTier(torch.zeros(2, 3, num_gpu, 4, 2, 8, dtype=dtype), num_host, copy_mode="staged")


@pytest.mark.parametrize("num_gpu,num_host", [(9, 5), (2, 1), (1, 3)])
def test_dma_check_passes_a_right_binding_and_leaves_zeros(num_gpu, num_host):
    tier = zeroed_tier(num_gpu, num_host)
    binding = PlanBinding()
    tier._check_dma(binding)
    assert binding.calls == 2
    assert not tier.kv_cache.view(torch.uint8).any() and not tier.pool.view(torch.uint8).any()


def _drop_last_row(plan):
    plan[:, 5] -= 1
    return plan


def _host_offset_ignored(plan):   # the pool's offset column: dst_offset out, src_offset back
    plan[:, 0 if plan[0, 1] == plan[0, 4] else 2] = 0
    return plan


def _gpu_offset_ignored(plan):
    plan[:, 2 if plan[0, 1] == plan[0, 4] else 0] = 0
    return plan


@pytest.mark.parametrize("mutate", [_drop_last_row, _host_offset_ignored, _gpu_offset_ignored],
                         ids=lambda f: f.__name__)
def test_dma_check_catches_a_wrong_binding_and_still_leaves_zeros(mutate):
    """A binding that drops a page's last row, or ignores the host or the GPU page offset, fails the
    start-up check (the check copied through host page 0 only and missed a host offset ignored). The
    cache is zeros after (where the wrong binding wrote is unknown: all of it is cleared)."""
    tier = zeroed_tier(9, 5)
    with pytest.raises(RuntimeError, match="start-up check"):
        tier._check_dma(PlanBinding(mutate))
    assert not tier.kv_cache.view(torch.uint8).any() and not tier.pool[-1].view(torch.uint8).any()


def test_dma_check_zeroes_its_pages_when_the_binding_raises():
    """A binding whose second call fails (a CUDA error code) must not leave the pattern in the cache:
    in bf16 its bytes hold NaNs, and a page that was zeros before start-up must be zeros after."""
    tier = zeroed_tier(9, 5)
    binding = PlanBinding()
    inner = binding.run

    def failing(*args):
        if binding.calls == 1:
            raise RuntimeError("cudaMemcpy2DAsync returned 1 (invalid argument)")
        inner(*args)
    binding.run = failing
    with pytest.raises(RuntimeError, match="invalid argument"):
        tier._check_dma(binding)
    assert binding.calls == 1
    assert not tier.kv_cache.view(torch.uint8).any() and not tier.pool.view(torch.uint8).any()


def test_dma_binding_with_no_host_page_skips_the_check(monkeypatch):
    """host_kvcache_gb under one page gives a tier of 0 pages: nothing is ever copied, and the check
    (which copies through the last host page) must not fail the engine's start (it raised a ValueError,
    host page ids in [0, 0), that the fallback does not catch). With pages, the check runs."""
    binding = PlanBinding()
    binding.max_pitch = lambda device: 2**31 - 1
    monkeypatch.setattr("nanovllm.engine.host_tier.cuda_memcpy2d", lambda: binding)
    assert zeroed_tier(4, 0)._dma_binding() is binding and binding.calls == 0
    assert zeroed_tier(4, 2)._dma_binding() is binding and binding.calls == 2
    binding.max_pitch = lambda device: 100
    with pytest.raises(RuntimeError, match="largest memcpy pitch"):
        zeroed_tier(4, 2)._dma_binding()


def test_find_cudart_prefers_the_mapped_library_of_torchs_cuda_major(tmp_path):
    """Two runtimes mapped (stand-ins: copies of libm named libcudart.so.11.0 and libcudart.so.12): the
    one of the asked major version is found whatever the mapping order (PyTorch's by default); a
    major that none has falls back to the first mapped. (Before, the first mapped was taken.)"""
    import shutil
    import subprocess
    import sys
    libm = mapped_libm_or_skip()
    old, new = tmp_path / "libcudart.so.11.0", tmp_path / "libcudart.so.12"
    shutil.copy(libm, old)
    shutil.copy(libm, new)
    code = ("import ctypes, sys; [ctypes.CDLL(p) for p in sys.argv[1:]]; "
            "from nanovllm.utils.memcpy2d import find_cudart; "
            "print(find_cudart('12'), find_cudart('11'), find_cudart('1'))")
    for order in ((old, new), (new, old)):
        out = subprocess.run([sys.executable, "-c", code, *map(str, order)], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[:2] == [str(new), str(old)], (order, out)
        assert out[2] in (str(old), str(new))   # "libcudart.so.1" names neither: the first mapped
