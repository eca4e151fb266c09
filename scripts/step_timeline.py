"""Where a benchmark's seconds go, step by step, on the GPU machine.

    python scripts/step_timeline.py --model /tmp/qwen3-0.6b --workload w1 [--enable-cascade-attention]
    python scripts/step_timeline.py --model /tmp/qwen3-8b --load-format dummy --tensor-parallel-size 2
    python scripts/step_timeline.py --model /tmp/q17 --load-format dummy --workload w6 --host-kv-cache-gb 64

(/tmp/q17: `python -m nanovllm.tools.make_model --preset qwen3-1.7b --out /tmp/q17 --no-weights`.)

Runs one workload of bench.py (every round of it, as bench.py does: W6 has four) through LLM.step()
and records every step's wall time (with
overlapped steps a step() call returns once the previous step's tokens are in, so its wall time is
the device time of that step when the device is the bottleneck). Prints time before the first step
(validation, queueing), prefill and decode time by batch-size bucket, and time after the last step
(detokenization, building outputs). `--kernels-at N` adds the kernels of 20 decode steps from
the N-th on, against their wall time (KernelWindow). Prefill steps are bucketed by their tokens, decode steps by rows;
"host waits" is the time the host spent waiting for the device in that step: in `collect` and in the
runner's plan fence (a step's plan copy queues behind whatever its forward waits for, e.g. host-tier
copies). W6 at 1.7B's small prefill steps (claude_docs/memory.md, session 11) waited in neither. With the
host tier on it also prints each bucket's device times from the tier's step timers: the forward on the
compute stream and its wait there for copies (where those steps' time goes on the device).
It also prints the time Python's garbage collector took by generation; `--gc off` turns the collector off for
the run (the requests are queued as LLM.generate queues them, frozen as they are: QUEUE_AHEAD before the first
step, the rest between steps, whose time the steps' wall times include and the table shows apart).
"""
import argparse
import cProfile
import gc
import io
import pstats
import time
from collections import defaultdict

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.benchmark import WORKLOADS


def bucket(phase: str, size: int) -> tuple:
    """A step's row of the tables: prefill by tokens, decode by rows."""
    limits = (1024, 4096, 16384, 1 << 30) if phase == "prefill" else (8, 32, 64, 128, 256, 512, 1024, 1 << 30)
    return phase, min(b for b in limits if size <= b)


def bound(b: int):
    return b if b < 1 << 30 else "any"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--workload", default="w1", choices=sorted(WORKLOADS))
    p.add_argument("--enable-cascade-attention", action="store_true")
    p.add_argument("--cprofile", type=int, default=0, help="also profile the host: top N functions by own time")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--host-kv-cache-gb", type=float, help="the host KV tier (bench.py's option)")
    p.add_argument("--schedule-policy", choices=["fcfs", "lpm", "dfs-weight", "random"])
    p.add_argument("--num-gpu-blocks", type=int, help="cap the GPU KV cache at this many pages")
    p.add_argument("--kernels-at", type=int, default=0, metavar="N",
                   help="also profile the device's kernels (torch.profiler) over decode steps N .. N + 19 of the "
                        "run itself: kernel time by category against those steps' wall time")
    p.add_argument("--gc", default="engine", choices=["engine", "freeze", "off"],
                   help="Python's garbage collector during the run: as generate leaves it (the requests frozen "
                        "as they are queued; 'freeze' is the same since generate queues in pieces), or off")
    p.add_argument("--warm-up-share", type=float, default=0.0, metavar="F",
                   help="before the run, also generate the first F of its first round's requests with every token id "
                        "moved by one (the same shapes and code paths, no prefix hits for the run): what the run "
                        "spends on first uses (modules loaded, kernels specialized, memory grown) shows as the "
                        "difference against F = 0, where only bench.py's one-prompt warm-up runs")
    args = p.parse_args()
    make, cfg = WORKLOADS[args.workload]
    cfg = dict(cfg)
    if args.enable_cascade_attention:
        cfg["enable_cascade_attention"] = True
    for key, value in (("host_kvcache_gb", args.host_kv_cache_gb), ("schedule_policy", args.schedule_policy),
                       ("num_kvcache_blocks", args.num_gpu_blocks)):
        if value is not None:
            cfg[key] = value
    llm = LLM(args.model, tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format, **cfg)
    rounds = make(min(10000, llm.vocab_size - 1))   # token ids as bench.py draws them
    if isinstance(rounds, tuple):
        rounds = [rounds]
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8), use_tqdm=False)
    if args.warm_up_share > 0:
        prompts, params = rounds[0]
        top = min(10000, llm.vocab_size - 1)
        n = max(2, round(args.warm_up_share * len(prompts)))
        llm.generate([[(t + 1) % top for t in p] for p in prompts[:n]], params[:n], use_tqdm=False)
    runner, waited = llm.model_runner, []

    device = defaultdict(lambda: [0, 0.0, 0.0])   # host tier on: (steps, forward s, copy stall s) on the device

    def waiting(fn):   # time the host spends in fn, waiting for the device, per step
        def timed(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                waited.append(time.perf_counter() - t)
        return timed

    waiting_collect = waiting(runner.collect)

    def timed_collect(step):
        result = waiting_collect(step)
        for times in result.step_times:   # the host tier's StepTimer of steps now read (engine/host_tier.py)
            key = bucket("prefill" if times.prefill_tokens else "decode", times.prefill_tokens)
            for i, value in enumerate((1, times.forward_s, times.stall_s)):
                device[key][i] += value
        return result
    runner.collect = timed_collect
    # The host also waits for the device in the plan fence: a step's plan copy queues behind what its
    # forward waits for (host-tier copies).
    runner._plan_fence = waiting(runner._plan_fence)
    # Each step's forward on the device (CUDA events around it, read at the end): the device time of a decode step,
    # beside its wall time (a slow step: the device's work, or the host's).
    forwards = []   # (is_prefill, start event, end event)
    forward_hidden = runner.forward_hidden

    def timed_forward(batch, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            return forward_hidden(batch, *args, **kwargs)
        finally:
            end.record()
            forwards.append((batch.is_prefill, start, end))
    if torch.cuda.is_available():
        runner.forward_hidden = timed_forward
    collections = defaultdict(lambda: [0, 0.0])   # generation -> (collections, seconds), during the run
    gc_start = [0.0]

    def gc_timer(phase, info):
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            collections[info["generation"]][0] += 1
            collections[info["generation"]][1] += time.perf_counter() - gc_start[0]
    gc.callbacks.append(gc_timer)
    prof = cProfile.Profile() if args.cprofile else None
    if prof:
        prof.enable()
    steps = []  # (phase, batch size, seconds, host wait for the device)
    window = KernelWindow(args.kernels_at, llm.stats["decode_steps"]) if args.kernels_at else None
    queue_s = between_s = tail_s = detok_s = 0.0
    all_seqs, texts = [], []
    start = time.perf_counter()
    for prompts, params in rounds:
        requests, seqs = list(zip(prompts, params)), []
        t0 = time.perf_counter()
        llm._queue(requests, seqs)   # as generate queues them (nanovllm/llm.py)
        if args.gc == "off":
            gc.disable()
        last = t1 = time.perf_counter()
        queue_s += t1 - t0
        while len(seqs) < len(requests) or not all(s.is_finished for s in seqs):
            collected = llm.in_flight  # step() launches the next step, then waits for this one
            n_waits = len(waited)
            if window is not None:
                window.before_step(llm.stats["decode_steps"])
            llm.step()
            t_queue = time.perf_counter()
            llm._queue(requests, seqs)   # while the step just launched runs
            now = time.perf_counter()
            between_s += now - t_queue
            if collected is not None:
                wait = sum(waited[n_waits:])
                steps.append(("prefill" if collected.is_prefill else "decode", len(collected.seqs), now - last, wait,
                              len(collected.step.input_ids)))
            last = now
        llm.drain()
        t2 = time.perf_counter()
        texts += [llm.output_text(s) for s in seqs]
        t3 = time.perf_counter()
        tail_s, detok_s = tail_s + t2 - last, detok_s + t3 - t2
        all_seqs += seqs
    elapsed = time.perf_counter() - start
    gc.callbacks.remove(gc_timer)
    gc.unfreeze()
    gc.enable()
    if prof:
        prof.disable()
    tokens = sum(len(s.completion_token_ids) for s in all_seqs)
    print(f"{args.workload} cascade={args.enable_cascade_attention}: {tokens} tokens in {elapsed:.3f} s = "
          f"{tokens / elapsed:.0f} tok/s; {len(texts)} outputs")
    print(f"| part | seconds |\n|---|---|\n| validate + queue (before the first step) | {queue_s:.3f} |")
    buckets = defaultdict(lambda: [0, 0.0, 0.0, 0])  # steps, seconds, host waits, tokens
    for phase, n, sec, wait, n_tokens in steps:  # prefill by tokens a step, decode by rows
        key = bucket(phase, n_tokens if phase == "prefill" else n)
        for i, value in enumerate((1, sec, wait, n_tokens)):
            buckets[key][i] += value
    for (phase, b), (count, sec, wait, n_tokens) in sorted(buckets.items()):
        label = f"{phase}, {'tokens' if phase == 'prefill' else 'batch'} <= {bound(b)}"
        print(f"| {label} ({count} steps, {n_tokens / count:.0f} tokens, {1000 * sec / count:.2f} ms each, "
              f"host waits {1000 * wait / count:.2f} ms of it) | {sec:.3f} |")
    print(f"| last collect | {tail_s:.3f} |\n| detokenize | {detok_s:.3f} |")
    print(f"| (of the steps above: validate + queue between steps, beside the device's step) | {between_s:.3f} |")
    decode = [(i, sec, wait) for i, (phase, _, sec, wait, _) in enumerate(s for s in steps if s[0] == "decode")]
    if decode:   # where a decode step's time spreads: steady steps, or a few slow ones (and which)
        ms = sorted(1000 * sec for _, sec, _ in decode)
        pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]   # noqa: E731
        slow = sorted(decode, key=lambda d: -d[1])[:8]
        print(f"\nDecode steps, wall ms: p10 {pick(0.1):.2f}, median {pick(0.5):.2f}, p90 {pick(0.9):.2f}, max "
              f"{ms[-1]:.2f}; slowest (decode step: ms, host waits ms): "
              + ", ".join(f"{i}: {1000 * sec:.1f}, {1000 * wait:.1f}" for i, sec, wait in slow))
        forward_ms = [start.elapsed_time(end) for prefill, start, end in forwards if not prefill]   # launch order
        if forward_ms:
            dev = sorted(forward_ms)
            print(f"Decode steps' forward on the device, ms: p10 {dev[len(dev) // 10]:.2f}, median "
                  f"{dev[len(dev) // 2]:.2f}, p90 {dev[min(len(dev) - 1, 9 * len(dev) // 10)]:.2f}, max {dev[-1]:.2f}; "
                  "the slowest steps' forwards: " + ", ".join(f"{i}: {forward_ms[i]:.1f}" for i, _, _ in slow
                                                             if i < len(forward_ms)))
    if forwards:   # the device between forwards: sampling and input copies, and idle waiting for the host
        gaps = defaultdict(float)
        largest = []
        for i in range(1, len(forwards)):
            gap = forwards[i - 1][2].elapsed_time(forwards[i][1])
            phase = "prefill" if forwards[i][0] else "decode"
            gaps[phase] += gap / 1000
            largest.append((gap, i))
        prefill_ms = [start.elapsed_time(end) for prefill, start, end in forwards if prefill]
        print("Prefill steps' forward on the device, ms: " + ", ".join(f"{t:.1f}" for t in prefill_ms))
        print("The device between forwards (before each step's forward: the previous step's sampling, input copies, "
              "idle while the host builds the step): " + ", ".join(f"before {phase} forwards {sec:.3f} s"
                                                                   for phase, sec in sorted(gaps.items()))
              + "; the largest (ms, forward index): " + ", ".join(f"{g:.1f} at {i}" for g, i in
                                                                 sorted(largest, reverse=True)[:8]))
    print(f"\nPython's garbage collector during the run (--gc {args.gc}): " + (", ".join(
        f"generation {g}: {n} collections, {sec:.3f} s" for g, (n, sec) in sorted(collections.items())) or "none"))
    if device:   # decode steps by tokens only (the timer does not know rows): one bucket
        print("\nHost tier on, device time a step (its StepTimer: the forward on the compute stream, and its wait "
              "there for copies before it):\n| steps | count | forward ms | copy stall ms |\n|---|---|---|---|")
        for (phase, b), (count, forward, stall) in sorted(device.items()):
            label = "decode" if phase == "decode" else f"prefill, tokens <= {bound(b)}"
            print(f"| {label} | {count} | {1000 * forward / count:.2f} | {1000 * stall / count:.2f} |")
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.cprofile)
        print(out.getvalue())
    if window is not None:
        window.report()
    llm.close()


class KernelWindow:
    """Kernel time by category (profile_step.py's categories) over WINDOW decode steps of the run, from the
    launch of step `first` to the launch of step `first` + WINDOW (with overlapped steps, the device's work of
    the steps in between), against that span's wall time: whether a benchmark's own steps leave the device
    idle, which profile_step.py's synthetic steps cannot say."""
    WINDOW = 20

    def __init__(self, first: int, before: int):
        """first: the run's decode step to start at; before: the engine's decode steps before the run (warm-up)."""
        self.first, self.before, self.prof, self.wall, self.start, self.events = first, before, None, 0.0, None, []

    def before_step(self, decode_steps: int):
        decode_steps -= self.before
        if self.start is None and decode_steps >= self.first:
            # No profiler without CUDA (no kernels to see; torch's CPU profiler in a test process crashed it at exit)
            if torch.cuda.is_available():
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
            self.start, self.at = time.perf_counter(), decode_steps
        elif self.start is not None and not self.wall and decode_steps >= self.at + self.WINDOW:
            self.wall = time.perf_counter() - self.start
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                self.events, self.prof = self.prof.key_averages(), None

    def report(self):
        from profile_step import category
        if not self.wall:
            print(f"\nkernels: the run had fewer than {self.first + self.WINDOW} decode steps")
            return
        times = defaultdict(float)
        for ev in self.events:
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                times[category(ev.key)] += ev.self_device_time_total / 1000 / self.WINDOW
        wall = 1000 * self.wall / self.WINDOW
        print(f"\nKernels of decode steps {self.at}-{self.at + self.WINDOW - 1} (launch to launch), ms a step:")
        print("| part | ms a step |\n|---|---|")
        for cat, ms in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"| {cat} | {ms:.3f} |")
        print(f"| GPU busy (sum; two streams may overlap) | {sum(times.values()):.3f} |\n| wall | {wall:.3f} |")


if __name__ == "__main__":
    main()
