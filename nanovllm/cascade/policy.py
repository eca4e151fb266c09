"""Per step: find the shared pages of the batch (planner) and decide whether cascade pays (cost model).

Decode steps reuse the shared levels of the previous plan while the batch is the same requests in
the same order: pages a request appends while decoding are fresh and shared with nobody, so only the
per-request level changes. That keeps planning ~1 ms for 1024 requests of 8k tokens, against ~10 ms
for a full plan (prefill steps and changed batches still get one).
"""
import numpy as np
import torch

from nanovllm.attention.kv_quant import is_fp8
from nanovllm.cascade.cost_model import AlwaysCascade, CascadeCostModel, pages_per_row
from nanovllm.cascade.planner import CascadeLevel, CascadePlan, plan_cascade

# A shared level must save at least this many tokens per group: a level that shares only a chat
# template's first page would otherwise hide the longer system prompts below it.
MIN_SHARED_TOKENS = 64


def cost_model_for(config) -> CascadeCostModel:
    """The cost model with a rank's heads and the cache dtype (they pick the shared-level kernel, as
    flashinfer_backend.shared_kernel does) and the configured kernel."""
    tp, hf = config.tensor_parallel_size, config.hf_config
    heads, kv_heads = hf.num_attention_heads // tp, max(1, hf.num_key_value_heads // tp)
    return CascadeCostModel(num_qo_heads=heads, num_kv_heads=kv_heads, shared_backend=config.cascade_shared_backend,
                            kv_fp8=is_fp8(config.kv_dtype))


class CascadePolicy:

    def __init__(self, config):
        self.page_size = config.kvcache_block_size
        self.max_levels = config.cascade_max_levels
        self.fixed_len = config.cascade_shared_prefix_len or None
        self.cost_model = cost_model_for(config) if config.attention_backend == "flashinfer" else AlwaysCascade()
        self.min_group_size = 2
        self.min_shared_pages = max(1, MIN_SHARED_TOKENS // self.page_size)
        self._decode_key = None   # seq ids of the last decode batch planned in full
        self._decode_plan = None  # its plan (None: nothing shared), and per-row shared page counts
        self._shared_pages = None

    def plan(self, seqs, pages: list | None = None) -> CascadePlan | None:
        """`pages`: each sequence's page_array(), where the caller has them."""
        if len(seqs) < self.min_group_size:
            self._decode_key = self._decode_plan = None  # the next batch is planned in full
            return None
        decode = all(s.chunk_len == 1 and s.num_computed_tokens + 1 == len(s.token_ids) for s in seqs)
        key = tuple(s.seq_id for s in seqs) if decode else None
        if pages is None:
            pages = [s.page_array() for s in seqs]
        if key is not None and key == self._decode_key:
            plan = self._decode_plan and self._refresh_last_level(self._decode_plan, seqs, pages)
        else:
            plan = self._full_plan(seqs, pages)
            if len(plan.levels) < 2:
                plan = None
            self._decode_key, self._decode_plan = key, plan
            if key is not None and plan is not None:
                self._shared_pages = pages_per_row(plan.levels[:-1], plan.num_rows)
        if plan is None or not self.cost_model.worth_it(plan, self.page_size):
            return None
        return plan

    def _full_plan(self, seqs, pages: list) -> CascadePlan:
        q_lens = np.fromiter((s.chunk_len for s in seqs), dtype=np.int32, count=len(seqs))
        kv_lens = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int32, count=len(seqs)) + q_lens
        # The padded [batch, pages] table, a row at a time from the per-sequence page arrays (W3's first decode
        # step, 1,024 x 528 pages: 0.7-4.7 ms on the CPU machine; scattered with fancy indexing it took 7-21 ms).
        table = np.full((len(seqs), max(map(len, pages))), -1, dtype=np.int32)
        for row, p in zip(table, pages):
            row[:len(p)] = p
        return plan_cascade(table, kv_lens, q_lens, self.page_size, max_levels=self.max_levels,
                            min_group_size=self.min_group_size, min_shared_pages=self.min_shared_pages,
                            fixed_shared_prefix_len=self.fixed_len)

    def _refresh_last_level(self, plan: CascadePlan, seqs, pages: list) -> CascadePlan:
        """The cached shared levels with a per-request level rebuilt from the current pages."""
        page = self.page_size
        order = plan.order.tolist()
        ordered = [seqs[i] for i in order]
        # incl. this token (len(s.token_ids), not len(s): this runs for every row of every decode step)
        kv_lens = np.fromiter((len(s.token_ids) for s in ordered), dtype=np.int64, count=len(ordered))
        num_pages = (kv_lens + page - 1) // page
        rest = num_pages - self._shared_pages
        kv_indptr = np.zeros(len(ordered) + 1, np.int64)
        np.cumsum(rest, out=kv_indptr[1:])
        kv_indices = np.concatenate([pages[i][b:n] for i, b, n in
                                     zip(order, self._shared_pages.tolist(), num_pages.tolist())])
        i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))
        last = CascadeLevel(i32(np.arange(len(ordered) + 1)), i32(kv_indptr), i32(kv_indices),
                            i32(kv_lens - (num_pages - 1) * page), True)
        shared_pages = sum(int(lv.kv_indptr[-1]) for lv in plan.levels[:-1])
        return CascadePlan(plan.order, plan.levels[:-1] + [last], int(num_pages.sum()), shared_pages + int(rest.sum()),
                           plan.groups_per_level, plan.num_rows, plan.row_order)
