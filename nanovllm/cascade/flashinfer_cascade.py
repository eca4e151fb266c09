"""Cascade attention on FlashInfer: one paged-prefill wrapper per level, merged through the LSE.

Same math and order as flashinfer.MultiLevelCascadeAttentionWrapper: the last (per-request, causal)
level runs first into the output, then each shared level runs non-causally and is merged into it
with merge_state_in_place (base-2 LSE). Configured alike (backend "auto"), the outputs are
bit-identical to the wrapper's; the engine uses backend "fa2", which is ~2x faster for one-token
decode queries on the H200 (see claude_docs/flashinfer_cascade_spec.md).

Unlike the wrapper, outputs and the per-level partial results live in preallocated buffers, the
number of levels used may vary per step (up to `num_levels`), and a CUDA-graph mode keeps every
index array in fixed device buffers with a fixed group count per level (plan() pads the layout:
padded groups have no rows or no pages, so they add nothing).

With `decode_last_level` a decode step's per-request level (one query row per group) runs on
FlashInfer's batch-decode kernel, which suits one-row queries better than the prefill kernel; the
result then differs from the wrapper's in rounding only (tests hold it to bf16 tolerance). With
`decode_last_kernel="triton"` that level runs on attention/triton_decode.py instead (same plan arrays,
the same base-2 LSE), which reads an fp8 cache 1.2-1.6x faster than FlashInfer's decode kernels.

In CUDA-graph mode `shared_backend="fa3-ragged"` runs the shared levels on FlashInfer's ragged FA3 over the
cache in place (cascade/ragged_level.py): the plan's shared levels must be page runs (the backend's graph key
picks this variant only then).

Shared levels may also run on our Triton kernel (`shared_backend="triton"`, nanovllm/cascade/
shared_kernel.py), ~1.5x faster than fa2 for many small groups; within bf16 tolerance as well; or on
fa3 with each group cut into pieces (`"fa3-split"`, nanovllm/cascade/split_level.py) for few groups
of many rows. Both write split partials into level_out / level_lse and merge them with one kernel.

An fp8 KV cache (`kv_dtype`) is planned as such on every level; run() passes the layer's k_scale /
v_scale to each level (FlashInfer folds k_scale into the softmax scale and multiplies the level's
output by v_scale; the Triton level does the same). Each level's output is scaled before the merge,
which is linear in the outputs, so the merged result is the attention over fp8 * scale.
"""
import flashinfer
import torch

from nanovllm.attention.triton_decode import TritonPagedDecode
from nanovllm.cascade.planner import CascadePlan
from nanovllm.cascade.ragged_level import RaggedSharedLevel, level_layout, pad_layout
from nanovllm.cascade.shared_kernel import TILES, TritonSharedLevel, partial_rows
from nanovllm.cascade.split_level import FlashInferSplitLevel, split_level_buffers
from nanovllm.utils.transfer import pinned, to_device

# Shared levels that write split partials into level_out / level_lse and merge them with one kernel.
PARTIAL_LEVELS = (TritonSharedLevel, FlashInferSplitLevel)


class FlashInferCascadeAttention:

    def __init__(self, workspace: torch.Tensor, num_levels: int, num_qo_heads: int, num_kv_heads: int,
                 head_dim: int, page_size: int, dtype: torch.dtype, max_rows: int, backend: str = "fa2",
                 use_cuda_graph: bool = False, max_pages: int = 0, sm_scale: float | None = None,
                 buffers: list | None = None, outputs: tuple | None = None, decode_last_level: bool = False,
                 shared_backend: str | None = None, shared_split_kv: bool = True,
                 side_stream: "torch.cuda.Stream | None" = None, shared_workspace: torch.Tensor | None = None,
                 kv_dtype: torch.dtype | None = None, decode_last_kernel: str = "flashinfer",
                 split_buffers: tuple | None = None, ragged_shared: bool = False):
        """buffers: per level (qo_indptr, kv_indptr, kv_indices, last_page_len) device views for CUDA-graph
        mode; outputs: (out, lse, level_out, level_lse) to use instead of allocating (callers that keep
        one wrapper per captured batch size share the largest); decode_last_kernel: the per-request level
        of decode steps on FlashInfer's batch-decode kernel or on attention/triton_decode.py ("triton");
        split_buffers: CUDA-graph mode with shared_backend "fa3-split", (query copies, [per shared level
        (qo_indptr, kv_indptr, kv_indices, last_page_len)]) sized by split_level_buffers; ragged_shared (eager,
        FA3 on a model-dtype cache): a shared level whose pages lie in increasing runs of the cache runs on
        FlashInfer's ragged prefill over the cache in place (ragged_level.py), else on its paged wrapper."""
        self.num_levels = num_levels
        self.shape = (num_qo_heads, num_kv_heads, head_dim, page_size)
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.sm_scale = sm_scale if sm_scale is not None else head_dim ** -0.5
        self.use_cuda_graph = use_cuda_graph
        self.shared_split_kv = shared_split_kv  # False: one CTA per group tile reads the whole prefix, no merge kernel
        # With a side stream the first shared level runs beside the per-request level (both read
        # memory; together they fill the GPU's tail waves), on a workspace of its own.
        self.side_stream = side_stream
        self.max_rows = max_rows
        dev = workspace.device
        if outputs is None:
            outputs = cascade_outputs(max_rows, num_qo_heads, head_dim, dtype, dev)
        self.out, self.lse, self.level_out, self.level_lse = outputs
        # Shared levels (many query rows per group) may use another backend than the per-request level.
        backends = [shared_backend or backend] * (num_levels - 1) + [backend]
        partials = (self.level_out, self.level_lse)  # the Triton and fa3-split levels' split partials
        assert backend not in TILES and backend not in ("fa3-split", "fa3-ragged"), \
            "the per-request level is causal: FlashInfer's"
        assert shared_backend != "fa3-ragged" or use_cuda_graph, "eager levels take ragged_shared instead"
        workspaces = [shared_workspace if shared_workspace is not None else workspace] * (num_levels - 1) + [workspace]
        self.ragged = None   # eager shared levels on the ragged prefill where their pages are runs (ragged_shared)
        if use_cuda_graph:
            # Fixed buffers per level; the group count of every level is fixed to max_rows.
            i32 = dict(dtype=torch.int32, device=dev)
            self.buffers = buffers or [(torch.zeros(max_rows + 1, **i32), torch.zeros(max_rows + 1, **i32),
                                        torch.zeros(max_pages + max_rows, **i32), torch.zeros(max_rows, **i32))
                                       for _ in range(num_levels)]
            if split_buffers is None and "fa3-split" in backends:
                split_buffers = split_level_buffers(max_rows, num_levels - 1, max_pages + max_rows, self.level_out, dev)
            q_copies, split_levels = split_buffers or (None, [None] * num_levels)
            ragged_bufs = lambda: tuple(torch.zeros(2 * max_rows + 1, **i32) for _ in range(2))  # noqa: E731
            self.wrappers = [
                TritonSharedLevel(max_rows, partials, True, kv_indptr_buf=b[1], kv_indices_buf=b[2], tile=TILES[be])
                if be in TILES
                else RaggedSharedLevel(ws, buffers=ragged_bufs())
                if be == "fa3-ragged"
                else FlashInferSplitLevel(ws, max_rows, partials, True, (q_copies,) + tuple(split_levels[i]))
                if be == "fa3-split"
                else flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                    ws, "NHD", use_cuda_graph=True, qo_indptr_buf=b[0], paged_kv_indptr_buf=b[1],
                    paged_kv_indices_buf=b[2], paged_kv_last_page_len_buf=b[3], backend=be)
                for i, (b, be, ws) in enumerate(zip(self.buffers, backends, workspaces))]
            if decode_last_level:
                # Graphs with the decode kernel are decode-only (plan() asserts it): the causal prefill
                # wrapper of the last level never runs (none is kept: one per captured size x level count x
                # shared kernel, each with its buffers).
                self.wrappers[-1] = None
        else:
            if ragged_shared:
                self.ragged = [RaggedSharedLevel(ws) for ws in workspaces[:-1]]
            self.wrappers = [TritonSharedLevel(max_rows, partials, tile=TILES[be]) if be in TILES
                             else FlashInferSplitLevel(ws, max_rows, partials) if be == "fa3-split"
                             else flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=be)
                             for be, ws in zip(backends, workspaces)]
        # The per-request level of decode steps on the batch-decode kernel (see module doc).
        self.decode_last = None
        if decode_last_level:
            graph_bufs = {}
            if use_cuda_graph:
                _, kv_indptr, kv_indices, last_len = self.buffers[-1]
                graph_bufs = dict(paged_kv_indptr_buffer=kv_indptr, paged_kv_indices_buffer=kv_indices,
                                  paged_kv_last_page_len_buffer=last_len)
            if decode_last_kernel == "triton":
                bufs = (kv_indptr, kv_indices, last_len) if use_cuda_graph else None
                self.decode_last = TritonPagedDecode(num_qo_heads, num_kv_heads, head_dim, page_size, dev,
                                                     buffers=bufs, sm_scale=self.sm_scale)
            else:
                self.decode_last = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_cuda_graph=use_cuda_graph, use_tensor_cores=False, **graph_bufs)
        self.active: list = []

    def flashinfer_wrappers(self) -> list:
        """(slot, FlashInfer wrapper) of every level that plans on a FlashInfer wrapper: slot i for shared
        level i (its paged, ragged or fa3-split wrapper), -1 for the per-request level (its prefill wrapper and
        its decode kernel's, never both in one step); the Triton levels have none. Graph mode's backend points
        the wrappers of one slot, across every graph, at one int workspace (attention/flashinfer_backend.py)."""
        pairs = [(i, getattr(w, "wrapper", w)) for i, w in enumerate(self.wrappers[:-1])]
        pairs += [(-1, self.wrappers[-1]), (-1, self.decode_last)]
        return [(slot, w) for slot, w in pairs if hasattr(w, "reset_workspace_buffer")]

    def plan(self, plan: CascadePlan, num_rows: int | None = None):
        """Plan every level once for the step (outside CUDA-graph capture). In CUDA-graph mode the
        layout is padded to max_rows query rows and the full level count."""
        levels = [(lv.qo_indptr, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len) for lv in plan.levels]
        if len(levels) > self.num_levels:
            raise ValueError(f"plan has {len(levels)} levels, this attention was built for {self.num_levels}")
        if self.use_cuda_graph:
            rows = plan.num_rows
            shared = [_pad_shared(*lv, rows, self.max_rows) for lv in levels[:-1]]
            shared += [_empty_level(rows, self.max_rows)] * (self.num_levels - len(levels))
            levels = shared + [_pad_last(*levels[-1], rows, self.max_rows)]
        # Shared levels use the first wrappers, the last level always the last one (it is causal).
        self.active = self.wrappers[:len(levels) - 1] + [self.wrappers[-1]]
        cut = [isinstance(w, (FlashInferSplitLevel, RaggedSharedLevel)) for w in self.active]
        if self.use_cuda_graph:
            # Page lists to the device first: FlashInfer copies host page lists into its graph
            # buffers with a blocking copy, which would stall the host until the device drains.
            dev = self.buffers[0][0].device
            levels = [lv if c else (lv[0], lv[1], to_device(lv[2], dev), lv[3]) for lv, c in zip(levels, cut)]
        else:  # eager: FlashInfer copies every array to the device, from pinned memory without a stall
            levels = [lv if c else tuple(pinned(a) for a in lv) for lv, c in zip(levels, cut)]
        hq, hkv, d, page = self.shape
        common = dict(sm_scale=self.sm_scale, q_data_type=self.dtype, kv_data_type=self.kv_dtype)
        for i, (wrapper, lv, c) in enumerate(zip(self.active[:-1], levels[:-1], cut)):
            if isinstance(wrapper, RaggedSharedLevel):   # graph mode: the level's runs, padded to the graph's rows
                layout = (level_layout(plan.levels[i], page) if i < len(plan.levels) - 1 else   # else an unused level
                          (_i32([0, plan.num_rows]), _i32([0, 0])))
                if layout is None:
                    raise ValueError("fa3-ragged graph planned for a shared level whose pages are not runs")
                wrapper.plan_layout(pad_layout(layout, self.max_rows), hq, hkv, d, **common)
                continue
            if c:   # host arrays: the level cuts them itself
                wrapper.plan(*lv, hq, hkv, d, page, **common)
                continue
            layout = level_layout(plan.levels[i], page) if self.ragged else None   # eager: the level's runs
            if layout is not None:
                self.ragged[i].plan_layout(layout, hq, hkv, d, **common)
                self.active[i] = self.ragged[i]
                continue
            wrapper.plan(*lv, hq, hkv, d, page, causal=False, disable_split_kv=not self.shared_split_kv, **common)
        qo_indptr, kv_indptr, kv_indices, last_len = levels[-1]
        one_row_each = qo_indptr.numel() - 1 == int(qo_indptr[-1])
        if self.decode_last is not None and one_row_each:
            if isinstance(self.decode_last, TritonPagedDecode):   # FlashInfer's page-table arrays, no shapes
                self.decode_last.plan(kv_indptr, kv_indices, last_len)
            else:
                self.decode_last.plan(kv_indptr, kv_indices, last_len, hq, hkv, d, page, **common)
            self.active[-1] = self.decode_last
        else:
            assert not self.use_cuda_graph or self.decode_last is None, "graph mode with decode_last_level is decode-only"
            self.active[-1].plan(*levels[-1], hq, hkv, d, page, causal=True, **common)

    def run(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], k_scale: float | None = None,
            v_scale: float | None = None) -> torch.Tensor:
        """k_scale / v_scale: an fp8 cache's per-tensor scales (None: a cache in the model dtype)."""
        n = q.shape[0]
        out, lse = self.out[:n], self.lse[:n]
        shared = self.active[:-1]
        scales = {} if k_scale is None and v_scale is None else dict(k_scale=k_scale, v_scale=v_scale)
        if self.side_stream is not None and shared:
            main = torch.cuda.current_stream()
            self.side_stream.wait_stream(main)
            with torch.cuda.stream(self.side_stream):
                self._run_shared(shared[0], q, kv_cache, scales)
            self.active[-1].run(q, kv_cache, out=out, lse=lse, return_lse=True, **scales)
            main.wait_stream(self.side_stream)
            self._merge_shared(shared[0], out, lse)
            shared = shared[1:]
        else:
            self.active[-1].run(q, kv_cache, out=out, lse=lse, return_lse=True, **scales)
        for wrapper in shared:
            self._run_shared(wrapper, q, kv_cache, scales)
            self._merge_shared(wrapper, out, lse)
        return out

    def _run_shared(self, wrapper, q, kv_cache, scales: dict):
        """A shared level's partial result: into level_out/level_lse (FlashInfer), or into the Triton or
        fa3-split level's split partials (which live in the same buffers)."""
        if isinstance(wrapper, PARTIAL_LEVELS):
            wrapper.run(q, kv_cache, **scales)
        else:
            n = q.shape[0]
            wrapper.run(q, kv_cache, out=self.level_out[:n], lse=self.level_lse[:n], return_lse=True, **scales)

    def _merge_shared(self, wrapper, out, lse):
        if isinstance(wrapper, PARTIAL_LEVELS):
            wrapper.merge_into(out, lse)
        else:
            n = out.shape[0]
            flashinfer.merge_state_in_place(out, lse, self.level_out[:n], self.level_lse[:n])


def cascade_outputs(max_rows: int, num_qo_heads: int, head_dim: int, dtype: torch.dtype, device) -> tuple:
    """(out, lse, level_out, level_lse) for up to max_rows query rows; the level buffers have extra
    rows for the Triton levels' split partials (shared_kernel.partial_rows)."""
    out = torch.empty(max_rows, num_qo_heads, head_dim, dtype=dtype, device=device)
    lse = torch.empty(max_rows, num_qo_heads, dtype=torch.float32, device=device)
    rows = partial_rows(max_rows)
    return (out, lse, torch.empty(rows, num_qo_heads, head_dim, dtype=dtype, device=device),
            torch.empty(rows, num_qo_heads, dtype=torch.float32, device=device))


def _i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _pad_shared(qo_indptr, kv_indptr, kv_indices, last_len, rows: int, max_rows: int):
    """A shared level padded to max_rows groups: padded query rows form one group with no pages,
    the remaining groups have no rows and no pages."""
    groups = qo_indptr.numel() - 1
    extra = max_rows - groups
    qo = torch.cat([qo_indptr, _i32([max_rows] * extra)]) if extra else qo_indptr
    kv = torch.cat([kv_indptr, kv_indptr[-1:].expand(extra)]) if extra else kv_indptr
    lpl = torch.cat([last_len, _i32([0] * extra)]) if extra else last_len
    assert rows <= max_rows and groups <= max_rows
    return qo, kv, kv_indices, lpl


def _empty_level(rows: int, max_rows: int):
    """An unused level in CUDA-graph mode: every row alone, no pages (attends to nothing)."""
    return (torch.arange(max_rows + 1, dtype=torch.int32), torch.zeros(max_rows + 1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32), torch.zeros(max_rows, dtype=torch.int32))


def _pad_last(qo_indptr, kv_indptr, kv_indices, last_len, rows: int, max_rows: int):
    """The per-request level padded to max_rows groups: each padded row reads one token of page 0
    (a real page, so the kernel sees ordinary work; those rows' outputs are discarded)."""
    groups = qo_indptr.numel() - 1
    extra = max_rows - groups
    if not extra:
        return qo_indptr, kv_indptr, kv_indices, last_len
    qo = torch.cat([qo_indptr, qo_indptr[-1] + torch.arange(1, extra + 1, dtype=torch.int32)])
    kv = torch.cat([kv_indptr, kv_indptr[-1] + torch.arange(1, extra + 1, dtype=torch.int32)])
    return qo, kv, torch.cat([kv_indices, _i32([0] * extra)]), torch.cat([last_len, _i32([1] * extra)])
