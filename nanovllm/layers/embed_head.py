import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.context import get_context


class VocabEmbedding(nn.Module):

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


class LMHead(VocabEmbedding):
    """Logits for the last token of each sequence only (prefill computes many, samples one)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        if ctx.logits_indices is not None:
            hidden = hidden[ctx.logits_indices]
        return F.linear(hidden, self.weight)
