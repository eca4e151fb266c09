"""Who executes the engine's steps: this process's runner alone, or rank 0 of a tensor-parallel group.

Process layout with tensor_parallel_size=N over nnodes hosts (N / nnodes GPUs each):
  node 0   the engine process is rank 0 (scheduler, step builder, its own ModelRunner on GPU 0);
           it spawns ranks 1 .. N/nnodes - 1 (distributed/worker.py), one per local GPU;
  node r   `nanovllm serve --node-rank r ...` spawns that host's ranks and waits (run_node);
  torchrun every rank is started by torchrun; rank 0 runs the engine, the others the worker loop.
Every step is built once on rank 0 and shipped (distributed/step_channel.py) before rank 0 runs it
itself; all ranks then run the same ScheduledStep, meet in the layers' all-reduces, and sample the
same tokens, so only rank 0 reads them back.

Failures: a worker that raises posts its traceback to the rendezvous store and exits; rank 0 checks
the store and its workers' processes while it waits for a step (parallel_state.wait_event) or when a
collective fails, and raises WorkerError carrying the traceback. Rank 0 failing inside a step it shipped
leaves the workers in that step's collectives: GroupOutOfStep, and the engine stays failed as with a
worker's error (the next step's collectives would pair with the old ones). close() (also at exit) tells the
workers to stop, joins them with a timeout, kills what is left, and frees the shared memory.
"""
import atexit
import logging
import multiprocessing as mp
import os
import socket
import time

import torch

from nanovllm.distributed import parallel_state
from nanovllm.distributed.step_channel import GlooChannel, ShmChannel, slot_bytes_for
from nanovllm.engine.model_runner import ModelRunner

logger = logging.getLogger("nanovllm.distributed")

ERROR_KEY = "nanovllm/worker_error/{}"


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed; the message carries its traceback. The engine cannot go on."""


class GroupOutOfStep(RuntimeError):
    """Rank 0 failed inside a step it had shipped: its workers are still in that step's collectives, so
    the next step's would pair with theirs (gloo aborted rank 0's process on the mismatched sizes, found
    by tests/test_fuzz_tensor_parallel.py). The engine cannot go on."""


def make_executor(config):
    if config.tensor_parallel_size == 1:
        return SingleExecutor(ModelRunner(config))
    return TensorParallelExecutor(config)


class SingleExecutor:

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.num_kvcache_blocks = runner.num_kvcache_blocks

    def execute(self, step):
        return self.runner.execute(step)

    def collect(self, pending):
        return self.runner.collect(pending)

    def close(self):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def local_device(config, local_rank: int) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if config.device.startswith("cuda") else torch.device("cpu")


def spawn_workers(config, node_rank: int, master_addr: str, master_port: int, channel_args=None) -> list:
    """Start this node's ranks (all but rank 0 on node 0), one process each."""
    from nanovllm.distributed.worker import worker_main
    per_node = config.tensor_parallel_size // config.nnodes
    ctx = mp.get_context("spawn")
    procs = []
    for local in range(per_node):
        rank = node_rank * per_node + local
        if rank == 0:
            continue
        p = ctx.Process(target=worker_main, name=f"nanovllm-tp-rank{rank}",
                        args=(config, rank, local, master_addr, master_port, channel_args), daemon=True)
        p.start()
        procs.append((rank, p))
    return procs


def stop_processes(procs: list, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    for _, p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for _, p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


class TensorParallelExecutor:
    """Rank 0: starts the local workers, joins the group, ships each step, runs it too."""

    def __init__(self, config):
        self.config = config
        self.failure: Exception | None = None
        self.closed = False
        self.procs: list = []
        self.channel = None
        n, per_node = config.tensor_parallel_size, config.tensor_parallel_size // config.nnodes
        external = launched_by_torchrun()
        addr = None if external else config.master_addr
        port = None if external else (config.master_port or free_port())
        single_host = config.nnodes == 1 and not external
        channel_args = None
        if single_host:
            ctx = mp.get_context("spawn")
            semaphores = [ctx.Semaphore(0) for _ in range(per_node - 1)]
            self.channel = ShmChannel(per_node - 1, slot_bytes_for(config), semaphores)
            channel_args = (self.channel.name, self.channel.slot_bytes, semaphores)
        atexit.register(self.close)
        try:
            if not external:
                self.procs = spawn_workers(config, 0, addr, port, channel_args)
            device = local_device(config, 0)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            config.device = str(device)
            grp = parallel_state.init_tensor_parallel(0, n, device, addr, port, config.distributed_timeout_s,
                                                      not config.disable_custom_all_reduce)
            if not single_host:
                self.channel = GlooChannel(grp.cpu_group, 0)
            grp.health_check = self.check_workers
            self.runner = self._guarded(ModelRunner, config)
        except BaseException:
            self.close()
            raise
        self.num_kvcache_blocks = self.runner.num_kvcache_blocks

    # ---- steps ----------------------------------------------------------------------------------
    def execute(self, step):
        if self.failure is not None:
            raise self.failure
        self._guarded(self._send, step)
        try:
            return self._guarded(self.runner.execute, step)
        except BaseException as e:   # KeyboardInterrupt too: the workers run on without rank 0
            if self.failure is None:
                self.failure = GroupOutOfStep(f"rank 0 failed in step {step.step_id}, which its workers run, so "
                                              f"the tensor-parallel group is out of step: {e!r}")
                raise self.failure from e
            raise

    def collect(self, pending):
        if self.failure is not None:
            raise self.failure
        return self._guarded(self.runner.collect, pending)

    def _send(self, step):
        self.channel.send(step, alive=self._raise_if_failed)

    def _guarded(self, fn, *args):
        """fn(*args); when it fails (a collective broken by a dead peer, say) and a worker has failed,
        raise the worker's error instead, which says what happened."""
        try:
            return fn(*args)
        except WorkerError as e:
            self.failure = e
            raise
        except Exception as e:
            error = self.check_workers(wait_s=5.0)
            if error is None:
                raise
            self.failure = error
            raise error from e

    # ---- failures -------------------------------------------------------------------------------
    def _raise_if_failed(self):
        error = self.check_workers()
        if error is not None:
            self.failure = error
            raise error

    def check_workers(self, wait_s: float = 0.0) -> WorkerError | None:
        """A worker's failure: its posted traceback, or the exit code of a local worker that died.
        wait_s: how long to wait for one to show (after a broken collective)."""
        deadline = time.monotonic() + wait_s
        while True:
            error = self._worker_error()
            if error is not None or time.monotonic() >= deadline:
                return error
            time.sleep(0.05)

    def _worker_error(self) -> WorkerError | None:
        grp = parallel_state.group()
        store = grp.store if grp is not None else None
        if store is not None:
            for rank in range(1, self.config.tensor_parallel_size):
                key = ERROR_KEY.format(rank)
                try:
                    if store.check([key]):
                        trace = store.get(key).decode(errors="replace")
                        return WorkerError(f"tensor-parallel worker rank {rank} failed:\n{trace}")
                except Exception:
                    break  # the store went away with its host: fall back to the processes
        for rank, p in self.procs:
            if p.exitcode is not None:
                return WorkerError(f"tensor-parallel worker rank {rank} (pid {p.pid}) died with exit code "
                                   f"{p.exitcode} and posted no error")
        return None

    # ---- shutdown -------------------------------------------------------------------------------
    def close(self):
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        runner = getattr(self, "runner", None)
        orderly = self.channel is not None and self.failure is None and parallel_state.group() is not None
        if orderly:
            try:
                self._send(None)  # the workers leave their loop and the group
            except Exception as e:
                logger.warning("could not tell the workers to stop: %s", e)
                orderly = False
        if runner is not None and self.failure is None:
            runner.release_graphs()
        if orderly:
            # Leaving the group is collective (the custom all-reduce frees its IPC buffers after a
            # barrier): together with the workers, then wait for them to exit.
            parallel_state.destroy_tensor_parallel()
            stop_processes(self.procs)
        else:
            stop_processes(self.procs, timeout_s=2.0)
            parallel_state.destroy_tensor_parallel(failed=self.failure is not None)
        if self.channel is not None:
            self.channel.close()

def run_node(config):
    """A node other than 0: start its ranks, wait for them (they exit when rank 0 closes the
    engine or its host goes away), and return their worst exit code."""
    procs = spawn_workers(config, config.node_rank, config.master_addr, config.master_port)
    try:
        for _, p in procs:
            p.join()
    finally:
        stop_processes(procs, timeout_s=5.0)
    return max((abs(p.exitcode or 0) for _, p in procs), default=0)
