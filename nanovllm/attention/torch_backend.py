"""Pure-PyTorch paged attention: the CPU path and the reference the GPU backends are tested against.

Regular attention is the one-level case of the cascade math in nanovllm/cascade/reference.py
(every request its own group, causal), so both paths share one implementation."""
import torch

from nanovllm.attention.backend import AttentionBackend, StepBatch
from nanovllm.cascade.reference import cascade_attention, paged_attention_with_lse


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor):
    """Write each token's K/V into its slot; slot -1 marks padding and is skipped."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid]


class TorchAttentionBackend(AttentionBackend):

    def plan(self, batch: StepBatch):
        t = lambda a: torch.from_numpy(a).to(self.device)
        self.batch = batch
        self.slot_mapping = batch.slot_mapping
        self.layout = (t(batch.qo_indptr), t(batch.kv_indptr), t(batch.kv_indices), t(batch.kv_last_page_len))

    def store(self, k, v, k_cache, v_cache):
        store_kv(k, v, k_cache, v_cache, self.slot_mapping)

    def attend(self, q, k_cache, v_cache):
        if self.batch.cascade is not None:
            return cascade_attention(q, k_cache, v_cache, self.batch.cascade, self.sm_scale)
        out, _ = paged_attention_with_lse(q, k_cache, v_cache, *self.layout, causal=True, sm_scale=self.sm_scale)
        return out
