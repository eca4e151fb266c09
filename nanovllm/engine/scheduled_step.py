"""The step boundary: one `ScheduledStep` goes down to the runner(s), one `StepResult` comes back up.

The scheduler side (scheduler + cascade policy, assembled by engine/step_builder.py) decides
everything about a step and writes it here: the rows in their final order, every token's id,
position and KV slot, the page tables, the cascade plan and the sampling inputs. The runner only
executes it: it never reorders, never reads a Sequence, and nothing writes into a step once it is
built (its arrays are made read-only). Under tensor parallelism rank 0 ships the same object to
every worker (distributed/step_channel.py), so each rank runs exactly the same step.

Data contract (all host numpy arrays; `rows` = sequences in the step, `tokens` = query tokens):
  seq_ids            tuple[int]      [rows]    which request each row is (for the engine side)
  input_ids          int64           [tokens]  PLACEHOLDER (-1) where the token was sampled by the
                                               previous step and is still on the device
  prev_rows          int64 | None    [tokens]  for PLACEHOLDER tokens, the row of the previous step
                                               (the last one launched on this runner) that sampled
                                               it; -1 elsewhere. None when no token is a placeholder
  positions          int64           [tokens]
  slot_mapping       int64           [tokens]  page * page_size + offset of each token's K/V
  q_lens, kv_lens    int32           [rows]    this step's tokens; all tokens incl. this step's
  qo_indptr          int32           [rows+1]
  kv_indptr          int32           [rows+1]  row b's pages are kv_indices[kv_indptr[b]:kv_indptr[b+1]]
  kv_indices         int32           [pages]
  kv_last_page_len   int32           [rows]
  cascade            CascadePlan | None        the shared-prefix levels (cascade/planner.py contract)
  sampling           SamplingInputs            per row, see below
  want_logits        bool                      StepResult carries the rows' logits too (tests)
  logprobs_k         int32 | None    [rows]    k of each row's sampled-token logprobs (top-k
                                               alternatives), -1 where not asked; None if no row asks
  prompt_logprobs_tokens  int64 | None  [m]    query tokens whose next prompt token's logprob is
                                               asked (prompt_logprobs), in row order; None if none
  prompt_logprobs_targets int64 | None  [m]    that next prompt token
  prompt_logprobs_k  int                       top-k computed for them (the largest asked this step)
  grammar            GrammarMask | None        structured output: allowed tokens of the rows with a
                                               grammar (engine/grammar.py), applied before sampling
  swap_out           int64 [n, 2] | None       (GPU page, host page): write these pages back to the
                                               host tier, before the step's forward
  swap_in            int64 [n, 2] | None       (host page, GPU page): restore these, after swap_out and
                                               before the forward (engine/block_manager.py decides both)
  copy_after_prev    bool                      the copies touch a page the step in flight may still
                                               use: they wait for it (else they may overlap it)
  wait_for_restores  bool                      this step's forward reads pages its swap_in restores
                                               (else only the next step's forward waits for them)
  write_ahead        int64 [n, 2] | None       (GPU page, host page): free pages written back ahead of
                                               their eviction, after swap_in; this step's forward
                                               does not wait for them
  copy_batch         int                       this step's copies are copy batch `copy_batch` (its
                                               scheduling clock): write-backs in order, then
                                               restores (on a second stream if asked: host_tier.py)
  copy_waits         (int, int, int, int)      (wait_in, wait_out, out_after_in, in_after_out), -1:
                                               none: its forward waits for the restores of the
                                               batches up to wait_in and the write-backs up to
                                               wait_out (earlier steps' copies of pages it reads or
                                               writes, not known to have landed: StepResult.
                                               copies_done); its write-backs wait for the restores
                                               up to out_after_in, its restores for the write-backs
                                               up to in_after_out (engine/block_manager.StepCopies)
  wait_own_write_backs bool                    the forward waits for this step's swap_out (False only
                                               with copy feedback when it writes none of those pages)

Sampling is a pure function of the logits and `sampling`, so every rank samples the same tokens:
unseeded rows draw from a generator seeded with `step_seed`, seeded requests from their own
per-token seed (`row_seeds`, see layers/sampler.seeded_row_seed), never from a process's RNG state.
The logits controls (`token_bias`, `penalties`, `min_ps`) are None unless a row of the step uses
them, and then cover only such rows: a step without them builds and runs nothing for them.
"""
from dataclasses import dataclass

import numpy as np

from nanovllm.attention.backend import StepBatch


@dataclass(frozen=True)
class TokenBias:
    """Sparse additions to the logits: logits[rows[k], token_ids[k]] += values[k]. Entries come from
    logit_bias, and -inf on the EOS and stop ids of rows still below their min_tokens."""
    rows: np.ndarray                  # int64 [entries] row of the step
    token_ids: np.ndarray             # int64 [entries]
    values: np.ndarray                # float32 [entries]


@dataclass(frozen=True)
class Penalties:
    """Repetition / frequency / presence penalties of the rows that have any (layers/logits_processor.py).
    Row p's generated tokens are output_ids[output_indptr[p]:output_indptr[p+1]], one entry per
    occurrence (frequency counts them); a PLACEHOLDER there is the row's newest token, this step's
    input, still on the device (decode steps only). prompt_ids: row p's distinct prompt ids, only
    when some row has a repetition penalty (it covers prompt and output)."""
    rows: np.ndarray                  # int64 [P] rows of the step
    repetition: np.ndarray            # float32 [P] (1 = off)
    frequency: np.ndarray             # float32 [P] (0 = off)
    presence: np.ndarray              # float32 [P] (0 = off)
    output_ids: np.ndarray            # int64 [sum of output lengths]
    output_indptr: np.ndarray         # int64 [P+1]
    prompt_ids: np.ndarray | None     # int64 [sum of distinct prompt lengths]
    prompt_indptr: np.ndarray | None  # int64 [P+1]


@dataclass(frozen=True)
class SamplingInputs:
    temperatures: np.ndarray          # float32 [rows]; 0 = greedy
    top_ks: np.ndarray | None         # int64 [rows] (<= 0: off), None when no row uses top-k
    top_ps: np.ndarray | None         # float32 [rows], None when no row uses top-p
    all_greedy: bool                  # every row greedy: argmax only
    step_seed: int                    # seeds the draws of unseeded rows
    row_seeds: np.ndarray | None      # int64 [rows]: per-row seed, -1 for unseeded rows; None if none
    min_ps: np.ndarray | None = None  # float32 [rows] (0: off), None when no row uses min-p
    token_bias: TokenBias | None = None   # logit_bias and min_tokens' mask; None when no row has either
    penalties: Penalties | None = None    # None when no row has a penalty

    @property
    def fused(self) -> bool:
        """The GPU's one-pass Gumbel sampler applies: temperature only (no top-k / top-p / min-p)."""
        return self.top_ks is None and self.top_ps is None and self.min_ps is None and not self.all_greedy

    @property
    def processes_logits(self) -> bool:
        """The logits are changed before sampling (layers/logits_processor.py)."""
        return self.token_bias is not None or self.penalties is not None


@dataclass(frozen=True)
class GrammarMask:
    """The allowed tokens of a step's grammar rows: bit t % 32 of bitmask[j, t // 32] set = token t may
    be sampled in row rows[j] (xgrammar's packing; words cover the model's whole vocabulary)."""
    rows: np.ndarray      # int64 [g], rows of the step, ascending
    bitmask: np.ndarray   # int32 [g, ceil(vocab / 32)]

    def __post_init__(self):
        self.rows.flags.writeable = False
        self.bitmask.flags.writeable = False


@dataclass(frozen=True)
class ScheduledStep:
    step_id: int
    is_prefill: bool
    seq_ids: tuple
    input_ids: np.ndarray
    prev_rows: np.ndarray | None
    positions: np.ndarray
    slot_mapping: np.ndarray
    q_lens: np.ndarray
    kv_lens: np.ndarray
    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_last_page_len: np.ndarray
    page_size: int
    cascade: object
    sampling: SamplingInputs
    want_logits: bool = False
    logprobs_k: np.ndarray | None = None
    prompt_logprobs_tokens: np.ndarray | None = None
    prompt_logprobs_targets: np.ndarray | None = None
    prompt_logprobs_k: int = 0
    grammar: GrammarMask | None = None

    swap_out: np.ndarray | None = None
    swap_in: np.ndarray | None = None
    copy_after_prev: bool = False
    wait_for_restores: bool = False
    write_ahead: np.ndarray | None = None
    copy_batch: int = -1
    copy_waits: tuple = (-1, -1, -1, -1)
    wait_own_write_backs: bool = True

    def __post_init__(self):
        for name in ("input_ids", "prev_rows", "positions", "slot_mapping", "q_lens", "kv_lens", "qo_indptr",
                     "kv_indptr", "kv_indices", "kv_last_page_len", "logprobs_k", "prompt_logprobs_tokens",
                     "prompt_logprobs_targets", "swap_out", "swap_in", "write_ahead"):
            array = getattr(self, name)
            if array is not None:
                array.flags.writeable = False

    @property
    def num_rows(self) -> int:
        return len(self.seq_ids)

    def attention_batch(self, slot_mapping_device) -> StepBatch:
        """The attention backends' view of this step (attention/backend.py)."""
        return StepBatch(self.is_prefill, self.q_lens, self.kv_lens, self.qo_indptr, self.kv_indptr, self.kv_indices,
                         self.kv_last_page_len, slot_mapping_device, self.page_size, self.cascade)


@dataclass(frozen=True)
class StepResult:
    step_id: int
    token_ids: list   # one sampled token per row, in the step's row order
    logits: object = None  # float32 [rows, vocab] on the host, when the step asked for them
    logprobs: object = None         # TokenLogprobs (layers/logprobs.py) of the rows with logprobs_k >= 0
    prompt_logprobs: object = None  # TokenLogprobs of prompt_logprobs_tokens, in the same order
    step_times: tuple = ()  # host tier on: StepTimes (engine/host_tier.py) of the steps whose times are read now
    copies_done: tuple | None = None   # host tier on CUDA: (in, out) the last batch whose restores / write-backs
                                       # are all complete (None: copies are synchronous)
