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
# triton 3.6 (the GPU machines' version) beside the installed one, for the sm_90 compile test
"$PY" -m pip install -q --no-deps --upgrade --target .triton-3.6 "triton==3.6.0" \
  || echo "install.sh: triton 3.6 not installed; its compile test will skip"
# --no-build-isolation: build the C++ extension against the torch installed above. The test
# extras (transformers, accelerate, lightning) must not replace that torch: a constraint pins it
# (pip then stops with an error rather than install another).
TORCH_PIN=$(mktemp)
trap 'rm -f "$TORCH_PIN"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$TORCH_PIN"
"$PY" -m pip install -q --no-build-isolation -c "$TORCH_PIN" -e ".[test]"
"$PY" -m lrfluct_fast.cli info
