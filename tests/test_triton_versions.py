"""The Triton kernels' interpreter tests under triton 3.6, the version of the GPU machines.

triton 3.6's interpreter, with numpy 2.4, cannot take a runtime loop bound in range() (the
kernels loop with `while` when INTERPRETED): this runs tests/test_ops.py's Triton cases with
the triton that install.sh puts in .triton-3.6/, in a fresh interpreter (the triton version is
fixed when triton is imported).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRITON_36 = ROOT / ".triton-3.6"


def test_interpreter_cases_pass_with_triton_3_6():
    if not (TRITON_36 / "triton").is_dir():
        pytest.skip(f"triton 3.6 not in {TRITON_36.name}/ (bash install.sh puts it there)")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(TRITON_36), str(ROOT),
                                                      os.environ.get("PYTHONPATH")) if p))
    code = "import triton, sys; sys.exit(0 if triton.__version__.startswith('3.6') else 1)"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0, "not triton 3.6"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_ops.py",
         "-k", "triton", "--deselect", "tests/test_ops.py::test_batch_stats_large"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1]
