#!/usr/bin/env bash
# The whole test suite: C++ unit tests of the torch-free kernels and the CUDA compile check
# (CMake + ctest), then pytest (the ops on every backend that runs here, the CUDA kernels through
# the simulator in tests/cuda_sim/, gradcheck, torch.compile, memory contracts, bad input).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

echo "== C++ kernels: cmake + ctest"
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release >build/cmake-configure.log 2>&1 || { cat build/cmake-configure.log; exit 1; }
grep -E "^-- elr-ext" build/cmake-configure.log || true
cmake --build build/cmake -j "${MAX_JOBS:-2}"
ctest --test-dir build/cmake --output-on-failure

echo "== pytest"
$PY -m pytest tests -q -p no:cacheprovider "$@"
