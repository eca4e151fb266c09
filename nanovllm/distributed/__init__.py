"""Tensor parallelism: the group and its collectives, shipping steps to workers, the workers."""
