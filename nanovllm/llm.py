"""The offline, vLLM-style API: LLM(model).generate(prompts, sampling_params).

Python's cyclic garbage collector is kept off the requests while a generate call runs: each request
holds its prompt as a list of ints (8,320 of them in W3), which every collection of their generation
walks, and the engine allocates enough per step to trigger collections. Measured on one H200 (random
Qwen3-0.6B, `python scripts/step_timeline.py --workload w3 --enable-cascade-attention --gc engine|freeze`,
session 18): with the collector as Python leaves it, W3's two runs spent 0.066 / 0.090 s in generation-1
collections, and the first 0.32 s more in one full collection (49,577 / 52,530 tok/s); with the requests frozen
once queued, 0.003 / 0.075 s and no full collection (53,055 / 52,114). W2 and W1: within their spread. The
requests are frozen (gc.freeze) once queued, and unfrozen when generate returns; objects dropped meanwhile are
still freed by their reference counts. Unfrozen with them is whatever the caller froze before (a partial unfreeze
does not exist; freezing only spares the collector work): generate used to leave everything frozen when anything
was, which it learned from gc.get_freeze_count(), a walk over every frozen object: on the H200 host, where 375
objects are frozen before the first generate, each later call started with 46-49 ms of it (561k objects frozen,
the engine's own among them, and never collected again).

Requests are validated and queued QUEUE_AHEAD at a time, the rest between steps while the device runs the step
just launched: validating W3's 1,024 prompts of 8,320 ids (their ids converted to bytes, checked, copied) took
0.2-0.37 s on the GPU hosts of session 21 (~0.1 ms a request on the CPU machine), all before the first step; a
prefill step admits ~128 of them (its 16,384-token budget), so QUEUE_AHEAD waiting requests keep every step full.
A policy other than fcfs orders the whole queue (lpm groups by prefix): then all are queued first. A bad request
found later raises as before; the requests of the call already queued are aborted (their pages go back at once).
"""
import gc
from time import perf_counter

from tqdm.auto import tqdm

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams

# Requests waiting (validated, queued, not yet admitted) that generate keeps ahead of the scheduler (module doc).
QUEUE_AHEAD = 256


class LLM(LLMEngine):

    def generate(self, prompts: list[str] | list[list[int]] | str, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """One dict per prompt, in input order: text, token_ids, finish_reason, prompt_token_ids, num_cached_tokens,
        logprobs and prompt_logprobs (None unless asked; layers/logprobs.py has their form).

        A bad request raises ValueError and the call returns nothing: requests are validated as they are queued
        (QUEUE_AHEAD ahead of the scheduler, module doc), and those of this call already queued are aborted."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        try:
            return self._run(list(zip(prompts, sampling_params)), use_tqdm)
        finally:
            gc.unfreeze()

    def _queue(self, requests: list, seqs: list) -> None:
        """Validate and queue requests[len(seqs):] until QUEUE_AHEAD wait (all of them under a policy other than
        fcfs). The collector is off while the requests are made and frozen after (module doc)."""
        ahead = QUEUE_AHEAD if self.scheduler.policy.name == "fcfs" else len(requests)
        end = min(len(requests), len(seqs) + max(0, ahead - len(self.scheduler.waiting)))
        if end == len(seqs):
            return
        collecting = gc.isenabled()
        gc.disable()
        try:
            made = [self.make_sequence(p, sp) for p, sp in requests[len(seqs):end]]
            for seq in made:
                self.add_sequence(seq)
            seqs += made
            gc.freeze()
        finally:
            if collecting:
                gc.enable()

    def _run(self, requests: list, use_tqdm: bool) -> list[dict]:
        """Queue requests (prompt, params) as the steps go and step until every one has finished; their outputs."""
        bar = tqdm(total=len(requests), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        start, tokens, seqs = perf_counter(), 0, []
        try:
            self._queue(requests, seqs)
            while len(seqs) < len(requests) or not all(s.is_finished for s in seqs):
                unfinished = len(self.seqs)
                outputs = self.step()
                done = unfinished - len(self.seqs)   # a request that finishes leaves self.seqs (_finish_step)
                self._queue(requests, seqs)   # the step just launched runs on the device meanwhile
                if use_tqdm:   # (per-step work that is not the engine's: none without a bar)
                    tokens += len(outputs)
                    if done:
                        bar.update(done)
                    bar.set_postfix(tok_s=f"{tokens / max(perf_counter() - start, 1e-9):.0f}", refresh=False)
            self.drain()  # a step launched before the last ones ended
        except BaseException:
            self.drain()
            for seq in seqs:
                self.abort_request(seq.seq_id)
            raise
        finally:
            bar.close()
        texts = self.output_texts(seqs)
        return [{"text": text, "token_ids": s.completion_token_ids, "finish_reason": s.finish_reason,
                 "prompt_token_ids": s.prompt_token_ids, "num_cached_tokens": s.num_cached_tokens,
                 "logprobs": s.logprobs, "prompt_logprobs": s.prompt_logprobs}
                for s, text in zip(seqs, texts)]
