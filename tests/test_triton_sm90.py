"""Every Triton kernel of lrfluct_fast compiles for NVIDIA sm_90 (Hopper, H200), without a GPU.

Owns: the compile check of the Triton kernels through triton's real NVIDIA pipeline
(ttir -> ttgir -> llir -> PTX -> cubin with triton's bundled ptxas) for GPUTarget("cuda", 90, 32),
driven by the package's own launchers (ops.TRITON_IMPLS) with every input and state dtype they
take, so compile errors (pointer casts, constexpr dtypes, type promotion) that Triton's
interpreter never sees fail CI. Numerics stay with tests/test_ops.py (interpreter, or GPU).

The compile runs once, in a fresh interpreter without TRITON_INTERPRET (tests/conftest.py sets it
on CPU machines, and triton reads it at import) and with an empty TRITON_CACHE_DIR, so every
variant is compiled for real: tests/triton_sm90_compile.py, whose docstring says how launches are
turned into compiles. Skips when triton, its NVIDIA backend or its ptxas is not usable here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import triton_sm90_compile as sm90

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = HERE / "triton_sm90_compile.py"

# Distinct compiled kernels (by hash) the cases must produce, so the test cannot pass vacuously:
# batch_stats 8 chunk + 4 combine, merge_stats 2, temporal_update 8 + its call-count kernel.
MIN_VARIANTS = 23


# The installed triton, and triton 3.6 (the GPU machines' version) where install.sh put it.
TRITON_36 = ROOT / ".triton-3.6"


@pytest.fixture(scope="module", params=["installed", "3.6"])
def compiled(request, tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    extra = []
    if request.param == "3.6":
        if not (TRITON_36 / "triton").is_dir():
            pytest.skip(f"triton 3.6 not in {TRITON_36.name}/ (bash install.sh puts it there)")
        extra = [str(TRITON_36)]
    tmp = tmp_path_factory.mktemp("triton_sm90")
    out = tmp / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # empty: every variant really compiles
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*extra, str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), (
        f"{SCRIPT.name} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    result = json.loads(out.read_text())
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


@pytest.mark.parametrize("case", [case for case, _, _ in sm90.CASES])
def test_compiles_for_sm90(compiled, case):
    r = compiled["cases"][case]
    assert r["ok"], f"{case} does not compile for sm_90 with triton {compiled['triton']}:\n{r['traceback']}"
    assert r["kernels"], f"{case} launched no kernel"
    for k in r["kernels"]:
        assert k["hash"] is not None, f"{k['name']}: a compile hook swallowed the compile"
        assert k["target"] == ["cuda", sm90.SM, sm90.WARP_SIZE], k
        assert k["ptx_target"] in (f"sm_{sm90.SM}", f"sm_{sm90.SM}a"), k
        assert k["ptx_bytes"] > 0 and k["cubin_bytes"] > 0, k


@pytest.mark.parametrize("case", [case for case, _, _ in sm90.CASES if "-large-" in case])
def test_large_shapes_fit_the_register_budget(compiled, case):
    # the looped variants a GPU runs: at most REGISTER_BUDGET registers (so 4 blocks of 128
    # threads fit an SM) and no spills
    for k in compiled["cases"][case]["kernels"]:
        info = k["ptxas"]
        assert info is not None, f"{k['name']}: no ptxas report"
        assert info["registers"] <= sm90.REGISTER_BUDGET and not info["spill_stores"], (
            f"{case} {k['name']} with triton {compiled['triton']}: {info}")


def test_every_kernel_compiled(compiled):
    kernels = {k["hash"]: k for r in compiled["cases"].values() for k in r["kernels"] if k["hash"]}
    assert len(kernels) >= MIN_VARIANTS, f"only {len(kernels)} kernel variants compiled"
    launched = {k["name"] for k in kernels.values()}
    sources = compiled["jit_functions"]
    assert launched <= set(sources), launched - set(sources)
    reached = set(launched)  # a @triton.jit helper is compiled inside its callers, at any depth
    while more := {name for name in set(sources) - reached
                   if any(f"{name}(" in sources[k] for k in reached)}:
        reached |= more
    unreached = sorted(set(sources) - reached)
    assert not unreached, (f"{unreached}: neither launched by a case of {SCRIPT.name} nor called "
                           f"by a launched kernel or its helpers")
    first_case = {}
    for case, r in compiled["cases"].items():
        for k in r["kernels"]:
            first_case.setdefault(k["hash"], case)
    spills = [f"{k['name']} ({first_case[h]}): {k['ptxas']['spill_stores']} bytes"
              for h, k in kernels.items() if (k.get("ptxas") or {}).get("spill_stores")]
    if spills:  # not a compile error, but worth seeing: spills on sm_90 cost bandwidth
        warnings.warn(f"triton {compiled['triton']}: register spills on sm_90: " + "; ".join(spills))
