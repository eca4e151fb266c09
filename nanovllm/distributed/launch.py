"""What a `nanovllm serve` / `nanovllm generate` process is, before it builds an engine:

  node 0, or a single host     the engine (rank 0), which starts its host's workers itself;
  --node-rank R > 0            a host of workers: it starts that host's ranks and waits for them;
  under torchrun, RANK > 0     one worker (torchrun started every rank; WORLD_SIZE must equal
                               --tensor-parallel-size), rendezvous through torchrun's env://.
"""
import os


def run_if_worker_host(model: str, engine_kwargs: dict) -> int | None:
    """Runs this process as a worker host and returns its exit code, or None when it is rank 0's."""
    from nanovllm.distributed.executor import launched_by_torchrun
    torchrun = launched_by_torchrun()
    if not torchrun and engine_kwargs.get("node_rank", 0) == 0:
        return None
    from nanovllm.config import Config
    config = Config(model, **engine_kwargs)
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if world != config.tensor_parallel_size:
            raise ValueError(f"torchrun started {world} processes but --tensor-parallel-size is "
                             f"{config.tensor_parallel_size}")
        rank = int(os.environ["RANK"])
        if rank == 0:
            return None
        from nanovllm.distributed.worker import worker_main
        worker_main(config, rank, int(os.environ["LOCAL_RANK"]), None, None)  # exits the process
    from nanovllm.distributed.executor import run_node
    return run_node(config)
