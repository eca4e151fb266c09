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
  want_logits        bool                      StepResult carries the rows' logits too (tests, and
                                               later logprobs)
  swap_out           int64 [n, 2] | None       (GPU page, host page): write these pages back to the
                                               host tier, before the step's forward
  swap_in            int64 [n, 2] | None       (host page, GPU page): restore these, after swap_out and
                                               before the forward (engine/block_manager.py decides both)
  copy_after_prev    bool                      the copies touch a page the step in flight may still
                                               use: they wait for it (else they may overlap it)
  wait_for_restores  bool                      this step's forward reads pages its swap_in restores
                                               (else only the next step's forward waits for them)

Sampling is a pure function of the logits and `sampling`, so every rank samples the same tokens:
unseeded rows draw from a generator seeded with `step_seed`, seeded requests from their own
per-token seed (`row_seeds`, see layers/sampler.seeded_row_seed), never from a process's RNG state.
"""
from dataclasses import dataclass

import numpy as np

from nanovllm.attention.backend import StepBatch


@dataclass(frozen=True)
class SamplingInputs:
    temperatures: np.ndarray          # float32 [rows]; 0 = greedy
    top_ks: np.ndarray | None         # int64 [rows] (<= 0: off), None when no row uses top-k
    top_ps: np.ndarray | None         # float32 [rows], None when no row uses top-p
    all_greedy: bool                  # every row greedy: argmax only
    step_seed: int                    # seeds the draws of unseeded rows
    row_seeds: np.ndarray | None      # int64 [rows]: per-row seed, -1 for unseeded rows; None if none

    @property
    def fused(self) -> bool:
        """The GPU's one-pass Gumbel sampler applies: temperature only (no top-k / top-p)."""
        return self.top_ks is None and self.top_ps is None and not self.all_greedy


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
    swap_out: np.ndarray | None = None
    swap_in: np.ndarray | None = None
    copy_after_prev: bool = False
    wait_for_restores: bool = False

    def __post_init__(self):
        for name in ("input_ids", "prev_rows", "positions", "slot_mapping", "q_lens", "kv_lens", "qo_indptr",
                     "kv_indptr", "kv_indices", "kv_last_page_len", "swap_out", "swap_in"):
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
    copy_seconds: float = 0.0  # time the step's host-tier copies took on the device (0: none)
