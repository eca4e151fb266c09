"""One request as the engine sees it: its tokens, its KV pages and how far they are computed."""
from enum import Enum, auto
from itertools import count, repeat
from time import monotonic

import numpy as np

from nanovllm.sampling_params import SamplingParams


# Stands for a token that a launched step is sampling on the GPU; filled in when the step is collected.
PLACEHOLDER = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    counter = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int,
                 prompt_bytes: bytes | None = None):
        self.seq_id = next(Sequence.counter)
        self.arrival_time = monotonic()  # for the schedule policies' starvation bound
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        # Room for its completion, up to an eighth of the prompt (a list keeps its room while at least half full): the
        # first append to an exact-size list copies it (W3's 8,320-token prompts: 24 us each, 3 ms a prefill step).
        self.token_ids.extend(repeat(PLACEHOLDER, min(sampling_params.max_tokens, len(token_ids) // 8)))
        del self.token_ids[len(token_ids):]
        self.num_prompt_tokens = len(token_ids)
        self._prompt = token_ids      # as given: returned as prompt_token_ids without a copy
        self.prompt_bytes = prompt_bytes  # the prompt as int64 bytes (from validation), for page hashes
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.block_table: list[int] = []
        self.num_cached_tokens = 0    # prompt tokens served from the prefix cache at admission
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.chunk_len = 0            # tokens this step computes (set by the scheduler)
        self.num_marked_blocks = 0    # leading pages the block manager has marked computed
        self.restore_ticket = 0       # host-tier restores queued up to its own (block_manager.restores_landed)
        self.block_hashes: list[int] = []  # chained hashes of full pages, filled lazily
        self.block_keys: list[bytes] = []  # those pages' token ids as bytes, to confirm cache hits
        self.finish_reason: str | None = None
        self.num_pending = 0          # trailing PLACEHOLDER tokens: sampled by steps not yet collected
        self.last_launched = False    # its last token is launched and will end it by length
        self._pages: np.ndarray | None = None  # numpy copy of block_table (a view of _page_buf), extended as pages are appended
        self._page_buf: np.ndarray | None = None
        self._outputs: np.ndarray | None = None  # collected completion tokens (penalties), grown by doubling
        self._num_outputs = 0
        self._prompt_distinct: np.ndarray | None = None  # the prompt's distinct ids (repetition penalty)
        # Asked-for logprobs ({token_id: logprob} per position, layers/logprobs.py): one per completion
        # token, and one per prompt token (None for the first, which has no prefix).
        self.logprobs: list[dict] | None = [] if sampling_params.logprobs is not None else None
        self.prompt_logprobs: list[dict | None] | None = [None] if sampling_params.prompt_logprobs is not None else None
        self.grammar = None           # structured output: its xgrammar GrammarMatcher (engine/grammar.py)

    def __len__(self):
        return len(self.token_ids)

    @property
    def is_finished(self):
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self):
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self):
        # The prompt as given (an 8k-token prompt sliced again for each of 1024 outputs took ~0.17 s).
        return self._prompt

    @property
    def completion_token_ids(self):
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self):
        return self.token_ids[-1]

    @property
    def num_blocks(self):
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are still to compute: every prompt position needs its logits, so no
        page may come from the prefix cache. Once a token is sampled they are all launched (a
        re-prefill after preemption computes none again)."""
        return self.prompt_logprobs is not None and self.num_completion_tokens == 0

    @property
    def in_prefill(self) -> bool:
        # More than the one token a decode step feeds is still uncomputed.
        return len(self.token_ids) - self.num_computed_tokens > 1

    def release_pages(self):
        """Its pages went back to the pool: the table and its numpy copy start over."""
        self.block_table = []
        self._pages = self._page_buf = None

    def page_array(self) -> np.ndarray:
        """block_table as int32 numpy, kept between steps: a table only grows by appended pages
        (until the pages are freed, which resets it), so each step copies only the new ones, into
        room kept at the end (a decode step that starts a page, 1,024 rows of W3 at once: 0.2 us a
        row, 1.1 as a concatenation). The array is a view whose entries never change: pages
        appended later go past its end, and a table started over gets a new buffer."""
        pages = self._pages
        n = len(self.block_table)
        if pages is None or len(pages) > n:
            buf = np.empty(n + n // 8 + 4, dtype=np.int32)
            buf[:n] = self.block_table
            self._page_buf = buf
            pages = self._pages = buf[:n]
        elif len(pages) < n:
            have, buf = len(pages), self._page_buf
            if len(buf) < n:
                buf = np.empty(2 * n, dtype=np.int32)
                buf[:have] = pages
                self._page_buf = buf
            if n == have + 1:
                buf[have] = self.block_table[have]
            else:
                buf[have:n] = self.block_table[have:]
            pages = self._pages = buf[:n]
        return pages

    def output_array(self) -> np.ndarray:
        """The completion tokens collected so far (not the PLACEHOLDERs of steps in flight), int64, kept
        between steps and extended by the new ones only: the penalties' history costs O(new tokens) a step."""
        n = len(self.token_ids) - self.num_pending - self.num_prompt_tokens
        buf, have = self._outputs, self._num_outputs
        if n > have:
            if buf is None or len(buf) < n:
                grown = np.empty(max(16, 2 * n), dtype=np.int64)
                grown[:have] = buf[:have] if buf is not None else []
                self._outputs = buf = grown
            start = self.num_prompt_tokens
            buf[have:n] = self.token_ids[start + have:start + n]
            self._num_outputs = n
        return buf[:n] if buf is not None else np.zeros(0, np.int64)

    def prompt_distinct(self) -> np.ndarray:
        """The prompt's distinct token ids (int64, sorted), computed once."""
        if self._prompt_distinct is None:
            prompt = (np.frombuffer(self.prompt_bytes, dtype=np.int64) if self.prompt_bytes is not None
                      else np.asarray(self._prompt, dtype=np.int64))
            self._prompt_distinct = np.unique(prompt)
        return self._prompt_distinct

    def append_token(self, token_id: int):
        self.token_ids.append(token_id)

    def reset_for_recompute(self):
        """Preemption: drop the pages; the tokens (prompt + output so far) are prefilled again later."""
        self.status = SequenceStatus.WAITING
        self.release_pages()
        self.num_computed_tokens = 0
        self.num_marked_blocks = 0
        self.chunk_len = 0
        self.last_launched = False
