"""End to end on the CPU reference path: cascade on equals cascade off, token for token."""
import random

from nanovllm import SamplingParams


def shared_prompt_batch(seed=0, vocab=1900):
    """Groups of requests behind system prompts of several lengths, one nested few-shot block, and loners."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(vocab) for _ in range(n)]
    prompts = []
    for sys_len, members in ((70, 3), (150, 4), (300, 2)):
        system = words(sys_len)
        prompts += [system + words(rng.randrange(3, 40)) for _ in range(members)]
    system, fewshot = words(100), words(90)
    prompts += [system + fewshot + words(rng.randrange(3, 30)) for _ in range(3)]   # 3 levels
    prompts += [system + words(20) for _ in range(2)]
    prompts += [words(rng.randrange(5, 60)) for _ in range(3)]                      # no sharing
    rng.shuffle(prompts)
    return prompts


def test_cascade_on_equals_off(tiny_model, make_llm):
    prompts = shared_prompt_batch()
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    off = make_llm(tiny_model).generate(prompts, sp, use_tqdm=False)
    llm = make_llm(tiny_model, enable_cascade_attention=True)
    # Once with prefixes computed in the same run, once fully from the prefix cache.
    for _ in range(2):
        on = llm.generate(prompts, sp, use_tqdm=False)
        assert [o["token_ids"] for o in on] == [o["token_ids"] for o in off]
    assert llm.stats["cascade_steps"] > 0


def test_cascade_fixed_prefix_len_and_two_levels(tiny_model, make_llm):
    prompts = shared_prompt_batch(seed=1)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    off = make_llm(tiny_model).generate(prompts, sp, use_tqdm=False)
    for kwargs in (dict(cascade_shared_prefix_len=64), dict(cascade_max_levels=2)):
        llm = make_llm(tiny_model, enable_cascade_attention=True, **kwargs)
        on = llm.generate(prompts, sp, use_tqdm=False)
        assert [o["token_ids"] for o in on] == [o["token_ids"] for o in off], kwargs
        assert llm.stats["cascade_steps"] > 0
