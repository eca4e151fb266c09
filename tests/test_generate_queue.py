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
