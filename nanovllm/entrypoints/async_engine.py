"""The engine behind the server: one thread owns the LLMEngine and steps it while any request is live.

A step is blocking compute and the engine is not thread-safe, so nothing but this thread touches the
engine's mutable state. The HTTP side (an asyncio event loop) talks to it through two one-way channels:
  inbox   a thread-safe queue of commands ("add" a request's sequences, "abort" them, "call" a function
          of the engine for GET /debug/kv or /flush_cache, "stop"), drained
          between steps, so requests join the running batch at the next step (continuous batching);
  deltas  per request, an asyncio.Queue filled through loop.call_soon_threadsafe, one call per step and
          event loop, carrying each sequence's new text / finish.
Validation (engine.make_sequence) runs on the HTTP side before anything is queued: it reads only state
fixed at start-up (config, vocab size, number of KV pages), so bad requests never reach the loop.
"""
import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.sequence import Sequence
from nanovllm.entrypoints.metrics import Histogram

logger = logging.getLogger("nanovllm.server")

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SLOW_STATS_PERIOD = 0.1     # seconds between refreshes of the stats that walk the waiting queue
THROUGHPUT_WINDOW = 10.0    # generation throughput is measured over about this many seconds


@dataclass
class Delta:
    """What one step did for one sequence, as the HTTP side sees it."""
    seq_id: int
    text: str = ""                  # new text (streaming requests only; may be "" mid-character)
    num_new_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    final_text: str | None = None   # whole completion, set when finished
    prompt_tokens: int = 0          # usage, set when finished
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None        # the engine failed or is shutting down: the request is over
    # Logprobs, for sequences that asked (SamplingParams.logprobs / prompt_logprobs):
    token_ids: list | None = None        # this delta's new tokens
    logprobs: list | None = None         # their {token_id: logprob}
    prompt_logprobs: list | None = None  # the prompt's, on a sequence's first and final deltas
    final_token_ids: list | None = None  # all completion tokens and their logprobs, when finished
    final_logprobs: list | None = None


class RequestStream:
    """One HTTP request's sequences (n choices / several prompts) and the queue its deltas arrive on."""

    def __init__(self, seqs: list[Sequence], stream: bool, loop: asyncio.AbstractEventLoop):
        self.seqs = seqs
        self.stream = stream
        self.loop = loop
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.unfinished = {s.seq_id for s in seqs}
        self.submitted_at = time.monotonic()
        self.first_token_seen = False   # written by the engine thread only (for the TTFT histogram)

    @property
    def finished(self) -> bool:
        return not self.unfinished

    async def get(self) -> Delta:
        delta = await self.queue.get()
        if delta.finished or delta.error is not None:
            self.unfinished.discard(delta.seq_id)
        return delta


class AsyncEngine:

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, RequestStream] = {}      # seq_id -> its request; engine thread only
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self._started = False
        # Metrics kept by the engine thread and published as one snapshot per loop turn, so readers on
        # other threads never see the engine's structures mid-update.
        self.batch_size_hist = Histogram(BATCH_SIZE_BUCKETS)
        self.ttft_hist = Histogram(TTFT_BUCKETS)
        self.finished_by_reason = {"stop": 0, "length": 0, "abort": 0, "error": 0}
        self._slow_at = -SLOW_STATS_PERIOD
        self._gen_marks: deque[tuple[float, int]] = deque()   # (time, generated tokens), the last window
        self._waiting_tokens = 0
        self.snapshot: dict = {}
        self._publish()

    # ---- lifecycle (any thread) ---------------------------------------------------------------
    def start(self):
        if not self._started:
            self._started = True
            self._thread.start()

    def begin_shutdown(self):
        """Stop taking requests and end the live ones with an error (streams then close at once);
        returns without waiting (safe from a signal handler)."""
        if self._started and self._thread.is_alive():
            self._inbox.put(("stop",))

    def shutdown(self, timeout: float = 10.0):
        """Abort whatever is live (freeing its pages), stop the loop, then the engine's
        tensor-parallel workers (if any)."""
        if self._started and self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.close()

    @property
    def is_alive(self) -> bool:
        """The loop runs and the engine can step (a failed tensor-parallel worker ends that)."""
        return self._thread.is_alive() and self.engine.failure is None

    # ---- requests (event-loop thread) ---------------------------------------------------------
    def make_sequence(self, token_ids: list[int], sampling_params) -> Sequence:
        """Validate one tokenized prompt; ValueError names the problem. Safe off the engine thread (see
        module doc) for token ids only: a string would be tokenized with the engine thread's tokenizer."""
        if not isinstance(token_ids, list):
            raise TypeError("AsyncEngine.make_sequence takes token ids; tokenize on the caller's side")
        return self.engine.make_sequence(token_ids, sampling_params)

    def submit(self, seqs: list[Sequence], stream: bool) -> RequestStream:
        if not self.is_alive:
            raise RuntimeError("the engine loop is not running")
        request = RequestStream(seqs, stream, asyncio.get_running_loop())
        self._inbox.put(("add", request))
        return request

    async def call(self, fn):
        """fn(engine), run on the engine thread between two steps; its result, or its exception raised here."""
        if not self.is_alive:
            raise RuntimeError("the engine loop is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", fn, future, loop))
        return await future

    async def kv_state(self) -> dict:
        """engine.kv_state() (GET /debug/kv)."""
        return await self.call(lambda engine: engine.kv_state())

    async def reset_prefix_cache(self) -> bool:
        """engine.reset_prefix_cache(): False while requests are live, including ones submitted before this call."""
        return await self.call(lambda engine: engine.reset_prefix_cache())

    def abort(self, request: RequestStream):
        """The client left: free its unfinished sequences' pages at the next turn of the loop."""
        if request.unfinished:
            self._inbox.put(("abort", list(request.unfinished)))

    # ---- the loop (engine thread) -------------------------------------------------------------
    def _run(self):
        engine = self.engine
        while True:
            # Idle: sleep on the inbox. Busy: take what has arrived and step again.
            commands = [self._inbox.get()] if engine.is_finished() else []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            stop = False
            for command in commands:
                if command[0] == "add":
                    self._add(command[1])
                elif command[0] == "abort":
                    self._abort(command[1])
                elif command[0] == "call":
                    self._call(*command[1:])
                else:
                    stop = True
            if stop:  # after the adds, so that requests queued with the stop get their error too
                self._fail_all("the server is shutting down", reason="abort")
                self._publish()
                return
            if not engine.is_finished():
                try:
                    self._step()
                except Exception as e:  # keep serving: fail the live requests, not the server
                    logger.exception("engine step failed")
                    self._fail_all(f"engine error: {type(e).__name__}: {e}")
            self._publish()

    def _call(self, fn, future: asyncio.Future, loop: asyncio.AbstractEventLoop):
        try:
            result, error = fn(self.engine), None
        except Exception as e:  # the caller's error, not the loop's
            result, error = None, e

        def settle():
            if not future.done():
                future.set_result(result) if error is None else future.set_exception(error)
        loop.call_soon_threadsafe(settle)

    def _step(self):
        steps_before = self.engine.stats["steps"]
        outputs = self.engine.step()
        if outputs:
            self.batch_size_hist.observe(len(outputs))
            self._dispatch(outputs)
        elif self.engine.stats["steps"] == steps_before:
            time.sleep(0.001)  # nothing schedulable this turn: do not spin

    def _add(self, request: RequestStream):
        for seq in request.seqs:
            self.engine.add_sequence(seq, stream=request.stream)
            self._live[seq.seq_id] = request

    def _abort(self, seq_ids: list[int]):
        for seq_id in seq_ids:
            if self._live.pop(seq_id, None) is not None:  # already finished: nothing to free
                self.engine.abort_request(seq_id)
                self.finished_by_reason["abort"] += 1

    def _dispatch(self, outputs):
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        now = time.monotonic()
        for out in outputs:
            request = self._live.get(out.seq.seq_id)
            if request is None:
                continue
            seq = out.seq
            delta = Delta(seq.seq_id, out.new_text or "", len(out.new_token_ids), out.finished)
            if seq.logprobs is not None or seq.prompt_logprobs is not None:
                self._add_logprobs(delta, out)
            if not request.first_token_seen:
                request.first_token_seen = True
                self.ttft_hist.observe(now - request.submitted_at)
            if out.finished:
                del self._live[seq.seq_id]
                delta.finish_reason = seq.finish_reason
                delta.final_text = self.engine.output_text(seq)  # also drops its detokenizer
                delta.prompt_tokens = seq.num_prompt_tokens
                delta.cached_tokens = seq.num_cached_tokens
                delta.completion_tokens = len(seq.completion_token_ids)
                self.finished_by_reason[seq.finish_reason] = self.finished_by_reason.get(seq.finish_reason, 0) + 1
            by_loop.setdefault(request.loop, []).append((request, delta))
        for loop, items in by_loop.items():
            self._deliver(loop, items)

    @staticmethod
    def _add_logprobs(delta: Delta, out):
        """The step's tokens and their logprobs (the engine appended them before returning the output);
        the prompt's with the first token and at the end; everything at the end."""
        seq = out.seq
        n = len(out.new_token_ids)
        delta.token_ids = list(out.new_token_ids)
        if seq.logprobs is not None:
            delta.logprobs = seq.logprobs[-n:]
        first = seq.num_completion_tokens - seq.num_pending == n
        if seq.prompt_logprobs is not None and (first or out.finished):
            delta.prompt_logprobs = seq.prompt_logprobs
        if out.finished:
            delta.final_token_ids = list(seq.completion_token_ids)
            delta.final_logprobs = None if seq.logprobs is None else list(seq.logprobs)

    def _fail_all(self, message: str, reason: str = "error"):
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq_id, request in list(self._live.items()):
            try:
                self.engine.abort_request(seq_id)
            except Exception:
                logger.exception("abort after engine error failed")
            self.finished_by_reason[reason] += 1
            by_loop.setdefault(request.loop, []).append((request, Delta(seq_id, finished=True, error=message)))
        self._live.clear()
        for loop, items in by_loop.items():
            self._deliver(loop, items)

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, items: list):
        def put_all():
            for request, delta in items:
                request.queue.put_nowait(delta)
        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:
            pass  # that event loop is closed: its clients are gone

    def _publish(self):
        engine = self.engine
        scheduler = engine.scheduler
        now = time.monotonic()
        if now - self._slow_at >= SLOW_STATS_PERIOD:  # a pass over the queue: not every step
            self._slow_at = now
            marks = self._gen_marks
            marks.append((now, engine.stats["generated_tokens"]))
            while now - marks[0][0] > THROUGHPUT_WINDOW:
                marks.popleft()
            self._waiting_tokens = sum(len(seq) for seq in scheduler.waiting)
        if not scheduler.waiting:
            self._waiting_tokens = 0
        self.snapshot = {
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "waiting_tokens": self._waiting_tokens,     # tokens queued for prefill, before cache lookup
            "gen_window": self._gen_marks[0],           # (time, generated tokens) where the window opens
            "live_requests": len({id(r) for r in self._live.values()}),
            "kv": engine.kv_usage(),
            "stats": dict(engine.stats),
            "preemptions": scheduler.num_preemptions,
            "max_queue_wait_s": scheduler.max_queue_wait_s,
            "finished_by_reason": dict(self.finished_by_reason),
            "batch_size_hist": self.batch_size_hist.copy(),
            "ttft_hist": self.ttft_hist.copy(),
        }
