"""The attention backend interface: plan once per step, then run in every layer.

A step is described by `StepBatch`, the paged layout FlashInfer uses: the query rows of request b
are qo_indptr[b]:qo_indptr[b+1], its pages kv_indices[kv_indptr[b]:kv_indptr[b+1]], the last one
holding kv_last_page_len[b] tokens. Query tokens are the last q_len of the request's kv_len tokens
(causal, bottom-right aligned). New K/V are written to slot_mapping (page * page_size + offset,
-1 for padding) before attention reads the cache.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nanovllm.utils.transfer import pinned, to_device


@dataclass
class StepBatch:
    is_prefill: bool
    q_lens: np.ndarray            # int32 [batch]
    kv_lens: np.ndarray           # int32 [batch], this step's tokens included
    qo_indptr: np.ndarray         # int32 [batch + 1]
    kv_indptr: np.ndarray         # int32 [batch + 1]
    kv_indices: np.ndarray        # int32 [total pages]
    kv_last_page_len: np.ndarray  # int32 [batch]
    slot_mapping: torch.Tensor    # int64 [tokens] on the device
    page_size: int
    cascade: Any = None           # a CascadePlan when this step runs cascade attention


def split_batch(batch: StepBatch, r: int) -> tuple[StepBatch, StepBatch]:
    """Requests [0, r) and [r, n) of a step without cascade levels, each a StepBatch of its own (its indptrs from
    0, its rows' slots), for a step whose two pieces attend apart (models/tp_overlap.py)."""
    if batch.cascade is not None or not 0 < r < len(batch.q_lens):
        raise ValueError(f"cannot split a step of {len(batch.q_lens)} requests at {r} "
                         f"(cascade: {batch.cascade is not None})")
    rows, pages = int(batch.qo_indptr[r]), int(batch.kv_indptr[r])
    first = dataclasses.replace(
        batch, q_lens=batch.q_lens[:r], kv_lens=batch.kv_lens[:r], qo_indptr=batch.qo_indptr[:r + 1],
        kv_indptr=batch.kv_indptr[:r + 1], kv_indices=batch.kv_indices[:pages],
        kv_last_page_len=batch.kv_last_page_len[:r], slot_mapping=batch.slot_mapping[:rows])
    second = dataclasses.replace(
        batch, q_lens=batch.q_lens[r:], kv_lens=batch.kv_lens[r:], qo_indptr=batch.qo_indptr[r:] - rows,
        kv_indptr=batch.kv_indptr[r:] - pages, kv_indices=batch.kv_indices[pages:],
        kv_last_page_len=batch.kv_last_page_len[r:], slot_mapping=batch.slot_mapping[rows:])
    return first, second


def page_lists_on_device(kv_indptr, kv_indices, kv_last_page_len, device: torch.device,
                         buffers: tuple[torch.Tensor, ...] | None = None, who: str = "decode") -> list[torch.Tensor]:
    """One step's page-list arrays (numpy, host or device tensors) as int32 tensors on `device`: new ones, or
    copied into `buffers` (device indptr [bs + 1], indices, last [bs]: a CUDA graph's fixed buffers, whose
    row count must match) and those returned. Host-to-device copies are queued from pinned memory, never
    waited on."""
    arrays = [a.to(torch.int32) if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, dtype=np.int32))
              for a in (kv_indptr, kv_indices, kv_last_page_len)]
    if buffers is None:
        return [to_device(a, device) for a in arrays]
    rows = buffers[2].numel()
    if arrays[2].numel() != rows or arrays[1].numel() > buffers[1].numel():
        raise ValueError(f"{who} planned for {arrays[2].numel()} rows and {arrays[1].numel()} pages on buffers of "
                         f"{rows} rows and {buffers[1].numel()} pages")
    for buf, a in zip(buffers, arrays):   # one queued copy each, from pinned memory when on the host
        buf[:a.numel()].copy_(pinned(a), non_blocking=True)
    return list(buffers[:3])


class AttentionBackend:
    """Subclasses implement plan() (once per step, outside CUDA-graph capture, setting slot_mapping),
    store() and attend(). Layers call forward(), or on the GPU write K/V themselves (a fused kernel,
    nanovllm/layers/qk_norm_rope.py) to slot_mapping and call attend(). The cache is in the model
    dtype or fp8 (kv_dtype); k_scale / v_scale are the layer's per-tensor fp8 scales (python floats,
    1.0 for a cache in the model dtype), see attention/kv_quant.py."""

    slot_mapping: torch.Tensor | None = None  # this step's slot of every token (-1: padding)
    fused_qkv = False  # GPU layers may write K/V with the fused kernel, then call attend()
    piece_rows: int | None = None  # planned by plan_pieces: the first piece's rows (use_piece picks a piece)

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype, device: torch.device, kv_dtype: torch.dtype | None = None):
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.device = device
        self.sm_scale = head_dim ** -0.5

    def plan(self, batch: StepBatch, piece: int | None = None):
        """Plan a step (piece None; forgets planned pieces: _forget_pieces), or piece 0 or 1 of one (plan_pieces)."""
        raise NotImplementedError

    def plan_pieces(self, batch: StepBatch, r: int):
        """Plan a step without cascade levels as two pieces, requests [0, r) and [r, n) (split_batch), each
        attended on its own: use_piece(i) makes store()/attend() and slot_mapping piece i's. plan() undoes it."""
        pieces = []
        for i, sub in enumerate(split_batch(batch, r)):
            self.plan(sub, piece=i)
            pieces.append(self._piece_state())
        self._pieces, self.piece_rows = pieces, int(batch.qo_indptr[r])
        self.use_piece(0)

    def _forget_pieces(self):
        self._pieces, self.piece_rows = None, None

    def use_piece(self, i: int):
        self._set_piece_state(self._pieces[i])

    def _piece_state(self):
        """What plan() set, to come back to in use_piece."""
        raise NotImplementedError

    def _set_piece_state(self, state):
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """q [tokens, qo_heads, dim], k/v [tokens, kv_heads, dim]; caches [pages, page_size, kv_heads, dim]."""
        self.store(k, v, k_cache, v_cache, k_scale, v_scale)
        return self.attend(q, k_cache, v_cache, k_scale, v_scale)

    def store(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              k_scale: float = 1.0, v_scale: float = 1.0):
        """Write this step's K/V into their slots (quantized when the cache is fp8)."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float = 1.0,
               v_scale: float = 1.0) -> torch.Tensor:
        """Attention of this step's queries over the cache (this step's K/V already written)."""
        raise NotImplementedError


def make_backend(name: str, **kwargs) -> AttentionBackend:
    if name == "torch":
        from nanovllm.attention.torch_backend import TorchAttentionBackend
        return TorchAttentionBackend(**kwargs)
    if name == "flashinfer":
        from nanovllm.attention.flashinfer_backend import FlashInferAttentionBackend
        return FlashInferAttentionBackend(**kwargs)
    raise ValueError(f"unknown attention backend {name!r}")
