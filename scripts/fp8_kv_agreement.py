"""Greedy agreement of the fp8 KV cache with a float32 reference, next to the model-dtype cache.

    python scripts/fp8_kv_agreement.py                       # the shipped tiny model; GPU if there is one
    python scripts/fp8_kv_agreement.py --model /tmp/q06 --enable-cascade-attention
    python scripts/fp8_kv_agreement.py --device cpu          # the torch backend on CPU

Prompts: `--requests` windows (64) of the corpus's held-out text, 5 to 220 tokens long in turn, each
continued by `--max-tokens` (32) greedy tokens. The reference is the model in float32 on the torch
backend (float32 KV). Each other run is scored against it: `identical` requests (every token equal)
and `mean_prefix`, the mean over requests of the tokens generated before the first difference. A
float32 engine differs from the reference only by kernel rounding, bf16 rounds the weights and
activations too, and fp8 KV the cache on top of that, so each row bounds what the next can reach.

Runs on the GPU: bf16 with a bf16 cache (FlashInfer) and bf16 with an fp8 cache, its decode steps on
xqa (fp8 queries and probabilities in its Hopper kernel) and on the Triton kernel (fp16 dots), with
calibrated scales when the checkpoint has them. On the CPU: float32 with an fp8 cache (the
quantization alone), then bf16 and bf16 + fp8 on the torch backend. Prints one row per run and the
whole result as one JSON line (appended to --json when given). Numbers: claude_docs/memory.md,
"FP8 KV cache"."""
import argparse
import gc
import json
import random
import time

import torch
from transformers import AutoTokenizer

from nanovllm import LLM, SamplingParams
from nanovllm.assets import corpus_split, tiny_trained_path

PROMPT_LENGTHS = (5, 17, 33, 64, 100, 129, 160, 220)


def held_out_prompts(model: str, n: int, seed: int = 0) -> list[list[int]]:
    """n token windows of the held-out corpus text (the works in turn), PROMPT_LENGTHS long in turn."""
    tok = AutoTokenizer.from_pretrained(model, model_max_length=10**9)
    texts = [tok.encode(t) for t in corpus_split()[1]]
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        ids, length = texts[i % len(texts)], PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]
        start = rng.randrange(len(ids) - length)
        prompts.append(ids[start:start + length])
    return prompts


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> dict:
    """identical: requests whose tokens all equal the reference's; mean_prefix: mean tokens before the
    first difference."""
    prefixes = []
    for ref, out in zip(reference, tokens, strict=True):
        n = 0
        while n < min(len(ref), len(out)) and ref[n] == out[n]:
            n += 1
        prefixes.append(n)
    return dict(identical=sum(r == o for r, o in zip(reference, tokens)), requests=len(reference),
                mean_prefix=round(sum(prefixes) / len(prefixes), 2))


def generate(model: str, prompts, max_tokens: int, **engine) -> tuple[list[list[int]], float, int]:
    llm = LLM(model, max_model_len=512, max_num_seqs=len(prompts), **engine)
    try:
        t = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            use_tqdm=False)
        seconds = time.perf_counter() - t
        pages = llm.kv_usage()["blocks_total"]
        assert llm.kv_usage()["blocks_used"] == 0, "pages leaked"
    finally:
        llm.close()
        del llm
        gc.collect()   # the next engine sizes its KV cache from the free memory
        torch.cuda.empty_cache()
    return [o["token_ids"] for o in outs], seconds, pages


def runs(device: str, cascade: bool) -> list[tuple[str, dict]]:
    if device == "cpu":
        rows = [("fp32 model, fp8 KV", dict(dtype="float32", kv_cache_dtype="fp8_e4m3")),
                ("bf16 model, bf16 KV", dict(dtype="bfloat16")),
                ("bf16 model, fp8 KV", dict(dtype="bfloat16", kv_cache_dtype="fp8_e4m3"))]
        return [(name, dict(cfg, device="cpu")) for name, cfg in rows]
    fp8 = dict(dtype="bfloat16", kv_cache_dtype="fp8_e4m3")
    rows = [("bf16, bf16 KV", dict(dtype="bfloat16")),
            ("bf16, fp8 KV, xqa decode", dict(fp8, decode_attention_kernel="xqa")),
            ("bf16, fp8 KV, Triton decode", dict(fp8, decode_attention_kernel="triton"))]
    if cascade:
        rows += [(name + ", cascade", dict(cfg, enable_cascade_attention=True)) for name, cfg in rows]
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=tiny_trained_path())
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--enable-cascade-attention", action="store_true", help="GPU: also each run with cascade on")
    p.add_argument("--json", help="append the result as one JSON line here")
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = held_out_prompts(args.model, args.requests)
    ref_cfg = dict(dtype="float32", attention_backend="torch", device=device, enforce_eager=True)
    reference, seconds, _ = generate(args.model, prompts, args.max_tokens, **ref_cfg)
    result = dict(model=args.model, device=device, requests=len(prompts), max_tokens=args.max_tokens,
                  reference="fp32 model, fp32 KV, torch backend", runs={})
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    print(f"{'run':<28} {'identical':>10} {'mean prefix':>12} {'KV pages':>9} {'seconds':>8}")
    print(f"{'reference (fp32)':<28} {len(prompts):>5} / {len(prompts):<3} {args.max_tokens:>12.2f} {'':>9} {seconds:>8.1f}")
    for name, cfg in runs(device, args.enable_cascade_attention):
        tokens, seconds, pages = generate(args.model, prompts, args.max_tokens, **cfg)
        score = agreement(reference, tokens)
        result["runs"][name] = dict(score, kv_pages=pages, seconds=round(seconds, 2))
        print(f"{name:<28} {score['identical']:>5} / {len(prompts):<3} {score['mean_prefix']:>12.2f} {pages:>9} "
              f"{seconds:>8.1f}")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
