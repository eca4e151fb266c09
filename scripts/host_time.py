"""Host time of a decode step by engine phase, on any machine: what the GPU's step must cover for the
host never to be the limit (the engine builds step N+1 while the device runs step N).

    python scripts/host_time.py [--model DIR] [--batch 1024] [--groups 64] [--shared 256] [--cascade]

Runs `batch` requests (`groups` shared prefixes of `shared` tokens, 32 tokens of their own, 64 output
tokens, greedy, ignore_eos) until every one decodes, then times each decode step's phases with
perf_counter: the scheduler, the step builder (with the cascade plan inside it), the engine's bookkeeping
at launch, the runner's input preparation, the scheduler's and output processor's work on the collected
tokens. The model's forward and sampler are timed too and subtracted from the wall time: "host" is
everything else. No profiler (cProfile doubles this code's time).

Measured on the 2-core CPU machine (session 7, trained tiny model, batch 1024, 64 groups of 256 shared
tokens): host 8.5 ms a step without cascade (output processing 2.9, step build 2.1, launch bookkeeping 1.2,
scheduler postprocess 0.9, schedule 0.5, runner prepare 0.2), 9.7 ms with cascade (its plan 1.7 ms inside
a 2.9 ms build). Session 20 (same machine, cascade on): 6.9 ms on the mean, the phases' medians adding to ~4.3 (the mean carries
one pause of the cyclic collector, which this script's requests are not frozen from as LLM.generate's are, and the
last step, where all finish). claude_docs/performance.md has the tables.
"""
import argparse
import collections
import os
import random
import statistics
import time

from nanovllm import LLM, SamplingParams

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanovllm", "assets")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ASSETS, "qwen3-tiny-trained"))
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--shared", type=int, default=256)
    ap.add_argument("--cascade", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.groups <= args.batch:
        raise SystemExit("--groups must be in 1..--batch")
    own, output = 32, 64
    pages = args.batch * ((args.shared + own + output) // 16 + 2)
    engine = LLM(args.model, max_model_len=args.shared + own + output + 16, max_num_seqs=args.batch,
                 num_kvcache_blocks=pages, enable_cascade_attention=args.cascade, max_num_batched_tokens=32768)
    vocab = engine.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
    for g in range(args.groups):
        shared = [rng.randrange(3, vocab - 3) for _ in range(args.shared)]
        for _ in range(args.batch // args.groups):
            engine.add_request(shared + [rng.randrange(3, vocab - 3) for _ in range(own)], params)
    while any(s.num_completion_tokens == 0 for s in engine.seqs.values()):
        engine.step()   # prefill

    spent = collections.defaultdict(list)   # label -> seconds of each call

    def timed(obj, name: str, label: str):
        inner = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[label].append(time.perf_counter() - t)
        setattr(obj, name, wrapper)

    runner = engine.model_runner
    timed(runner, "forward_hidden", "model forward")
    timed(runner, "sample", "model sampler")
    timed(engine.scheduler, "schedule", "scheduler.schedule")
    timed(engine.step_builder, "build", "step_builder.build")
    if engine.step_builder.cascade is not None:
        timed(engine.step_builder.cascade, "plan", "  of which cascade plan")
    timed(engine, "launched", "engine.launched")
    timed(runner, "prepare", "runner.prepare")
    timed(engine.scheduler, "postprocess", "scheduler.postprocess")
    timed(engine.output_processor, "process", "output_processor.process")
    steps, start = 0, time.perf_counter()
    while not engine.is_finished():
        engine.step()
        steps += 1
    wall = time.perf_counter() - start
    model = sum(spent["model forward"]) + sum(spent["model sampler"])
    print(f"batch {args.batch}, {args.groups} groups of {args.shared} shared tokens, cascade "
          f"{'on' if args.cascade else 'off'}: {steps} decode steps, host {1e3 * (wall - model) / steps:.2f} ms a step "
          f"(mean; each phase's median is its steady state: the mean adds the collector's pauses and the last "
          f"step, where every request finishes)")
    print(f"  {'phase':28s} {'mean':>7s} {'median':>7s} ms a step")
    for label, calls in sorted(spent.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {label:28s} {1e3 * sum(calls) / steps:7.2f} {1e3 * statistics.median(calls):7.2f}")


if __name__ == "__main__":
    main()
