"""This process's place in the tensor-parallel group, and the collectives the layers call.

Without tensor parallelism (the default) there is no group: tp_rank() is 0, tp_size() 1 and every
collective is the identity, so the single-GPU and CPU paths pay nothing. With it, torch.distributed's
default process group carries the activations (NCCL on CUDA, gloo on CPU so that CI tests it), a
second gloo group carries host objects (steps, page counts, IPC handles), and on the GPU small
all-reduces may go through FlashInfer's custom all-reduce (distributed/custom_all_reduce.py) where
it measured faster than NCCL. One group per process: one tensor-parallel engine per process.

Rendezvous is torch.distributed's: tcp://MASTER_ADDR:MASTER_PORT, or env:// under torchrun.
"""
import contextlib
import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanovllm.distributed.cuda_ipc import allgather

logger = logging.getLogger("nanovllm.distributed")

# NVLink multicast can take a host's GPUs out of service: never on, in any process we start.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class TPGroup:
    rank: int
    size: int
    device: torch.device
    cpu_group: object                         # gloo ProcessGroup over the same ranks
    custom_ar: object = None                  # small GPU messages: CustomAllReduce or TieredAllReduce, or None
    ce_ar: object = None                      # prefill pieces' large sums: CopyEngineAllReduce, or None
    health_check: object = None               # rank 0: () -> Exception | None, a worker's failure
    store: object = field(default=None, repr=False)  # the rendezvous store (workers post errors there)


_group: TPGroup | None = None


def tp_rank() -> int:
    return _group.rank if _group is not None else 0


def tp_size() -> int:
    return _group.size if _group is not None else 1


def group() -> TPGroup | None:
    return _group


@contextlib.contextmanager
def outside_group():
    """Build a single-rank model in a process that also holds a group (tests run both side by side):
    layers read tp_size()/tp_rank() when they are constructed."""
    global _group
    saved, _group = _group, None
    try:
        yield
    finally:
        _group = saved


def init_tensor_parallel(rank: int, size: int, device: torch.device, master_addr: str | None = None,
                         master_port: int | None = None, timeout_s: float = 1800.0,
                         custom_all_reduce: bool = True) -> TPGroup:
    """Join the group (blocks until all `size` ranks have joined). master_addr/port None: env://."""
    global _group
    if _group is not None or dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group: one tensor-parallel "
                           "engine per process (close() the other LLM first)")
    for key, value in NO_MULTICAST_ENV.items():
        os.environ.setdefault(key, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    init_method = f"tcp://{master_addr}:{master_port}" if master_addr else "env://"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = dict(device_id=device) if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout, **kwargs)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    try:  # where workers post their errors (distributed/executor.py); a private torch API, so optional
        store = dist.distributed_c10d._get_default_store()
    except Exception:
        store = None
    _group = TPGroup(rank, size, device, cpu_group, store=store)
    if device.type == "cuda" and custom_all_reduce and size > 1:
        _group.custom_ar = _make_custom_all_reduce(cpu_group, rank, size, device)
    return _group


def _make_custom_all_reduce(cpu_group, rank, size, device):
    try:
        from nanovllm.distributed.custom_all_reduce import make_custom_all_reduce
        return make_custom_all_reduce(cpu_group, rank, size, device)
    except Exception as e:  # an optimisation: NCCL serves every size
        logger.warning("custom all-reduce unavailable (%s); NCCL for every all-reduce", e)
        return None


def destroy_tensor_parallel(timeout_s: float = 10.0, failed: bool = False):
    """Leave the group. destroy_process_group was seen hanging at exit (NCCL 2.28): it runs in a
    daemon thread and is abandoned after timeout_s. failed: a rank failed, so this rank's streams may wait for
    ever on a peer's flag (the IPC all-reduces' kernels and copy-engine waits have no timeout): their buffers are
    left to the process's exit rather than freed after a device synchronize that would not return."""
    global _group
    grp, _group = _group, None
    for ar in (grp.custom_ar, grp.ce_ar) if grp is not None and not failed else ():
        if ar is not None:
            with contextlib.suppress(Exception):
                ar.close()
    if not dist.is_initialized():
        return
    def destroy():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    done = threading.Thread(target=destroy, daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        logger.warning("destroy_process_group did not return within %.0f s; abandoned", timeout_s)


# ---- collectives the layers call (identity without a group) --------------------------------------
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (the result may be a new tensor)."""
    if _group is None:
        return x
    car = _group.custom_ar
    if car is not None and car.should_use(x):
        return car.all_reduce(x)
    dist.all_reduce(x)
    return x


class _Started:
    """A sum started by all_reduce_start: wait() orders this stream after it and returns the sum."""

    def __init__(self, x: torch.Tensor, work=None):
        self.x, self.work = x, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.x


def all_reduce_start(x: torch.Tensor):
    """Start the sum over ranks of x and return at once, so that work queued on this stream meanwhile runs
    beside it; the handle's wait() orders this stream after the sum and returns it (x itself, or a new
    tensor). Where the copy-engine all-reduce takes x (prefill pieces' messages on two GPUs,
    distributed/copy_engine_all_reduce.py), the copy engines move it and no SM is taken; otherwise
    torch.distributed's asynchronous all-reduce, in place on NCCL's own stream (gloo's thread on the CPU).
    A message the custom all-reduce takes is summed at once instead: those sizes are decode's, in graphs."""
    ce = _group.ce_ar
    if ce is not None and ce.should_use(x):
        return ce.start(x)
    car = _group.custom_ar
    if car is not None and car.should_use(x):
        return _Started(car.all_reduce(x))
    return _Started(x, dist.all_reduce(x, async_op=True))


def enable_copy_engine_all_reduce(max_bytes: int, min_bytes: int = 0):
    """Collective (every rank, same arguments): set up the copy-engine all-reduce for messages of min_bytes ..
    max_bytes. Only on two CUDA ranks (where it was measured; past two it sends more bytes than NCCL) and
    unless NANOVLLM_CE_ALL_REDUCE=0; a failed setup leaves NCCL for those sums (logged on rank 0)."""
    if _group is None or _group.device.type != "cuda" or _group.size != 2 or _group.ce_ar is not None:
        return
    from nanovllm.distributed.copy_engine_all_reduce import CopyEngineAllReduce
    ce = CopyEngineAllReduce(_group.cpu_group, _group.rank, _group.size, _group.device, max_bytes, min_bytes)
    _group.ce_ar = None if ce.disabled else ce


def all_reduce_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rmsnorm(residual + sum over ranks of x) * weight, residual + that sum) in one kernel, where the
    custom all-reduce has it (backend "trtllm", 16-bit, up to its max_bytes; residual is updated in
    place); None where it does not: the caller then runs all_reduce and its own norm."""
    car = _group.custom_ar if _group is not None else None
    if car is None or not car.should_use_fused(x, residual, weight):
        return None
    return car.fused_add_rmsnorm(x, residual, weight, eps)


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x side by side along the last dimension, in rank order."""
    if _group is None:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_group.size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)


def check_same_on_every_rank(settings: dict):
    """Collective: ValueError on every rank, naming them, if these settings (environment switches each host
    reads for itself) differ between ranks: ranks that disagree pair different collectives."""
    if _group is None:
        return
    everyone = allgather(_group.cpu_group, _group.size, settings)
    differ = sorted(k for k in settings if len({repr(s.get(k)) for s in everyone}) > 1)
    if differ:
        raise ValueError("tensor-parallel ranks disagree on " + ", ".join(
            f"{k} ({', '.join(f'rank {r}: {s.get(k)!r}' for r, s in enumerate(everyone))})" for k in differ)
            + ": set them alike on every host")


def min_over_ranks(value: int) -> int:
    if _group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_group.cpu_group)
    return int(t.item())


def graph_capture():
    """Wraps the capture of every CUDA graph (the custom all-reduce registers the graphs' buffers)."""
    if _group is not None and _group.custom_ar is not None:
        return _group.custom_ar.capture()
    return contextlib.nullcontext()


def wait_event(event, check_every_s: float = 0.01):
    """event.synchronize(), except that on rank 0 a worker's failure ends the wait with its error
    (a peer that died leaves a collective, and so this event, waiting for ever)."""
    check = _group.health_check if _group is not None else None
    if check is None:
        event.synchronize()
        return
    next_check = time.monotonic() + check_every_s
    while not event.query():
        now = time.monotonic()
        if now >= next_check:
            error = check()
            if error is not None:
                raise error
            next_check = now + check_every_s
        time.sleep(0)
