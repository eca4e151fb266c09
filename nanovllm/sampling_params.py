"""Per-request sampling settings, checked when the request is added.

Stop rules (eos, stop strings and ids, max_tokens, min_tokens) are applied by
engine/output_processor.py; the logits controls (penalties, logit_bias, min_tokens' mask) by
layers/logits_processor.py and min_p by layers/sampler.py, all on the device; structured_output's grammar by engine/grammar.py."""
import json
import math
from dataclasses import dataclass, field

import numpy as np

MAX_LOGPROBS = 20  # top alternatives per position at most (OpenAI's and vLLM's default limit)


@dataclass
class StructuredOutput:
    """Constrain the output to a grammar (engine/grammar.py compiles it with xgrammar). Exactly one of:
    json         a JSON schema (dict, or its JSON text)
    json_object  True: any JSON object (OpenAI's response_format {"type": "json_object"})
    regex        a regular expression the whole output matches
    choice       a list of strings; the output is exactly one of them
    grammar      an EBNF grammar (xgrammar's GBNF dialect, root rule `root`)"""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    KINDS = ("json", "json_object", "regex", "choice", "grammar")

    def __post_init__(self):
        self.validate()

    def validate(self):
        def bad(msg):
            raise ValueError(f"StructuredOutput: {msg}")
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            bad(f"give exactly one of {', '.join(self.KINDS)}; got {given or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                bad(f"json is not valid JSON: {e}")
        if self.json is not None and not isinstance(self.json, dict):
            bad(f"json must be a JSON schema object, got {type(self.json).__name__}")
        if self.json_object is not False and self.json_object is not True:
            bad(f"json_object must be a boolean, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                bad(f"{name} must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                bad("choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal keys compile to the same grammar (the compile cache's key)."""
        kind = self.kind
        if kind == "json":
            return kind, json.dumps(self.json, separators=(",", ":"), ensure_ascii=False)  # key order is the output order
        if kind == "choice":
            return kind, json.dumps(self.choice, ensure_ascii=False)
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)


@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0 means greedy
    top_p: float = 1.0            # nucleus mass kept, in (0, 1]
    top_k: int = -1               # -1 (or 0) keeps every token
    min_p: float = 0.0            # drop tokens below min_p x the top token's probability (after temperature)
    max_tokens: int = 64
    min_tokens: int = 0           # no EOS / stop id / stop string ends it before this many tokens
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0     # OpenAI's: minus this on every token generated so far, in [-2, 2]
    frequency_penalty: float = 0.0    # OpenAI's: minus this x the token's count in the output, in [-2, 2]
    repetition_penalty: float = 1.0   # HF's / vLLM's: tokens of prompt or output, logit / p if > 0 else x p
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    skip_special_tokens: bool = True          # leave special tokens out of the text
    logprobs: int | None = None        # k: each sampled token's logprob and the top-k alternatives
    prompt_logprobs: int | None = None  # k: each prompt token's logprob given its prefix, and the top-k
    structured_output: StructuredOutput | None = None  # constrain the output to a grammar
    # Set by validate(): some logits control is on (read once per row and step by the step builder,
    # so a batch without any costs one attribute read a row).
    processes_logits: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self):
        def bad(msg):
            raise ValueError(f"SamplingParams: {msg}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        if not isinstance(self.temperature, (int, float)) or self.temperature != self.temperature or self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not np.float32(self.top_p) > 0:  # sampling runs in float32: 1e-300 would become 0, keeping no token
            bad(f"top_p={self.top_p} rounds to 0 in float32; use at least {float(np.finfo(np.float32).tiny):.3g}")
        if not is_int(self.top_k) or not -1 <= self.top_k < 2**31:
            bad(f"top_k must be -1 (off) or in [0, 2**31), got {self.top_k}")
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be non-empty strings")
        if any(not is_int(t) or not 0 <= t < 2**63 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_real(value) or not -2 <= value <= 2:
                bad(f"{name} must be in [-2, 2], got {value}")
        rep = self.repetition_penalty
        # float32 on the device: a value that rounds to 0 or inf there would divide by 0 / make inf logits
        # (compared in float64 first: casting a value past float32's max warns "overflow encountered in cast")
        if not is_real(rep) or not 0 < rep <= float(np.finfo(np.float32).max) or not np.float32(rep) > 0:
            bad(f"repetition_penalty must be > 0 (and finite in float32), got {rep}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            for token, bias in self.logit_bias.items():
                if not is_int(token) or not 0 <= token < 2**63:
                    bad(f"logit_bias keys must be token ids (non-negative integers), got {token!r}")
                if not is_real(bias) or not -100 <= bias <= 100:
                    bad(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be a boolean, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {k!r}")
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                bad(f"structured_output must be a StructuredOutput, got {type(self.structured_output).__name__}")
            self.structured_output.validate()
            if self.min_tokens:
                # The grammar decides where the output ends: once it allows only EOS, min_tokens' mask would
                # leave no token at all, and the sampled one would break the grammar (fuzzing found "no!"
                # for the choice ["yes", "no"] with min_tokens=8).
                bad(f"min_tokens must be 0 with structured_output (the grammar decides where the output ends), "
                    f"got {self.min_tokens}")
        if self.seed is not None and (not is_int(self.seed) or not -2**63 <= self.seed < 2**63):
            bad(f"seed must be a 64-bit integer, got {self.seed!r}")
        self.processes_logits = bool(self.presence_penalty or self.frequency_penalty or rep != 1 or self.logit_bias
                                     or self.min_tokens or self.min_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)
