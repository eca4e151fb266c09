"""The host-memory KV tier of one rank: a pool of pages in host memory and the copies a step asks for.

The block manager (scheduler side) decides every copy; this only executes a step's `swap_out`
(GPU page -> host page) and `swap_in` (host page -> GPU page) pairs, in that order, before the
step's forward. Under tensor parallelism every rank holds its own KV heads of every page and runs
the same pairs on its own pool.

Pool layout [host pages, 2, layers, page_size, kv_heads, head_dim]: a host page is one contiguous
run of bytes, so consecutive host pages move in one memcpy. The GPU cache is
[2, layers, pages, ...]: its pages are gathered into (or scattered from) a contiguous staging
tensor by one kernel per chunk of CHUNK pages, which bounds the staging memory.

On CUDA the pool is pinned (cudaHostRegister on a plain allocation: PyTorch's pinned allocator
rounds sizes up to a power of two) and the copies run on a side stream: they start after the step
in flight only when the step says they must (`copy_after_prev`: a page it may still use). The
step's forward waits for its write-backs (it may reuse those pages); its background write-backs
(`write_ahead`: free pages copied before they are needed, queued after the restores) and its
restores are waited for by the next step's forward; the restores are read by the
next step's forward (the scheduler admits a restoring request's prefill one step later), which
waits for them, so a restore overlaps the step before it and the step it is issued with. A step
whose own rows read the restored pages says so (`wait_for_restores`). CUDA events time the copies
(`seconds()`, read by the runner at a later collect once `ready()`: it never waits for them). On CPU (tests) the pool is a second
tensor and copies are plain `copy_`.

An fp8 cache (kv_cache_dtype fp8_e4m3) is copied as its bytes (a uint8 view of cache and pool):
index_select / index_copy_ have no fp8 kernels, and a page moves unchanged whatever its dtype.
"""
import weakref
from time import perf_counter

import torch

CHUNK = 32  # pages staged at once: 32 x 2.4 MB for an 8B model's page


def pinned_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor the GPU can copy to and from asynchronously, registered in place (unregistered
    when the tensor goes)."""
    t = torch.empty(shape, dtype=dtype)
    try:
        cudart = torch.cuda.cudart()
        registered = int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) == 0
    except Exception:  # noqa: BLE001 - no cudart binding here: PyTorch's allocator does it
        registered = False
    if not registered:
        return t.pin_memory()
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


def runs(pages: list[int]) -> list[tuple[int, int, int]]:
    """(index, first page, count) of the runs of consecutive pages in `pages`."""
    out = []
    for i, page in enumerate(pages):
        if out and page == out[-1][1] + out[-1][2] and i == out[-1][0] + out[-1][2]:
            index, first, count = out[-1]
            out[-1] = (index, first, count + 1)
        else:
            out.append((i, page, 1))
    return out


class CopyTimer:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        if cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        else:
            self.elapsed = 0.0

    def ready(self) -> bool:
        """The copies are done (never waits: a restore may outlast the step that issued it)."""
        return not self.cuda or self.end.query()

    def seconds(self) -> float:
        if self.cuda:
            return self.start.elapsed_time(self.end) / 1000
        return self.elapsed


class HostTier:

    def __init__(self, kv_cache: torch.Tensor, num_pages: int):
        if kv_cache.dtype.itemsize == 1:  # fp8: copy bytes (module doc)
            kv_cache = kv_cache.view(torch.uint8)
        self.kv_cache = kv_cache   # [2, layers, pages, page_size, kv_heads, head_dim]
        self.cuda = kv_cache.is_cuda
        page_shape = kv_cache.shape[:2] + kv_cache.shape[3:]
        shape = (num_pages,) + tuple(page_shape)
        self.pool = pinned_empty(shape, kv_cache.dtype) if self.cuda else torch.zeros(shape, dtype=kv_cache.dtype)
        self.stream = torch.cuda.Stream(device=kv_cache.device) if self.cuda else None
        self.restore_event = None   # restores the next step's forward must wait for

    @property
    def num_pages(self) -> int:
        return self.pool.shape[0]

    def before_forward(self, swap_out, swap_in, after_prev: bool, wait_for_restores: bool,
                       write_ahead=None) -> CopyTimer | None:
        """Called before every step's forward: orders it after the previous step's copies, then
        queues this step's copies (numpy [n, 2] arrays or None). The forward waits for the
        write-backs (it may reuse those pages); for the restores only if `wait_for_restores`; never
        for `write_ahead` (background write-backs of free pages): the next step's forward waits for
        whatever this one did not."""
        if self.cuda and self.restore_event is not None:
            torch.cuda.current_stream().wait_event(self.restore_event)
            self.restore_event = None
        if swap_out is None and swap_in is None and write_ahead is None:
            return None
        return self.copy(swap_out, swap_in, after_prev, wait_for_restores, write_ahead)

    def copy(self, swap_out, swap_in, after_prev: bool, wait_for_restores: bool = True, write_ahead=None) -> CopyTimer:
        timer = CopyTimer(self.cuda)
        if not self.cuda:
            start = perf_counter()
            self._copies(swap_out, swap_in)
            self._copies(write_ahead, None)
            timer.elapsed = perf_counter() - start
            return timer
        main = torch.cuda.current_stream()
        if after_prev:
            self.stream.wait_stream(main)
        written_back, restored = torch.cuda.Event(), torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            timer.start.record()
            self._copies(swap_out, None)
            written_back.record()
            self._copies(None, swap_in)
            restored.record()
            self._copies(write_ahead, None)
            timer.end.record()
        main.wait_event(written_back)
        if wait_for_restores:
            main.wait_event(restored)
        self.restore_event = timer.end
        return timer

    @torch.inference_mode()
    def _copies(self, swap_out, swap_in):
        kv, pool, dev = self.kv_cache, self.pool, self.kv_cache.device
        if swap_out is not None:
            for lo in range(0, len(swap_out), CHUNK):
                gpu, host = swap_out[lo:lo + CHUNK, 0], swap_out[lo:lo + CHUNK, 1].tolist()
                index = torch.from_numpy(gpu).to(dev, non_blocking=True)
                staged = kv.index_select(2, index).movedim(2, 0).contiguous()   # [n, 2, layers, ...]
                for i, first, count in runs(host):
                    pool[first:first + count].copy_(staged[i:i + count], non_blocking=True)
        if swap_in is not None:
            for lo in range(0, len(swap_in), CHUNK):
                host, gpu = swap_in[lo:lo + CHUNK, 0].tolist(), swap_in[lo:lo + CHUNK, 1]
                staged = torch.empty((len(host),) + pool.shape[1:], dtype=pool.dtype, device=dev)
                for i, first, count in runs(host):
                    staged[i:i + count].copy_(pool[first:first + count], non_blocking=True)
                index = torch.from_numpy(gpu).to(dev, non_blocking=True)
                kv.index_copy_(2, index, staged.movedim(0, 2))
