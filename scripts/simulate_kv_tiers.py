"""W6 on the scheduler side alone: the real Scheduler and BlockManager, no model (every sampled token
is 0, which only changes the hashes of answer pages, never shared). Reports the prompt tokens a run
would recompute, the host-tier traffic, preemptions and the scheduler's own host time per step, for
the GPU page cap and host tier given. No GPU needed: the recompute counts are what bench.py's W6
would see on any GPU with the same caps (the order of steps does not depend on their speed).

It also replays the steps on a timing model of one GPU (`modelled_seconds`; a model, not a
measurement): a compute stream and one copy stream, ordered as engine/host_tier.py orders them (a
step's forward waits for its own write-backs, for its restores if it reads them, and for all of the
previous step's copies); `--copy-feedback` models the opt-in per-page waits (Timeline's doc), and
`modelled_stall_by` says what the forwards waited for. Session 9 used it to predict that feedback
on two copy streams would take W6 fcfs at 1.7B from 51.6 to 46.3 modelled seconds; the H200 then
showed both copy directions sharing ~50 GB/s (the model's two streams are independent, so it does
not apply) and with one stream the model and the GPU agree that feedback changes little (51.7 vs
51.9 modelled; 51.0 vs 50.7 s measured). Session 11: with feedback, the forwards' stall was their own
write-backs (9.6 of 9.9 s) queued behind earlier restores on the one stream; since then a forward takes
clean pages for what it writes and waits for its batch's write-backs only if it writes one of those
pages (engine/block_manager.py `_next_free`, `wait_own_out`): 47.25 modelled seconds at 1.7B rates (below),
not yet measured on a GPU. Its rates: prefill PREFILL_US_PER_TOKEN, a decode step DECODE_FIXED_MS plus
its KV bytes at DECODE_GB_S, a page copy COPY_US_PER_PAGE (1.835 MB at the 43 GB/s measured on the
H200 in session 5). The prefill and decode rates are estimates, not fitted: the model gives 51.2 s for
the H200's GPU-only W6 (measured 47.99 s, +7%) and 59.7 s for the old host-tier fcfs run (measured
61.64 s, -3%); claude_docs/memory.md has the table.

    python scripts/simulate_kv_tiers.py                              # GPU-only, 16,384 pages
    python scripts/simulate_kv_tiers.py --host-pages 35700           # + host tier (64 GB at 0.6B pages)
    python scripts/simulate_kv_tiers.py --host-pages 35700 --policy lpm
    python scripts/simulate_kv_tiers.py --host-pages 35700 --no-prefetch --no-write-ahead
    # W6 at the H200's 1.7B rates (restore 48 us a page vs prefill 5.1 us a token: the rule restores)
    python scripts/simulate_kv_tiers.py --host-pages 34900 --policy lpm --restore-us 48 --write-back-us 64 \
        --prefill-us-per-token 5.1 [--prefill-fixed-ms 14.6]

It reports prefill and decode steps, requests a decode step and `restoring_request_steps` (steps
summed over the requests waiting in `running` for their restores): the batching to compare with
GPU-only. `--prefill-fixed-ms 14.6` is the fixed cost of a prefill step implied by the H200's
GPU-only 1.7B lpm run (11.93 s in 193 steps for 1,788,740 tokens at 5.1 us a token).

The swap-or-recompute rule and the copy budget are the engine's (engine/copy_costs.py), fed the
model's times as the engine feeds it the device's. `--cost-rule old` runs the rule before session 6's
fix; with the H200's copy rates (`--write-back-us 78.6 --restore-us 47.7`) and `--policy lpm` it
reproduces that session's lpm run (2,276,110 prefilled tokens, GPU 2,275,526; 281 preemptions, GPU
281; restores off after the first copies). The model's decode cost charges every request's prefix
bytes, so it is far off for lpm, whose groups read shared pages (40.5 s modelled, 28.07 s measured).
"""
import argparse
import json
import time
from types import SimpleNamespace

from nanovllm.benchmark import w6
from nanovllm.engine.copy_costs import MIN_LINE_TOKENS, CopyCosts
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence

PREFILL_US_PER_TOKEN = 3.2
PREFILL_FIXED_MS = 0.5
DECODE_FIXED_MS = 0.6
DECODE_GB_S = 4000.0
KV_BYTES_PER_TOKEN = 114_688     # Qwen3-0.6B, bf16: 28 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
COPY_US_PER_PAGE = 42.5


class Timeline:
    """The device's streams, step by step (seconds). `feedback` (the engine with
    NANOVLLM_HOST_COPY_FEEDBACK=1): a
    forward waits for the earlier copies only as far as its step says, and the engine learns which
    copies landed when it collects a step (`landed`); write-backs then restores on one copy stream
    (`copy_streams` 1, the engine's default) or on a stream each, waiting for each other only where a
    step's copies say so (2: modelled as independent, which the H200 is not: both directions share
    ~50 GB/s). Without feedback (the engine before): one copy stream (write-backs, restores,
    write-backs ahead) and every forward waits for all of the previous step's copies."""

    def __init__(self, write_back_us: float = COPY_US_PER_PAGE, restore_us: float = COPY_US_PER_PAGE,
                 feedback: bool = True, copy_streams: int = 1):
        self.write_back_s, self.restore_s = write_back_us * 1e-6, restore_us * 1e-6
        self.feedback = feedback
        self.one_stream = copy_streams == 1
        self.main = self.copy = self.prev_copies = 0.0
        self.out_free = self.in_free = 0.0   # feedback: when each copy stream is free
        self.copy_busy = self.stalled = 0.0
        self.stall_by: dict[str, float] = {}   # stall seconds by what the forward waited for last
        self.out_ends: list[tuple[int, float]] = []   # (copy batch, end of its write-backs), in order
        self.in_ends: list[tuple[int, float]] = []    # (copy batch, end of its restores)
        self.forward_ends: list[float] = []
        self.batches: list[int] = []   # each step's copy batch

    def step(self, compute_s: float, copies) -> tuple[float, float, float]:
        """One step with its copies (engine/block_manager.StepCopies). Returns its stall (the forward
        waiting for copies), copy and restore seconds."""
        out, restore, ahead = len(copies.swap_out), len(copies.swap_in), len(copies.write_ahead)
        after = self.main if copies.after_prev else 0.0
        if self.feedback:
            up_to = lambda ends, batch: max((e for b, e in ends if b <= batch), default=0.0)  # noqa: E731
            start = max(self.out_free, after, up_to(self.in_ends, copies.out_after_in))
            written_back = start + out * self.write_back_s
            out_end = written_back + ahead * self.write_back_s
            if out or ahead:
                self.out_free = out_end
                self.out_ends.append((copies.batch, out_end))
            own = copies.in_after_out == copies.batch
            in_start = max(self.out_free if self.one_stream else self.in_free, after,
                           written_back if own else up_to(self.out_ends, copies.in_after_out))
            restored = in_start + restore * self.restore_s
            if restore:
                self.in_free = restored
                if self.one_stream:
                    self.out_free = restored
                self.in_ends.append((copies.batch, restored))
            busy = (out_end - start) + (restored - in_start)
            restore_s = restored - in_start
            earlier = max(up_to(self.in_ends, copies.wait_in), up_to(self.out_ends, copies.wait_out))
        else:
            start = max(self.copy, after)
            written_back = start + out * self.write_back_s
            restored = written_back + restore * self.restore_s
            end = restored + ahead * self.write_back_s
            if out or restore or ahead:
                self.copy = end
            busy, restore_s = end - start, restored - written_back
            earlier = max(self.prev_copies, written_back)   # one stream: its write-backs follow all before
            self.prev_copies = end if (out or restore or ahead) else 0.0
        self.copy_busy += busy if (out or restore or ahead) else 0.0
        waits = {"earlier batches": earlier, "own write-backs": written_back if out and copies.wait_own_out else 0.0,
                 "own restores": restored if copies.wait_for_restores else 0.0}
        ready = max(self.main, *waits.values())
        stall = ready - self.main
        if stall > 0:
            cause = max(waits, key=waits.get)
            self.stall_by[cause] = self.stall_by.get(cause, 0.0) + stall
        self.stalled += stall
        self.main = ready + compute_s
        self.forward_ends.append(self.main)
        self.batches.append(copies.batch)
        return stall, busy, restore_s

    def landed(self) -> tuple[int, int]:
        """(in, out): the last batch whose restores / write-backs the engine knows complete when it
        schedules the next step: it collected the step before the last one launched (overlapped
        steps), once that step's forward ended."""
        if len(self.forward_ends) < 2:
            return -1, -1
        seen = self.forward_ends[-2]
        return tuple(next((b - 1 for b, e in ends if e > seen), self.batches[-2])
                     for ends in (self.in_ends, self.out_ends))


class OldRule:
    """The cost rules before session 6's fix (llm_engine._update_restore_cost then), fed the model's
    times as the engine fed them: all copies' seconds a page (write-backs included) against the wall
    seconds of the prefill steps a token (their waits for copies included), and a step's budget from
    those wall times."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.copy_s = self.prefill_s = self.decode_s = 0.0
        self.copy_pages = self.prefill_tokens = self.decode_steps = 0

    def observe(self, wall_s: float, prefill_tokens: int, copy_s: float, pages: int):
        self.copy_s += copy_s
        self.copy_pages += pages
        if prefill_tokens:
            self.prefill_s += wall_s
            self.prefill_tokens += prefill_tokens
        else:
            self.decode_s += wall_s
            self.decode_steps += 1

    def restore_pays(self) -> bool:
        if not self.copy_s or not self.prefill_tokens:
            return True
        return self.copy_s / self.copy_pages < self.prefill_s / self.prefill_tokens * self.block_size

    def step_budget(self, is_prefill: bool, tokens: int) -> int:
        if not self.copy_s or not self.prefill_tokens or not self.decode_steps:
            return 128
        forward = self.prefill_s / self.prefill_tokens * tokens if is_prefill else self.decode_s / self.decode_steps
        return int(min(max(forward / (self.copy_s / self.copy_pages), 8), 4096))


def step_seconds(batch, is_prefill: bool, prefill_us_per_token: float = PREFILL_US_PER_TOKEN,
                 prefill_fixed_ms: float = PREFILL_FIXED_MS) -> float:
    if is_prefill:
        return prefill_fixed_ms * 1e-3 + sum(s.chunk_len for s in batch) * prefill_us_per_token * 1e-6
    kv_bytes = sum(len(s) for s in batch) * KV_BYTES_PER_TOKEN
    return DECODE_FIXED_MS * 1e-3 + kv_bytes / (DECODE_GB_S * 1e9)


def simulate(gpu_pages: int, host_pages: int, policy: str, max_num_seqs: int = 512,
             max_num_batched_tokens: int = 16384, block_size: int = 16, prefetch: bool = True,
             write_ahead: bool = True, cost_rule: str = "measured", write_back_us: float = COPY_US_PER_PAGE,
             restore_us: float = COPY_US_PER_PAGE, prefill_us_per_token: float = PREFILL_US_PER_TOKEN,
             prefill_fixed_ms: float = PREFILL_FIXED_MS, copy_feedback: bool = False, copy_streams: int = 1,
             **workload) -> dict:
    config = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=4352, eos_token_ids=(), kvcache_block_size=block_size,
                             enable_prefix_caching=True, schedule_policy=policy, max_wait_s=1e9, seed=0,
                             host_kv_prefetch=prefetch, host_kv_write_ahead=write_ahead)
    scheduler = Scheduler(config, gpu_pages, host_pages)
    finishing = OutputProcessor(None, scheduler, (), config.max_model_len)  # the stop rules (length here)
    bm = scheduler.block_manager
    timeline = Timeline(write_back_us, restore_us, copy_feedback, copy_streams)
    bm.sync_copies = not copy_feedback
    costs = (CopyCosts(block_size, min_line_tokens=min(MIN_LINE_TOKENS, max_num_batched_tokens // 4))
             if cost_rule == "measured" else OldRule(block_size))   # fed the model's times, as the engine sizes it
    bm.costs = costs
    restore_pays_changes = prefill_steps = decode_rows = restoring_waits = 0
    prefilled = steps = 0
    schedule_seconds = 0.0
    prompt_tokens = 0
    for prompts, params in w6(**workload):
        seqs = [Sequence(p, sp, block_size) for p, sp in zip(prompts, params)]
        prompt_tokens += sum(len(p) for p in prompts)
        for seq in seqs:
            scheduler.add(seq)
        in_flight = None   # as the engine: step N+1 is scheduled before step N's tokens come back
        while not all(seq.is_finished for seq in seqs):
            if copy_feedback:
                bm.copies_landed(*timeline.landed())
            t = time.perf_counter()
            batch, is_prefill = scheduler.schedule()
            copies = bm.take_copies()
            swap_out, swap_in, ahead = copies.swap_out, copies.swap_in, copies.write_ahead
            launched = None
            if batch:
                launched = (batch, scheduler.launched(batch))
                finishing.launched(*launched)
            schedule_seconds += time.perf_counter() - t
            if batch:
                steps += 1
                prefilled += sum(s.chunk_len for s in batch) if is_prefill else 0
                compute = step_seconds(batch, is_prefill, prefill_us_per_token, prefill_fixed_ms)
                if not is_prefill:
                    decode_rows += len(batch)
                restoring_waits += sum(not bm.restores_landed(s) for s in scheduler.running)
                pages = len(swap_out) + len(swap_in) + len(ahead)
                stall, copy_s, restore_s = timeline.step(compute, copies)
                tokens = sum(s.chunk_len for s in batch) if is_prefill else 0
                prefill_steps += is_prefill
                # What the engine reads once the step is collected (llm_engine._observe_step_times).
                if cost_rule == "measured":
                    costs.observe_forward(compute, tokens)
                    costs.observe_copies(copy_s, pages, restore_s, len(swap_in), stall)
                else:
                    costs.observe(stall + compute, tokens, copy_s, pages)
                pays = costs.restore_pays()
                restore_pays_changes += pays != bm.restore_pays
                bm.restore_pays = pays
            if in_flight is not None:
                finishing.process(scheduler.postprocess(in_flight[0], [0] * len(in_flight[0]), in_flight[1]))
            in_flight = launched
        if in_flight is not None:
            finishing.process(scheduler.postprocess(in_flight[0], [0] * len(in_flight[0]), in_flight[1]))
    return dict(gpu_pages=gpu_pages, host_pages=host_pages, policy=policy, prefetch=prefetch, write_ahead=write_ahead,
                prompt_tokens=prompt_tokens, prefilled_tokens=prefilled, cached_prompt_tokens=bm.num_cache_hit_tokens,
                host_hit_tokens=bm.num_host_hit_tokens, pages_to_host=bm.num_swapped_out,
                pages_from_host=bm.num_swapped_in, pages_prefetched=getattr(bm, "num_prefetched", 0),
                pages_written_ahead=getattr(bm, "num_written_ahead", 0), host_pages_dropped=bm.num_host_dropped,
                preemptions=scheduler.num_preemptions, steps=steps, prefill_steps=prefill_steps,
                decode_steps=steps - prefill_steps,
                requests_per_decode_step=round(decode_rows / max(steps - prefill_steps, 1), 1),
                restoring_request_steps=restoring_waits,
                scheduler_ms_per_step=round(1000 * schedule_seconds / steps, 3),
                modelled_seconds=round(timeline.main, 2), modelled_copy_busy_s=round(timeline.copy_busy, 2),
                modelled_forward_stalled_s=round(timeline.stalled, 2),
                modelled_stall_by={k: round(v, 2) for k, v in timeline.stall_by.items()}, cost_rule=cost_rule,
                restore_pays=bm.restore_pays, restore_pays_changes=restore_pays_changes, copy_feedback=copy_feedback,
                copy_streams=copy_streams)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-pages", type=int, default=16384)
    p.add_argument("--host-pages", type=int, default=0)
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "lpm", "dfs-weight", "random"])
    p.add_argument("--tenants", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--write-ahead", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cost-rule", default="measured", choices=["measured", "old"],
                   help="swap-or-recompute rule: engine/copy_costs.py's, or the one before session 6's fix")
    p.add_argument("--write-back-us", type=float, default=COPY_US_PER_PAGE, help="modelled write-back a page")
    p.add_argument("--restore-us", type=float, default=COPY_US_PER_PAGE, help="modelled restore a page")
    p.add_argument("--prefill-us-per-token", type=float, default=PREFILL_US_PER_TOKEN,
                   help="modelled prefill a token (the restore-or-recompute rule compares 16 of these with a restore)")
    p.add_argument("--prefill-fixed-ms", type=float, default=PREFILL_FIXED_MS, help="modelled prefill step, fixed part")
    p.add_argument("--copy-feedback", action=argparse.BooleanOptionalAction, default=False,
                   help="forwards wait only for the copies they need, landed as the runner reports (the engine "
                        "with NANOVLLM_HOST_COPY_FEEDBACK=1); default: every forward waits for the earlier copies")
    p.add_argument("--copy-streams", type=int, default=1, choices=[1, 2], help="write-backs and restores on one "
                   "copy stream (the engine's default) or two (modelled as independent)")
    args = p.parse_args(argv)
    result = simulate(args.gpu_pages, args.host_pages, args.policy, prefetch=args.prefetch,
                      write_ahead=args.write_ahead, cost_rule=args.cost_rule, write_back_us=args.write_back_us,
                      restore_us=args.restore_us, prefill_us_per_token=args.prefill_us_per_token,
                      prefill_fixed_ms=args.prefill_fixed_ms, copy_feedback=args.copy_feedback,
                      copy_streams=args.copy_streams,
                      tenants=args.tenants, rounds=args.rounds)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
