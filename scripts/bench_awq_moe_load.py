#!/usr/bin/env python3
"""What loading an AWQ Qwen3-30B-A3B costs for its experts: one MoE layer's 128 experts x 3 projections
(hidden 2048, expert width 768, group 128) arrive as AWQ qweight / qzeros / scales on the host, as the
loader reads them, and go through Experts.weight_loader, which dequantizes each on --device into the
stacked bf16 tensors (layers/moe.py). Prints the milliseconds for the layer (median of --runs), the 48
layers' extrapolated seconds, and the GiB the experts take held dequantized vs as int4 words.

    python scripts/bench_awq_moe_load.py                 # CUDA when there is one
    python scripts/bench_awq_moe_load.py --device cpu    # the CPU number (slow: minutes per layer set)

Check: every expert of the layer equals awq_format.dequantize of its tensors, computed on the host in
float32 and rounded to bf16 (exact: small integers times fp16 scales are exact in float32)."""
import argparse
import statistics
import time

import torch

from nanovllm.distributed.parallel_state import outside_group
from nanovllm.layers.awq_format import PACK, dequantize, pack
from nanovllm.layers.moe import AWQ_PARTS, EXPERT_PROJECTIONS, Experts

E, H, I, G, LAYERS = 128, 2048, 768, 128, 48


def random_awq(inp: int, out: int, g: torch.Generator) -> dict:
    return {"qweight": pack(torch.randint(0, 16, (inp, out), generator=g)),
            "qzeros": pack(torch.randint(0, 16, (inp // G, out), generator=g)),
            "scales": (torch.rand(inp // G, out, generator=g) * 0.002 + 0.0005).half()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    dev = torch.device(args.device)
    print(torch.__version__, torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")
    g = torch.Generator().manual_seed(0)
    # one distinct tensor set per projection kind, shared by the experts (host memory: ~5 MB, not 1.2 GB)
    tensors = {proj: random_awq(I, H, g) if proj == "down_proj" else random_awq(H, I, g) for proj in EXPERT_PROJECTIONS}
    with outside_group(), torch.device(dev):
        experts = Experts(E, H, I).to(torch.bfloat16)
    experts.expect_awq(G, {(e, proj) for e in range(E) for proj in EXPERT_PROJECTIONS})

    def load_layer():
        for e in range(E):
            for proj in EXPERT_PROJECTIONS:
                param = experts.down_proj if proj == "down_proj" else experts.gate_up_proj
                for part in AWQ_PARTS:
                    experts.weight_loader(param, tensors[proj][part], (e, proj, part))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    load_layer()  # warm-up
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        load_layer()
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    want = {proj: dequantize(**tensors[proj], group_size=G).t().to(torch.bfloat16)
            for proj in EXPERT_PROJECTIONS}
    got_gate, got_up = experts.gate_up_proj.data[:, :I].cpu(), experts.gate_up_proj.data[:, I:].cpu()
    ok = (all(torch.equal(got_gate[e], want["gate_proj"]) and torch.equal(got_up[e], want["up_proj"])
              for e in range(E))
          and all(torch.equal(experts.down_proj.data[e].cpu(), want["down_proj"]) for e in range(E)))
    weights = E * 3 * H * I
    bf16_gib = weights * 2 / 2**30
    int4_gib = (weights / 2 + E * 3 * (H * I // G) * (2 + 0.5)) / 2**30  # codes + fp16 scales + 4-bit zeros
    print(f"check: experts equal host dequantize -> bf16: {ok}")
    print(f"| device | one layer (ms, median of {args.runs}) | x{LAYERS} layers (s) | experts bf16 GiB (48 layers) "
          f"| as int4 GiB |")
    print(f"| {args.device} | {ms:.1f} | {ms * LAYERS / 1e3:.2f} | {bf16_gib * LAYERS:.1f} | {int4_gib * LAYERS:.1f} |")
    assert ok and PACK == 8


if __name__ == "__main__":
    main()
