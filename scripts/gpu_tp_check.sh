#!/usr/bin/env bash
# Tensor parallelism on a two-GPU machine, in parts that each fit one device call (from the repo root):
#   source .devkit/setup.sh && PART=tests bash scripts/gpu_tp_check.sh    # step channel, all-reduce table, TP tests
#   source .devkit/setup.sh && PART=8b bash scripts/gpu_tp_check.sh       # Qwen3-8B shapes: W1, W2 at TP=1 and TP=2
#   source .devkit/setup.sh && PART=32b bash scripts/gpu_tp_check.sh      # Qwen3-32B shapes at TP=2
# Results append to $OUT/bench.jsonl; the table of every run so far prints last. NVLink multicast stays off.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
out=${OUT:-/tmp/gpu_tp}
mkdir -p "$out"
# FlashInfer's trtllm_comm module (the default all-reduce's small sizes), if carried: ~4-5 minutes to build
# otherwise. Carried as an AOT module (flashinfer/data/aot/trtllm_comm/trtllm_comm.so, loaded without a ninja
# check; a JIT cache directory built under another workspace path is rebuilt): make the tarball from a build
# on a one-GPU machine with
#   python3 -c "from flashinfer.jit import comm; comm.gen_trtllm_comm_module().build_and_load()"
#   mkdir -p a/flashinfer/data/aot/trtllm_comm && cp $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/*/*/cached_ops/trtllm_comm/trtllm_comm.so a/flashinfer/data/aot/trtllm_comm/
#   tar cJf $OUT/trtllm_comm_aot.tar.xz -C a flashinfer      # ~4 MB; copy it into .devkit/
# (an AOT module is loaded without any check: rebuild the tarball whenever the FlashInfer wheel changes)
[[ -f .devkit/trtllm_comm_aot.tar.xz && -d /tmp/site/flashinfer ]] && tar xJf .devkit/trtllm_comm_aot.tar.xz -C /tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() { python3 bench.py "$@" --json "$out/bench.jsonl" 2>&1 | grep -E "tok/s|Error|error" | tail -3; }
case ${PART:-tests} in
  tests)
    python3 scripts/bench_step_channel.py --iters 300 2>&1 | tee "$out/channel.md" | tail -6
    timeout 240 python3 scripts/bench_allreduce.py --budget 200 --out "$out/allreduce.json" 2>&1 | tee "$out/allreduce.log" | tail -40
    python3 -m pytest -q -m gpu -rA -s tests/test_gpu_tp.py tests/test_custom_all_reduce.py tests/test_copy_engine_all_reduce.py 2>&1 | tee "$out/gpu_tp_tests.log" \
      | grep -E "passed|failed|PASSED|FAILED|Error|vs TP|custom" | tail -30 ;;
  8b)
    for tp in 1 2; do bench --preset qwen3-8b --workload w1 --tensor-parallel-size $tp; done
    for tp in 2 1; do
      bench --preset qwen3-8b --workload w2 --tensor-parallel-size $tp
      bench --preset qwen3-8b --workload w2 --tensor-parallel-size $tp --enable-cascade-attention
    done ;;
  32b)
    bench --preset qwen3-32b --workload w1 --tensor-parallel-size 2
    bench --preset qwen3-32b --workload w2 --tensor-parallel-size 2
    bench --preset qwen3-32b --workload w2 --tensor-parallel-size 2 --enable-cascade-attention ;;
esac
python3 - "$out/bench.jsonl" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
print(f"\n{'model':10} {'workload':8} {'tp':>2} {'cascade':7} {'out tok':>8} {'sec':>7} {'tok/s':>8} {'decode%':>7} {'cached':>9} {'casc st':>7} {'peak':>5} {'leak':>4}")
for r in rows:
    print(f"{r['model']:10} {r['workload']:8} {r.get('tp', 1):>2} {str(r['cascade']):7} {r['output_tokens']:8} {r['seconds']:7.2f} "
          f"{r['output_tok_s']:8.0f} {100*r['decode_share']:6.1f}% {r['cached_prompt_tokens']:>9} {r['cascade_steps']:>7} "
          f"{r.get('peak_gpu_mem_frac', 0):5.2f} {r['leaked_blocks']:>4}")
PY
