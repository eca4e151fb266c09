"""Per-request sampling settings, checked when the request is added."""
import json
from dataclasses import dataclass, field

import numpy as np


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
    max_tokens: int = 64
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    skip_special_tokens: bool = True          # leave special tokens out of the text
    structured_output: StructuredOutput | None = None  # constrain the output to a grammar

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
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                bad(f"structured_output must be a StructuredOutput, got {type(self.structured_output).__name__}")
            self.structured_output.validate()
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**63):
            bad(f"seed must be a 64-bit integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
