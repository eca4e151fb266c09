"""All-reduce of prefill's large messages over two GPUs on the copy engines, so that it runs beside the GEMMs.

Why: under tensor parallelism a prefill step sums two messages a layer over ranks, up to 128 MB each at
Qwen3-8B shapes. NCCL's kernels need SMs, and cuBLAS's prefill GEMMs are persistent kernels that hold every SM,
so beside NCCL's sums they run slower (a traced 16k-token step at Qwen3-8B TP=2: GEMMs 155.8 ms beside NCCL,
148.5 beside the copy engines). A copy engine moves bytes over NVLink with no SM at all.

How (one sum, on each of the two ranks): the rank's partial result is copied by cudaMemcpyAsync, on a side
stream, into a slot of the peer's receive buffer (cudaMalloc'd memory shared through legacy CUDA IPC,
distributed/cuda_ipc.py), then cuStreamWriteValue32 writes the sum's sequence number into the peer's flag for
that slot (the driver fences the copy's writes before the flag's). wait() makes the compute stream wait for
its own copy (an event) and for the peer's flag (cuStreamWaitValue32: the stream's front end polls, no kernel
spins), then adds the peer's slot into the partial result in place. At two ranks both add the same two bf16
values, so both hold the same sum bit for bit; each sends the whole message once, as many bytes as a ring
all-reduce sends. Past two ranks the ranks would add in different orders (and send more than NCCL): two only.

Slots: a sum's slot is its sequence number modulo SLOTS, and both ranks number their sums alike (they run the
same steps and sum the same messages). A sum k may start only once sum k - 2 has been waited for, and sums are
waited for in the order they started (start() and wait() check both and raise otherwise: a caller that broke
them would read a slot the peer is overwriting). Then this rank's copy of sum k comes after its wait for the
peer's sum k - 2, which the peer sent after waiting for (and adding) this rank's sum k - 4: the slot sum k
lands in is free again SLOTS = 4 sums later. models/tp_overlap.py's two orders keep at most two sums open.

Cost: SLOTS receive slots of the largest piece's message (models/tp_overlap.piece_bytes): 320 MiB a GPU at
Qwen3-8B with a 16,384-token prefill budget, taken from the KV cache (sized after this is set up).

Measured (2 x H200, claude_docs/performance.md "Session 25"): one sum alone takes what NCCL takes (64 MB: 0.243
ms against 0.254); W1 at Qwen3-8B TP=2 with prefill pieces that attend apart, their sums here, 15,149-15,270
tok/s against 15,066-15,196 with session 23's pieces on NCCL (+0.5%).

Never used: NVLS, multimem or multicast, symmetric memory. NANOVLLM_CE_ALL_REDUCE=0 turns it off (NCCL).
"""
import contextlib
import ctypes
import logging
import os

import torch

from nanovllm.distributed.cuda_ipc import CudaRT, Unavailable, agree, describe, release_shared, share_buffers

logger = logging.getLogger("nanovllm.distributed")

SLOTS = 4
MAX_OPEN = 2                 # sums started and not yet waited for (the slot argument above)
_WAIT_GEQ = 0                # CU_STREAM_WAIT_VALUE_GEQ
_WRITE_DEFAULT = 0           # CU_STREAM_WRITE_VALUE_DEFAULT: a memory fence before the write


class _StreamMemOps:
    """The copy (the runtime's cudaMemcpyAsync), and the driver's stream memory operations (which torch does not
    expose)."""

    def __init__(self, rt: CudaRT):
        try:
            drv = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise Unavailable(f"cannot load libcuda.so.1 ({e})")
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
                raise Unavailable(f"libcuda has no {names[0]}")
        self.copy = rt.memcpy_async

    def write(self, stream: int, addr: int, value: int):
        err = self.write_value(stream, addr, value & 0xFFFFFFFF, _WRITE_DEFAULT)
        if err:
            raise RuntimeError(f"cuStreamWriteValue32: CUDA driver error {err}")

    def wait(self, stream: int, addr: int, value: int):
        err = self.wait_value(stream, addr, value & 0xFFFFFFFF, _WAIT_GEQ)
        if err:
            raise RuntimeError(f"cuStreamWaitValue32: CUDA driver error {err}")


class _Sum:
    """A started sum: wait() orders the current stream after it and returns the summed tensor."""

    def __init__(self, owner, x: torch.Tensor, seq: int, sent: torch.cuda.Event):
        self.owner, self.x, self.seq, self.sent = owner, x, seq, sent

    def wait(self) -> torch.Tensor:
        return self.owner._finish(self)


class CopyEngineAllReduce:
    """Sums over the two ranks of a tensor-parallel group for messages of min_bytes..max_bytes, started on the
    copy engines (start(x) -> handle; handle.wait() -> the sum, in x). Collective setup; any rank's failure
    makes every rank's `disabled` true (the caller then uses NCCL)."""

    def __init__(self, cpu_group, rank: int, world_size: int, device: torch.device, max_bytes: int,
                 min_bytes: int = 0):
        self.cpu_group, self.rank, self.world_size, self.device = cpu_group, rank, world_size, device
        self.max_bytes, self.min_bytes = max_bytes, min_bytes
        self.peer = 1 - rank
        self.disabled, self.disabled_reason = True, "not set up"
        self._shared = []                         # [receive slots, flags]: each rank's pointer
        self._slots = []                          # our receive slots as byte tensors
        self.sums_started = self._sums_done = 0
        try:
            self._setup()
            self.disabled, self.disabled_reason = False, ""
        except Unavailable as e:
            self.disabled_reason = str(e)
            self._release(barrier=False)
            if rank == 0:
                logger.warning("copy-engine all-reduce off (%s): NCCL for prefill's large sums", e)

    def _setup(self):
        error = None
        try:
            if os.environ.get("NANOVLLM_CE_ALL_REDUCE", "1") != "1":
                raise Unavailable("NANOVLLM_CE_ALL_REDUCE is not 1")
            if self.world_size != 2:
                raise Unavailable(f"{self.world_size} ranks (two only: past two, ranks would add in different orders)")
            if self.device.type != "cuda":
                raise Unavailable("not on CUDA")
            self._rt = CudaRT()
            self._ops = _StreamMemOps(self._rt)
        except Exception as e:
            error = describe(e)
        agree(self.cpu_group, self.world_size, error)
        with torch.cuda.device(self.device):
            recv, flags = share_buffers(self._rt, self.cpu_group, self.rank, self.world_size,
                                        [SLOTS * self.max_bytes, SLOTS * 4], self._shared)
            self._recv, self._flags = recv, flags
            error = None
            try:
                self.copy_stream = torch.cuda.Stream(self.device)
                self._slots = [_bytes_at(recv[self.rank] + slot * self.max_bytes, self.max_bytes, self.device)
                               for slot in range(SLOTS)]
                torch.cuda.synchronize(self.device)
            except Exception as e:
                error = describe(e)
            agree(self.cpu_group, self.world_size, error)

    def should_use(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (not self.disabled and x.is_cuda and x.is_contiguous() and self.min_bytes <= nbytes <= self.max_bytes
                and not torch.cuda.is_current_stream_capturing())

    def start(self, x: torch.Tensor) -> _Sum:
        """Copy x (this rank's partial sum) to the peer; x must not be written until wait() returns."""
        if self.sums_started - self._sums_done >= MAX_OPEN:
            raise RuntimeError(f"copy-engine all-reduce: a sum started with {MAX_OPEN} open (its slot may still be "
                               "in the peer's use)")
        self.sums_started += 1
        seq = self.sums_started
        slot = seq % SLOTS
        compute = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(compute)
        stream = self.copy_stream.cuda_stream
        self._ops.copy(self._recv[self.peer] + slot * self.max_bytes, x.data_ptr(), x.numel() * x.element_size(),
                       stream)
        self._ops.write(stream, self._flags[self.peer] + slot * 4, seq)
        sent = torch.cuda.Event()
        sent.record(self.copy_stream)
        return _Sum(self, x, seq, sent)

    def _finish(self, s: _Sum) -> torch.Tensor:
        if s.seq != self._sums_done + 1:
            raise RuntimeError(f"copy-engine all-reduce: sum {s.seq} waited for after {self._sums_done} "
                               "(sums must be waited for in the order they started)")
        self._sums_done = s.seq
        compute = torch.cuda.current_stream(self.device)
        # x is written (and later freed) on this stream only after its copy has left (not record_stream: the
        # host queues a whole prefill step ahead, and the allocator would hold every partial of it until the
        # copy stream's events complete, gigabytes the KV cache sizing did not count).
        compute.wait_event(s.sent)
        slot = s.seq % SLOTS
        self._ops.wait(compute.cuda_stream, self._flags[self.rank] + slot * 4, s.seq)
        nbytes = s.x.numel() * s.x.element_size()
        return s.x.add_(self._slots[slot][:nbytes].view(s.x.dtype).view(s.x.shape))

    def close(self):
        """Collective: drop the peer's mappings, then (after a barrier) free ours."""
        if not self._shared:
            return
        self.disabled, self.disabled_reason = True, "closed"
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(self.device)
        self._release(barrier=True)

    def _release(self, barrier: bool):
        self._slots = []
        if self._shared:
            release_shared(self._rt, self.cpu_group, self.rank, self._shared, barrier, "copy-engine all-reduce")
        self._shared = []


def _bytes_at(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over nbytes of device memory at ptr, not owned (the IPC buffer outlives it)."""
    class _Array:
        __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}
    return torch.as_tensor(_Array(), device=device)
