"""LLM.generate queues its requests QUEUE_AHEAD ahead of the scheduler, validating the rest between steps
(nanovllm/llm.py): the outputs are those of queueing everything first, every step stays as full, a bad request
found late raises and leaves nothing queued, and a policy other than fcfs still sees the whole queue."""
import random

import pytest

import nanovllm.llm as llm_module
from nanovllm import SamplingParams


def shared_prefix_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts over 3 system prompts of 40 ids, each with 6 ids of its own."""
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(40)] for _ in range(3)]
    return [systems[i % 3] + [rng.randrange(vocab) for _ in range(6)] for i in range(n)]


def waiting_at_each_step(llm, monkeypatch) -> list[int]:
    """The scheduler's waiting requests as each step() begins, recorded into the returned list."""
    waiting = []
    step = llm.step

    def counting_step():
        waiting.append(len(llm.scheduler.waiting))
        return step()
    monkeypatch.setattr(llm, "step", counting_step)
    return waiting


def test_outputs_and_steps_do_not_depend_on_how_far_ahead_requests_are_queued(tiny_model, make_llm, monkeypatch):
    kwargs = dict(enable_cascade_attention=True, max_num_batched_tokens=64)
    first = make_llm(tiny_model, **kwargs)   # all 20 queued before the first step (QUEUE_AHEAD 256)
    prompts = shared_prefix_prompts(20, first.vocab_size)
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)
    all_first = first.generate(prompts, sp, use_tqdm=False)
    # 8 ahead: a step admits at most 64 tokens (a request's 6 own ids on a cached prefix, or a whole prompt), so the
    # scheduler would run short of waiting requests only if generate fell behind.
    monkeypatch.setattr(llm_module, "QUEUE_AHEAD", 8)
    llm = make_llm(tiny_model, **kwargs)
    waiting = waiting_at_each_step(llm, monkeypatch)
    ahead = llm.generate(prompts, sp, use_tqdm=False)
    assert [o["token_ids"] for o in ahead] == [o["token_ids"] for o in all_first]
    assert [o["prompt_token_ids"] for o in ahead] == prompts
    assert llm.stats["prefill_steps"] == first.stats["prefill_steps"]   # every step as full as with all queued
    assert llm.stats["steps"] == first.stats["steps"]
    assert waiting[0] == 8 and max(waiting) <= 8                          # never more than QUEUE_AHEAD waiting


def test_a_bad_request_found_between_steps_raises_and_leaves_nothing_queued(tiny_model, make_llm, monkeypatch):
    llm = make_llm(tiny_model)
    monkeypatch.setattr(llm_module, "QUEUE_AHEAD", 2)
    prompts = shared_prefix_prompts(10, llm.vocab_size)
    prompts[7] = [llm.vocab_size + 5] * 4   # out of the vocabulary: refused when it is made, after some steps
    steps = llm.stats["steps"]
    with pytest.raises(ValueError, match="out of range"):
        llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=30), use_tqdm=False)
    assert llm.stats["steps"] > steps            # it was found between steps, not before the first
    assert not llm.seqs and llm.is_finished()    # the call's queued requests were aborted (make_llm checks pages)
    assert llm.generate(["still serving"], SamplingParams(max_tokens=3), use_tqdm=False)[0]["token_ids"]


def test_a_policy_other_than_fcfs_sees_every_request_before_the_first_step(tiny_model, make_llm, monkeypatch):
    llm = make_llm(tiny_model, schedule_policy="lpm")
    monkeypatch.setattr(llm_module, "QUEUE_AHEAD", 2)
    waiting = waiting_at_each_step(llm, monkeypatch)
    out = llm.generate(shared_prefix_prompts(12, llm.vocab_size), SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out) == 12 and waiting[0] == 12


def test_the_progress_bar_counts_each_finished_request_once(tiny_model, make_llm, monkeypatch):
    """generate's bar advances by the requests that finish in each step (counted from the engine's unfinished
    requests, not from the outputs), ending at the number of prompts; without a bar nothing is counted."""
    counted = []

    class Bar:
        def __init__(self, total, disable, **kwargs):
            self.disable = disable
            counted.append(0)

        def update(self, n):
            assert not self.disable
            counted[-1] += n

        def set_postfix(self, **kwargs):
            assert not self.disable

        def close(self):
            pass
    monkeypatch.setattr(llm_module, "tqdm", Bar)
    llm = make_llm(tiny_model)
    prompts = shared_prefix_prompts(12, llm.vocab_size)
    lengths = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=2 + i % 5) for i in range(12)]
    llm.generate(prompts, lengths, use_tqdm=True)
    llm.generate(prompts, lengths, use_tqdm=False)
    assert counted == [12, 0]


def device_busy_for(llm, monkeypatch, polls: int) -> list[int]:
    """Each step's tokens are 'not ready' for its first `polls` readiness checks (a device still running it, as
    the CPU path never is); returns the list of requests queued while waiting, one entry a check."""
    execute, queued = llm.executor.execute, []

    def slow_execute(step):
        pending = execute(step)
        left = [polls]

        def ready():
            left[0] -= 1
            queued.append(len(llm.scheduler.waiting))
            return left[0] < 0
        pending.ready = ready
        return pending
    monkeypatch.setattr(llm.executor, "execute", slow_execute)
    return queued


def test_requests_are_queued_while_the_device_runs_a_step(tiny_model, make_llm, monkeypatch):
    """Past QUEUE_AHEAD, generate queues QUEUE_WHILE_BUSY requests at a time while the host waits for a step
    (LLMEngine.idle_work): the outputs are those of queueing everything first, and the whole call is queued after
    a few steps instead of as the scheduler admits it."""
    kwargs = dict(enable_cascade_attention=True, max_num_batched_tokens=64)
    first = make_llm(tiny_model, **kwargs)
    prompts = shared_prefix_prompts(30, first.vocab_size)
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)
    all_first = first.generate(prompts, sp, use_tqdm=False)
    monkeypatch.setattr(llm_module, "QUEUE_AHEAD", 4)
    monkeypatch.setattr(llm_module, "QUEUE_WHILE_BUSY", 3)
    llm = make_llm(tiny_model, **kwargs)
    waiting = waiting_at_each_step(llm, monkeypatch)
    made, make_sequence = [], llm.make_sequence
    monkeypatch.setattr(llm, "make_sequence", lambda *a: made.append(len(waiting)) or make_sequence(*a))
    device_busy_for(llm, monkeypatch, polls=2)
    out = llm.generate(prompts, sp, use_tqdm=False)
    assert [o["token_ids"] for o in out] == [o["token_ids"] for o in all_first]
    assert [o["prompt_token_ids"] for o in out] == prompts
    assert llm.stats["steps"] == first.stats["steps"]
    assert waiting[0] == 4 and max(waiting) > 4   # queued past QUEUE_AHEAD while steps ran
    # Two busy checks a collect, 3 requests each: the other 26 are made by the 5th of the 15 steps (4 ahead of
    # the scheduler alone, the last would be made once the waiting ones run short, near the end).
    assert len(made) == 30 and made[-1] <= 5, made
    assert llm.idle_work is None


def test_a_bad_request_found_while_the_device_runs_raises_and_leaves_nothing_queued(tiny_model, make_llm,
                                                                                    monkeypatch):
    llm = make_llm(tiny_model)
    monkeypatch.setattr(llm_module, "QUEUE_AHEAD", 2)
    monkeypatch.setattr(llm_module, "QUEUE_WHILE_BUSY", 2)
    queued = device_busy_for(llm, monkeypatch, polls=5)
    prompts = shared_prefix_prompts(10, llm.vocab_size)
    prompts[7] = [llm.vocab_size + 5] * 4
    with pytest.raises(ValueError, match="out of range"):
        llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=30), use_tqdm=False)
    assert queued   # found while a step ran
    assert not llm.seqs and llm.is_finished() and llm.in_flight is None and llm.idle_work is None
    assert llm.generate(["still serving"], SamplingParams(max_tokens=3), use_tqdm=False)[0]["token_ids"]
