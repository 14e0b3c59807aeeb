"""Compile every Triton kernel of lrfluct_fast for NVIDIA sm_90 (Hopper) without a GPU.

    python tests/triton_sm90_compile.py OUT.json      (TRITON_INTERPRET must be unset)

Run by tests/test_triton_sm90.py in a fresh interpreter, because the interpreter/compiler choice
is made when triton is imported and tests/conftest.py sets TRITON_INTERPRET=1 on CPU machines.
Importing this module is cheap (no torch, no triton): the test takes CASES from it.

How a launch becomes a compile, with the package's own launchers (ops.TRITON_IMPLS) on small CPU
tensors and the package's GPU launch settings:
- a stub driver is made triton's active driver before anything asks for one: it reports
  GPUTarget("cuda", 90, 32) (an H200), device 0 and stream 0, and refuses anything else;
- JITFunction.run is wrapped to pass warmup=True: triton binds and specializes the arguments as
  for a launch (dtypes, 16-byte alignment, integers equal to 1), runs the real NVIDIA pipeline
  ttir -> ttgir -> llir -> ptx -> cubin (bundled ptxas) and returns before loading or launching;
- lrfluct_fast's device check is told CPU tensors may launch (`require`), and its SM count is
  that of an H200 (132), so launch_config picks the block sizes and grids of the real GPU.
The C++ extension is not loaded (LRFLUCT_DISABLE_CPP=1): it plays no part, and a stale build must
not stop the compile. Triton's cache goes wherever TRITON_CACHE_DIR says (the test: a fresh one).

OUT.json: {"skip": reason} when triton, its CUDA backend or ptxas is missing, else
{"triton": version, "ptxas": version, "cases": {case id: {"ok", "error", "traceback", "seconds",
"kernels"}}, "jit_functions": {name: source}}; each kernels entry is one launch: name, hash,
target, stages, PTX target, sizes, and registers and spills from ptxas -v.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
import traceback

SM = 90
WARP_SIZE = 32
H200_SMS = 132

FLOATS = ("float16", "bfloat16", "float32", "float64")
STATES = ("float32", "float64")

# (id, op, arguments). batch_stats: input dtype and layout (contiguous 300x256: stride 1 and
# aligned sizes; strided 300x37 view with column stride 2: no alignment, nothing equal to 1;
# channels [4, 48, 300]: neurons in the middle), and the large shapes. accumulate_stats: with a
# pending batch (the combine kernel's merge variants). merge_stats: float64 state. temporal_update: value dtype and state dtype (the launcher accepts
# every pair, one kernel variant each); each call holds several tensors and an empty one.
# Large shapes (x uninitialised: only its layout matters) give the looped variants a GPU runs:
# many tiles per program; their registers and spills are held to BUDGET by the test.
LARGE = {"8192x1024-bf16": ((8192, 1024), "bfloat16"), "8192x4096-bf16": ((8192, 4096), "bfloat16"),
         "65536x256-fp32": ((65536, 256), "float32"), "2048x50257-bf16": ((2048, 50257), "bfloat16"),
         "conv-64x256x56x56-bf16": ((64, 256, 3136), "bfloat16")}
REGISTER_BUDGET = 128

CASES = (
    [(f"batch_stats-{d}-{layout}", "batch_stats", {"dtype": d, "layout": layout})
     for d in FLOATS for layout in ("contiguous", "strided", "channels")]
    + [(f"batch_stats-large-{name}", "batch_stats", {"large": name}) for name in LARGE]
    + [(f"accumulate_stats-{d}-pending", "accumulate_stats", {"dtype": d}) for d in ("bfloat16", "float64")]
    + [(f"merge_stats-{s}", "merge_stats", {"state": s}) for s in ("float64",)]
    + [(f"temporal_update-{d}-{s}", "temporal_update", {"dtype": d, "state": s})
       for d in FLOATS for s in STATES]
)


def _args(op: str, spec: dict):
    """CPU arguments of one launcher call."""
    import torch
    from lrfluct_fast import ops

    g = torch.Generator().manual_seed(0)
    if op == "batch_stats" and "large" in spec:
        shape, dtype = LARGE[spec["large"]]
        return (torch.empty(shape, dtype=getattr(torch, dtype)),)
    if op == "batch_stats":
        dtype = getattr(torch, spec["dtype"])
        if spec["layout"] == "contiguous":
            x = torch.randn(300, 256, generator=g)
        elif spec["layout"] == "strided":
            x = torch.randn(300, 74, generator=g)[:, ::2]
        else:  # a conv output's channels: [B, C, H*W], the rows contiguous
            x = torch.randn(4, 48, 300, generator=g)
        return (x.to(dtype),)
    if op == "accumulate_stats":
        x = torch.randn(300, 256, generator=g).to(getattr(torch, spec["dtype"]))
        states = [ops.batch_stats_torch(x[:3]) for _ in range(3)]
        return (x, *states[0], *states[1], *states[2])
    if op == "merge_stats":
        n = 1000
        counts = torch.zeros(3, n, dtype=torch.int64)
        moments = torch.zeros(3, n, dtype=torch.float64)
        batch_counts = torch.ones(3, n, dtype=torch.int64)
        batch_moments = torch.randn(3, n, generator=g, dtype=torch.float64)
        return counts, moments, batch_counts, batch_moments
    if op == "temporal_update":
        dtype, state = getattr(torch, spec["dtype"]), getattr(torch, spec["state"])
        values = [torch.randn(s, generator=g).to(dtype) for s in ((7, 5), (0,), (1000,), (3, 2, 3))]
        # The op's arguments after `values` are the state tensors that ops.new_state makes, in
        # its order, one list each: (counts, moments) or (tally, skipped, moments, master).
        states = [ops.new_state(v, state) for v in values]
        return (values, *(list(col) for col in zip(*states)))
    raise KeyError(op)


class StubDriver:
    """Triton's active driver on a machine without a GPU: an sm_90 target, compile only."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def __getattr__(self, name):
        raise AttributeError(f"the compile-only sm_{SM} stub driver has no {name!r}: triton asked "
                             "for more than a compile (a launch, or a new driver call)")


def _skip(out: str, reason: str) -> int:
    with open(out, "w") as f:
        json.dump({"skip": reason}, f)
    return 0


def main(out: str) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them")
    os.environ["LRFLUCT_DISABLE_CPP"] = "1"
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        return _skip(out, f"triton not importable: {type(e).__name__}: {e}")
    try:
        from triton import knobs
    except ImportError as e:  # triton.knobs arrived in 3.4
        return _skip(out, f"triton {triton.__version__} is too old (no triton.knobs): {e}")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        return _skip(out, f"triton {triton.__version__} has no NVIDIA backend: {type(e).__name__}: {e}")
    try:
        import subprocess
        try:  # the ptxas triton runs for sm_90 (3.9: the bundled CUDA 13 one, "ptxas-blackwell")
            from triton.backends.nvidia.compiler import get_ptxas
            ptxas = get_ptxas(SM).path
        except (ImportError, TypeError):
            ptxas = knobs.nvidia.ptxas.path
        ptxas_version = subprocess.run([ptxas, "--version"], capture_output=True, text=True,
                                       check=True, timeout=60).stdout.strip().splitlines()[-1]
    except Exception as e:  # noqa: BLE001  (missing, not executable, wrong architecture...)
        return _skip(out, f"triton {triton.__version__}: its ptxas does not run here: "
                          f"{type(e).__name__}: {e}")

    target = GPUTarget("cuda", SM, WARP_SIZE)
    driver.set_active(StubDriver(target))

    launches: list = []
    ptxas_info: dict = {}  # kernel hash -> registers and spills, from the ptxas -v log triton prints
    knobs.nvidia.dump_ptxas_log = True
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None and kernel.hash not in ptxas_info:
            ptxas_info[kernel.hash] = _parse_ptxas_log(log.getvalue())
        launches.append((self, kernel, ptxas_info.get(getattr(kernel, "hash", None))))
        return kernel

    JITFunction.run = compile_only

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "C++ extension not available"
        import lrfluct_fast  # noqa: F401
    from lrfluct_fast import ops
    from lrfluct_fast.ops import _triton_config as tcfg

    tcfg.require = lambda device: None  # CPU tensors stand for the GPU's
    tcfg._sm_count = lambda device: H200_SMS
    assert not tcfg.INTERPRET

    cases = {}
    for case, op, spec in CASES:
        start = time.perf_counter()
        del launches[:]
        result = {"ok": False, "error": None, "kernels": []}
        try:
            ops.TRITON_IMPLS[op](*_args(op, spec))
            result["ok"] = True
        except Exception as e:  # noqa: BLE001  (reported per case, verbatim)
            result["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
            result["traceback"] = traceback.format_exc()
        for fn, kernel, info in launches:
            result["kernels"].append({**_describe(fn, kernel), "ptxas": info})
        result["seconds"] = round(time.perf_counter() - start, 3)
        cases[case] = result

    jit_functions = {}
    for module in (sys.modules[name] for name in list(sys.modules) if name.startswith("lrfluct_fast.ops.")):
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction):
                jit_functions[name] = obj.src
    with open(out, "w") as f:
        json.dump({"triton": triton.__version__, "ptxas": ptxas_version, "cases": cases,
                   "jit_functions": jit_functions}, f, indent=1)
    return 0


def _parse_ptxas_log(log: str) -> dict | None:
    used = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not used:
        return None
    return {"registers": int(used.group(1)),
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None}


def _describe(fn, kernel) -> dict:
    if kernel is None:
        return {"name": fn.__name__, "hash": None}
    md = kernel.metadata
    target = md.target
    asm = kernel.asm
    ptx = asm.get("ptx", "")
    return {
        "name": fn.__name__,
        "hash": kernel.hash,
        "target": [target.backend, target.arch, target.warp_size],
        "num_warps": md.num_warps,
        "shared": md.shared,
        "stages": sorted(asm.keys()),
        "ptx_target": next((line.split()[1] for line in ptx.splitlines() if line.startswith(".target")), None),
        "ptx_bytes": len(ptx),
        "cubin_bytes": len(asm.get("cubin", b"")),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
