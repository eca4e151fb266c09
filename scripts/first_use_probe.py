"""Does the first workload after bench.py's one-prompt warm-up pay first-use costs (kernel modules loaded,
kernels specialized, memory grown) that a second one does not? A mini W2 (16 groups x 16 requests, 2,048-token
system prompts, 128-token questions, 6 greedy tokens, cascade on) runs three times in one process on fresh tokens
(no prefix hits across runs); every step is synchronized and timed, one column a run.

    source .devkit/setup.sh && python scripts/first_use_probe.py /tmp/qwen3-0.6b

Session 24 (one H200): runs 1 and 2 took the same 277.4 ms step for step (prefill 45/52-65 ms, decode 7-11 ms),
run 3 238 ms: no first-use cost showed in the prefill or cascade paths once the one-prompt warm-up had run."""
import random
import sys
import time
import torch
from nanovllm import LLM, SamplingParams

model = sys.argv[1]
llm = LLM(model, enable_cascade_attention=True)
llm.generate(["Benchmark: "], SamplingParams(max_tokens=8), use_tqdm=False)

def mini(seed):
    rng = random.Random(seed)
    groups = [[rng.randint(0, 9999) for _ in range(2048)] for _ in range(16)]
    prompts = [g + [rng.randint(0, 9999) for _ in range(128)] for g in groups for _ in range(16)]
    rng.shuffle(prompts)
    return prompts

sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)
runs = []
for run in range(3):
    for p in mini(run):
        llm.add_request(p, sp)
    rows = []
    while not llm.is_finished():
        before = dict(llm.stats)
        t = time.perf_counter()
        llm.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        kind = "P" if llm.stats["prefill_steps"] > before["prefill_steps"] else ("D" if llm.stats["decode_steps"] > before["decode_steps"] else "-")
        casc = llm.stats["cascade_steps"] > before["cascade_steps"]
        rows.append((kind + ("c" if casc else ""), llm.stats["prefill_tokens"] - before["prefill_tokens"], dt * 1e3))
    runs.append(rows)
n = max(len(r) for r in runs)
print("step  kind tokens | run0 ms | run1 ms | run2 ms")
for i in range(n):
    cells = [runs[k][i] if i < len(runs[k]) else ("", 0, 0.0) for k in range(3)]
    print(f"{i:4d} {cells[0][0]:>4} {cells[0][1]:6d} | " + " | ".join(f"{c[0]:>3} {c[2]:8.2f}" for c in cells))
print("sum ms", [round(sum(r[2] for r in rows), 1) for rows in runs])
