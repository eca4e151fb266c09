"""The Triton KV-store kernel against the PyTorch one (CPU under TRITON_INTERPRET=1, and on CUDA)."""
import pytest
import torch

from triton_script import run_interpreted, run_on_gpu

SCRIPT = r"""
import torch
from nanovllm.attention.torch_backend import store_kv
from nanovllm.attention.triton_kv import store_kv_triton
device = "{device}"
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    pages, page_size, heads, dim, tokens = 7, 4, 2, 12, 9
    qkv = torch.randn(tokens, (4 + 2 + 2) * dim, dtype=dtype, device=device)
    k = qkv[:, 4 * dim:6 * dim].view(tokens, heads, dim)   # strided rows, as split() gives them
    v = qkv[:, 6 * dim:].view(tokens, heads, dim)
    slots = torch.tensor([0, 5, -1, 27, 3, -1, 10, 11, 12], device=device)
    ref_k, ref_v = (torch.zeros(pages, page_size, heads, dim, dtype=dtype, device=device) for _ in range(2))
    out_k, out_v = ref_k.clone(), ref_v.clone()
    store_kv(k, v, ref_k, ref_v, slots)
    store_kv_triton(k, v, out_k, out_v, slots)
    assert torch.equal(ref_k, out_k) and torch.equal(ref_v, out_v), dtype
print("ok")
"""


def test_store_kv_triton_interpreted_on_cpu():
    run_interpreted(SCRIPT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_store_kv_triton_on_gpu():
    run_on_gpu(SCRIPT)
