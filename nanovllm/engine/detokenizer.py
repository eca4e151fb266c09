"""Incremental detokenization with stop strings: text of a growing list of tokens, never splitting a
character, and never handing out text that a stop string could still cut.

Decoding only a short window of recent tokens keeps each step O(1) rather than O(length). Text is
released in three stages: decoded (`text`), then released to the caller once no stop string can
begin inside it. The tail of `text` that is a prefix of some stop string is held back until the
next tokens show whether the stop string completes (it is then cut, with everything after it) or
not (it is released), or until the sequence ends (`flush`). So the concatenation of everything
`add` and `flush` return equals the final text, and no stop string, nor the start of one, ever
reaches a streaming client. Whether a stop string ends the request is decided by
engine/output_processor.py, which owns every stop rule; this class only finds stop strings.
"""


class IncrementalDetokenizer:

    def __init__(self, tokenizer, stop: list[str] | None = None, include_stop: bool = False,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.include_stop = include_stop  # the text keeps the stop string that ended it
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = 0    # tokens up to here are already in self.text
        self.text = ""
        self.released = 0       # characters of self.text handed out so far
        self.stop = stop or []
        self.stopped = False

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int], can_stop: bool = True) -> str:
        """Append tokens; returns the text now safe to hand out (maybe empty). can_stop=False (the
        request's min_tokens not reached yet): a stop string that completes in this text does not
        count. Text is held back either way, so a stop string that starts now and completes after
        min_tokens was never handed out."""
        if self.stopped:
            return ""
        self.tokens.extend(token_ids)
        self._decode_new(can_stop=can_stop)
        return self._release(final=False)

    def flush(self, can_stop: bool = True) -> str:
        """The sequence ended: the rest of the text (an incomplete character at the very end, and
        text held back for a stop string that never completed)."""
        if not self.stopped and self.read_offset < len(self.tokens):
            self._decode_new(final=True, can_stop=can_stop)
        return self._release(final=True)

    def _decode_new(self, final: bool = False, can_stop: bool = True):
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return  # nothing new, or a character still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        start = len(self.text)
        self.text += full[len(prefix):]
        if not can_stop:
            return
        # The earliest stop string that now appears; it may straddle earlier text.
        found = [(i, len(s)) for s in self.stop if (i := self.text.find(s, max(0, start - len(s) + 1))) != -1]
        if found:
            self.stopped = True
            at, length = min(found)
            self.text = self.text[:at + length if self.include_stop else at]

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._held_back()
        end = max(end, self.released)
        out = self.text[self.released:end]
        self.released = end
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held
