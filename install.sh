#!/usr/bin/env bash
# Installs lrfluct_fast and what its tests and benchmarks need, in the current Python.
# torch is installed only where none is: an existing torch (e.g. a CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==${LRFLUCT_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q setuptools wheel ninja
# --no-build-isolation: build the C++ extension against the torch installed above.
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
"$PY" -m lrfluct_fast.cli info
