"""All-reduce of prefill's large messages on the GPUs' copy engines, so that it runs beside the GEMMs.

Why: under tensor parallelism a prefill step sums two messages a layer over ranks, up to 128 MB each at
Qwen3-8B shapes. NCCL's kernels need SMs, and cuBLAS's prefill GEMMs are persistent kernels that hold
every SM while they run, so even with the step in two pieces of rows (models/tp_overlap.py) only ~70 of
W1's 350 ms of NCCL sums hid behind the other piece's GEMMs (2 x H200, session 23). A copy engine moves
bytes over NVLink with no SM at all.

How (one sum, on every rank): the rank's partial result is copied by cudaMemcpyAsync, on a side stream, into
a slot of every peer's receive buffer (cudaMalloc'd memory shared through legacy CUDA IPC, as the custom
all-reduce's), then cuStreamWriteValue32 writes the sum's sequence number into the peer's flag for that slot
(the driver fences the copy's writes before the flag's). wait() makes the compute stream wait for its own
copies and for every peer's flag with cuStreamWaitValue32 (the stream's front end polls; no kernel spins) and
adds the peers' slots to the partial result, out of place. The bytes a rank sends are (ranks - 1) x the message, as a ring all-reduce's
2 (ranks - 1) / ranks x at two ranks; past two ranks this sends more than NCCL does.

Slots: a sum's slot is its sequence number modulo SLOTS, and every rank numbers its sums alike (every rank
runs the same steps and sums the same messages). In models/tp_overlap.py's order a rank waits for its sums in
the order it started them, and it starts a piece's sum k only after waiting for that piece's previous sum,
numbered k - 2 or later; the peer started that one only after waiting for the piece's sum before it, numbered
k - 4 or later, so the peer had consumed this rank's sum k - 4 (and every sum before it) before this rank's
sum k can be copied: a slot is free again SLOTS = 4 sums later.

Never used: NVLS, multimem or multicast, symmetric memory. The memory here is cudaMalloc shared through
cudaIpcGetMemHandle / cudaIpcOpenMemHandle, whose handles travel over the gloo group.

Measured: see claude_docs/performance.md, "Session 25".
"""
import contextlib
import ctypes
import logging
import os

import torch
import torch.distributed as dist

from nanovllm.distributed.custom_all_reduce import _CudaRT, _Unavailable, _allgather

logger = logging.getLogger("nanovllm.distributed")

SLOTS = 4
_MEMCPY_DEFAULT = 4          # cudaMemcpyDefault: the pointers' devices from unified addressing
_WAIT_GEQ = 0                # CU_STREAM_WAIT_VALUE_GEQ
_WRITE_DEFAULT = 0           # CU_STREAM_WRITE_VALUE_DEFAULT: a memory fence before the write


class _StreamMemOps:
    """cudaMemcpyAsync, and the driver's stream memory operations (which torch does not expose)."""

    def __init__(self, rt: _CudaRT):
        try:
            drv = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise _Unavailable(f"cannot load libcuda.so.1 ({e})")
        vp, u64, u32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32
        self.wait_value = self.write_value = None
        for attr, names in (("wait_value", ("cuStreamWaitValue32_v2", "cuStreamWaitValue32")),
                            ("write_value", ("cuStreamWriteValue32_v2", "cuStreamWriteValue32"))):
            for name in names:
                fn = getattr(drv, name, None)
                if fn is not None:
                    fn.restype, fn.argtypes = ctypes.c_int, [vp, u64, u32, ctypes.c_uint]
                    setattr(self, attr, fn)
                    break
            else:
                raise _Unavailable(f"libcuda has no {names[0]}")
        self.memcpy = rt.lib.cudaMemcpyAsync
        self.memcpy.restype, self.memcpy.argtypes = ctypes.c_int, [vp, vp, ctypes.c_size_t, ctypes.c_int, vp]
        self._rt = rt

    def copy(self, dst: int, src: int, nbytes: int, stream: int):
        self._rt._check(self.memcpy(dst, src, nbytes, _MEMCPY_DEFAULT, stream), "cudaMemcpyAsync")

    def write(self, stream: int, addr: int, value: int):
        err = self.write_value(stream, addr, value, _WRITE_DEFAULT)
        if err:
            raise RuntimeError(f"cuStreamWriteValue32: CUDA driver error {err}")

    def wait(self, stream: int, addr: int, value: int):
        err = self.wait_value(stream, addr, value, _WAIT_GEQ)
        if err:
            raise RuntimeError(f"cuStreamWaitValue32: CUDA driver error {err}")


class _Sum:
    """A started sum: wait() orders the current stream after it and returns the summed tensor."""

    def __init__(self, owner, x: torch.Tensor, slot: int, seq: int, sent: torch.cuda.Event):
        self.owner, self.x, self.slot, self.seq, self.sent = owner, x, slot, seq, sent

    def wait(self) -> torch.Tensor:
        return self.owner._finish(self)


class CopyEngineAllReduce:
    """Sums over the ranks of a tensor-parallel group for messages of min_bytes..max_bytes, started on the
    copy engines (start(x) -> handle; handle.wait() -> the sum). Collective setup; any rank's failure makes
    every rank's `disabled` true (the caller then uses NCCL)."""

    def __init__(self, cpu_group, rank: int, world_size: int, device: torch.device, max_bytes: int,
                 min_bytes: int = 0):
        self.cpu_group, self.rank, self.world_size, self.device = cpu_group, rank, world_size, device
        self.max_bytes, self.min_bytes = max_bytes, min_bytes
        self.peers = [r for r in range(world_size) if r != rank]
        self.disabled, self.disabled_reason = True, "not set up"
        self._recv = self._flags = None           # [rank] -> pointer (ours and the peers' mappings)
        self._slots = {}                          # (slot, src) -> uint8 tensor over our receive slot
        self._seq = 0                             # sums started (every rank alike)
        try:
            self._setup()
            self.disabled, self.disabled_reason = False, ""
        except _Unavailable as e:
            self.disabled_reason = str(e)
            self._release(barrier=False)
            if rank == 0:
                logger.warning("copy-engine all-reduce off (%s): NCCL for prefill's large sums", e)

    def _agree(self, error, payload=None) -> list:
        infos = _allgather(self.cpu_group, self.world_size, (error, payload))
        errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(infos) if e]
        if errors:
            raise _Unavailable("; ".join(errors))
        return [p for _, p in infos]

    def _setup(self):
        error, handles = None, None
        try:
            if os.environ.get("NANOVLLM_CE_ALL_REDUCE", "1") != "1":
                raise _Unavailable("NANOVLLM_CE_ALL_REDUCE is not 1")
            if self.device.type != "cuda":
                raise _Unavailable("not on CUDA")
            self._rt = _CudaRT()
            self._ops = _StreamMemOps(self._rt)
            with torch.cuda.device(self.device):
                region = self.max_bytes * (self.world_size - 1)
                self._recv = [None] * self.world_size
                self._flags = [None] * self.world_size
                self._recv[self.rank] = self._rt.malloc(SLOTS * region)
                self._flags[self.rank] = self._rt.malloc(SLOTS * self.world_size * 4)
                self._rt.memset(self._flags[self.rank], 0, SLOTS * self.world_size * 4)
                handles = (self._rt.ipc_handle(self._recv[self.rank]), self._rt.ipc_handle(self._flags[self.rank]))
                self.copy_stream = torch.cuda.Stream(self.device)
        except Exception as e:
            error = str(e) if isinstance(e, _Unavailable) else f"{type(e).__name__}: {e}"
        handles = self._agree(error, handles)
        error = None
        try:
            with torch.cuda.device(self.device):
                for r in self.peers:
                    self._recv[r] = self._rt.ipc_open(handles[r][0])
                    self._flags[r] = self._rt.ipc_open(handles[r][1])
                # the receive slots as byte tensors, once (wait() slices them)
                self._slots = {(slot, r): _bytes_at(self._slot_addr(self.rank, slot, r), self.max_bytes, self.device)
                               for slot in range(SLOTS) for r in self.peers}
                torch.cuda.synchronize(self.device)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        self._agree(error)

    @property
    def sums(self) -> int:
        return self._seq

    def should_use(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (not self.disabled and x.is_cuda and x.is_contiguous() and self.min_bytes <= nbytes <= self.max_bytes
                and not torch.cuda.is_current_stream_capturing())

    def _slot_addr(self, owner: int, slot: int, src: int) -> int:
        """Where src's message for `slot` lands in `owner`'s receive buffer."""
        index = src if src < owner else src - 1
        return self._recv[owner] + (slot * (self.world_size - 1) + index) * self.max_bytes

    def _flag_addr(self, owner: int, slot: int, src: int) -> int:
        return self._flags[owner] + (slot * self.world_size + src) * 4

    def start(self, x: torch.Tensor) -> _Sum:
        seq = self._seq + 1
        self._seq = seq
        slot = seq % SLOTS
        nbytes = x.numel() * x.element_size()
        compute = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(compute)
        stream = self.copy_stream.cuda_stream
        for r in self.peers:
            self._ops.copy(self._slot_addr(r, slot, self.rank), x.data_ptr(), nbytes, stream)
        for r in self.peers:
            self._ops.write(stream, self._flag_addr(r, slot, self.rank), seq & 0xFFFFFFFF)
        sent = torch.cuda.Event()
        sent.record(self.copy_stream)
        return _Sum(self, x, slot, seq, sent)

    def _finish(self, s: _Sum) -> torch.Tensor:
        compute = torch.cuda.current_stream(self.device)
        # x is freed (and its memory reused) on this stream once the handle goes: after its copies. (Not
        # record_stream: the host queues a whole prefill step ahead, and the allocator would hold every partial
        # of it until the copy stream's events complete: gigabytes the KV cache sizing did not count.)
        compute.wait_event(s.sent)
        stream = compute.cuda_stream
        out = None
        for r in self.peers:
            self._ops.wait(stream, self._flag_addr(self.rank, s.slot, r), s.seq & 0xFFFFFFFF)
            peer = self._slots[(s.slot, r)][:s.x.numel() * s.x.element_size()].view(s.x.dtype).view(s.x.shape)
            out = torch.add(s.x, peer) if out is None else out.add_(peer)
        return out

    def close(self):
        """Collective: drop the peers' mappings, then (after a barrier) free ours."""
        if self.disabled and self._recv is None:
            return
        self.disabled, self.disabled_reason = True, "closed"
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(self.device)
        self._release(barrier=True)

    def _release(self, barrier: bool):
        if self._recv is None:
            return
        for bufs in (self._recv, self._flags):
            for r in self.peers:
                if bufs is not None and bufs[r] is not None:
                    with contextlib.suppress(Exception):
                        self._rt.ipc_close(bufs[r])
        if barrier:
            with contextlib.suppress(Exception):
                dist.barrier(group=self.cpu_group)
        for bufs in (self._recv, self._flags):
            if bufs is not None and bufs[self.rank] is not None:
                with contextlib.suppress(Exception):
                    self._rt.free(bufs[self.rank])
        self._recv = self._flags = None
        self._slots = {}


def _bytes_at(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over nbytes of device memory at ptr, not owned (the IPC buffer outlives it)."""
    class _Array:
        __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}
    return torch.as_tensor(_Array(), device=device)
