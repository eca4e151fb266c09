"""Are the small-batch kernels' greedy differences rounding or a race? On the GPU machine:

    python scripts/small_batch_determinism.py [--runs 3]

Builds tests/test_llama.py's llama3-tiny model (random bf16 weights, head_dim 128) and generates its 8 prompts x
40 greedy tokens with a fresh engine per run, in three settings: both small-batch kernels off (the reference
here: NANOVLLM_DECODE_GEMM=cublas NANOVLLM_TRITON_SMALL_ROWS=0), tinygemm2 only (layers/decode_gemm.py) and the
Triton decode for <= 16 rows only (attention/flashinfer_backend.py); both are on by default. Each setting runs in
its own process (the switches are read at import) `--runs` times. Prints, per setting, whether its runs are
identical to each other (a race would show as run-to-run differences; CUDA graphs and these kernels are otherwise
deterministic) and how many outputs differ from the first setting's first run, with the logit gap (the reference's best
minus the pick, from the torch backend in float32 on the same weights) where each first differs: gaps near bf16
rounding are near-ties, large ones are faults. Session 17 call h (before both became the default): every setting
identical run to run, and each switch's outputs equal to both-off's (claude_docs/performance.md, "Session 17")."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

SETTINGS = {"off": {"NANOVLLM_DECODE_GEMM": "cublas", "NANOVLLM_TRITON_SMALL_ROWS": "0"},
            "tinygemm": {"NANOVLLM_DECODE_GEMM": "tinygemm", "NANOVLLM_TRITON_SMALL_ROWS": "0"},
            "triton-small": {"NANOVLLM_DECODE_GEMM": "cublas", "NANOVLLM_TRITON_SMALL_ROWS": "16"}}


def model_path() -> str:
    from nanovllm.tools.make_model import make_model
    path = os.path.join(tempfile.gettempdir(), "nanovllm-determinism-llama3-tiny")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_model("llama3-tiny", path, seed=0, dtype="bfloat16", hidden_size=256, num_attention_heads=8,
                   head_dim=128, intermediate_size=512, initializer_range=0.02)
    return path


def prompts():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_llama import random_prompts
    return random_prompts(2, [5, 17, 33, 64, 100, 129, 250, 400])


def generate(runs: int) -> None:
    """Child process: `runs` fresh engines under this process's switches; JSON lists of token ids on stdout."""
    from nanovllm import LLM, SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = []
    for _ in range(runs):
        llm = LLM(model_path(), dtype="bfloat16", max_model_len=1024, max_num_seqs=64, num_kvcache_blocks=2048)
        out.append([o["token_ids"] for o in llm.generate(prompts(), sp, use_tqdm=False)])
        llm.close()
        del llm
    print("RESULT " + json.dumps(out))


def gaps(reference_runs, other, prompt_list):
    """For each output of `other` that differs from the reference's: the float32 logit gap where it parts."""
    import torch
    from nanovllm import LLM, SamplingParams
    ref = LLM(model_path(), attention_backend="torch", enforce_eager=True, dtype="float32", max_model_len=1024,
              num_kvcache_blocks=2048)
    found = []
    for prompt, a, b in zip(prompt_list, other, reference_runs):
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is None:
            continue
        out = ref.generate([prompt + b[:d]], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                                              logprobs=20), use_tqdm=False)[0]
        top = out["logprobs"][0] if out.get("logprobs") else {}
        lp = {int(k): float(v) for k, v in top.items()} if isinstance(top, dict) else {}
        gap = (max(lp.values()) - lp[a[d]]) if lp and a[d] in lp else float("nan")
        found.append((d, round(gap, 4)))
    ref.close()
    del ref, torch
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return generate(args.runs)
    results = {}
    for name, env in SETTINGS.items():
        proc = subprocess.run([sys.executable, __file__, "--child", "--runs", str(args.runs)], capture_output=True,
                              text=True, env={**os.environ, **env})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        results[name] = json.loads(line[len("RESULT "):])
    if "off" not in results:
        return
    base = results["off"][0]
    prompt_list = prompts()
    for name, runs in results.items():
        same = all(r == runs[0] for r in runs)
        differ = sum(a != b for a, b in zip(runs[0], base))
        print(f"{name}: runs identical to each other: {same}; outputs differing from both-off's: {differ} of "
              f"{len(base)}; (token index, logprob gap) where they part: {gaps(base, runs[0], prompt_list)}")


if __name__ == "__main__":
    main()
