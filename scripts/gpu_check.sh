#!/usr/bin/env bash
# Everything GPU in one call, on the GPU machine (from the repo root):
#   source .devkit/setup.sh && bash scripts/gpu_check.sh            # tests + all benchmarks
#   TESTS=0 BENCH="w1 w1-eager" bash scripts/gpu_check.sh            # a subset
#   TESTS=0 BENCH="w6 w6-lpm w6-host w6-host-lpm w6-host-nobg" bash scripts/gpu_check.sh   # W6: GPU-only fcfs / lpm, host tier fcfs / lpm /
#                                                                     # without prefetch + write-ahead (not in the default set)
#   TESTS=0 BENCH="w5 w5-cascade" bash scripts/gpu_check.sh          # W5, long shared documents (not in the default set)
#   TESTS=0 BENCH="w1-fp8 w1-fp8-triton w1-fp8-flashinfer w2-cascade-fp8 w2-cascade-fp8-triton w5-cascade-fp8" bash scripts/gpu_check.sh
#                                                                     # fp8 KV cache: regular decode on xqa (default, needs
#                                                                     # scripts/devkit_xqa.sh), Triton or FlashInfer; cascade's
#                                                                     # per-request level on Triton too
# Runs the GPU tests (pytest -m gpu), then bench.py on random-weight Qwen3-0.6B, prints a table, and
# last each run's fraction of its floor (scripts/roofline.py, H200 rates).
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
bash scripts/devkit_xqa.sh --install     # xqa's sources (fp8-KV decode), when .devkit carries them
model=/tmp/qwen3-0.6b
[[ -f $model/config.json ]] || python3 -m nanovllm.tools.make_model --preset qwen3-0.6b --out $model >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [[ ${TESTS:-1} == 1 ]]; then
  python3 -m pytest -q -m gpu -rA -s tests/test_gpu.py tests/test_triton_kv.py tests/test_qk_norm_rope.py tests/test_sample_kernel.py tests/test_triton_decode.py tests/test_shared_kernel.py tests/test_llama.py tests/test_qwen3_moe.py tests/test_sampling_controls.py tests/test_gpu_host_tier.py tests/test_awq.py tests/test_fp8_kv.py tests/test_split_level.py tests/test_awq_kpack.py tests/test_xqa_decode.py tests/test_decode_gemm.py tests/test_prefill_pieces.py 2>&1 | tee "$out/gpu_tests.log" | grep -E "passed|failed|PASSED|FAILED|Error|divergence" | tail -40
fi
declare -A ARGS=(
  [w1]="--workload w1" [w1-eager]="--workload w1 --enforce-eager"
  [w2]="--workload w2" [w2-cascade]="--workload w2 --enable-cascade-attention"
  [w3]="--workload w3" [w3-cascade]="--workload w3 --enable-cascade-attention"
  [w4]="--workload w4"
  [w5]="--workload w5" [w5-cascade]="--workload w5 --enable-cascade-attention"
  [w6]="--workload w6" [w6-host]="--workload w6 --host-kv-cache-gb 64"
  [w6-host-lpm]="--workload w6 --host-kv-cache-gb 64 --schedule-policy lpm"
  [w6-lpm]="--workload w6 --schedule-policy lpm"
  [w6-host-nobg]="--workload w6 --host-kv-cache-gb 64 --no-host-kv-prefetch --no-host-kv-write-ahead"
  [w1-triton]="--workload w1 --decode-attention-kernel triton"
  [w1-fp8]="--workload w1 --kv-cache-dtype fp8_e4m3"
  [w1-fp8-triton]="--workload w1 --kv-cache-dtype fp8_e4m3 --decode-attention-kernel triton"
  [w1-fp8-flashinfer]="--workload w1 --kv-cache-dtype fp8_e4m3 --decode-attention-kernel flashinfer"
  [w2-cascade-fp8]="--workload w2 --enable-cascade-attention --kv-cache-dtype fp8_e4m3"
  [w2-cascade-fp8-triton]="--workload w2 --enable-cascade-attention --kv-cache-dtype fp8_e4m3 --decode-attention-kernel triton"
  [w3-cascade-fp8]="--workload w3 --enable-cascade-attention --kv-cache-dtype fp8_e4m3"
  [w5-cascade-fp8]="--workload w5 --enable-cascade-attention --kv-cache-dtype fp8_e4m3"
  [w5-cascade-fp8-triton]="--workload w5 --enable-cascade-attention --kv-cache-dtype fp8_e4m3 --decode-attention-kernel triton"
)
for name in ${BENCH-w1 w1-eager w2 w2-cascade w3 w3-cascade w4}; do  # BENCH="" runs none
  python3 bench.py --model $model ${ARGS[$name]} --json "$out/bench.jsonl" 2>&1 | grep -v "^{" | tail -3
done
python3 - "$out/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
print(f"\n{'workload':8} {'cascade':7} {'eager':5} {'out tok':>8} {'sec':>7} {'tok/s':>8} {'decode%':>7} {'cached prompt':>14} {'casc steps':>10} {'peak mem':>8} {'leak':>4} {'kv':>9} {'decode':>10}")
for r in rows:
    print(f"{r['workload']:8} {str(r['cascade']):7} {str(r['enforce_eager']):5} {r['output_tokens']:8} {r['seconds']:7.2f} "
          f"{r['output_tok_s']:8.0f} {100*r['decode_share']:6.1f}% {r['cached_prompt_tokens']:>14} {r['cascade_steps']:>10} "
          f"{r.get('peak_gpu_mem_frac', 0):8.3f} {r['leaked_blocks']:>4} {r.get('kv_cache_dtype', 'auto'):>9} "
          f"{r.get('decode_attention_kernel', 'auto'):>10}")
PY
for w in w1 w2 w3 w4 w5; do
  for c in "" --no-cascade; do
    for kv in auto fp8; do   # fp8 runs against the fp8 floor (half the KV bytes)
      [[ -f $out/bench.jsonl ]] && grep "\"workload\": \"$w\"" "$out/bench.jsonl" | grep -q "\"kv_cache_dtype\": \"$([[ $kv == fp8 ]] && echo fp8_e4m3 || echo auto)\"" && \
        python3 scripts/roofline.py --model $model --workload $w $c --kv-cache-dtype $kv --bench "$out/bench.jsonl" | grep -v "^{"
    done
  done
done
