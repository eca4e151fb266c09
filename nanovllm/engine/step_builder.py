"""Turns the scheduler's choice (which sequences, prefill or decode) into one immutable ScheduledStep.

This is the last stop on the scheduler side: the cascade policy orders the rows and plans the shared
levels, then every host array a runner needs is built here, once, whatever the number of ranks
(engine/scheduled_step.py has the contract). Building from numpy keeps a 1024-row decode step at
about a millisecond of host time (claude_docs/performance.md).
"""
import numpy as np

from nanovllm.config import Config
from nanovllm.engine.scheduled_step import SamplingInputs, ScheduledStep
from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.layers.sampler import seeded_row_seed


class StepBuilder:

    def __init__(self, config: Config):
        self.page_size = config.kvcache_block_size
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
        `copies`: the block manager's (swap_out, swap_in, copy_after_prev, wait_for_restores)."""
        plan = self.cascade.plan(seqs) if self.cascade is not None else None
        if plan is not None:
            seqs = [seqs[i] for i in plan.order.tolist()]
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
            tables = [s.page_array()[:k] for s, k in zip(seqs, num_pages.tolist())]
        else:           # decode: every page of every sequence
            tables = [s.page_array() for s in seqs]
        kv_indices = np.concatenate(tables) if tables else np.zeros(0, np.int32)
        prev_rows = None
        if is_prefill:
            input_ids = np.fromiter((t for s in seqs for t in
                                     s.token_ids[s.num_computed_tokens:s.num_computed_tokens + s.chunk_len]),
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
                             self._sampling_inputs(seqs), False, *self._copies(copies))
        return step, seqs

    @staticmethod
    def _copies(copies: tuple | None) -> tuple:
        if copies is None:
            return None, None, False, False
        swap_out, swap_in, after_prev, wait_restores = copies
        as_array = lambda pairs: np.array(pairs, dtype=np.int64).reshape(-1, 2) if pairs else None
        return (as_array(swap_out), as_array(swap_in), bool(after_prev and (swap_out or swap_in)),
                bool(wait_restores and swap_in))

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
        return SamplingInputs(temperatures, top_ks, top_ps, bool(all_greedy), step_seed, row_seeds)
