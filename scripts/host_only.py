"""The engine's host work alone on a shared-prefix workload: a whole W2/W3-shaped generate with an executor
that samples token 7 for every row at once instead of running a model, so every second printed is the
scheduler's, the block manager's, the step builder's, the cascade planner's and the output processor's.

    python scripts/host_only.py [--workload w3|w2] [--requests 1024] [--output 256] [--model DIR]

(Without --model: a random qwen3-tiny checkpoint made in a temporary folder, long enough for W3.)

The GPU hosts run this Python 2.5-5x slower than the 2-core CPU machine (session 22: W3's prefill steps were
host-bound on one of them, the device idle 0.14-0.31 s before them), so what is spent here is what a
GPU step must cover. Prints the time before the first step (validation, queueing), the prefill and decode
steps, the decode steps by position in their page (a step where 1,024 pages fill, the next one where 1,024
pages are taken), the last step (every request finishes) and the rest (queueing between steps, texts).
Measured on the CPU machine (trained tiny model, W3: 1,024 requests of 8,192 shared + 128 own tokens, 256
output tokens): claude_docs/performance.md, "Session 22".
"""
import argparse
import os
import statistics
import tempfile
import time

from nanovllm import LLM
from nanovllm.benchmark import shared_prompts
from nanovllm.engine.scheduled_step import StepResult
from nanovllm.tools.make_model import make_model

SHAPES = {"w3": (1, 8192), "w2": (64, 2048)}   # groups, shared tokens (workloads.md)


class SampleSevens:
    """An executor whose steps sample token 7 for every row (no model, nothing on a device)."""

    def execute(self, step):
        return step

    def collect(self, step):
        return StepResult(step.step_id, [7] * len(step.seq_ids))

    def close(self):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="w3", choices=sorted(SHAPES))
    ap.add_argument("--model", help="a checkpoint (default: a random qwen3-tiny one, made for the run)")
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--shared", type=int, help="shared tokens a group (default: the workload's)")
    ap.add_argument("--question", type=int, default=128)
    ap.add_argument("--output", type=int, default=256)
    args = ap.parse_args()
    groups, shared = SHAPES[args.workload]
    shared = args.shared or shared
    groups = min(groups, args.requests)
    max_len = shared + args.question + args.output + 16
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model("qwen3-tiny", os.path.join(tmp, "model"), max_position_embeddings=max_len)
        pages = groups * (shared // 16 + 1) + args.requests * ((args.question + args.output) // 16 + 2)
        llm = LLM(model, max_num_seqs=1024, max_model_len=max_len, num_kvcache_blocks=pages,
                  enable_cascade_attention=True, max_num_batched_tokens=16384)
    run(llm, args, groups, shared)


def run(llm, args, groups: int, shared: int):
    llm.executor.close()
    llm.executor = SampleSevens()
    top = min(10000, llm.vocab_size - 3)
    prompts, params = shared_prompts(groups, args.requests // groups, shared, args.question, args.output, top=top)
    steps = []   # (seconds, whether the step launched in it was a prefill step)
    step = llm.step

    def timed_step():
        t = time.perf_counter()
        out = step()
        steps.append((time.perf_counter() - t, llm.in_flight is not None and llm.in_flight.step.is_prefill))
        return out
    llm.step = timed_step
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    assert len(outputs) == len(prompts) and all(len(o["token_ids"]) == args.output for o in outputs)
    prefill = [s for s, p in steps if p]
    first = len(prefill) + 1   # the first decode step after the one that collects the last prefill step
    decode = [s for s, _ in steps[first:-1]]   # ... up to the last step, where every request finishes
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    print(f"{args.workload} host only ({args.requests} requests, {groups} groups of {shared} shared tokens, "
          f"{args.output} output tokens): {ms(wall)} ms in all")
    print(f"  prefill steps: {len(prefill)}, {ms(sum(prefill))} ms ({', '.join(ms(s) for s in prefill)})")
    print(f"  decode steps: {len(decode)}, {ms(sum(decode))} ms, median {1e3 * statistics.median(decode):.2f}")
    by_page = {}
    for i, s in enumerate(decode, first):
        by_page.setdefault(i % 16, []).append(s)
    print("  decode steps by step index mod 16 (median ms): " + " ".join(
        f"{k}:{1e3 * statistics.median(v):.2f}" for k, v in sorted(by_page.items())))
    print(f"  last step (every request finishes): {ms(steps[-1][0])} ms; outside the steps (queueing between "
          f"steps, texts): {ms(wall - sum(s for s, _ in steps))} ms")


if __name__ == "__main__":
    main()
