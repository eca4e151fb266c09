"""The fused q/k norm + rotary + KV-write Triton kernel against the same math in float64
(CPU under TRITON_INTERPRET=1, and on CUDA)."""
import pytest
import torch

from triton_script import run_interpreted, run_on_gpu

SCRIPT = r"""
import torch
from nanovllm.layers.qk_norm_rope import qk_norm_rope_store
from nanovllm.layers.rotary_embedding import RotaryEmbedding
device = "{device}"
torch.manual_seed(0)

def reference(qkv, positions, cos_sin, qw, kw, eps, hq, hkv, d, dtype):
    x = qkv.double().view(len(qkv), hq + 2 * hkv, d)
    q, k, v = x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:]
    if qw is not None:  # norm in high precision, rounded to the model dtype (as FlashInfer's kernel)
        norm = lambda t, w: (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w.double()).to(dtype).double()
        q, k = norm(q, qw), norm(k, kw)
    cos, sin = cos_sin[positions].double().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    rot = lambda t: torch.cat([t[..., :d // 2] * cos - t[..., d // 2:] * sin, t[..., d // 2:] * cos + t[..., :d // 2] * sin], -1)
    return rot(q), rot(k), v

for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    # Qwen3 (q/k norm), Qwen2/Llama/Mistral (no norm; GQA 3:1 and 4:1), Qwen3-0.6B's and Llama-3's head shapes
    for hq, hkv, d, norm in ((4, 2, 16, True), (3, 1, 8, False), (8, 2, 16, False), (16, 8, 128, True),
                             (32, 8, 128, False)):
        tokens, pages, page = 9, 7, 4
        wide = torch.randn(tokens, (hq + 2 * hkv) * d + 8, dtype=dtype, device=device)
        qkv = wide[:, :(hq + 2 * hkv) * d]           # strided rows
        positions = torch.randint(0, 60, (tokens,), device=device)
        scaling = None if norm else dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=16)  # Llama 3.1's table
        cos_sin = RotaryEmbedding(d, 64, 500000.0, scaling).cos_sin_half.to(device)
        qw = kw = None
        if norm:
            qw = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
            kw = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
        slots = torch.tensor([0, 5, -1, 27, 3, -1, 10, 11, 12], device=device)
        kc, vc = (torch.zeros(pages, page, hkv, d, dtype=dtype, device=device) for _ in range(2))
        q = qk_norm_rope_store(qkv, positions, cos_sin, qw, kw, 1e-6, hq, hkv, d, slots, kc, vc)
        rq, rk, rv = reference(qkv, positions, cos_sin, qw, kw, 1e-6, hq, hkv, d, dtype)
        assert (q.double() - rq).abs().max() <= tol * max(1.0, rq.abs().max().item()), (dtype, hq, "q")
        valid = slots >= 0
        got_k = kc.view(-1, hkv, d)[slots[valid]].double()
        assert (got_k - rk[valid]).abs().max() <= tol * max(1.0, rk.abs().max().item()), (dtype, hq, "k")
        assert torch.equal(vc.view(-1, hkv, d)[slots[valid]], qkv.view(tokens, -1, d)[valid, hq + hkv:]), (dtype, "v")
        written = torch.zeros(pages * page, dtype=torch.bool, device=device)
        written[slots[valid]] = True
        assert not kc.view(pages * page, -1)[~written].any() and not vc.view(pages * page, -1)[~written].any()
        # No slot mapping (memory warm-up): q only, nothing written.
        q2 = qk_norm_rope_store(qkv, positions, cos_sin, qw, kw, 1e-6, hq, hkv, d, None, None, None)
        assert torch.equal(q, q2)
print("ok")
"""


def test_qk_norm_rope_store_interpreted_on_cpu():
    run_interpreted(SCRIPT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qk_norm_rope_store_on_gpu():
    run_on_gpu(SCRIPT)
