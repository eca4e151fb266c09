"""The engine's logprobs ({token_id: logprob} per position: the top-k in descending order, then the
position's own token when not among them; layers/logprobs.py) in OpenAI's two response shapes.

Completions (legacy): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one entry per
token; with echo the prompt comes first and its first token has null logprob and top_logprobs.
`top_logprobs` maps token strings to logprobs and holds the top-k plus the position's own token (as
vLLM answers; lm-eval's is_greedy test reads it so). `text_offset` is each token's offset in the
choice's text, counted over the token strings.

Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [exactly k of {"token", "logprob",
"bytes"}]}], "refusal": null}.

Token strings are each token decoded alone; bytes are its raw bytes (the byte-level BPE alphabet
mapped back), so a character split over two tokens gives two partial byte lists, as OpenAI sends.
Ids past the tokenizer (a model vocabulary padded beyond it) read as "" with no bytes.
"""
from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenStrings:
    """Token id -> its text and bytes, cached (a server sees the same few thousand tokens again and again)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        s = self._text.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id]) if 0 <= token_id < self.size else ""
            self._text[token_id] = s
        return s

    def bytes(self, token_id: int) -> list[int]:
        b = self._bytes.get(token_id)
        if b is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < self.size else None
            decoder = _byte_decoder()
            if piece is None:
                b = []
            elif all(c in decoder for c in piece):  # byte-level BPE (GPT-2, Qwen): its alphabet stands for bytes
                b = [decoder[c] for c in piece]
            else:
                b = list(self.text(token_id).encode())
            self._bytes[token_id] = b
        return b


def completion_logprobs(strings: TokenStrings, token_ids: list[int], dicts: list[dict | None], k: int,
                        offset: int = 0) -> tuple[dict, int]:
    """The legacy shape for these tokens, their text offsets starting at `offset`; and the offset
    after them (a stream continues from it)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, d in zip(token_ids, dicts):
        s = strings.text(token)
        tokens.append(s)
        text_offset.append(offset)
        offset += len(s)
        if d is None:  # the first prompt token: nothing before it to condition on
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(d[token])
        top = {}
        for i, (t, lp) in enumerate(d.items()):
            if i < k or t == token:
                top.setdefault(strings.text(t), lp)
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}, offset


def chat_logprobs(strings: TokenStrings, token_ids: list[int], dicts: list[dict], k: int) -> list[dict]:
    """The chat shape's `content` entries for these tokens."""
    def entry(t, lp):
        return {"token": strings.text(t), "logprob": lp, "bytes": strings.bytes(t)}
    return [{**entry(token, d[token]), "top_logprobs": [entry(t, lp) for t, lp in list(d.items())[:k]]}
            for token, d in zip(token_ids, dicts)]
