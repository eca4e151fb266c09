"""Continuous batching: which sequences run this step, and what they compute.

A step is either a prefill step (prompt tokens, chunked to the token budget) or a decode step
(one token per running sequence). Prefill comes first, as in nano-vllm. When pages run out during
decode the newest running sequence is preempted: its pages are freed and it is prefilled again
later (mostly from the prefix cache), so the run completes, only slower.

Steps overlap: `launched` records a step as soon as the GPU has it (each sequence that samples
gets a PLACEHOLDER token, its K/V count as computed), so the next step can be scheduled while the GPU
runs; `postprocess` fills the tokens in when the step is collected. Whether a sequence ends is not
decided here: engine/output_processor.py owns every stop rule, marks a sequence whose launched token
ends it by length (`last_launched`: not scheduled again), and calls `finish` for the ones that end,
which frees their pages. One that ends by EOS or a stop may have run one step too many, whose token
is dropped.

Admission order is the schedule policy's (engine/schedule_policy.py: fcfs, lpm, dfs-weight, random,
with a starvation bound). With a host KV tier (block_manager.py) a preempted sequence's pages are
not lost: its full pages keep their hashes, are written back to host memory if the GPU needs them
for others, and are copied back at re-admission instead of being recomputed (swap-preemption), as
long as the copy is cheaper than the prefill (`restore_pays`, from the measured copy bandwidth and
prefill speed). A request admitted with pages in host memory is charged its restores' copy time
against the step's token budget (`BlockManager.restore_token_cost`: block_size tokens a page until
measured), its restores all go out with that step, and it waits in `running` (not scheduled, in
prefill or decode: with every page a hit but its last token's it has one token left, like a
decoding one) until the next step, which prefills it with its group's other members (they were
waiting for its pages). Only when nothing else can run is it prefilled at once, its step waiting
for the copies. Before (W6 on the H200, lpm): restores were not charged, so one step admitted
every restoring group that fit in memory, and their restores went out `copy_budget` pages a step;
the groups then started one or two at a time in tiny prefill steps between decode steps (403
prefill and 1,790 decode steps in the simulation against GPU-only's 193 and 1,524; now 116 and 1,534).
"""
from collections import deque
from time import monotonic

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.schedule_policy import SchedulePolicy
from nanovllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus


class Scheduler:

    def __init__(self, config: Config, num_blocks: int, num_host_blocks: int = 0):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = BlockManager(num_blocks, config.kvcache_block_size, config.enable_prefix_caching,
                                          num_host_blocks, config.host_kv_prefetch, config.host_kv_write_ahead)
        self.policy = SchedulePolicy(config.schedule_policy, config.max_wait_s, config.seed)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.max_queue_wait_s = 0.0   # longest wait from arrival to first admission (the starvation bound's check)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        bm = self.block_manager
        bm.begin_step()
        scheduled, is_prefill = self._schedule_step()
        if not scheduled and bm.copies_in_flight():
            # Everything left waits for copies not known to have landed: wait for them on the device.
            bm.wait_for_copies()
            scheduled, is_prefill = self._schedule_step()
        if scheduled:   # a step to carry them: prefetch for the queue's head, write-back ahead of eviction
            bm.background_copies(self.waiting, is_prefill, sum(s.chunk_len for s in scheduled))
        return scheduled, is_prefill

    def _schedule_step(self) -> tuple[list[Sequence], bool]:
        scheduled = self._schedule_prefill()
        if scheduled:
            return scheduled, True
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        # Prompts already admitted continue their chunks first (once their restores have landed).
        restoring = []   # admitted with pages restored from the host tier: they run once the copies went out
        landed = bm.restores_ready   # (restores_landed and in_prefill inlined: every running row, every step)
        for seq in self.running:
            if budget == 0:
                break
            if seq.restore_ticket > landed:
                # Checked before in_prefill: a request whose pages all hit but its last token's has one
                # token left, like a decoding one, and must still wait for its restores.
                restoring.append(seq)
            elif len(seq.token_ids) - seq.num_computed_tokens > 1:   # in prefill
                seq.chunk_len = min(len(seq) - seq.num_computed_tokens, budget)
                budget -= seq.chunk_len
                scheduled.append(seq)
        if self.waiting and self.policy.name != "fcfs":
            self.waiting = deque(self.policy.order(list(self.waiting), bm))
        deferred = []
        admitted = False
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if not bm.num_free_blocks:
                break  # a request's last page is never a cache hit: nothing fits without a free page
            seq = self.waiting[0]
            hits, pending = bm.match(seq)
            if pending:
                # Its prefix is being computed by a running request: take it next step, as a hit.
                deferred.append(self.waiting.popleft())
                continue
            # Its restores go out with this step and count against its token budget at their copy
            # time (at least one request a step is admitted, whatever its cost).
            restore_cost = bm.restore_token_cost(hits)
            if restore_cost > budget and (admitted or scheduled):
                break
            if not bm.can_allocate(seq, hits):
                break
            self.waiting.popleft()
            admitted = True
            budget = max(0, budget - round(restore_cost))
            if not seq.num_completion_tokens:   # a first admission, not a preempted one coming back
                self.max_queue_wait_s = max(self.max_queue_wait_s, monotonic() - seq.arrival_time)
            bm.allocate(seq, hits)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if not bm.restores_landed(seq):
                restoring.append(seq)   # its pages come from host memory while other steps run
                continue
            seq.chunk_len = min(len(seq) - seq.num_computed_tokens, budget)
            budget -= seq.chunk_len
            scheduled.append(seq)
        self.waiting.extendleft(reversed(deferred))
        if restoring and not scheduled and all(s.in_prefill or s.last_launched or not bm.restores_landed(s)
                                               for s in self.running):
            # Nothing else to run (no prefill, no decode): prefill them now; this step's forward waits for the
            # copies (the earlier steps' not known to have landed, and its own restores).
            bm.wait_for_copies()
            bm.issue_restores()
            bm.wait_for_restores = True
            budget = self.max_num_batched_tokens   # its restores are waited for, not overlapped: they cost no tokens
            for seq in restoring:
                if budget == 0:
                    break
                seq.chunk_len = min(len(seq) - seq.num_computed_tokens, budget)
                budget -= seq.chunk_len
                scheduled.append(seq)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        done: list[Sequence] = []   # their last token is in flight: nothing more to compute
        bm = self.block_manager
        # The per-row tests inlined (Sequence.in_prefill, BlockManager.restores_landed and can_append): this loop
        # runs for every row of every decode step (W2/W3: 1,024), and 15 rows in 16 need no page.
        bs, landed = bm.block_size, bm.restores_ready
        while self.running:
            seq = self.running.popleft()
            n = len(seq.token_ids)
            if seq.last_launched or n - seq.num_computed_tokens > 1 or seq.restore_ticket > landed:
                done.append(seq)   # its last token in flight; a prompt chunk left; or admitted, restores not landed
                continue
            if len(seq.block_table) * bs < n and not self._take_page(seq, done):   # its token starts a page
                continue
            seq.chunk_len = 1
            scheduled.append(seq)
        self.running.extendleft(reversed(scheduled + done))
        return scheduled

    def _take_page(self, seq: Sequence, done: list[Sequence]) -> bool:
        """A page for seq's next token, preempting the newest running sequences that still compute until one
        is free; False when seq itself was preempted (no other to take a page from)."""
        bm = self.block_manager
        while not bm.num_free_blocks:
            victim = self._newest_needing_pages(done)
            if victim is None:
                self.preempt(seq)
                return False
            self.preempt(victim)
        bm.may_append(seq)
        return True

    def _newest_needing_pages(self, done: list[Sequence]) -> Sequence | None:
        """The preemption victim: the newest running sequence that still has tokens to compute."""
        while self.running:
            seq = self.running.pop()
            if not seq.last_launched:
                return seq
            done.append(seq)
        return None

    def preempt(self, seq: Sequence):
        self.num_preemptions += 1
        self.block_manager.preempt(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def launched(self, seqs: list[Sequence]) -> list[bool]:
        """A step was handed to the GPU: its K/V count as computed, and each sequence that samples
        gets a placeholder for its token. Returns which of them sample (a prompt chunk short of the
        end does not)."""
        samples = []
        self.block_manager.launched()
        for seq in seqs:
            seq.num_computed_tokens += seq.chunk_len
            sampled = seq.num_computed_tokens == len(seq.token_ids)
            if sampled:
                seq.token_ids.append(PLACEHOLDER)
                seq.num_pending += 1
            samples.append(sampled)
        self.block_manager.mark_computed_all(seqs)   # a prompt's pages: cache hits from the next step on
        return samples

    def postprocess(self, seqs: list[Sequence], token_ids: list[int], samples: list[bool]) -> list[Sequence]:
        """A launched step was collected: fill in its tokens; returns the sequences that got one (the
        output processor then applies the stop rules to them). The oldest placeholder is this step's:
        later steps' come after it."""
        advanced = []
        for seq, token_id, sampled in zip(seqs, token_ids, samples):
            if not sampled or seq.status is SequenceStatus.FINISHED:
                continue  # a prompt chunk short of the end, or ended while this step ran
            seq.token_ids[len(seq.token_ids) - seq.num_pending] = token_id
            seq.num_pending -= 1
            advanced.append(seq)
        self.block_manager.mark_computed_all(advanced)  # a page whose last token was this step's
        return advanced

    def finish(self, seq: Sequence, reason: str):
        """The output processor ended the sequence (or it was aborted): drop the tokens of steps still
        in flight, free its pages, take it out of the queues."""
        if seq.is_finished:
            return
        if seq.num_pending:  # tokens of steps still in flight, after the end
            del seq.token_ids[len(seq) - seq.num_pending:]
            seq.num_pending = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.block_table:
            self.block_manager.deallocate(seq)
        try:
            self.running.remove(seq)
        except ValueError:
            self.waiting.remove(seq)
