"""How sensitive tests/test_gpu_host_tier.py's bf16 greedy comparison is to rounding, on the CPU: its workload
(eight 300-token system prompts, 4 requests each, twice, 64 GPU pages) with the torch backend in bf16, host tier
off vs on, counting requests whose tokens differ. An optional perturbation moves a fraction of the outputs of
GEMMs of <= 16 rows one bf16 ulp (standing in for another kernel's rounding at few rows, e.g. tinygemm2's).

    python scripts/host_tier_near_ties.py [FRACTION]      # FRACTION of those outputs moved, default 0

Session 16 (2-core CPU machine): 8 of 64 requests differ with no perturbation, 14 of 64 with 0.05. The two runs
batch differently, and in bf16 that alone flips greedy picks at this random model's near-ties. The GPU test allows
2 (FlashInfer + cuBLAS meet it; 6 and 8 with tinygemm2 on, session 16 calls f and g)."""
import os
import random
import sys
import tempfile

import torch

import nanovllm.layers.linear as linear_module
from nanovllm import LLM, SamplingParams
from nanovllm.layers.decode_gemm import linear
from nanovllm.tools.make_model import make_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_gpu_host_tier import tenants  # noqa: E402  (the GPU test's prompts)


def main():
    fraction = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0

    def perturbed(x, w, b=None):
        y = linear(x, w, b)
        if fraction > 0 and x.dim() == 2 and x.shape[0] <= 16 and y.dtype == torch.bfloat16:
            moved = torch.rand(y.shape, generator=torch.Generator().manual_seed(y.numel())) < fraction
            y = torch.where(moved, (y.view(torch.int16) + 1).view(torch.bfloat16), y)   # one ulp away
        return y

    linear_module.linear = perturbed   # what Linear.forward calls
    path = make_model("qwen3-tiny", os.path.join(tempfile.gettempdir(), "nanovllm-near-ties-tiny128"), seed=0,
                      dtype="bfloat16", hidden_size=256, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=128, intermediate_size=512, num_hidden_layers=3, initializer_range=0.1)
    kw = dict(max_model_len=512, max_num_seqs=8, num_kvcache_blocks=64, attention_backend="torch",
              dtype="bfloat16", enforce_eager=True)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    results = {}
    for host in (0, 0.05):
        llm = LLM(path, host_kvcache_gb=host, **kw)
        results[host] = [o["token_ids"] for _ in range(2) for o in llm.generate(tenants(), sp, use_tqdm=False)]
        llm.close()
    differ = sum(a != b for a, b in zip(results[0], results[0.05]))
    print(f"fraction moved {fraction}: {differ} of {len(results[0])} requests differ with the host tier")


if __name__ == "__main__":
    main()
