#!/usr/bin/env bash
# The CUDA checks and the GPU benchmark, on a lent machine with an NVIDIA GPU, CUDA 13
# libraries and no package index. Everything it installs travels with the working tree:
#
#   scripts/gpu_check.sh prepare   # HERE (package index reachable): the wheels the device's
#                                  # Python lacks into .whl/, onnxruntime-gpu split into
#                                  # .ortgpu/part_* (60 MiB each: a call carries 64 MiB), the
#                                  # perf_analyzer binary and its libraries into .whl/pa/
#   scripts/gpu_check.sh rehearse  # HERE, on the CPU: the same tests and benchmark with
#                                  # --provider cpu (the CUDA-only cases skip or say why)
#   scripts/gpu_check.sh stash     # ON THE DEVICE, after each carried part: move .ortgpu/* aside
#   scripts/gpu_check.sh env       # ON THE DEVICE: install, print what the machine has
#   scripts/gpu_check.sh run       # ON THE DEVICE: install, the GPU tests (strict: the CUDA
#                                  # provider must be active), then benchmarks/gpu.py; ~7 minutes
#
# Results go to $OUT (default ./gpu-check-out): pytest.txt, gpu.json, gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
PYVER=${PYVER:-3.12}  # the device image's Python
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
mkdir -p "$OUT"

# The CUDA cases of every suite: the GPU file, IOBinding / CUDA graphs, CUDA shared memory,
# perf_analyzer over CUDA shared memory, and the swaps under load.
GPU_TESTS=(tests/test_gpu.py tests/test_binding.py tests/test_shared_memory.py
           tests/test_perf_analyzer.py tests/test_lifecycle.py tests/test_serving.py)

case "${1:-}" in
prepare)
    rm -rf .whl .ortgpu && mkdir -p .whl .ortgpu .whl/pa
    # The project's runtime dependencies for the device's Python, minus onnxruntime-gpu (split
    # below) and what the image has (numpy, the CUDA libraries).
    python3 -m pip download -q --only-binary=:all: --python-version "$PYVER" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        grpcio==1.81.1 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1 \
        'protobuf>=6.33.5,<7' onnx structlog prometheus-client zstandard \
        'tritonclient[grpc]==2.50.0' cuda-python pytest pytest-asyncio || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
        --platform manylinux_2_28_x86_64 -d /tmp/ortgpu "$ORT_GPU" || exit 1
    split -b 60M /tmp/ortgpu/onnxruntime_gpu-*.whl .ortgpu/part_
    scripts/perf_analyzer --help >/dev/null 2>&1  # fills its cache
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/perf-analyzer-2.50.0
    cp "$cache/venv/bin/perf_analyzer" .whl/pa/
    cp "$cache"/libb64/root/usr/lib/x86_64-linux-gnu/libb64.so* .whl/pa/
    cp "$cache"/venv/lib/python3*/site-packages/nvidia/cuda_runtime/lib/libcudart.so* .whl/pa/
    du -sh .whl .ortgpu
    exit 0 ;;
rehearse)
    export PYTHONPATH=$PWD:$PWD/tests
    .venv/bin/python -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 \
        | tee "$OUT/pytest.txt" | tail -5
    .venv/bin/python benchmarks/gpu.py --provider cpu --quick --out "$OUT/gpu.json" \
        > "$OUT/gpu.txt" 2>&1
    tail -5 "$OUT/gpu.txt"
    exit 0 ;;
esac

mkdir -p /tmp/ortparts
if compgen -G ".ortgpu/*" >/dev/null; then mv .ortgpu/* /tmp/ortparts/; fi
[ "${1:-}" = stash ] && { ls -la /tmp/ortparts; exit 0; }

install() {
    local wheel=/tmp/onnxruntime_gpu-cp312-manylinux_2_28_x86_64.whl
    [ -f "$wheel" ] || cat /tmp/ortparts/part_* >"$wheel"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl "$wheel" || exit 1
    export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
    export PYTHONUNBUFFERED=1
    # perf_analyzer from .whl/pa (scripts/perf_analyzer uses it when this is set).
    export EA_PERF_ANALYZER_DIR=$PWD/.whl/pa
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

python3 -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}" -k "not in_flight_finish" 2>&1 \
    | tee "$OUT/pytest.txt" | tail -15
python3 benchmarks/gpu.py --provider cuda --window-ms 1000 --out "$OUT/gpu.json" 2>&1 \
    | tee "$OUT/gpu.txt" | tail -20
