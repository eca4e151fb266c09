"""Confident prompts of the shipped trained tiny model: prompts whose next CONFIDENT_TOKENS float32 greedy
choices all win by a top1 - top2 logit margin of at least CONFIDENT_MARGIN, far above what bf16 rounding
moves that gap by, so any two correct bf16 implementations must give the float32 tokens exactly (any
divergence on them is a bug). Used by tests/test_confident_prompts.py (CPU evidence) and tests/test_gpu.py's
`confident` tests (FlashInfer vs the torch reference backend; cascade on vs off, each shared-level kernel).

Measured on CPU (this machine; claude_docs/tiny_trained.md), float32 greedy paths of 512 corpus windows:
- bf16 rounding of the activations (the weights ship in bf16, so float32 runs them exactly) moves a greedy
  choice's lead over any rival, max_j (e_j - e_top1) with e = bf16 - float32 logits, by at most 0.214 (p99
  0.115, median 0.039, 4,096 decisions, transformers in bf16). So a choice with a float32 margin >= 0.5 (2.3x
  that) is the same in every bf16 path, and by induction the whole bf16 path is the float32 path.
- But the model is small: half of its greedy decisions have margins under 0.5, so a whole 16- or 32-token
  path of one prompt is never that confident (0 of 512 windows at 16 tokens from the window's end; 4 of
  512 at 8). So the prompt is a corpus window followed by the start of its own float32 greedy
  continuation, up to the first point where CONFIDENT_TOKENS confident choices follow in a row (within
  SEARCH_TOKENS greedy tokens): 97 of 512 windows have one at 8 tokens (3 of 512 at 16), most of them
  in Alice's prose (83 of 171 windows; As You Like It 13 of 171, Paradise Lost 1 of 170), so the sets
  are mostly Alice.

Selecting searches 940 windows for the two sets (168 s, 118 s of CPU, on this 2-core machine shared with
other test runs), so the selection is cached in tests/data/confident_prompts.json (`python
tests/confident_prompts.py` rewrites it) with the sha256 of the weights it was made from; the tests
re-check every cached choice's tokens and margins in float32, and re-run the selection of some prompts
of each set to check that the file is its output.
"""
import functools
import hashlib
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: the tests' helpers

from test_tiny_trained import (PROMPT_LENGTHS, SHARED_GROUPS, corpus_window,  # noqa: E402
                               hf_greedy_with_margins, hf_model)

from nanovllm.assets import tiny_trained_path  # noqa: E402

CONFIDENT_MARGIN = 0.5   # float32 top1 - top2 logit gap of every checked choice (bf16 shrinks a lead <= 0.22)
CONFIDENT_TOKENS = 8     # greedy tokens checked a prompt (16 would qualify 3 windows of 512)
SEARCH_TOKENS = 64       # greedy tokens past a window searched for a confident run
MAX_DRAWS = 100          # windows drawn per prompt before giving up (about 5 needed at a 19% yield)
CACHE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "confident_prompts.json")
SETS = ("corpus", "shared")


def weights_sha256(path: str = tiny_trained_path()) -> str:
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def confident_prompt(model, window: list[int]) -> dict | None:
    """The window plus the start of its float32 greedy continuation up to the first run of CONFIDENT_TOKENS
    choices of margin >= CONFIDENT_MARGIN, with that run's tokens and margins, re-measured from the extended
    prompt itself (a prefill computes them slightly differently from the decode steps that found them);
    None if the first SEARCH_TOKENS greedy tokens hold no such run."""
    tokens, margins = hf_greedy_with_margins(model, window, SEARCH_TOKENS)
    for start in range(SEARCH_TOKENS - CONFIDENT_TOKENS + 1):
        if min(margins[start:start + CONFIDENT_TOKENS]) >= CONFIDENT_MARGIN:
            prompt = window + tokens[:start]
            expected, checked = hf_greedy_with_margins(model, prompt, CONFIDENT_TOKENS)
            if expected != tokens[start:start + CONFIDENT_TOKENS] or min(checked) < CONFIDENT_MARGIN:
                continue
            return {"prompt": prompt, "expected": expected, "margins": [round(m, 4) for m in checked]}
    return None


def draw_confident(model, draw_window, what: str) -> dict:
    """The first confident prompt among up to MAX_DRAWS windows from draw_window()."""
    for draws in range(1, MAX_DRAWS + 1):
        found = confident_prompt(model, draw_window())
        if found is not None:
            return {**found, "draws": draws}
    raise ValueError(f"{what}: no confident prompt in {MAX_DRAWS} windows (margin {CONFIDENT_MARGIN}, "
                     f"{CONFIDENT_TOKENS} tokens within {SEARCH_TOKENS}): the model is less confident than measured")


def select_corpus(n: int = 64, seed: int = 0, only: range | None = None) -> list[dict]:
    """n confident prompts from training windows of PROMPT_LENGTHS tokens (5-220) in turn, of any of the
    three works (each window then grows by its greedy continuation's first tokens, 0-56 of them). Each prompt
    draws from its own seeded generator, so `only` (indices) reproduces part of the set."""
    model = hf_model()
    chosen = []
    for i in range(n) if only is None else only:
        rng = random.Random(1000 * seed + i)
        length = PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]
        chosen.append(draw_confident(model, lambda: corpus_window(rng, length), f"corpus prompt {i}"))
    return chosen


def select_shared(seed: int = 0, members_cap: int | None = None) -> list[dict]:
    """64 confident prompts in SHARED_GROUPS: each group's corpus window (whole KV pages) shared by its
    members, then each member's own window of 3-29 tokens and greedy tokens; shuffled. Each group draws
    from its own seeded generator, so members_cap (the first members of each group, unshuffled)
    reproduces part of the set."""
    model = hf_model()
    chosen = []
    for g, (prefix_len, members) in enumerate(SHARED_GROUPS):
        rng = random.Random(1000 * seed + 100 + g)
        prefix = corpus_window(rng, prefix_len)
        for m in range(members if members_cap is None else min(members, members_cap)):
            chosen.append(draw_confident(model, lambda: prefix + corpus_window(rng, rng.randrange(3, 30)),
                                         f"shared group {g} member {m}"))
    if members_cap is None:
        random.Random(seed).shuffle(chosen)
    return chosen


def write_cache(path: str = CACHE_PATH) -> dict:
    data = {"weights_sha256": weights_sha256(), "margin": CONFIDENT_MARGIN, "tokens": CONFIDENT_TOKENS,
            "search_tokens": SEARCH_TOKENS, "corpus": select_corpus(), "shared": select_shared()}
    with open(path, "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
    return data


@functools.lru_cache(maxsize=None)
def load_cache(path: str = CACHE_PATH) -> dict:
    """The cached selection, refused if it was made from other weights or another rule."""
    with open(path) as f:
        data = json.load(f)
    if data["weights_sha256"] != weights_sha256():
        raise ValueError(f"{path} was selected from other weights: rerun python tests/confident_prompts.py")
    if (data["margin"], data["tokens"], data["search_tokens"]) != (CONFIDENT_MARGIN, CONFIDENT_TOKENS, SEARCH_TOKENS):
        raise ValueError(f"{path} was selected by another rule: rerun python tests/confident_prompts.py")
    return data


def confident_set(which: str) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
    """(prompts, float32 greedy tokens, their margins) of the cached 'corpus' or 'shared' set."""
    if which not in SETS:
        raise ValueError(f"which must be one of {SETS}, got {which!r}")
    rows = load_cache()[which]
    return [r["prompt"] for r in rows], [r["expected"] for r in rows], [r["margins"] for r in rows]


@functools.lru_cache(maxsize=None)
def float32_logits(which: str) -> tuple:
    """transformers' float32 logits of each expected choice of a cached set, a tensor per prompt (one
    forward over prompt + expected tokens)."""
    rows = []
    for prompt, expected in zip(*confident_set(which)[:2]):
        with torch.no_grad():
            rows.append(hf_model()(torch.tensor([prompt + expected[:-1]])).logits[0, len(prompt) - 1:])
    return tuple(rows)


def lead_errors(rows, reference) -> list[float]:
    """At each choice, by how much `rows` (a bf16 path's logits) shrink the float32 winner's lead over its
    closest rival: max_j (e_j - e_top1), e = rows - reference. A float32 margin above it cannot flip."""
    e = rows.float().cpu() - reference.float()
    top1 = reference.argmax(-1, keepdim=True)
    return (e - e.gather(-1, top1)).max(-1).values.tolist()


def partings(what: str, prompts, got, expected, margins, path_rows=None) -> list[str]:
    """One line for each prompt whose greedy tokens differ from the float32 ones: where they part, and the
    float32 margin there; with path_rows(indices) -> that path's logits rows on its own tokens, also its
    own margin there and how far below its best the float32 pick fell."""
    bad = [i for i in range(len(prompts)) if got[i] != expected[i]]
    rows = path_rows(bad) if path_rows is not None and bad else [None] * len(bad)
    lines = []
    for i, r in zip(bad, rows):
        d = next(k for k, (a, b) in enumerate(zip(got[i], expected[i])) if a != b)
        line = (f"{what}: prompt {i} ({len(prompts[i])} tokens) parts at generated token {d}: float32 picks "
                f"{expected[i][d]} by a margin of {margins[i][d]:.3f}, this path picks {got[i][d]}")
        if r is not None:
            top2 = r[d].float().topk(2).values
            line += (f" (its own margin {float(top2[0] - top2[1]):.3f}, the float32 pick "
                     f"{float(r[d].float().max() - r[d].float()[expected[i][d]]):.3f} below its best)")
        lines.append(line)
    return lines


if __name__ == "__main__":
    import time
    torch.set_num_threads(1)
    t0 = time.time()
    written = write_cache()
    lengths = sorted(len(r["prompt"]) for s in SETS for r in written[s])
    draws = sum(r["draws"] for s in SETS for r in written[s])
    print(f"wrote {CACHE_PATH} in {time.time() - t0:.0f} s: {draws} windows searched for {len(lengths)} prompts, "
          f"prompt lengths {lengths[0]}-{lengths[-1]}")
