"""DecodeGraphs' setup on the host: which batch sizes get graphs, and that every size's attention wrappers
exist when DecodeGraphs is made, before the model runner sizes the KV cache from the free memory (their
buffers count as used; their FlashInfer int workspaces are shared a level slot), and that only the graph last
planned replays. The captures themselves need a GPU (tests/test_gpu.py)."""
import pytest
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


def test_only_the_graph_last_planned_replays():
    """Graphs share FlashInfer int workspaces a level slot: replaying a graph other than the one load() planned
    would read another plan, so replay refuses it."""
    class Backend:
        page_size = 16

        def graph_wrappers(self, bs):
            pass

        def plan_graph(self, batch, bs, slots, kind):
            self.planned = (bs,) + kind

    class Graph:
        replayed = 0

        def replay(self):
            Graph.replayed += 1

    backend = Backend()
    graphs = DecodeGraphs(torch.nn.Identity(), backend, 64, 8, torch.float32, torch.device("cpu"))
    graphs.graphs = {(16, "regular"): Graph(), (16, "cascade", 2, "fa3"): Graph()}
    batch = type("Batch", (), {"slot_mapping": torch.full((10,), -1)})()
    ids = torch.zeros(10, dtype=torch.long)
    graphs.load(batch, ids, ids, (16, "cascade", 2, "fa3"))
    assert backend.planned == (16, "cascade", 2, "fa3")
    with pytest.raises(AssertionError, match="planned"):
        graphs.replay((16, "regular"), 10)
    graphs.replay((16, "cascade", 2, "fa3"), 10)
    assert Graph.replayed == 1 and graphs.replays == 1
