"""CustomAllReduce (nanovllm/distributed/custom_all_reduce.py).

CPU: the module imports without FlashInfer or CUDA, unusable setups give `disabled` (no crash, no
collective where the arguments decide), should_use()'s rules, and, with two gloo processes, that a
failure on one rank disables it on every rank with the same reason (under inference mode, as around
CUDA-graph capture).
GPU (2+ GPUs and FlashInfer): two spawned processes compare it with NCCL's dist.all_reduce, eagerly
and in CUDA graphs, for both backends; and the TRT-LLM fused all-reduce + residual + RMSNorm.
"""
import os

for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1"), ("FLASHINFER_USE_CUDA_NORM", "1")):
    os.environ.setdefault(_key, _value)

import datetime  # noqa: E402
import importlib.util  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leave(results_q, rc: int = 0):
    """End a spawned test process: flush the result queue (os._exit would drop what its feeder thread
    still holds), destroy the group (abandoned after 10 s: NCCL 2.28 was seen hanging), exit."""
    def finish():
        try:
            results_q.close()
            results_q.join_thread()
        except Exception:
            pass
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    t = threading.Thread(target=finish, daemon=True)
    t.start()
    t.join(15)
    os._exit(rc)


def _run_ranks(target, world_size: int, timeout_s: float, *args):
    """Run target(rank, world_size, port, result_queue, *args) in world_size spawned processes; each
    puts (rank, ok, message). Returns the results; kills what is still running after timeout_s."""
    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world_size, port, results_q) + args) for r in range(world_size)]
    for p in procs:
        p.start()
    results, deadline = {}, time.time() + timeout_s
    try:
        while len(results) < world_size and time.time() < deadline:
            try:
                rank, ok, msg = results_q.get(timeout=1.0)
                results[rank] = (ok, msg)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results_q.empty():
                    break
    finally:
        for p in procs:
            p.join(max(0.0, min(15.0, deadline - time.time())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    missing = [r for r in range(world_size) if r not in results]
    assert not missing, f"ranks {missing} gave no result within {timeout_s:.0f} s (killed)"
    failed = {r: m for r, (ok, m) in results.items() if not ok}
    assert not failed, "\n".join(f"rank {r}:\n{m}" for r, m in failed.items())
    return {r: m for r, (_, m) in results.items()}


# ---- CPU -------------------------------------------------------------------------------------------
def test_imports_without_flashinfer_or_cuda():
    from nanovllm.distributed import custom_all_reduce as cam
    assert "vllm" in cam.BACKENDS and "trtllm" in cam.BACKENDS
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


@pytest.mark.parametrize("kwargs, reason", [
    (dict(world_size=1, device=torch.device("cpu")), "nothing to reduce"),
    (dict(world_size=1, device=torch.device("cuda", 0)), "nothing to reduce"),
    (dict(world_size=3, device=torch.device("cuda", 0)), "not supported"),
    (dict(world_size=2, device=torch.device("cpu")), "not CUDA"),
    (dict(world_size=2, device=torch.device("cuda", 0), backend="nccl"), "unknown backend"),
])
def test_disabled_without_collectives(kwargs, reason):
    from nanovllm.distributed.custom_all_reduce import CustomAllReduce
    car = CustomAllReduce(None, 0, **kwargs)  # no group: must not reach any collective
    assert car.disabled and reason in car.disabled_reason, car.disabled_reason
    x = torch.zeros(1024, dtype=torch.bfloat16)
    assert not car.should_use(x)
    with pytest.raises(RuntimeError, match="disabled"):
        car.all_reduce(x)
    with car.capture():  # a no-op when disabled
        pass
    car.close()
    car.close()


def test_backend_from_environment(monkeypatch):
    from nanovllm.distributed.custom_all_reduce import CustomAllReduce
    monkeypatch.setenv("NANOVLLM_CUSTOM_AR_BACKEND", "trtllm")
    assert CustomAllReduce(None, 0, 1, torch.device("cpu")).backend == "trtllm"
    assert CustomAllReduce(None, 0, 1, torch.device("cpu"), backend="vllm").backend == "vllm"
    monkeypatch.delenv("NANOVLLM_CUSTOM_AR_BACKEND")
    assert CustomAllReduce(None, 0, 1, torch.device("cpu")).backend == "vllm"


def test_should_use_rules():
    from nanovllm.distributed.custom_all_reduce import CustomAllReduce
    car = CustomAllReduce(None, 0, 1, torch.device("cpu"), max_bytes=64 << 10)
    car.disabled = False  # exercise the rules on CPU tensors (all_reduce itself needs the GPU)
    bf = torch.bfloat16
    assert car.should_use(torch.zeros(1024, dtype=bf))
    assert car.should_use(torch.zeros(8, dtype=torch.float32))              # 32 bytes
    assert car.should_use(torch.zeros(16, 1024, dtype=torch.float16))
    assert car.should_use(torch.zeros(32 << 10, dtype=bf))                  # exactly max_bytes
    assert not car.should_use(torch.zeros((32 << 10) + 8, dtype=bf))        # over max_bytes
    assert not car.should_use(torch.zeros(7, dtype=bf))                     # not a 16-byte multiple
    assert not car.should_use(torch.zeros(0, dtype=bf))
    assert not car.should_use(torch.zeros(64, dtype=torch.int32))
    assert not car.should_use(torch.zeros(64, 8, dtype=bf).t())             # not contiguous
    assert car.should_use(torch.zeros(64, 8, dtype=bf)[:32])                # a contiguous slice is fine
    car.disabled = True
    assert not car.should_use(torch.zeros(1024, dtype=bf))

    trt = CustomAllReduce(None, 0, 1, torch.device("cpu"), max_bytes=64 << 10, backend="trtllm")
    trt.disabled = False
    assert trt.should_use(torch.zeros(4, 1024, dtype=bf))
    assert not trt.should_use(torch.zeros(4, 1024, dtype=torch.float32))   # 16-bit only (lamport -0.0)
    assert not trt.should_use(torch.zeros(16, 4, dtype=bf))                 # 8-byte rows
    assert not trt.should_use(torch.zeros(2, 16384, dtype=bf))              # a row over 1024 vectors
    w, res = torch.ones(1024, dtype=bf), torch.zeros(4, 1024, dtype=bf)
    assert trt.should_use_fused(torch.zeros(4, 1024, dtype=bf), res, w)
    assert not trt.should_use_fused(torch.zeros(4, 1024, dtype=bf), res, w.float())
    assert not car.should_use_fused(torch.zeros(4, 1024, dtype=bf), res, w)  # vllm has no fused op


def _agreement_worker(rank, world_size, port, results_q):
    """Rank 1 is switched off by its environment; rank 0 gets past that and fails loading the ops.
    Every rank must end disabled, with the same reason, inside inference mode (gloo's all_gather)."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        from nanovllm.distributed import custom_all_reduce as cam

        def no_ops(backend):
            raise RuntimeError("no FlashInfer in this test")
        cam._load_ops = no_ops
        cam.CustomAllReduce._static_check = lambda self: ""  # as if on a 2-GPU machine
        if rank == 1:
            os.environ["NANOVLLM_DISABLE_CUSTOM_AR"] = "1"
        with torch.inference_mode():
            car = cam.CustomAllReduce(dist.group.WORLD, rank, world_size, torch.device("cuda", rank))
        assert car.disabled, "enabled?"
        reason = car.disabled_reason
        reasons = [None] * world_size
        dist.all_gather_object(reasons, reason)
        assert len(set(reasons)) == 1, reasons
        assert "rank 1: NANOVLLM_DISABLE_CUSTOM_AR is set" in reason, reason
        car.close()
        results_q.put((rank, True, reason))
    except BaseException:
        results_q.put((rank, False, traceback.format_exc()))
    finally:
        _leave(results_q)


def test_failure_on_one_rank_disables_every_rank():
    reasons = _run_ranks(_agreement_worker, 2, 120)
    assert reasons[0] == reasons[1]


class _FakeRT:
    """Stands in for the CUDA runtime: pointers are numbers, a handle encodes the pointer, and a peer's
    opened mapping is that pointer + 7."""

    def __init__(self):
        self.rank, self.n, self.log = dist.get_rank(), 0, []

    def malloc(self, nbytes):
        self.n += 1
        ptr = (self.rank + 1) * 10_000_000 + self.n * 1000
        self.log.append(("malloc", ptr, nbytes))
        return ptr

    def memset(self, ptr, value, nbytes):
        self.log.append(("memset", ptr, nbytes))

    def ipc_handle(self, ptr):
        return ptr.to_bytes(8, "little") + bytes(56)

    def ipc_open(self, handle):
        ptr = int.from_bytes(handle[:8], "little") + 7
        self.log.append(("open", ptr))
        return ptr

    def ipc_close(self, ptr):
        self.log.append(("close", ptr))

    def free(self, ptr):
        self.log.append(("free", ptr))


class _FakeOps:
    """Stands in for FlashInfer's vllm_comm / trtllm_comm modules, recording the calls."""

    def __init__(self, rank):
        self.rank, self.calls = rank, []

    def meta_size(self):
        return 128

    def init_custom_ar(self, ptrs, rank_data, rank, full_nvlink):
        self.calls.append(("init", list(ptrs), rank_data.numel(), rank, full_nvlink))
        return 4242

    def register_buffer(self, fa, ptrs):
        self.calls.append(("register_buffer", fa, list(ptrs)))

    def all_reduce(self, fa, inp, out, reg, reg_bytes, num_ctas):
        self.calls.append(("all_reduce", fa, reg, reg_bytes, num_ctas))
        out.copy_(inp)

    def get_graph_buffer_ipc_meta(self, fa):
        return [self.rank] * 128, [0, 16]  # two captured buffers

    def register_graph_buffers(self, fa, handles, offsets):
        self.calls.append(("register_graph_buffers", fa, handles, offsets))

    def dispose(self, fa):
        self.calls.append(("dispose", fa))

    def trtllm_lamport_initialize(self, ptr, n, dtype):
        self.calls.append(("lamport_init", ptr, n, dtype))

    def trtllm_allreduce_fusion(self, *args):
        self.calls.append(("fusion", args))
        out = args[11] if args[11] is not None else args[14]
        out.copy_(args[0])


def _fake_cuda_setup(cam, rank, load_ops) -> list:
    """This rank's CUDA runtime, FlashInfer ops and device checks replaced by fakes (a 2-GPU machine on the
    CPU). Returns the flag that says whether a CUDA graph is being captured."""
    import contextlib
    capturing = [False]
    cam._load_ops = load_ops
    cam.CudaRT = _FakeRT
    cam._uuid = lambda device: f"GPU-fake-{rank}"
    cam.CustomAllReduce._static_check = lambda self: ""
    torch.cuda.init = lambda: None
    torch.cuda.device_count = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.device = lambda d: contextlib.nullcontext()
    torch.cuda.is_current_stream_capturing = lambda: capturing[0]
    return capturing


def _choreography_worker(rank, world_size, port, results_q, backend):
    """The real setup / all_reduce / capture / close code on CPU, with fake kernels and runtime."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        from nanovllm.distributed import custom_all_reduce as cam
        ops = _FakeOps(rank)
        capturing = _fake_cuda_setup(cam, rank, lambda backend: ops)
        max_bytes = 1 << 16
        with torch.inference_mode():
            car = cam.CustomAllReduce(dist.group.WORLD, rank, world_size, torch.device("cpu"),
                                      max_bytes=max_bytes, backend=backend)
        assert not car.disabled, car.disabled_reason
        rt, peer = car._rt, 1 - rank
        mallocs = [e for e in rt.log if e[0] == "malloc"]
        peer_base = (peer + 1) * 10_000_000

        def mine(i):
            return mallocs[i][1]

        def theirs(i):  # the peer's i-th allocation, as mapped here
            return peer_base + (i + 1) * 1000 + 7

        def both(i):
            return [mine(i), theirs(i)] if rank == 0 else [theirs(i), mine(i)]

        x = torch.randn(4, 1024).to(torch.bfloat16)
        if backend == "vllm":
            assert [m[2] for m in mallocs] == [128 + max_bytes, max_bytes]
            init = ops.calls[0]
            assert init[0] == "init" and init[1] == both(0) and init[3] == rank and init[4] is True
            assert ops.calls[1] == ("register_buffer", 4242, both(1))
            y = car.all_reduce(x)                                   # eager: copied into our buffer
            assert torch.equal(y, x) and ops.calls[-1] == ("all_reduce", 4242, mine(1), max_bytes, 36)
            with torch.inference_mode(), car.capture():
                car.all_reduce(x)                                   # warm-up inside: still eager
                assert ops.calls[-1][2] == mine(1)
                capturing[0] = True
                car.all_reduce(x)                                   # captured: read in place
                assert ops.calls[-1] == ("all_reduce", 4242, 0, 0, 36)
                capturing[0] = False
            reg = ops.calls[-1]
            assert reg[0] == "register_graph_buffers" and reg[2] == [[0] * 128, [1] * 128]
            assert reg[3] == [[0, 16], [0, 16]]
            capturing[0] = True
            try:
                car.all_reduce(x)
                raise AssertionError("a capture outside capture() must raise")
            except RuntimeError as e:
                assert "capture()" in str(e)
            capturing[0] = False
        else:
            ws = world_size
            assert [m[2] for m in mallocs] == [2 * max_bytes, ws * 256 * 4, 3 * ws * max_bytes]
            assert ops.calls[0] == ("lamport_init", mine(2), 3 * ws * max_bytes // 2, torch.float16)
            assert car._control.tolist() == [0, 0, 0, ws * max_bytes, 0]
            assert car._workspace.tolist() == both(0) + both(1) + both(2) + [car._control.data_ptr()]
            y = car.all_reduce(x)
            args = ops.calls[-1][1]
            assert torch.equal(y, x) and len(args) == 23 and args[0] is x and args[1:5] == (ws, rank, 4, 1024)
            assert args[5] is car._workspace and args[6:11] == (False, True, True, True, 0) and args[11] is y
            res, w = torch.zeros_like(x), torch.ones(1024, dtype=torch.bfloat16)
            assert car.should_use_fused(x, res, w)
            norm, res_out = car.fused_add_rmsnorm(x, res, w, 1e-6)
            args = ops.calls[-1][1]
            assert args[10] == 1 and args[11] is None and args[12] is res and args[13] is res
            assert args[14] is norm and args[17] is w and args[18] == 1e-6 and res_out is res
            with car.capture():  # nothing to register
                pass
        car.close()
        car.close()
        log = rt.log
        assert ("close", theirs(0)) in log and ("free", mine(0)) in log
        assert log.index(("close", theirs(0))) < log.index(("free", mine(0)))
        if backend == "vllm":
            assert ("dispose", 4242) in ops.calls
        assert car.disabled and not car.should_use(x)
        results_q.put((rank, True, ""))
    except BaseException:
        results_q.put((rank, False, traceback.format_exc()))
    finally:
        _leave(results_q)


@pytest.mark.parametrize("backend", ["vllm", "trtllm"])
def test_collective_choreography_with_fake_kernels(backend):
    _run_ranks(_choreography_worker, 2, 120, backend)


def _agreement_of_backends_worker(rank, world_size, port, results_q, backends, nvlink):
    """Ranks that resolve different backends all end without a custom all-reduce (no collective paired
    with another construction's); past 2 GPUs without NVLink between every pair "auto" keeps neither
    kernel (vllm refuses, trtllm is dropped); with it, both."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        from nanovllm.distributed import custom_all_reduce as cam
        ops = _FakeOps(rank)
        _fake_cuda_setup(cam, rank, lambda backend: ops)
        cam._all_pairs_nvlink = lambda uuids: nvlink
        car = cam.make_custom_all_reduce(dist.group.WORLD, rank, world_size, torch.device("cpu"),
                                         backend=backends[rank], max_bytes=1 << 16)
        kind = type(car).__name__
        if car is not None:
            car.close()
        results_q.put((rank, True, kind))
    except BaseException:
        results_q.put((rank, False, traceback.format_exc()))
    finally:
        _leave(results_q)


@pytest.mark.parametrize("backends, nvlink, expected", [
    (["auto", "vllm"], True, "NoneType"),
    (["vllm", "trtllm"], True, "NoneType"),
    (["auto"] * 4, False, "NoneType"),
    (["auto"] * 4, True, "TieredAllReduce"),
])
def test_ranks_agree_on_the_backend(backends, nvlink, expected):
    kinds = _run_ranks(_agreement_of_backends_worker, len(backends), 120, backends, nvlink)
    assert sorted(kinds) == list(range(len(backends))) and set(kinds.values()) == {expected}, kinds


def _tiered_worker(rank, world_size, port, results_q, trtllm_builds):
    """backend "auto" on CPU with fake kernels: small 16-bit [rows, hidden] messages go to trtllm (fused norm
    included), larger or float32 ones to vllm, larger still to NCCL; capture registers vllm's graph buffers;
    close releases both. Without trtllm (its build failing on every rank) vllm alone is kept."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        from nanovllm.distributed import custom_all_reduce as cam
        ops = _FakeOps(rank)

        def load_ops(backend):
            if backend == "trtllm" and not trtllm_builds:
                raise RuntimeError("trtllm_comm did not build")
            return ops
        capturing = _fake_cuda_setup(cam, rank, load_ops)
        cam.TRTLLM_AUTO_MAX_BYTES = 1 << 14
        with torch.inference_mode():
            car = cam.make_custom_all_reduce(dist.group.WORLD, rank, world_size, torch.device("cpu"),
                                             backend="auto", max_bytes=1 << 16)
        bf = torch.bfloat16
        small, mid, big = torch.ones(4, 1024, dtype=bf), torch.ones(16, 1024, dtype=bf), torch.ones(64, 1024, dtype=bf)
        res, w = torch.zeros(4, 1024, dtype=bf), torch.ones(1024, dtype=bf)
        if not trtllm_builds:
            assert isinstance(car, cam.CustomAllReduce) and car.backend == "vllm", car
            assert car.should_use(small) and not car.should_use_fused(small, res, w)
        else:
            assert isinstance(car, cam.TieredAllReduce) and [t.backend for t in car.tiers] == ["trtllm", "vllm"]
            assert not car.disabled and car.tiers[0].max_bytes == 1 << 14
            assert car.should_use(small) and car.should_use(mid) and not car.should_use(big)  # big: NCCL
            car.all_reduce(small)
            assert ops.calls[-1][0] == "fusion"                                 # 8 KB: trtllm
            car.all_reduce(mid)
            assert ops.calls[-1][0] == "all_reduce"                             # 32 KB: vllm
            car.all_reduce(torch.ones(4, 1024))
            assert ops.calls[-1][0] == "all_reduce"                             # float32: vllm
            assert car.should_use_fused(small, res, w)
            assert not car.should_use_fused(mid, torch.zeros_like(mid), w)      # vllm's size: no fused kernel
            car.fused_add_rmsnorm(small, res, w, 1e-6)
            assert ops.calls[-1][0] == "fusion" and ops.calls[-1][1][10] == 1 and car.fused_calls == 1
            with torch.inference_mode(), car.capture():
                capturing[0] = True
                car.all_reduce(mid)
                capturing[0] = False
            assert ops.calls[-1][0] == "register_graph_buffers"
            car.close()
            assert car.disabled and not car.should_use(small)
            assert ("dispose", 4242) in ops.calls
        results_q.put((rank, True, ""))
    except BaseException:
        results_q.put((rank, False, traceback.format_exc()))
    finally:
        _leave(results_q)


@pytest.mark.parametrize("trtllm_builds", [True, False])
def test_auto_sends_each_size_to_its_kernel(trtllm_builds):
    _run_ranks(_tiered_worker, 2, 120, trtllm_builds)


def test_make_refuses_unknown_backend():
    from nanovllm.distributed.custom_all_reduce import make_custom_all_reduce
    with pytest.raises(ValueError, match="NANOVLLM_CUSTOM_AR_BACKEND='nccl'"):
        make_custom_all_reduce(None, 0, 2, torch.device("cpu"), backend="nccl")


# ---- GPU -------------------------------------------------------------------------------------------
def _gpu_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2 \
        and importlib.util.find_spec("flashinfer") is not None


gpu = [pytest.mark.gpu,
       pytest.mark.skipif(not _gpu_ready(), reason="needs 2 CUDA GPUs and flashinfer")]


def join_gpu_group(rank: int, world_size: int, port: int, timeout_s: float = 600):
    """In a spawned test process: this rank's GPU, the NCCL group over 127.0.0.1:port and a gloo group beside it."""
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), device_id=dev)
    return dev, dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def _gpu_worker(rank, world_size, port, results_q, backend):
    car, notes = None, []
    try:
        dev, cpu_group = join_gpu_group(rank, world_size, port)
        from nanovllm.distributed.custom_all_reduce import CustomAllReduce
        t = time.time()
        car = CustomAllReduce(cpu_group, rank, world_size, dev, max_bytes=4 << 20, backend=backend)
        notes.append(f"constructed in {time.time() - t:.1f} s (JIT included)")
        assert not car.disabled, car.disabled_reason
        gen = torch.Generator(device=dev).manual_seed(1234 + rank)

        def rand(shape, dtype):
            return torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

        def nccl_sum(x):
            y = x.clone()
            dist.all_reduce(y)
            return y

        def same(a, b, what):
            tol = 1e-5 if a.dtype == torch.float32 else 2e-2
            torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")
            if not torch.equal(a, b):
                notes.append(f"{what}: close, not bitwise equal")

        if backend == "vllm":
            dtypes = (torch.bfloat16, torch.float16, torch.float32)
            shapes = [(8,), (1024,), (3, 1024), (7 * 4096,), (1 << 20,)]
        else:
            dtypes = (torch.bfloat16, torch.float16)
            shapes = [(1, 1024), (3, 1024), (64, 4096), (128, 2048), (512, 1024)]
        # Eager, against NCCL.
        for dtype in dtypes:
            for shape in shapes:
                x = rand(shape, dtype)
                if not car.should_use(x):
                    continue
                same(car.all_reduce(x), nccl_sum(x), f"eager {tuple(shape)} {dtype}")
        big = rand((4 << 20) // 2 + 1024, torch.bfloat16)
        assert not car.should_use(big)  # over max_bytes: NCCL's

        # CUDA graphs: inputs made inside the graph (graph-pool addresses) and static ones; two graphs.
        dtype = torch.bfloat16
        shape_a, shape_b = ((16, 1024), (2, 1024)) if backend == "trtllm" else ((4096,), (3, 1024))
        xa, xb = rand(shape_a, dtype), rand(shape_b, dtype)
        with car.capture():
            car.all_reduce(xa)  # eager warm-up inside the capture phase
            g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(g1):
                tmp = xa * 2
                outs1 = [car.all_reduce(tmp), car.all_reduce(xb)]
            with torch.cuda.graph(g2):
                outs2 = [car.all_reduce(xb + 1) for _ in range(3)]
        for trial in range(3):
            xa.copy_(rand(shape_a, dtype))
            xb.copy_(rand(shape_b, dtype))
            g1.replay()
            g2.replay()
            same(outs1[0], nccl_sum(xa * 2), f"graph 1 op 0, trial {trial}")
            same(outs1[1], nccl_sum(xb), f"graph 1 op 1, trial {trial}")
            for i, o in enumerate(outs2):
                same(o, nccl_sum(xb + 1), f"graph 2 op {i}, trial {trial}")
        # Eager still works after registration.
        x = rand(shape_a, dtype)
        same(car.all_reduce(x), nccl_sum(x), "eager after capture")

        if backend == "trtllm":
            import flashinfer
            for tokens, hidden in ((1, 1024), (8, 1024), (64, 4096), (256, 4096)):
                x = rand((tokens, hidden), dtype)
                torch.manual_seed(99)  # residual and weight: the same on every rank
                res = torch.randn(tokens, hidden, device=dev).to(dtype)
                w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype)
                assert car.should_use_fused(x, res, w)
                ref_x, ref_res = nccl_sum(x), res.clone()
                flashinfer.fused_add_rmsnorm(ref_x, ref_res, w, 1e-6)
                r = res.clone()
                norm, r_out = car.fused_add_rmsnorm(x, r, w, 1e-6)
                assert r_out.data_ptr() == r.data_ptr()
                same(r_out, ref_res, f"fused residual {tokens}x{hidden}")
                same(norm, ref_x, f"fused norm {tokens}x{hidden}")
                # and in a graph
                r = res.clone()
                g = torch.cuda.CUDAGraph()
                with car.capture(), torch.cuda.graph(g):
                    norm_g, _ = car.fused_add_rmsnorm(x, r, w, 1e-6)
                r.copy_(res)
                g.replay()
                same(r, ref_res, f"graph fused residual {tokens}x{hidden}")
                same(norm_g, ref_x, f"graph fused norm {tokens}x{hidden}")
        torch.cuda.synchronize()
        results_q.put((rank, True, "; ".join(notes)))
    except BaseException:
        results_q.put((rank, False, traceback.format_exc() + "\n" + "; ".join(notes)))
    finally:
        try:
            if car is not None:
                car.close()
        except BaseException:
            pass
        _leave(results_q)


@pytest.mark.parametrize("backend", ["vllm", "trtllm"])
@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs 2 CUDA GPUs and flashinfer")
def test_custom_all_reduce_matches_nccl(backend):
    # The first run JIT-compiles FlashInfer's comm module: trtllm_comm can take several minutes.
    notes = _run_ranks(_gpu_worker, 2, 900 if backend == "trtllm" else 420, backend)
    print(backend, notes)
