"""Continuous batching: which sequences run this step, and what they compute.

A step is either a prefill step (prompt tokens, chunked to the token budget) or a decode step
(one token per running sequence). Prefill comes first, as in nano-vllm. When pages run out during
decode the newest running sequence is preempted: its pages are freed and it is prefilled again
later (mostly from the prefix cache), so the run completes, only slower.
"""
from collections import deque

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


class Scheduler:

    def __init__(self, config: Config, num_blocks: int):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos = config.eos_token_id
        self.block_manager = BlockManager(num_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        scheduled = self._schedule_prefill()
        if scheduled:
            return scheduled, True
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        # Prompts already admitted continue their chunks first.
        for seq in self.running:
            if budget == 0:
                break
            if seq.in_prefill:
                seq.chunk_len = min(len(seq) - seq.num_computed_tokens, budget)
                budget -= seq.chunk_len
                scheduled.append(seq)
        bm = self.block_manager
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits, pending = bm.match(seq)
            if pending:
                # Its prefix is being computed by a running request: take it next step, as a hit.
                deferred.append(self.waiting.popleft())
                continue
            if not bm.can_allocate(seq, hits):
                break
            self.waiting.popleft()
            bm.allocate(seq, hits)
            seq.status = SequenceStatus.RUNNING
            seq.chunk_len = min(len(seq) - seq.num_computed_tokens, budget)
            budget -= seq.chunk_len
            self.running.append(seq)
            scheduled.append(seq)
        self.waiting.extendleft(reversed(deferred))
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        bm = self.block_manager
        while self.running:
            seq = self.running.popleft()
            while not bm.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                bm.may_append(seq)
                seq.chunk_len = 1
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def preempt(self, seq: Sequence):
        self.num_preemptions += 1
        self.block_manager.deallocate(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Record what the step computed and sampled; returns the sequences that got a new token."""
        advanced = []
        for seq, token_id in zip(seqs, token_ids):
            seq.num_computed_tokens += seq.chunk_len
            seq.chunk_len = 0
            self.block_manager.mark_computed(seq)
            if seq.num_computed_tokens < len(seq):
                continue  # a prompt chunk short of the end: its sample is meaningless
            seq.append_token(token_id)
            advanced.append(seq)
            sp = seq.sampling_params
            if not sp.ignore_eos and token_id == self.eos:
                self.finish(seq, "stop")
            elif token_id in sp.stop_token_ids:
                self.finish(seq, "stop")
            elif seq.num_completion_tokens >= sp.max_tokens or len(seq) >= self.max_model_len:
                self.finish(seq, "length")
        return advanced

    def finish(self, seq: Sequence, reason: str):
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.block_table:
            self.block_manager.deallocate(seq)
        try:
            self.running.remove(seq)
        except ValueError:
            self.waiting.remove(seq)
