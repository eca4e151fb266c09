"""Structured output, device side: a step's grammar bitmask (engine/scheduled_step.GrammarMask) sets the
logits of disallowed tokens to -inf, before any sampling (so top-k / top-p see only allowed tokens, and
greedy rows pick the best allowed one).

One torch function for every path: full logits (offset 0) and, under tensor parallelism, a rank's
vocabulary slice (offset = the slice's first token id), on CPU and GPU. It unpacks only the grammar rows:
for each column, word col // 32 of the row's bitmask, shifted right by col % 32. Tested against
xgrammar's own apply_token_bitmask_inplace (tests/test_structured_output.py)."""
import torch

from nanovllm.utils.transfer import to_device


def apply_grammar_mask(logits: torch.Tensor, rows, bitmask, first: int = 0) -> torch.Tensor:
    """logits [B, W] (column j = token first + j), in place; rows int64 [g] of them are masked by
    bitmask int32 [g, words] (numpy; bit t % 32 of word t // 32 = token t allowed)."""
    dev = logits.device
    rows = to_device(rows, dev)
    words = to_device(bitmask, dev)
    cols = torch.arange(first, first + logits.shape[1], device=dev)
    allowed = (words[:, cols >> 5] >> (cols & 31).to(torch.int32)) & 1
    logits[rows] = logits[rows].masked_fill(allowed == 0, float("-inf"))
    return logits
