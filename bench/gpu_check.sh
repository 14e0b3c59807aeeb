#!/usr/bin/env bash
# The whole GPU check in one command, output to bench/gpu_check.log (record it in RESULTS.md):
#   1. the test suite with CUDA present (Triton kernels compiled, on CUDA copies of the op
#      harness's inputs; tests/test_cuda.py: the monitor on CUDA vs the float64 reference)
#   2. kernel GB/s against the device's copy bandwidth, same run: batch_stats + merge and the
#      temporal update on a 16384x8192 bf16 tensor (target: >= 80% of copy)
#   3. end-to-end overhead of full monitoring on a GPT-2-medium-sized step in bf16 (target
#      <= 2%), against hook-streaming and hook-snapshot, interleaved in one process, and
#      lrfluct's cost split (per-neuron weights; activations and gradients only)
# Uses the installed torch (with CUDA) and triton; builds nothing that needs nvcc.
set -uo pipefail
cd "$(dirname "$0")/.."
log=bench/gpu_check.log
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m pip install -q --no-build-isolation --no-deps -e . || echo "install failed"
  python3 -m lrfluct_fast.cli info
  python3 -m pytest -q tests -x -k "not fallback_without_extension"
  (cd bench && python3 report.py --device cuda --dtype bfloat16 --shapes 16384x8192 4096x4096)
  python3 -m lrfluct_fast.cli bench --device cuda --model gpt2-medium --steps 20 --warmup 3 \
      --modes lrfluct hook-streaming hook-snapshot --out runs/gpu_bench
  python3 -m lrfluct_fast.cli bench --device cuda --model gpt2-medium --steps 20 --warmup 3 \
      --modes lrfluct lrfluct-neuron lrfluct-no-weights --out runs/gpu_bench_split
} 2>&1 | tee "$log"
