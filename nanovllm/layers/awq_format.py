"""AutoAWQ's int4 "GEMM" checkpoint format: what config.json says, how nibbles are packed, and the
quantize / dequantize math. Owner of the format; the layers are in layers/awq.py, the GPU GEMMs in
layers/awq_gemm.py.

A quantized linear y = x W^T (W: [out, in], in the checkpoint as `<name>.weight`) is stored as
  qweight int32 [in, out/8]      the 4-bit codes q, 8 output columns per int32 word
  qzeros  int32 [in/G, out/8]    the 4-bit zero points z, one per group of G input rows, packed alike
  scales  fp16  [in/G, out]      one scale s per group and output column
  (bias   fp16  [out]            unchanged, when the layer has one)
and W^T[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]. Inside a word, bits 4i..4i+3 (slot i) hold
column 8c + PACK_ORDER[i] of the word's 8 columns: [0, 2, 4, 6, 1, 3, 5, 7], AWQ's interleaving (its
CUDA kernels convert 8 nibbles to halves two at a time); column j sits in slot SLOT_OF_COLUMN[j].
Checked against AutoAWQ's and transformers' own pack/unpack code (read, not copied) and pinned by a
hand-computed test (tests/test_awq.py).

config.json carries {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": G,
"zero_point": true, "version": "gemm", "modules_to_not_convert": [...] or null}}. Anything else (other
methods, bits, the gemv / marlin / exllama layouts, no zero point) is refused with a ValueError when
the engine is created (Config), as is a quantized mixture-of-experts router (check_model).

Mixture-of-experts checkpoints quantize each expert's gate/up/down_proj like any linear; the engine
dequantizes them at load (dequantize_part, a rank's slice only) into its stacked expert tensors in the
model dtype (layers/moe.py): they load and run, but the experts take 16 bits a weight on the GPU, not 4."""
from dataclasses import dataclass

import torch

PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # slot i of a word -> column (within the word's 8)
SLOT_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)  # column j -> its slot (the inverse permutation)
BITS = 4
PACK = 32 // BITS                           # codes per int32 word


@dataclass(frozen=True)
class AWQConfig:
    group_size: int
    modules_to_not_convert: tuple[str, ...] = ()

    def keeps_dense(self, name: str) -> bool:
        """Whether checkpoint module `name` (e.g. "model.layers.0.mlp.gate") stays unquantized: an entry
        of modules_to_not_convert equals a run of its dotted components ("gate" is not "gate_proj")."""
        parts = name.split(".")
        for entry in self.modules_to_not_convert:
            want = entry.split(".")
            if any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1)):
                return True
        return False


def read_quant_config(hf_config) -> AWQConfig | None:
    """The checkpoint's quantization (None: a dense checkpoint); ValueError naming what is unsupported."""
    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return None
    if not isinstance(q, dict):
        q = q.to_dict()
    method = str(q.get("quant_method", "")).lower()
    if method != "awq":
        raise ValueError(f"quantization_config.quant_method {q.get('quant_method')!r} is not supported "
                         f"(awq only)")
    bits = q.get("bits", q.get("w_bit"))
    if bits != BITS:
        raise ValueError(f"AWQ bits={bits!r} is not supported (4 only)")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {q.get('version')!r} is not supported (the gemm layout only; "
                         f"gemv, marlin and exllama store their weights differently)")
    if q.get("zero_point", True) is not True:
        raise ValueError(f"AWQ zero_point={q.get('zero_point')!r} is not supported (zero_point true only)")
    group = q.get("group_size", q.get("q_group_size"))
    if not isinstance(group, int) or group <= 0 or group % 16:
        raise ValueError(f"AWQ group_size={group!r} is not supported (a positive multiple of 16: AutoAWQ "
                         f"writes 32, 64 or 128)")
    return AWQConfig(group, tuple(q.get("modules_to_not_convert") or ()))


def check_model(hf_config, quant: AWQConfig) -> None:
    """What the engine cannot run quantized: a mixture-of-experts router (`model.layers.{i}.mlp.gate` of a
    sparse layer) that modules_to_not_convert does not keep dense. AutoAWQ keeps routers dense (its
    mixture-of-experts checkpoints list "gate"), so no such checkpoint is known and none is tested; a
    router's top-k is also where 4-bit error would change which experts run. The experts themselves
    load: dequantized at load into the stacked expert tensors (layers/moe.py, Experts.expect_awq)."""
    if not (getattr(hf_config, "num_experts", None) or 0) > 0:
        return
    from nanovllm.models.qwen3_moe import is_sparse_layer  # here: models import the layers, not the other way
    for i in range(hf_config.num_hidden_layers):
        router = f"model.layers.{i}.mlp.gate"
        if is_sparse_layer(hf_config, i) and not quant.keeps_dense(router):
            raise ValueError(f"AWQ: the mixture-of-experts router {router} is quantized (modules_to_not_convert "
                             f"{list(quant.modules_to_not_convert)} does not keep it dense); only dense routers are "
                             f"supported (AutoAWQ keeps them dense: modules_to_not_convert [\"gate\"])")


def check_parallel(hf_config, quant: AWQConfig, n: int) -> None:
    """Tensor parallelism splits packed words and groups whole: column-parallel slices (q/k/v heads, the
    MLP width) must be multiples of 8 columns, row-parallel ones (o_proj's and down_proj's inputs)
    multiples of the group size. ValueError naming the first that is not."""
    hd = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    q_cols = hf_config.num_attention_heads * hd // n
    kv_cols = hf_config.num_key_value_heads * hd // n if hf_config.num_key_value_heads % n == 0 else hd
    mlp = hf_config.intermediate_size // n
    for what, cols in (("query columns", q_cols), ("key/value columns", kv_cols), ("MLP columns", mlp)):
        if cols % PACK:
            raise ValueError(f"AWQ with tensor_parallel_size={n}: {cols} {what} per rank is not a multiple of "
                             f"{PACK} (one packed int32 word)")
    G = quant.group_size
    for what, rows in (("hidden_size", hf_config.hidden_size), ("o_proj input rows per rank", q_cols),
                       ("down_proj input rows per rank", mlp)):
        if rows % G:
            raise ValueError(f"AWQ group_size={G}: {what} ({rows}) is not a multiple of it"
                             + (f" (tensor_parallel_size={n})" if n > 1 else ""))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes in 0..15 -> int32 [rows, cols/8] words in AWQ's order."""
    rows, cols = codes.shape
    if cols % PACK:
        raise ValueError(f"{cols} columns is not a multiple of {PACK}")
    c = codes.to(torch.int64).view(rows, cols // PACK, PACK)
    if c.min() < 0 or c.max() > 15:
        raise ValueError("4-bit codes must be in 0..15")
    words = torch.zeros(rows, cols // PACK, dtype=torch.int64)
    for slot, column in enumerate(PACK_ORDER):
        words |= c[:, :, column] << (BITS * slot)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


def unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] words -> int32 [rows, cols] codes in 0..15 (natural column order)."""
    shifts = torch.tensor(SLOT_OF_COLUMN, dtype=torch.int32, device=words.device) * BITS
    return ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(words.shape[0], -1)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """W^T as float32 [in, out] from the packed tensors (exact: small integers times fp16 scales)."""
    q = unpack(qweight)
    z = unpack(qzeros).repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return (q - z).float() * s


def dequantize_part(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                    rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
    """W^T[rows, cols] as float32, `rows` / `cols` given as (first, count) (None: all), unpacking only the
    words and groups that hold them: a tensor-parallel rank's slice of a weight, whatever the slice's
    alignment to words (8 columns) or groups (group_size rows). Equal to dequantize(...)[rows, cols]."""
    in_rows, out_cols = qweight.shape[0], qweight.shape[1] * PACK
    r0, nr = rows if rows is not None else (0, in_rows)
    c0, nc = cols if cols is not None else (0, out_cols)
    if not (0 <= r0 and 0 < nr and r0 + nr <= in_rows and 0 <= c0 and 0 < nc and c0 + nc <= out_cols):
        raise ValueError(f"rows {rows} / columns {cols} outside a [{in_rows}, {out_cols}] AWQ weight")
    g0, g1 = r0 // group_size, -(-(r0 + nr) // group_size)  # the groups holding the rows
    w0, w1 = c0 // PACK, -(-(c0 + nc) // PACK)                # the words holding the columns
    block = dequantize(qweight[g0 * group_size:g1 * group_size, w0:w1], qzeros[g0:g1, w0:w1],
                       scales[g0:g1, w0 * PACK:w1 * PACK], group_size)
    r, c = r0 - g0 * group_size, c0 - w0 * PACK
    return block[r:r + nr, c:c + nc]


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float [out, in] weight -> (codes [in, out], zeros [in/G, out], fp16 scales [in/G, out]) by
    asymmetric min/max quantization of each group of G input rows per output column: s = (max - min) / 15
    (rounded to fp16 first, so the codes are the best for the scale actually stored), z = round(-min / s),
    q = clamp(round(w / s) + z, 0, 15)."""
    out, inp = weight.shape
    if inp % group_size:
        raise ValueError(f"input size {inp} is not a multiple of group_size {group_size}")
    w = weight.detach().double().t().reshape(inp // group_size, group_size, out)
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    scales = ((hi - lo) / 15).clamp(min=1e-5).half()
    s = scales.double()
    zeros = torch.round(-lo / s).clamp(0, 15)
    codes = (torch.round(w / s[:, None]) + zeros[:, None]).clamp(0, 15)
    return codes.reshape(inp, out).int(), zeros.int(), scales
