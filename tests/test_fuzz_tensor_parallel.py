"""A seeded differential fuzz run of tensor parallelism on CPU (gloo): the same random request mixes go
to a TP=2 (and TP=4) engine and to a TP=1 engine of the same settings, and every request's outcome must
be the same.

Drawn per engine pair: cascade attention on/off, the prefix cache on/off, page size 8 or 16, a page
pool from 18 pages (preempts throughout) to 256, a prefill token budget from 24 (chunked prefill) to
1,024, max_num_seqs 3 to 64, each schedule policy, 2 or 3 cascade levels, an fp8 KV cache, a host KV
tier (swap-preemption). Drawn per case: 2 to 10 requests over
corpus windows of the trained tiny model (confident margins, real words for stop strings), often
behind a shared system prompt, sometimes an exact repeat (a fully cached prompt); each with greedy or
temperature sampling (seeded or not), top-k, top-p, min-p, penalties, logit_bias, min_tokens, stop
strings and stop ids, n > 1 (copies with seed + i, as the server makes them), logprobs, prompt_logprobs,
a regex or choice grammar; added at step 0 or later while others run, some aborted mid-run.

Checked per request: completion tokens, finish reason, text, number of cached prompt tokens, and
logprobs / prompt_logprobs (the same token ids; values within LOGPROB_ATOL); per case: the same
number of steps and preemptions on both engines (the scheduler sees the same tokens), every page
free on both afterwards (rank 0 owns the one page table every rank uses); per pair: after close()
no worker process is left. Separate tests close engines after exceptions on rank 0 (inside and
outside a step) and ship steps larger than the shared-memory slot.

CPU tests everywhere (device="cpu": float32, the tolerances above). Determinism: one
`random.Random(seed)` draws every engine and case, the step driver is a function of
the case alone, and the starvation bound (max_wait_s, wall-clock) is set out of reach. A failure
names its seed and case; `python tests/test_fuzz_tensor_parallel.py --seed S --pairs P --cases N`
replays it and prints every difference.

Measured on the 2-core CPU dev machine: 36 cases (3 pairs) take ~60 s at TP=2 (engine start-ups
included) and ~200 s at TP=4; the largest logprob difference seen was 9.5e-6 with a float32 cache
and 2.4e-3 with an fp8 one (seeds 0, 11-13, 31 at TP=2 and 21 at TP=4: ~370 cases, no difference in the outcomes).
Found and fixed (regression tests below): rank 0 failing inside a shipped step left the group out of
step (the next collectives aborted rank 0's process); a step larger than the shared-memory slot could
never be shipped.
"""
import argparse
import collections
import dataclasses
import os
import random
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import assert_no_leaks  # noqa: E402
from test_tensor_parallel import wait_for_no_children  # noqa: E402
from test_tiny_trained import corpus_window  # noqa: E402

from nanovllm import LLM, SamplingParams, StructuredOutput  # noqa: E402
from nanovllm.assets import tiny_trained_path  # noqa: E402

LOGPROB_ATOL = 1e-4       # float32 on CPU: TP's split sums move a logprob by ~1e-6
LOGPROB_ATOL_FP8 = 5e-2   # an fp8 cache: a ~1e-6 change flips a K/V value to the next fp8 step (1/8 apart);
                          # seen: 2.4e-3 (seeds 0-33), 1.44e-2 (seed 106 --pairs 2: a prompt logprob, tokens equal)
MAX_MODEL_LEN = 512
STOP_STRINGS = (" the", "\n", ".", ",", "'", " and", "e")
REGEXES = (r"[a-z]{2,6}", r"(yes|no)[.!]", r"[0-9]{1,3}")
CHOICES = (["Alice", "the Queen"], ["yes", "no", "maybe"])


def window(rng: random.Random, length: int) -> list[int]:
    return corpus_window(rng, length, split=1)   # the held-out slices: text the model did not train on


# ---- drawing --------------------------------------------------------------------------------------
def draw_engine(rng: random.Random, pair: int) -> dict:
    """Random settings; the first pairs force what the coverage check needs (a tight pool with cascade
    and the prefix cache; a host tier; an fp8 cache with chunked prefill), the rest are free draws."""
    block = rng.choice([8, 16])
    # Capacity >= 256 tokens: every drawn request (prompt <= 190, output <= 40 tokens) fits alone.
    pages = rng.choice([256 // block + 2, 384 // block, 256])
    settings = dict(enable_cascade_attention=rng.random() < 0.6, enable_prefix_caching=rng.random() < 0.8,
                    kvcache_block_size=block, num_kvcache_blocks=pages,
                    max_num_batched_tokens=rng.choice([24, 64, 200, 1024]), max_num_seqs=rng.choice([3, 8, 64]),
                    schedule_policy=rng.choice(["fcfs", "lpm", "dfs-weight", "random"]),
                    max_model_len=MAX_MODEL_LEN, max_wait_s=1e9, device="cpu")
    if settings["enable_cascade_attention"] and rng.random() < 0.3:
        settings["cascade_max_levels"] = 2
    if rng.random() < 0.2:
        settings["kv_cache_dtype"] = "fp8_e4m3"
    if settings["enable_prefix_caching"] and rng.random() < 0.3:
        settings["host_kvcache_gb"] = rng.choice([0.002, 0.01])  # 16 or 81 float32 pages of 16 tokens at TP=1
    tight = dict(kvcache_block_size=16, num_kvcache_blocks=18)
    forced = [dict(enable_cascade_attention=True, enable_prefix_caching=True, **tight),
              dict(enable_prefix_caching=True, host_kvcache_gb=0.01, **tight),
              dict(kv_cache_dtype="fp8_e4m3", max_num_batched_tokens=24)]
    return {**settings, **(forced[pair] if pair < len(forced) else {})}


def per_rank(settings: dict, tp: int, kv_heads: int) -> dict:
    """The TP engine's settings: host_kvcache_gb is per rank, and a rank's pages hold its share of the
    KV heads (one at least: TP=4 replicates the trained model's 2), so the same host page count needs
    that share of the bytes."""
    if "host_kvcache_gb" not in settings:
        return settings
    return {**settings, "host_kvcache_gb": settings["host_kvcache_gb"] * max(1, kv_heads // tp) / kv_heads}


def draw_params(rng: random.Random, eos: int) -> SamplingParams:
    kw = dict(max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.6:
        kw.update(temperature=rng.choice([0.5, 0.8, 1.0, 1.5]))
        if rng.random() < 0.6:
            kw["seed"] = rng.randrange(2**31)
        if rng.random() < 0.4:
            kw["top_k"] = rng.choice([1, 5, 50])
        if rng.random() < 0.4:
            kw["top_p"] = rng.choice([0.3, 0.8, 0.95])
        if rng.random() < 0.3:
            kw["min_p"] = rng.choice([0.02, 0.1, 0.3])
    else:
        kw["temperature"] = 0.0
    if rng.random() < 0.3:
        kw.update(presence_penalty=rng.choice([0.0, -0.5, 1.0]), frequency_penalty=rng.choice([0.0, 0.4, -0.3]),
                  repetition_penalty=rng.choice([1.0, 0.8, 1.3]))
    if rng.random() < 0.2:
        kw["logit_bias"] = {rng.randrange(3000): rng.uniform(-8, 8) for _ in range(rng.randint(1, 3))}
        if rng.random() < 0.5:
            kw["logit_bias"][eos] = rng.choice([-100.0, 5.0, 30.0])
    if rng.random() < 0.2:
        kw["stop"] = rng.sample(STOP_STRINGS, rng.randint(1, 2))
        kw["include_stop_str_in_output"] = rng.random() < 0.5
    if rng.random() < 0.1:
        kw["stop_token_ids"] = [rng.randrange(3000)]
    if rng.random() < 0.25:
        kw["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.15:
        kw["prompt_logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.08:
        kind = rng.choice(["regex", "choice"])
        kw["structured_output"] = (StructuredOutput(regex=rng.choice(REGEXES)) if kind == "regex"
                                   else StructuredOutput(choice=rng.choice(CHOICES)))
    elif rng.random() < 0.2:
        kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
    return SamplingParams(**kw)


@dataclasses.dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    arrive_at: int              # the engine step before which it is added
    abort_at: int | None        # the engine step before which it is aborted (None: runs to its end)
    choice: int = 0             # n > 1: which copy (seeded copies are seed + choice, as the server makes them)


def draw_case(rng: random.Random, eos: int) -> list[Request]:
    systems = [window(rng, rng.randint(8, 150)) for _ in range(rng.randint(0, 2))]
    requests, count = [], rng.randint(2, 10)
    while len(requests) < count:
        if requests and rng.random() < 0.1:
            prompt = list(rng.choice(requests).prompt)  # an exact repeat: fully cached when its pages are
        else:
            prefix = rng.choice(systems) if systems and rng.random() < 0.7 else []
            prompt = prefix + window(rng, rng.randint(1, 190 - len(prefix)))
        params = draw_params(rng, eos)
        arrive = 0 if rng.random() < 0.6 else rng.randint(1, 30)
        abort = arrive + rng.randint(0, 20) if rng.random() < 0.12 else None
        n = rng.choice([2, 3]) if rng.random() < 0.12 else 1
        for i in range(n):
            p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            requests.append(Request(prompt, p, arrive, abort, i))
    return requests


# ---- running and comparing ------------------------------------------------------------------------
def run_case(llm: LLM, requests: list[Request]) -> dict:
    """Drive the engine step by step: requests are added and aborted before their step. Returns each
    request's outcome, and the steps and preemptions the case took."""
    stats0, preempt0 = dict(llm.stats), llm.scheduler.num_preemptions
    seqs = [None] * len(requests)
    tick = 0
    while any(s is None for s in seqs) or not llm.is_finished():
        for i, r in enumerate(requests):
            if r.arrive_at == tick:
                seqs[i] = llm.add_request(r.prompt, r.params)
            if r.abort_at == tick and seqs[i] is not None:
                llm.abort_request(seqs[i].seq_id)
        llm.step()
        tick += 1
    texts = llm.output_texts(seqs)
    outcomes = [dict(token_ids=s.completion_token_ids, finish_reason=s.finish_reason, text=text,
                     num_cached_tokens=s.num_cached_tokens, logprobs=s.logprobs, prompt_logprobs=s.prompt_logprobs)
                for s, text in zip(seqs, texts)]
    return dict(outcomes=outcomes, steps=llm.stats["steps"] - stats0["steps"],
                preemptions=llm.scheduler.num_preemptions - preempt0,
                cascade_steps=llm.stats["cascade_steps"] - stats0["cascade_steps"],
                host_copy_steps=llm.stats["copy_steps"] - stats0["copy_steps"])


def coverage(requests: list[Request], result: dict) -> collections.Counter:
    """What a case exercised (the tests require each at least once, so the fuzzer cannot quietly stop
    reaching a feature)."""
    seen = collections.Counter({key: result[key] for key in ("preemptions", "cascade_steps", "host_copy_steps")})
    for r, out in zip(requests, result["outcomes"]):
        p = r.params
        seen.update(requests=1, aborted=out["finish_reason"] == "abort", prefix_hits=out["num_cached_tokens"] > 0,
                    late_arrivals=r.arrive_at > 0, sampled=not p.greedy, seeded=p.seed is not None,
                    penalties=p.penalized, logit_bias=bool(p.logit_bias), min_tokens=p.min_tokens > 0,
                    stopped=out["finish_reason"] == "stop", stop_strings=bool(p.stop), logprobs=p.logprobs is not None,
                    prompt_logprobs=p.prompt_logprobs is not None, grammar=p.structured_output is not None,
                    n_copies=r.choice > 0, repeats=sum(q.prompt == r.prompt for q in requests) > 1)
    return seen


def swapped_at_the_edge(got: dict, want: dict, atol: float) -> bool:
    """Top-k sets that differ only where a token of one side ties, within atol, the other side's last
    kept logprob (fp8 noise swapped two near-equal candidates at rank k: seed 106, 1.3e-4 apart)."""
    for one, other in ((got, want), (want, got)):
        edge = min(other.values())
        if any(abs(one[t] - edge) > atol for t in set(one) - set(other)):
            return False
    return True


def logprob_differences(name: str, got: list | None, want: list | None, atol: float) -> tuple[list[str], float]:
    """Problems, and the largest logprob difference seen."""
    if (got is None) != (want is None):
        return [f"{name}: {'missing' if got is None else 'present'} at TP>1, not at TP=1"], 0.0
    if got is None:
        return [], 0.0
    if len(got) != len(want):
        return [f"{name}: {len(got)} positions, TP=1 has {len(want)}"], 0.0
    gap = 0.0
    for pos, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            if (g is None) != (w is None):
                return [f"{name}[{pos}]: {g} vs TP=1 {w}"], gap
            continue
        if set(g) != set(w) and not swapped_at_the_edge(g, w, atol):
            return [f"{name}[{pos}]: {g} vs TP=1 {w}"], gap
        gap = max(gap, max(abs(g[t] - w[t]) for t in set(g) & set(w)))
        if gap > atol:
            return [f"{name}[{pos}]: {g} vs TP=1 {w} (atol {atol})"], gap
    return [], gap


def differences(got: dict, want: dict, atol: float) -> tuple[list[str], float]:
    problems, gap = [], 0.0
    for key in ("steps", "preemptions", "cascade_steps", "host_copy_steps"):
        if got[key] != want[key]:
            problems.append(f"{key}: {got[key]} vs TP=1 {want[key]}")
    for i, (g, w) in enumerate(zip(got["outcomes"], want["outcomes"])):
        for key in ("token_ids", "finish_reason", "text", "num_cached_tokens"):
            if g[key] != w[key]:
                problems.append(f"request {i} {key}: {g[key]!r} vs TP=1 {w[key]!r}")
        for key in ("logprobs", "prompt_logprobs"):
            found, largest = logprob_differences(key, g[key], w[key], atol)
            problems += [f"request {i} {p}" for p in found]
            gap = max(gap, largest)
    return problems, gap


def fuzz(seed: int, pairs: int, cases: int, tp: int = 2,
         verbose: bool = False) -> tuple[list[str], collections.Counter]:
    """`pairs` engine pairs (TP=tp and TP=1, the same drawn settings), `cases` cases each. Returns every
    problem found, each naming its seed, pair and case, and what the cases exercised."""
    rng = random.Random(seed)
    model = tiny_trained_path()
    problems, seen = [], collections.Counter()
    largest = {"auto": 0.0, "fp8": 0.0}   # the largest logprob difference, per KV cache dtype
    for pair in range(pairs):
        settings = draw_engine(rng, pair)
        if verbose:
            print(f"pair {pair}: {settings}", flush=True)
        single = LLM(model, **settings)
        eos = single.config.eos_token_ids[0]
        kv_heads = single.config.hf_config.num_key_value_heads
        many = LLM(model, tensor_parallel_size=tp, **per_rank(settings, tp, kv_heads))
        assert many.scheduler.block_manager.num_host_blocks == single.scheduler.block_manager.num_host_blocks
        try:
            for case in range(cases):
                requests = draw_case(rng, eos)
                where = f"seed {seed} pair {pair} case {case} (tp={tp}, {settings})"
                want = run_case(single, requests)
                got = run_case(many, requests)
                fp8 = settings.get("kv_cache_dtype") == "fp8_e4m3"
                found, gap = differences(got, want, LOGPROB_ATOL_FP8 if fp8 else LOGPROB_ATOL)
                seen += coverage(requests, got)
                largest["fp8" if fp8 else "auto"] = max(largest["fp8" if fp8 else "auto"], gap)
                for llm, name in ((single, "TP=1"), (many, f"TP={tp}")):
                    try:
                        assert_no_leaks(llm)
                    except AssertionError as e:
                        found.append(f"{name} pages: {e}")
                problems += [f"{where}: {p}" for p in found]
                if found and verbose:
                    print("\n".join(problems[-len(found):]), flush=True)
                if found:
                    break  # the engines may now disagree on state (the prefix cache): later cases would echo it
        finally:
            many.close()
            single.close()
        left = wait_for_no_children()
        if left:
            problems.append(f"seed {seed} pair {pair}: processes left after close: {left}")
    if verbose:
        print(f"largest logprob differences: {largest}")
    return problems, seen


def check(problems: list[str], seen: collections.Counter):
    assert not problems, "\n".join(problems[:10])
    missed = [key for key in COVERED if not seen[key]]
    assert not missed, f"no case exercised {missed} ({dict(seen)})"


COVERED = ("preemptions", "cascade_steps", "host_copy_steps", "aborted", "prefix_hits", "late_arrivals", "sampled",
           "seeded", "penalties", "logit_bias", "min_tokens", "stopped", "stop_strings", "logprobs", "prompt_logprobs",
           "grammar", "n_copies", "repeats")


# ---- tests ----------------------------------------------------------------------------------------
def test_fuzz_tp2_equals_one_rank():
    """3 engine pairs x 12 cases at TP=2 (208 requests): ~60 s on the 2-core CPU machine."""
    check(*fuzz(seed=0, pairs=3, cases=12))


@pytest.mark.slow
def test_fuzz_tp2_equals_one_rank_long():
    """4 engine pairs x 15 cases, other draws."""
    check(*fuzz(seed=1, pairs=4, cases=15))


@pytest.mark.slow
def test_fuzz_tp4_equals_one_rank():
    """TP=4 (each rank one query head; the 2 KV heads replicated): 2 pairs x 8 cases."""
    problems, seen = fuzz(seed=3, pairs=2, cases=8, tp=4)
    assert not problems, "\n".join(problems[:10])
    assert seen["cascade_steps"] and seen["preemptions"] and seen["host_copy_steps"]


# ---- engine exceptions ------------------------------------------------------------------------------
PROMPTS = [[100 + 7 * i + j for j in range(4 + 5 * i)] for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def fail_once_at(obj, name: str, call: int, error: BaseException):
    """obj.name raises `error` on its `call`-th call (1-based), then is itself again."""
    original, calls = getattr(obj, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            setattr(obj, name, original)
            raise error
        return original(*args, **kwargs)
    setattr(obj, name, wrapper)


@pytest.mark.parametrize("error", [RuntimeError("rank 0 alone fails"), KeyboardInterrupt()])
def test_rank0_failing_inside_a_shipped_step_fails_the_engine(error):
    """Regression: rank 0 raising inside a step its workers run left them in that step's all-reduces; the
    engine went on, the next step's collectives paired with theirs, and gloo aborted rank 0's process
    (SIGABRT) on the mismatched sizes. Now the engine stays failed with GroupOutOfStep (as after a
    worker's error), and close() leaves no process."""
    from nanovllm.distributed.executor import GroupOutOfStep
    llm = LLM(tiny_trained_path(), tensor_parallel_size=2, max_model_len=MAX_MODEL_LEN, num_kvcache_blocks=64,
              device="cpu")
    try:
        fail_once_at(llm.executor.runner, "execute", 3, error)
        with pytest.raises(GroupOutOfStep, match="rank 0 failed in step"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert isinstance(llm.failure, GroupOutOfStep)
        with pytest.raises(GroupOutOfStep):  # no step reaches the workers any more
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    finally:
        start = time.monotonic()
        llm.close()
    assert time.monotonic() - start < 10
    assert not wait_for_no_children()


def test_engine_exception_outside_the_step_keeps_the_group_serving():
    """An exception on rank 0 outside the runner (here the output processing of a collected step) leaves
    the workers in step: the request fails, the engine serves the next ones as one rank does, every page
    comes back, and close() leaves no process."""
    model = tiny_trained_path()
    kw = dict(max_model_len=MAX_MODEL_LEN, num_kvcache_blocks=64, device="cpu")
    expected = LLM(model, **kw).generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = LLM(model, tensor_parallel_size=2, **kw)
    try:
        fail_once_at(llm.output_processor, "process", 4, ValueError("a detokenizer failed"))
        with pytest.raises(ValueError, match="a detokenizer failed"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert llm.failure is None
        assert_no_leaks(llm)
        got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
        assert_no_leaks(llm)
    finally:
        llm.close()
    assert not wait_for_no_children()


# ---- steps larger than the shared-memory slot -----------------------------------------------------
def test_shm_channel_ships_a_message_larger_than_its_slot():
    """A message over slot_bytes goes through a segment of its own, read intact, unlinked once read;
    small messages keep using the slots."""
    import multiprocessing as mp
    from multiprocessing import shared_memory

    from nanovllm.distributed.step_channel import ShmChannel
    semaphores = [mp.get_context("spawn").Semaphore(0)]
    sender = ShmChannel(1, 4096, semaphores)
    reader = ShmChannel(1, 4096, semaphores, name=sender.name, reader=0)
    try:
        big = list(range(5000))  # ~15 KB pickled
        sender.send(big)
        assert len(sender.overflow) == 1
        name = sender.overflow[0][1].name
        assert reader.recv() == big
        sender.send("small")
        assert reader.recv() == "small"
        sender.send(None)  # the big one's slot is reused: every reader has read it, its segment goes
        assert sender.overflow == []
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)
        assert reader.recv() is None
        sender.send(big)
        assert reader.recv() == big
    finally:
        reader.close()
        sender.close()   # unlinks what is left
    assert sender.overflow == []


def test_step_larger_than_the_slot_runs_at_tp2():
    """Regression: a step whose pickle exceeded slot_bytes_for's bound raised "does not fit the channel
    slot" at every try, so those requests could never run under TP (here 24 greedy rows with a
    3,000-token logit_bias each: 1.4 MB against a 1.06 MB slot; on a GPU, 64 penalized 4k-token requests
    do it). It now runs, with one rank's tokens."""
    from nanovllm.distributed.step_channel import slot_bytes_for
    rng = random.Random(5)
    model = tiny_trained_path()
    kw = dict(max_model_len=256, max_num_seqs=24, max_num_batched_tokens=256, num_kvcache_blocks=64, device="cpu")
    prompts = [window(rng, rng.randint(4, 12)) for _ in range(24)]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                             logit_bias={t: rng.uniform(-2, 2) for t in range(3000)}) for _ in prompts]
    expected = LLM(model, **kw).generate(prompts, params, use_tqdm=False)
    llm = LLM(model, tensor_parallel_size=2, **kw)
    try:
        assert slot_bytes_for(llm.config) < 24 * 3000 * 20   # the step's bias alone: 20 bytes an entry
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
        assert_no_leaks(llm)
    finally:
        llm.close()
    assert not wait_for_no_children()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    start = time.monotonic()
    found, seen = fuzz(args.seed, args.pairs, args.cases, args.tp, verbose=True)
    print(f"exercised: {dict(seen)}")
    print(f"{len(found)} problems in {time.monotonic() - start:.1f} s")
    sys.exit(1 if found else 0)
