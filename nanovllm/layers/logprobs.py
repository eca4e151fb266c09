"""Logprobs: log_softmax of the model's raw logits in float32, for the rows that asked, on the device.

What is returned is the model's distribution (vLLM's default, `raw_logprobs`): before temperature,
top-k or top-p, whatever the request samples with (the runner takes the log_softmax before sampling,
so no processing of the logits on the sampler's side can show in it). Each asked position gives the logprob of one
target token (the sampled token, or for prompt logprobs the next prompt token) and the top-k
(ids, logprobs) with k the largest any row of the step asked for; the host trims each row to its
own k. Only these small tensors leave the device, copied when the step's tokens are (no extra
wait). Prompt logprobs need a logits row for every prompt position: those are computed `chunk_rows`
at a time, so a 16k-token prompt chunk never holds [16k, vocab] logits at once.

Host form (offline output and the server): per position a dict {token_id: logprob}, the top-k in
descending order, then the target token if it is not among them (the form vLLM returns).
"""
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TokenLogprobs:
    """Target-token logprobs and top-k alternatives of some positions (device tensors, then host)."""
    target: torch.Tensor | np.ndarray      # float32 [n]: logprob of each position's target token
    top_ids: torch.Tensor | np.ndarray     # int64 [n, k]
    top_values: torch.Tensor | np.ndarray  # float32 [n, k], descending

    def copy_to_host(self) -> "TokenLogprobs":
        """Queue the copies to the host (pinned memory on CUDA, not waited for): read them only after
        the step's completion event, like its sampled tokens."""
        return TokenLogprobs(*(t.to("cpu", non_blocking=True) for t in (self.target, self.top_ids, self.top_values)))

    def as_numpy(self) -> "TokenLogprobs":
        return TokenLogprobs(self.target.numpy(), self.top_ids.numpy(), self.top_values.numpy())

    def select(self, rows) -> "TokenLogprobs":
        """Some positions (a list of indices, or a slice)."""
        return TokenLogprobs(self.target[rows], self.top_ids[rows], self.top_values[rows])

    def dicts(self, targets, ks) -> list[dict[int, float]]:
        """Per position, {token_id: logprob}: its own top-k (ks[i]) in descending order, then the
        target token if it is not among them."""
        out = []
        for target, lp, ids, values, k in zip(targets, self.target.tolist(), self.top_ids.tolist(),
                                              self.top_values.tolist(), ks):
            d = dict(zip(ids[:k], values[:k]))
            d.setdefault(target, lp)
            out.append(d)
        return out


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [n, vocab] (any float dtype) -> float32 logprobs, a new tensor: taken before sampling, it
    is the raw model's whatever the sampler then does to its logits."""
    return torch.log_softmax(logits.float(), dim=-1)


def select(logprobs: torch.Tensor, targets: torch.Tensor, k: int) -> TokenLogprobs:
    """From logprobs [n, vocab]: each row's target token (targets [n]) and the top k (may be 0)."""
    target = logprobs.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    top = logprobs.topk(k, dim=-1)
    return TokenLogprobs(target, top.indices, top.values)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> TokenLogprobs:
    """logits [n, vocab] (any float dtype), targets [n] token ids, k top alternatives (may be 0)."""
    return select(log_softmax(logits), targets, k)


def prompt_token_logprobs(hidden: torch.Tensor, compute_logits, targets: torch.Tensor, k: int,
                          chunk_rows: int) -> TokenLogprobs:
    """hidden [n, hidden_size] of the positions whose next token is targets [n]; compute_logits
    turns hidden rows into logits (the LM head: under tensor parallelism every rank calls it the
    same number of times, its all-gather is collective). chunk_rows bounds the logits alive at once."""
    parts = [token_logprobs(compute_logits(hidden[i:i + chunk_rows]), targets[i:i + chunk_rows], k)
             for i in range(0, len(targets), chunk_rows)]
    return TokenLogprobs(torch.cat([p.target for p in parts]), torch.cat([p.top_ids for p in parts]),
                         torch.cat([p.top_values for p in parts]))
