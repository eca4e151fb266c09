"""Device time of the logits controls at a decode step (GPU): process_logits (penalties, logit_bias,
min_tokens' mask) and the sampler, with every row using every control against none, at Qwen3's
vocabulary. Histories as in W1 (prompts 100-1024 tokens, outputs up to 1024).

    python scripts/bench_sampling_controls.py --rows 256
"""
import argparse
import random

import torch

from nanovllm import SamplingParams
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.engine.step_builder import StepBuilder
from nanovllm.layers.logits_processor import process_logits
from nanovllm.layers.sampler import Sampler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    from types import SimpleNamespace
    config = SimpleNamespace(kvcache_block_size=16, seed=0, enable_cascade_attention=False,
                             hf_config=SimpleNamespace(vocab_size=args.vocab), eos_token_ids=(151643, 151645))
    rng = random.Random(0)

    def seqs(**kw):
        out = []
        for _ in range(args.rows):
            s = Sequence([rng.randrange(args.vocab) for _ in range(rng.randrange(100, 1024))],
                         SamplingParams(temperature=1.0, max_tokens=1024, **kw), 16)
            s.token_ids += [rng.randrange(args.vocab) for _ in range(rng.randrange(1, 1024))] + [PLACEHOLDER]
            s.num_pending = 1
            out.append(s)
        return out
    builder = StepBuilder(config)
    plain = builder._sampling_inputs(seqs())
    every = builder._sampling_inputs(seqs(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2,
                                          min_p=0.05, min_tokens=1024, logit_bias={5: 1.0, 7: -2.0}))
    dev = torch.device("cuda")
    logits = torch.randn(args.rows, args.vocab, device=dev, dtype=torch.bfloat16)
    newest = torch.randint(0, args.vocab, (args.rows,), device=dev)
    runner = SimpleNamespace(device=dev, sampler=Sampler(), generator=torch.Generator(device=dev))

    def step(s):
        x = process_logits(logits, s, newest) if s.processes_logits else logits
        return ModelRunner.sample(runner, x, s)

    def timed(fn):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.reps
    entries = len(every.penalties.output_ids) + len(every.penalties.prompt_ids)
    print(f"{args.rows} rows x {args.vocab} vocab, {entries} history entries")
    print(f"  no controls (fused sampler):         {timed(lambda: step(plain)):.3f} ms")
    print(f"  process_logits alone, every control: {timed(lambda: process_logits(logits, every, newest)):.3f} ms")
    print(f"  process + sample (min_p: torch path): {timed(lambda: step(every)):.3f} ms")
    print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
