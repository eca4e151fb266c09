"""One-shot all-reduce over CUDA IPC for the small messages of tensor-parallel decode (FlashInfer's kernels).

Why: on 2 x H200 with NCCL 2.28 a 16 KB all-reduce took ~22 us eagerly, and 56 of them in one CUDA
graph (two per layer of Qwen3-0.6B) took 1.08 ms: more than half of a decode step (issue #10 part 3).
For a message this small the time goes on NCCL's protocol, not on moving bytes over NVLink. A kernel that reads
or writes the peers' buffers directly, through CUDA IPC mappings, needs one launch and one or two flag
handshakes.

What runs. Two FlashInfer 0.7.2.post1 kernels can do this without NVLink multicast. `backend` picks one:

* "vllm" (the default): flashinfer.comm.vllm_ar (vLLM's custom all-reduce). Each rank has a
  registered IPC buffer. On two GPUs the kernel is always `cross_device_reduce_1stage`: a flag barrier,
  then every rank reads all the peers' inputs over NVLink, sums in fp32 and writes its own output, and a
  closing barrier. On 4/6/8 GPUs with NVLink between every pair, the two-stage kernel (reduce-scatter
  then all-gather) takes over from 512 KB (4 GPUs) or 256 KB (6 or 8 GPUs). Calls:
    meta_size(); init_custom_ar(signal_ptrs, rank_data, rank, full_nvlink) -> fa;
    register_buffer(fa, buffer_ptrs); all_reduce(fa, inp, out, reg_buffer, reg_buffer_bytes, num_ctas);
    get_graph_buffer_ipc_meta(fa) -> (handle_bytes, offsets); register_graph_buffers(fa, handles, offsets);
    dispose(fa).
  Eagerly, all_reduce copies the input into the registered buffer first (`reg_buffer` set). While a
  CUDA graph is captured, it is called with reg_buffer=0: the kernel then reads the input where it lies
  (a graph-pool address), records that address, and launches with a slot of `rank_data` that is still
  empty. After the capture every rank exports IPC handles for those addresses
  (get_graph_buffer_ipc_meta), they are exchanged over the gloo group, and register_graph_buffers
  fills in the slots. That is what `capture()` does on exit. Every rank must capture the same
  all-reduces in the same order.
* "trtllm": flashinfer.comm trtllm_allreduce_fusion (TensorRT-LLM's all-reduce fusion kernel),
  pattern kAllReduce, and with `fused_add_rmsnorm` the pattern kARResidualRMSNorm: all-reduce,
  + residual, then RMSNorm, all in one kernel. One-shot it is a "Lamport" kernel: each rank pushes its
  input into every peer's buffer, and then polls its own buffer until no element still holds the
  -0.0 sentinel. So it has no barrier and no registered input, and nothing to register after a graph
  capture. The workspace layout is what the kernel reads (trtllm_allreduce_fusion.cuh, SyncComm and
  LamportComm): [comm buffer x ws | barrier flags x ws | 3-slot lamport buffer x ws | control flags].
  This module allocates it itself with cudaMalloc and legacy CUDA IPC. FlashInfer's workspace creators
  use torch symmetric memory, or SymmDeviceMemory from comm/mnnvl.py, and neither is used here.
  Only bf16 and fp16.

Never used: NVLS, multimem or multicast, symmetric memory, and the MNNVL/mixed_comm/nvshmem
paths. The one kind of memory here is cudaMalloc shared through
cudaIpcGetMemHandle / cudaIpcOpenMemHandle, whose handles travel over the gloo group. This module, like
every process of ours, sets NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1.

The two kernels compared (measured below): vLLM's one-stage kernel takes any contiguous bf16/fp16/fp32
tensor of 16-byte multiple size and keeps no state between calls. The Lamport kernel has the lower latency
for small messages (one NVLink write and a local poll, against a barrier, remote reads and a second
barrier) and fuses the residual-add + RMSNorm that follows every all-reduce in the model, but it needs a
[tokens, hidden] shape and 16-bit dtypes, carries a rotating 3-slot state, and is slower from ~4-8 MB.
FlashInfer's tracker has hang reports for this kernel family: flashinfer#3408 (this kernel, with PP > 1)
and flashinfer#3053 (its MNNVL sibling, in piecewise CUDA graphs); neither setting is used here.

The default, "auto" (make_custom_all_reduce -> TieredAllReduce): each message goes to the kernel measured
fastest at its size, trtllm (fused with the norm where the model asks for it) up to TRTLLM_AUTO_MAX_BYTES =
4 MB, vllm up to 8 MB, NCCL above. Where one kernel does not set up (trtllm's JIT module failing to build,
a world size it lacks) the other serves alone; past 2 GPUs both need NVLink between every pair (neither
was measured over PCIe). Ranks that resolve different backends (each host reads its own environment) all
fall back to NCCL. trtllm_comm's JIT build takes ~4-5 minutes on first use (249 s on a 16-core host;
cached afterwards).

Switches (must be the same on every rank): NANOVLLM_DISABLE_CUSTOM_AR=1 turns it off,
NANOVLLM_CUSTOM_AR_BACKEND=vllm|trtllm uses one kernel for every size it takes. The vllm
backend refuses PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, because legacy IPC can't export the
graph pool's cuMem memory.

Measurements (scripts/bench_allreduce.py; per-op microseconds, median over runs, max over ranks)
---------------------------------------------------------------------------------------
Measured on 2 x H200 (NVLink, NCCL 2.28, FlashInfer 0.7.2.post1), bf16, 2026-11-26, run 1 of
`python scripts/bench_allreduce.py` (the TRT-LLM kernel's JIT build did not finish inside the run's
budget, so its columns are empty; its correctness test passed, tests/test_custom_all_reduce.py):

| size   | nccl eager | nccl graph | vllm eager | vllm graph |
|--------|-----------:|-----------:|-----------:|-----------:|
| 16 KB  |       43.8 |       15.4 |       13.7 |        4.4 |
| 64 KB  |       45.9 |       15.5 |       11.9 |        4.4 |
| 256 KB |       39.3 |       17.6 |       18.2 |        5.2 |
| 1 MB   |       40.2 |       28.1 |       17.9 |        8.7 |
| 4 MB   |       43.7 |       49.9 |       26.3 |       20.6 |
| 8 MB   |       50.7 |       64.7 |       42.6 |       35.4 |
| 16 MB  |       77.3 |       92.2 |          - |          - |
| 64 MB  |      249.5 |      262.2 |          - |          - |

In a CUDA graph the vLLM kernel is 2-3.5x faster than NCCL up to 8 MB (a decode step's messages:
rows x hidden x 2 bytes), so it serves every message up to max_bytes = 8 MB and NCCL the larger
(prefill) ones. End to end (Qwen3-8B shapes, TP=2, W1): 13,787 tok/s with it, 13,319 NCCL-only.

Session 11, 2 x H200, the trtllm columns (built on a one-GPU machine first: ~300 s), 56 ops in a graph:
trtllm 2.9 / 3.0 / 3.7 / 6.7 / 21.5 / 49.9 us at 16 KB / 64 KB / 256 KB / 1 MB / 4 MB / 8 MB against
vllm's 4.4 / 4.5 / 5.3 / 8.7 / 20.3 / 35.7; fused with residual + RMSNorm 3.4-11.7 us (hidden 1,024-4,096,
1-256 tokens) against 7.8-31.1 for NCCL + flashinfer.fused_add_rmsnorm. The models take each row-parallel
sum in the norm after it (layers/layernorm.py), so with backend "trtllm" every layer's two sums are fused
kernels: Qwen3-8B W1 TP=2 14,952 / 14,920 tok/s against 14,654 with "vllm" (+2.0%, same machine):
claude_docs/performance.md, "Session 11".

Session 14, 2 x H200, "auto" made the default: tests/test_gpu_tp.py passed with it (TP=2 vs TP=1 and cascade
on, divergences only at near-ties); Qwen3-8B W1 TP=2 14,925 tok/s against TP=1's 9,400 in the same call
(1.59x); "vllm" alone 14,880 in another call, whose TP=1 ran 9,638 (1.54x). W2 at 1,024 rows (8 MB messages,
vllm's under auto) was not re-run.
"""
from __future__ import annotations

import contextlib
import logging
import os

from nanovllm.distributed.parallel_state import NO_MULTICAST_ENV  # noqa: E402

# NVLink multicast can take the host's GPUs out of service: never on (see the module docstring).
for _key, _value in NO_MULTICAST_ENV.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from nanovllm.distributed.cuda_ipc import (CudaRT, Unavailable, agree, allgather, describe,  # noqa: E402
                                           release_shared, share_buffers)

logger = logging.getLogger("nanovllm.distributed")

BACKENDS = ("vllm", "trtllm")
CHOICES = ("auto",) + BACKENDS   # NANOVLLM_CUSTOM_AR_BACKEND: auto = each message to the faster kernel at its size
# "auto": messages up to this many bytes take trtllm (its fused all-reduce + residual + RMSNorm), larger ones
# vllm up to 8 MB, then NCCL. 56 ops in a graph on 2 x H200 (session 11): trtllm 2.9-6.7 us up to 1 MB against
# vllm's 4.4-8.7, 21.5 vs 20.3 at 4 MB (where the fused norm still saves a launch), 49.9 vs 35.7 at 8 MB.
TRTLLM_AUTO_MAX_BYTES = 4 << 20


def default_backend() -> str:
    """The backend make_custom_all_reduce builds when the caller passes none: $NANOVLLM_CUSTOM_AR_BACKEND,
    else "auto" (CustomAllReduce itself, which is one kernel, takes "vllm" for "auto")."""
    return os.environ.get("NANOVLLM_CUSTOM_AR_BACKEND", "") or "auto"
VLLM_WORLD_SIZES = (2, 4, 6, 8)          # vllm_custom_all_reduce.cuh: REDUCE_CASE(2/4/6/8)
TRTLLM_WORLD_SIZES = (2, 4, 8, 16)       # trtllm_allreduce_fusion.cuh: allreduce_fusion_op
VLLM_MAX_CTAS = 36                       # vllm::kMaxBlocks
RANK_DATA_BYTES = 8 << 20                # room for 131072 registered (graph) buffers of 64 B each
TRTLLM_BARRIER_FLAGS = 256               # details::kBarrierFlagCount
TRTLLM_PATTERN_ALLREDUCE = 0             # AllReduceFusionPattern.kAllReduce
TRTLLM_PATTERN_RESIDUAL_RMSNORM = 1      # AllReduceFusionPattern.kARResidualRMSNorm


def check_backend(backend: str) -> str:
    """backend, if it is one of CHOICES (NANOVLLM_CUSTOM_AR_BACKEND's values); else ValueError."""
    if backend not in CHOICES:
        raise ValueError(f"NANOVLLM_CUSTOM_AR_BACKEND={backend!r} must be one of {CHOICES}")
    return backend


# ---- FlashInfer's ops: the public flashinfer.comm wrappers, or the same JIT module directly --------
def _load_ops(backend: str):
    """FlashInfer's ops for `backend`: flashinfer.comm's own (vllm_ar.get_vllm_comm_module() or
    trtllm_ar.get_trtllm_comm_module()), which build the JIT module on first use. flashinfer.comm
    imports pynvml, cuda-python and many other modules the kernels don't need: where that import fails,
    the same JIT module (same name, same cache) is loaded directly. Its functions take the same
    arguments, because the flashinfer.comm wrappers only pass them through."""
    try:
        if backend == "vllm":
            from flashinfer.comm import vllm_ar as mod
        else:
            from flashinfer.comm import trtllm_ar as mod
    except Exception as e:
        logger.info("flashinfer.comm not importable (%s); loading the %s JIT module directly", e, backend)
        mod = None
    if mod is not None:
        return mod.get_vllm_comm_module() if backend == "vllm" else mod.get_trtllm_comm_module()
    from flashinfer.jit import comm as jit_comm
    spec = jit_comm.gen_vllm_comm_module() if backend == "vllm" else jit_comm.gen_trtllm_comm_module()
    return spec.build_and_load()


def _uuid(device: torch.device) -> str:
    u = str(torch.cuda.get_device_properties(device).uuid)
    return u if u.startswith("GPU-") else "GPU-" + u


def _all_pairs_nvlink(uuids: list[str]) -> bool:
    """True when NVML reports NVLink P2P between every pair of these GPUs (False if it can't tell)."""
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
        try:
            handles = [pynvml.nvmlDeviceGetHandleByUUID(u) for u in uuids]
            for i, a in enumerate(handles):
                for b in handles[i + 1:]:
                    if pynvml.nvmlDeviceGetP2PStatus(a, b, pynvml.NVML_P2P_CAPS_INDEX_NVLINK) \
                            != pynvml.NVML_P2P_STATUS_OK:
                        return False
            return True
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml.NVMLError and friends
        return False


class CustomAllReduce:
    """Sum over the ranks of a tensor-parallel group, out of place, for small CUDA tensors.

    CustomAllReduce(cpu_group, rank, world_size, device, max_bytes=8 << 20, backend=None)

    backend None: $NANOVLLM_CUSTOM_AR_BACKEND, else "vllm". num_ctas (vllm, <= 36) and
    launch_with_pdl (trtllm: programmatic dependent launch) are knobs for the benchmark.

    Construction is collective over `cpu_group` (gloo, the same ranks): every rank must construct it
    with the same arguments. It never raises for an unusable setup. It sets `disabled = True` and
    `disabled_reason`, the same on every rank, and the caller then uses NCCL. The reasons: world size 1
    or unsupported, a device that is not CUDA, FlashInfer missing or failing to build, no P2P, IPC
    failing, NANOVLLM_DISABLE_CUSTOM_AR=1. `close()` is collective too.

    Use: `if car.should_use(x): y = car.all_reduce(x)`. Wrap the capture of all CUDA graphs in
    `with car.capture(): ...`, which registers the graphs' buffers on exit.
    """

    def __init__(self, cpu_group, rank: int, world_size: int, device: torch.device,
                 max_bytes: int = 8 << 20, backend: str | None = None, num_ctas: int = VLLM_MAX_CTAS,
                 launch_with_pdl: bool = False):
        if backend is None:  # NANOVLLM_CUSTOM_AR_BACKEND=trtllm tries the other kernel without code changes
            backend = default_backend()
            backend = "vllm" if backend == "auto" else backend
        self.cpu_group = cpu_group
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.max_bytes = (int(max_bytes) + 15) // 16 * 16
        self.backend = backend
        self.num_ctas = int(num_ctas)
        self.launch_with_pdl = bool(launch_with_pdl)
        self.disabled = True
        self.disabled_reason = "not initialised"
        self.full_nvlink = False
        self._capturing = False
        self._ready = False                  # setup completed on every rank: close() has work to do
        self._closed = False
        self.fused_calls = 0   # fused_add_rmsnorm calls from Python (eager, and once each while captured)
        self._ops = None
        self._rt = None
        self._shared: list[list[int]] = []   # per shared buffer: one pointer per rank (ours at [rank])
        self._fa = None                      # vllm: the CustomAllreduce object (an int handle)
        self._buffer_ptr = 0                 # vllm: our registered input buffer
        self._rank_data = None               # vllm: device scratch for the registered pointers
        self._workspace = None               # trtllm: int64 device tensor of pointers
        self._control = None                 # trtllm: the 5 control ints
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev

        # Checks every rank answers alike from its arguments: no collective needed.
        reason = self._static_check()
        if reason:
            self._disable(reason)
            return
        try:
            self._setup()
        except Unavailable as e:
            self._disable(str(e))
            return
        self._ready = True
        self.disabled = False
        self.disabled_reason = ""
        logger.info("custom all-reduce on: backend=%s rank=%d/%d max_bytes=%d full_nvlink=%s",
                    self.backend, self.rank, self.world_size, self.max_bytes, self.full_nvlink)

    # ---- setup ------------------------------------------------------------------------------------
    def _static_check(self) -> str:
        if self.backend not in BACKENDS:
            return f"unknown backend {self.backend!r} (one of {BACKENDS})"
        if self.world_size < 2:
            return f"world_size {self.world_size}: nothing to reduce"
        sizes = VLLM_WORLD_SIZES if self.backend == "vllm" else TRTLLM_WORLD_SIZES
        if self.world_size not in sizes:
            return f"world_size {self.world_size} not supported by the {self.backend} kernel {sizes}"
        if self.device.type != "cuda":
            return f"device {self.device} is not CUDA"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if not 0 <= self.rank < self.world_size:
            return f"rank {self.rank} outside world_size {self.world_size}"
        if self.cpu_group is None:
            return "no cpu (gloo) group to exchange IPC handles over"
        if not 1 <= self.num_ctas <= VLLM_MAX_CTAS:
            return f"num_ctas {self.num_ctas} outside 1..{VLLM_MAX_CTAS}"
        if self.backend == "trtllm" and 3 * self.world_size * self.max_bytes >= 1 << 31:
            # LamportComm computes `clear_offset * comm_size` (up to 2 slots of ws * max_bytes) in int32.
            return "trtllm: 3 * world_size * max_bytes must stay below 2 GiB (int32 lamport offsets)"
        return ""

    def _allgather(self, obj) -> list:
        return allgather(self.cpu_group, self.world_size, obj)

    def _agree(self, error: str | None, payload=None) -> list:
        return agree(self.cpu_group, self.world_size, error, payload)

    _describe = staticmethod(describe)

    def _setup(self):
        # 1. Environment: the switch, the group, FlashInfer (JIT build on first use), libcudart, GPU id.
        error, uuid = None, None
        try:
            if os.environ.get("NANOVLLM_DISABLE_CUSTOM_AR", "0") not in ("", "0"):
                raise Unavailable("NANOVLLM_DISABLE_CUSTOM_AR is set")
            if dist.get_rank(self.cpu_group) != self.rank:
                raise Unavailable(f"rank {self.rank} is rank {dist.get_rank(self.cpu_group)} of cpu_group")
            if dist.get_world_size(self.cpu_group) != self.world_size:
                raise Unavailable(f"cpu_group has {dist.get_world_size(self.cpu_group)} ranks")
            if self.backend == "vllm" and "expandable_segments:true" in \
                    os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
                # Graph buffers are exported with cudaIpcGetMemHandle, which cuMem (expandable) memory refuses.
                raise Unavailable("PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True (no legacy IPC of graph buffers)")
            torch.cuda.init()
            self._ops = _load_ops(self.backend)
            self._rt = CudaRT()
            uuid = _uuid(self.device)
        except Exception as e:
            error = self._describe(e)
        infos = self._agree(error, (uuid, self.backend, self.max_bytes))
        if len({(b, m) for _, b, m in infos}) != 1:  # e.g. NANOVLLM_CUSTOM_AR_BACKEND set on one rank only
            raise Unavailable(f"ranks disagree on (backend, max_bytes): {[(b, m) for _, b, m in infos]}")
        uuids = [u for u, _, _ in infos]

        # 2. P2P between this GPU and every peer it can see (a peer hidden by CUDA_VISIBLE_DEVICES
        #    is left to cudaIpcOpenMemHandle), and NVLink between all pairs where the kernel needs it.
        error = None
        try:
            local = {_uuid(torch.device("cuda", i)): i for i in range(torch.cuda.device_count())}
            for r, u in enumerate(uuids):
                if r != self.rank and u in local and local[u] != self.device.index:
                    if not torch.cuda.can_device_access_peer(self.device.index, local[u]):
                        raise Unavailable(f"no P2P access from {self.device} to rank {r}'s GPU")
            self.full_nvlink = self.world_size == 2 or _all_pairs_nvlink(uuids)
            if self.backend == "vllm" and not self.full_nvlink:
                # vllm_custom_all_reduce.cuh launches nothing for >2 GPUs without full NVLink.
                raise Unavailable("more than 2 GPUs without NVLink between every pair (or NVML can't tell)")
        except Exception as e:
            error = self._describe(e)
        self._agree(error)

        # 3. Buffers, shared over IPC; then the kernel's state. Each step ends in a collective
        #    agreement, so a failure anywhere raises Unavailable on every rank, and all tear down.
        try:
            with torch.cuda.device(self.device):
                if self.backend == "vllm":
                    self._setup_vllm()
                else:
                    self._setup_trtllm()
                error = None
                try:
                    torch.cuda.synchronize(self.device)
                except Exception as e:
                    error = self._describe(e)
            self._agree(error)  # no rank launches a kernel before every rank's buffers are ready
        except Unavailable:
            self._release(barrier=False)
            raise

    def _share(self, sizes: list[int]) -> list[list[int]]:
        return share_buffers(self._rt, self.cpu_group, self.rank, self.world_size, sizes, self._shared)

    def _setup_vllm(self):
        error = None
        try:
            meta = int(self._ops.meta_size())
        except Exception as e:
            meta, error = 0, self._describe(e)
        self._agree(error)
        # Signal (flags) + room for the two-stage kernel's intermediate results; the input buffer.
        signals, buffers = self._share([meta + self.max_bytes, self.max_bytes])
        error = None
        try:
            self._rank_data = torch.empty(RANK_DATA_BYTES, dtype=torch.uint8, device=self.device)
            self._fa = self._ops.init_custom_ar(signals, self._rank_data, self.rank, self.full_nvlink)
            self._ops.register_buffer(self._fa, buffers)
            self._buffer_ptr = buffers[self.rank]
        except Exception as e:
            error = self._describe(e)
        self._agree(error)

    def _setup_trtllm(self):
        ws = self.world_size
        comm_bytes = 2 * self.max_bytes                 # two-shot: inputs, then partial sums after them
        flag_bytes = ws * TRTLLM_BARRIER_FLAGS * 4      # one int per (block slot, peer)
        lamport_slot = ws * self.max_bytes              # one-shot: every rank's input, side by side
        comm, flags, lamport = self._share([comm_bytes, flag_bytes, 3 * lamport_slot])
        error = None
        try:
            # Lamport buffers start as -0.0 everywhere (0x8000 for fp16 and bf16 alike).
            self._ops.trtllm_lamport_initialize(lamport[self.rank], 3 * lamport_slot // 2, torch.float16)
            # [block counter, two-shot flag, lamport flag, lamport slot bytes, elements to clear]
            self._control = torch.tensor([0, 0, 0, lamport_slot, 0], dtype=torch.int32, device=self.device)
            self._workspace = torch.tensor(comm + flags + lamport + [self._control.data_ptr()],
                                           dtype=torch.int64, device=self.device)
        except Exception as e:
            error = self._describe(e)
        self._agree(error)

    def _disable(self, reason: str):
        self.disabled = True
        self.disabled_reason = reason
        if self.world_size > 1 and self.rank == 0:
            logger.warning("custom all-reduce off (%s): NCCL for every all-reduce", reason)

    # ---- use --------------------------------------------------------------------------------------
    def should_use(self, x: torch.Tensor) -> bool:
        """Whether all_reduce(x) is valid and meant for x (else use NCCL)."""
        if self.disabled:
            return False
        if x.device != self.device or not x.is_contiguous():
            return False
        nbytes = x.numel() * x.element_size()
        if nbytes == 0 or nbytes > self.max_bytes or nbytes % 16:
            return False
        if self.backend == "vllm":
            return x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        if x.dtype not in (torch.bfloat16, torch.float16):
            return False
        return self._trtllm_shape_ok(x)

    @staticmethod
    def _trtllm_shape_ok(x: torch.Tensor) -> bool:
        # Rows of x.shape[-1]: 16-byte vectors, one row's vectors within one thread block of <= 1024
        # threads (the kernel may split a row over a cluster, but never needs to below this bound).
        if x.dim() == 0:
            return False
        row_bytes = x.shape[-1] * x.element_size()
        return row_bytes % 16 == 0 and row_bytes // 16 <= 1024

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in a new tensor. Eager, or inside capture() during graph capture."""
        if self.disabled:
            raise RuntimeError(f"custom all-reduce is disabled: {self.disabled_reason}")
        out = torch.empty_like(x)
        if self.backend == "trtllm":
            self._trtllm(x, TRTLLM_PATTERN_ALLREDUCE, allreduce_out=out)
            return out
        if torch.cuda.is_current_stream_capturing():
            if not self._capturing:
                raise RuntimeError("custom all-reduce captured in a CUDA graph outside CustomAllReduce.capture(): "
                                   "its buffers would never be registered")
            # Read x in place: its graph-pool address is registered with the peers when capture() ends.
            self._ops.all_reduce(self._fa, x, out, 0, 0, self.num_ctas)
        else:
            # Copy x into the registered buffer first (the FFI op does the copy on the stream).
            self._ops.all_reduce(self._fa, x, out, self._buffer_ptr, self.max_bytes, self.num_ctas)
        return out

    def should_use_fused(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether fused_add_rmsnorm(x, residual, weight, eps) is available for these tensors."""
        return (self.backend == "trtllm" and self.should_use(x) and x.dim() >= 1
                and residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()
                and residual.device == x.device and weight.shape == (x.shape[-1],)
                and weight.dtype == x.dtype and weight.is_contiguous() and weight.device == x.device)

    def fused_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """trtllm only: s = all_reduce(x); residual += s (in place); returns (rmsnorm(residual) * weight,
        residual), the same as NCCL all-reduce followed by flashinfer.fused_add_rmsnorm."""
        if self.disabled or self.backend != "trtllm":
            raise RuntimeError("fused_add_rmsnorm needs an enabled backend='trtllm' CustomAllReduce")
        self.fused_calls += 1
        norm_out = torch.empty_like(x)
        # Each element of residual is read and then written by the same thread: in place is safe.
        self._trtllm(x, TRTLLM_PATTERN_RESIDUAL_RMSNORM, residual_in=residual, residual_out=residual,
                     norm_out=norm_out, rms_gamma=weight, rms_eps=float(eps))
        return norm_out, residual

    def _trtllm(self, x, pattern, allreduce_out=None, residual_in=None, residual_out=None,
                norm_out=None, rms_gamma=None, rms_eps=None):
        hidden = x.shape[-1]
        tokens = x.numel() // hidden
        # One-shot (Lamport) whenever it fits, which the workspace sizing guarantees up to max_bytes.
        # Two-shot needs more tokens than ranks; it is never chosen by default.
        oneshot = True
        # Arguments in the order of trtllm_allreduce_fusion (csrc/trtllm_allreduce_fusion.cu).
        self._ops.trtllm_allreduce_fusion(
            x, self.world_size, self.rank, tokens, hidden, self._workspace,
            self.launch_with_pdl, oneshot, True, True, pattern,       # pdl, oneshot, trigger at end, fp32 acc
            allreduce_out, residual_in, residual_out, norm_out,
            None, None, rms_gamma, rms_eps, None, None, None, None)   # quant_out, scale_out, ..., weight_bias

    @contextlib.contextmanager
    def capture(self):
        """Wrap the capture of every CUDA graph that calls all_reduce. On exit (collective over
        cpu_group) the addresses the captured all-reduces read are exchanged and registered: every
        rank must have captured the same all-reduces in the same order. Eager calls inside run
        normally (warm-up passes)."""
        if self.disabled or self.backend != "vllm":
            yield
            return
        if self._capturing:
            raise RuntimeError("CustomAllReduce.capture() is not reentrant")
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False
        self._register_graph_buffers()

    def _register_graph_buffers(self):
        handle_bytes, offsets = self._ops.get_graph_buffer_ipc_meta(self._fa)
        mine = ([int(b) for b in handle_bytes], [int(o) for o in offsets])
        everyone = self._allgather(mine)
        counts = [len(o) for _, o in everyone]
        if len(set(counts)) != 1:
            raise RuntimeError(f"ranks captured different numbers of custom all-reduces: {counts}")
        if counts[0]:
            self._ops.register_graph_buffers(self._fa, [h for h, _ in everyone], [o for _, o in everyone])
        logger.info("custom all-reduce: registered %d graph buffers", counts[0])

    # ---- teardown ---------------------------------------------------------------------------------
    def close(self):
        """Free the IPC buffers and handles. Collective (all ranks call it); idempotent. Call it only
        once no CUDA graph that captured these all-reduces will be replayed again."""
        if self._closed:
            return
        self._closed = True
        if not self._ready:  # never set up, or already torn down when setup failed
            return
        self.disabled = True
        self.disabled_reason = "closed"
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(self.device)
        self._release(barrier=True)

    def _release(self, barrier: bool):
        if self._fa is not None:
            with contextlib.suppress(Exception):
                self._ops.dispose(self._fa)  # closes the peers' graph buffers it opened
            self._fa = None
        self._rank_data = self._workspace = self._control = None
        release_shared(self._rt, self.cpu_group, self.rank, self._shared, barrier, "custom all-reduce")
        self._shared = []

    def __repr__(self):
        state = f"disabled: {self.disabled_reason}" if self.disabled else f"max_bytes={self.max_bytes}"
        return f"CustomAllReduce(backend={self.backend}, rank={self.rank}/{self.world_size}, {state})"


class TieredAllReduce:
    """Backend "auto": several CustomAllReduce, each serving the message sizes it was measured fastest at
    (ascending max_bytes: trtllm, then vllm); a message none takes goes to NCCL. The same interface as
    CustomAllReduce, so the group holds either. Built collectively by make_custom_all_reduce."""

    backend = "auto"

    def __init__(self, tiers: list[CustomAllReduce]):
        self.tiers = sorted(tiers, key=lambda t: t.max_bytes)

    @property
    def disabled(self) -> bool:
        return all(t.disabled for t in self.tiers)

    @property
    def disabled_reason(self) -> str:
        return "; ".join(f"{t.backend}: {t.disabled_reason}" for t in self.tiers) if self.disabled else ""

    @property
    def fused_calls(self) -> int:
        return sum(t.fused_calls for t in self.tiers)

    def _pick(self, x: torch.Tensor) -> CustomAllReduce | None:
        return next((t for t in self.tiers if t.should_use(x)), None)

    def should_use(self, x: torch.Tensor) -> bool:
        return self._pick(x) is not None

    def _tier(self, x: torch.Tensor) -> CustomAllReduce:
        tier = self._pick(x)
        if tier is None:
            raise RuntimeError(f"no custom all-reduce takes this tensor ({x.dtype}, {tuple(x.shape)}): use NCCL")
        return tier

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._tier(x).all_reduce(x)

    def should_use_fused(self, x, residual, weight) -> bool:
        tier = self._pick(x)  # the fused kernel only where its tier is the one chosen for x's size
        return tier is not None and tier.should_use_fused(x, residual, weight)

    def fused_add_rmsnorm(self, x, residual, weight, eps):
        return self._tier(x).fused_add_rmsnorm(x, residual, weight, eps)

    @contextlib.contextmanager
    def capture(self):
        with contextlib.ExitStack() as stack:
            for t in self.tiers:
                stack.enter_context(t.capture())
            yield

    def close(self):
        for t in self.tiers:
            t.close()

    def __repr__(self):
        return f"TieredAllReduce({', '.join(repr(t) for t in self.tiers)})"


def make_custom_all_reduce(cpu_group, rank: int, world_size: int, device: torch.device,
                           backend: str | None = None, max_bytes: int = 8 << 20):
    """The group's small-message all-reduce, or None (NCCL for everything). Collective over cpu_group.
    backend None: default_backend() ($NANOVLLM_CUSTOM_AR_BACKEND, else "auto"). "auto" builds trtllm for
    messages up to TRTLLM_AUTO_MAX_BYTES and vllm up to max_bytes, keeping whichever set up; trtllm only
    with NVLink between every pair of GPUs (vllm's own condition past 2 GPUs: over PCIe neither kernel was
    measured). Every rank must resolve the same backend (each host reads its own environment): where they
    differ, every rank returns None rather than pairing different constructions' collectives."""
    backend = check_backend(backend or default_backend())
    if cpu_group is not None and world_size > 1:
        everyone = allgather(cpu_group, world_size, backend)
        if len(set(everyone)) != 1:
            if rank == 0:
                logger.warning("custom all-reduce off: ranks resolved different backends %s "
                               "(set NANOVLLM_CUSTOM_AR_BACKEND alike on every host); NCCL for every all-reduce",
                               everyone)
            return None
    if backend != "auto":
        car = CustomAllReduce(cpu_group, rank, world_size, device, max_bytes=max_bytes, backend=backend)
        return None if car.disabled else car
    tiers = []
    try:
        tiers.append(CustomAllReduce(cpu_group, rank, world_size, device, backend="trtllm",
                                     max_bytes=min(TRTLLM_AUTO_MAX_BYTES, max_bytes)))
        tiers.append(CustomAllReduce(cpu_group, rank, world_size, device, max_bytes=max_bytes, backend="vllm"))
    except BaseException:
        for t in tiers:
            t.close()
        raise
    trtllm = tiers[0]
    if not trtllm.disabled and not trtllm.full_nvlink:  # the same answer on every rank (NVML over the same uuids)
        trtllm.close()
    tiers = [t for t in tiers if not t.disabled]
    if not tiers:
        return None
    return tiers[0] if len(tiers) == 1 else TieredAllReduce(tiers)


__all__ = ["CustomAllReduce", "TieredAllReduce", "make_custom_all_reduce", "check_backend", "BACKENDS", "CHOICES"]
