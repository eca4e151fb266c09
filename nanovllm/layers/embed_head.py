"""Token embedding and LM head, split over the vocabulary under tensor parallelism.

Each rank holds ceil(vocab / n) rows of the table (the last rank's tail is zero padding). The
embedding looks up the ids in its own rows, zeroes the rest and all-reduces; the LM head computes
logits for its rows and all-gathers them, so every rank holds the full logits and samples alike, or
(gather=False) returns its own slice without padding for the samplers that need no full row
(layers/vocab_parallel_sample.py)."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed.parallel_state import all_gather_last_dim, all_reduce, tp_rank, tp_size
from nanovllm.utils.context import get_context


class VocabEmbedding(nn.Module):

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_size = tp_size()  # fixed at construction: a layer built without a group never joins one
        self.rows = -(-vocab_size // self.tp_size)
        self.first = tp_rank() * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        if loaded.shape != (self.vocab_size, param.shape[1]):
            raise ValueError(f"shape mismatch: parameter {(self.vocab_size, param.shape[1])} vs checkpoint "
                             f"{tuple(loaded.shape)}")
        mine = loaded[self.first:self.first + self.rows]
        param.data[:len(mine)].copy_(mine)
        param.data[len(mine):].zero_()

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.first
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(local.masked_fill(~mine, 0), self.weight)
        return all_reduce(out.masked_fill_(~mine.unsqueeze(-1), 0))


class LMHead(VocabEmbedding):
    """Logits for the last token of each sequence only (prefill computes many, samples one)."""

    def forward(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        ctx = get_context()
        if ctx.logits_indices is not None:
            hidden = hidden[ctx.logits_indices]
        if self.tp_size == 1:
            return F.linear(hidden, self.weight)
        if not gather:  # this rank's tokens first .. first + width - 1, padding rows left out
            width = max(0, min(self.rows, self.vocab_size - self.first))
            return F.linear(hidden, self.weight[:width])
        return all_gather_last_dim(F.linear(hidden, self.weight))[:, :self.vocab_size]
