#!/usr/bin/env bash
# FlashInfer's xqa decode kernel (attention/xqa_decode.py: fp8-KV decode) builds from csrc/xqa, which the
# shared prepare.sh strips from the package it carries. Here, from the project root, once after prepare.sh:
#     bash scripts/devkit_xqa.sh          # writes .devkit/fi_src_xqa.tar.xz (~85 KB)
# On the GPU machine, after `source .devkit/setup.sh`, scripts/gpu_check.sh (or `bash scripts/devkit_xqa.sh
# --install`) unpacks it into the installed package with the package's old timestamps (no kernel rebuilds).
set -euo pipefail
FI_VERSION=${FI_VERSION:-0.7.2.post1}
if [[ ${1:-} == --install ]]; then
  if [[ -f .devkit/fi_src_xqa.tar.xz && -d /tmp/site/flashinfer && ! -d /tmp/site/flashinfer/data/csrc/xqa ]]; then
    tar xJf .devkit/fi_src_xqa.tar.xz -C /tmp/site
    find /tmp/site/flashinfer/data/csrc/xqa -exec touch -h -d '2020-01-01 00:00:00' {} +
  fi
  exit 0
fi
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "flashinfer-python==$FI_VERSION"
(cd "$tmp" && python3 -m zipfile -e flashinfer_python-*.whl pkg >/dev/null \
   && tar cJf "$OLDPWD/.devkit/fi_src_xqa.tar.xz" -C pkg flashinfer/data/csrc/xqa)
rm -rf "$tmp"
ls -la .devkit/fi_src_xqa.tar.xz
