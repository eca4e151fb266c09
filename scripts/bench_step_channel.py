"""How long a ScheduledStep takes to reach a tensor-parallel worker, by channel (distributed/step_channel.py).

    python scripts/bench_step_channel.py [--iters 300]

Two processes on this host (gloo group, as the engine's CPU group). Rank 0 sends decode steps of
batch 1 and 256 (64 pages a row) and a 16k-token prefill step, each stamped with its send time; the
worker unpickles it and records arrival - send (CLOCK_MONOTONIC is shared by the host's processes).
Prints, per channel and step, rank 0's send cost and the one-way latency (medians, microseconds).
"""
import argparse
import dataclasses
import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import torch.distributed as dist

from nanovllm.engine.scheduled_step import SamplingInputs, ScheduledStep


def make_step(rows: int, pages_per_row: int, prefill_tokens: int = 0) -> ScheduledStep:
    tokens = prefill_tokens or rows
    i64 = lambda n: np.arange(n, dtype=np.int64)
    i32 = lambda n: np.arange(n, dtype=np.int32)
    sampling = SamplingInputs(np.full(rows, 0.6, np.float32), None, None, False, 123, None)
    return ScheduledStep(1, bool(prefill_tokens), tuple(range(rows)), i64(tokens),
                         None if prefill_tokens else np.full(tokens, -1, np.int64), i64(tokens), i64(tokens),
                         np.ones(rows, np.int32), np.full(rows, 16 * pages_per_row, np.int32), i32(rows + 1),
                         i32(rows + 1) * pages_per_row, i32(rows * pages_per_row), np.full(rows, 16, np.int32), 16, None,
                         sampling)


CASES = {"decode batch 1": (1, 64, 0), "decode batch 256": (256, 64, 0), "prefill 16k tokens": (16, 64, 16384)}


def run(rank: int, port: int, kind: str, iters: int, results, sems, shm_name):
    from nanovllm.distributed.step_channel import GlooChannel, ShmChannel
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if kind == "shm":
        channel = ShmChannel(1, 64 << 20, sems, name=shm_name, reader=rank - 1) if rank else None
    else:
        channel = GlooChannel(dist.group.WORLD, rank)
    if rank == 0 and kind == "shm":
        channel = results.pop("owner")
    for name, shape in CASES.items():
        base = make_step(*shape)
        sends, lat = [], []
        for i in range(iters):
            if rank == 0:
                step = dataclasses.replace(base, step_id=time.perf_counter_ns())
                t = time.perf_counter_ns()
                channel.send(step)
                sends.append((time.perf_counter_ns() - t) / 1e3)
                time.sleep(0.0005)  # a step's worth of other host work
            else:
                step = channel.recv()
                lat.append((time.perf_counter_ns() - step.step_id) / 1e3)
        if rank == 0:
            results[(kind, name, "send")] = statistics.median(sends)
        else:
            results[(kind, name, "latency")] = statistics.median(lat)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=300)
    args = p.parse_args()
    from nanovllm.distributed.executor import free_port
    from nanovllm.distributed.step_channel import ShmChannel
    ctx = mp.get_context("spawn")
    table = {}
    for kind in ("shm", "gloo"):
        manager_results = {}
        sems = [ctx.Semaphore(0)]
        owner = ShmChannel(1, 64 << 20, sems) if kind == "shm" else None
        queue = ctx.Queue()
        port = free_port()
        worker = ctx.Process(target=_worker, args=(port, kind, args.iters, queue, sems, owner.name if owner else None))
        worker.start()
        manager_results["owner"] = owner
        run(0, port, kind, args.iters, manager_results, sems, None)
        worker.join()
        manager_results.update(queue.get())
        if owner is not None:
            owner.close()
        table.update({k: v for k, v in manager_results.items() if k != "owner"})
    print(f"host: {os.cpu_count()} cores; {args.iters} steps each; medians in microseconds\n")
    print("| step | pickle bytes | shm send | shm latency | gloo send | gloo latency |\n|---|---|---|---|---|---|")
    import pickle
    for name, shape in CASES.items():
        size = len(pickle.dumps(make_step(*shape), protocol=pickle.HIGHEST_PROTOCOL))
        print(f"| {name} | {size:,} | {table[('shm', name, 'send')]:.0f} | {table[('shm', name, 'latency')]:.0f} | "
              f"{table[('gloo', name, 'send')]:.0f} | {table[('gloo', name, 'latency')]:.0f} |")


def _worker(port, kind, iters, queue, sems, shm_name):
    results = {}
    run(1, port, kind, iters, results, sems, shm_name)
    queue.put(results)


if __name__ == "__main__":
    main()
