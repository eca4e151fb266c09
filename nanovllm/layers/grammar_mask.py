"""Structured output, device side: a step's grammar bitmask (engine/scheduled_step.GrammarMask) sets the
logits of disallowed tokens to -inf, before any sampling (so top-k / top-p see only allowed tokens, and
greedy rows pick the best allowed one).

One torch function for every path: full logits (offset 0) and, under tensor parallelism, a rank's
vocabulary slice (offset = the slice's first token id), on CPU and GPU. It unpacks only the grammar rows,
as bytes: the int32 words viewed as little-endian bytes, byte k of word w holds tokens 32w + 8k .. + 7,
so the [g, words * 4, 8] uint8 unpack flattens to token order (1 byte a token: 39 MB for 256 rows of
Qwen3's vocabulary, where an int32 unpack took 4x that). Tested against xgrammar's own
apply_token_bitmask_inplace (tests/test_structured_output.py)."""
import sys

import torch

from nanovllm.utils.transfer import to_device


def apply_grammar_mask(logits: torch.Tensor, rows, bitmask, first: int = 0) -> torch.Tensor:
    """logits [B, W] (column j = token first + j), in place; rows int64 [g] of them are masked by
    bitmask int32 [g, words] (numpy; bit t % 32 of word t // 32 = token t allowed)."""
    assert sys.byteorder == "little"
    dev = logits.device
    rows = to_device(rows, dev)
    packed = to_device(bitmask, dev).view(torch.uint8)  # [g, words * 4]
    shifts = torch.arange(8, dtype=torch.uint8, device=dev)
    allowed = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, first:first + logits.shape[1]]
    logits[rows] = logits[rows].masked_fill(allowed == 0, float("-inf"))
    return logits
