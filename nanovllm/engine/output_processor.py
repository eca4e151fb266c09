"""One owner of finishing: every stop rule, and the text a request is handed back.

A sequence ends, checked once for each token when its step is collected (`process`), in this order:
  - "stop": its token is an EOS id (the tokenizer's and the model configs', unless ignore_eos) or one
    of its stop_token_ids, and it is past the first min_tokens tokens (the sampler masks those ids
    there too, layers/logits_processor.py). The token is kept in token_ids;
  - "length": max_tokens completion tokens, or max_model_len tokens in all;
  - "stop": a stop string completes in its text (engine/detokenizer.py finds it; from the
    min_tokens-th token on, as vLLM checks). The text is cut before it (after it with
    include_stop_str_in_output). It wins over "length": a stop on the last allowed token is a stop;
  - "stop": structured output's grammar is complete (engine/grammar.advance: its matcher accepted
    the token and terminated).
Length is known before the token exists: `launched` marks a sequence whose token in flight is its
last by length (`last_launched`), and the scheduler schedules it no more. The other rules are known
only once the token is collected; by then the next step may already be in flight with the sequence
in it, and that step's token is dropped (`Scheduler.finish` drops trailing placeholders, and
`Scheduler.postprocess` skips finished sequences). The scheduler frees the pages of the sequences
finished here (and of aborted ones), nothing else.
"""
from dataclasses import dataclass

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.grammar import advance
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence


@dataclass(slots=True)   # one a row of every step: 0.13 us to make against 0.25 with a __dict__
class StepOutput:
    seq: Sequence
    new_token_ids: list[int]
    new_text: str | None      # only for requests with stop strings or a streaming detokenizer
    finished: bool


class OutputProcessor:

    def __init__(self, tokenizer, scheduler: Scheduler, eos_ids, max_model_len: int):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.eos_ids = frozenset(eos_ids)
        self.max_model_len = max_model_len
        # Only streaming requests and requests with stop strings decode as they go.
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}

    def add(self, seq: Sequence, stream: bool):
        sp = seq.sampling_params
        if stream or sp.stop:
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, sp.stop, sp.include_stop_str_in_output,
                                                                   sp.skip_special_tokens)

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        """num_tokens tokens in all (prompt included) end the sequence by length."""
        return (num_tokens - seq.num_prompt_tokens >= seq.sampling_params.max_tokens
                or num_tokens >= self.max_model_len)

    def launched(self, seqs: list[Sequence], samples: list[bool]):
        """A step was handed to the runner(s) (after Scheduler.launched added its placeholders): a
        sequence whose token in flight ends it by length is scheduled no more."""
        for seq, sampled in zip(seqs, samples):
            if sampled and self._reaches_length(seq, len(seq.token_ids)):
                seq.last_launched = True

    def process(self, advanced: list[Sequence]) -> list[StepOutput]:
        """A collected step's sequences that got a token (Scheduler.postprocess filled it in): apply
        the stop rules, finish the sequences that end, and hand out the new text."""
        outputs = []
        detokenizers = self.detokenizers   # (empty unless a request streams or has stop strings)
        for seq in advanced:
            num_tokens = len(seq.token_ids) - seq.num_pending  # this step's token is the last collected one
            token = seq.token_ids[num_tokens - 1]
            sp = seq.sampling_params
            generated = num_tokens - seq.num_prompt_tokens
            reason = None
            if (token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_ids)) and generated > sp.min_tokens:
                reason = "stop"
            elif self._reaches_length(seq, num_tokens):
                reason = "length"
            if seq.grammar is not None and advance(seq, token):
                reason = "stop"  # the grammar is complete (its matcher accepted its stop token)
            new_text = None
            detok = detokenizers.get(seq.seq_id) if detokenizers else None
            if detok is not None:
                can_stop = generated >= sp.min_tokens
                new_text = detok.add([token], can_stop)
                if reason is not None and not detok.stopped:
                    new_text += detok.flush(can_stop)  # may complete a stop string too (a held-back last character)
                if detok.stopped:
                    reason = "stop"
            if reason is not None:
                self.scheduler.finish(seq, reason)
            outputs.append(StepOutput(seq, [token], new_text, reason is not None))
        return outputs

    def abort(self, seq: Sequence):
        """A client left: the sequence ends now and its pages go back to the pool."""
        self.detokenizers.pop(seq.seq_id, None)
        if not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def output_texts(self, seqs: list[Sequence]) -> list[str]:
        """Final texts (dropping their detokenizers): a stop string's cut, else the decoded completion,
        all in one batch call of the Rust tokenizer where there is one (it decodes in parallel)."""
        texts: list[str | None] = [None] * len(seqs)
        for i, seq in enumerate(seqs):
            detok = self.detokenizers.pop(seq.seq_id, None)
            if detok is not None and detok.stopped:
                texts[i] = detok.text
        rust = getattr(self.tokenizer, "_tokenizer", None)
        batch = rust is not None and hasattr(rust, "decode_batch") and not self.tokenizer.clean_up_tokenization_spaces
        for skip in (True, False):
            todo = [i for i, t in enumerate(texts) if t is None and seqs[i].sampling_params.skip_special_tokens == skip]
            ids = [seqs[i].completion_token_ids for i in todo]
            if batch:
                decoded = rust.decode_batch(ids, skip_special_tokens=skip)  # what decode() does, per sequence
            else:
                decoded = [self.tokenizer.decode(t, skip_special_tokens=skip) for t in ids]
            for i, text in zip(todo, decoded):
                texts[i] = text
        return texts
