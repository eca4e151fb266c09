"""CUDA graphs for decode steps: capture once at start-up, replay every decode step.

One graph per batch size (1, 2, 4, 8, 16, 32, ... 256, 320, ... max_num_seqs) for regular decode;
with cascade on, also one per level count (2 .. cascade_max_levels) and shared-level kernel (the Triton
tiles, fa3 and fa3 cut into pieces; fa3 twice, paged and as ragged runs of the cache). A step pads up to
the next captured size (padded rows write no K/V). Only the model body is captured; logits and sampling
run eagerly after the replay (their shapes follow the real batch).
Under tensor parallelism every rank captures the same graphs in the same order, all-reduces inside
(distributed/parallel_state.py), and replays the same graph for the same step.
"""
import numpy as np
import torch

from nanovllm.attention import StepBatch
from nanovllm.cascade.ragged_level import shared_levels_are_runs
from nanovllm.utils.context import reset_context, set_context


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = {1, 2, 4, 8} | set(range(16, 257, 16)) | set(range(320, max_bs, 64))
    return sorted({b for b in sizes if b < max_bs} | {max_bs})


class DecodeGraphs:

    def __init__(self, model, backend, max_bs: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.model, self.backend = model, backend
        self.sizes = graph_batch_sizes(max_bs)
        self.graphs: dict = {}
        self.replays = 0  # decode steps run from a graph (benchmarks and tests read it)
        self.loaded = None  # the key of the graph whose step load() planned last
        # Every size's attention wrappers now, before the KV cache is sized (their buffers must count as
        # used). Their FlashInfer int workspaces are shared, one a level slot (flashinfer_backend.prepare_graphs):
        # one a wrapper, 8 MB each on the device and pinned on the host, was 5.3 GB in W2/W3's engine of 1,024
        # rows (~630 wrappers; 2,896 more KV pages without them on one H200, session 20).
        for bs in self.sizes:
            backend.graph_wrappers(bs)
        self.vars = dict(
            input_ids=torch.zeros(max_bs, dtype=torch.long, device=device),
            positions=torch.zeros(max_bs, dtype=torch.long, device=device),
            slot_mapping=torch.full((max_bs,), -1, dtype=torch.long, device=device),
            hidden=torch.zeros(max_bs, hidden_size, dtype=dtype, device=device))

    def key(self, batch: StepBatch):
        """The captured graph that runs this decode step, or None (too large, or a level count
        that was not captured)."""
        n = len(batch.q_lens)
        if batch.is_prefill or n > self.sizes[-1]:
            return None
        key = (next(b for b in self.sizes if b >= n),) + self.backend.graph_key(batch.cascade)
        if key[-1] == "fa3-ragged" and key not in self.graphs:   # not captured at this size: the paged fa3 graph
            key = key[:-1] + ("fa3",)
        return key if key in self.graphs else None

    def load(self, batch: StepBatch, input_ids: torch.Tensor, positions: torch.Tensor, key):
        """Copy a step's inputs into the graph's buffers and plan its attention there."""
        n, bs = len(input_ids), key[0]
        gv = self.vars
        gv["input_ids"][:n].copy_(input_ids)
        gv["positions"][:n].copy_(positions)
        slots = gv["slot_mapping"][:bs]
        slots[n:].fill_(-1)  # padded rows write nothing; their stale ids and positions are harmless
        slots[:n].copy_(batch.slot_mapping)
        self.backend.plan_graph(batch, bs, slots, key[1:])
        self.loaded = key

    def replay(self, key, n: int) -> torch.Tensor:
        """Hidden states of the step's n rows (the graph's output buffer, valid until the next replay). Only the
        graph last loaded: its wrappers share int workspaces with other graphs' (flashinfer_backend.prepare_graphs),
        so another graph's plan in between would leave it reading that plan."""
        assert key == self.loaded, f"replaying graph {key}, planned {self.loaded}"
        self.graphs[key].replay()
        self.replays += 1
        return self.vars["hidden"][:n]

    def _dummy_batch(self, bs: int, levels: int, num_pages: int) -> StepBatch:
        """A decode batch of bs requests to plan for capture: one page each, or a cascade of `levels`."""
        page = self.backend.page_size
        own = np.minimum(np.arange(1, bs + 1), num_pages - 1).astype(np.int32)
        ones = np.ones(bs, np.int32)
        batch = StepBatch(False, ones, ones, np.arange(bs + 1, dtype=np.int32), np.arange(bs + 1, dtype=np.int32),
                          own, ones, self.vars["slot_mapping"][:bs], page)
        if levels:
            # Nested halves: all requests share page 0, the first half page 1, the first quarter
            # page 2, ...; then one page each. Too few requests for `levels` gives fewer levels.
            from nanovllm.cascade.planner import plan_cascade
            rows = np.arange(bs)
            cols = [np.where(rows < bs >> i, i, levels + bs * (i + 1) + rows) for i in range(levels - 1)]
            cols.append(levels + rows)
            table = (np.stack(cols, axis=1) % num_pages).astype(np.int32)
            kv = np.full(bs, (levels - 1) * page + 1, np.int32)
            batch.cascade = plan_cascade(table, kv, ones, page, max_levels=levels)
        return batch

    @torch.inference_mode()
    def capture(self, num_pages: int, cascade_levels: int):
        """Capture every graph (largest batch first, so that smaller graphs reuse its memory pool).
        cascade_levels: 0 when cascade is off, else its maximum level count."""
        gv = self.vars
        modes = [0] + list(range(2, cascade_levels + 1))
        pool = None
        for bs in reversed(self.sizes):
            for levels in modes:  # 0: regular decode; n: cascade decode over n levels
                batch = self._dummy_batch(bs, levels, num_pages)
                if levels and len(batch.cascade.levels) != levels:
                    continue  # too few requests to nest that deep: such steps run eagerly
                for shared in (self.backend.graph_shared_backends(bs) if levels else (None,)):
                    if shared == "fa3-ragged" and not shared_levels_are_runs(batch.cascade, self.backend.page_size):
                        continue  # a cache too small for the dummy's pages to be runs: key() takes the paged graph
                    if levels:
                        batch.cascade.shared_backend = shared  # see cost_model.shared_level_backend
                    key = (bs,) + self.backend.graph_key(batch.cascade)
                    self.backend.plan_graph(batch, bs, gv["slot_mapping"][:bs], key[1:])
                    set_context(is_prefill=False, attn=self.backend)
                    gv["hidden"][:bs] = self.model(gv["input_ids"][:bs], gv["positions"][:bs])  # warm-up, uncaptured
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool):
                        gv["hidden"][:bs] = self.model(gv["input_ids"][:bs], gv["positions"][:bs])
                    if pool is None:
                        pool = graph.pool()
                    self.graphs[key] = graph
                    torch.cuda.synchronize()
        reset_context()
