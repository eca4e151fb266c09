"""DecodeGraphs' setup on the host: which batch sizes get graphs, and that every size's attention wrappers
exist when DecodeGraphs is made, before the model runner sizes the KV cache from the free memory (each
FlashInfer wrapper allocates an 8 MB int workspace on the device, ~2.1 GB over the default sizes with
cascade on). The captures themselves need a GPU (tests/test_gpu.py)."""
import torch

from nanovllm.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes


def test_graph_batch_sizes():
    assert graph_batch_sizes(512) == [1, 2, 4, 8] + list(range(16, 257, 16)) + [320, 384, 448, 512]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]
    assert graph_batch_sizes(3) == [1, 2, 3]


def test_wrappers_of_every_size_are_built_at_construction():
    class Backend:
        def __init__(self):
            self.built = []

        def graph_wrappers(self, bs):
            self.built.append(bs)
    backend = Backend()
    graphs = DecodeGraphs(torch.nn.Identity(), backend, 512, 8, torch.float32, torch.device("cpu"))
    assert backend.built == graphs.sizes == graph_batch_sizes(512)
