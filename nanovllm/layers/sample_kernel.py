"""Temperature sampling (and greedy rows) in one pass over the logits, on the GPU (Triton).

The Gumbel-max trick: argmax(logits / T + G) with G = -log(-log U), U uniform, picks token i with
probability softmax(logits / T)_i, the same distribution as the exponential race of the PyTorch
sampler. The PyTorch version is six passes over a [batch, vocab] float32 copy of the logits
(~0.45 ms a step at batch 256); this reads the bf16 logits once.

Random numbers come from Philox keyed by a per-row seed (tl.rand): the model runner gives a seeded
request a seed made of its own seed and the index of the token being sampled (seeded_row_seed), so its output does not
depend on the batch it runs in; other rows get fresh seeds every step. Rows with temperature 0 take
the argmax (ties: the lowest token id, as torch.argmax).
Each program reduces one chunk of one row to its best (score, token); torch picks the best chunk.
Under tensor parallelism a rank holds a slice of the vocabulary: `offset` (the slice's first token
id) keys the noise by the global token id, so each rank's winner is the one the full row would pick
from that slice (layers/vocab_parallel_sample.py compares the ranks' winners)."""
import torch
import triton
import triton.language as tl

from nanovllm.layers.sampler import MIN_TEMPERATURE

BLOCK = 4096


@triton.jit
def _sample_chunk_kernel(logits_ptr, logits_stride, temps_ptr, seeds_ptr, vocab, offset, best_ptr, best_idx_ptr,
                         NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr, MIN_TEMP: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    x = tl.load(logits_ptr + row.to(tl.int64) * logits_stride + offs, mask=mask, other=-float("inf")).to(tl.float32)
    temp = tl.load(temps_ptr + row)
    if temp > 0:
        seed = tl.load(seeds_ptr + row)
        u = tl.rand(seed, offs + offset)
        x = x / tl.maximum(temp, MIN_TEMP) - tl.log(-tl.log(u))
    x = tl.where(mask, x, -float("inf"))
    best = tl.max(x, axis=0)
    idx = tl.argmax(x, axis=0)
    tl.store(best_ptr + row * NUM_CHUNKS + chunk, best)
    tl.store(best_idx_ptr + row * NUM_CHUNKS + chunk, chunk * BLOCK + idx)


def sample_gumbel(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  block: int = BLOCK) -> torch.Tensor:
    """logits [B, V] (any float dtype, rows contiguous); temperatures [B] float32 (0 = greedy);
    seeds [B] int64. Returns the sampled token ids [B] (int64)."""
    return gumbel_winners(logits, temperatures, seeds, 0, block)[1]


def gumbel_winners(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, offset: int = 0,
                   block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's winner over logits [B, V] whose column j is token offset + j: (score [B] float32,
    local column [B] int64). The score is logit / T + Gumbel noise (the logit itself for greedy rows)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    chunks = triton.cdiv(vocab, block)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    if rows:
        _sample_chunk_kernel[(rows, chunks)](logits, logits.stride(0), temperatures, seeds, vocab, offset, best,
                                             best_idx, NUM_CHUNKS=chunks, BLOCK=block, MIN_TEMP=MIN_TEMPERATURE)
    score, chunk = best.max(dim=1, keepdim=True)
    return score.squeeze(1), best_idx.gather(1, chunk).squeeze(1).long()
