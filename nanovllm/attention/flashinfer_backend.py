"""FlashInfer paged attention: BatchPrefill for prefill steps, BatchDecode for decode steps, and
FlashInferCascadeAttention when the step runs cascade attention.

plan() runs once per step (FlashInfer's planning is host work and must stay outside CUDA-graph
capture); every layer's forward() then reuses it. FlashInfer stages the index arrays in a pinned host
buffer (its own, or for graphed wrappers one shared a level slot; see ModelRunner._plan_fence).
CUDA-graph decode uses one set of wrappers per captured batch size, built by graph_wrappers(bs),
whose index arrays live in fixed device buffers; plan_graph() pads a batch up to that size.

An fp8 KV cache (kv_cache_dtype fp8_e4m3) is planned with kv_data_type float8_e4m3fn and queries in
the model dtype; run() gets the layer's k_scale (FlashInfer folds it into sm_scale) and v_scale (it
scales the output; a float 1.0 costs nothing). FlashInfer's FA3 kernels read fp8 KV only with fp8
queries, so FA3 choices become FA2 (prefill "auto" already picks FA2 for that dtype pair).
"""
import logging
import os

import flashinfer
import numpy as np
import torch

from nanovllm.attention.backend import AttentionBackend, StepBatch
from nanovllm.attention.kv_quant import is_fp8
from nanovllm.attention.triton_decode import TritonPagedDecode
from nanovllm.attention.triton_decode import supports as triton_decode_supports
from nanovllm.attention.triton_kv import store_kv_triton
from nanovllm.attention.xqa_decode import XqaPagedDecode
from nanovllm.attention.xqa_decode import usable as xqa_usable
from nanovllm.cascade.cost_model import (NO_SPLIT_KV_ROWS, SHARED_BACKENDS, fp8_capable,
                                         reachable_shared_backends, shared_level_backend)
from nanovllm.cascade.flashinfer_cascade import FlashInferCascadeAttention, cascade_outputs
from nanovllm.cascade.ragged_level import shared_levels_are_runs
from nanovllm.cascade.split_level import INT_WORKSPACE_BYTES, split_level_buffers
from nanovllm.utils.transfer import pinned, to_device

logger = logging.getLogger("nanovllm")
WORKSPACE_BYTES = 256 << 20
SIDE_WORKSPACE_BYTES = 128 << 20
# Graphed regular decode of a model-dtype cache at this many rows or fewer runs on the Triton kernel
# (attention/triton_decode.py) under decode_attention_kernel=auto: one layer on one H200 (session 16 call b,
# `python scripts/bench_kernels.py --only decode-kernels-small`, us, FlashInfer tensor-core decode / Triton):
# 1 x 600 14 / 10, 1 x 4000 16 / 13, 8 x 600 17 / 14, 8 x 4000 45 / 46, 16 x 1500 38 / 36; at 64 x 2048
# FlashInfer is ahead (137 / 150, session 15's table). It also skips FlashInfer's host-side plan (cProfile at
# batch 1, its overhead included: ~0.2 ms a step).
# On by default (NANOVLLM_TRITON_SMALL_ROWS=0 turns it off; decode_attention_kernel=flashinfer too). Session 16
# left it opt-in on three greedy GPU tests of tiny random models that failed with it on; session 17 (call k,
# the scratch script in performance.md's "Session 17"): over the decode steps where two engines' greedy paths
# still agree (same inputs), the logits with it on differ from FlashInfer's by at most 0.0215 (0.0078 = one bf16
# ulp at these logits in 29 of 32 requests; their range is ~2.2), runs are identical run to run, and the paths
# that part do so at near-ties. tests/test_decode_gemm.py checks exactly that; the three tests run pinned to
# FlashInfer's decode and cuBLAS (their identical-output floors were measured on those kernels' paths).
def _small_rows() -> int:
    value = os.environ.get("NANOVLLM_TRITON_SMALL_ROWS", "16")
    if not value.isdigit():
        raise ValueError(f"NANOVLLM_TRITON_SMALL_ROWS={value!r}: a row count (0 turns it off)")
    return int(value)


TRITON_SMALL_ROWS = _small_rows()
# Cascade prefill steps read a shared level whose pages lie in increasing runs of the cache through FlashInfer's
# ragged FA3 prefill, in place (cascade/ragged_level.py: 1.16-1.23x the paged FA3 kernel on W2/W3/W5's prefill
# shapes); Hopper, a model-dtype cache and the auto/fa3 prefill backend only. NANOVLLM_RAGGED_PREFILL=0 turns it off.
RAGGED_PREFILL = os.environ.get("NANOVLLM_RAGGED_PREFILL", "1") != "0"
# Decode steps whose shared levels the cost model gives fa3 replay a graph with the ragged FA3 level where their
# pages are runs (cascade/ragged_level.py: 1.18-1.22x the paged level's kernel on W3-like shapes, graph replays);
# same conditions. NANOVLLM_RAGGED_DECODE=0 turns it off (no such graphs are captured then).
RAGGED_DECODE = os.environ.get("NANOVLLM_RAGGED_DECODE", "1") != "0"


def share_int_workspace(wrapper, device_ints: torch.Tensor, host_ints: torch.Tensor):
    """Point a FlashInfer wrapper at a shared int workspace and its pinned host staging buffer (its own two
    8 MB buffers are freed). reset_workspace_buffer is FlashInfer's API for the device buffer; it pins a fresh
    host buffer of its own, which the one assignment of a private attribute replaces."""
    # Before any plan or capture: a captured graph reads the buffer it was captured with.
    assert getattr(wrapper, "_plan_info", None) is None, "share a wrapper's int workspace before it plans"
    wrapper.reset_workspace_buffer(wrapper._float_workspace_buffer, device_ints)
    wrapper._pin_memory_int_workspace_buffer = host_ints


class FlashInferAttentionBackend(AttentionBackend):
    fused_qkv = True  # q/k norm, rotary and the KV write in one Triton kernel (layers/qk_norm_rope.py)

    # Choices measured on the H200 (claude_docs/performance.md, scripts/bench_kernels.py): fa3 ("auto")
    # prefills long prompts 1.4-1.7x faster than fa2; fa2 runs the one-row queries of cascade decode
    # ~2x faster than fa3. Decode with tensor cores: alone, the kernel without them was 7-20% faster at
    # W1-like shapes, but end to end W1 and W2 ran 6% and 25% faster with them. Decode cascades read
    # each shared prefix without split-kv: 2-3% faster on fa2, the same on fa3 (`--only levels`).
    def __init__(self, *, prefill_backend: str = "auto", cascade_backend: str = "fa2", cascade_levels: int = 3,
                 max_rows: int = 16384, decode_tensor_cores: bool = True, shared_backend: str = "auto",
                 decode_kernel: str = "auto", max_model_len: int = 4096, prefill_pieces: bool = False, **kwargs):
        super().__init__(**kwargs)
        # Regular decode of an fp8 cache on xqa (attention/xqa_decode.py: ~3.3 TB/s of fp8 pages) where it
        # builds, else on the Triton kernel (attention/triton_decode.py, ~2 TB/s): FlashInfer's decode
        # kernels read fp8 pages no faster than bf16 ones. A bf16 cache stays on FlashInfer's decode (with
        # graphed batches of <= NANOVLLM_TRITON_SMALL_ROWS (16) rows on the Triton kernel, under auto).
        # Cascade's per-request level needs a log-sum-exp (xqa has none): FlashInfer's decode, or the Triton
        # kernel when asked ("triton").
        self.regular_decode = self._regular_decode_kernel(decode_kernel)
        self.max_pages = -(-max_model_len // self.page_size)
        self.decode_last_kernel = "triton" if decode_kernel == "triton" else "flashinfer"
        self.triton_small = (decode_kernel == "auto" and self.regular_decode == "flashinfer"
                             and triton_decode_supports(self.num_qo_heads, self.num_kv_heads, self.head_dim,
                                                        self.page_size) is None)
        self.xqa_work = XqaPagedDecode.make_work(self.device) if self.regular_decode == "xqa" else None
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.cascade_backend = cascade_backend
        self.cascade_levels = cascade_levels
        self.decode_tensor_cores = decode_tensor_cores
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=prefill_backend)
        # A prefill step's second piece (plan_pieces, tensor parallelism's pieces): its own plan and workspace.
        self.prefill_second = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            torch.zeros(SIDE_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device), "NHD",
            backend=prefill_backend) if prefill_pieces else None
        if self.regular_decode == "xqa":
            self.decode = XqaPagedDecode(self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
                                         self.max_pages, self.device, self.xqa_work, sm_scale=self.sm_scale)
        elif self.regular_decode == "triton":
            self.decode = TritonPagedDecode(self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
                                            self.device, sm_scale=self.sm_scale)
        else:
            self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                        use_tensor_cores=decode_tensor_cores)
        # Shared levels of cascade decode: chosen per step (auto) or one kernel for all.
        self.shared_backends = SHARED_BACKENDS if shared_backend == "auto" else (shared_backend,)
        if is_fp8(self.kv_dtype):
            assert shared_backend not in ("fa3", "fa3-split"), "Config refuses fa3 shared levels with an fp8 KV cache"
            self.shared_backends = tuple(dict.fromkeys(fp8_capable(b, True) for b in self.shared_backends))
        # Cascade for eager decode steps (shared levels as in graphs, the decode kernel for the
        # per-request level) and for prefill steps (many query rows: the prefill backend), sharing
        # their output buffers.
        outputs = cascade_outputs(max_rows, self.num_qo_heads, self.head_dim, self.dtype, self.device)
        ragged_able = (not is_fp8(self.kv_dtype) and self.device.type == "cuda"
                       and torch.cuda.get_device_capability(self.device)[0] == 9)
        ragged = RAGGED_PREFILL and prefill_backend in ("auto", "fa3") and ragged_able
        self.ragged_decode = RAGGED_DECODE and ragged_able   # eager fa3 shared levels too
        self.cascade = {shared: FlashInferCascadeAttention(
            self.workspace, cascade_levels, self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
            self.dtype, max_rows, backend=cascade_backend, sm_scale=self.sm_scale, decode_last_level=True,
            kv_dtype=self.kv_dtype, decode_last_kernel=self.decode_last_kernel,
            shared_backend=shared, shared_split_kv=False, outputs=outputs,
            ragged_shared=self.ragged_decode and shared == "fa3") for shared in self.shared_backends}
        self.cascade_prefill = FlashInferCascadeAttention(
            self.workspace, cascade_levels, self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
            self.dtype, max_rows, backend=prefill_backend, sm_scale=self.sm_scale, outputs=outputs,
            kv_dtype=self.kv_dtype, ragged_shared=ragged)
        self.graph = {}  # batch size -> (decode wrapper, {(levels, shared backend): cascade attention})
        self.active = None
        self.slot_mapping = None

    def _regular_decode_kernel(self, asked: str) -> str:
        """flashinfer, triton or xqa for regular decode steps: `asked`, or for auto the fastest that serves
        this cache (xqa, then Triton, for fp8; FlashInfer for the model dtype)."""
        shape = (self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size)
        if asked == "xqa":
            why = xqa_usable(self.dtype, *shape, self.kv_dtype)
            if why:
                raise ValueError(f"decode_attention_kernel xqa: {why}")
            return "xqa"
        if asked != "auto":
            return asked
        if is_fp8(self.kv_dtype):
            why = xqa_usable(self.dtype, *shape)
            if why is None:
                return "xqa"
            logger.info("fp8 decode: not on xqa (%s)", why)
            if triton_decode_supports(*shape) is None:
                return "triton"
        return "flashinfer"

    def _common(self):
        return dict(sm_scale=self.sm_scale, q_data_type=self.dtype, kv_data_type=self.kv_dtype)

    def plan(self, batch: StepBatch, piece: int | None = None):
        self.slot_mapping = batch.slot_mapping
        if piece is None:
            self._forget_pieces()
        elif piece not in (0, 1) or not batch.is_prefill or batch.cascade is not None or self.prefill_second is None:
            raise ValueError("only pieces 0 and 1 of prefill steps without cascade levels are planned, and only by "
                             "a backend made with prefill_pieces=True")
        if batch.cascade is not None:
            self.active = self.cascade_prefill if batch.is_prefill else self.cascade[self.shared_kernel(batch.cascade)]
            self.active.plan(batch.cascade)
            return
        t = pinned  # FlashInfer's plan copies these to the device
        hq, hkv, d, page = self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size
        if batch.is_prefill:
            prefill = self.prefill_second if piece == 1 else self.prefill
            prefill.plan(t(batch.qo_indptr), t(batch.kv_indptr), t(batch.kv_indices), t(batch.kv_last_page_len),
                         hq, hkv, d, page, causal=True, **self._common())
            self.active = prefill
        elif not isinstance(self.decode, flashinfer.BatchDecodeWithPagedKVCacheWrapper):   # xqa, Triton (as plan_graph)
            self.decode.plan(batch.kv_indptr, batch.kv_indices, batch.kv_last_page_len)
            self.active = self.decode
        else:
            self.decode.plan(t(batch.kv_indptr), t(batch.kv_indices), t(batch.kv_last_page_len),
                             hq, hkv, d, page, disable_split_kv=len(batch.kv_lens) >= NO_SPLIT_KV_ROWS,
                             **self._common())
            self.active = self.decode

    def _piece_state(self):
        return self.active, self.slot_mapping

    def _set_piece_state(self, state):
        self.active, self.slot_mapping = state

    def store(self, k, v, k_cache, v_cache, k_scale=1.0, v_scale=1.0):
        store_kv_triton(k, v, k_cache, v_cache, self.slot_mapping, k_scale, v_scale)

    def attend(self, q, k_cache, v_cache, k_scale=1.0, v_scale=1.0):
        if not is_fp8(k_cache):  # scales are 1.0 there: the model-dtype path stays as it was
            return self.active.run(q, (k_cache, v_cache))
        return self.active.run(q, (k_cache, v_cache), k_scale=k_scale, v_scale=v_scale)

    # ---- CUDA graphs (decode) ------------------------------------------------------------------
    def prepare_graphs(self, max_bs: int, max_indices: int, with_cascade: bool):
        """Device buffers shared by the wrappers of every captured batch size (one graph runs per
        step), allocated before the KV cache is sized so that they are accounted for."""
        i32 = dict(dtype=torch.int32, device=self.device)
        self.graph_decode_bufs = (torch.zeros(max_bs + 1, **i32), torch.zeros(max_indices + max_bs, **i32),
                                  torch.zeros(max_bs, **i32))
        if self.regular_decode == "xqa":  # its dense page table and sequence lengths
            self.graph_decode_bufs += (torch.zeros(max_bs, self.max_pages, **i32), torch.zeros(max_bs, **i32))
        # One FlashInfer int workspace (8 MB on the device, 8 MB pinned on the host) per level slot, shared by every
        # graph's wrappers of that slot instead of one a wrapper (W2/W3's engine of 1,024 rows: ~630 wrappers,
        # 5.3 GB each side; 2,896 more KV pages on one H200, session 20).
        # One graph replays a step and ModelRunner._plan_fence orders a step's plan after the last one's copies,
        # so wrappers of one slot never hold plans at once; a graph's own levels have slots of their own.
        slots = [-1] + (list(range(self.cascade_levels - 1)) if with_cascade else [])
        self.graph_int_workspaces = {slot: (torch.zeros(INT_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device),
                                            torch.zeros(INT_WORKSPACE_BYTES, dtype=torch.uint8, pin_memory=True))
                                     for slot in slots}
        self.graph_cascade_bufs = self.graph_cascade_outputs = self.graph_split_bufs = None
        self.side_stream = self.side_workspace = None
        if with_cascade:
            # Graphed cascade steps run the first shared level on a side stream, beside the per-request
            # level (`--only levels`: 2-4% faster), with a workspace of its own (NANOVLLM_CASCADE_SIDE_STREAM=0:
            # one stream, for A/B runs).
            if os.environ.get("NANOVLLM_CASCADE_SIDE_STREAM", "1") != "0":
                self.side_stream = torch.cuda.Stream(self.device)
            self.side_workspace = torch.zeros(SIDE_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            self.graph_cascade_bufs = [(torch.zeros(max_bs + 1, **i32), torch.zeros(max_bs + 1, **i32),
                                        torch.zeros(max_indices + max_bs, **i32), torch.zeros(max_bs, **i32))
                                       for _ in range(self.cascade_levels)]
            self.graph_cascade_outputs = cascade_outputs(max_bs, self.num_qo_heads, self.head_dim, self.dtype,
                                                         self.device)
            if "fa3-split" in self.shared_backends:
                self.graph_split_bufs = split_level_buffers(max_bs, self.cascade_levels - 1, max_indices + max_bs,
                                                            self.graph_cascade_outputs[2], self.device)

    def graph_wrappers(self, bs: int):
        """Wrappers for one captured batch size, over views of the shared buffers."""
        indptr, indices, last = self.graph_decode_bufs[:3]
        if self.regular_decode == "xqa":
            table, seq_lens = self.graph_decode_bufs[3:]
            decode = XqaPagedDecode(self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
                                    self.max_pages, self.device, self.xqa_work, sm_scale=self.sm_scale,
                                    buffers=(indptr[:bs + 1], indices, last[:bs], table[:bs], seq_lens[:bs]))
        elif self.regular_decode == "triton" or (self.triton_small and bs <= TRITON_SMALL_ROWS):
            decode = TritonPagedDecode(self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size, self.device,
                                       buffers=(indptr[:bs + 1], indices, last[:bs]), sm_scale=self.sm_scale)
        else:
            decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.decode_tensor_cores,
                paged_kv_indptr_buffer=indptr[:bs + 1], paged_kv_indices_buffer=indices,
                paged_kv_last_page_len_buffer=last[:bs])
        # (level count, shared-level backend) -> attention: a step with fewer levels launches no
        # empty ones, and its shared levels run on the backend measured faster for their shape.
        cascade = {}
        if self.graph_cascade_bufs is not None:
            bufs = [(qo[:bs + 1], kv[:bs + 1], idx, lpl[:bs]) for qo, kv, idx, lpl in self.graph_cascade_bufs]
            for levels in range(2, self.cascade_levels + 1):
                for shared in self.graph_shared_backends(bs):
                    cascade[levels, shared] = FlashInferCascadeAttention(
                        self.workspace, levels, self.num_qo_heads, self.num_kv_heads, self.head_dim,
                        self.page_size, self.dtype, bs, backend=self.cascade_backend, use_cuda_graph=True,
                        sm_scale=self.sm_scale, buffers=bufs[:levels - 1] + bufs[-1:],
                        outputs=self.graph_cascade_outputs, decode_last_level=True, shared_backend=shared,
                        shared_split_kv=False, side_stream=self.side_stream, shared_workspace=self.side_workspace,
                        kv_dtype=self.kv_dtype, decode_last_kernel=self.decode_last_kernel,
                        split_buffers=self.graph_split_bufs)
        for slot, wrapper in [(-1, decode)] + [pair for att in cascade.values() for pair in att.flashinfer_wrappers()]:
            if hasattr(wrapper, "reset_workspace_buffer"):
                share_int_workspace(wrapper, *self.graph_int_workspaces[slot])
        self.graph[bs] = (decode, cascade)

    def graph_shared_backends(self, bs: int) -> tuple:
        """The shared-level kernels the cascade graphs of size bs need: those the choice can reach with
        bs rows (fewer graphs and FlashInfer wrappers at small sizes), and fa3's ragged variant beside fa3."""
        backends = reachable_shared_backends(self.shared_backends, bs)
        return backends + ("fa3-ragged",) if self.ragged_decode and "fa3" in backends else backends

    def graph_key(self, plan) -> tuple:
        """Which captured graph runs a decode step: regular, or cascade by its level count and
        shared-level backend (fa3's ragged variant where every shared level's pages are runs)."""
        if plan is None:
            return ("regular",)
        forced = getattr(plan, "shared_backend", None)   # CUDA-graph capture names the variant
        kernel = forced or self.shared_kernel(plan)
        if kernel == "fa3" and not forced and self.ragged_decode and shared_levels_are_runs(plan, self.page_size):
            kernel = "fa3-ragged"
        return ("cascade", len(plan.levels), kernel)

    def shared_kernel(self, plan) -> str:
        """The kernel of a cascade decode step's shared levels: the configured one, or the cost
        model's choice for the plan's group sizes and the cache dtype."""
        if len(self.shared_backends) == 1:
            return self.shared_backends[0]
        return shared_level_backend(plan, self.num_qo_heads, self.num_kv_heads, is_fp8(self.kv_dtype))

    def plan_graph(self, batch: StepBatch, bs: int, slot_mapping: torch.Tensor, kind: tuple | None = None):
        """Plan a decode batch of n <= bs requests on the wrappers captured for bs (of the graph `kind`, a
        graph_key; default: this batch's). Padded requests read one token of page 0 and write nothing (their
        slot is -1 in the fixed slot buffer)."""
        decode, cascade = self.graph[bs]
        self._forget_pieces()
        self.slot_mapping = slot_mapping
        if batch.cascade is not None:
            self.active = cascade[(kind or self.graph_key(batch.cascade))[1:]]
            self.active.plan(batch.cascade)
            return
        n = len(batch.kv_lens)
        pad = bs - n
        indptr = np.concatenate([batch.kv_indptr, batch.kv_indptr[-1] + np.arange(1, pad + 1, dtype=np.int32)])
        indices = np.concatenate([batch.kv_indices, np.zeros(pad, np.int32)])
        last = np.concatenate([batch.kv_last_page_len, np.ones(pad, np.int32)])
        if not isinstance(decode, flashinfer.BatchDecodeWithPagedKVCacheWrapper):
            decode.plan(indptr, indices, last)  # copies into its fixed buffers, queued on the stream
            self.active = decode
            return
        t = torch.from_numpy
        # The page list goes to the device first: FlashInfer copies a host page list into its graph
        # buffer with a blocking copy, which would stall the host until the device drains (no overlap).
        decode.plan(t(indptr), to_device(indices, self.device), t(last), self.num_qo_heads,
                    self.num_kv_heads, self.head_dim, self.page_size, disable_split_kv=bs >= NO_SPLIT_KV_ROWS,
                    **self._common())
        self.active = decode

