"""Structured output, engine side: grammars compiled with xgrammar, one matcher per request, and the
token bitmask of a step's grammar rows.

Flow (claude_docs/serving.md, "Structured output"):
  make_sequence     GrammarCompiler.matcher(structured_output): compiled once per grammar (cache key:
                    kind + canonical text), a fresh GrammarMatcher per request (Sequence.grammar).
                    The server calls it on its tokenizer thread, so compiling never blocks the loop.
  build the step    grammar_mask(seqs): each row that samples and has a grammar gets its allowed
                    tokens as a packed int32 bitmask (bit t of word t // 32 = token t allowed); the
                    step carries them (GrammarMask, plain numpy: tensor-parallel workers apply the same).
  run the step      layers/grammar_mask.py sets disallowed logits to -inf before sampling.
  collect           advance(seq, token): the matcher accepts the sampled token; a matcher that
                    terminated (the grammar is complete and the stop token was accepted) ends the request.
A matcher's mask for step N+1 needs step N's token, so a step with grammar rows is collected before
the next one is scheduled (LLMEngine.step): those steps do not overlap host and device work.

The model's vocabulary is larger than the tokenizer's (padding rows of the embedding): TokenizerInfo
is built with the model's vocab size, and xgrammar never allows the padding ids.
"""
import json
import logging
import re
import threading
from collections import OrderedDict

import numpy as np

from nanovllm.engine.scheduled_step import GrammarMask
from nanovllm.sampling_params import StructuredOutput

logger = logging.getLogger("nanovllm")


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row's token bitmask."""
    return -(-vocab_size // 32)


def _message(e: Exception) -> str:
    """xgrammar's error without its log prefix ("[04:12:46] /project/cpp/regex_converter.cc:83: ")."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip())


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly the given strings (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """One per engine: xgrammar's compiler over the engine's tokenizer, and a bounded cache of compiled
    grammars. Thread-safe (the server compiles on its tokenizer thread, offline requests on the caller's)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, cache_size: int = 256):
        import xgrammar as xgr
        self.xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # the cache below is the one cache
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()
        self.num_compiled = 0

    def compile(self, so: StructuredOutput):
        """The compiled grammar, from the cache when the same grammar was compiled before. A grammar
        xgrammar refuses raises ValueError with xgrammar's message."""
        key = so.key()
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        kind, text = key
        try:
            if kind == "json":
                # Compact JSON (no free whitespace between tokens): a model cannot pad the output with blanks.
                compiled = self.compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "json_object":
                compiled = self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "regex":
                compiled = self.compiler.compile_regex(text)
            elif kind == "choice":
                compiled = self.compiler.compile_grammar(choice_grammar(so.choice))
            else:
                compiled = self.compiler.compile_grammar(text)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{kind} does not compile: {_message(e)}") from None
        with self.lock:
            self.num_compiled += 1
            self.cache[key] = compiled
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return compiled

    def matcher(self, so: StructuredOutput):
        """A fresh matcher for one request (at the grammar's start)."""
        return self.xgr.GrammarMatcher(self.compile(so))


def grammar_mask(seqs: list, vocab_size: int) -> GrammarMask | None:
    """The bitmask rows of a step's sequences (in row order) that sample a token this step and have a
    grammar; None when there are none. Each matcher must have accepted every earlier token."""
    rows = [i for i, s in enumerate(seqs)
            if s.grammar is not None and s.num_computed_tokens + s.chunk_len == len(s)]
    if not rows:
        return None
    bitmask = np.full((len(rows), bitmask_words(vocab_size)), -1, dtype=np.int32)
    for j, i in enumerate(rows):
        seq = seqs[i]
        if seq.num_pending:
            raise RuntimeError(f"sequence {seq.seq_id}: a grammar row was scheduled before its last token was "
                               f"collected (grammar steps must not overlap)")
        seq.grammar.fill_next_token_bitmask(bitmask, j)
    return GrammarMask(np.asarray(rows, dtype=np.int64), bitmask)


def advance(seq, token_id: int) -> bool:
    """The sampled token goes into the request's matcher. True when the request must end here: the
    matcher terminated, or (never with the mask applied) refused the token."""
    matcher = seq.grammar
    if not matcher.accept_token(token_id):  # the mask makes this impossible: say so loudly
        logger.error("sequence %d: grammar refused sampled token %d; ending the request", seq.seq_id, token_id)
        return True
    return matcher.is_terminated()
