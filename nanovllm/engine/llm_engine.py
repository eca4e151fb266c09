"""The engine: requests in, tokens out. `add_request` validates and queues; `step` runs one step."""
import logging
import os
import struct
from array import array
from dataclasses import dataclass, fields
from time import perf_counter

import numpy as np
from transformers import AutoTokenizer, GenerationConfig

from nanovllm.config import Config
from nanovllm.engine.copy_costs import MIN_LINE_TOKENS, CopyCosts
from nanovllm.engine.output_processor import OutputProcessor, StepOutput
from nanovllm.engine.grammar import GrammarCompiler
from nanovllm.engine.scheduled_step import ScheduledStep
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_builder import StepBuilder
from nanovllm.layers.logprobs import TokenLogprobs
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm")


def eos_token_ids(model: str, tokenizer, hf_config) -> tuple[int, ...]:
    """Every id that ends a generation: the tokenizer's EOS and those of config.json and
    generation_config.json (instruct checkpoints list several, e.g. <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    try:
        generation = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        generation = None
    for source in (hf_config.eos_token_id, generation):
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return tuple(sorted(i for i in ids if isinstance(i, int)))


@dataclass
class InFlightStep:
    """A step handed to the runner(s) and not yet collected, with what the engine side needs back."""
    step: ScheduledStep
    seqs: list[Sequence]    # in the step's row order
    samples: list[bool]     # which rows sample a token (a prompt chunk short of the end does not)
    pending: object         # the runner's handle (PendingResult)

    @property
    def is_prefill(self) -> bool:
        return self.step.is_prefill


class LLMEngine:

    def __init__(self, model: str, **kwargs):
        names = {f.name for f in fields(Config)} - {"model", "hf_config", "eos_token_ids"}
        unknown = set(kwargs) - names
        if unknown:
            raise ValueError(f"unknown engine options: {sorted(unknown)}")
        config = Config(model, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        config.eos_token_ids = eos_token_ids(model, self.tokenizer, config.hf_config)
        self.config = config
        from nanovllm.distributed.executor import make_executor
        self.executor = make_executor(config)      # the runner, or rank 0 of a tensor-parallel group
        self.model_runner = self.executor.runner   # this process's runner
        self.scheduler = Scheduler(config, self.executor.num_kvcache_blocks, self.model_runner.num_host_blocks)
        # Fed only with the host tier on; on the CPU path its decisions ignore the (meaningless) timings.
        self.copy_costs = CopyCosts(config.kvcache_block_size, measured=config.device.startswith("cuda"),
                                    min_line_tokens=min(MIN_LINE_TOKENS, config.max_num_batched_tokens // 4))
        if self.model_runner.num_host_blocks:
            self.scheduler.block_manager.costs = self.copy_costs
            # Copy feedback (CUDA, opt-in): copies land when the runner reports them (StepResult.copies_done)
            # and a forward waits only for the copies of its own pages. Measured on W6 (1.7B, H200, session
            # 9): no faster (claude_docs/memory.md), so by default every forward waits for the earlier copies.
            feedback = os.environ.get("NANOVLLM_HOST_COPY_FEEDBACK", "0")
            if feedback not in ("0", "1"):
                raise ValueError(f"NANOVLLM_HOST_COPY_FEEDBACK must be 0 or 1, got {feedback!r}")
            self.scheduler.block_manager.sync_copies = not (feedback == "1" and config.device.startswith("cuda"))
        self.step_builder = StepBuilder(config)
        self._log_startup()
        self.vocab_size = config.hf_config.vocab_size
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler, config.eos_token_ids,
                                                config.max_model_len)
        self.seqs: dict[int, Sequence] = {}
        self.in_flight = None  # the step launched last, not yet collected
        self._grammar_compiler = None  # structured output, built on first use (engine/grammar.py)
        self.stats = {"steps": 0, "prefill_steps": 0, "decode_steps": 0, "cascade_steps": 0,
                      "generated_tokens": 0, "prompt_tokens": 0, "max_batch_size": 0,
                      "prefill_seconds": 0.0, "decode_seconds": 0.0, "copy_seconds": 0.0, "copy_steps": 0,
                      "copy_stall_seconds": 0.0, "forward_seconds": 0.0, "restore_pays_changes": 0,   # device times, host tier on
                      "prefill_tokens": 0}

    # ---- requests ---------------------------------------------------------------------------
    def make_sequence(self, prompt: str | list[int], sampling_params: SamplingParams) -> Sequence:
        """Validate a request and build its Sequence (not queued yet). Raises ValueError naming the problem."""
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(sampling_params).__name__}")
        sampling_params.validate()
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            prompt_bytes = array("q", token_ids).tobytes()
        elif isinstance(prompt, (list, tuple)):
            # struct converts in C and refuses non-integers and ids past 64 bits; numpy then checks the
            # range in one pass. An 8,320-token prompt: 29-34 us (array('q'): 86; a Python loop ~0.9 ms),
            # 1,024 of them are W3's queueing. The bytes are kept: the prefix cache hashes the prompt's
            # pages from them. Refused prompts go through array('q'), whose errors say which refusal.
            try:
                prompt_bytes = struct.pack(f"{len(prompt)}q", *prompt)
            except struct.error:
                try:
                    prompt_bytes = array("q", prompt).tobytes()
                except OverflowError:
                    raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): an id does not fit "
                                     f"in 64 bits") from None
                except TypeError:
                    raise ValueError("prompt must be a string or a list of token ids (integers)") from None
            ids = np.frombuffer(prompt_bytes, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                bad = ids[(ids < 0) | (ids >= self.vocab_size)]
                raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5].tolist()}")
            token_ids = prompt  # Sequence keeps its own copy
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not token_ids:
            raise ValueError("prompt is empty")
        self._check_token_ids(sampling_params)
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens, too long for max_model_len={max_len} "
                             f"(the prompt plus at least one output token must fit)")
        bs = self.config.kvcache_block_size
        worst = min(len(token_ids) + sampling_params.max_tokens, max_len)
        if -(-worst // bs) > self.scheduler.block_manager.num_blocks:
            raise ValueError(f"request needs up to {worst} tokens of KV cache but the cache holds only "
                             f"{self.scheduler.block_manager.num_blocks * bs}; lower max_tokens or the prompt")
        seq = Sequence(token_ids, sampling_params, bs, prompt_bytes)
        if sampling_params.structured_output is not None:
            seq.grammar = self.grammar_compiler.matcher(sampling_params.structured_output)  # ValueError if it fails
        return seq

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Structured output's compiler and cache, one per engine (made on the first grammar request, from
        its own tokenizer: the server makes it on its tokenizer thread while the engine thread decodes)."""
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(AutoTokenizer.from_pretrained(self.config.model), self.vocab_size,
                                                     self.config.eos_token_ids)
        return self._grammar_compiler

    def _check_token_ids(self, sp: SamplingParams):
        """Token ids of the sampling params index the logits on the device: they must be in the vocabulary."""
        for name, ids in (("stop_token_ids", sp.stop_token_ids), ("logit_bias", sp.logit_bias or ())):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"SamplingParams: {name} has token ids out of the vocabulary [0, {self.vocab_size}): "
                                 f"{bad[:5]}")

    def add_sequence(self, seq: Sequence, stream: bool = False):
        self.seqs[seq.seq_id] = seq
        self.output_processor.add(seq, stream)
        self.stats["prompt_tokens"] += seq.num_prompt_tokens
        self.scheduler.add(seq)

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams, stream: bool = False) -> Sequence:
        seq = self.make_sequence(prompt, sampling_params)
        self.add_sequence(seq, stream)
        return seq

    def abort_request(self, seq_id: int):
        """Stop a request (a client that left): its pages go back to the pool at once."""
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.output_processor.abort(seq)

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self.in_flight is None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, GPU and host tier (vLLM's LLM.reset_prefix_cache, SGLang's /flush_cache):
        later prompts compute all their pages again, as on a fresh engine (cold-cache benchmarks, a changed
        checkpoint's KV). Only between requests: with any request queued or running it logs why and returns
        False, changing nothing. The hit counters (metrics) keep counting."""
        if not self.is_finished() or not self.scheduler.block_manager.reset_prefix_cache():
            logger.warning("prefix cache not reset: %d requests queued or running",
                           len(self.scheduler.waiting) + len(self.scheduler.running))
            return False
        logger.info("prefix cache reset")
        return True

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedule and launch the next step, then collect the one launched before it (its outputs are
        returned): the host schedules step N+1 while the device still runs step N."""
        st = self.stats
        outputs = []
        if self.in_flight is not None and self.in_flight.step.grammar is not None:
            # Grammar rows' masks for the next step need this step's tokens: collect it first (no overlap).
            outputs = self.drain()
        start = perf_counter()
        seqs, is_prefill = self.scheduler.schedule()
        copies = self.scheduler.block_manager.take_copies()   # host-tier copies this step decided
        assert seqs or not (copies[0] or copies[1] or copies[4]), "host-tier copies without a step to carry them"
        launched = None
        if seqs:
            step, seqs = self.step_builder.build(seqs, is_prefill, self.in_flight.step if self.in_flight else None,
                                                 copies)
            if is_prefill:
                st["prefill_tokens"] += len(step.input_ids)
            pending = self.executor.execute(step)
            launched = InFlightStep(step, seqs, self.launched(seqs), pending)
            st["steps"] += 1
            st["prefill_steps" if is_prefill else "decode_steps"] += 1
            st["cascade_steps"] += step.cascade is not None
            st["max_batch_size"] = max(st["max_batch_size"], len(seqs))
            st["prefill_seconds" if is_prefill else "decode_seconds"] += perf_counter() - start
        outputs += self.drain()  # the previous step; its wait is charged to its own phase
        self.in_flight = launched
        return outputs

    def drain(self) -> list[StepOutput]:
        """Collect the step in flight without launching another (its sequences may all have ended)."""
        if self.in_flight is None:
            return []
        step, self.in_flight = self.in_flight, None
        start = perf_counter()
        outputs = self._collect(step)
        self.stats["prefill_seconds" if step.is_prefill else "decode_seconds"] += perf_counter() - start
        return outputs

    def _collect(self, step: InFlightStep) -> list[StepOutput]:
        result = self.executor.collect(step.pending)
        if result.copies_done is not None:
            self.scheduler.block_manager.copies_landed(*result.copies_done)
        self.stats["copy_steps"] += step.step.swap_out is not None or step.step.swap_in is not None
        if result.step_times:
            self._observe_step_times(result.step_times)
        if result.prompt_logprobs is not None:
            self._attach_prompt_logprobs(step, result.prompt_logprobs)
        advanced = self.scheduler.postprocess(step.seqs, result.token_ids, step.samples)
        if result.logprobs is not None:
            self._attach_logprobs(step, result.logprobs, result.token_ids, advanced)
        return self._finish_step(advanced)

    def launched(self, seqs: list[Sequence]) -> list[bool]:
        """A step was handed to the runner(s): the scheduler's placeholders, then the length rule.
        Returns which sequences sample a token."""
        samples = self.scheduler.launched(seqs)
        self.output_processor.launched(seqs, samples)
        return samples

    def postprocess(self, seqs: list[Sequence], token_ids: list[int], samples: list[bool]) -> list[StepOutput]:
        """A step's tokens came back: the scheduler fills them in, the output processor applies the stop
        rules (finishing what ends) and hands out the text."""
        return self._finish_step(self.scheduler.postprocess(seqs, token_ids, samples))

    def _finish_step(self, advanced: list[Sequence]) -> list[StepOutput]:
        outputs = self.output_processor.process(advanced)
        self.stats["generated_tokens"] += len(outputs)
        for out in outputs:
            if out.finished:
                self.seqs.pop(out.seq.seq_id, None)
        return outputs

    @staticmethod
    def _attach_logprobs(step: InFlightStep, logprobs: TokenLogprobs, token_ids: list[int], advanced: list[Sequence]):
        """Each advanced sequence that asked gets its sampled token's {token_id: logprob} (a token
        dropped after its sequence ended gets none: one entry per completion token)."""
        ks = step.step.logprobs_k
        row_of = {seq.seq_id: row for row, seq in enumerate(step.seqs)}
        entry_of = {row: i for i, row in enumerate(np.flatnonzero(ks >= 0).tolist())}  # logprobs' rows: the asking ones
        rows = [row_of[seq.seq_id] for seq in advanced if seq.logprobs is not None]
        if rows:
            dicts = logprobs.select([entry_of[r] for r in rows]).dicts([token_ids[r] for r in rows],
                                                                        [int(ks[r]) for r in rows])
            for row, d in zip(rows, dicts):
                step.seqs[row].logprobs.append(d)

    @staticmethod
    def _attach_prompt_logprobs(step: InFlightStep, logprobs: TokenLogprobs):
        """The prompt positions this step computed go to their sequences (entries are in row order), each
        position once: a sequence preempted while this step ran computes its prompt again from the start
        (no prefix hits while it needs prompt logprobs), and only the positions it lacks are kept."""
        s = step.step
        bounds = np.searchsorted(s.prompt_logprobs_tokens, s.qo_indptr).tolist()  # row r: bounds[r]:bounds[r + 1]
        targets = s.prompt_logprobs_targets.tolist()
        starts = (s.kv_lens - s.q_lens).tolist()   # each row's first position in this step
        for row, seq in enumerate(step.seqs):
            lo, hi = bounds[row], bounds[row + 1]
            # Positions attached already (entry 0 is the first token's None), by a step before a preemption.
            have = len(seq.prompt_logprobs) - 1 if seq.prompt_logprobs is not None else 0
            lo += max(0, have - starts[row])
            if hi > lo and not seq.is_finished:
                k = seq.sampling_params.prompt_logprobs
                seq.prompt_logprobs.extend(logprobs.select(slice(lo, hi)).dicts(targets[lo:hi], [k] * (hi - lo)))

    def output_text(self, seq: Sequence) -> str:
        return self.output_texts([seq])[0]

    def output_texts(self, seqs: list[Sequence]) -> list[str]:
        """Final texts (dropping their detokenizers); see OutputProcessor.output_texts."""
        return self.output_processor.output_texts(seqs)

    def _log_startup(self):
        cfg, runner = self.config, self.model_runner
        pages = self.executor.num_kvcache_blocks
        graphs = runner.graphs.sizes if runner.graphs is not None else None
        logger.info("engine ready: device %s, dtype %s, tensor parallel %d, %d KV pages of %s (%d tokens), max %d "
                    "sequences of %d tokens, CUDA graphs %s, cascade %s", cfg.device,
                    str(cfg.torch_dtype).replace("torch.", ""), cfg.tensor_parallel_size, pages,
                    str(cfg.kv_dtype).replace("torch.", ""), pages * cfg.kvcache_block_size, cfg.max_num_seqs, cfg.max_model_len,
                    f"for batch sizes {graphs[0]}..{graphs[-1]} ({len(graphs)})" if graphs else "off",
                    "on" if cfg.enable_cascade_attention else "off")

    def close(self):
        """Stop the tensor-parallel workers, if any (idempotent; also at interpreter exit)."""
        self.executor.close()

    @property
    def failure(self) -> Exception | None:
        """The error that stopped the engine for good (a tensor-parallel worker failed), else None."""
        return getattr(self.executor, "failure", None)

    def _observe_step_times(self, times):
        """Steps' device times (host tier on) go to the cost decisions (engine/copy_costs.py): swap or
        recompute (`restore_pays`) and the per-step budget of background copies."""
        st, costs = self.stats, self.copy_costs
        for t in times:
            costs.observe_forward(t.forward_s, t.prefill_tokens)
            costs.observe_copies(t.copy_s, t.copy_pages, t.restore_s, t.restore_pages, t.stall_s)
            st["copy_seconds"] += t.copy_s
            st["copy_stall_seconds"] += t.stall_s
            st["forward_seconds"] += t.forward_s
        pays = costs.restore_pays()
        if pays != self.scheduler.block_manager.restore_pays:
            st["restore_pays_changes"] += 1
            summary = costs.summary()
            logger.info("host tier: host hits now %s (restore %s us a page over %d pages timed, prefill %s us a page)",
                        "restored" if pays else "recomputed", summary["restore_us_per_page"], costs.restore_pages,
                        summary["prefill_us_per_page"])
        self.scheduler.block_manager.restore_pays = pays

    def kv_state(self, max_pages: int = 64) -> dict:
        """The KV cache as a dict (GET /debug/kv): pages per tier, the prefix groups of the running
        requests (shared leading pages and their users), the LRU ends of both tiers (next to be
        evicted first, at most max_pages each), hit rates and host-tier traffic."""
        from nanovllm.engine.kv_state import kv_state
        return kv_state(self, max_pages)

    def kv_usage(self) -> dict:
        bm = self.scheduler.block_manager
        page_bytes = self.model_runner.page_bytes * self.config.tensor_parallel_size
        return {"blocks_total": bm.num_blocks, "blocks_free": bm.num_free_blocks,
                "blocks_used": bm.num_blocks - bm.num_free_blocks,
                "cache_hit_tokens": bm.num_cache_hit_tokens, "cache_query_tokens": bm.num_cache_query_tokens,
                "host_blocks_total": bm.num_host_blocks, "host_blocks_used": bm.num_used_host_blocks,
                "host_hit_tokens": bm.num_host_hit_tokens, "bytes_to_host": bm.num_swapped_out * page_bytes,
                "bytes_from_host": bm.num_swapped_in * page_bytes}
