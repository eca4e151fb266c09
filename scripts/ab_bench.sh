#!/usr/bin/env bash
# Same-machine before/after: bench.py workloads in two source trees, alternating per workload, on one GPU.
#   mkdir _before && git archive <commit> | tar -x -C _before     (here; then carry "_before" to the device)
#   source .devkit/setup.sh && A=_before B=. bash scripts/ab_bench.sh w1 w2 w2+cascade w3 w3+cascade w4
# "wN+cascade" adds --enable-cascade-attention (w4 is w1 with cascade on). Rows append to $OUT/ab.jsonl
# with the tree in "tree"; a table prints last.
set -uo pipefail
out=${OUT:-/tmp/ab}; mkdir -p "$out"
a=${A:-_before}; b=${B:-.}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m nanovllm.tools.make_model --preset qwen3-0.6b --out /tmp/ab_model >/dev/null
for w in "$@"; do
  name=${w%+cascade}; extra=(); [[ $w == *+cascade ]] && extra=(--enable-cascade-attention)
  for tree in "$a" "$b"; do
    (cd "$tree" && PYTHONPATH=$PWD:${PYTHONPATH:-} python3 bench.py --model /tmp/ab_model --workload "$name" "${extra[@]}" \
        --json "$out/ab_$(basename "$(realpath "$tree")").jsonl" 2>&1 | grep -E "tok/s|rror" | tail -2 | sed "s|^|$tree: |")
  done
done
