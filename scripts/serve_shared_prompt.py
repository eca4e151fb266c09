"""Load generator for an OpenAI-compatible server, shaped like a chat product: a few long system
prompts shared by many requests, each with its own short question.

    python scripts/serve_shared_prompt.py --base-url http://127.0.0.1:8000/v1 --model MODEL \
        --concurrency 32 --groups 4 --system-tokens 1024 --question-tokens 32 --output-tokens 128 \
        --requests 512 --out result.json

C clients send R streaming completions (so time to first token and inter-token latency are
measured at the client); request i uses system prompt i % G. Prompt text is random common words:
about one token each with real tokenizers, 2.6 with make_model's checkpoints (its small vocabulary:
2,048 words + a 32-word question are 5,331 tokens, over a 4,096-token max_model_len). Against nanovllm (detected by its /metrics) requests set ignore_eos, so every one
produces exactly O tokens, and the prefix-cache hit rate is read from /metrics before and after the
run. Any server that reports usage.prompt_tokens_details.cached_tokens gets a hit rate from that too.
Needs only httpx.

Policy comparison in one command (starts `nanovllm serve` once per policy on a free port, runs the
same load against each, stops it, prints one line per policy: throughput, TTFT p50/p99, the longest
admission wait against the --max-wait-s bound):

    python scripts/serve_shared_prompt.py --model /tmp/q06 --compare-policies fcfs,lpm \
        --server-args "--host-kv-cache-gb 64 --num-kvcache-blocks 16384" --max-wait-s 10 \
        --groups 64 --system-tokens 1024 --concurrency 64 --requests 1024 --token-chunks yes
"""
import argparse
import asyncio
import json
import random
import sys
import time

import httpx

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or "
         "had by word but what some we can out other were all there when up use your how said an each she "
         "which do their time if will way about many then them write would like so these her long make "
         "thing see him two has look more day could go come did number sound no most people my over know "
         "water than call first who may down side been now find any new work part take get place made live "
         "where after back little only round man year came show every good me give our under name very "
         "through just form sentence great think say help low line differ turn cause much mean before move "
         "right boy old too same tell does set three want air well also play small end put home read hand "
         "port large spell add even land here must big high such follow act why ask men change went light "
         "kind off need house picture try us again animal point mother world near build self earth father").split()


def random_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "count": 0}
    xs = sorted(values)

    def pct(p):  # linear interpolation between closest ranks
        k = (len(xs) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
    return {"mean": sum(xs) / len(xs), "p50": pct(50), "p90": pct(90), "p99": pct(99), "count": len(xs)}


def server_root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


async def scrape_metrics(client: httpx.AsyncClient, root: str) -> dict[str, float] | None:
    """nanovllm's counters, or None when the server is not nanovllm (or has no /metrics)."""
    try:
        r = await client.get(f"{root}/metrics")
    except httpx.HTTPError:
        return None
    if r.status_code != 200 or "nanovllm_prefix_cache_hit_tokens_total" not in r.text:
        return None
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def one_request(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    """Stream one completion; returns its timings and usage, or an error."""
    start = time.perf_counter()
    token_times, usage = [], None
    async with client.stream("POST", url, json=payload) as r:
        if r.status_code != 200:
            body = (await r.aread()).decode(errors="replace")
            return {"error": f"HTTP {r.status_code}: {body[:300]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": f"stream error: {chunk['error']}"}
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") or (c.get("logprobs") or {}).get("tokens") for c in chunk.get("choices", [])):
                token_times.append(time.perf_counter())
    end = time.perf_counter()
    if not token_times:
        return {"error": "no tokens streamed"}
    return {"ttft": token_times[0] - start, "itl": [b - a for a, b in zip(token_times, token_times[1:])],
            "e2e": end - start, "usage": usage, "chunks": len(token_times)}


async def run(args) -> dict:
    rng = random.Random(args.seed)
    systems = [random_text(rng, args.system_tokens) for _ in range(args.groups)]
    prompts = [systems[i % args.groups] + "\n" + random_text(rng, args.question_tokens) for i in range(args.requests)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    url = args.base_url.rstrip("/") + "/completions"
    root = server_root(args.base_url)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout) as client:
        before = await scrape_metrics(client, root)
        ours = before is not None
        ignore_eos = ours if args.ignore_eos == "auto" else args.ignore_eos == "yes"
        token_chunks = args.token_chunks == "yes"
        results: list[dict] = []
        next_index = iter(range(args.requests))

        async def client_loop():
            for i in next_index:  # the iterator is shared: each request is taken by exactly one client
                payload = {"model": args.model, "prompt": prompts[i], "max_tokens": args.output_tokens,
                           "temperature": args.temperature, "stream": True,
                           "stream_options": {"include_usage": True}}
                if ignore_eos:
                    payload["ignore_eos"] = True
                if token_chunks:
                    payload["logprobs"] = 0
                try:
                    results.append(await one_request(client, url, payload))
                except (httpx.HTTPError, json.JSONDecodeError) as e:
                    results.append({"error": f"{type(e).__name__}: {e}"})

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
        duration = time.perf_counter() - start
        after = await scrape_metrics(client, root) if ours else None

    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    out_tokens = sum(r["usage"]["completion_tokens"] if r["usage"] else r["chunks"] for r in ok)
    with_usage = [r["usage"] for r in ok if r["usage"]]
    prompt_tokens = sum(u["prompt_tokens"] for u in with_usage)
    cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for u in with_usage)
    hit_rate = None
    if before is not None and after is not None:
        hits = after["nanovllm_prefix_cache_hit_tokens_total"] - before["nanovllm_prefix_cache_hit_tokens_total"]
        queries = (after["nanovllm_prefix_cache_query_tokens_total"]
                   - before["nanovllm_prefix_cache_query_tokens_total"])
        hit_rate = hits / queries if queries else 0.0
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "out")},
        "server_is_nanovllm": ours,
        "ignore_eos": ignore_eos,
        "token_chunks": token_chunks,
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": errors[:5],
        "duration_s": duration,
        "request_throughput_rps": len(ok) / duration if duration else 0.0,
        "output_throughput_tok_s": out_tokens / duration if duration else 0.0,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": prompt_tokens,
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "e2e_latency_s": percentiles([r["e2e"] for r in ok]),
        "prefix_cache_hit_rate": hit_rate,                  # from the server's /metrics (nanovllm only)
        "usage_cached_token_ratio": cached / prompt_tokens if prompt_tokens else None,
        # nanovllm: the longest any request waited for admission since the server started
        # (compare with its --max-wait-s starvation bound)
        "server_max_queue_wait_s": after.get("nanovllm_max_queue_wait_seconds") if after else None,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL, ending in /v1")
    p.add_argument("--model", required=True, help="model name as the server knows it")
    p.add_argument("--concurrency", type=int, default=16, help="C: clients, each with one request in flight")
    p.add_argument("--groups", type=int, default=4, help="G: distinct system prompts")
    p.add_argument("--system-tokens", type=int, default=512, help="S: words (~tokens) per system prompt")
    p.add_argument("--question-tokens", type=int, default=32, help="Q: words (~tokens) per question")
    p.add_argument("--output-tokens", type=int, default=64, help="O: max_tokens of every request")
    p.add_argument("--requests", type=int, default=256, help="R: requests in all")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--token-chunks", choices=["yes", "no"], default="no",
                   help="ask for logprobs=0 so that every token streams a chunk, text or not (random-weight "
                        "checkpoints from make_model sample ids past their tokenizer's vocabulary, which decode "
                        "to no text and stream nothing: on the H200, 986 of 1,024 requests saw no token)")
    p.add_argument("--ignore-eos", choices=["auto", "yes", "no"], default="auto",
                   help="auto: only when the server is nanovllm (other servers may reject the field)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--compare-policies", default=None,
                   help="e.g. fcfs,lpm: serve --model (a path) once per schedule policy and compare")
    p.add_argument("--server-args", default="", help="more `nanovllm serve` options for --compare-policies")
    p.add_argument("--max-wait-s", type=float, default=10.0, help="the servers' starvation bound (--compare-policies)")
    return p


def compare_policies(args) -> dict:
    """One server per policy, the same load against each; returns {policy: result}."""
    import shlex
    import socket
    import subprocess
    results = {}
    for policy in args.compare_policies.split(","):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "nanovllm.cli", "serve", "--model", args.model, "--port", str(port),
               "--schedule-policy", policy, "--max-wait-s", str(args.max_wait_s)] + shlex.split(args.server_args)
        server = subprocess.Popen(cmd)
        try:
            deadline = time.monotonic() + 900
            while True:
                if server.poll() is not None:
                    sys.exit(f"server for {policy} exited with {server.returncode}: {' '.join(cmd)}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit(f"server for {policy} not ready after 900 s")
                time.sleep(1)
            run_args = argparse.Namespace(**{**vars(args), "base_url": f"http://127.0.0.1:{port}/v1"})
            results[policy] = asyncio.run(run(run_args))
        finally:
            server.terminate()
            server.wait(timeout=60)
    print_comparison(results, args.max_wait_s)
    return results


def print_comparison(results: dict, max_wait_s: float):
    """One line per policy; a policy whose requests failed shows '-' for its latencies and its first error
    (on the H200 every request of a run once came back 400 and the table itself raised)."""
    print(f"{'policy':10} {'ok':>5} {'err':>4} {'req/s':>7} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'max wait s':>10} {'bound s':>8}")
    ms = lambda s: "-" if s is None else f"{s * 1000:.1f}"  # noqa: E731
    for policy, r in results.items():
        wait = r["server_max_queue_wait_s"]
        print(f"{policy:10} {r['completed']:5} {r['errors']:4} {r['request_throughput_rps']:7.2f} "
              f"{r['output_throughput_tok_s']:10.1f} {ms(r['ttft_s']['p50']):>12} {ms(r['ttft_s']['p99']):>12} "
              f"{'-' if wait is None else f'{wait:.2f}':>10} {max_wait_s:8.1f}")
        if r["error_samples"]:
            print(f"{'':10} first error: {r['error_samples'][0]}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("concurrency", "groups", "requests", "output_tokens"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name.replace('_', '-')} must be >= 1")
    if args.compare_policies:
        results = compare_policies(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        return 1 if any(r["errors"] for r in results.values()) else 0
    result = asyncio.run(run(args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    def ms(d, key):
        return "-" if d[key] is None else f"{d[key] * 1000:.1f}"
    print(f"requests: {result['completed']} ok, {result['errors']} errors in {result['duration_s']:.2f}s "
          f"({result['request_throughput_rps']:.2f} req/s, {result['output_throughput_tok_s']:.1f} output tok/s)")
    for name in ("ttft_s", "itl_s", "e2e_latency_s"):
        d = result[name]
        print(f"{name[:-2]:>12} ms: mean {ms(d, 'mean')}  p50 {ms(d, 'p50')}  p90 {ms(d, 'p90')}  p99 {ms(d, 'p99')}")
    for name in ("prefix_cache_hit_rate", "usage_cached_token_ratio"):
        if result[name] is not None:
            print(f"{name}: {result[name]:.3f}")
    for e in result["error_samples"]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
