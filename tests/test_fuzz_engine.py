"""Differential fuzzing of the offline engine's scheduling features (CPU, torch backend, float32).

Prefix caching, chunked prefill, preemption, the host KV tier (swap-preemption, prefetch, write-ahead),
the schedule policies, cascade attention, overlapped steps, staggered arrivals, n > 1 copies of a
request and the stop rules decide which pages are computed, shared or copied and in which order
requests run, never the text. Each case draws a random engine configuration and a random request
set from its seed, runs it, and checks:
  - every request's token ids, text and finish reason equal those of a plain reference engine
    (prefix caching off, every request admitted at once in one prefill step, nothing preempted,
    cascade off, fcfs), run on the same requests;
  - no page leaks in either tier once the engine is idle: every GPU page free with ref count 0,
    every host page free or cached exactly once (none pinned), no restore queued, the block
    manager's invariants.

The model is the shipped trained tiny Qwen3 (claude_docs/tiny_trained.md): its greedy paths are varied
text (not a loop of one token), so a wrong K/V page changes the tokens; its float32 greedy margins are
mostly wide (p1 0.006), so float32 reordering (~1e-6) does not flip a choice: a divergence is a bug.
Requests are corpus windows: groups behind a shared prefix whose length is drawn to end exactly on a
page boundary, one token before or after it, or anywhere; members with no own tokens (the prompt is
the prefix: a fully cached prompt), prompts that extend another member, exact duplicates (n > 1),
prompts longer than the chunk size. Budgets are drawn from the largest request's need up, so eviction
and preemption happen often.

Deterministic: every draw comes from random.Random(seed); the engine's own randomness (the random
policy, unseeded sampling) is seeded by the config; sampled requests are seeded, whose draws depend
only on their seed and token index (layers/sampler.py). One thread (conftest).

Measured on this 2-core CPU (shared with other test runs): a case takes about 0.3-1.5 s (two engines,
3-25 requests). `FAST_SEEDS` cases run in the default suite (about a minute); the slow variant runs
`NANOVLLM_FUZZ_CASES` more seeds when that variable is set (pytest -m slow tests/test_fuzz_engine.py).
When a case fails, `minimise(seed)` shrinks it (fewer requests, fewer tokens, features switched off
one at a time) to the smallest case that still fails; its repr is the regression test to write.
"""
import os
import random
from dataclasses import dataclass, field, replace

import pytest
from transformers import AutoConfig

from conftest import assert_no_leaks
from nanovllm import LLM, SamplingParams
from nanovllm.assets import tiny_trained_path
from test_tiny_trained import corpus_window

FAST_SEEDS = range(60)
STOP_STRINGS = (" the", ",", "\n", "and", "'")   # frequent in the corpus: stop strings do fire
STOP_TOKEN_IDS = (13, 11, 264)                    # ".", ",", " the"


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    ignore_eos: bool = True
    stop: tuple = ()
    stop_token_ids: tuple = ()
    temperature: float = 0.0
    seed: int | None = None

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, seed=self.seed, max_tokens=self.max_tokens,
                              ignore_eos=self.ignore_eos, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))


@dataclass
class Case:
    seed: int
    requests: list[Request]
    engine: dict                       # LLM(...) keyword arguments besides the model
    overlap: bool = True               # steps overlap (else each is collected before the next is scheduled)
    arrivals: list[int] = field(default_factory=list)  # steps run before each request is added (empty: all at once)
    always_cascade: bool = False

    def describe(self) -> str:
        lens = [len(r.prompt) for r in self.requests]
        return (f"seed {self.seed}: {len(self.requests)} requests of {min(lens)}-{max(lens)} tokens, engine {self.engine}, "
                f"overlap {self.overlap}, arrivals {self.arrivals or 'all at once'}")


def page_bytes(block_size: int) -> int:
    """Bytes of one KV page of the trained tiny model on the CPU path (float32 K and V, every layer)."""
    hf = AutoConfig.from_pretrained(tiny_trained_path())
    return 2 * hf.num_hidden_layers * block_size * hf.num_key_value_heads * hf.head_dim * 4


def draw_prompts(rng: random.Random, block_size: int, max_len: int) -> list[list[int]]:
    """Groups behind shared prefixes (page-aligned, one off, or anywhere), nested extensions,
    fully-shared members, duplicates, unrelated singletons."""
    prompts: list[list[int]] = []
    for _ in range(rng.randint(1, 4)):
        pages = rng.randint(1, max(1, 96 // block_size))
        shape = rng.choice(("aligned", "minus1", "plus1", "any"))
        length = {"aligned": pages * block_size, "minus1": pages * block_size - 1, "plus1": pages * block_size + 1,
                  "any": rng.randint(1, 120)}[shape]
        prefix = corpus_window(rng, max(1, min(length, max_len)))
        members: list[list[int]] = []
        for _ in range(rng.randint(1, 5)):
            kind = rng.random()
            if kind < 0.15:
                member = list(prefix)                                 # the prompt is the shared prefix itself
            elif kind < 0.3 and members:
                base = rng.choice(members)                            # extends another member
                member = base + corpus_window(rng, rng.randint(1, 24))
            else:
                member = prefix + corpus_window(rng, rng.randint(1, 40))
            members.append(member[:max_len])
        prompts += members
    for _ in range(rng.randint(0, 3)):
        prompts.append(corpus_window(rng, rng.randint(1, max_len)))  # unrelated
    for _ in range(rng.randint(0, 3)):
        prompts.append(list(rng.choice(prompts)))                     # duplicates: n > 1 copies
    rng.shuffle(prompts)
    return prompts


def draw_request(rng: random.Random, prompt: list[int]) -> Request:
    r = Request(prompt, max_tokens=rng.choice((1, 2, rng.randint(3, 12), rng.randint(13, 32))),
                ignore_eos=rng.random() < 0.7)
    if rng.random() < 0.2:
        r.stop = tuple(rng.sample(STOP_STRINGS, rng.randint(1, 2)))
    if rng.random() < 0.15:
        r.stop_token_ids = (rng.choice(STOP_TOKEN_IDS),)
    if rng.random() < 0.15:   # seeded sampling: its draws depend on the seed and token index only
        r.temperature, r.seed = rng.choice((0.6, 1.0)), rng.randrange(1000)
    return r


def draw_case(seed: int) -> Case:
    rng = random.Random(seed)
    bs = rng.choice((4, 8, 16, 32))
    max_model_len = rng.choice((160, 256, 1024))
    prompts = draw_prompts(rng, bs, max_model_len - 1)
    requests = [draw_request(rng, p) for p in prompts]
    for _ in range(rng.randint(0, 2)):   # n > 1 with identical params (the server's `n`)
        requests.append(replace(rng.choice(requests)))
    need = max(-(-min(len(r.prompt) + r.max_tokens, max_model_len) // bs) for r in requests)
    total = sum(-(-min(len(r.prompt) + r.max_tokens, max_model_len) // bs) for r in requests)
    engine = dict(kvcache_block_size=bs, max_model_len=max_model_len,
                  num_kvcache_blocks=rng.choice((need, need + rng.randint(1, need), need + rng.randint(1, 3 * need), total)),
                  max_num_batched_tokens=rng.choice((rng.randint(3, 16), rng.randint(17, 96), rng.randint(97, 300), 16384)),
                  max_num_seqs=rng.choice((1, 2, 3, rng.randint(4, 16), 64)),
                  enable_prefix_caching=rng.random() < 0.85,
                  schedule_policy=rng.choice(("fcfs", "lpm", "dfs-weight", "random")), seed=seed)
    if engine["enable_prefix_caching"] and rng.random() < 0.5:
        host_pages = rng.randint(1, 3 * engine["num_kvcache_blocks"])
        engine.update(host_kvcache_gb=(host_pages + 0.5) * page_bytes(bs) / 2**30,
                      host_kv_prefetch=rng.random() < 0.5, host_kv_write_ahead=rng.random() < 0.5)
    cascade = rng.random() < 0.4
    if cascade:
        engine.update(enable_cascade_attention=True, cascade_max_levels=rng.choice((2, 3)))
        if rng.random() < 0.2:
            engine["cascade_shared_prefix_len"] = bs * rng.randint(1, 8)
    arrivals = [rng.choice((0, 0, 1, rng.randint(2, 6))) for _ in requests] if rng.random() < 0.5 else []
    return Case(seed, requests, engine, overlap=rng.random() < 0.7, arrivals=arrivals, always_cascade=cascade)


def reference_engine(case: Case) -> dict:
    """Prefix caching off, room for every request at once (one prefill step, no preemption), fcfs, no cascade."""
    n = len(case.requests)
    tokens = sum(len(r.prompt) + r.max_tokens for r in case.requests)
    return dict(kvcache_block_size=16, max_model_len=case.engine["max_model_len"], num_kvcache_blocks=tokens // 16 + 2 * n,
                max_num_batched_tokens=max(16384, tokens), max_num_seqs=n, enable_prefix_caching=False, seed=case.seed)


MAX_STEPS = 20000   # a case takes a few hundred steps; more means the engine stopped making progress


def run(case: Case, engine: dict, overlap: bool = True, arrivals: list[int] = ()) -> tuple[list[tuple], LLM]:
    """Each request's (token ids, text, finish reason), and the engine, idle, for the leak checks.
    arrivals[k]: steps run after request k - 1 was added before request k is (none: all at once)."""
    llm = LLM(tiny_trained_path(), **engine)
    waits = list(arrivals) or [0] * len(case.requests)
    seqs, since, steps = [], 0, 0
    while len(seqs) < len(case.requests) or not llm.is_finished():
        while len(seqs) < len(case.requests) and (since >= waits[len(seqs)] or llm.is_finished()):
            r = case.requests[len(seqs)]
            seqs.append(llm.add_request(r.prompt, r.params()))
            since = 0
        llm.step()
        if not overlap:
            llm.drain()   # collected before the next step is scheduled: no placeholders in flight
        since += 1
        steps += 1
        assert steps < MAX_STEPS, f"no progress after {steps} steps: {case.describe()}"
    llm.drain()
    texts = llm.output_texts(seqs)
    return [(s.completion_token_ids, t, s.finish_reason) for s, t in zip(seqs, texts)], llm


def assert_idle_and_leak_free(llm: LLM):
    """Both tiers: every GPU page free (ref count 0), every host page free or cached once (none
    pinned), no restore queued or pending, the block manager's invariants."""
    assert_no_leaks(llm)
    bm = llm.scheduler.block_manager
    assert llm.in_flight is None
    assert not bm.host_pinned and not bm.restore_backlog and not bm.restored, "host pages still pinned or queued"
    assert not (bm.swap_out or bm.swap_in or bm.write_ahead_pairs), "copies decided and never handed to a step"
    assert bm.num_used_host_blocks + bm.num_free_host_blocks == bm.num_host_blocks


def divergences(case: Case, got: list[tuple], expected: list[tuple]) -> list[str]:
    lines = []
    for i, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            d = next((k for k, (a, b) in enumerate(zip(g[0], e[0])) if a != b), min(len(g[0]), len(e[0])))
            lines.append(f"request {i} ({len(case.requests[i].prompt)} prompt tokens, {case.requests[i]}): parts at "
                         f"token {d}: got {g[0][d:d + 4]} {g[2]!r}, reference {e[0][d:d + 4]} {e[2]!r}")
    return lines


def check_case(case: Case) -> list[str]:
    """The case's divergences from the reference (empty: it passes); raises on leaks."""
    expected, ref = run(case, reference_engine(case))
    assert_idle_and_leak_free(ref)
    got, llm = run(case, case.engine, case.overlap, case.arrivals)
    assert_idle_and_leak_free(llm)
    return divergences(case, got, expected)


def fails(case: Case) -> bool:
    try:
        return bool(check_case(case))
    except AssertionError:
        return True


def minimise(case: Case) -> Case:
    """A smaller case that still fails: requests dropped (halves, then one at a time), prompts and
    max_tokens shortened, then the features of the engine switched back to the reference's one at a time."""
    assert fails(case), "the case passes"
    changed = True
    while changed:
        changed = False
        n = len(case.requests)
        for size in sorted({max(1, n // 2), 1}, reverse=True):
            i = 0
            while i < len(case.requests) and len(case.requests) > 1:
                keep = case.requests[:i] + case.requests[i + size:]
                arrivals = case.arrivals[:i] + case.arrivals[i + size:] if case.arrivals else []
                trial = replace(case, requests=keep, arrivals=arrivals)
                if keep and fails(trial):
                    case, changed = trial, True
                else:
                    i += size
        for i, r in enumerate(case.requests):
            for shorter in (replace(r, max_tokens=max(1, r.max_tokens // 2)), replace(r, stop=(), stop_token_ids=()),
                            replace(r, temperature=0.0, seed=None), replace(r, ignore_eos=True)):
                if shorter != r:
                    trial = replace(case, requests=case.requests[:i] + [shorter] + case.requests[i + 1:])
                    if fails(trial):
                        case, r, changed = trial, shorter, True
        simpler = [dict(host_kvcache_gb=0), dict(enable_cascade_attention=False), dict(schedule_policy="fcfs"),
                   dict(max_num_batched_tokens=16384), dict(max_num_seqs=64), dict(host_kv_prefetch=False),
                   dict(host_kv_write_ahead=False), dict(cascade_shared_prefix_len=0)]
        for change in simpler:
            engine = {**case.engine, **change}
            if engine != case.engine and fails(replace(case, engine=engine)):
                case, changed = replace(case, engine=engine), True
        for trial in (replace(case, overlap=True), replace(case, arrivals=[])):
            if trial != case and fails(trial):
                case, changed = trial, True
    return case


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_fuzz_engine_matches_plain_reference(seed):
    case = draw_case(seed)
    bad = check_case(case)
    assert not bad, case.describe() + "\n" + "\n".join(bad)


@pytest.mark.slow
@pytest.mark.skipif("NANOVLLM_FUZZ_CASES" not in os.environ, reason="set NANOVLLM_FUZZ_CASES=N to fuzz N more seeds")
def test_fuzz_engine_long():
    first = FAST_SEEDS.stop
    failures = []
    for seed in range(first, first + int(os.environ["NANOVLLM_FUZZ_CASES"])):
        case = draw_case(seed)
        bad = check_case(case)
        if bad:
            failures.append(case.describe() + "\n" + "\n".join(bad))
    assert not failures, "\n\n".join(failures)
