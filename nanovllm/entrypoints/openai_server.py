"""OpenAI-compatible HTTP API over the AsyncEngine: /v1/completions (with logprobs and echo),
/v1/chat/completions (with logprobs), /v1/models, /tokenize, /detokenize, /tokenizer_info, /version,
/health and /metrics; SGLang's native /generate; and for a router in front of several servers (SGLang's `smg` / `sglang-router`),
the discovery and load endpoints it reads: /server_info, /model_info (and their /get_* aliases),
/v1/loads and the older /get_load, in the shapes SGLang answers them; and SGLang's /flush_cache (a router's POST
/flush_cache calls it on every worker; vLLM's name: /reset_prefix_cache) and /health_generate (smg's is one
worker's).

Each handler parses and validates the whole request (types, ranges, context length, model name)
before it queues anything, so a bad request costs the engine nothing. Errors use OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with 400 / 401 / 404 as OpenAI would answer.
"""
import asyncio
import hmac
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from transformers import AutoTokenizer

from nanovllm.entrypoints.async_engine import AsyncEngine, Delta, RequestStream
from nanovllm.entrypoints.metrics import CONTENT_TYPE, render
from nanovllm.entrypoints.logprobs_format import TokenStrings, chat_logprobs, completion_logprobs
from nanovllm.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutput

MAX_N = 64                    # choices per prompt; each one is a sequence in the batch
MAX_SEQS_PER_REQUEST = 256    # prompts x n
HEALTH_GENERATE_TIMEOUT_S = 20.0   # seconds /health_generate waits for its one token
INT64 = 2 ** 63
LOAD_SECTIONS = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}  # SGLang's /v1/loads?include=

try:
    VERSION = version("nanovllm")
except PackageNotFoundError:  # run from a source tree without installing
    VERSION = "unknown"

# ---------------------------------------------------------------------------------------------
# Protocol. Strict: JSON types must match ("5" is not an integer); unknown fields are ignored.


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str | None = None        # optional here; when given it must be a served name (else 404)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # Bounded here because the engine turns them into int64 tensors / generator seeds mid-step, where an
    # overflow would fail the whole batch; any top_k >= the vocabulary keeps every token anyway.
    top_k: int | None = Field(None, ge=-1, le=2 ** 31 - 1)  # extension (vLLM): -1 or 0 keeps all tokens
    seed: int | None = Field(None, ge=-INT64, lt=INT64 - MAX_N)
    ignore_eos: bool = False                            # extension: generate past EOS (benchmarks)
    stop_token_ids: list[int] | None = None             # extension
    presence_penalty: float | None = Field(None, ge=-2, le=2)     # OpenAI's, over the generated tokens
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None          # token id (a JSON key: a string) -> bias in [-100, 100]
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's: prompt + generated tokens
    min_p: float | None = Field(None, ge=0, le=1)       # vLLM's
    min_tokens: int | None = Field(None, ge=0)          # vLLM's: no EOS / stop before this many tokens
    user: str | None = None
    include_stop_str_in_output: bool = False            # vLLM's: keep the stop string in the text
    skip_special_tokens: bool = True                    # vLLM's: leave special tokens out of the text
    # Structured output (engine/grammar.py): OpenAI's response_format, or one of vLLM's guided_* fields.
    response_format: dict | None = None                 # {"type": "text" | "json_object" | "json_schema", ...}
    guided_json: dict | str | None = None               # a JSON schema (object or its text)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None                   # EBNF (xgrammar's dialect, rule `root`)


# Fields other servers take that we do not implement, and the value that asks for what we do anyway
# (accepted); any other value, or a field nobody declared, gets a 400 naming it (a request must never be
# answered as if a setting had been applied).
DEFAULT_EXTRAS = {"spaces_between_special_tokens": True,
                  # sglang-router 0.3.2 adds these to every chat request it forwards (SGLang's defaults)
                  "no_stop_trim": False, "continue_final_message": False, "return_hidden_states": False,
                  "separate_reasoning": True, "stream_reasoning": True}


class _TopLevel(_SamplingRequest):
    model_config = ConfigDict(strict=True, extra="allow")  # undeclared fields are seen, then refused


class CompletionRequest(_TopLevel):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)            # OpenAI's default; null: up to the context; 0: echo only
    echo: bool = False                                  # the prompt before the completion (and its logprobs)
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top-k per token (legacy shape)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_TopLevel):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)          # chat default: up to the context
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    chat_template_kwargs: dict | None = None            # e.g. Qwen3's {"enable_thinking": false}


class GenerateSampling(_Strict):
    """SGLang's native sampling_params (the subset we implement; the rest is refused by name)."""
    model_config = ConfigDict(strict=True, extra="allow")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=2 ** 31 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False                          # keep the stop string (our include_stop_str_in_output)
    n: int = Field(1, ge=1, le=MAX_N)
    sampling_seed: int | None = Field(None, ge=-INT64, lt=INT64 - MAX_N)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    min_p: float = Field(0.0, ge=0, le=1)
    min_new_tokens: int = Field(0, ge=0)                # our min_tokens
    logit_bias: dict[str, float] | None = None
    json_schema: str | None = None                      # structured output (SGLang's names): a schema's text,
    regex: str | None = None                            # a regular expression,
    ebnf: str | None = None                             # or an EBNF grammar


SGLANG_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "ebnf"}


class GenerateRequest(_Strict):
    """SGLang's native POST /generate: `text` or `input_ids`, one prompt or a batch."""
    model_config = ConfigDict(strict=True, extra="allow")
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: GenerateSampling = Field(default_factory=GenerateSampling)
    stream: bool = False
    rid: str | list[str] | None = None                  # request id(s), echoed in meta_info


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the parameter."""
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"Malformed JSON in request body: {err['msg']}", code="invalid_json")
    if err["type"] == "model_type" and not err["loc"]:
        return ApiError(400, "The request body must be a JSON object", code="invalid_json")
    path, in_union = [], False
    for part in err["loc"]:
        # Union members appear in the path as type names ("str", "list[int]"): a type mismatch.
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part[:1].isupper()):
            in_union = True
            break
        path.append(str(part))
    name = ".".join(path) or None
    param = path[0] if path else None
    if err["type"] == "missing" and not in_union:
        return ApiError(400, f"Missing required parameter: '{name}'", param=param, code="missing_required_parameter")
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if in_union:
        return ApiError(400, f"Invalid type for '{name}': {shown} matches none of the accepted types",
                        param=param, code="invalid_type")
    return ApiError(400, f"Invalid value for '{name}': {err['msg']} (got {shown})", param=param, code="invalid_value")


def _parse(model: type[BaseModel], body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def _refuse_extras(req: BaseModel, accepted: dict | None = None):
    """A 400 naming the first undeclared field, unless it is null or has the value `accepted` gives it."""
    for name, value in (req.model_extra or {}).items():
        if value is not None and not (accepted and name in accepted and value == accepted[name]):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _unsupported(req: _SamplingRequest):
    """Reject options we would otherwise silently ignore (a wrong answer is worse than a 400)."""
    def no(param, why="is not supported"):
        raise ApiError(400, f"'{param}' {why}", param=param, code="unsupported_parameter")
    _refuse_extras(req, DEFAULT_EXTRAS)
    if isinstance(req, CompletionRequest):
        if req.max_tokens == 0 and not req.echo:
            no("max_tokens", "may be 0 only with echo (nothing would be returned)")
        if req.suffix:
            no("suffix")
        if req.best_of not in (None, req.n):
            no("best_of", "must equal n (no server-side best-of sampling)")
    else:
        if req.top_logprobs is not None and not req.logprobs:
            no("top_logprobs", "needs logprobs: true")
        if req.tools:
            no("tools")


GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _structured_output(req: _SamplingRequest) -> tuple[StructuredOutput | None, str | None]:
    """The request's grammar and the field that asked for it, or (None, None). At most one field may ask."""
    asked = [(name, {GUIDED_FIELDS[name]: getattr(req, name)}) for name in GUIDED_FIELDS if getattr(req, name) is not None]
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                               param="response_format", code="invalid_value")
            asked.append(("response_format", {"json": spec["schema"]}))
        elif kind != "text":
            raise ApiError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format", code="invalid_value")
    if len(asked) > 1:
        raise ApiError(400, f"pass at most one of response_format and {', '.join(GUIDED_FIELDS)}; got "
                            f"{', '.join(name for name, _ in asked)}", param=asked[1][0], code="invalid_value")
    if not asked:
        return None, None
    name, fields = asked[0]
    try:
        return StructuredOutput(**fields), name
    except ValueError as e:
        raise ApiError(400, f"{name}: {e}", param=name, code="invalid_value") from None


# ---------------------------------------------------------------------------------------------
# Building sequences


class OpenAIServing:
    """Turns parsed requests into validated engine sequences: model name, tokens, defaults, limits."""

    def __init__(self, engine: AsyncEngine, served_model_names: list[str]):
        self.engine = engine
        self.model_names = served_model_names
        config = engine.engine.config
        # Our own tokenizer: the engine thread decodes with the engine's, and a tokenizer object is not
        # safe to share across threads. Tokenizing here gives the same ids as engine.make_sequence(str).
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.config = config
        # Tokenizing (and validating) a prompt can take a second for a megabyte of text: it runs on this
        # one thread, off the event loop (one thread: the tokenizer object is not safe to share).
        self.tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanovllm-tokenize")
        self.max_model_len = config.max_model_len
        self.kv_capacity = engine.engine.scheduler.block_manager.num_blocks * config.kvcache_block_size
        # Token strings for logprobs, on the event loop: a third tokenizer, used by that thread only.
        self.token_strings = TokenStrings(AutoTokenizer.from_pretrained(config.model))
        self.created = int(time.time())

    def check_model(self, name: str | None) -> str:
        if name is None:
            return self.model_names[0]
        if name not in self.model_names:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves {self.model_names}",
                           param="model", code="model_not_found")
        return name

    def _sampling_params(self, req: _SamplingRequest, max_tokens: int, choice: int,
                         structured: StructuredOutput | None = None) -> SamplingParams:
        def default(value, otherwise):
            return otherwise if value is None else value

        if isinstance(req, CompletionRequest):
            logprobs = req.logprobs
            prompt_logprobs = logprobs if req.echo else None
        else:
            logprobs, prompt_logprobs = (req.top_logprobs or 0) if req.logprobs else None, None
        try:
            return SamplingParams(
                temperature=default(req.temperature, 1.0), top_p=default(req.top_p, 1.0),
                top_k=default(req.top_k, -1), min_p=default(req.min_p, 0.0),
                presence_penalty=default(req.presence_penalty, 0.0),
                frequency_penalty=default(req.frequency_penalty, 0.0),
                repetition_penalty=default(req.repetition_penalty, 1.0),
                logit_bias=_logit_bias(req.logit_bias), min_tokens=default(req.min_tokens, 0),
                max_tokens=max_tokens, ignore_eos=req.ignore_eos, stop=req.stop,
                stop_token_ids=req.stop_token_ids or [], include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                structured_output=structured,
                # n > 1 with a seed: distinct but reproducible choices.
                seed=None if req.seed is None else req.seed + choice)
        except ValueError as e:
            raise ApiError(400, str(e), param=_param_of(str(e)), code="invalid_value") from None

    def make_sequences(self, req: _SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
                       prompt_param: str, max_tokens_param: str = "max_tokens") -> list:
        """n sequences per prompt, prompt-major (that is the choice index order); all validated first.
        Errors name the prompt and the length field as the request spelled them (prompt_param,
        max_tokens_param: chat's max_completion_tokens, /generate's max_new_tokens)."""
        if len(prompts) * req.n > MAX_SEQS_PER_REQUEST:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} is more than {MAX_SEQS_PER_REQUEST} "
                                f"sequences in one request", param=prompt_param)
        structured, param = _structured_output(req)
        if structured is not None:
            try:  # compiled here, on the tokenizer thread (cached): the engine's matchers come from the cache
                self.engine.engine.grammar_compiler.compile(structured)
            except ValueError as e:
                raise ApiError(400, f"{param}: {e}", param=param, code="invalid_value") from None
        seqs = []
        for token_ids in prompts:
            # Default length: whatever fits the context and the KV pool after the prompt.
            limit = max(1, min(self.max_model_len, self.kv_capacity) - len(token_ids))
            for choice in range(req.n):
                sp = self._sampling_params(req, max_tokens or limit, choice, structured)
                try:
                    seq = self.engine.make_sequence(token_ids, sp)
                except ValueError as e:
                    code = "context_length_exceeded" if "too long" in str(e) else "invalid_value"
                    # a sampling field (e.g. a logit_bias id out of the vocabulary), else the prompt
                    param = _param_of(str(e)) if str(e).startswith("SamplingParams:") else prompt_param
                    raise ApiError(400, str(e), param=param, code=code) from None
                seqs.append(seq)
            if max_tokens is not None and len(token_ids) + max_tokens > self.max_model_len:
                raise ApiError(400, f"{max_tokens_param}={max_tokens} plus the prompt's {len(token_ids)} tokens "
                                    f"exceed max_model_len={self.max_model_len}; lower {max_tokens_param} or the "
                                    f"prompt", param=max_tokens_param, code="context_length_exceeded")
        return seqs

    async def off_loop(self, fn):
        """fn() on the tokenizer thread; its exceptions (ApiError for bad requests) come back here."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn)

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [self.tokenizer.encode(p)]
        if not p or isinstance(p[0], int):
            return [list(p)]
        return [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in p]

    def echo_texts(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """The prompts as echoed: a text prompt as sent, a token-id prompt decoded."""
        p = req.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], str):
            return list(p)
        return [self.tokenizer.decode(ids) for ids in prompts]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content or [])
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content})
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                      **(req.chat_template_kwargs or {}))
        except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
            raise ApiError(400, f"chat template failed on these messages: {e}", param="messages") from None
        # The template wrote the special tokens already.
        return self.tokenizer.encode(text, add_special_tokens=False)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias has token ids as JSON keys (strings): as ints, or a 400 naming the field."""
    if not bias:
        return None
    ids = {}
    for token, value in bias.items():
        try:
            ids[int(token)] = value
        except ValueError:
            raise ApiError(400, f"logit_bias keys must be token ids, got {token[:20]!r}", param="logit_bias",
                           code="invalid_value") from None
    return ids


class Choices:
    """One response's choices in OpenAI's shapes: text or message, echo (completions) and logprobs, whole
    (non-streamed) or chunk by chunk. Choice i is seqs[i]; prompts are n choices each, prompt-major."""

    def __init__(self, req: _SamplingRequest, seqs: list, chat: bool, echo: list[str] | None,
                 strings: TokenStrings):
        self.chat, self.echo, self.strings, self.seqs = chat, echo, strings, seqs
        self.n = req.n
        self.echo_only = not chat and req.max_tokens == 0   # the one token generated is not returned
        if chat:
            self.k = (req.top_logprobs or 0) if req.logprobs else None
        else:
            self.k = req.logprobs
        self.offsets = [0] * len(seqs)       # text_offset where a stream's next token starts
        self.echoed = [False] * len(seqs)

    def _completion_logprobs(self, i: int, token_ids: list[int], dicts: list) -> dict | None:
        if self.k is None:
            return None
        logprobs, self.offsets[i] = completion_logprobs(self.strings, token_ids, dicts, self.k, self.offsets[i])
        return logprobs

    def _chat_logprobs(self, token_ids: list[int], dicts: list) -> dict | None:
        if self.k is None:
            return None
        return {"content": chat_logprobs(self.strings, token_ids, dicts, self.k), "refusal": None}

    def final(self, i: int, d: Delta) -> dict:
        """A non-streamed choice from its sequence's final delta."""
        token_ids, dicts, text = d.final_token_ids, d.final_logprobs, d.final_text
        if self.chat:
            return {"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": self._chat_logprobs(token_ids, dicts), "finish_reason": d.finish_reason}
        if self.echo_only:
            token_ids, dicts, text, d.finish_reason, d.completion_tokens = [], [], "", "length", 0
        if self.echo is not None:
            text = self.echo[i // self.n] + text
            if self.k is not None:
                token_ids = self.seqs[i].prompt_token_ids + token_ids
                dicts = d.prompt_logprobs + dicts
        return {"index": i, "text": text, "logprobs": self._completion_logprobs(i, token_ids, dicts),
                "finish_reason": d.finish_reason}

    def first_chunk(self, i: int) -> dict | None:
        """Chat: the assistant role, before any token. Completions: nothing (echo waits for the prompt's logprobs)."""
        if self.chat:
            return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return None

    def chunks(self, i: int, d: Delta) -> list[dict]:
        """What one delta of choice i streams: its echo first (completions), then the new text."""
        out = []
        token_ids, dicts, text, finish = d.token_ids or [], d.logprobs or [], d.text, d.finish_reason
        if self.echo_only:
            token_ids, dicts, text = [], [], ""
            if d.finished:
                finish, d.completion_tokens = "length", 0
        if self.echo is not None and not self.echoed[i]:
            self.echoed[i] = True
            prompt = self.seqs[i].prompt_token_ids
            logprobs = self._completion_logprobs(i, prompt, d.prompt_logprobs) if self.k is not None else None
            out.append({"index": i, "text": self.echo[i // self.n], "logprobs": logprobs, "finish_reason": None})
        if not (text or d.finished or (self.k is not None and token_ids)):
            return out
        if self.chat:
            out.append({"index": i, "delta": {"content": text} if text else {},
                        "logprobs": self._chat_logprobs(token_ids, dicts), "finish_reason": finish})
        else:
            out.append({"index": i, "text": text, "logprobs": self._completion_logprobs(i, token_ids, dicts),
                        "finish_reason": finish})
        return out


def _param_of(message: str) -> str | None:
    """The field a SamplingParams message names first: "SamplingParams: <param> must ..." or
    "SamplingParams: <param>=<value> rounds to 0 ..." (the name only, never the value)."""
    name = re.match(r"\s*([A-Za-z_]\w*)", message.replace("SamplingParams:", "", 1))
    return name.group(1) if name else None


def _usage(finals: dict[int, Delta], n: int) -> dict:
    """OpenAI's usage from the final deltas by choice index: the prompt counts once per prompt, not once
    per choice (OpenAI, vLLM and SGLang count it so; n=4 reported 4x the prompt), completions count all."""
    firsts = [d for i, d in finals.items() if i % n == 0]   # choices are prompt-major: i // n is the prompt
    prompt = sum(d.prompt_tokens for d in firsts)
    completion = sum(d.completion_tokens for d in finals.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(d.cached_tokens for d in firsts)}}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------
# What a router reads: SGLang's field names and JSON types (its Rust parsers reject a float where
# they expect an integer), one data-parallel rank (0), numbers from the engine thread's snapshot.


def _server_info(serving: OpenAIServing) -> dict:
    c = serving.config
    return {"model_path": c.model, "tokenizer_path": c.model, "served_model_name": serving.model_names[0],
            "served_model_names": serving.model_names, "tp_size": c.tensor_parallel_size, "dp_size": 1,
            "context_length": c.max_model_len, "page_size": c.kvcache_block_size,
            "max_total_num_tokens": serving.kv_capacity, "max_running_requests": c.max_num_seqs,
            "max_prefill_tokens": c.max_num_batched_tokens, "enable_prefix_caching": c.enable_prefix_caching,
            "enable_cascade_attention": c.enable_cascade_attention, "device": str(c.device),
            "dtype": str(c.torch_dtype).removeprefix("torch."), "engine": "nanovllm", "version": VERSION}


def _tokenizer_info(serving: OpenAIServing) -> dict:
    tok = serving.tokenizer
    return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
            "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id, "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
            "model_max_length": serving.max_model_len, "vocab_size": len(tok),
            "add_bos_token": bool(getattr(tok, "add_bos_token", False))}


def _model_info(serving: OpenAIServing) -> dict:
    hf = serving.config.hf_config
    return {"model_path": serving.config.model, "tokenizer_path": serving.config.model, "is_generation": True,
            "model_type": hf.model_type, "architectures": list(hf.architectures or []),
            "has_image_understanding": False, "has_audio_understanding": False}


def _rank_load(snapshot: dict, serving: OpenAIServing, sections: set[str]) -> dict:
    """One rank's load: requests are sequences (n choices count n), tokens are KV pages x page size."""
    kv, st, c = snapshot["kv"], snapshot["stats"], serving.config
    running, waiting = snapshot["running"], snapshot["waiting"]
    used = kv["blocks_used"] * c.kvcache_block_size
    total = kv["blocks_total"] * c.kvcache_block_size
    since, generated = snapshot["gen_window"]   # tokens generated since then, over at least a second
    throughput = (st["generated_tokens"] - generated) / max(time.monotonic() - since, 1.0)
    hit_rate = kv["cache_hit_tokens"] / kv["cache_query_tokens"] if kv["cache_query_tokens"] else 0.0
    load = {"dp_rank": 0, "num_running_reqs": running, "num_waiting_reqs": waiting,
            "num_total_reqs": running + waiting, "num_waiting_uncached_tokens": snapshot["waiting_tokens"],
            "num_used_tokens": used, "num_total_tokens": used + snapshot["waiting_tokens"],
            "max_total_num_tokens": total, "token_usage": round(used / total, 4) if total else 0.0,
            "gen_throughput": round(throughput, 2), "cache_hit_rate": round(hit_rate, 4),
            "utilization": round(running / c.max_num_seqs, 4), "max_running_requests": c.max_num_seqs}
    if sections & {"queues", "all"}:
        load["queues"] = {"waiting": waiting, "grammar": 0, "paused": 0, "retracted": 0}
    return load


def _loads(snapshot: dict, serving: OpenAIServing, query) -> dict:
    """GET /v1/loads?include=core,queues&dp_rank=0 as SGLang answers it (sections we lack are left out)."""
    sections = {part.strip() for part in query.get("include", "all").split(",") if part.strip()} or {"all"}
    if sections - LOAD_SECTIONS:
        raise ApiError(400, f"Invalid include sections: {sorted(sections - LOAD_SECTIONS)}; valid: "
                            f"{sorted(LOAD_SECTIONS)}", param="include")
    if query.get("format", "json") != "json":
        raise ApiError(400, "format must be json (the Prometheus text is at /metrics)", param="format")
    rank = query.get("dp_rank")
    try:
        rank = None if rank is None else int(rank)
    except ValueError:
        raise ApiError(400, f"dp_rank must be an integer, got {rank[:20]!r}", param="dp_rank") from None
    loads = [_rank_load(snapshot, serving, sections)] if rank in (None, 0) else []  # one rank: 0
    n = max(len(loads), 1)
    aggregate = {
        "total_running_reqs": sum(d["num_running_reqs"] for d in loads),
        "total_waiting_reqs": sum(d["num_waiting_reqs"] for d in loads),
        "total_reqs": sum(d["num_total_reqs"] for d in loads),
        "total_used_tokens": sum(d["num_used_tokens"] for d in loads),
        "total_tokens": sum(d["num_total_tokens"] for d in loads),
        "avg_token_usage": round(sum(d["token_usage"] for d in loads) / n, 4),
        "avg_throughput": round(sum(d["gen_throughput"] for d in loads) / n, 2),
        "avg_utilization": round(sum(d["utilization"] for d in loads) / n, 4)}
    return {"timestamp": datetime.now(timezone.utc).isoformat(), "version": VERSION,
            "dp_rank_count": len(loads), "loads": loads, "aggregate": aggregate}


def _legacy_load(snapshot: dict, serving: OpenAIServing) -> list[dict]:
    """GET /get_load, SGLang's older endpoint (sglang-router 0.3 polls it): one entry per rank, and
    num_tokens counts the KV tokens in use plus those queued for prefill."""
    load = _rank_load(snapshot, serving, set())
    return [{"dp_rank": 0, "num_reqs": load["num_total_reqs"], "num_waiting_reqs": load["num_waiting_reqs"],
             "num_tokens": load["num_total_tokens"]}]


async def _watch_disconnect(http_request: Request, engine: AsyncEngine, request: RequestStream):
    """Wait for the client to leave; then abort its sequences and wake whoever waits on their deltas.

    The body is already read, so the next ASGI message can only be http.disconnect."""
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            engine.abort(request)
            request.queue.put_nowait(Delta(-1, finished=True, error="client disconnected"))
            return


# ---------------------------------------------------------------------------------------------
# The app


def build_app(engine: AsyncEngine, served_model_names: list[str], api_key: str | None = None) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine loop and, at shutdown, stops it."""
    serving = OpenAIServing(engine, served_model_names)
    http_errors: dict[int, int] = {}

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)
            serving.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nanovllm", lifespan=lifespan)

    def error_response(err: ApiError) -> JSONResponse:
        http_errors[err.status] = http_errors.get(err.status, 0) + 1
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ApiError)
    async def on_api_error(request, err: ApiError):
        return error_response(err)

    @app.exception_handler(ClientDisconnect)
    async def on_client_left(request, exc: ClientDisconnect):
        # The client left while sending its body: nobody reads this answer, and it is no server error
        # (unhandled, it was a 500 and a logged traceback).
        return error_response(ApiError(499, "client disconnected before sending the whole request body",
                                       type="client_closed_request"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        return error_response(ApiError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(RequestValidationError)
    async def on_bad_query(request, exc: RequestValidationError):
        # FastAPI's own parsing of typed query / path parameters (e.g. /debug/kv?max_pages=abc): OpenAI's
        # shape and a 400 naming the parameter, like every other bad request (it was a 422 {"detail": ...}).
        err = exc.errors()[0]
        name = str(err["loc"][-1]) if err.get("loc") else None
        return error_response(ApiError(400, f"Invalid value for '{name}': {err['msg']}", param=name,
                                       code="invalid_value"))

    @app.exception_handler(Exception)
    async def on_crash(request, exc: Exception):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    async def check_api_key(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "Missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            failure = engine.engine.failure
            return JSONResponse({"status": f"engine stopped: {failure}" if failure else "engine loop not running"},
                                status_code=503)
        return {"status": "ok"}

    @app.api_route("/metrics", methods=["GET", "HEAD"])  # scrapers and aiperf send HEAD first
    async def metrics():
        return Response(render(engine.snapshot, http_errors), media_type=CONTENT_TYPE)

    @app.get("/debug/kv", dependencies=[Depends(check_api_key)])
    async def debug_kv(max_pages: int = 64):
        """The KV cache's tiers, prefix groups, LRU ends and hit rates (engine/kv_state.py)."""
        if max_pages < 0:
            raise ApiError(400, "max_pages must be >= 0", param="max_pages")
        if not engine.is_alive:
            raise ApiError(503, "the engine loop is not running")
        state = await engine.kv_state()
        for tier in ("gpu", "host"):
            state[tier]["lru"] = state[tier]["lru"][:max_pages]
        return state

    # Forget every cached prefix: SGLang's /flush_cache (a router's POST /flush_cache calls it on each worker) and
    # vLLM's /reset_prefix_cache. Only between requests, as in both: 400, nothing changed, while any are live.
    @app.api_route("/flush_cache", methods=["GET", "POST"], dependencies=[Depends(check_api_key)])
    @app.post("/reset_prefix_cache", dependencies=[Depends(check_api_key)])
    async def flush_cache():
        if not engine.is_alive:
            raise ApiError(503, "the engine loop is not running", type="server_error")
        if await engine.reset_prefix_cache():
            return Response("Cache flushed.\n", media_type="text/plain")
        return Response("Cache not flushed: requests are running or waiting; retry once they are done.\n",
                        status_code=400, media_type="text/plain")

    @app.get("/health_generate")
    async def health_generate(http_request: Request):
        """SGLang's deeper probe: one greedy token through the engine (a stuck or failed loop answers 503)."""
        if not engine.is_alive:
            return JSONResponse({"status": "engine loop not running"}, status_code=503)
        seq = engine.make_sequence([0], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        request = engine.submit([seq], stream=False)
        try:   # a timeout cancels _finals, which aborts the request
            await asyncio.wait_for(_finals(http_request, request), HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            error = f"no token within {HEALTH_GENERATE_TIMEOUT_S} s"
        except ApiError as e:   # the engine failed the request (or the client left)
            error = e.message
        else:
            return {"status": "ok"}
        return JSONResponse({"status": error}, status_code=503)

    # For routers (open like /health and /metrics: they are probes). /get_* are SGLang's older names.
    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return _server_info(serving)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return _model_info(serving)

    @app.get("/v1/loads")
    async def loads(request: Request):
        return _loads(engine.snapshot, serving, request.query_params)

    @app.get("/get_load")
    async def legacy_load():
        return _legacy_load(engine.snapshot, serving)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": serving.created, "owned_by": "nanovllm",
                "max_model_len": serving.max_model_len}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in served_model_names]}

    @v1.get("/models/{name:path}")
    async def model(name: str):
        return model_card(serving.check_model(name))

    @app.post("/tokenize", dependencies=[Depends(check_api_key)])
    async def tokenize(http_request: Request):
        req = _parse(TokenizeRequest, await http_request.body())
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "pass exactly one of 'prompt' and 'messages'", param="prompt")

        def ids():
            if req.prompt is not None:
                return serving.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            return serving.chat_prompt(ChatCompletionRequest(messages=req.messages))
        tokens = await serving.off_loop(ids)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": serving.max_model_len}

    @app.get("/tokenizer_info", dependencies=[Depends(check_api_key)])
    async def tokenizer_info():
        """vLLM's shape: what a client needs to tokenize like us (lm-eval's remote tokenizer reads the
        special tokens and the chat template from it, then calls /tokenize and /detokenize)."""
        return _tokenizer_info(serving)

    @app.get("/version")
    async def version_():
        return {"version": VERSION}

    @app.post("/detokenize", dependencies=[Depends(check_api_key)])
    async def detokenize(http_request: Request):
        req = _parse(DetokenizeRequest, await http_request.body())
        serving.check_model(req.model)
        vocab = serving.config.hf_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
        return {"prompt": await serving.off_loop(lambda: serving.tokenizer.decode(req.tokens))}

    @app.post("/generate", dependencies=[Depends(check_api_key)])
    async def generate(http_request: Request):
        """SGLang's native endpoint, on the same engine path as /v1/completions."""
        req = _parse(GenerateRequest, await http_request.body())
        sp = req.sampling_params
        _refuse_extras(req)
        _refuse_extras(sp)
        if (req.text is None) == (req.input_ids is None):
            raise ApiError(400, "pass exactly one of 'text' and 'input_ids'", param="text")
        prompt = req.text if req.text is not None else req.input_ids
        batch = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        completion = CompletionRequest(
            prompt=prompt, max_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
            stop=sp.stop, stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos, n=sp.n,
            skip_special_tokens=sp.skip_special_tokens, include_stop_str_in_output=sp.no_stop_trim,
            seed=sp.sampling_seed, presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
            repetition_penalty=sp.repetition_penalty, min_p=sp.min_p, min_tokens=sp.min_new_tokens,
            logit_bias=sp.logit_bias, **{ours: getattr(sp, theirs) for ours, theirs in SGLANG_GUIDED.items()})
        prompts_given = len(prompt) if batch else 1
        if isinstance(req.rid, list) and len(req.rid) != prompts_given:
            raise ApiError(400, f"rid: a list needs one request id per prompt ({prompts_given}), got {len(req.rid)}",
                           param="rid", code="invalid_value")
        try:
            seqs = await serving.off_loop(lambda: serving.make_sequences(
                completion, serving.completion_prompts(completion), completion.max_tokens, "text", "max_new_tokens"))
        except ApiError as e:  # name the field as this request spelled it
            if e.param in SGLANG_GUIDED:
                theirs = SGLANG_GUIDED[e.param]
                e.message = e.message.replace(e.param, theirs)
                e.param = theirs
            raise
        if not engine.is_alive:
            raise ApiError(503, "the engine loop is not running", type="server_error")
        rids = req.rid if isinstance(req.rid, list) else [req.rid or uuid.uuid4().hex]  # one per prompt
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        request = engine.submit(seqs, stream=req.stream)

        def item(i: int, text: str, d: Delta | None) -> dict:
            meta = {"id": f"{rids[i // sp.n % len(rids)]}" + (f"-{i}" if len(seqs) > 1 else ""),  # prompt-major
                    "finish_reason": {"type": d.finish_reason} if d is not None else None}
            if d is not None:
                meta.update(prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens,
                            cached_tokens=d.cached_tokens)
            return {"text": text, "meta_info": meta, "index": i}

        if req.stream:
            async def events():
                watcher = asyncio.create_task(_watch_disconnect(http_request, engine, request))
                texts = [""] * len(seqs)
                try:
                    while not request.finished:
                        d = await request.get()
                        if d.error is not None:
                            if d.seq_id != -1:
                                yield _sse(ApiError(500, d.error, type="server_error").body())
                                yield b"data: [DONE]\n\n"
                            return
                        i = index[d.seq_id]
                        texts[i] += d.text
                        if d.text or d.finished:  # SGLang streams the text so far
                            yield _sse(item(i, texts[i], d if d.finished else None))
                    yield b"data: [DONE]\n\n"
                finally:
                    watcher.cancel()
                    engine.abort(request)
            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finals = await _finals(http_request, request)
        out = [item(i, finals[s.seq_id].final_text, finals[s.seq_id]) for i, s in enumerate(seqs)]
        return out if batch or len(out) > 1 else out[0]

    @v1.post("/completions")
    async def completions(http_request: Request):
        req = _parse(CompletionRequest, await http_request.body())
        model = serving.check_model(req.model)
        _unsupported(req)

        def build():
            prompts = serving.completion_prompts(req)
            max_tokens = 1 if req.max_tokens == 0 else req.max_tokens  # 0 (echo only): one token, not returned
            seqs = serving.make_sequences(req, prompts, max_tokens, "prompt")
            return seqs, serving.echo_texts(req, prompts) if req.echo else None
        seqs, echo = await serving.off_loop(build)
        return await _respond(http_request, req, seqs, model, chat=False, echo=echo)

    @v1.post("/chat/completions")
    async def chat_completions(http_request: Request):
        req = _parse(ChatCompletionRequest, await http_request.body())
        model = serving.check_model(req.model)
        _unsupported(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        length_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        seqs = await serving.off_loop(lambda: serving.make_sequences(req, [serving.chat_prompt(req)], max_tokens,
                                                                      "messages", length_param))
        return await _respond(http_request, req, seqs, model, chat=True)

    async def _finals(http_request: Request, request: RequestStream) -> dict[int, Delta]:
        """Wait for every sequence of a non-streamed request: its final delta by sequence id."""
        watcher = asyncio.create_task(_watch_disconnect(http_request, engine, request))
        finals: dict[int, Delta] = {}
        try:
            while not request.finished:
                delta = await request.get()
                if delta.seq_id == -1:  # our disconnect marker: nobody is left to answer
                    raise ApiError(499, delta.error, type="client_closed_request")
                if delta.error is not None:
                    raise ApiError(500, delta.error, type="server_error")
                if delta.finished:
                    finals[delta.seq_id] = delta
        finally:
            watcher.cancel()
            engine.abort(request)  # no-op unless we are leaving early
        return finals

    async def _respond(http_request: Request, req: _SamplingRequest, seqs: list, model: str, chat: bool,
                       echo: list[str] | None = None):
        if not engine.is_alive:
            failure = engine.engine.failure
            raise ApiError(503, f"the engine stopped: {failure}" if failure else "the engine loop is not running",
                           type="server_error")
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        request = engine.submit(seqs, stream=req.stream)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": None,
                "created": int(time.time()), "model": model}
        choices = Choices(req, seqs, chat, echo, serving.token_strings)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(http_request, request, index, head, choices, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finals = await _finals(http_request, request)
        done = [finals[s.seq_id] for s in seqs]
        out = [choices.final(i, d) for i, d in enumerate(done)]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": out,
                "usage": _usage(dict(enumerate(done)), req.n)}

    async def _stream(http_request: Request, request: RequestStream, index: dict[int, int], head: dict,
                      choices: "Choices", include_usage: bool):
        obj = "chat.completion.chunk" if choices.chat else "text_completion"

        def sse(choice: dict) -> bytes:
            return _sse({**head, "object": obj, "choices": [choice]})

        watcher = asyncio.create_task(_watch_disconnect(http_request, engine, request))
        finals: dict[int, Delta] = {}    # by choice index
        try:
            for i in range(len(index)):
                first = choices.first_chunk(i)
                if first is not None:
                    yield sse(first)
            while not request.finished:
                delta = await request.get()
                if delta.error is not None:
                    if delta.seq_id != -1:  # not our own disconnect marker: tell the client
                        yield _sse(ApiError(500, delta.error, type="server_error").body())
                        yield b"data: [DONE]\n\n"
                    return
                i = index[delta.seq_id]
                if delta.finished:
                    finals[i] = delta
                for choice in choices.chunks(i, delta):
                    yield sse(choice)
            if include_usage:
                yield _sse({**head, "object": obj, "choices": [], "usage": _usage(finals, choices.n)})
            yield b"data: [DONE]\n\n"
        finally:
            # Reached on normal end, on our disconnect marker, and when Starlette cancels the
            # response because the client left: in every case free what is still running.
            watcher.cancel()
            engine.abort(request)

    app.include_router(v1)
    return app
