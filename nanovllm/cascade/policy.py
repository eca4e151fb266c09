"""Per step: find the shared pages of the batch (planner) and decide whether cascade pays (cost model)."""
import numpy as np

from nanovllm.cascade.cost_model import AlwaysCascade, CascadeCostModel
from nanovllm.cascade.planner import CascadePlan, plan_cascade


# A shared level must save at least this many tokens per group: a level that shares only a chat
# template's first page would otherwise hide the longer system prompts below it.
MIN_SHARED_TOKENS = 64


class CascadePolicy:

    def __init__(self, config, backend):
        self.page_size = config.kvcache_block_size
        self.max_levels = config.cascade_max_levels
        self.fixed_len = config.cascade_shared_prefix_len or None
        self.cost_model = CascadeCostModel() if config.attention_backend == "flashinfer" else AlwaysCascade()
        self.min_group_size = 2
        self.min_shared_pages = max(1, MIN_SHARED_TOKENS // self.page_size)

    def plan(self, seqs) -> CascadePlan | None:
        if len(seqs) < self.min_group_size:
            return None
        q_lens = np.fromiter((s.chunk_len for s in seqs), dtype=np.int32, count=len(seqs))
        kv_lens = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int32, count=len(seqs)) + q_lens
        width = max(len(s.block_table) for s in seqs)
        table = np.full((len(seqs), width), -1, dtype=np.int32)
        for row, s in enumerate(seqs):
            table[row, :len(s.block_table)] = s.block_table
        plan = plan_cascade(table, kv_lens, q_lens, self.page_size, max_levels=self.max_levels,
                            min_group_size=self.min_group_size,
                            min_shared_pages=self.min_shared_pages, fixed_shared_prefix_len=self.fixed_len)
        if len(plan.levels) < 2 or not self.cost_model.worth_it(plan, self.page_size):
            return None
        return plan
