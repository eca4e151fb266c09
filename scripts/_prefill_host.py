import sys, time, cProfile, pstats, io
from nanovllm import LLM, SamplingParams
from nanovllm.benchmark import WORKLOADS
make, cfg = WORKLOADS["w2"]
llm = LLM(sys.argv[1], enable_cascade_attention=True, **cfg)
prompts, params = make()
llm.generate(["Benchmark: "], SamplingParams(max_tokens=8), use_tqdm=False)
seqs = [llm.make_sequence(p, sp) for p, sp in zip(prompts, params)]
for s in seqs:
    llm.add_sequence(s)
pr = cProfile.Profile()
t = time.perf_counter()
pr.enable()
while llm.stats["decode_steps"] == 0 or llm.in_flight is None or llm.in_flight.is_prefill:
    llm.step()
pr.disable()
print("prefill wall (profiled)", time.perf_counter() - t)
out = io.StringIO()
pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(25)
print(out.getvalue()[:5000])
