"""Per-request sampling settings, checked when the request is added."""
from dataclasses import dataclass, field

import numpy as np

MAX_LOGPROBS = 20  # top alternatives per position at most (OpenAI's and vLLM's default limit)


@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0 means greedy
    top_p: float = 1.0            # nucleus mass kept, in (0, 1]
    top_k: int = -1               # -1 (or 0) keeps every token
    max_tokens: int = 64
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    skip_special_tokens: bool = True          # leave special tokens out of the text
    logprobs: int | None = None        # k: each sampled token's logprob and the top-k alternatives
    prompt_logprobs: int | None = None  # k: each prompt token's logprob given its prefix, and the top-k

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self):
        def bad(msg):
            raise ValueError(f"SamplingParams: {msg}")
        if not isinstance(self.temperature, (int, float)) or self.temperature != self.temperature or self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not np.float32(self.top_p) > 0:  # sampling runs in float32: 1e-300 would become 0, keeping no token
            bad(f"top_p={self.top_p} rounds to 0 in float32; use at least {float(np.finfo(np.float32).tiny):.3g}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not -1 <= self.top_k < 2**31:
            bad(f"top_k must be -1 (off) or in [0, 2**31), got {self.top_k}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be a boolean, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
                bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**63):
            bad(f"seed must be a 64-bit integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
