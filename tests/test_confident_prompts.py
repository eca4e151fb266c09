"""CPU evidence for the confident prompt sets of tests/confident_prompts.py (the strict GPU parity tests'
prompts): the cache holds what the selection makes, every cached choice is confident in float32, bf16
rounding shrinks no choice's lead by half the margin threshold, and bf16 paths give exactly the float32
tokens on all 64 prompts of each set: transformers in bf16 (weights and activations), and the engine's
CPU path (torch attention backend) in bf16, cascade on and off.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from confident_prompts import (CONFIDENT_MARGIN, CONFIDENT_TOKENS, SETS, confident_set, float32_logits,
                               lead_errors, load_cache, partings, select_corpus, select_shared)
from test_parity import engine_logits
from test_tiny_trained import SHARED_GROUPS, hf_greedy_with_margins, hf_model, percentiles

from nanovllm import SamplingParams
from nanovllm.assets import tiny_trained_path
from nanovllm.cascade.cost_model import AlwaysCascade

SP = SamplingParams(temperature=0, max_tokens=CONFIDENT_TOKENS, ignore_eos=True)


def hf_bf16_model():
    return AutoModelForCausalLM.from_pretrained(tiny_trained_path(), dtype=torch.bfloat16).eval()


def assert_float32_tokens(what, which, got, engine=None):
    """got == the cached float32 tokens, prompt for prompt; else every parting, with margins."""
    prompts, expected, margins = confident_set(which)
    rows = (lambda bad: [r for _, r in engine_logits(engine, [prompts[i] for i in bad], CONFIDENT_TOKENS - 1)]
            ) if engine is not None else None
    report = partings(what, prompts, got, expected, margins, rows)
    assert not report, "\n".join(report)


@pytest.mark.parametrize("which", SETS)
def test_cached_choices_confident_in_float32(which):
    """transformers' float32 greedy tokens from each cached prompt are the cached ones, each won by at least
    CONFIDENT_MARGIN; the shared set keeps SHARED_GROUPS' groups."""
    prompts, expected, _ = confident_set(which)
    assert len(prompts) == 64
    runs = [hf_greedy_with_margins(hf_model(), p, CONFIDENT_TOKENS) for p in prompts]
    flat = [m for _, row in runs for m in row]
    lengths = sorted(len(p) for p in prompts)
    searched = sum(r["draws"] for r in load_cache()[which])
    print(f"{which}: prompts of {lengths[0]}-{lengths[-1]} tokens (median {lengths[32]}), {len(flat)} float32 "
          f"greedy choices, margin {percentiles(flat)}; windows searched {searched}")
    assert [t for t, _ in runs] == expected
    assert min(flat) >= CONFIDENT_MARGIN
    if which == "shared":
        groups = {}
        for p in prompts:
            groups[tuple(p[:16])] = groups.get(tuple(p[:16]), 0) + 1   # the first KV page of the shared prefix
        assert sorted(groups.values()) == sorted(m for _, m in SHARED_GROUPS)


def test_cache_is_the_selection():
    """Re-running the selection reproduces the cache: corpus prompts 1-4 (17-100 token windows) and the
    first member of each shared group (each draws from its own seeded generator; the whole selection
    takes about 2 minutes on a free core)."""
    assert select_corpus(only=range(1, 5)) == load_cache()["corpus"][1:5]
    for row in select_shared(members_cap=1):
        assert row in load_cache()["shared"], row["prompt"][:16]


@pytest.mark.parametrize("which", SETS)
def test_transformers_bf16_gives_float32_tokens(which):
    """transformers with bf16 weights and activations: exactly the float32 greedy tokens on all 64 prompts;
    and on those paths bf16 shrinks no float32 winner's lead by more than half the margin threshold."""
    prompts, expected, margins = confident_set(which)
    model = hf_bf16_model()
    got = [hf_greedy_with_margins(model, p, CONFIDENT_TOKENS)[0] for p in prompts]
    report = partings("transformers bf16", prompts, got, expected, margins)
    assert not report, "\n".join(report)
    errors = []
    for p, e, reference in zip(prompts, expected, float32_logits(which)):
        with torch.no_grad():
            errors += lead_errors(model(torch.tensor([p + e[:-1]])).logits[0, len(p) - 1:], reference)
    print(f"{which}: transformers bf16 shrinks a float32 lead by {percentiles(errors, (50, 99, 100))}")
    assert max(errors) < CONFIDENT_MARGIN / 2


def test_engine_bf16_gives_float32_tokens(trained_model, make_llm):
    """The engine's CPU path (torch attention backend) in bf16, 64 confident corpus prompts: exactly the
    float32 tokens; and its logits shrink no float32 lead by half the margin threshold."""
    prompts, _, _ = confident_set("corpus")
    llm = make_llm(trained_model, dtype="bfloat16")
    got = [o["token_ids"] for o in llm.generate(prompts, SP, use_tqdm=False)]
    assert_float32_tokens("engine bf16", "corpus", got, llm)
    runs = engine_logits(llm, prompts, CONFIDENT_TOKENS - 1)
    errors = [x for (_, rows), reference in zip(runs, float32_logits("corpus")) for x in lead_errors(rows, reference)]
    print(f"engine bf16 (torch backend, CPU) shrinks a float32 lead by {percentiles(errors, (50, 99, 100))}")
    assert max(errors) < CONFIDENT_MARGIN / 2


def test_engine_bf16_cascade_on_and_off_give_float32_tokens(trained_model, make_llm):
    """64 confident prompts behind four shared prefixes, the engine's CPU path in bf16: cascade decode on
    every step it can and regular attention both give exactly the float32 tokens; cascade's logits
    shrink no float32 lead by half the margin threshold."""
    prompts, _, _ = confident_set("shared")
    off = make_llm(trained_model, dtype="bfloat16")
    assert_float32_tokens("cascade off, bf16", "shared",
                          [o["token_ids"] for o in off.generate(prompts, SP, use_tqdm=False)], off)
    on = make_llm(trained_model, dtype="bfloat16", enable_cascade_attention=True)
    on.step_builder.cascade.cost_model = AlwaysCascade()
    got = [o["token_ids"] for o in on.generate(prompts, SP, use_tqdm=False)]
    assert on.stats["cascade_steps"] > 0
    assert_float32_tokens("cascade on, bf16", "shared", got, on)
    runs = engine_logits(on, prompts, CONFIDENT_TOKENS - 1)
    errors = [x for (_, rows), reference in zip(runs, float32_logits("shared")) for x in lead_errors(rows, reference)]
    print(f"engine bf16 cascade on (CPU) shrinks a float32 lead by {percentiles(errors, (50, 99, 100))}")
    assert max(errors) < CONFIDENT_MARGIN / 2
