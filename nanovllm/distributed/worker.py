"""A tensor-parallel worker: rank r > 0. It joins the group, builds the same ModelRunner as rank 0
(the same collectives in the same order: memory warm-up, page count, graph capture), then runs every
ScheduledStep rank 0 ships until it is told to stop (None) or rank 0 goes away.

It never reads its sampled tokens: they stay on its device, where the next step's inputs are
gathered from (every rank samples the same tokens; see engine/scheduled_step.py). On an exception it
posts the traceback to the rendezvous store for rank 0 (distributed/executor.py) and exits 1.
"""
import os
import sys
import traceback


def worker_main(config, rank: int, local_rank: int, master_addr: str | None, master_port: int | None,
                channel_args=None):
    from nanovllm.distributed.parallel_state import NO_MULTICAST_ENV
    for key, value in NO_MULTICAST_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    from nanovllm.distributed import parallel_state
    from nanovllm.distributed.executor import ERROR_KEY, local_device
    from nanovllm.distributed.step_channel import GlooChannel, ShmChannel
    from nanovllm.engine.model_runner import ModelRunner

    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a worker is
    code = 0
    channel = runner = None
    try:
        device = local_device(config, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # CPU ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
        config.device = str(device)
        grp = parallel_state.init_tensor_parallel(rank, config.tensor_parallel_size, device, master_addr, master_port,
                                                  config.distributed_timeout_s, not config.disable_custom_all_reduce)
        if channel_args is not None:
            name, slot_bytes, semaphores = channel_args
            channel = ShmChannel(len(semaphores), slot_bytes, semaphores, name=name, reader=local_rank - 1)
        else:
            channel = GlooChannel(grp.cpu_group, rank)
        runner = ModelRunner(config)
        fault = injected_fault(rank)
        while True:
            step = channel.recv()
            if step is None:
                break
            if fault is not None and step.step_id >= fault:
                raise RuntimeError(f"injected fault at step {step.step_id} (NANOVLLM_WORKER_FAULT)")
            runner.execute(step)
    except BaseException:
        code = 1
        trace = traceback.format_exc()
        print(f"nanovllm tensor-parallel worker rank {rank}:\n{trace}", file=sys.stderr, flush=True)
        grp = parallel_state.group()
        if grp is not None and grp.store is not None:
            try:
                grp.store.set(ERROR_KEY.format(rank), trace)
            except Exception:
                pass
    finally:
        if runner is not None and code == 0:
            runner.release_graphs()
        if channel is not None:
            channel.close()
        parallel_state.destroy_tensor_parallel(timeout_s=5.0, failed=code != 0)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def injected_fault(rank: int) -> int | None:
    """Test hook: NANOVLLM_WORKER_FAULT="RANK:STEP" makes that rank raise at that step."""
    spec = os.environ.get("NANOVLLM_WORKER_FAULT", "")
    if not spec:
        return None
    fault_rank, step = (int(x) for x in spec.split(":"))
    return step if fault_rank == rank else None
