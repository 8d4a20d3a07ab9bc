#!/usr/bin/env bash
# The shipped digits model's int8 and fp16 variants, with their reports (models/digits/variants/).
# Run from the repository root with the dev environment: scripts/make_digits_variants.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/digits/variants
mkdir -p "$out"
for spec in int8:int8-dynamic fp16:fp16; do
  name=${spec%%:*}
  mode=${spec#*:}
  .venv/bin/edge-agent optimize models/digits/1/model.onnx --mode "$mode" \
    --out "$out/$name.onnx" --validation models/digits/validation.npz \
    --report "$out/$name.report.json" --max-accuracy-drop 0.01
done
