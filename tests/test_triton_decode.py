"""The Triton paged decode kernel (attention/triton_decode.py) against float64 attention over the
dequantized pages: fp8 and float32 caches, one split and several (small batches), scattered pages,
requests of 1 token to several pages, the fixed-buffer (CUDA graph) plan with padded rows, GQA 1-4.
CPU under TRITON_INTERPRET=1; the same script on CUDA, where graph replays are checked too."""
import pytest
import torch

from triton_script import run_interpreted, run_on_gpu

SCRIPT = r"""
import numpy as np
import torch
from nanovllm.attention.kv_quant import quantize_fp8, dequantize
from nanovllm.attention.triton_decode import TritonPagedDecode, choose_splits
device = torch.device("{device}")
g = torch.Generator().manual_seed(0)
PAGE, D = 16, 32 if device.type == "cpu" else 128


def reference(q, kc, vc, lens, pages, k_scale, v_scale, sm_scale, with_lse=False):
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    hq, hkv = q.shape[1], kc.shape[2]
    for b, (n, pg) in enumerate(zip(lens, pages)):
        if n == 0:
            continue
        k = kc[pg].reshape(-1, hkv, D)[:n].double() * k_scale
        v = vc[pg].reshape(-1, hkv, D)[:n].double() * v_scale
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,thd->ht", q[b].double(), k) * sm_scale
        out[b] = torch.einsum("ht,thd->hd", torch.softmax(s, dim=-1), v)
        lse[b] = torch.logsumexp(s, dim=-1) / np.log(2)   # base 2, FlashInfer's convention
    return (out, lse) if with_lse else out


def case(lens, hq, hkv, cache_dtype, q_dtype, k_scale=1.0, v_scale=1.0, pad_to=None, block_t=None, convert="cast"):
    num_pages = sum(-(-n // PAGE) for n in lens) + 3
    perm = torch.randperm(num_pages, generator=g)   # scattered pages
    pages, i = [], 0
    for n in lens:
        c = -(-n // PAGE)
        pages.append(perm[i:i + c].tolist()); i += c
    k = torch.randn(num_pages, PAGE, hkv, D, generator=g) * 2
    v = torch.randn(num_pages, PAGE, hkv, D, generator=g)
    if cache_dtype == torch.float8_e4m3fn:
        kc, vc = quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
        kd, vd = dequantize(kc, 1.0), dequantize(vc, 1.0)
    else:
        kc, vc = k.to(cache_dtype), v.to(cache_dtype)
        kd, vd = kc.float(), vc.float()
        k_scale = v_scale = 1.0
    q = torch.randn(len(lens), hq, D, generator=g).to(q_dtype)
    indptr = np.cumsum([0] + [len(p) for p in pages]).astype(np.int32)
    indices = np.array(sum(pages, []), dtype=np.int32)
    last = np.array([(n - 1) % PAGE + 1 for n in lens], dtype=np.int32)
    ref, ref_lse = reference(q.float(), kd, vd, lens, pages, k_scale, v_scale, D ** -0.5, with_lse=True)
    kc, vc, qd = kc.to(device), vc.to(device), q.to(device)
    if pad_to is None:
        dec = TritonPagedDecode(hq, hkv, D, PAGE, device, convert=convert,
                                **({{}} if block_t is None else dict(block_t=block_t)))
        dec.plan(indptr, indices, last)
        out = dec.run(qd, (kc, vc), k_scale, v_scale)
        # Into given buffers, with the base-2 LSE (a cascade's per-request level merges through it); the plan
        # arrays may also be tensors already on the device.
        dec.plan(*(torch.from_numpy(a).to(device) for a in (indptr, indices, last)))
        out_buf = torch.full((len(lens) + 2, hq, D), 7.0, dtype=q_dtype, device=device)
        lse_buf = torch.full((len(lens) + 2, hq), 7.0, device=device)
        got, got_lse = dec.run(qd, (kc, vc), k_scale, v_scale, out=out_buf, lse=lse_buf, return_lse=True)
        assert got is out_buf and got_lse is lse_buf and torch.equal(out_buf[:len(lens)], out)
        assert (out_buf[len(lens):] == 7).all() and (lse_buf[len(lens):] == 7).all()
        got_lse = lse_buf[:len(lens)].double().cpu()
        empty = torch.isinf(ref_lse)   # requests of no tokens: -inf, as FlashInfer's
        assert torch.equal(torch.isinf(got_lse), empty) and (got_lse[empty] < 0).all()
        lse_err = (got_lse[~empty] - ref_lse[~empty]).abs().max().item()
        assert lse_err < (1e-4 if q_dtype == torch.float32 else 2e-2), ("lse", lens, hq, hkv, q_dtype, lse_err)
    else:  # fixed buffers of pad_to rows; padded rows read one token of page 0 (as the engine pads)
        pad = pad_to - len(lens)
        bufs = (torch.zeros(pad_to + 1, dtype=torch.int32, device=device),
                torch.zeros(len(indices) + pad + 8, dtype=torch.int32, device=device),
                torch.zeros(pad_to, dtype=torch.int32, device=device))
        dec = TritonPagedDecode(hq, hkv, D, PAGE, device, buffers=bufs)
        dec.plan(np.concatenate([indptr, indptr[-1] + np.arange(1, pad + 1)]), np.concatenate([indices, np.zeros(pad)]),
                 np.concatenate([last, np.ones(pad)]))
        qd = torch.cat([qd, torch.zeros(pad, hq, D, dtype=q_dtype, device=device)])
        out = dec.run(qd, (kc, vc), k_scale, v_scale)[:len(lens)]
        if device.type == "cuda":  # a graph of the run replays for new page lists and queries
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                gout = dec.run(qd, (kc, vc), k_scale, v_scale)
            q2 = torch.randn(len(lens), hq, D, generator=g).to(q_dtype)
            qd[:len(lens)] = q2.to(device)
            lens2 = [max(1, n - 5) for n in lens]
            last2 = np.array([(n - 1) % PAGE + 1 for n in lens2], dtype=np.int32)
            pages2 = [p[:-(-n // PAGE)] for p, n in zip(pages, lens2)]
            indptr2 = np.cumsum([0] + [len(p) for p in pages2]).astype(np.int32)
            dec.plan(np.concatenate([indptr2, indptr2[-1] + np.arange(1, pad + 1)]),
                     np.concatenate([np.array(sum(pages2, []), dtype=np.int32), np.zeros(pad)]),
                     np.concatenate([last2, np.ones(pad)]))
            graph.replay()
            ref2 = reference(q2.float(), kd, vd, lens2, pages2, k_scale, v_scale, D ** -0.5)
            err2 = (gout[:len(lens)].double().cpu() - ref2).abs().max().item()
            assert err2 < tol(q_dtype, cache_dtype), ("graph replay", err2)
    err = (out.double().cpu() - ref).abs().max().item()
    assert out.dtype == q_dtype and out.shape == q.shape
    assert err < tol(q_dtype, cache_dtype), (lens, hq, hkv, cache_dtype, q_dtype, err)
    return err


def tol(q_dtype, cache_dtype):
    if q_dtype == torch.float32:
        return 1e-4
    return 2e-2   # half-precision queries, probabilities and output


fp8 = torch.float8_e4m3fn
lens = [1, 15, 16, 17, 100, 333]
q_dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
assert choose_splits(6, 2) > 1 and choose_splits(256, 8) == 1
for q_dtype in q_dtypes:
    for cache_dtype in ([fp8] if q_dtype == torch.float32 else [fp8, q_dtype]):
        for hq, hkv in ((4, 4), (4, 2), (8, 2)):
            case(lens, hq, hkv, cache_dtype, q_dtype, k_scale=0.5, v_scale=2.0)
        case(lens, 4, 2, cache_dtype, q_dtype, pad_to=8)
# Several tiles a split (the online softmax's rescaling), a request of no tokens, empty splits.
for q_dtype in q_dtypes:
    for cache_dtype in ([fp8] if q_dtype == torch.float32 else [fp8, q_dtype]):
        case([100, 0, 37, 250], 4, 2, cache_dtype, q_dtype, k_scale=0.5, v_scale=2.0, block_t=16)
case([int(x) for x in np.random.default_rng(1).integers(0, 200, 300)], 2, 1, fp8, torch.float16, block_t=16)
# fp8 values through integer ops on int16 pairs (convert="bits"): the same answers.
for lens_, bt in (([1, 15, 16, 17, 100, 333], None), ([100, 0, 37, 250], 16)):
    case(lens_, 4, 2, fp8, torch.float16, k_scale=0.5, v_scale=2.0, block_t=bt, convert="bits")
# Many rows, one split: the same answers.
case([int(x) for x in np.random.default_rng(0).integers(1, 80, 300)], 2, 1, fp8, torch.float16)
print("ok")
"""


def test_triton_decode_interpreted_on_cpu():
    run_interpreted(SCRIPT, timeout=900)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_decode_on_gpu():
    run_on_gpu(SCRIPT)


FP8_PAIRS = r"""
import torch, triton, triton.language as tl
from nanovllm.attention.triton_decode import _fp8_pairs_to_f16

@triton.jit
def k(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    y = tl.reshape(_fp8_pairs_to_f16(tl.load(x_ptr + i)), (2 * N,))
    tl.store(y_ptr + tl.arange(0, 2 * N), y)

words = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)   # every pair of bytes
y = torch.empty(2 * 65536, dtype=torch.float16)
k[(1,)](words, y, N=65536)
want = words.view(torch.float8_e4m3fn).float() / 256   # little-endian: the low byte first
nan = torch.isnan(want)   # e4m3's NaN bytes (0x7f, 0xff): never stored (values are clamped to +-448)
assert nan.sum() == 2 * 2 * 256 and torch.equal(y.float()[~nan], want[~nan]), (y.float()[~nan] - want[~nan]).abs().max()
print("ok")
"""


def test_fp8_pairs_convert_exactly_every_byte_pair():
    run_interpreted(FP8_PAIRS)


def test_supported_shapes_and_the_refusal():
    """Shapes the kernel serves; decode_attention_kernel=auto falls back to FlashInfer for the others
    (attention/flashinfer_backend.py), and naming the kernel for one is a clear error."""
    from nanovllm.attention.triton_decode import ROWS, TritonPagedDecode, supports
    assert supports(16, 8, 128, 16) is None and supports(64, 8, 128, 16) is None and supports(8, 8, 64, 32) is None
    assert "query heads" in supports(8 * (ROWS + 1), 8, 128, 16)
    assert "powers of two" in supports(16, 8, 96, 16) and "powers of two" in supports(16, 8, 128, 24)
    with pytest.raises(ValueError, match="Triton decode: .* query heads"):
        TritonPagedDecode(8 * (ROWS + 1), 8, 128, 16, torch.device("cpu"))
