"""Turns the scheduler's choice (which sequences, prefill or decode) into one immutable ScheduledStep.

This is the last stop on the scheduler side: the cascade policy orders the rows and plans the shared
levels, then every host array a runner needs is built here, once, whatever the number of ranks
(engine/scheduled_step.py has the contract). Building from numpy keeps a 1024-row decode step at
about a millisecond of host time (claude_docs/performance.md). The logits controls (penalties,
logit_bias, min_tokens, min-p) are built only for the rows that use them; a step where no row does
pays one attribute read a row for them.
"""
from itertools import chain

import numpy as np

from nanovllm.config import Config
from nanovllm.engine.grammar import grammar_mask
from nanovllm.engine.scheduled_step import Penalties, SamplingInputs, ScheduledStep, TokenBias
from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.layers.sampler import seeded_row_seed


class StepBuilder:

    def __init__(self, config: Config):
        self.page_size = config.kvcache_block_size
        vocab = config.hf_config.vocab_size
        self.eos_ids = [i for i in config.eos_token_ids if 0 <= i < vocab]  # min_tokens masks them
        self.vocab_size = vocab
        self.seed_rng = np.random.default_rng(config.seed)  # step seeds of unseeded rows
        self.cascade = None
        if config.enable_cascade_attention:
            from nanovllm.cascade.policy import CascadePolicy
            self.cascade = CascadePolicy(config)
        self.num_steps = 0

    def build(self, seqs: list[Sequence], is_prefill: bool, prev: ScheduledStep | None = None,
              copies: tuple | None = None) -> tuple[ScheduledStep, list[Sequence]]:
        """The step and its sequences in row order. `prev` is the step launched last and not yet
        collected: a decode input still PLACEHOLDER is the token one of its rows is sampling.
        `copies`: the block manager's StepCopies (engine/block_manager.py)."""
        pages = [s.page_array() for s in seqs]   # each row's pages (numpy, kept on the sequence)
        plan = self.cascade.plan(seqs, pages) if self.cascade is not None else None
        if plan is not None:
            order = plan.order.tolist()
            seqs, pages = [seqs[i] for i in order], [pages[i] for i in order]
        bs = self.page_size
        n = len(seqs)
        q_lens = np.fromiter((s.chunk_len for s in seqs), dtype=np.int32, count=n)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int32, count=n)
        kv_lens = starts + q_lens
        num_pages = (kv_lens + bs - 1) // bs
        qo_indptr = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(q_lens, out=qo_indptr[1:])
        kv_indptr = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(num_pages, out=kv_indptr[1:])
        if is_prefill:  # a prompt chunk may stop short of its allocated pages
            tables = [p[:k] for p, k in zip(pages, num_pages.tolist())]
        else:           # decode: every page of every sequence
            tables = pages
        kv_indices = np.concatenate(tables) if tables else np.zeros(0, np.int32)
        if len(kv_indices) != kv_indptr[-1]:   # a scheduler bug, caught here rather than as garbage K/V
            short = next(i for i, (t, k) in enumerate(zip(tables, num_pages.tolist())) if len(t) != k)
            raise RuntimeError(f"step row {short} (sequence {seqs[short].seq_id}) has {len(tables[short])} pages, "
                               f"its {int(kv_lens[short])} tokens need {int(num_pages[short])}")
        prev_rows = None
        if is_prefill:
            input_ids = np.fromiter(chain.from_iterable(s.token_ids[s.num_computed_tokens:s.num_computed_tokens +
                                                                    s.chunk_len] for s in seqs),   # chained in C
                                    dtype=np.int64, count=int(qo_indptr[-1]))
            # position of every query token, and the page that holds it
            seq_of_token = np.repeat(np.arange(n), q_lens)
            positions = np.arange(qo_indptr[-1], dtype=np.int64) - qo_indptr[seq_of_token] + starts[seq_of_token]
            pages = kv_indices[kv_indptr[seq_of_token] + positions // bs]
        else:
            input_ids = np.fromiter((s.last_token for s in seqs), dtype=np.int64, count=n)
            positions = (kv_lens - 1).astype(np.int64)
            pending = input_ids == PLACEHOLDER
            if prev is not None and pending.any():
                prev_row = {sid: i for i, sid in enumerate(prev.seq_ids)}
                prev_rows = np.where(pending, [prev_row.get(s.seq_id, -1) for s in seqs], -1).astype(np.int64)
            pages = kv_indices[kv_indptr[1:] - 1]
        slot_mapping = pages.astype(np.int64) * bs + positions % bs
        last_page_len = (kv_lens - (num_pages - 1) * bs).astype(np.int32)
        self.num_steps += 1
        step = ScheduledStep(self.num_steps, is_prefill, tuple(s.seq_id for s in seqs), input_ids, prev_rows, positions,
                             slot_mapping, q_lens, kv_lens, qo_indptr, kv_indptr, kv_indices, last_page_len, bs, plan,
                             self._sampling_inputs(seqs), False, *self._logprob_inputs(seqs, qo_indptr, is_prefill),
                             grammar=grammar_mask(seqs, self.vocab_size), **self._copies(copies))
        return step, seqs

    @staticmethod
    def _logprob_inputs(seqs: list[Sequence], qo_indptr: np.ndarray, is_prefill: bool) -> tuple:
        """logprobs_k, prompt_logprobs_tokens, _targets and _k (engine/scheduled_step.py). When no row
        asks: one pass over the rows in decode, two in prefill (a Sequence's lists are None unless asked;
        measured 18 us a 1,024-row decode step on the shared 2-core CPU, 68 us as a loop over the
        sampling params; a decode step builds in ~1 ms)."""
        n = len(seqs)
        logprobs_k = None
        if [s.logprobs for s in seqs].count(None) < n:
            logprobs_k = np.array([-1 if s.logprobs is None else s.sampling_params.logprobs for s in seqs],
                                  dtype=np.int32)
        if not is_prefill or [s.prompt_logprobs for s in seqs].count(None) == n:
            return logprobs_k, None, None, 0
        tokens, targets, top_k = [], [], 0
        for row, s in enumerate(seqs):
            if not s.needs_prompt_logprobs:
                continue
            # Position p's logits give the logprob of prompt token p + 1; the last prompt
            # position's are the first sampled token's.
            start = s.num_computed_tokens
            end = min(start + s.chunk_len, s.num_prompt_tokens - 1)
            if end > start:
                tokens.append(np.arange(qo_indptr[row], qo_indptr[row] + end - start, dtype=np.int64))
                targets.append(np.asarray(s.token_ids[start + 1:end + 1], dtype=np.int64))
                top_k = max(top_k, s.sampling_params.prompt_logprobs)
        if not tokens:
            return logprobs_k, None, None, 0
        return logprobs_k, np.concatenate(tokens), np.concatenate(targets), top_k

    @staticmethod
    def _copies(copies) -> dict:
        """The host-tier copies of the step (engine/scheduled_step.py's swap_out, swap_in, ...)."""
        if copies is None:
            return {}
        as_array = lambda pairs: np.array(pairs, dtype=np.int64).reshape(-1, 2) if pairs else None  # noqa: E731
        return dict(swap_out=as_array(copies.swap_out), swap_in=as_array(copies.swap_in),
                    write_ahead=as_array(copies.write_ahead),
                    copy_after_prev=bool(copies.after_prev and (copies.swap_out or copies.swap_in)),
                    wait_for_restores=bool(copies.wait_for_restores and copies.swap_in),
                    copy_batch=copies.batch,
                    copy_waits=(copies.wait_in, copies.wait_out, copies.out_after_in, copies.in_after_out),
                    wait_own_write_backs=bool(copies.wait_own_out))

    def _sampling_inputs(self, seqs: list[Sequence]) -> SamplingInputs:
        params = [s.sampling_params for s in seqs]
        temperatures = np.fromiter((p.temperature for p in params), dtype=np.float32, count=len(params))
        top_ks = top_ps = None
        if any(p.top_k > 0 for p in params):
            top_ks = np.fromiter((p.top_k for p in params), dtype=np.int64, count=len(params))
        if any(p.top_p < 1 for p in params):
            top_ps = np.fromiter((p.top_p for p in params), dtype=np.float32, count=len(params))
        all_greedy = not temperatures.any()
        step_seed, row_seeds = 0, None
        if not all_greedy:
            step_seed = int(self.seed_rng.integers(0, 1 << 62))
            if any(p.seed is not None for p in params):
                # A seeded request's draw depends only on its seed and token index, never on the batch.
                row_seeds = np.array([-1 if s.sampling_params.seed is None else
                                      seeded_row_seed(s.sampling_params.seed, s.num_completion_tokens)
                                      for s in seqs], dtype=np.int64)
        min_ps = token_bias = penalties = None
        if any(p.processes_logits for p in params):  # the one per-row read a step without controls pays
            min_ps, token_bias, penalties = self._logits_controls(seqs, params)
        return SamplingInputs(temperatures, top_ks, top_ps, bool(all_greedy), step_seed, row_seeds,
                              min_ps, token_bias, penalties)

    def _logits_controls(self, seqs: list[Sequence], params: list) -> tuple:
        """min-p, the token bias (logit_bias; -inf on EOS and stop ids below min_tokens) and the
        penalties' histories, each built only for the rows that use it (None when none does)."""
        n = len(params)
        min_ps = None
        if any(p.min_p > 0 for p in params):
            min_ps = np.fromiter((p.min_p for p in params), dtype=np.float32, count=n)
        bias_rows, bias_ids, bias_values = [], [], []  # Python lists: per-row numpy calls cost ~5 us each
        for row, (seq, p) in enumerate(zip(seqs, params)):
            if p.logit_bias:
                bias_rows += [row] * len(p.logit_bias)
                bias_ids += p.logit_bias.keys()
                bias_values += p.logit_bias.values()
            # The token this step samples is the seq's num_completion_tokens-th (placeholders count).
            if p.min_tokens and seq.num_completion_tokens < p.min_tokens:
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_ids)
                bias_rows += [row] * len(banned)
                bias_ids += banned
                bias_values += [-np.inf] * len(banned)
        token_bias = None
        if bias_ids:
            token_bias = TokenBias(np.array(bias_rows, dtype=np.int64), np.array(bias_ids, dtype=np.int64),
                                   np.array(bias_values, dtype=np.float32))
        rows = [row for row, p in enumerate(params) if p.penalized]
        penalties = None
        if rows:
            pen = [params[r] for r in rows]
            pieces, lengths = [], []
            for r in rows:
                seq = seqs[r]
                out = seq.output_array()
                pieces.append(out)
                if seq.num_pending:  # at most one step is in flight: only the newest token is pending
                    pieces.append(_PENDING)
                lengths.append(len(out) + seq.num_pending)
            prompt_ids = prompt_indptr = None
            if any(p.repetition_penalty != 1 for p in pen):
                prompts = [seqs[r].prompt_distinct() for r in rows]
                prompt_ids = np.concatenate(prompts)
                prompt_indptr = _indptr([len(x) for x in prompts])
            penalties = Penalties(
                np.array(rows, dtype=np.int64),
                np.fromiter((p.repetition_penalty for p in pen), dtype=np.float32, count=len(pen)),
                np.fromiter((p.frequency_penalty for p in pen), dtype=np.float32, count=len(pen)),
                np.fromiter((p.presence_penalty for p in pen), dtype=np.float32, count=len(pen)),
                np.concatenate(pieces), _indptr(lengths), prompt_ids, prompt_indptr)
        return min_ps, token_bias, penalties


_PENDING = np.array([PLACEHOLDER], dtype=np.int64)


def _indptr(lengths: list[int]) -> np.ndarray:
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return indptr
