"""The HBM floor of a benchmark workload: the least time one GPU could take, from bytes and FLOPs alone.

    python scripts/roofline.py --preset qwen3-0.6b --workload w5                 # cascade on (default)
    python scripts/roofline.py --preset qwen3-0.6b --workload w2 --no-cascade    # each request reads its prefix
    python scripts/roofline.py --model PATH --workload w1 --bench bench_results.jsonl   # + measured fraction
    python scripts/roofline.py --preset qwen3-8b --workload w2 --bandwidth-tb-s 3.35 --gemm-tflops 990  # other GPU

Model of the engine (nanovllm/benchmark.py's prompts, lengths and engine config, page size 16):
- Prefill is compute-bound: each request's uncached prompt tokens (pages an earlier request already
  computed come from the prefix cache, the prompt's last token is always computed) cost 2 x matmul
  parameters FLOPs a token at --gemm-tflops, plus one lm_head row, plus causal attention
  (4 x heads x head_dim x layers FLOPs per query-key pair) at --attention-tflops.
- Then every request decodes output_len - 1 steps (prefill gave the first token). A decode step reads
  the weights once (the embedding table only as the lm_head) and each running request's KV once; with
  cascade, KV pages shared by running requests (page-aligned common prefixes) are read once per step.
  A step costs max(bytes / bandwidth, matmul FLOPs / GEMM rate).
- Assumption: requests run concurrently as the engine admits them, in workload order, up to
  max_num_seqs and while their whole KV (prompt + output, shared pages once) fits in
  --hbm-gb x --memory-utilization less the weights; a finished request's slot goes to the next.
  Every workload W1-W5 fits on one H200 this way (W6, whose cache is capped below its prefixes, is
  not modelled). Prefill and decode do not overlap here (the engine runs them in separate steps).

Checked against the project's workloads.md (one H200: 4.3 TB/s, ~700 TFLOP/s GEMM, ~450 attention),
random Qwen3-0.6B, bf16: W5 13.4 GB a decode step (weights 1.19, documents 7.52, own tokens 4.70),
~1.6 s of decode + ~0.4 s of prefill = ~2.0 s; W1 ~3.5 s of decode (tests/test_roofline.py).
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovllm import benchmark  # noqa: E402


def model_shape(model: str | None = None, preset: str | None = None) -> dict:
    """config.json's fields of a checkpoint folder, or of a make_model preset."""
    if model is not None:
        with open(os.path.join(model, "config.json")) as f:
            return json.load(f)
    from nanovllm.tools.make_model import build_config
    return build_config(preset, None, {})[0].to_dict()


def shape_costs(cfg: dict, bytes_per_value: int = 2, kv_bytes_per_value: int | None = None) -> dict:
    """Bytes and FLOPs per token of a decoder config: weights read by a decode step, matmul parameters
    (FLOPs per token = 2x), KV bytes per token (kv_bytes_per_value: 1 for an fp8 cache; default the
    weights'), attention FLOPs per query-key pair."""
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    attn = h * heads * hd + 2 * h * kv_heads * hd + heads * hd * h
    if cfg.get("attention_bias") or cfg.get("model_type") == "qwen2":
        attn += heads * hd + 2 * kv_heads * hd
    norms = 2 * h + (2 * hd if cfg.get("model_type", "").startswith("qwen3") else 0)
    dense_mlp = 3 * h * cfg["intermediate_size"]
    mlp_read, mlp_active = [], []
    for i in range(layers):
        experts = cfg.get("num_experts") or 0
        if experts and i not in (cfg.get("mlp_only_layers") or []):
            one = 3 * h * cfg["moe_intermediate_size"]
            mlp_read.append(experts * one + h * experts)  # a large batch touches every expert
            mlp_active.append(cfg["num_experts_per_tok"] * one + h * experts)
        else:
            mlp_read.append(dense_mlp)
            mlp_active.append(dense_mlp)
    lm_head = h * vocab
    weights = layers * (attn + norms) + sum(mlp_read) + h + lm_head  # + final norm; tied or not, lm_head read once
    return dict(weight_bytes=weights * bytes_per_value,
                matmul_params=layers * attn + sum(mlp_active),  # per token, without the lm_head
                lm_head_params=lm_head,
                kv_bytes_per_token=2 * layers * kv_heads * hd * (kv_bytes_per_value or bytes_per_value),
                attn_flops_per_pair=4 * heads * hd * layers,
                embedding_params=vocab * h * (1 if cfg.get("tie_word_embeddings") else 2))


def page_keys(prompt: list[int], page: int) -> list[tuple]:
    """One key per full page standing for the prefix up to that page's end (chained, as the engine's page hashes)."""
    keys, h = [], None
    for i in range(len(prompt) // page):
        h = hash((h, tuple(prompt[i * page:(i + 1) * page])))
        keys.append(h)
    return keys


def floor(costs: dict, requests: list[tuple[list[int], int]], max_num_seqs: int, cascade: bool = True,
          bandwidth: float = 4.3e12, gemm: float = 700e12, attention: float = 450e12, kv_budget: float = math.inf,
          page: int = 16) -> dict:
    """The floor of running `requests` ((prompt tokens, output tokens) in admission order) as described
    in the module docstring; seconds, bytes and FLOPs."""
    kvb = costs["kv_bytes_per_token"]
    keys = [page_keys(p, page) for p, _ in requests]
    counts = {}
    for ks in keys:
        for k in ks:
            counts[k] = counts.get(k, 0) + 1
    # Shared = pages another request also holds (these are stored once and, with cascade, read once).
    shared = [sum(1 for k in ks if counts[k] > 1) * page for ks in keys]
    # Prefill: pages computed before by an earlier request are served from the prefix cache.
    seen, prefill_tokens, cached_tokens, gemm_flops, attn_flops = set(), 0, 0, 0.0, 0.0
    for (prompt, _), ks in zip(requests, keys):
        hit = 0
        while hit < len(ks) and ks[hit] in seen:
            hit += 1
        seen.update(ks)
        c = min(hit * page, (len(prompt) - 1) // page * page)
        n = len(prompt) - c
        prefill_tokens += n
        cached_tokens += c
        gemm_flops += 2 * (costs["matmul_params"] * n + costs["lm_head_params"])
        attn_flops += costs["attn_flops_per_pair"] * (n * c + n * (n + 1) / 2)
    prefill_s = gemm_flops / gemm + attn_flops / attention

    # Decode, step by step; the running set changes only when a request finishes.
    waiting = list(range(len(requests)))[::-1]
    running: dict[int, int] = {}   # request -> decode steps done
    steps, decode_s, total_bytes, weight_bytes, shared_bytes, own_bytes = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    held: dict = {}   # shared page -> running requests holding it
    own_tokens = 0    # unshared KV tokens of the running requests at their completion

    def fits(i):
        new = sum(1 for k in keys[i][:shared[i] // page] if k not in held)
        grow = new * page + len(requests[i][0]) - shared[i] + requests[i][1]
        return (len(held) * page + own_tokens + grow) * kvb <= kv_budget

    while waiting or running:
        while waiting and len(running) < max_num_seqs and (not running or fits(waiting[-1])):
            i = waiting.pop()
            if requests[i][1] > 1:
                running[i] = 0
                for k in keys[i][:shared[i] // page]:
                    held[k] = held.get(k, 0) + 1
                own_tokens += len(requests[i][0]) - shared[i] + requests[i][1]
        if not running:
            continue
        # Steps until the next request finishes: the set's bytes grow linearly, so sum them in closed form.
        n = min(requests[i][1] - 1 - done for i, done in running.items())
        if cascade:
            prefix = len(held) * page
            base = [len(requests[i][0]) - shared[i] + done for i, done in running.items()]
        else:
            prefix = 0
            base = [len(requests[i][0]) + done for i, done in running.items()]
        r = len(running)
        # Step s (1..n) reads for each request its context so far plus the token being decoded.
        own = (sum(base) * n + r * n * (n + 1) / 2) * kvb
        w = costs["weight_bytes"] * n
        pre = prefix * kvb * n
        step_flops = 2 * (costs["matmul_params"] + costs["lm_head_params"]) * r
        decode_s += max((w + pre + own) / bandwidth, n * step_flops / gemm)
        weight_bytes += w
        shared_bytes += pre
        own_bytes += own
        total_bytes += w + pre + own
        steps += n
        for i in list(running):
            running[i] += n
            if running[i] >= requests[i][1] - 1:
                del running[i]
                for k in keys[i][:shared[i] // page]:
                    held[k] -= 1
                    if not held[k]:
                        del held[k]
                own_tokens -= len(requests[i][0]) - shared[i] + requests[i][1]
    output_tokens = sum(o for _, o in requests)
    seconds = prefill_s + decode_s
    return dict(seconds=seconds, output_tok_s=output_tokens / seconds, prefill_s=prefill_s, decode_s=decode_s,
                decode_steps=steps, bytes_per_decode_step=total_bytes / max(steps, 1),
                weight_bytes_per_step=weight_bytes / max(steps, 1), shared_kv_bytes_per_step=shared_bytes / max(steps, 1),
                own_kv_bytes_per_step=own_bytes / max(steps, 1), output_tokens=output_tokens,
                prefill_tokens=prefill_tokens, cached_prompt_tokens=cached_tokens,
                prefill_gemm_flops=gemm_flops, prefill_attention_flops=attn_flops)


def workload_floor(workload: str, cfg: dict, cascade: bool = True, bytes_per_value: int = 2,
                   bandwidth_tb_s: float = 4.3, gemm_tflops: float = 700, attention_tflops: float = 450,
                   hbm_gb: float = 141, memory_utilization: float = 0.9, max_num_seqs: int | None = None,
                   page: int = 16, kv_bytes_per_value: int | None = None) -> dict:
    """bench.py's `workload` (one generate call) on the model `cfg`: see floor()."""
    make, engine = benchmark.WORKLOADS[workload]
    made = make(min(10000, cfg["vocab_size"] - 1))
    if not isinstance(made, tuple):
        raise ValueError(f"{workload} runs several generate calls; the floor models one")
    prompts, params = made
    costs = shape_costs(cfg, bytes_per_value, kv_bytes_per_value)
    kv_budget = hbm_gb * 1e9 * memory_utilization - costs["weight_bytes"]
    seqs = max_num_seqs or engine.get("max_num_seqs", 512)
    result = floor(costs, [(p, s.max_tokens) for p, s in zip(prompts, params)], seqs, cascade,
                   bandwidth_tb_s * 1e12, gemm_tflops * 1e12, attention_tflops * 1e12, kv_budget, page)
    return dict(workload=workload, cascade=cascade, **result, weight_bytes=costs["weight_bytes"],
                kv_bytes_per_token=costs["kv_bytes_per_token"])


def read_bench(arg: str) -> list[dict]:
    """bench.py --json lines: a file of them, or one line given inline."""
    text = open(arg).read() if os.path.exists(arg) else arg
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (its config.json)")
    p.add_argument("--preset", default="qwen3-0.6b", help="make_model preset, when no --model")
    p.add_argument("--workload", default="w5", choices=sorted(k for k in benchmark.WORKLOADS if k != "w6"))
    p.add_argument("--no-cascade", action="store_true", help="each request reads its whole KV every step")
    p.add_argument("--bandwidth-tb-s", type=float, default=4.3, help="HBM bandwidth (H200: ~4.3)")
    p.add_argument("--gemm-tflops", type=float, default=700, help="dense bf16 GEMM rate (H200: ~700)")
    p.add_argument("--attention-tflops", type=float, default=450, help="prefill attention rate (H200: ~450)")
    p.add_argument("--hbm-gb", type=float, default=141)
    p.add_argument("--memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, help="default: the workload's engine config (else 512)")
    p.add_argument("--bytes-per-value", type=int, default=2, help="weights and KV (bf16: 2)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3", "fp8"], default="auto",
                   help="fp8_e4m3: one byte a KV value (bench.py --kv-cache-dtype); auto: --bytes-per-value")
    p.add_argument("--bench", help="bench.py --json file or line: print measured seconds / floor seconds")
    args = p.parse_args(argv)
    fp8 = args.kv_cache_dtype != "auto"
    cfg = model_shape(args.model, args.preset)
    r = workload_floor(args.workload, cfg, not args.no_cascade, args.bytes_per_value, args.bandwidth_tb_s,
                       args.gemm_tflops, args.attention_tflops, args.hbm_gb, args.memory_utilization,
                       args.max_num_seqs, kv_bytes_per_value=1 if fp8 else None)
    kv = ", fp8 KV" if fp8 else ""
    print(f"{args.workload} ({args.model or args.preset}, cascade {'on' if r['cascade'] else 'off'}{kv}): floor "
          f"{r['seconds']:.2f} s = prefill {r['prefill_s']:.2f} + decode {r['decode_s']:.2f}; "
          f"{r['output_tok_s']:,.0f} output tok/s")
    print(f"  per decode step {r['bytes_per_decode_step'] / 1e9:.2f} GB (weights {r['weight_bytes_per_step'] / 1e9:.2f}, "
          f"shared KV {r['shared_kv_bytes_per_step'] / 1e9:.2f}, own KV {r['own_kv_bytes_per_step'] / 1e9:.2f}), "
          f"{r['decode_steps']} steps; prefill {r['prefill_tokens']:,} tokens ({r['cached_prompt_tokens']:,} cached)")
    if args.bench:
        for m in read_bench(args.bench):
            if (m.get("workload") == args.workload and bool(m.get("cascade")) == r["cascade"]
                    and (m.get("kv_cache_dtype", "auto") != "auto") == fp8):
                r.setdefault("measured", []).append(m)
                print(f"  measured {m['seconds']:.2f} s, {m['output_tok_s']:,.0f} tok/s ({m.get('gpu', '?')}): "
                      f"{r['seconds'] / m['seconds']:.1%} of the floor's speed")
    print(json.dumps({k: v for k, v in r.items() if k != "measured"}))
    return r


if __name__ == "__main__":
    main()
