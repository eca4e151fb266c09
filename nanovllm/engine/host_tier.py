"""The host-memory KV tier of one rank: a pool of pages in host memory and the copies a step asks for.

The block manager (scheduler side) decides every copy; this only executes a step's `swap_out`
(GPU page -> host page) and `swap_in` (host page -> GPU page) pairs, in that order, before the
step's forward. Under tensor parallelism every rank holds its own KV heads of every page and runs
the same pairs on its own pool.

Pool layout [host pages, 2, layers, page_size, kv_heads, head_dim]: a host page is one contiguous
run of bytes. The GPU cache is [2, layers, pages, ...]: a page there is 2 x layers rows of
page_size x kv_heads x head_dim elements, a uniform pitch of pages x row apart. Two copy modes:
- "dma" (the default on CUDA): one cudaMemcpy2DAsync a page, straight between the cache and the
  pinned pool (utils/memcpy2d.py: the plan is plain data, run on CPU by strided byte views in the
  tests). No kernel, so the copy engines move it whatever the forward does with the SMs.
- "staged": one index_select / index_copy_ kernel a chunk of CHUNK pages gathers (scatters) them
  through a contiguous staging tensor, and one memcpy a run of consecutive host pages. Kept as the
  fallback (no CUDA runtime library found, or a cache whose pitch is over the device's memcpy
  limit, 2**31 - 1 bytes on current GPUs) and for comparison.
Why (one H200, scripts/bench_host_copies.py, qwen3-1.7b pages of 1.84 MB, 512 pages a copy): staged
moved 42-47 GB/s with the GPU idle but 11.8-12.2 GB/s beside a matmul loop on the compute stream
(a forward's stand-in), with the copy stream at high priority too (its kernels wait for SMs); one
contiguous pinned buffer of the same bytes moved 55.0 GB/s beside the same loop. On W6 (qwen3-1.7b,
16,384 GPU pages, 64 GB host tier) engine/copy_costs.py then saw 13-29 GB/s and restored nothing
under fcfs, and under lpm restored 118 GB and ran slower than GPU-only lpm (6,150 vs 8,247 tok/s).
DMA mode, measured on the same H200 (session 9): 48.5-49.7 GB/s idle, 38.4-41.3 beside the loop.

On CUDA the pool is pinned (cudaHostRegister on a plain allocation: PyTorch's pinned allocator
rounds sizes up to a power of two) and the copies run on a side stream: they start after the step
in flight only when the step says they must (`copy_after_prev`: a page it may still use). The
step's forward waits for its write-backs (it may reuse those pages). A step's copies are one copy
batch (`copy_batch`, its scheduling clock): write-backs (swap_out, then write_ahead) on the "out"
stream, restores on the "in" stream, each waiting for the other only where the step says (a page
written back then restored, ...). A later forward waits for earlier batches only as far as the step
says (`copy_waits`: the block manager's choice, from the pages the step reads or writes whose copies
are not known to have landed), and the runner reports the last batch it saw complete on each stream
(`copies_done`, by querying the batches' end events at each step, never waiting). By default the in
and out streams are one stream (then in order: swap_out, write_ahead, swap_in): measured on the H200
(session 9, scripts/bench_host_copies.py, 512 pages of 1.84 MB each way), copies both ways at once
on two streams moved 50.4 GB/s in all, what one direction moves alone (50.0-51.0): the link gives no
second direction for free; and on W6 (1.7B, fcfs) two streams made each restore look twice as slow
(timed beside the write-backs), so engine/copy_costs.py turned restores off for part of a round
(4,738 tok/s against 5,149 with one stream and the old waits). By default (the block manager's
`sync_copies`) a step's waits cover every earlier batch and restores are read at the earliest by
the next step, so a restore overlaps the forward of the step that carries it. With the opt-in copy
feedback (NANOVLLM_HOST_COPY_FEEDBACK=1) the waits cover only the pages the step uses and a
restoring request is held until its batch is reported complete, so the copies may overlap other
requests' forwards; on W6 at 1.7B that was no faster (claude_docs/memory.md). Only a step whose
own rows read its restores (a restoring request run at once because nothing else could run) says so
(`wait_for_restores`), and it carries no other restores. A `StepTimer` of CUDA events
times the forward's wait for copies, the forward, the copies and the restores alone (read by the
runner at a later collect once `ready()`: it never waits for them; engine/copy_costs.py decides from
them). Staged: the GPU page ids of a step's copies go up once a direction from pinned memory
(`_staged_copies`); dma: page ids stay on the host (they are the plan's offsets).
On CPU (tests) the pool is a second tensor and the default "staged" mode's copies are plain tensor
ops; "dma" there runs the same plan as on CUDA through byte views.

An fp8 cache (kv_cache_dtype fp8_e4m3) is copied as its bytes (a uint8 view of cache and pool):
index_select / index_copy_ have no fp8 kernels, and a page moves unchanged whatever its dtype.
"""
import os
import warnings
import weakref
from collections import deque
from time import perf_counter
from typing import NamedTuple

import numpy as np
import torch

from nanovllm.utils.memcpy2d import cache_pitch, cuda_memcpy2d, page_copy_plan, run_plan_cpu
from nanovllm.utils.transfer import to_device

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


def last_up_to(ends: deque, batch: int):
    """The end event of the last batch up to `batch` in a stream's (batch, event) queue, or None (its
    copies run in order: waiting for it waits for those before)."""
    event = None
    for b, end in ends:
        if b > batch:
            break
        event = end
    return event


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


class StepTimes(NamedTuple):
    """One step's device times (seconds) and sizes, as engine/copy_costs.py reads them."""
    prefill_tokens: int   # 0: a decode step
    forward_s: float      # from the end of its waits for copies to its end (compute stream)
    stall_s: float        # its forward's wait for copies (the previous step's, its write-backs, its restores)
    copy_s: float         # all of its copies (copy stream)
    copy_pages: int
    restore_s: float      # its restores alone
    restore_pages: int


class StepTimer:
    """The device times of one step with the host tier on: the forward's wait for copies and the
    forward itself on the compute stream, the write-backs on the out stream, the restores on the in
    stream (its copy seconds: both streams' busy time). CUDA
    events read once `ready()` (never waited for: a restore may outlast the step that issued it); on
    CPU, wall clock (everything there is synchronous)."""

    def __init__(self, cuda: bool, prefill_tokens: int):
        self.cuda = cuda
        self.prefill_tokens = prefill_tokens
        self.copy_pages = self.restore_pages = 0
        self.has_out = self.has_in = False   # write-backs / restores queued (their events are recorded)
        if cuda:
            event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
            self.wait_start, self.forward_start, self.forward_end = event(), event(), event()
            self.out_start, self.out_end, self.restore_start, self.restore_end = event(), event(), event(), event()
            self.wait_start.record()
        else:
            self.forward_s = self.stall_s = self.copy_s = self.restore_s = 0.0
            self.started = perf_counter()

    def forward_begins(self):
        if self.cuda:
            self.forward_start.record()
        else:
            self.started = perf_counter()

    def forward_ends(self):
        if self.cuda:
            self.forward_end.record()
        else:
            self.forward_s = perf_counter() - self.started

    def ready(self) -> bool:
        return not self.cuda or (self.forward_end.query() and (not self.has_out or self.out_end.query())
                                 and (not self.has_in or self.restore_end.query()))

    def times(self) -> StepTimes:
        if self.cuda:
            forward = self.forward_start.elapsed_time(self.forward_end) / 1000
            stall = self.wait_start.elapsed_time(self.forward_start) / 1000
        else:
            forward, stall = self.forward_s, self.stall_s
        return StepTimes(self.prefill_tokens, forward, stall, self.copy_seconds(), self.copy_pages,
                         self.restore_seconds(), self.restore_pages)

    def copy_seconds(self) -> float:
        if not self.cuda:
            return self.copy_s
        out = self.out_start.elapsed_time(self.out_end) / 1000 if self.has_out else 0.0
        return out + self.restore_seconds()

    def restore_seconds(self) -> float:
        if not self.cuda:
            return self.restore_s
        return self.restore_start.elapsed_time(self.restore_end) / 1000 if self.has_in else 0.0


COPY_MODES = ("dma", "staged")


class HostTier:

    def __init__(self, kv_cache: torch.Tensor, num_pages: int, copy_mode: str | None = None,
                 copy_streams: int | None = None):
        """copy_mode: "dma" (a 2D memcpy a page, no kernel; on CPU the plan runs on byte views) or
        "staged" (gather/scatter kernels + memcpy). None: "dma" on CUDA (falling back to "staged",
        with a warning, where no CUDA runtime library is found or the cache's pitch is over the
        device's memcpy limit), "staged" on CPU (plain tensor ops). The environment variable
        NANOVLLM_HOST_COPY_MODE (dma | staged) stands in for None: end-to-end runs compare the two.
        copy_streams: 1 (default; NANOVLLM_HOST_COPY_STREAMS stands in for None) runs write-backs and
        restores on one stream, 2 on a stream each (module doc: measured, no gain)."""
        copy_mode = copy_mode or os.environ.get("NANOVLLM_HOST_COPY_MODE") or None
        if copy_mode not in (None,) + COPY_MODES:
            raise ValueError(f"copy_mode (or NANOVLLM_HOST_COPY_MODE) must be one of {COPY_MODES}, got {copy_mode!r}")
        if kv_cache.dtype.itemsize == 1:  # fp8: copy bytes (module doc)
            kv_cache = kv_cache.view(torch.uint8)
        self.kv_cache = kv_cache   # [2, layers, pages, page_size, kv_heads, head_dim]
        self.cuda = kv_cache.is_cuda
        page_shape = kv_cache.shape[:2] + kv_cache.shape[3:]
        shape = (num_pages,) + tuple(page_shape)
        self.pool = pinned_empty(shape, kv_cache.dtype) if self.cuda else torch.zeros(shape, dtype=kv_cache.dtype)
        # CUDA: write-backs on the out stream, restores on the in stream (one and the same stream unless
        # copy_streams is 2: module doc); each one's (copy batch, end event) not seen complete yet, and
        # the last batch queued
        copy_streams = copy_streams or os.environ.get("NANOVLLM_HOST_COPY_STREAMS") or 1
        if str(copy_streams) not in ("1", "2"):
            raise ValueError(f"copy_streams (or NANOVLLM_HOST_COPY_STREAMS) must be 1 or 2, got {copy_streams!r}")
        copy_streams = int(copy_streams)
        self.out_stream = torch.cuda.Stream(device=kv_cache.device) if self.cuda else None
        self.in_stream = (torch.cuda.Stream(device=kv_cache.device) if copy_streams == 2 else self.out_stream) \
            if self.cuda else None
        self.out_ends: deque[tuple[int, torch.cuda.Event]] = deque()
        self.in_ends: deque[tuple[int, torch.cuda.Event]] = deque()
        self.last_batch = -1
        self.memcpy2d = None   # CUDA "dma" mode: the cudaMemcpy2DAsync binding
        if self.cuda and copy_mode in (None, "dma"):
            try:
                self.memcpy2d = self._dma_binding()
            except (RuntimeError, OSError, AttributeError) as e:
                if copy_mode == "dma":   # asked for by name: no fallback
                    raise
                warnings.warn(f"host tier: no DMA page copies ({e}); they fall back to staging kernels, "
                              "measured at ~12 GB/s beside a compute loop (H200) where a kernel-free copy kept 55", RuntimeWarning)
        self.copy_mode = copy_mode or ("dma" if self.memcpy2d is not None else "staged")

    def _dma_binding(self):
        memcpy2d = cuda_memcpy2d()
        pitch, limit = cache_pitch(self.kv_cache), memcpy2d.max_pitch(self.kv_cache.device)
        if pitch > limit:
            raise RuntimeError(f"the cache's pitch ({self.kv_cache.shape[2]} pages x row = {pitch} bytes) is over the "
                               f"device's largest memcpy pitch ({limit})")
        if self.num_pages:   # no host page: nothing will ever be copied, nor can the check copy
            self._check_dma(memcpy2d)
        return memcpy2d

    @torch.inference_mode()
    def _check_dma(self, memcpy2d):
        """Once, at start-up, before the cache holds any KV: a pattern page out of the last GPU page
        into the last host page, then (that GPU page zeroed) back into GPU page (pages - 1) // 2, each
        through `memcpy2d.run` and compared byte for byte (RuntimeError on a mismatch). Both copies
        meet a nonzero host page offset, and the GPU side one at each end where there are 3 pages or
        more. The three pages are zeroed after, whatever happened (the cache starts as zeros:
        engine/kv_cache.py; a leftover pattern holds bf16 NaNs). On CPU (tests) `memcpy2d` is a
        stand-in."""
        kv, pool = self.kv_cache.view(torch.uint8), self.pool.view(torch.uint8)
        src, host, dst = kv.shape[2] - 1, self.num_pages - 1, (kv.shape[2] - 1) // 2
        sync = torch.cuda.current_stream(kv.device).synchronize if self.cuda else (lambda: None)
        copied = (lambda: (self.out_stream.synchronize(), self.in_stream.synchronize())) if self.cuda else (lambda: None)
        page = torch.arange(kv[:, :, 0].numel(), device=kv.device, dtype=torch.int64).remainder_(251)
        page = page.to(torch.uint8).view(kv[:, :, 0].shape)
        out_ok = back_ok = False
        try:
            kv[:, :, src].copy_(page)
            sync()
            self._run_dma(memcpy2d, np.array([[src, host]]), to_host=True, stream=self.out_stream)
            copied()
            out_ok = torch.equal(pool[host], page.cpu())
            kv[:, :, src].zero_()
            sync()
            self._run_dma(memcpy2d, np.array([[host, dst]]), to_host=False, stream=self.in_stream)
            copied()
            back_ok = torch.equal(kv[:, :, dst], page)
        finally:
            if out_ok and back_ok:
                kv[:, :, dst].zero_()
            else:   # a wrong binding may have written any page: the whole cache (a host page is read only once written)
                kv.zero_()
            pool[host].zero_()
            sync()
        if not (out_ok and back_ok):
            raise RuntimeError(f"the DMA page copy's start-up check read back other bytes than it wrote (GPU page "
                               f"{src} -> host page {host}: {'ok' if out_ok else 'differs'}; back into GPU page {dst}: "
                               f"{'ok' if back_ok else 'differs'})")

    def _run_dma(self, memcpy2d, pairs: np.ndarray, to_host: bool, stream=None):
        """One direction's pages as 2D copies through `memcpy2d`: on CUDA queued on `stream`; on CPU run
        at once (by `memcpy2d` where given, a test's stand-in, else by byte views)."""
        plan = page_copy_plan(self.kv_cache, self.pool, pairs, to_host)
        dst, src = (self.pool, self.kv_cache) if to_host else (self.kv_cache, self.pool)
        if self.cuda:
            with torch.cuda.device(self.kv_cache.device):
                memcpy2d.run(dst, src, plan, stream)
        elif memcpy2d is not None:
            memcpy2d.run(dst, src, plan, None)
        else:
            run_plan_cpu(dst, src, plan)

    @property
    def num_pages(self) -> int:
        return self.pool.shape[0]

    def before_forward(self, swap_out, swap_in, after_prev: bool, wait_for_restores: bool, write_ahead=None,
                       prefill_tokens: int = 0, batch: int = -1, waits: tuple = (-1, -1, -1, -1),
                       wait_own_out: bool = True) -> StepTimer:
        """Called before every step's forward: queues this step's copies (numpy [n, 2] arrays or None) as
        copy batch `batch`, then orders the forward after what it needs. `waits`: (wait_in, wait_out,
        out_after_in, in_after_out), engine/block_manager.py's StepCopies. The forward waits for the
        restores of the batches up to wait_in and the write-backs up to wait_out, for its own
        write-backs unless `wait_own_out` is False (copy feedback: the block manager saw the forward
        write none of those pages), and for its own restores only if `wait_for_restores`;
        never for `write_ahead` (background write-backs of free pages). Returns the step's timer (the
        runner marks the forward's end)."""
        timer = StepTimer(self.cuda, prefill_tokens)
        wait_in, wait_out, out_after_in, in_after_out = waits
        if self.cuda:
            self.poll()   # drops the events seen complete (a tensor-parallel worker never collects)
        if swap_out is not None or swap_in is not None or write_ahead is not None:
            self.copy(swap_out, swap_in, after_prev, wait_for_restores, write_ahead, timer, batch, out_after_in,
                      in_after_out, wait_own_out)
        if self.cuda:
            main = torch.cuda.current_stream()
            for end in (last_up_to(self.in_ends, wait_in), last_up_to(self.out_ends, wait_out)):
                if end is not None:
                    main.wait_event(end)
            self.last_batch = max(self.last_batch, batch)
        timer.forward_begins()
        return timer

    def poll(self) -> tuple[int, int]:
        """(in, out): the last batch whose restores / write-backs are all complete, from the streams' end
        events (queried, never waited for)."""
        done = []
        for ends in (self.in_ends, self.out_ends):
            while ends and ends[0][1].query():
                ends.popleft()
            done.append(ends[0][0] - 1 if ends else self.last_batch)
        return done[0], done[1]

    def copy(self, swap_out, swap_in, after_prev: bool, wait_for_restores: bool = True, write_ahead=None,
             timer: StepTimer | None = None, batch: int = -1, out_after_in: int = -1,
             in_after_out: int = -1, wait_own_out: bool = True) -> StepTimer:
        """Queue a step's copies: swap_out then write_ahead on the out stream, swap_in on the in stream;
        the out stream first waits for the restores up to batch `out_after_in`, the in stream for the
        write-backs up to batch `in_after_out` (`batch` itself: this batch's swap_out)."""
        timer = timer or StepTimer(self.cuda, 0)
        timer.copy_pages = sum(len(pairs) for pairs in (swap_out, swap_in, write_ahead) if pairs is not None)
        timer.restore_pages = 0 if swap_in is None else len(swap_in)
        if not self.cuda:
            start = perf_counter()
            self._copies(swap_out, None)
            restore_start = perf_counter()
            self._copies(None, swap_in)
            timer.restore_s = perf_counter() - restore_start
            self._copies(write_ahead, None)
            timer.copy_s = perf_counter() - start
            return timer
        main = torch.cuda.current_stream()
        has = lambda pairs: pairs is not None and len(pairs) > 0  # noqa: E731
        written_back = None
        if has(swap_out) or has(write_ahead):
            timer.has_out = True
            if after_prev:
                self.out_stream.wait_stream(main)
            dep = last_up_to(self.in_ends, out_after_in)
            if dep is not None:
                self.out_stream.wait_event(dep)
            with torch.cuda.stream(self.out_stream):
                timer.out_start.record()
                self._copies(swap_out, None)
                if has(swap_out):
                    written_back = torch.cuda.Event()
                    written_back.record()
                self._copies(write_ahead, None)
                timer.out_end.record()
            self.out_ends.append((batch, timer.out_end))
        if has(swap_in):
            timer.has_in = True
            if after_prev:
                self.in_stream.wait_stream(main)
            dep = written_back if in_after_out == batch else last_up_to(self.out_ends, in_after_out)
            if dep is not None:
                self.in_stream.wait_event(dep)
            with torch.cuda.stream(self.in_stream):
                timer.restore_start.record()
                self._copies(None, swap_in)
                timer.restore_end.record()
            self.in_ends.append((batch, timer.restore_end))
            if wait_for_restores:
                main.wait_event(timer.restore_end)
        if written_back is not None and wait_own_out:   # else the forward writes none of those pages
            main.wait_event(written_back)
        return timer

    def _copies(self, swap_out, swap_in):
        """swap_out's pairs (gpu page, host page), then swap_in's (host page, gpu page), each numpy [n, 2]
        or None, in the tier's copy mode (on the copy stream: the caller enters it)."""
        if self.copy_mode == "staged":
            self._staged_copies(swap_out, swap_in)
            return
        for pairs, to_host in ((swap_out, True), (swap_in, False)):
            if pairs is not None and len(pairs):
                self._run_dma(self.memcpy2d, pairs, to_host, torch.cuda.current_stream() if self.cuda else None)

    @torch.inference_mode()
    def _staged_copies(self, swap_out, swap_in):
        """Runs on the copy stream (CUDA). The GPU page ids go up once a direction, from pinned memory:
        a copy from pageable memory may make the host wait for the copy stream (CUDA's API sync rules),
        and before, one such upload a chunk of 32 pages held the host (and the forward it launches
        next) until the previous chunk's copies were done."""
        kv, pool, dev = self.kv_cache, self.pool, self.kv_cache.device
        if swap_out is not None:
            gpu_pages, host_pages = to_device(np.ascontiguousarray(swap_out[:, 0]), dev), swap_out[:, 1].tolist()
            for lo in range(0, len(host_pages), CHUNK):
                staged = kv.index_select(2, gpu_pages[lo:lo + CHUNK]).movedim(2, 0).contiguous()   # [n, 2, layers, ...]
                for i, first, count in runs(host_pages[lo:lo + CHUNK]):
                    pool[first:first + count].copy_(staged[i:i + count], non_blocking=True)
        if swap_in is not None:
            host_pages, gpu_pages = swap_in[:, 0].tolist(), to_device(np.ascontiguousarray(swap_in[:, 1]), dev)
            for lo in range(0, len(host_pages), CHUNK):
                host = host_pages[lo:lo + CHUNK]
                staged = torch.empty((len(host),) + pool.shape[1:], dtype=pool.dtype, device=dev)
                for i, first, count in runs(host):
                    staged[i:i + count].copy_(pool[first:first + count], non_blocking=True)
                kv.index_copy_(2, gpu_pages[lo:lo + CHUNK], staged.movedim(0, 2))
