"""Runs the model for one scheduled step: builds the inputs, plans attention once, samples."""
import numpy as np
import torch

from nanovllm.attention import StepBatch, make_backend
from nanovllm.config import Config
from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.layers.sampler import Sampler, seeded_row_seed
from nanovllm.models.qwen3 import model_class
from nanovllm.utils.context import reset_context, set_context
from nanovllm.utils.loader import load_model
from nanovllm.utils.transfer import to_device

CPU_MAX_KV_BLOCKS = 16384  # the CPU path is for tests and small runs: keep the block manager small


class ModelRunner:

    def __init__(self, config: Config):
        self.config = config
        hf = config.hf_config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.kvcache_block_size
        torch.manual_seed(config.seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(hf)(hf)
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(self.model, config.model)
        self.model.eval()
        self.sampler = Sampler()
        self.seed_rng = np.random.default_rng(config.seed)  # Philox seeds of unseeded rows (GPU sampler)
        self.num_layers = hf.num_hidden_layers
        self.num_kv_heads = hf.num_key_value_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        extra = {}
        if config.attention_backend == "flashinfer":
            extra = dict(cascade_levels=config.cascade_max_levels, max_rows=config.max_num_batched_tokens,
                         shared_backend=config.cascade_shared_backend)
        self.backend = make_backend(
            config.attention_backend, num_qo_heads=hf.num_attention_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, page_size=self.block_size, dtype=self.dtype, device=self.device, **extra)
        self.cascade = None
        if config.enable_cascade_attention:
            from nanovllm.cascade.policy import CascadePolicy
            self.cascade = CascadePolicy(config)
        self.plan_copied = None
        self.host_slot = 0
        if self.device.type == "cuda":
            # One sampled token per sequence of a step, for the two steps that can be in flight.
            self.host_tokens = [torch.zeros(config.max_num_seqs, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self.graphs: dict = {}
        if not config.enforce_eager:
            # Index buffers for every page list a batch can hold (with prefix sharing, more than the pages that exist).
            max_indices = config.max_num_seqs * -(-config.max_model_len // self.block_size)
            self.backend.prepare_graphs(config.max_num_seqs, max_indices, self.cascade is not None)
        self.num_kvcache_blocks = self._kv_cache_blocks()
        self._allocate_kv_cache()
        if not config.enforce_eager:
            self.capture_cuda_graphs()

    # ---- memory -------------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def _kv_cache_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kvcache_blocks > 0:
            return cfg.num_kvcache_blocks
        if self.device.type == "cpu":
            budget = int(cfg.cpu_kvcache_gb * 2**30) // self._block_bytes()
            needed = cfg.max_num_seqs * -(-cfg.max_model_len // self.block_size)
            return max(1, min(budget, needed, CPU_MAX_KV_BLOCKS))
        return self._gpu_kv_cache_blocks()

    def _gpu_kv_cache_blocks(self) -> int:
        """What is left of gpu_memory_utilization after weights, the activations of the largest
        prefill and of the largest decode step (sampler included), and the CUDA graphs' pool."""
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.warmup(decode=False)
        prefill_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        self.warmup(decode=True)
        decode_peak = torch.cuda.max_memory_allocated() - base
        # A graph's private pool keeps one decode step's activations for good, beside the allocator.
        graph_pool = 0 if self.config.enforce_eager else decode_peak
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used = total - free
        available = int(total * self.config.gpu_memory_utilization) - used - max(prefill_peak, decode_peak) - graph_pool
        blocks = available // self._block_bytes()
        if blocks < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache at gpu_memory_utilization="
                               f"{self.config.gpu_memory_utilization}")
        return int(blocks)

    def warmup(self, decode: bool = False):
        """The largest prefill (token budget) or decode step (max_num_seqs rows, sampled with top-k/top-p),
        without a KV cache, to measure activation memory."""
        cfg = self.config
        if decode:
            num_seqs = seq_len = cfg.max_num_seqs
            pos = torch.zeros(num_seqs, dtype=torch.long, device=self.device)
            rows = torch.arange(num_seqs, device=self.device)
        else:
            seq_len = min(cfg.max_num_batched_tokens, cfg.max_model_len)
            num_seqs = max(1, min(cfg.max_num_batched_tokens // seq_len, cfg.max_num_seqs))
            pos = torch.arange(seq_len, device=self.device).repeat(num_seqs)
            rows = torch.arange(seq_len - 1, num_seqs * seq_len, seq_len, device=self.device)
        ids = torch.zeros(len(pos), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            # Attention is stood in for by a pass-through (no cache exists yet): dense layers, logits
            # and the sampler dominate the activations.
            set_context(is_prefill=not decode, attn=_PassThroughAttention(), logits_indices=rows)
            logits = self.model.compute_logits(self.model(ids, pos))
            n = len(rows)
            self.sampler(logits, torch.ones(n, device=self.device), torch.full((n,), 50, device=self.device),
                         torch.full((n,), 0.9, device=self.device))
            reset_context()
        del logits
        torch.cuda.synchronize()

    def _allocate_kv_cache(self):
        shape = (2, self.num_layers, self.num_kvcache_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        # Zeros, not empty: padded reads of unused slots must never see NaN.
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        attn_layers = [m for m in self.model.modules() if type(m).__name__ == "Attention"]
        for i, layer in enumerate(attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    # ---- one step ---------------------------------------------------------------------------
    def build_batch(self, seqs: list[Sequence], is_prefill: bool,
                    prev: "LaunchedStep | None" = None) -> tuple[StepBatch, torch.Tensor, torch.Tensor]:
        """Host arrays of a step and its device inputs. A decode input that is still a PLACEHOLDER
        (sampled by `prev`, not yet collected) is gathered on the GPU from prev's sampled tokens."""
        bs = self.block_size
        q_lens = np.fromiter((s.chunk_len for s in seqs), dtype=np.int32, count=len(seqs))
        starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int32, count=len(seqs))
        kv_lens = starts + q_lens
        num_pages = (kv_lens + bs - 1) // bs
        qo_indptr = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=qo_indptr[1:])
        kv_indptr = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(num_pages, out=kv_indptr[1:])
        if is_prefill:  # a prompt chunk may stop short of its allocated pages
            tables = [s.page_array()[:n] for s, n in zip(seqs, num_pages.tolist())]
        else:           # decode: every page of every sequence
            tables = [s.page_array() for s in seqs]
        kv_indices = np.concatenate(tables) if tables else np.zeros(0, np.int32)
        gather = None  # rows whose input token is still on the device (prev's sample), else -1
        if is_prefill:
            input_ids = [t for s in seqs for t in s.token_ids[s.num_computed_tokens:s.num_computed_tokens + s.chunk_len]]
            # position of every query token, and the page that holds it
            seq_of_token = np.repeat(np.arange(len(seqs)), q_lens)
            positions = np.arange(qo_indptr[-1], dtype=np.int64) - qo_indptr[seq_of_token] + starts[seq_of_token]
            pages = kv_indices[kv_indptr[seq_of_token] + positions // bs]
        else:
            input_ids = [s.last_token for s in seqs]
            positions = (kv_lens - 1).astype(np.int64)
            if prev is not None and PLACEHOLDER in input_ids:
                gather = [prev.rows.get(s.seq_id, -1) if t == PLACEHOLDER else -1 for s, t in zip(seqs, input_ids)]
            pages = kv_indices[kv_indptr[1:] - 1]
        slot_mapping = pages.astype(np.int64) * bs + positions % bs
        last_page_len = kv_lens - (num_pages - 1) * bs
        dev = self.device
        batch = StepBatch(is_prefill, q_lens, kv_lens, qo_indptr, kv_indptr, kv_indices, last_page_len.astype(np.int32),
                          to_device(slot_mapping, dev), bs)
        ids = to_device(torch.tensor(input_ids, dtype=torch.long), dev)
        if gather is not None:
            src = to_device(torch.tensor(gather, dtype=torch.long), dev)
            ids = torch.where(src >= 0, prev.tokens[src.clamp(min=0)], ids)
        positions = to_device(positions, dev)
        return batch, ids, positions

    def _sampling_inputs(self, seqs: list[Sequence]):
        dev = self.device
        params = [s.sampling_params for s in seqs]
        temperatures = to_device(torch.tensor([p.temperature for p in params], dtype=torch.float32), dev)
        top_ks = top_ps = None
        if any(p.top_k > 0 for p in params):
            top_ks = to_device(torch.tensor([p.top_k for p in params], dtype=torch.long), dev)
        if any(p.top_p < 1 for p in params):
            top_ps = to_device(torch.tensor([p.top_p for p in params], dtype=torch.float32), dev)
        all_greedy = all(p.temperature == 0 for p in params)
        if dev.type == "cuda" and top_ks is None and top_ps is None and not all_greedy:
            # The fused GPU sampler: Philox seeds per row, a seeded request's from its seed and token index.
            seeds = self.seed_rng.integers(0, 1 << 62, len(seqs))
            for row, s in enumerate(seqs):
                if s.sampling_params.seed is not None:
                    seeds[row] = seeded_row_seed(s.sampling_params.seed, s.num_completion_tokens)
            return temperatures, None, None, None, False, to_device(seeds, dev)
        generators = {}
        for row, s in enumerate(seqs):
            # Only rows that sample draw from their generator: a prompt chunk short of the end
            # must not, or a seeded output would depend on how its prompt was chunked.
            samples = s.num_computed_tokens + s.chunk_len == len(s)
            if samples and s.sampling_params.seed is not None and s.sampling_params.temperature > 0:
                if s.generator is None:
                    s.generator = torch.Generator(device=dev).manual_seed(s.sampling_params.seed)
                generators[row] = s.generator
        return temperatures, top_ks, top_ps, generators, all_greedy, None

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool, prev: "LaunchedStep | None" = None) -> "LaunchedStep":
        """Queue one step on the device and return at once; collect() waits for its tokens.
        The sequences may come back reordered (cascade groups requests that share pages)."""
        plan = self.cascade.plan(seqs) if self.cascade is not None else None
        if plan is not None:
            seqs = [seqs[i] for i in plan.order.tolist()]
        batch, input_ids, positions = self.build_batch(seqs, is_prefill, prev)
        batch.cascade = plan
        logits = self.forward(batch, input_ids, positions)
        tokens = self.sampler(logits, *self._sampling_inputs(seqs))
        step = LaunchedStep(seqs, tokens, {s.seq_id: i for i, s in enumerate(seqs)}, plan is not None)
        if self.device.type == "cuda":
            # Double-buffered pinned copies: the step collected last may still be read while this one lands.
            self.host_slot ^= 1
            host = self.host_tokens[self.host_slot][:len(seqs)]
            host.copy_(tokens, non_blocking=True)
            step.host_tokens, step.done = host, torch.cuda.Event()
            step.done.record()
        return step

    def collect(self, step: "LaunchedStep") -> list[int]:
        if step.done is not None:
            step.done.synchronize()
            return step.host_tokens.tolist()
        return step.tokens.tolist()

    def _plan_fence(self):
        """FlashInfer's plan() stages its arrays in a pinned buffer it reuses, copied to the device
        without blocking: before planning again, wait until the device has taken the last copy
        (early in the previous step, so this rarely waits)."""
        if self.plan_copied is not None:
            self.plan_copied.synchronize()

    def _plan_recorded(self):
        if self.device.type == "cuda":
            self.plan_copied = torch.cuda.Event()
            self.plan_copied.record()

    def forward(self, batch: StepBatch, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not batch.is_prefill and self.graphs and len(batch.q_lens) <= self.graph_sizes[-1]:
            key = (self._graph_size(len(batch.q_lens)),) + (self.backend.graph_key(batch.cascade))
            if key in self.graphs:
                return self._replay(batch, input_ids, positions, key)
        self._plan_fence()
        self.backend.plan(batch)
        self._plan_recorded()
        logits_indices = to_device(batch.qo_indptr[1:] - 1, self.device)
        set_context(is_prefill=batch.is_prefill, attn=self.backend, logits_indices=logits_indices)
        try:
            return self.model.compute_logits(self.model(input_ids, positions))
        finally:
            reset_context()

    # ---- CUDA graphs for decode ---------------------------------------------------------------
    def _graph_size(self, n: int) -> int:
        return next(b for b in self.graph_sizes if b >= n)

    def _replay(self, batch: StepBatch, input_ids: torch.Tensor, positions: torch.Tensor, key) -> torch.Tensor:
        n = len(input_ids)
        bs = key[0]
        gv = self.graph_vars
        gv["input_ids"][:n].copy_(input_ids)
        gv["positions"][:n].copy_(positions)
        slots = gv["slot_mapping"][:bs]
        slots[n:].fill_(-1)  # padded rows write nothing; their stale ids and positions are harmless
        slots[:n].copy_(batch.slot_mapping)
        self._plan_fence()
        self.backend.plan_graph(batch, bs, slots)
        self._plan_recorded()
        self.graphs[key].replay()
        set_context(is_prefill=False, attn=None, logits_indices=None)
        try:
            return self.model.compute_logits(gv["hidden"][:n])
        finally:
            reset_context()

    def _dummy_decode_batch(self, bs: int, levels: int) -> StepBatch:
        """A decode batch of bs requests to plan for capture: one page each, or a cascade of `levels`."""
        page = self.block_size
        last = self.num_kvcache_blocks - 1
        own = np.minimum(np.arange(1, bs + 1), last).astype(np.int32)
        ones = np.ones(bs, np.int32)
        batch = StepBatch(False, ones, ones, np.arange(bs + 1, dtype=np.int32), np.arange(bs + 1, dtype=np.int32),
                          own, ones, self.graph_vars["slot_mapping"][:bs], page)
        if levels:
            # Nested halves: all requests share page 0, the first half page 1, the first quarter
            # page 2, ...; then one page each. Too few requests for `levels` gives fewer levels.
            from nanovllm.cascade.planner import plan_cascade
            rows = np.arange(bs)
            cols = [np.where(rows < bs >> i, i, levels + bs * (i + 1) + rows) for i in range(levels - 1)]
            cols.append(levels + rows)
            table = (np.stack(cols, axis=1) % self.num_kvcache_blocks).astype(np.int32)
            kv = np.full(bs, (levels - 1) * page + 1, np.int32)
            batch.cascade = plan_cascade(table, kv, ones, page, max_levels=levels)
        return batch

    @torch.inference_mode()
    def capture_cuda_graphs(self):
        """One graph per batch size (1, 2, 4, 8, 16, 32, ... 256, 320, ... max_num_seqs) for regular
        decode; with cascade on, also one per level count (2 .. cascade_max_levels) and shared-level
        backend (Triton, fa3). Sizes are captured largest first so that smaller graphs reuse the memory
        pool of the larger ones."""
        max_bs = self.config.max_num_seqs
        sizes = {1, 2, 4, 8} | set(range(16, 257, 16)) | set(range(320, max_bs, 64))
        self.graph_sizes = sorted({b for b in sizes if b < max_bs} | {max_bs})
        hidden_size = self.config.hf_config.hidden_size
        dev = self.device
        self.graph_vars = dict(
            input_ids=torch.zeros(max_bs, dtype=torch.long, device=dev),
            positions=torch.zeros(max_bs, dtype=torch.long, device=dev),
            slot_mapping=torch.full((max_bs,), -1, dtype=torch.long, device=dev),
            hidden=torch.zeros(max_bs, hidden_size, dtype=self.dtype, device=dev))
        gv = self.graph_vars
        modes = [0] + (list(range(2, self.config.cascade_max_levels + 1)) if self.cascade is not None else [])
        shared_backends = self.backend.shared_backends  # see cost_model.shared_level_backend
        pool = None
        for bs in reversed(self.graph_sizes):
            self.backend.graph_wrappers(bs)
            for levels in modes:  # 0: regular decode; n: cascade decode over n levels
                batch = self._dummy_decode_batch(bs, levels)
                if levels and len(batch.cascade.levels) != levels:
                    continue  # too few requests to nest that deep: such steps run eagerly
                for shared in (shared_backends if levels else (None,)):
                    if levels:
                        batch.cascade.shared_backend = shared
                    key = (bs,) + self.backend.graph_key(batch.cascade)
                    self.backend.plan_graph(batch, bs, gv["slot_mapping"][:bs])
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


class LaunchedStep:
    """A step queued on the device: its sequences (in row order), sampled tokens (device), and where
    each sequence's row is, so that the next step can read its input token on the device."""

    def __init__(self, seqs, tokens, rows, cascade):
        self.seqs, self.tokens, self.rows, self.cascade = seqs, tokens, rows, cascade
        self.host_tokens = self.done = None
        self.samples: list[bool] = []  # which sequences sample (set by Scheduler.launched)
        self.is_prefill = False


class _PassThroughAttention:
    """Stands in for attention during the memory warm-up (no KV cache exists yet)."""

    slot_mapping = None  # nothing is written
    fused_qkv = True     # measure the GPU path's activations

    def forward(self, q, k, v, k_cache, v_cache):
        return q

    def attend(self, q, k_cache, v_cache):
        return q
