"""Pure-PyTorch paged attention: the CPU path and the reference the GPU backends are tested against.

Regular attention is the one-level case of the cascade math in nanovllm/cascade/reference.py
(every request its own group, causal), so both paths share one implementation. An fp8 cache
(attention/kv_quant.py) is written by `store_kv`, the CPU twin of the Triton store, and read by
the reference, which gathers each group's pages in the compute dtype (float32): k_scale then
scales the logits and v_scale the output, the same values as fp8 * scale."""
import torch

from nanovllm.attention.backend import AttentionBackend, StepBatch
from nanovllm.attention.kv_quant import is_fp8, quantize_fp8
from nanovllm.cascade.reference import cascade_attention, paged_attention_with_lse


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0):
    """Write each token's K/V into its slot; slot -1 marks padding and is skipped. An fp8 cache
    stores clamp(x / scale)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k, v = k[valid], v[valid]
    if is_fp8(k_cache):
        k, v = quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v


class TorchAttentionBackend(AttentionBackend):

    def plan(self, batch: StepBatch, piece: int | None = None):
        t = lambda a: torch.from_numpy(a).to(self.device)
        if piece is None:
            self._forget_pieces()
        self.batch = batch
        self.slot_mapping = batch.slot_mapping
        self.layout = (t(batch.qo_indptr), t(batch.kv_indptr), t(batch.kv_indices), t(batch.kv_last_page_len))

    def _piece_state(self):
        return self.batch, self.slot_mapping, self.layout

    def _set_piece_state(self, state):
        self.batch, self.slot_mapping, self.layout = state

    def store(self, k, v, k_cache, v_cache, k_scale=1.0, v_scale=1.0):
        store_kv(k, v, k_cache, v_cache, self.slot_mapping, k_scale, v_scale)

    def attend(self, q, k_cache, v_cache, k_scale=1.0, v_scale=1.0):
        sm_scale = self.sm_scale * k_scale
        if self.batch.cascade is not None:
            out = cascade_attention(q, k_cache, v_cache, self.batch.cascade, sm_scale)
        else:
            out, _ = paged_attention_with_lse(q, k_cache, v_cache, *self.layout, causal=True, sm_scale=sm_scale)
        return out if v_scale == 1.0 else out * v_scale
