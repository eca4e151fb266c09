"""Logits processing: every change made to a step's logits before a token is drawn from them.

Stages, in order (vLLM's order), each run only when some row of the step asks for it:
  1. token bias (sparse adds): logit_bias, and -inf on the EOS and stop ids of rows that have not yet
     generated min_tokens tokens (so those cannot be sampled). A structured-output bitmask is one
     more mask of this stage.
  2. penalties, over the rows that have one: repetition (HF / vLLM: every token of prompt or output,
     logit / p where the logit is > 0, logit x p otherwise), then frequency (minus f x the token's
     count in the output) and presence (minus p once for every token in the output; OpenAI's).
Greedy rows take the argmax of the processed logits; temperature, min-p, top-k / top-p and the draw
follow in layers/sampler.py.

All operations are sparse, over the (row, token) entries of the rows' histories, so the work is
O(entries) and no [rows, vocab] table is built (a count table is 155 MB of float32 at batch 256 with
Qwen3's 152k vocabulary). A token seen twice gives duplicate entries, which are harmless: repetition
and presence write a value computed from the logit read before the write (the same for every
duplicate), and frequency adds the row's same value once per occurrence (the same sum in any order,
so every tensor-parallel rank gets the same bits). Nothing here reads back to the host.
"""
import numpy as np
import torch

from nanovllm.engine.scheduled_step import Penalties, SamplingInputs
from nanovllm.engine.sequence import PLACEHOLDER
from nanovllm.utils.transfer import to_device


def process_logits(logits: torch.Tensor, s: SamplingInputs, newest: torch.Tensor | None) -> torch.Tensor:
    """A float32 copy of logits [rows, vocab] with s.token_bias and s.penalties applied (the caller's
    logits are left as they are: they are the raw ones that logprobs report). newest [rows]: each
    row's newest token on the device (a decode step's input ids), standing for PLACEHOLDER entries."""
    out = logits.to(torch.float32, copy=True)
    dev = out.device
    if s.token_bias is not None:
        b = s.token_bias
        out.index_put_((to_device(b.rows, dev), to_device(b.token_ids, dev)), to_device(b.values, dev),
                       accumulate=True)
    if s.penalties is not None:
        apply_penalties(out, s.penalties, newest)
    return out


def _entries(indptr: np.ndarray, dev: torch.device) -> torch.Tensor:
    """For flattened lists with offsets indptr [P+1]: the list (0..P-1) each entry belongs to."""
    lengths = to_device(np.diff(indptr), dev)
    return torch.arange(len(indptr) - 1, device=dev).repeat_interleave(lengths, output_size=int(indptr[-1]))


def apply_penalties(logits: torch.Tensor, p: Penalties, newest: torch.Tensor | None):
    """In place on float32 logits [rows, vocab]; see the module docstring."""
    dev = logits.device
    rows = to_device(p.rows, dev)
    out_slot = _entries(p.output_indptr, dev)
    out_rows = rows[out_slot]
    out_ids = to_device(p.output_ids, dev)
    if newest is not None:
        out_ids = torch.where(out_ids == PLACEHOLDER, newest[out_rows], out_ids)
    if p.prompt_ids is not None:
        prompt_slot = _entries(p.prompt_indptr, dev)
        slot = torch.cat([prompt_slot, out_slot])
        at = (rows[slot], torch.cat([to_device(p.prompt_ids, dev), out_ids]))
        penalty = to_device(p.repetition, dev)[slot]
        seen = logits[at]
        logits[at] = torch.where(seen > 0, seen / penalty, seen * penalty)
    at = (out_rows, out_ids)
    if p.presence.any():
        logits[at] = logits[at] - to_device(p.presence, dev)[out_slot]
    if p.frequency.any():
        logits.index_put_(at, -to_device(p.frequency, dev)[out_slot], accumulate=True)
