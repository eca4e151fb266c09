"""Benchmark entry point: see nanovllm/benchmark.py (python bench.py --help)."""
from nanovllm.benchmark import main

if __name__ == "__main__":
    main()
