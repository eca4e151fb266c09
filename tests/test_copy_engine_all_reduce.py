"""The copy-engine all-reduce's protocol on the CPU (distributed/copy_engine_all_reduce.py): two instances, one
per "rank", in one process, their CUDA calls replaced by host stand-ins (a copy is a memmove between the ranks'
receive buffers, a flag write a dict entry, a flag wait an assertion that the flag was written). Sums follow
models/tp_overlap.py's two orders over several layers, each rank running until a wait finds its flag unwritten
(as far ahead of the other as its stream could get): every sum equals the two partials' sum (SLOTS = 3 fails
here, 4 passes), and the rules the slots rely on (at most two sums open, waited for in order) raise when broken.
On two GPUs (scripts/gpu_tp_check.sh runs it): the same orders, one rank's stream held back before each wait,
every sum equal to NCCL's bit for bit (not yet run on a GPU: written after session 25's device time was spent)."""
import ctypes

import pytest
import torch

from nanovllm.distributed import copy_engine_all_reduce as cear
from nanovllm.distributed.copy_engine_all_reduce import SLOTS, CopyEngineAllReduce


class _Ops:
    def __init__(self, flags: dict):
        self.flags = flags

    def copy(self, dst, src, nbytes, stream):
        ctypes.memmove(dst, src, nbytes)

    def write(self, stream, addr, value):
        self.flags[addr] = value

    def wait(self, stream, addr, value):
        assert self.flags.get(addr, 0) >= value, "waited for a flag nobody wrote"


class _Stream:
    cuda_stream = 0

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass


class _Event:
    def record(self, stream=None):
        pass


@pytest.fixture
def pair(monkeypatch):
    monkeypatch.setattr(cear.torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(cear.torch.cuda, "Event", _Event)
    max_bytes = 4096
    recv = [torch.zeros(SLOTS * max_bytes, dtype=torch.uint8) for _ in range(2)]
    flags_mem = [torch.zeros(SLOTS, dtype=torch.int32) for _ in range(2)]
    written = {}
    ranks = []
    for rank in (0, 1):
        ce = CopyEngineAllReduce.__new__(CopyEngineAllReduce)
        ce.rank, ce.peer, ce.world_size, ce.device = rank, 1 - rank, 2, torch.device("cpu")
        ce.max_bytes, ce.min_bytes, ce.disabled = max_bytes, 0, False
        ce.sums_started = ce._sums_done = 0
        ce._recv = [r.data_ptr() for r in recv]
        ce._flags = [f.data_ptr() for f in flags_mem]
        ce._slots = [recv[rank][s * max_bytes:(s + 1) * max_bytes] for s in range(SLOTS)]
        ce._ops, ce.copy_stream = _Ops(written), _Stream()
        ranks.append(ce)
    yield ranks, (recv, flags_mem)


def _partials(seed, rows):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 16, generator=g).to(torch.bfloat16) for _ in range(2)]


def _schedule(apart: bool, layers: int = 5):
    """tp_overlap.forward_in_pieces's starts and waits, two pieces: ("start" | "wait", piece)."""
    for layer in range(layers):
        if apart:
            for piece in (0, 1):
                if layer:
                    yield "wait", piece        # the MLP's sum of the layer before
                yield "start", piece           # this layer's o_proj
        else:
            for piece in (0, 1):
                if layer:
                    yield "wait", piece
            yield "start", 0
            yield "start", 1
        for piece in (0, 1):
            yield "wait", piece                # o_proj's sum
            yield "start", piece               # the MLP's
    yield "wait", 0
    yield "wait", 1


@pytest.mark.parametrize("ahead", [0, 1])
@pytest.mark.parametrize("apart", [True, False])
def test_sums_in_the_pieces_orders_equal_the_partials_sums(pair, apart, ahead):
    """Each rank runs its schedule until a wait finds the peer's flag unwritten (where its stream would stop),
    then the other rank runs: one rank as far ahead of the other as the device would let it get."""
    ranks, _ = pair
    partials = {}             # the k-th sum's two partials, made by whichever rank starts it first

    def partial(k, rank):
        if k not in partials:
            g = torch.Generator().manual_seed(k)
            partials[k] = [torch.randn(8 + 3 * (k % 5), 16, generator=g).to(torch.bfloat16) for _ in range(2)]
        return partials[k][rank]

    def run(rank):
        ce, handles = ranks[rank], {}
        for op, piece in _schedule(apart):
            if op == "start":
                k = ce.sums_started + 1
                handles[piece] = (k, ce.start(partial(k, rank).clone()))
            else:
                k, handle = handles.pop(piece)
                while ce._ops.flags.get(ce._flags[rank] + (k % SLOTS) * 4, 0) < k:
                    yield                      # the peer's copy has not landed: the other rank runs
                assert torch.equal(handle.wait(), partials[k][0] + partials[k][1]), f"sum {k} on rank {rank}"

    runs = [run(0), run(1)]
    live, turn = [True, True], ahead
    while any(live):
        if live[turn]:
            try:
                next(runs[turn])
            except StopIteration:
                live[turn] = False
        turn = 1 - turn if live[1 - turn] else turn
    assert ranks[0].sums_started == ranks[1].sums_started == 20


def test_a_third_open_sum_or_a_wait_out_of_order_raises(pair):
    ranks, _ = pair
    ce = ranks[0]
    x = torch.ones(4, 16, dtype=torch.bfloat16)
    first, second = ce.start(x.clone()), ce.start(x.clone())
    with pytest.raises(RuntimeError, match="started with 2 open"):
        ce.start(x.clone())
    ranks[1].start(x.clone())
    ranks[1].start(x.clone())
    with pytest.raises(RuntimeError, match="order they started"):
        second.wait()
    assert torch.equal(first.wait(), 2 * x) and torch.equal(second.wait(), 2 * x)



def _gpu_worker(rank, world_size, port, results_q, apart):
    """Sums in tp_overlap's order on two GPUs, rank 1 held back by a sleeping kernel before each of its waits
    (its stream behind, rank 0 running ahead as far as the flags let it): each equal to NCCL's, bit for bit."""
    import traceback

    import torch.distributed as dist
    from test_custom_all_reduce import _leave, join_gpu_group
    ce = None
    try:
        dev, cpu_group = join_gpu_group(rank, world_size, port, timeout_s=300)
        ce = CopyEngineAllReduce(cpu_group, rank, world_size, dev, max_bytes=16 << 20)
        assert not ce.disabled, ce.disabled_reason
        schedule = list(_schedule(apart, layers=6))
        partials, refs = [], []     # NCCL's sums first: NCCL between the steps below would realign the ranks
        for k in range(sum(op == "start" for op, _ in schedule)):
            g = torch.Generator(device=dev).manual_seed(100 * k + rank)
            partials.append(torch.randn((1 << 20) * (1 + k % 8) // 4096, 4096, device=dev, generator=g)
                            .to(torch.bfloat16))
            refs.append(partials[-1].clone())
            dist.all_reduce(refs[-1])
        torch.cuda.synchronize()
        handles, checked = {}, 0
        for op, piece in schedule:
            if op == "start":
                k = ce.sums_started
                handles[piece] = (ce.start(partials[k]), refs[k])
            else:
                if rank == 1:
                    torch.cuda._sleep(2_000_000)   # ~1 ms of a spinning kernel on this stream
                handle, ref = handles.pop(piece)
                assert torch.equal(handle.wait(), ref), f"sum on rank {rank} differs from NCCL's"
                checked += 1
        torch.cuda.synchronize()
        results_q.put((rank, True, f"{checked} sums equal NCCL's"))
    except BaseException:
        results_q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if ce is not None:
                ce.close()
        except BaseException:
            pass
        _leave(results_q)


@pytest.mark.gpu
@pytest.mark.parametrize("apart", [True, False])
def test_sums_on_two_gpus_equal_nccls_with_one_rank_behind(apart):
    from test_custom_all_reduce import _gpu_ready, _run_ranks
    if not _gpu_ready():
        pytest.skip("needs 2 CUDA GPUs")
    print(_run_ranks(_gpu_worker, 2, 300, apart))
