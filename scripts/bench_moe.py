#!/usr/bin/env python3
"""One Qwen3-30B-A3B MoE layer's experts on one GPU: the grouped GEMM path against the per-expert loop.

    python scripts/bench_moe.py --out $OUT/moe.json        # no FlashInfer needed

Shapes: 128 experts, top 8, hidden 2048, expert width 768 (one rank) and 384 (a rank of TP=2), bf16,
random weights (std 0.02) and router logits (std 1). For each token count it checks, then times
(CUDA events, median of --runs):
  loop      expert_mlp_loop (one linear pair per expert with rows; a host read of the row counts)
  grouped   expert_mlp_grouped (torch._grouped_mm twice, device offsets)
  graph     the grouped path captured once in a CUDA graph and replayed (how decode runs it)
Check: both paths and the graph replay against the loop computed in float32 from the same bf16
weights (max abs error printed; the output's scale is printed beside it). Prints a markdown table
and writes the rows as JSON to --out."""
import argparse
import json
import statistics

import torch

from nanovllm.layers.moe import expert_mlp_grouped, expert_mlp_loop, fused_experts, route


def timed(fn, runs: int) -> float:
    """Median milliseconds of fn() over runs (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 4096])
    p.add_argument("--widths", type=int, nargs="+", default=[768, 384])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    E, k, H = 128, 8, 2048
    print(torch.__version__, torch.cuda.get_device_name())
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for width in args.widths:
        gate_up = (torch.randn(E, 2 * width, H, device=dev, generator=g) * 0.02).to(dtype)
        down = (torch.randn(E, H, width, device=dev, generator=g) * 0.02).to(dtype)
        for T in args.tokens:
            x = torch.randn(T, H, device=dev, generator=g).to(dtype)
            weights, ids = route(torch.randn(T, E, device=dev, generator=g).to(dtype), k, True)
            ref = fused_experts(x.float(), weights.float(), ids, gate_up.float(), down.float(), expert_mlp_loop)
            row = dict(width=width, tokens=T, experts_hit=int(ids.unique().numel()), out_abs_mean=ref.abs().mean().item())
            paths = {"loop": lambda: fused_experts(x, weights, ids, gate_up, down, expert_mlp_loop),
                     "grouped": lambda: fused_experts(x, weights, ids, gate_up, down, expert_mlp_grouped)}
            for name, fn in paths.items():
                try:
                    row[f"{name}_err"] = (fn().float() - ref).abs().max().item()
                    row[f"{name}_ms"] = timed(fn, args.runs)
                except Exception as e:  # noqa: BLE001 (report, go on with the other paths)
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
            try:
                static_out = None
                graph = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    paths["grouped"]()  # warm-up outside capture
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    static_out = paths["grouped"]()
                graph.replay()
                row["graph_err"] = (static_out.float() - ref).abs().max().item()
                row["graph_ms"] = timed(graph.replay, args.runs)
            except Exception as e:  # noqa: BLE001
                row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(row, flush=True)
    cols = ["width", "tokens", "experts_hit", "loop_ms", "grouped_ms", "graph_ms", "loop_err", "grouped_err",
            "graph_err", "out_abs_mean"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols) + " |")
    for r in rows:
        for key in ("loop_error", "grouped_error", "graph_error"):
            if key in r:
                print(r["width"], r["tokens"], key, r[key])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
