"""The k-packed W4A16 kernel (layers/awq_kpack.py): the repacking by hand, the kernel under
TRITON_INTERPRET=1 against the float64 matmul of the dequantized AWQ weights (every path: plain and
swapped operands, magic codes, split-K, partial tiles, groups of 16..256 rows, strided x), the split-K
counters zero after every call, refusals; on a GPU the same script in bf16 and CUDA-graph replays."""
import pytest
import torch

from nanovllm.layers.awq_format import pack
from nanovllm.layers.awq_kpack import KpackConfig, kpack, kpack_gemm
from triton_script import check_graph_replays, run_interpreted, run_on_gpu


def test_kpack_layout_by_hand(monkeypatch):
    """Code of input row 128 b + 16 i + r, column n sits in nibble i of word row 16 b + r, column n."""
    K, N, G = 256, 16, 64
    codes = (torch.arange(K)[:, None] * 7 + torch.arange(N)[None, :] * 3) % 16
    zeros = torch.arange(K // G * N).view(K // G, N) % 16
    scales = torch.rand(K // G, N).half()
    words, z = kpack(pack(codes), pack(zeros), scales, G)
    assert words.shape == (K // 8, N) and words.dtype == torch.int32
    assert z.dtype == torch.float16 and torch.equal(z, zeros.half())
    for b, i, r, n in [(0, 0, 0, 0), (0, 7, 15, 15), (1, 3, 5, 9), (1, 7, 0, 2)]:
        word = int(words[16 * b + r, n]) & 0xFFFFFFFF
        assert (word >> (4 * i)) & 0xF == codes[128 * b + 16 * i + r, n]
    # a word whose top nibble is >= 8 is negative as int32: the same bits
    assert (words < 0).any()
    # packed a column chunk at a time: the same words
    from nanovllm.layers import awq_kpack
    monkeypatch.setattr(awq_kpack, "KPACK_CHUNK", 8)
    assert torch.equal(kpack(pack(codes), pack(zeros), scales, G)[0], words)


KPACK_SCRIPT = r"""
import torch
from nanovllm.layers import awq_kpack, split_k
from nanovllm.layers.awq_format import dequantize, pack
from nanovllm.layers.awq_kpack import KpackConfig as C, kpack, kpack_gemm
device = "{device}"
g = torch.Generator().manual_seed(0)
cases = [  # M, K, N, group, config (None: heuristic)
    (1, 256, 64, 128, None),
    (1, 512, 128, 128, C(64, 3)),                    # 4 blocks over 3 splits asked: 2 + 2
    (3, 256, 96, 32, C(32, 2, swap=True)),           # 96 columns: a partial last tile; 4 dots a group
    (3, 384, 48, 16, C(16, 1, magic=True)),          # one dot a group
    (16, 512, 128, 64, C(64, 4, swap=True, magic=True)),
    (17, 256, 64, 128, C(32, 2, block_m=32)),        # 32-row tile, 17 rows
    (40, 512, 80, 256, C(32, 2, block_m=16, swap=True)),   # 3 row tiles; a group spans 2 blocks
    (70, 256, 64, 64, C(64, 1, block_m=64, magic=True)),
    # the zeros subtracted from the codes in x's dtype (TABLE's choice), slice 32 (a 256-row K block)
    (1, 512, 64, 128, C(64, 2, slice=32, magic=True, subz=True)),
    (9, 512, 96, 32, C(32, 1, slice=32, swap=True, magic=True, subz=True)),
    (33, 768, 64, 64, C(64, 3, slice=32, block_m=32, swap=True, subz=True)),
]
dtypes = [(torch.float32, 1e-5), (torch.float16, 1e-3)]
if device == "cuda":  # Triton's interpreter gets bf16 tl.dot wrong on small tiles (tests/test_awq.py)
    dtypes.append((torch.bfloat16, 8e-3))
for dtype, tol in dtypes:
    for M, K, N, G, config in cases:
        codes = torch.randint(0, 16, (K, N), generator=g)
        zeros = torch.randint(0, 16, (K // G, N), generator=g)
        scales = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half().to(device)
        qw, qz = pack(codes).to(device), pack(zeros).to(device)
        slice = config.slice if config else 16
        words, z = kpack(qw, qz, scales, G, slice)
        x = torch.randn(M, K + 3, generator=g)[:, :K].to(dtype).to(device)   # strided rows
        ref = x.double() @ dequantize(qw, qz, scales, G).double()
        for y in (kpack_gemm(x, words, z, scales, G, slice, config), kpack_gemm(x, words, z, scales, G, slice, config)):
            assert y.dtype == dtype and y.shape == (M, N)
            err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
            assert err <= tol, (dtype, M, K, N, G, config, err)
        counters = split_k._COUNTERS.get(x.device)
        assert counters is None or not counters.any()       # every call leaves them zero
        if config is not None:   # the many-rows path: the dequantized weight, then x @ W
            w = awq_kpack.dequantize_kpacked(words, z, scales, G, config.slice, dtype)
            assert torch.equal(w, dequantize(qw, qz, scales, G).to(dtype))   # exactly the reference's rounding
            y = awq_kpack.dequant_matmul(x, words, z, scales, G, config.slice)
            err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
            assert err <= tol, ("dequant", dtype, M, K, N, G, err)
print("ok")
"""


def test_kpack_kernel_interpreted():
    run_interpreted(KPACK_SCRIPT)


@pytest.mark.gpu
def test_kpack_kernel_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    run_on_gpu(KPACK_SCRIPT)


@pytest.mark.gpu
def test_kpack_kernel_cuda_graph_replay():
    """Captured after one eager call, replays give the eager result bit for bit on new inputs (the
    split-K counters are zero again after every replay; the split order is fixed)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from nanovllm.layers.awq_format import dequantize
    K, N, G = 4096, 4096, 128
    g = torch.Generator().manual_seed(0)
    qw = pack(torch.randint(0, 16, (K, N), generator=g)).cuda()
    qz = pack(torch.randint(0, 16, (K // G, N), generator=g)).cuda()
    scales = (torch.rand(K // G, N, generator=g) * 0.002 + 0.0005).half().cuda()
    w = dequantize(qw, qz, scales, G)
    words, z = kpack(qw, qz, scales, G)
    for M, config in [(1, KpackConfig(64, 8, swap=True)), (8, KpackConfig(128, 4, magic=True))]:
        check_graph_replays(lambda x: kpack_gemm(x, words, z, scales, G, 16, config), M, w)


def test_kpack_refusals():
    qw, qz, s = pack(torch.zeros(192, 8, dtype=torch.int64)), pack(torch.zeros(3, 8, dtype=torch.int64)), torch.ones(3, 8).half()
    with pytest.raises(ValueError, match="multiple of 128"):
        kpack(qw, qz, s, 64)                                   # K = 192
    qw = pack(torch.zeros(256, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="group size"):
        kpack(qw, pack(torch.zeros(32, 16, dtype=torch.int64)), torch.ones(32, 16).half(), 8)
    words, z = kpack(qw, pack(torch.zeros(2, 16, dtype=torch.int64)), torch.ones(2, 16).half(), 128)
    with pytest.raises(ValueError, match="columns"):
        kpack_gemm(torch.zeros(1, 128), words, z, torch.ones(2, 16).half(), 128, 16)
    with pytest.raises(ValueError, match="power of two"):
        kpack_gemm(torch.zeros(1, 256), words, z, torch.ones(2, 16).half(), 128, 16, KpackConfig(24, 1))
    with pytest.raises(ValueError, match="packed with slice 16"):
        kpack_gemm(torch.zeros(1, 256), words, z, torch.ones(2, 16).half(), 128, 16, KpackConfig(64, 1, slice=32))


def test_config_choice():
    """TABLE serves its shapes (bucket 16 for 2..8 rows) at the layer's slice; the heuristic otherwise
    covers M with tiles of at most 64 rows and splits K until two programs per SM."""
    from nanovllm.layers.awq_kpack import TABLE, config_for
    for M in (1, 3, 8, 16):
        assert config_for(M, 24576, 4096, 32, 132) is TABLE[(1 if M == 1 else 16, 24576, 4096)]
    assert config_for(3, 24576, 4096, 16, 132).slice == 16    # TABLE's slice-32 configs do not read it
    for M, N, K, slice in [(1, 2048, 4096, 32), (32, 6144, 4096, 32), (256, 4096, 12288, 16), (4096, 512, 256, 16)]:
        c = config_for(M, N, K, slice, 132)
        tiles = -(-M // c.block_m) * -(-N // c.block_n)
        assert c.slice == slice and c.block_m == min(64, 1 << max(4, (M - 1).bit_length()))
        assert tiles * c.splits >= 2 * 132 or K // (8 * slice) < 4 * c.splits


LAYER_SCRIPT = r"""
import torch
from nanovllm.layers.awq import AWQLinear
from nanovllm.layers.awq_format import dequantize, pack
g = torch.Generator().manual_seed(1)
for K, N, G, slice in [(256, 64, 32, 32), (384, 48, 128, 16)]:   # 384 rows: only slice 16 packs them
    layer = AWQLinear(K, 0, K, {{None: (0, N, 0, N)}}, None, 1, G, False, "layer")
    layer.qweight.data = pack(torch.randint(0, 16, (K, N), generator=g))
    layer.qzeros.data = pack(torch.randint(0, 16, (K // G, N), generator=g))
    layer.scales.data = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half()
    w = dequantize(layer.qweight, layer.qzeros, layer.scales, G).double()
    layer.prepare_kpack()
    assert layer.qweight is None and layer.qzeros is None and layer._kpack[2] == slice
    for M in (1, 5, 40, 70):   # 70 >= DEQUANT_MIN_M (65): dequantized into the scratch buffer, then a matmul
        x = torch.randn(2, M, K, generator=g)
        ref = x.double() @ w
        y = layer(x)
        assert y.shape == (2, M, N)
        assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), (K, M)
print("ok")
"""


def test_awq_layer_kpack_path_interpreted():
    """AWQLinear after prepare_kpack (what prepare_kernels does on CUDA): the AWQ words are dropped and
    forward runs the k-packed kernel with config_for's choice, equal to the dequantized matmul."""
    run_interpreted(LAYER_SCRIPT)


HOPPER_SHARED_BYTES = 227 * 1024   # an H100/H200 program's shared memory limit


def test_kpack_table_configs_compile_for_hopper():
    """Every distinct TABLE config, as AWQLinear launches it (bf16, group 128, its M bucket), compiles for
    sm_90 on the CPU (Triton's ptxas) within an SM's shared memory, with tensor-core dots and, split, the
    counter atomics: a config that cannot launch shows here, not on the GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanovllm.layers.awq_kpack import MAGIC_BITS, TABLE, _kpack_kernel
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "z_ptr": "*fp16", "s_ptr": "*fp16", "y_ptr": "*bf16",
           "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
           "stride_ym": "i32", "blocks_per_split": "i32", "splits": "i32"}
    magic, base = MAGIC_BITS[torch.bfloat16]
    for config in set(TABLE.values()):
        consts = dict(GROUP=128, SLICE=config.slice, BLOCK_M=config.block_m, BLOCK_N=config.block_n, SWAP=config.swap,
                      GROUP_SLICES=128 // config.slice, SUBZ=config.subz, SPLIT=config.splits > 1, IEEE=False,
                      MAGIC=magic if config.magic else 0, BASE=base if config.magic else 0.0)
        kernel = triton.compile(ASTSource(_kpack_kernel, {**sig, **{k: "constexpr" for k in consts}}, consts),
                                target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=config.warps, num_stages=config.stages))
        assert kernel.metadata.shared <= HOPPER_SHARED_BYTES, (config, kernel.metadata.shared)
        ptx = kernel.asm["ptx"]
        assert "mma" in ptx, config
        assert ("atom" in ptx) == (config.splits > 1), config
