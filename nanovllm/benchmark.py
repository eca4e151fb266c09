"""Benchmarks W1-W6 (see ../shared/docs/workloads.md in the project notes and claude_docs/performance.md).

    python bench.py --preset qwen3-0.6b                      # W1: throughput, random-weight Qwen3-0.6B
    python bench.py --workload w2 --enable-cascade-attention # many shared system prompts
    python bench.py --model PATH --workload w3               # one shared system prompt, a real checkpoint
    python bench.py --preset qwen3-8b --tensor-parallel-size 2 # 8B shapes on two GPUs (dummy weights)
    python bench.py --workload w1-json                       # W1 with a JSON schema on every request
    python bench.py --workload w1-json-half                  # ... on every other request (mixed batches)
    python bench.py --workload w5 --enable-cascade-attention # 4 long documents (16,384 tokens) x 32 requests
    python bench.py --workload w5-one-doc --enable-cascade-attention  # one such document x 128 requests
    python bench.py --workload w6 --host-kv-cache-gb 64      # many tenants beyond a 16,384-page GPU cache
    python bench.py --workload w6                            # the same, GPU-only (evicted prefixes recomputed)
    python bench.py --workload w1 --kv-cache-dtype fp8_e4m3  # fp8 KV pages (twice the pages; claude_docs/memory.md)

The w1-json workloads measure structured output's cost (claude_docs/serving.md): W1's prompts and
lengths, each constrained request's schema an object holding one array of strings (random weights
rarely close it, so most requests still run to max_tokens like W1's); compare with w1 on the same GPU.

W5 needs max_model_len 16,384 + 64 + 512 = 16,960 and holds 128 requests; its floor on one H200
(scripts/roofline.py) is ~2.0 s, ~33,000 output tok/s.

W6 runs 4 `generate` rounds; its GPU cache is capped at 16,384 pages (--num-gpu-blocks to change).

Each run prints output tokens, seconds and tok/s, and appends one JSON line to --json.
"""
import argparse
import json
import os
import random
import tempfile
import time

from nanovllm import LLM, SamplingParams, StructuredOutput
from nanovllm.attention.kv_quant import KV_CACHE_DTYPES
from nanovllm.cascade.cost_model import SHARED_BACKEND_CHOICES
from nanovllm.distributed import parallel_state


def all_reduce_in_use() -> str:
    """What carries rank 0's all-reduces: "auto" (trtllm up to 4 MB, vllm up to 8 MB), one custom kernel's
    name, "nccl" (tensor parallel without a custom all-reduce), or "-" (one GPU: none)."""
    grp = parallel_state.group()
    if grp is None:
        return "-"
    return "nccl" if grp.custom_ar is None else grp.custom_ar.backend


def w1(top: int = 10000):
    random.seed(0)
    prompts = [[random.randint(0, top) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, 1024)) for _ in range(256)]
    return prompts, params


JSON_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
               "required": ["items"]}


def w1_json(top: int = 10000, every: int = 1):
    """W1, with every `every`-th request constrained to JSON_SCHEMA."""
    prompts, params = w1(top)
    grammar = StructuredOutput(json=JSON_SCHEMA)
    for i in range(0, len(params), every):
        params[i] = SamplingParams(temperature=params[i].temperature, ignore_eos=True, max_tokens=params[i].max_tokens,
                                   structured_output=grammar)
    return prompts, params


def shared_prompts(groups: int, per_group: int, system_len: int, question_len: int, output_len: int, seed: int = 0,
                   top: int = 10000):
    """SGLang's generated-shared-prefix workload: random-token system prompts, one per group."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(groups):
        system = [rng.randint(0, top) for _ in range(system_len)]
        prompts += [system + [rng.randint(0, top) for _ in range(question_len)] for _ in range(per_group)]
    rng.shuffle(prompts)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=output_len)] * len(prompts)
    return prompts, params


def w5(top: int = 10000, documents: int = 4, per_document: int = 32, document_len: int = 16384,
       question_len: int = 64, output_len: int = 512):
    """Long shared documents: 4 documents of 16,384 random tokens, 32 requests each (128), each with its
    own 64-token question and 512 greedy output tokens, shuffled with a fixed seed."""
    return shared_prompts(documents, per_document, document_len, question_len, output_len, seed=0, top=top)


def w6(top: int = 10000, rounds: int = 4, tenants: int = 128, system_len: int = 4096, per_round: int = 4,
       question_len: int = 64, output_len: int = 128):
    """Many tenants: 128 system prompts of 4,096 tokens, 4 rounds of 4 requests per prompt (512 a round,
    shuffled), each with its own 64-token question and 128 greedy output tokens."""
    rng = random.Random(0)
    systems = [[rng.randint(0, top) for _ in range(system_len)] for _ in range(tenants)]
    out = []
    for _ in range(rounds):
        prompts = [s + [rng.randint(0, top) for _ in range(question_len)] for s in systems for _ in range(per_round)]
        rng.shuffle(prompts)
        out.append((prompts, [SamplingParams(temperature=0, ignore_eos=True, max_tokens=output_len)] * len(prompts)))
    return out


WORKLOADS = {
    "w1": (w1, {}),
    "w2": (lambda top: shared_prompts(64, 16, 2048, 128, 256, top=top), dict(max_num_seqs=1024, max_model_len=2560)),
    "w3": (lambda top: shared_prompts(1, 1024, 8192, 128, 256, top=top), dict(max_num_seqs=1024, max_model_len=8704)),
    "w4": (w1, dict(enable_cascade_attention=True)),
    "w1-json": (w1_json, {}),
    "w1-json-half": (lambda top: w1_json(top, every=2), {}),
    "w5": (w5, dict(max_num_seqs=128, max_model_len=16384 + 64 + 512)),
    # W5 with one document read by all 128 requests (the shared level's rows in one group: fa3 cut into pieces)
    "w5-one-doc": (lambda top: w5(top, documents=1, per_document=128), dict(max_num_seqs=128,
                                                                           max_model_len=16384 + 64 + 512)),
    "w6": (w6, dict(num_kvcache_blocks=16384, max_model_len=4352)),
}


def run(args) -> dict:
    model = args.model
    load_format = args.load_format
    if model is None:
        from nanovllm.tools.make_model import BIG_PRESETS, make_model
        # Real shapes (BIG_PRESETS: qwen3-8b, llama-3.1-8b, ...): config and tokenizer only, random weights on the device.
        big = load_format == "dummy" or args.preset in BIG_PRESETS
        model = os.path.join(tempfile.gettempdir(), f"nanovllm-{args.preset}" + ("-config" if big else ""))
        if not os.path.exists(os.path.join(model, "config.json")):
            make_model(args.preset, model, seed=0, weights=not big)
        load_format = "dummy" if big else load_format
    make, defaults = WORKLOADS[args.workload]
    cfg = dict(defaults)
    cfg.update(enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
               load_format=load_format or "auto", disable_custom_all_reduce=args.disable_custom_all_reduce)
    if args.enable_cascade_attention:
        cfg["enable_cascade_attention"] = True
    if args.num_gpu_blocks is not None:
        cfg["num_kvcache_blocks"] = args.num_gpu_blocks
    for key in ("max_num_seqs", "max_num_batched_tokens", "kvcache_block_size", "gpu_memory_utilization", "max_model_len",
                "cascade_shared_backend", "host_kvcache_gb", "schedule_policy", "kv_cache_dtype", "host_kv_prefetch",
                "host_kv_write_ahead", "decode_attention_kernel"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    t0 = time.perf_counter()
    llm = LLM(model, **cfg)
    try:
        return measure(args, llm, cfg, time.perf_counter() - t0, make)
    finally:
        llm.close()


def measure(args, llm, cfg, startup, make) -> dict:
    # Token ids up to 10,000 as the workloads define them, or the vocabulary's last id if smaller.
    rounds = make(min(10000, llm.vocab_size - 1))
    if isinstance(rounds, tuple):
        rounds = [rounds]   # one generate call
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    before = dict(llm.stats)
    kv0 = llm.kv_usage()
    state0 = llm.kv_state(max_pages=0)
    preemptions0 = llm.scheduler.num_preemptions
    outs, round_seconds = [], []
    for prompts, params in rounds:
        t = time.perf_counter()
        outs += llm.generate(prompts, params, use_tqdm=False)
        round_seconds.append(round(time.perf_counter() - t, 3))
    seconds = sum(round_seconds)
    output_tokens = sum(len(o["token_ids"]) for o in outs)
    stats = {k: llm.stats[k] - before[k] for k in ("steps", "prefill_steps", "decode_steps", "cascade_steps",
                                                   "prefill_seconds", "decode_seconds", "copy_seconds", "copy_steps",
                                                   "copy_stall_seconds", "forward_seconds", "prefill_tokens",
                                                   "restore_pays_changes")}
    kv = llm.kv_usage()
    state = llm.kv_state(max_pages=0)
    prompt_tokens = sum(len(p) for prompts, _ in rounds for p in prompts)
    cached = kv["cache_hit_tokens"] - kv0["cache_hit_tokens"]
    result = dict(
        workload=args.workload, model=args.model or args.preset, tp=args.tensor_parallel_size,
        custom_all_reduce=not args.disable_custom_all_reduce,
        custom_all_reduce_backend=all_reduce_in_use(),
        cascade=bool(cfg.get("enable_cascade_attention")),
        cascade_shared_backend=cfg.get("cascade_shared_backend", "auto"),
        kv_cache_dtype=cfg.get("kv_cache_dtype", "auto"),
        decode_attention_kernel=cfg.get("decode_attention_kernel", "auto"),
        enforce_eager=args.enforce_eager, requests=len(outs), output_tokens=output_tokens,
        finished_stop=sum(o["finish_reason"] == "stop" for o in outs),
        seconds=round(seconds, 3), output_tok_s=round(output_tokens / seconds, 1),
        # Prefilled = computed in prefill steps: prompts less cache hits, plus what preempted
        # requests compute again (their hits count again at re-admission, so prompt - cached is no measure).
        prompt_tokens=prompt_tokens, cached_prompt_tokens=cached, recomputed_prompt_tokens=stats["prefill_tokens"],
        decode_share=round(stats["decode_seconds"] / seconds, 3), startup_s=round(startup, 1),
        kv_blocks=kv["blocks_total"], leaked_blocks=kv["blocks_used"], **stats)
    if len(rounds) > 1:
        result["round_seconds"] = round_seconds
    result["schedule_policy"] = state["scheduler"]["policy"]
    result["preemptions"] = llm.scheduler.num_preemptions - preemptions0
    if kv["host_blocks_total"]:
        bm = llm.scheduler.block_manager
        result.update(pages_prefetched=bm.num_prefetched, pages_written_ahead=bm.num_written_ahead)
        moved = {d: kv[f"bytes_{d}"] - kv0[f"bytes_{d}"] for d in ("to_host", "from_host")}
        result.update(host_blocks=kv["host_blocks_total"],
                      host_hit_tokens=kv["host_hit_tokens"] - kv0["host_hit_tokens"],
                      gb_to_host=round(moved["to_host"] / 1e9, 2), gb_from_host=round(moved["from_host"] / 1e9, 2),
                      host_pages_dropped=state["copies"]["host_pages_dropped"] - state0["copies"]["host_pages_dropped"],
                      copy_gb_s=round(sum(moved.values()) / 1e9 / stats["copy_seconds"], 1) if stats["copy_seconds"] else None)
        # What the swap-or-recompute rule saw at the end (engine/copy_costs.py): restore vs marginal prefill a page.
        result.update({f"cost_{k}": v for k, v in llm.copy_costs.summary().items() if k != "copy_stall_s"})
    if llm.model_runner.device.type == "cuda":
        import torch
        total = torch.cuda.get_device_properties(0).total_memory
        result["peak_gpu_mem_frac"] = round(torch.cuda.max_memory_reserved() / total, 3)  # rank 0's GPU
        result["gpu"] = torch.cuda.get_device_name(0)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: random weights of --preset)")
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--workload", default="w1", choices=sorted(WORKLOADS))
    p.add_argument("--enable-cascade-attention", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kvcache-block-size", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--cascade-shared-backend", choices=SHARED_BACKEND_CHOICES)
    p.add_argument("--num-gpu-blocks", type=int, help="cap the GPU KV cache at this many pages (W6: 16384)")
    p.add_argument("--host-kv-cache-gb", dest="host_kvcache_gb", type=float,
                   help="host-memory KV tier per rank, GB (default 0: off)")
    p.add_argument("--schedule-policy", choices=["fcfs", "lpm", "dfs-weight", "random"])
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES),
                   help="auto: the model dtype; fp8_e4m3 (fp8): 1-byte KV pages, twice as many (default auto)")
    p.add_argument("--decode-attention-kernel", choices=["auto", "flashinfer", "triton", "xqa"],
                   help="regular decode's kernel: auto (xqa, else triton, for an fp8 cache), flashinfer, triton or xqa")
    p.add_argument("--host-kv-prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="restore waiting requests' host pages before admission (default on)")
    p.add_argument("--host-kv-write-ahead", action=argparse.BooleanOptionalAction, default=None,
                   help="write free GPU pages back to host before eviction needs them (default on)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--disable-custom-all-reduce", action="store_true", help="NCCL for every all-reduce")
    p.add_argument("--load-format", choices=["auto", "dummy"], default=None,
                   help="dummy: random weights from config.json (the default for presets too big to write)")
    p.add_argument("--json", default="bench_results.jsonl", help="append the result as one JSON line here")
    args = p.parse_args(argv)
    result = run(args)
    print(f"{args.workload}: {result['output_tokens']} output tokens in {result['seconds']:.2f} s = "
          f"{result['output_tok_s']:.0f} tok/s (cascade={result['cascade']}, eager={args.enforce_eager})")
    print(json.dumps(result))
    with open(args.json, "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
