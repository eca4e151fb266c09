"""Executes one ScheduledStep on this process's device: device inputs, attention planned once, the
model (eager or a CUDA graph), logits, logits processing (layers/logits_processor.py: bias,
min_tokens' mask, penalties; only for steps with rows that use them), sampling. Returns a StepResult.

The runner decides nothing about a step (engine/scheduled_step.py is the contract): rank 0's engine
and every tensor-parallel worker (distributed/worker.py) run the same step through the same code.
`execute` queues the step and returns at once; `collect` waits for its tokens, so the host can
build step N+1 while the device runs step N. Jobs split out: engine/kv_cache.py (how many pages,
the cache tensor), engine/cuda_graphs.py (capture and replay of decode graphs)."""
import contextlib
import warnings

import numpy as np
import torch

from nanovllm.attention import StepBatch, make_backend
from nanovllm.config import Config
from nanovllm.distributed import parallel_state as tp
from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.host_tier import HostTier
from nanovllm.engine.kv_cache import allocate_kv_cache, block_bytes, cpu_kv_blocks, gpu_kv_blocks
from nanovllm.engine.scheduled_step import SamplingInputs, ScheduledStep, StepResult
from nanovllm.layers.awq import prepare_kernels, quantize_linears
from nanovllm.layers.linear import meta_weights
from nanovllm.layers.logits_processor import process_logits
from nanovllm.layers.logprobs import log_softmax, prompt_token_logprobs, select
from nanovllm.layers.grammar_mask import apply_grammar_mask
from nanovllm.layers.sampler import Sampler, step_row_seeds
from nanovllm.layers.vocab_parallel_sample import pick_over_ranks, shard_candidates
from nanovllm.models import tp_overlap
from nanovllm.models.registry import model_class
from nanovllm.utils.blas import use_for_eager_forwards, use_for_graph_capture
from nanovllm.utils.context import reset_context, set_context
from nanovllm.utils.loader import load_model
from nanovllm.utils.transfer import to_device

# A ScheduledStep's arrays are read-only by contract; torch only reads them here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


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
        self.distributed = config.tensor_parallel_size > 1
        if self.distributed:
            tp.check_same_on_every_rank(tp_overlap.settings())
        try:
            with torch.device(self.device), (contextlib.nullcontext() if self.distributed else tp.outside_group()):
                if config.quantization is None:
                    self.model = model_class(hf)(hf)
                else:  # dense linears on meta, swapped for AWQ ones (layers/awq.py)
                    with meta_weights():
                        self.model = model_class(hf)(hf)
                    quantize_linears(self.model, config.quantization)
        finally:
            torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            from nanovllm.utils.loader import fill_dummy_weights
            fill_dummy_weights(self.model, config.seed)
        else:
            load_model(self.model, config.model)
        self.model.eval()
        if config.quantization is not None and self.device.type == "cuda":
            prepare_kernels(self.model, self.dtype)
        self.sampler = Sampler()
        # Tensor parallelism: large prefill steps run in two pieces (models/tp_overlap.py); those without cascade
        # levels are cut between requests and each piece attends apart; on two GPUs their sums go on the copy
        # engines (set up before the KV cache is sized: the receive slots are device memory).
        in_pieces = self.distributed and getattr(self.model.model, "in_pieces", False)
        self.pieces_attend_apart = in_pieces and tp_overlap.ATTEND_APART
        if in_pieces and self.device.type == "cuda":
            tp.enable_copy_engine_all_reduce(
                tp_overlap.piece_bytes(config.max_num_batched_tokens, hf.hidden_size, self.dtype),
                tp_overlap.MIN_PIECE_BYTES)
        self.num_layers = hf.num_hidden_layers
        attn = self.model.model.layers[0].self_attn
        self.num_qo_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim  # this rank's
        extra = {}
        if config.attention_backend == "flashinfer":
            extra = dict(cascade_levels=config.cascade_max_levels, max_rows=config.max_num_batched_tokens,
                         shared_backend=config.cascade_shared_backend, decode_kernel=config.decode_attention_kernel,
                         max_model_len=config.max_model_len, prefill_pieces=self.pieces_attend_apart)
        self.backend = make_backend(
            config.attention_backend, num_qo_heads=self.num_qo_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, page_size=self.block_size, dtype=self.dtype, device=self.device,
            kv_dtype=config.kv_dtype, **extra)
        self.plan_copied = None
        self.host_slot = 0
        self.last_tokens = None  # sampled tokens (device) of the step executed last
        if self.device.type == "cuda":
            # One sampled token per sequence of a step, for the two steps that can be in flight.
            self.host_tokens = [torch.zeros(config.max_num_seqs, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self.generator = torch.Generator(device=self.device)
        self.graphs = None
        if not config.enforce_eager:
            # Index buffers for every page list a batch can hold (with prefix sharing, more than the pages that exist).
            max_indices = config.max_num_seqs * -(-config.max_model_len // self.block_size)
            self.backend.prepare_graphs(config.max_num_seqs, max_indices, config.enable_cascade_attention)
            self.graphs = DecodeGraphs(self.model, self.backend, config.max_num_seqs, hf.hidden_size, self.dtype,
                                       self.device)
        page_bytes = block_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, config.kv_dtype)
        if config.num_kvcache_blocks > 0:
            blocks = config.num_kvcache_blocks
        elif self.device.type == "cpu":
            blocks = cpu_kv_blocks(config, page_bytes)
        else:
            blocks = gpu_kv_blocks(config, page_bytes, self.warmup)
        self.num_kvcache_blocks = tp.min_over_ranks(blocks) if self.distributed else blocks  # one page table for all
        self.kv_cache = allocate_kv_cache(self.model, self.num_layers, self.num_kvcache_blocks, self.block_size,
                                          self.num_kv_heads, self.head_dim, config.kv_dtype, self.device)
        self.page_bytes = page_bytes
        self.step_timers = []   # host tier on: steps whose times (engine/host_tier.py's StepTimer) are not read yet
        self.host_tier = None
        self.num_host_blocks = 0
        if config.host_kvcache_gb > 0:
            pages = int(config.host_kvcache_gb * 2**30) // page_bytes
            self.num_host_blocks = tp.min_over_ranks(pages) if self.distributed else pages
            self.host_tier = HostTier(self.kv_cache, self.num_host_blocks)
        if self.graphs is not None:
            use_for_graph_capture()
            with tp.graph_capture() if self.distributed else contextlib.nullcontext():
                self.graphs.capture(self.num_kvcache_blocks,
                                    config.cascade_max_levels if config.enable_cascade_attention else 0)
        if self.device.type == "cuda":
            use_for_eager_forwards()

    def release_graphs(self):
        """Drop the CUDA graphs before the process group goes: a graph that captured NCCL kernels and
        outlives its communicator aborted the process at exit (seen with 32B shapes under TP=2)."""
        if self.graphs is not None:
            torch.cuda.synchronize()
            self.graphs = None
            torch.cuda.empty_cache()

    @torch.inference_mode()
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
        # Attention is stood in for by a pass-through (no cache exists yet): dense layers, logits
        # and the sampler dominate the activations.
        attn = _PassThroughAttention()
        set_context(is_prefill=not decode, attn=attn, logits_indices=rows)
        if not decode and self.pieces_attend_apart:
            # pieces that attend apart, the larger one as large as a cut allows (the halves run below too:
            # a step takes either shape, and the memory counted is the larger peak)
            attn.piece_rows = int(len(ids) * tp_overlap.MAX_PIECE_SHARE)
            self.model(ids, pos)
            attn.piece_rows = None
        logits = self.model.compute_logits(self.model(ids, pos))
        n = len(rows)
        self.sampler(logits, torch.ones(n, device=self.device), torch.full((n,), 50, device=self.device),
                     torch.full((n,), 0.9, device=self.device))
        reset_context()
        del logits
        torch.cuda.synchronize()

    # ---- one step ---------------------------------------------------------------------------
    def prepare(self, step: ScheduledStep) -> tuple[StepBatch, torch.Tensor, torch.Tensor]:
        """A step's device inputs. A PLACEHOLDER input is gathered on the device from the tokens the
        previous step sampled (step.prev_rows)."""
        dev = self.device
        ids = to_device(step.input_ids, dev)
        if step.prev_rows is not None:
            src = to_device(step.prev_rows, dev)
            ids = torch.where(src >= 0, self.last_tokens[src.clamp(min=0)], ids)
        return step.attention_batch(to_device(step.slot_mapping, dev)), ids, to_device(step.positions, dev)

    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> "PendingResult":
        """Queue one step on the device and return at once; collect() waits for its tokens."""
        timer = None
        if self.host_tier is not None:   # the previous step's restores, then this step's copies
            timer = self.host_tier.before_forward(step.swap_out, step.swap_in, step.copy_after_prev,
                                                  step.wait_for_restores, step.write_ahead,
                                                  len(step.input_ids) if step.is_prefill else 0,
                                                  step.copy_batch, step.copy_waits, step.wait_own_write_backs)
        batch, input_ids, positions = self.prepare(step)
        s = step.sampling
        # Under tensor parallelism the one-pass samplers work on each rank's vocabulary slice when
        # nothing needs the full row (its logits, logprobs, or logits processing).
        split = (self.distributed and not step.want_logits and step.logprobs_k is None and not s.processes_logits
                 and (s.all_greedy or (self.device.type == "cuda" and s.fused)))
        hidden, logits = self.forward_hidden(batch, input_ids, positions, gather=not split)
        # The asked rows' logprobs before sampling: they are the raw model's, whatever the logits processing
        # and the sampler do (held through sampling: 4 bytes per vocabulary entry of each asking row).
        asked = self.asked_logprobs(step, logits)
        if step.grammar is not None:  # structured output: disallowed tokens can never be sampled
            apply_grammar_mask(logits, step.grammar.rows, step.grammar.bitmask, self.model.lm_head.first if split else 0)
        if split:
            tokens = self.sample_split(logits, s)
        else:
            sampled_from = logits
            if s.processes_logits:  # a float32 copy: `logits` stays raw
                # A decode row's newest token is its input, where a PLACEHOLDER in a history points.
                sampled_from = process_logits(logits, s, None if step.is_prefill else input_ids)
            tokens = self.sample(sampled_from, s)
        self.last_tokens = tokens
        pending = PendingResult(step.step_id, tokens)
        if step.want_logits:
            pending.logits = logits.float()
        self.logprobs(step, hidden, asked, tokens, pending)
        if self.device.type == "cuda":
            # Double-buffered pinned copies: the step collected last may still be read while this one lands.
            self.host_slot ^= 1
            host = self.host_tokens[self.host_slot][:step.num_rows]
            host.copy_(tokens, non_blocking=True)
            pending.host_tokens, pending.done = host, torch.cuda.Event()
            pending.done.record()
        if timer is not None:
            timer.forward_ends()
            pending.timer = timer
        return pending

    def asked_logprobs(self, step: ScheduledStep, logits: torch.Tensor) -> tuple | None:
        """(rows that ask for logprobs (device), their float32 log_softmax), or None."""
        if step.logprobs_k is None:
            return None
        rows = to_device(np.flatnonzero(step.logprobs_k >= 0), self.device)
        return rows, log_softmax(logits[rows])

    def logprobs(self, step: ScheduledStep, hidden: torch.Tensor, asked: tuple | None, tokens: torch.Tensor,
                 pending: "PendingResult"):
        """The rows' logprobs (layers/logprobs.py), queued for the host before the step's completion
        event, so collect() waits for nothing more than the tokens."""
        if asked is not None:
            rows, logprobs = asked
            pending.logprobs = select(logprobs, tokens[rows], int(step.logprobs_k.max())).copy_to_host()
        if step.prompt_logprobs_tokens is not None:
            # Rows of the LM head at a time: max_num_seqs rows are what the decode warm-up's sampler
            # held (in more copies), so this fits the activation memory measured at start-up.
            pending.prompt_logprobs = prompt_token_logprobs(
                hidden[to_device(step.prompt_logprobs_tokens, self.device)], self.model.compute_logits,
                to_device(step.prompt_logprobs_targets, self.device), step.prompt_logprobs_k,
                self.config.max_num_seqs).copy_to_host()

    def collect(self, pending: "PendingResult") -> StepResult:
        logits = pending.logits.cpu() if pending.logits is not None else None
        if pending.done is not None:
            tp.wait_event(pending.done) if self.distributed else pending.done.synchronize()
            token_ids = pending.host_tokens.tolist()
        else:
            token_ids = pending.tokens.tolist()
        logprobs, prompt = (None if x is None else x.as_numpy() for x in (pending.logprobs, pending.prompt_logprobs))
        copies_done = self.host_tier.poll() if self.host_tier is not None and self.host_tier.cuda else None
        return StepResult(pending.step_id, token_ids, logits, logprobs, prompt, self._step_times(pending.timer),
                          copies_done)

    def _step_times(self, timer) -> tuple:
        """Host tier on: the times of the steps whose forward and copies are done (a restore still
        running when its step is collected is read at a later collect)."""
        if timer is not None:
            self.step_timers.append(timer)
        if not self.step_timers:
            return ()
        ready = [t.ready() for t in self.step_timers]
        times = tuple(t.times() for t, r in zip(self.step_timers, ready) if r)
        self.step_timers = [t for t, r in zip(self.step_timers, ready) if not r]
        return times

    def sample(self, logits: torch.Tensor, s: SamplingInputs) -> torch.Tensor:
        if s.all_greedy:
            return self.sampler(logits, None, all_greedy=True)
        dev = self.device
        temperatures = to_device(s.temperatures, dev)
        if dev.type == "cuda" and s.fused:
            return self.sampler(logits, temperatures, seeds=self._row_seeds(s))
        generator = self.generator if dev.type == "cuda" else torch.Generator()
        generator.manual_seed(s.step_seed)
        generators = {}
        if s.row_seeds is not None:
            generators = {row: torch.Generator(device=dev).manual_seed(int(seed))
                          for row, seed in enumerate(s.row_seeds.tolist()) if seed >= 0}
        top_ks = to_device(s.top_ks, dev) if s.top_ks is not None else None
        top_ps = to_device(s.top_ps, dev) if s.top_ps is not None else None
        min_ps = to_device(s.min_ps, dev) if s.min_ps is not None else None
        return self.sampler(logits, temperatures, top_ks, top_ps, generators, generator=generator, min_ps=min_ps)

    def _row_seeds(self, s: SamplingInputs) -> torch.Tensor:
        """The fused GPU sampler's Philox seed per row (a seeded request's own)."""
        seeds = step_row_seeds(s.step_seed, len(s.temperatures))
        if s.row_seeds is not None:
            seeds = np.where(s.row_seeds >= 0, s.row_seeds, seeds)
        return to_device(seeds, self.device)

    def sample_split(self, logits: torch.Tensor, s: SamplingInputs) -> torch.Tensor:
        """Greedy or temperature-only rows from this rank's vocabulary slice (layers/vocab_parallel_sample.py)."""
        first = self.model.lm_head.first
        if s.all_greedy:
            return pick_over_ranks(*shard_candidates(logits, first))
        temperatures = to_device(s.temperatures, self.device)
        return pick_over_ranks(*shard_candidates(logits, first, temperatures, self._row_seeds(s)))

    def _plan_fence(self):
        """FlashInfer's plan() stages its arrays in a pinned buffer it reuses, copied to the device
        without blocking: before planning again, wait until the device has taken the last copy
        (early in the previous step, so this rarely waits). It is also what lets the graphed wrappers
        share one int workspace and pinned buffer a level slot (flashinfer_backend.prepare_graphs):
        a step's plan never overwrites what the last step's copies have not yet taken."""
        if self.plan_copied is not None:
            self.plan_copied.synchronize()

    def _plan_recorded(self):
        if self.device.type == "cuda":
            self.plan_copied = torch.cuda.Event()
            self.plan_copied.record()

    def forward(self, batch: StepBatch, input_ids: torch.Tensor, positions: torch.Tensor,
                gather: bool = True) -> torch.Tensor:
        """The logits of each row's last token (gather=False under tensor parallelism: this rank's
        vocabulary slice only)."""
        return self.forward_hidden(batch, input_ids, positions, gather)[1]

    def forward_hidden(self, batch: StepBatch, input_ids: torch.Tensor, positions: torch.Tensor,
                       gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states of every query token (prompt logprobs read them), and the logits
        of each row's last token."""
        key = self.graphs.key(batch) if self.graphs is not None else None
        self._plan_fence()
        if key is not None:
            self.graphs.load(batch, input_ids, positions, key)
        else:
            split = (tp_overlap.split_request(batch.qo_indptr, self.config.hf_config.hidden_size, self.dtype)
                     if self.pieces_attend_apart and batch.is_prefill and batch.cascade is None else None)
            if split is None:
                self.backend.plan(batch)
            else:
                self.backend.plan_pieces(batch, split)
        self._plan_recorded()
        if key is not None:
            hidden = self.graphs.replay(key, len(input_ids))
            set_context(is_prefill=False, attn=None, logits_indices=None)
        else:
            logits_indices = to_device(batch.qo_indptr[1:] - 1, self.device)
            set_context(is_prefill=batch.is_prefill, attn=self.backend, logits_indices=logits_indices)
            hidden = None
        try:
            if hidden is None:
                hidden = self.model(input_ids, positions)
            return hidden, self.model.compute_logits(hidden, gather)
        finally:
            reset_context()


class PendingResult:
    """A step queued on the device: its sampled tokens (device), and once copied, on the host."""

    def __init__(self, step_id: int, tokens: torch.Tensor):
        self.step_id, self.tokens = step_id, tokens
        self.host_tokens = self.done = self.logits = self.timer = None
        self.logprobs = self.prompt_logprobs = None  # TokenLogprobs, copies to the host queued


class _PassThroughAttention:
    """Stands in for attention during the memory warm-up (no KV cache exists yet)."""

    slot_mapping = None  # nothing is written
    fused_qkv = True     # measure the GPU path's activations
    piece_rows = None    # or a prefill step's first piece (pieces that attend apart: use_piece)

    def use_piece(self, i: int):
        pass

    def forward(self, q, k, v, k_cache, v_cache, k_scale=1.0, v_scale=1.0):
        return q

    def attend(self, q, k_cache, v_cache, k_scale=1.0, v_scale=1.0):
        return q
