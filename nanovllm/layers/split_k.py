"""Split-K for the W4A16 GEMMs (layers/awq_skinny.py, layers/awq_kpack.py) without zeroing the output or
float atomics: one kernel launch, deterministic, capturable in CUDA graphs.

Each program of a split tile stores its float32 partial [BLOCK_M, BLOCK_N] into a per-call buffer
[splits, M, N], then bumps the tile's counter (an acq_rel atomic, after a barrier so every thread's
partial is stored first); the program that arrives last sums the partials in split order, writes y in its
dtype and sets the counter back to 0. The counters (one int32 per tile, shared by both kernels: calls run
one after another on a stream) are allocated zeroed by the first split call on a device, which must run
outside CUDA graph capture (the engine's capture runs every batch size eagerly first); every call leaves
them zero, so graph replays need no memset."""
import torch
import triton
import triton.language as tl

MAX_TILES = 1 << 16   # tiles a split call may have; 256 KB of counters per device
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's zeroed counters, for a call of `tiles` output tiles."""
    if tiles > MAX_TILES:
        raise ValueError(f"{tiles} output tiles exceed the {MAX_TILES} split-K counters")
    buf = _COUNTERS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K W4A16 GEMM: the first split call on a device must run outside CUDA graph "
                               "capture (it allocates the zeroed counters); run the layer eagerly once first")
        buf = _COUNTERS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return buf


@triton.jit
def store_tile(out, y_ptr, stride_ym, part_ptr, count_ptr, offs_m, offs_n, M, N, tile, pid_k, splits,
               SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[offs_m, offs_n] = out (float32 [BLOCK_M, BLOCK_N]) summed over the tile's splits."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT:
        part_ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptrs + pid_k * M * N, out, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == splits - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in range(0, splits):
                total += tl.load(part_ptrs + i * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0)  # zero again for the next call (or graph replay)
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
