"""Temperature, min-p, top-k and top-p sampling; temperature 0 is greedy. The logits arrive
processed (layers/logits_processor.py: bias, min_tokens' mask, penalties), so greedy rows take the
argmax of the processed logits.

Filters apply after temperature, in vLLM's order: min-p (keep tokens whose probability is at least
min_p x the top token's: in logits, scaled >= max + log(min_p), no softmax needed), then top-k, then
top-p over what is left. Sampling draws token = argmax(p / E) with E ~ Exponential(1) per token, which picks token i with
probability p_i (the exponential race). Seeded requests draw E from their own generator, so their
output does not depend on what else is in the batch."""
import numpy as np
import torch
from torch import nn

_MASK64 = (1 << 64) - 1
# Temperatures in (0, MIN_TEMPERATURE) sample as MIN_TEMPERATURE (both samplers): logits / 1e-38 overflow
# float32 to inf, and the Gumbel kernel then took the first token with a positive logit, not the best one.
MIN_TEMPERATURE = 1e-5


def seeded_row_seed(seed: int, token_index: int) -> int:
    """A seeded request's Philox seed for its token_index-th sampled token on the GPU sampler (a
    non-negative int63, splitmix64 of the pair): depends on nothing else, so the output does not
    depend on the batch."""
    mask = (1 << 64) - 1
    z = (seed + (token_index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


def step_row_seeds(step_seed: int, num_rows: int) -> np.ndarray:
    """Philox seeds of a step's unseeded rows on the GPU sampler: seeded_row_seed(step_seed, row)
    for every row at once (uint64 arithmetic wraps like the masks above)."""
    with np.errstate(over="ignore"):
        z = np.uint64(step_seed & _MASK64) + (np.arange(num_rows, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return ((z ^ (z >> np.uint64(31))) >> np.uint64(1)).astype(np.int64)


class Sampler(nn.Module):

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor | None = None,
                top_ps: torch.Tensor | None = None, generators: dict | None = None,
                all_greedy: bool = False, seeds: torch.Tensor | None = None,
                generator: torch.Generator | None = None, min_ps: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V]; temperatures [B] (0 = greedy); top_ks [B] int (<= 0 keeps all); top_ps [B];
        min_ps [B] (0 keeps all); generators: row -> torch.Generator for seeded rows; generator: the
        other rows' draws (None: the global RNG). Masks are applied only when given.
        all_greedy (known on the host from the requests): skip the sampling work.
        seeds [B] (GPU, no top-k/top-p): one fused pass instead (layers/sample_kernel.py)."""
        if all_greedy:
            return logits.argmax(dim=-1)
        if seeds is not None:
            from nanovllm.layers.sample_kernel import sample_gumbel
            return sample_gumbel(logits, temperatures, seeds)
        greedy = logits.argmax(dim=-1)
        logits = logits.float()
        scaled = logits / temperatures.clamp(min=MIN_TEMPERATURE).unsqueeze(1)
        if min_ps is not None:
            scaled = self.min_p_filter(scaled, min_ps)
        if top_ks is not None or top_ps is not None:
            scaled = self._restrict(scaled, top_ks, top_ps)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(1, generator=generator)
        for row, gen in (generators or {}).items():
            noise[row].exponential_(1, generator=gen)
        sampled = probs.div_(noise).argmax(dim=-1)
        return torch.where(temperatures == 0, greedy, sampled)

    @staticmethod
    def min_p_filter(scaled: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
        """-inf where p < min_p x max p, p = softmax(scaled): in logits, where scaled < max + log(min_p)
        (min_p 0: log 0 = -inf keeps every token)."""
        floor = scaled.amax(dim=-1, keepdim=True) + min_ps.log().unsqueeze(1)
        return scaled.masked_fill(scaled < floor, float("-inf"))

    @staticmethod
    def _restrict(logits: torch.Tensor, top_ks: torch.Tensor | None, top_ps: torch.Tensor | None) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if top_ks is not None:
            k = torch.where(top_ks <= 0, vocab, top_ks).unsqueeze(1)
            drop |= ranks >= k
        if top_ps is not None:
            probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass before it is < p
            drop |= mass_before >= top_ps.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
