"""The engine: requests in, tokens out. `add_request` validates and queues; `step` runs one step."""
import logging
from array import array
from dataclasses import dataclass, fields
from time import perf_counter

import numpy as np
from transformers import AutoTokenizer, GenerationConfig

from nanovllm.config import Config
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.scheduled_step import ScheduledStep
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_builder import StepBuilder
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


@dataclass
class StepOutput:
    seq: Sequence
    new_token_ids: list[int]
    new_text: str | None      # only for requests with stop strings or a streaming detokenizer
    finished: bool


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
        self.step_builder = StepBuilder(config)
        self._log_startup()
        self.vocab_size = config.hf_config.vocab_size
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.seqs: dict[int, Sequence] = {}
        self.in_flight = None  # the step launched last, not yet collected
        self.stats = {"steps": 0, "prefill_steps": 0, "decode_steps": 0, "cascade_steps": 0,
                      "generated_tokens": 0, "prompt_tokens": 0, "max_batch_size": 0,
                      "prefill_seconds": 0.0, "decode_seconds": 0.0, "copy_seconds": 0.0, "copy_steps": 0,
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
            # array('q') converts in C and refuses non-integers; numpy then checks the range in one
            # pass (an 8k-token prompt in ~0.2 ms, where a Python loop took ~0.9 ms). The bytes are
            # kept: the prefix cache hashes the prompt's pages from them.
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
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens, too long for max_model_len={max_len} "
                             f"(the prompt plus at least one output token must fit)")
        bs = self.config.kvcache_block_size
        worst = min(len(token_ids) + sampling_params.max_tokens, max_len)
        if -(-worst // bs) > self.scheduler.block_manager.num_blocks:
            raise ValueError(f"request needs up to {worst} tokens of KV cache but the cache holds only "
                             f"{self.scheduler.block_manager.num_blocks * bs}; lower max_tokens or the prompt")
        return Sequence(token_ids, sampling_params, bs, prompt_bytes)

    def add_sequence(self, seq: Sequence, stream: bool = False):
        self.seqs[seq.seq_id] = seq
        sp = seq.sampling_params
        if stream or sp.stop:
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, sp.stop, sp.include_stop_str_in_output,
                                                                   sp.skip_special_tokens)
        self.stats["prompt_tokens"] += seq.num_prompt_tokens
        self.scheduler.add(seq)

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams, stream: bool = False) -> Sequence:
        seq = self.make_sequence(prompt, sampling_params)
        self.add_sequence(seq, stream)
        return seq

    def abort_request(self, seq_id: int):
        """Stop a request (a client that left): its pages go back to the pool at once."""
        seq = self.seqs.pop(seq_id, None)
        self.detokenizers.pop(seq_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self.in_flight is None

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedule and launch the next step, then collect the one launched before it (its outputs are
        returned): the host schedules step N+1 while the device still runs step N."""
        st = self.stats
        start = perf_counter()
        seqs, is_prefill = self.scheduler.schedule()
        copies = self.scheduler.block_manager.take_copies()   # host-tier copies this step decided
        assert seqs or not (copies[0] or copies[1]), "host-tier copies without a step to carry them"
        launched = None
        if seqs:
            step, seqs = self.step_builder.build(seqs, is_prefill, self.in_flight.step if self.in_flight else None,
                                                 copies)
            if is_prefill:
                st["prefill_tokens"] += len(step.input_ids)
            pending = self.executor.execute(step)
            launched = InFlightStep(step, seqs, self.scheduler.launched(seqs), pending)
            st["steps"] += 1
            st["prefill_steps" if is_prefill else "decode_steps"] += 1
            st["cascade_steps"] += step.cascade is not None
            st["max_batch_size"] = max(st["max_batch_size"], len(seqs))
            st["prefill_seconds" if is_prefill else "decode_seconds"] += perf_counter() - start
        outputs = self.drain()  # the previous step; its wait is charged to its own phase
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
        token_ids = result.token_ids
        self.stats["copy_steps"] += step.step.swap_out is not None or step.step.swap_in is not None
        if result.copy_seconds:
            self.stats["copy_seconds"] += result.copy_seconds
            self._update_restore_cost()
        advanced = self.scheduler.postprocess(step.seqs, token_ids, step.samples)
        self.stats["generated_tokens"] += len(advanced)
        outputs = []
        for seq in advanced:
            new_text = None
            token = seq.token_ids[len(seq) - seq.num_pending - 1]  # this step's, before later placeholders
            detok = self.detokenizers.get(seq.seq_id)
            if detok is not None:
                new_text = detok.add([token])
                if seq.is_finished and not detok.stopped:
                    new_text += detok.flush()  # may complete a stop string too (a last, held-back character)
                if detok.stopped:
                    self.scheduler.finish(seq, "stop")
                    seq.finish_reason = "stop"  # also when the same token hit max_tokens
            outputs.append(StepOutput(seq, [token], new_text, seq.is_finished))
            if seq.is_finished:
                self.seqs.pop(seq.seq_id, None)
        return outputs

    def output_text(self, seq: Sequence) -> str:
        return self.output_texts([seq])[0]

    def output_texts(self, seqs: list[Sequence]) -> list[str]:
        """Final texts (dropping their detokenizers): a stop string's cut, else the decoded completion,
        all in one batch call of the Rust tokenizer where there is one (it decodes in parallel)."""
        texts: list[str | None] = [None] * len(seqs)
        for i, seq in enumerate(seqs):
            detok = self.detokenizers.pop(seq.seq_id, None)
            if detok is not None and detok.stopped:
                texts[i] = detok.text
        rust = getattr(self.tokenizer, "_tokenizer", None)
        batch = rust is not None and hasattr(rust, "decode_batch") and not self.tokenizer.clean_up_tokenization_spaces
        for skip in (True, False):
            todo = [i for i, t in enumerate(texts) if t is None and seqs[i].sampling_params.skip_special_tokens == skip]
            ids = [seqs[i].completion_token_ids for i in todo]
            if batch:
                decoded = rust.decode_batch(ids, skip_special_tokens=skip)  # what decode() does, per sequence
            else:
                decoded = [self.tokenizer.decode(t, skip_special_tokens=skip) for t in ids]
            for i, text in zip(todo, decoded):
                texts[i] = text
        return texts

    def _log_startup(self):
        cfg, runner = self.config, self.model_runner
        pages = self.executor.num_kvcache_blocks
        graphs = runner.graphs.sizes if runner.graphs is not None else None
        logger.info("engine ready: device %s, dtype %s, tensor parallel %d, %d KV pages (%d tokens), max %d sequences "
                    "of %d tokens, CUDA graphs %s, cascade %s", cfg.device, str(cfg.torch_dtype).replace("torch.", ""),
                    cfg.tensor_parallel_size, pages, pages * cfg.kvcache_block_size, cfg.max_num_seqs, cfg.max_model_len,
                    f"for batch sizes {graphs[0]}..{graphs[-1]} ({len(graphs)})" if graphs else "off",
                    "on" if cfg.enable_cascade_attention else "off")

    def close(self):
        """Stop the tensor-parallel workers, if any (idempotent; also at interpreter exit)."""
        self.executor.close()

    @property
    def failure(self) -> Exception | None:
        """The error that stopped the engine for good (a tensor-parallel worker failed), else None."""
        return getattr(self.executor, "failure", None)

    def _update_restore_cost(self):
        """Swap or recompute: restoring a host page pays while copying its bytes is faster than
        prefilling its tokens, at the copy bandwidth and prefill speed measured so far."""
        st, bm = self.stats, self.scheduler.block_manager
        pages = bm.num_swapped_in + bm.num_swapped_out
        if st["copy_seconds"] <= 0 or st["prefill_seconds"] <= 0 or not st["prefill_tokens"]:
            return
        copy_s_per_page = st["copy_seconds"] / pages
        prefill_s_per_page = st["prefill_seconds"] / st["prefill_tokens"] * bm.block_size
        bm.restore_pays = copy_s_per_page < prefill_s_per_page

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
