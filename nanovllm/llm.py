"""The offline, vLLM-style API: LLM(model).generate(prompts, sampling_params).

Python's cyclic garbage collector is kept off the requests while a generate call runs: each request
holds its prompt as a list of ints (8,320 of them in W3), which every collection of their generation
walks, and the engine allocates enough per step to trigger collections. Measured on one H200 (random
Qwen3-0.6B, `python scripts/step_timeline.py --workload w3 --enable-cascade-attention --gc engine|freeze`,
session 18): with the collector as Python leaves it, W3's two runs spent 0.066 / 0.090 s in generation-1
collections, and the first 0.32 s more in one full collection (49,577 / 52,530 tok/s); with the requests frozen
once queued, 0.003 / 0.075 s and no full collection (53,055 / 52,114). W2 and W1: within their spread. The
requests are frozen (gc.freeze) once queued, and unfrozen when generate returns unless something had frozen
objects before (a partial unfreeze does not exist); objects dropped meanwhile are still freed by their
reference counts.
"""
import gc
from time import perf_counter

from tqdm.auto import tqdm

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams


class LLM(LLMEngine):

    def generate(self, prompts: list[str] | list[list[int]] | str, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """One dict per prompt, in input order: text, token_ids, finish_reason, prompt_token_ids, num_cached_tokens,
        logprobs and prompt_logprobs (None unless asked; layers/logprobs.py has their form).

        Every request is validated before any is queued, so a bad one leaves the engine untouched."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        collecting, frozen = gc.isenabled(), gc.get_freeze_count()
        gc.disable()   # no collection walks the prompt lists while they are made (module doc)
        try:
            seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]
            for seq in seqs:
                self.add_sequence(seq)
            gc.freeze()   # nor after: the requests live until generate returns
        finally:
            if collecting:
                gc.enable()
        try:
            return self._run(seqs, use_tqdm)
        finally:
            if not frozen:
                gc.unfreeze()

    def _run(self, seqs: list, use_tqdm: bool) -> list[dict]:
        """Step until every one of seqs has finished; their outputs."""
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        start, tokens = perf_counter(), 0
        try:
            while not all(s.is_finished for s in seqs):
                outputs = self.step()
                tokens += len(outputs)
                done = sum(o.finished for o in outputs)
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
