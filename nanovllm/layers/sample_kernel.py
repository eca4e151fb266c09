"""Temperature sampling (and greedy rows) in one pass over the logits, on the GPU (Triton).

The Gumbel-max trick: argmax(logits / T + G) with G = -log(-log U), U uniform, picks token i with
probability softmax(logits / T)_i, the same distribution as the exponential race of the PyTorch
sampler. The PyTorch version is six passes over a [batch, vocab] float32 copy of the logits
(~0.45 ms a step at batch 256); this reads the bf16 logits once.

Random numbers come from Philox keyed by a per-row seed: one rand4x call gives the noise of four
consecutive token ids (the Philox rounds, integer multiplies, were the kernel's cost when each token had
its own call: 247 us a step at 256 x 151,936 on an H200, 6x its bytes). The model runner gives a seeded
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
def _lane_best(row_ptr, g, offset, vocab, scale, noise):
    """Best (score, local column) of the logits of global token ids g (their column is g - offset)."""
    col = g - offset
    mask = (col >= 0) & (col < vocab)
    x = tl.load(row_ptr + col, mask=mask, other=-float("inf")).to(tl.float32) * scale + noise
    x = tl.where(mask, x, -float("inf"))
    return tl.max(x, axis=0), tl.argmax(x, axis=0) * 4


@triton.jit
def _sample_chunk_kernel(logits_ptr, logits_stride, temps_ptr, seeds_ptr, vocab, offset, best_ptr, best_idx_ptr,
                         NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr, MIN_TEMP: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    # The chunk's BLOCK global ids start at a multiple of 4: lane j holds ids base + 4 i + j, and one Philox
    # call (rand4x at counter id // 4) gives the four lanes' noise, so a token's noise depends on (seed, id)
    # only, whatever the chunking or the vocabulary slice (tensor parallelism).
    base = (offset // 4) * 4 + chunk * BLOCK
    quad = base // 4 + tl.arange(0, BLOCK // 4)
    g = quad * 4
    row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
    temp = tl.load(temps_ptr + row)
    if temp > 0:
        seed = tl.load(seeds_ptr + row)
        u0, u1, u2, u3 = tl.rand4x(seed, quad)
        scale = 1.0 / tl.maximum(temp, MIN_TEMP)
        b0, i0 = _lane_best(row_ptr, g, offset, vocab, scale, -tl.log(-tl.log(u0)))
        b1, i1 = _lane_best(row_ptr, g + 1, offset, vocab, scale, -tl.log(-tl.log(u1)))
        b2, i2 = _lane_best(row_ptr, g + 2, offset, vocab, scale, -tl.log(-tl.log(u2)))
        b3, i3 = _lane_best(row_ptr, g + 3, offset, vocab, scale, -tl.log(-tl.log(u3)))
    else:
        b0, i0 = _lane_best(row_ptr, g, offset, vocab, 1.0, 0.0)
        b1, i1 = _lane_best(row_ptr, g + 1, offset, vocab, 1.0, 0.0)
        b2, i2 = _lane_best(row_ptr, g + 2, offset, vocab, 1.0, 0.0)
        b3, i3 = _lane_best(row_ptr, g + 3, offset, vocab, 1.0, 0.0)
    best = tl.maximum(tl.maximum(b0, b1), tl.maximum(b2, b3))
    first = base - offset  # local column of lane 0's first id
    big = 1 << 30           # ties: the lowest id among the lanes holding the best score
    idx = tl.minimum(tl.minimum(tl.where(b0 == best, i0, big), tl.where(b1 == best, i1 + 1, big)),
                     tl.minimum(tl.where(b2 == best, i2 + 2, big), tl.where(b3 == best, i3 + 3, big)))
    idx = tl.where(idx == big, i0, idx)  # NaN scores match nothing
    tl.store(best_ptr + row * NUM_CHUNKS + chunk, best)
    # A chunk of only -inf (or NaN) scores names its first column, which lies before the slice when it
    # starts past a multiple of 4: clamped into [0, vocab) (such a chunk never beats one with a score).
    tl.store(best_idx_ptr + row * NUM_CHUNKS + chunk, tl.minimum(tl.maximum(first + idx, 0), vocab - 1))


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
    assert block >= 8 and block & (block - 1) == 0, "block: a power of two >= 8 (four lanes of block / 4)"
    assert offset >= 0, "offset: the slice's first token id"
    chunks = triton.cdiv(vocab + offset % 4, block)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    if rows:
        _sample_chunk_kernel[(rows, chunks)](logits, logits.stride(0), temperatures, seeds, vocab, offset, best,
                                             best_idx, NUM_CHUNKS=chunks, BLOCK=block, MIN_TEMP=MIN_TEMPERATURE)
    score, chunk = best.max(dim=1, keepdim=True)
    return score.squeeze(1), best_idx.gather(1, chunk).squeeze(1).long()
