"""CUDA IPC for the all-reduces of our own (distributed/custom_all_reduce.py, copy_engine_all_reduce.py):
cudaMalloc'd buffers shared between the ranks of one host through cudaIpcGetMemHandle / cudaIpcOpenMemHandle,
the handles carried over the gloo group, and their release. The CUDA runtime is reached through ctypes (torch
does not expose these calls), in the libcudart torch already loaded.
"""
import contextlib
import ctypes
import datetime
import logging
import os
import re

import torch
import torch.distributed as dist

logger = logging.getLogger("nanovllm.distributed")

IPC_HANDLE_BYTES = 64                    # sizeof(cudaIpcMemHandle_t)


class Unavailable(Exception):
    """Raised by a setup step; every rank then disables the feature that set up (same reason)."""


# ---- CUDA runtime through ctypes: cudaMalloc'd IPC buffers ------------------------------------------
class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]


def find_cudart_path() -> str | None:
    """The libcudart this process already has loaded (PyTorch's), so ours shares its runtime."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6:
                    continue
                path = parts[5].strip()
                if re.fullmatch(r"libcudart(-[0-9a-fA-F]+)?\.so(\.\d+)*", os.path.basename(path)):
                    return path
    except OSError:
        pass
    return None


class CudaRT:
    """The handful of CUDA runtime calls that CUDA IPC (and copies into a peer's mapping) need and torch does not
    expose."""

    def __init__(self):
        path = find_cudart_path()
        candidates = [path] if path else []
        candidates += ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
        last = None
        for name in candidates:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError as e:
                last = e
        else:
            raise Unavailable(f"cannot load libcudart ({last})")
        lib = self.lib
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for fname, restype, argtypes in (
            ("cudaGetErrorString", ctypes.c_char_p, [ctypes.c_int]),
            ("cudaMalloc", ctypes.c_int, [ctypes.POINTER(vp), sz]),
            ("cudaFree", ctypes.c_int, [vp]),
            ("cudaMemset", ctypes.c_int, [vp, ctypes.c_int, sz]),
            ("cudaIpcGetMemHandle", ctypes.c_int, [ctypes.POINTER(IpcHandle), vp]),
            ("cudaIpcOpenMemHandle", ctypes.c_int, [ctypes.POINTER(vp), IpcHandle, ctypes.c_uint]),
            ("cudaIpcCloseMemHandle", ctypes.c_int, [vp]),
            ("cudaMemcpyAsync", ctypes.c_int, [vp, vp, sz, ctypes.c_int, vp]),
        ):
            fn = getattr(lib, fname)
            fn.restype, fn.argtypes = restype, argtypes

    def _check(self, err: int, what: str):
        if err != 0:
            msg = self.lib.cudaGetErrorString(err)
            raise RuntimeError(f"{what}: CUDA error {err} ({msg.decode() if msg else '?'})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), f"cudaMalloc({nbytes})")
        return int(ptr.value)

    def free(self, ptr: int):
        self._check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def memset(self, ptr: int, value: int, nbytes: int):
        self._check(self.lib.cudaMemset(ctypes.c_void_p(ptr), value, nbytes), "cudaMemset")

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int):
        """nbytes from src to dst on `stream` (a cudaStream_t), the pointers' devices from unified addressing
        (cudaMemcpyDefault): to a peer's IPC mapping, the copy engines carry it."""
        memcpy_default = 4
        self._check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes, memcpy_default,
                                             ctypes.c_void_p(stream)), "cudaMemcpyAsync")

    def ipc_handle(self, ptr: int) -> bytes:
        h = IpcHandle()
        self._check(self.lib.cudaIpcGetMemHandle(ctypes.byref(h), ctypes.c_void_p(ptr)), "cudaIpcGetMemHandle")
        return bytes(h.reserved)

    def ipc_open(self, handle: bytes) -> int:
        h = IpcHandle()
        ctypes.memmove(ctypes.addressof(h), handle, IPC_HANDLE_BYTES)
        ptr = ctypes.c_void_p()
        lazy_enable_peer_access = 1  # cudaIpcMemLazyEnablePeerAccess
        self._check(self.lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), h, lazy_enable_peer_access),
                    "cudaIpcOpenMemHandle")
        return int(ptr.value)

    def ipc_close(self, ptr: int):
        self._check(self.lib.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr)), "cudaIpcCloseMemHandle")


def allgather(cpu_group, world_size: int, obj) -> list:
    """Every rank's obj over the gloo group. gloo's all_gather writes its tensors from another thread,
    which inference mode (on around CUDA-graph capture) refuses (pytorch issue 126032): plain tensors here."""
    out = [None] * world_size
    with torch.inference_mode(False):
        dist.all_gather_object(out, obj, group=cpu_group)
    return out


def describe(e: BaseException) -> str:
    return str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"


def agree(cpu_group, world_size: int, error: str | None, payload=None) -> list:
    """Collective: every rank's payload, or Unavailable (on every rank alike) if any rank had an error."""
    infos = allgather(cpu_group, world_size, (error, payload))
    errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(infos) if e]
    if errors:
        raise Unavailable("; ".join(errors))
    return [p for _, p in infos]


def share_buffers(rt: CudaRT, cpu_group, rank: int, world_size: int, sizes: list[int],
                  shared: list[list[int | None]]) -> list[list[int]]:
    """Collective: cudaMalloc each size here (zeroed) and open every peer's; per buffer, every rank's pointer.
    Each buffer is appended to `shared` as soon as it exists, so that release_shared frees what a failure
    left behind."""
    error, mine = None, []
    try:
        for n in sizes:
            ptr = rt.malloc(n)
            shared.append([None] * world_size)
            shared[-1][rank] = ptr
            rt.memset(ptr, 0, n)
            mine.append(rt.ipc_handle(ptr))
    except Exception as e:
        error = describe(e)
    handles = agree(cpu_group, world_size, error, mine)
    error = None
    new = shared[-len(sizes):]
    try:
        for i, buf in enumerate(new):
            for r in range(world_size):
                if r != rank:
                    buf[r] = rt.ipc_open(handles[r][i])
    except Exception as e:
        error = describe(e)
    agree(cpu_group, world_size, error)
    return [list(b) for b in new]


def release_shared(rt: CudaRT, cpu_group, rank: int, shared: list[list[int | None]], barrier: bool,
                   what: str = "IPC buffers"):
    """Close this rank's mappings of the peers' buffers (shared: per buffer, every rank's pointer), then, after
    a barrier with the peers (60 s on gloo), free our own. If the peers never reach the barrier, ours stay
    allocated: a peer may still map them."""
    for buf in shared:  # first our mappings of the peers' memory ...
        for r, ptr in enumerate(buf):
            if r != rank and ptr is not None:
                with contextlib.suppress(Exception):
                    rt.ipc_close(ptr)
    if barrier:  # ... then, once no peer maps ours any more, our own
        try:
            if dist.get_backend(cpu_group) == "gloo":
                dist.monitored_barrier(group=cpu_group, timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier(group=cpu_group)
        except Exception as e:
            logger.warning("%s: peers did not reach the closing barrier (%s); leaving ours allocated", what, e)
            return
    for buf in shared:
        if buf[rank] is not None:
            with contextlib.suppress(Exception):
                rt.free(buf[rank])
