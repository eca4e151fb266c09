"""KV pages between the GPU cache and the host pool as 2D memcpys: DMA engines only, no kernel.

Why: the staged copy (index_select / index_copy_ kernels on the copy stream, then a memcpy) moved
42-47 GB/s with the GPU idle but 11.8-12.2 GB/s beside a matmul loop on the compute stream (the
forward's stand-in), whatever the copy stream's priority: its gather/scatter kernels wait for SMs.
A plain pinned <-> GPU memcpy of the same bytes kept 55.0 GB/s beside the same loop (one H200,
scripts/bench_host_copies.py, qwen3-1.7b pages of 1.84 MB, 512 pages a copy). A copy with no kernel
needs no SM.

The layout that makes one call a page: the cache is [2, layers, pages, page_size, kv_heads,
head_dim], so a page is 2*layers rows of `row = page_size*kv_heads*head_dim*itemsize` bytes, row r
at byte r*pages*row + page*row (a uniform pitch of pages*row); the pool is [host pages, 2, layers,
page_size, kv_heads, head_dim], where a page is one block of 2*layers rows (pitch row). One
cudaMemcpy2DAsync (width row, height 2*layers) moves a page either way.

A plan is plain data (`page_copy_plan`: one int64 row (dst_offset, dpitch, src_offset, spitch,
width, height) in bytes a page), run on CUDA by `CudaMemcpy2D` (ctypes on the CUDA runtime PyTorch
loaded, cudaMemcpyDefault: UVA pointers say the direction) and on CPU by `run_plan_cpu` (strided
byte views of the same tensors), so the offset math is tested on CPU byte for byte.
"""
import ctypes
import glob
import os

import numpy as np
import torch

CUDA_MEMCPY_DEFAULT = 4   # cudaMemcpyDefault: the direction comes from the pointers (unified addressing)
CUDA_DEV_ATTR_MAX_PITCH = 11   # cudaDevAttrMaxPitch: the largest pitch a memcpy accepts (2**31 - 1 bytes typically)
PLAN_COLUMNS = ("dst_offset", "dpitch", "src_offset", "spitch", "width", "height")


def page_copy_plan(kv_cache: torch.Tensor, pool: torch.Tensor, pairs: np.ndarray, to_host: bool) -> np.ndarray:
    """One 2D copy a page, [n, 6] int64 of PLAN_COLUMNS in bytes from each tensor's first byte.
    to_host: pairs are (gpu page, host page) and the pool is the destination; else (host page, gpu
    page) and the cache is."""
    if kv_cache.dim() != 6 or kv_cache.shape[0] != 2:
        raise ValueError("kv_cache must be [2, layers, pages, page_size, kv_heads, head_dim], "
                         f"got {tuple(kv_cache.shape)}")
    page_shape = tuple(kv_cache.shape[:2] + kv_cache.shape[3:])
    if pool.dim() != 6 or tuple(pool.shape[1:]) != page_shape:
        raise ValueError(f"pool must be [host pages, *{page_shape}], got {tuple(pool.shape)}")
    if kv_cache.element_size() != pool.element_size():
        raise ValueError(f"kv_cache and pool differ in item size: {kv_cache.dtype} vs {pool.dtype}")
    if not (kv_cache.is_contiguous() and pool.is_contiguous()):
        raise ValueError("kv_cache and pool must be contiguous (the plan's offsets assume it)")
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    gpu_pages, host_pages = (pairs[:, 0], pairs[:, 1]) if to_host else (pairs[:, 1], pairs[:, 0])
    num_gpu, num_host = kv_cache.shape[2], pool.shape[0]
    if len(pairs) and (gpu_pages.min() < 0 or gpu_pages.max() >= num_gpu):
        raise ValueError(f"GPU page ids must be in [0, {num_gpu}), got {gpu_pages.min()}..{gpu_pages.max()}")
    if len(pairs) and (host_pages.min() < 0 or host_pages.max() >= num_host):
        raise ValueError(f"host page ids must be in [0, {num_host}), got {host_pages.min()}..{host_pages.max()}")
    row = kv_cache[0, 0, 0].numel() * kv_cache.element_size()
    height = 2 * kv_cache.shape[1]
    plan = np.empty((len(pairs), 6), dtype=np.int64)
    gpu = (gpu_pages * row, num_gpu * row)   # offset, pitch
    host = (host_pages * (height * row), row)
    dst, src = (host, gpu) if to_host else (gpu, host)
    plan[:, 0], plan[:, 1], plan[:, 2], plan[:, 3] = dst[0], dst[1], src[0], src[1]
    plan[:, 4], plan[:, 5] = row, height
    return plan


def cache_pitch(kv_cache: torch.Tensor) -> int:
    """Bytes from one row of a page in the cache to the next (pages x row): a 2D memcpy's pitch there."""
    return kv_cache.shape[2] * kv_cache[0, 0, 0].numel() * kv_cache.element_size()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The flat uint8 view of a contiguous tensor's storage from its first element on."""
    return t.reshape(-1).view(torch.uint8)


def run_plan_cpu(dst: torch.Tensor, src: torch.Tensor, plan: np.ndarray):
    """Executes a plan with strided byte views (the CPU stand-in for the 2D memcpys)."""
    d, s = _bytes(dst), _bytes(src)
    for doff, dpitch, soff, spitch, width, height in plan.tolist():
        if doff + (height - 1) * dpitch + width > d.numel() or soff + (height - 1) * spitch + width > s.numel():
            raise ValueError(f"plan row {(doff, dpitch, soff, spitch, width, height)} leaves its tensors")
        d.as_strided((height, width), (dpitch, 1), d.storage_offset() + doff).copy_(
            s.as_strided((height, width), (spitch, 1), s.storage_offset() + soff))


def find_cudart(major: str | None = None) -> str:
    """The path of the CUDA runtime library: the one already mapped in this process (PyTorch's, once
    CUDA is initialised; where several are, e.g. another package's older runtime, the one of
    PyTorch's CUDA major version, `major`, from torch.version.cuda by default), else the one in
    torch's lib dir or the nvidia-cuda-runtime package."""
    major = major or (torch.version.cuda or "").split(".")[0]
    mapped = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libcudart.so") and path not in mapped:
                mapped.append(path)
    if mapped:
        same = [p for p in mapped if major and os.path.basename(p).startswith(f"libcudart.so.{major}")
                and os.path.basename(p)[len(f"libcudart.so.{major}"):][:1] in ("", ".")]
        return (same or mapped)[0]
    roots = [os.path.join(os.path.dirname(torch.__file__), "lib")]
    try:
        import nvidia.cuda_runtime
        roots += [os.path.join(p, "lib") for p in nvidia.cuda_runtime.__path__]
    except ImportError:
        pass
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "libcudart.so*")))
        if found:
            return found[-1]
    raise RuntimeError(f"no libcudart found: not mapped in this process and none in {roots}")


class CudaMemcpy2D:
    """cudaMemcpy2DAsync through ctypes, each return code checked."""

    def __init__(self):
        torch.cuda.init()   # PyTorch loads its runtime first: find_cudart then finds that one
        self.path = find_cudart()
        lib = ctypes.CDLL(self.path)
        self.memcpy2d = lib.cudaMemcpy2DAsync
        self.memcpy2d.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        self.memcpy2d.restype = ctypes.c_int
        self.error_string = lib.cudaGetErrorString
        self.error_string.argtypes = [ctypes.c_int]
        self.error_string.restype = ctypes.c_char_p
        self.get_attribute = lib.cudaDeviceGetAttribute
        self.get_attribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        self.get_attribute.restype = ctypes.c_int

    def check(self, rc: int, call: str):
        if rc:
            raise RuntimeError(f"{call} returned {rc} ({self.error_string(rc).decode()}), libcudart {self.path}")

    def max_pitch(self, device: torch.device) -> int:
        """The largest pitch (bytes) the device's memcpys accept."""
        value = ctypes.c_int()
        index = torch.cuda.current_device() if device.index is None else device.index
        self.check(self.get_attribute(ctypes.byref(value), CUDA_DEV_ATTR_MAX_PITCH, index),
                   f"cudaDeviceGetAttribute(cudaDevAttrMaxPitch, {index})")
        return value.value

    def run(self, dst: torch.Tensor, src: torch.Tensor, plan: np.ndarray, stream: torch.cuda.Stream):
        """Queues the plan's copies on `stream` (the host only queues them; pinned host memory)."""
        if len(plan) == 0:
            return
        absolute = plan.copy()
        absolute[:, 0] += dst.data_ptr()
        absolute[:, 2] += src.data_ptr()
        fn, handle = self.memcpy2d, stream.cuda_stream
        for d, dpitch, s, spitch, width, height in absolute.tolist():
            rc = fn(d, dpitch, s, spitch, width, height, CUDA_MEMCPY_DEFAULT, handle)
            if rc:
                self.check(rc, f"cudaMemcpy2DAsync(dst={d:#x}, dpitch={dpitch}, src={s:#x}, spitch={spitch}, "
                               f"width={width}, height={height})")


_cuda_memcpy2d = None


def cuda_memcpy2d() -> CudaMemcpy2D:
    """The process's one CudaMemcpy2D (RuntimeError if no CUDA runtime library is found)."""
    global _cuda_memcpy2d
    if _cuda_memcpy2d is None:
        _cuda_memcpy2d = CudaMemcpy2D()
    return _cuda_memcpy2d
