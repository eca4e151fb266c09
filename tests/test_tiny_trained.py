"""The shipped trained tiny Qwen3 (nanovllm/assets/): its checkpoint, its quality, and exact greedy parity.

Its greedy decisions have clear margins, unlike random weights, so these comparisons demand equality:
the engine's CPU path against transformers' own model, and cascade on against off, 64 prompts each.
The prompt builders here are shared with tests/test_gpu.py, whose exact-equality GPU tests rest on the
margins measured below for the same prompts.
"""
import functools
import json
import math
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanovllm import SamplingParams
from nanovllm.assets import corpus_split, tiny_trained_path
from nanovllm.cascade.cost_model import AlwaysCascade

MAX_TOKENS = 32                                            # generated per prompt in every parity test
PROMPT_LENGTHS = (5, 17, 33, 64, 100, 129, 250, 400)
SHARED_GROUPS = ((80, 6), (300, 8), (1000, 5), (200, 45))  # (shared prefix tokens, requests): 64 prompts
MIN_MARGIN = None  # set below from the measured distribution


@functools.lru_cache(maxsize=None)
def training_token_ids(path: str = tiny_trained_path()) -> tuple[tuple[int, ...], ...]:
    """Each training text of the corpus (held-out slice excluded), tokenized by the model's tokenizer."""
    tok = AutoTokenizer.from_pretrained(path)
    return tuple(tuple(tok.encode(text)) for text in corpus_split()[0])


def corpus_prompts(n: int = 64, seed: int = 0) -> list[list[int]]:
    """n windows of the training texts (the three works in turn), PROMPT_LENGTHS tokens long in turn."""
    rng = random.Random(seed)
    texts = training_token_ids()
    prompts = []
    for i in range(n):
        ids, length = texts[i % len(texts)], PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]
        start = rng.randrange(len(ids) - length)
        prompts.append(list(ids[start:start + length]))
    return prompts


def shared_corpus_prompts(seed: int = 0) -> list[list[int]]:
    """64 prompts in SHARED_GROUPS: a corpus window shared by the group, then each request's own window
    of 3-49 tokens from elsewhere in the corpus; shuffled."""
    rng = random.Random(seed)
    texts = training_token_ids()

    def window(length):
        ids = texts[rng.randrange(len(texts))]
        start = rng.randrange(len(ids) - length)
        return list(ids[start:start + length])

    prompts = []
    for prefix_len, members in SHARED_GROUPS:
        prefix = window(prefix_len)
        prompts += [prefix + window(rng.randrange(3, 50)) for _ in range(members)]
    rng.shuffle(prompts)
    return prompts


@functools.lru_cache(maxsize=None)
def hf_model(path: str = tiny_trained_path()):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy_with_margins(prompt: list[int], max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation (float32, the shipped bf16 weights) and, at each generated
    token, the margin top1 - top2 of the logits it was chosen from."""
    model = hf_model()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                             pad_token_id=model.config.pad_token_id)
    tokens = out.sequences[0, len(prompt):].tolist()
    margins = [float(top2[0] - top2[1]) for top2 in (step[0].topk(2).values for step in out.logits)]
    return tokens, margins


@functools.lru_cache(maxsize=None)
def reference_runs(which: str) -> tuple[list[list[int]], list[list[float]]]:
    prompts = corpus_prompts() if which == "corpus" else shared_corpus_prompts()
    runs = [hf_greedy_with_margins(p) for p in prompts]
    return [t for t, _ in runs], [m for _, m in runs]


def percentiles(values, qs=(0, 1, 5, 10, 50)) -> str:
    v = sorted(values)
    return ", ".join(f"p{q} {v[min(len(v) - 1, int(len(v) * q / 100))]:.3f}" for q in qs)


# ---- the checkpoint ---------------------------------------------------------------------------------
def test_checkpoint_folder(trained_model):
    names = set(os.listdir(trained_model))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names, names
    size = sum(os.path.getsize(os.path.join(trained_model, n)) for n in names)
    assert size < 8e6, f"{size / 1e6:.1f} MB"
    with open(os.path.join(trained_model, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["head_dim"] == 128  # FlashInfer's head size
    assert cfg["dtype"] == "bfloat16" and "rope_theta" in cfg
    tok = AutoTokenizer.from_pretrained(trained_model)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert cfg["vocab_size"] >= len(tok)


def test_held_out_loss_far_below_uniform(trained_model):
    """Next-token loss on the corpus slice training never saw, against ln(vocab) for uniform guessing."""
    tok = AutoTokenizer.from_pretrained(trained_model)
    model = hf_model()
    total, count = 0.0, 0
    for text in corpus_split()[1]:
        ids = torch.tensor(tok.encode(text))
        for start in range(0, len(ids) - 1, 256):
            window = ids[start:start + 257]
            with torch.no_grad():
                logits = model(window[None, :-1]).logits[0]
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    loss, uniform = total / count, math.log(model.config.vocab_size)
    print(f"held-out loss {loss:.3f} nats over {count} tokens; uniform {uniform:.3f}")
    assert loss < uniform - 3.0, (loss, uniform)


def test_continues_a_corpus_sentence_with_words(trained_model, make_llm):
    llm = make_llm(trained_model)
    out = llm.generate(["Alice was beginning to get very tired of"],
                       SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]["text"]
    print(repr(out))
    words = [w.strip(".,;:!?'`\"()-").lower() for w in out.split()]
    corpus_words = {w.strip(".,;:!?'`\"()-").lower() for t in corpus_split()[0] for w in t.split()}
    assert len(words) >= 8 and all(w in corpus_words for w in words if w), words


# ---- margins: why exact equality is a fair demand ---------------------------------------------------
@pytest.mark.parametrize("which", ["corpus", "shared"])
def test_greedy_margins_confident(which):
    """Along the greedy paths of the parity tests' prompts, the float32 logit gap between the chosen token
    and the runner-up: report the distribution; it must stay well above bf16 rounding of the logits."""
    _, margins = reference_runs(which)
    flat = [m for row in margins for m in row]
    print(f"{which} prompts, {len(flat)} greedy decisions, top1 - top2 logit margin: {percentiles(flat)}")
    assert min(flat) >= MIN_MARGIN, percentiles(flat)


# ---- exact parity -----------------------------------------------------------------------------------
def test_engine_greedy_equals_transformers(trained_model, make_llm):
    """The engine's CPU path (PyTorch paged attention, float32) against transformers' generate, 64 prompts."""
    expected, _ = reference_runs("corpus")
    llm = make_llm(trained_model, max_model_len=2048)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = [o["token_ids"] for o in llm.generate(corpus_prompts(), sp, use_tqdm=False)]
    assert got == expected


def test_greedy_cascade_on_equals_off(trained_model, make_llm):
    """64 requests behind four shared prefixes (up to 1,000 tokens): cascade decode on every step it can,
    against regular attention, token for token; both against transformers."""
    prompts = shared_corpus_prompts()
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    off = make_llm(trained_model, max_model_len=2048)
    expected = [o["token_ids"] for o in off.generate(prompts, sp, use_tqdm=False)]
    on = make_llm(trained_model, max_model_len=2048, enable_cascade_attention=True)
    on.step_builder.cascade.cost_model = AlwaysCascade()
    got = [o["token_ids"] for o in on.generate(prompts, sp, use_tqdm=False)]
    assert on.stats["cascade_steps"] > 0
    assert got == expected
    assert expected == reference_runs("shared")[0]
