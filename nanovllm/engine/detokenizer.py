"""Incremental detokenization: text of a growing list of tokens, never splitting a character.

Decoding only a short window of recent tokens keeps each step O(1) rather than O(length)."""


class IncrementalDetokenizer:

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = 0    # tokens up to here are already in self.text
        self.text = ""
        self.stop = stop or []
        self.stopped = False

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the new text (empty while a character is incomplete, or after a stop)."""
        if self.stopped:
            return ""
        self.tokens.extend(token_ids)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._emit(delta)

    def _emit(self, delta: str) -> str:
        start = len(self.text)
        self.text += delta
        for s in self.stop:
            # A stop string may straddle earlier text: search from len(s) - 1 characters back.
            i = self.text.find(s, max(0, start - len(s) + 1))
            if i != -1:
                self.stopped = True
                self.text = self.text[:i]
                return self.text[start:] if i > start else ""
        return delta

    def flush(self) -> str:
        """Text of tokens still held back (an incomplete character at the very end)."""
        if self.stopped or self.read_offset == len(self.tokens):
            return ""
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        self.read_offset = len(self.tokens)
        return self._emit(full[len(prefix):])
