#!/usr/bin/env bash
# The CUDA checks, on a machine with an NVIDIA GPU, CUDA 13 / cuDNN 9 libraries (nvidia-* wheels)
# and no package index: the wheels arrive beforehand in .whl/ (small ones) and as parts of
# onnxruntime-gpu in .ortgpu/ (joined here). Results go to $OUT (default ./gpu-check-out).
#
#   scripts/gpu_check.sh stash    # move .ortgpu/* aside to /tmp/ortparts (between transfers)
#   scripts/gpu_check.sh env      # install, print what the machine has
#   scripts/gpu_check.sh run      # install, GPU + lifecycle + serving tests, swap benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT" /tmp/ortparts
if compgen -G ".ortgpu/*" >/dev/null; then mv .ortgpu/* /tmp/ortparts/; fi
[ "${1:-}" = stash ] && { ls -la /tmp/ortparts; exit 0; }

install() {
    local wheel=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    [ -f "$wheel" ] || cat /tmp/ortparts/part_* >"$wheel"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl "$wheel" || exit 1
    export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
    export PYTHONUNBUFFERED=1
}

install
nvidia-smi -L
python3 - <<'EOF'
import sys, google.protobuf, grpc, onnxruntime as ort
print(sys.version.split()[0], "protobuf", google.protobuf.__version__, "grpcio", grpc.__version__)
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
import edge_agent.agent  # noqa: F401  (stubs import against this protobuf)
EOF
[ "${1:-}" = env ] && exit 0

python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_lifecycle.py \
    tests/test_serving.py -k "not in_flight_finish" 2>&1 | tee "$OUT/pytest.txt" | tail -15
python3 benchmarks/swap.py --provider cuda --out "$OUT/swap_cuda.json" 2>&1 \
    | tee "$OUT/swap_cuda.txt" | tail -6
