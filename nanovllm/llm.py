"""The offline, vLLM-style API: LLM(model).generate(prompts, sampling_params)."""
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
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]
        for seq in seqs:
            self.add_sequence(seq)
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
