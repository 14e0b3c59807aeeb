"""The GPU check, in one run that fits a few minutes on a fresh GPU machine.

    python bench/gpu_check.py --out "$OUT"          # on the GPU machine, from the repo root
    python bench/gpu_check.py --smoke --out /tmp/g  # anywhere: tiny sizes on CPU, no timing goals

Installs nothing and needs no install of the package: it runs from the checkout. The C++
extension is optional: CUDA tensors use the Triton kernels either way, but with it eager layers
observe through the C++ Observer (the path a `bash install.sh` user runs), without it through
the Python function. Carry a `lrfluct_fast/_C*.so` built for the machine's Python and torch, or
pass --build-cpp to build it there first (about a minute on many cores). Everything it writes
goes under --out:
  env.txt        date, device, torch and triton versions, whether the C++ extension loads
  build.txt      with --build-cpp, where the extension did not load: its build log
  tests.txt      the CUDA tests first (tests/test_cuda.py: the monitor against the float64
                 reference, graph capture, reduce-overhead compile, overlap_weights)
  ops.txt        the op harness's Triton cases on CUDA copies (tests/test_ops.py -k triton;
                 pytest-xdist's workers where it is installed)
  kernels.md     each op's GB/s against a copy of the same tensor, timed with CUDA events
                 (median of 20), at GPT-2-medium's shapes (8 x 1024 tokens: d 1024, qkv 3072,
                 fc 4096) and the 50257-wide head, bf16; the temporal update over
                 GPT-2-medium's parameter list. Goal: >= 80% of copy.
  bench/         `lrfluct bench --model gpt2-medium` in bf16: none, a plain twin (the noise
                 floor), lrfluct, lrfluct without weights, hook-streaming (no float64
                 snapshots at that size). Goal: lrfluct without weights <= +2%.
  summary.md     the goals, met or not, and where each number came from
Each stage has its own time limit; a stage that fails or runs out of time is reported and the
next one still runs. With --smoke the test stages only collect their tests (the interpreter
would need minutes): that checks they import on the machine's versions.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's package: nothing is installed on the GPU machine


def _run(cmd, out_path, timeout, env=None):
    """Run cmd from the repo root, its output to out_path; (return code, seconds)."""
    t = time.time()
    with open(out_path, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[stopped after {timeout} s]\n")
            rc = 124
    return rc, time.time() - t


def _cpp_status() -> str:
    """"loaded", or why the C++ extension does not load, asked of a fresh interpreter."""
    code = "from lrfluct_fast._backend import cpp_error; print(cpp_error() or 'loaded')"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines() or ["?"]
    return lines[-1] if done.returncode == 0 else f"the package does not import: {lines[-1]}"


def _event_time(fn, device, repeats=20):
    """Median seconds of fn, by CUDA events (wall clock on CPU, for --smoke)."""
    fn()  # warm-up: Triton compilation, allocation
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def gpt2_medium_parameter_shapes(d=1024, blocks=24, vocab=50257, positions=1024):
    shapes = [(vocab, d), (positions, d), (d,), (d,)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d),
                   (4 * d,), (d, 4 * d), (d,)]
    return shapes


def kernels(device, smoke):
    from lrfluct_fast import ops
    dtype = torch.bfloat16
    rows = 64 if smoke else 8 * 1024
    widths = [8, 24, 32, 403] if smoke else [1024, 3072, 4096, 50257]
    lines = ["| shape | op | ms | GB/s | copy GB/s | of copy |", "|---|---|---|---|---|---|"]
    worst = 1.0
    for n in widths:
        x = torch.randn(rows, n, device=device).to(dtype)
        dst = torch.empty_like(x)
        counts = torch.zeros(3, n, dtype=torch.int64, device=device)
        moments = torch.zeros(3, n, dtype=ops.STATS_DTYPE, device=device)
        t_copy = _event_time(lambda: dst.copy_(x), device)
        t_op = _event_time(lambda: ops.accumulate_stats(x, counts, moments), device)
        copy_gbs, op_gbs = 2 * x.nbytes / t_copy / 1e9, x.nbytes / t_op / 1e9  # the op reads x once
        worst = min(worst, op_gbs / copy_gbs)
        lines.append(f"| {rows}x{n} bf16 | accumulate_stats | {t_op * 1e3:.3f} | {op_gbs:.0f} | "
                     f"{copy_gbs:.0f} | {op_gbs / copy_gbs:.0%} |")
    shapes = gpt2_medium_parameter_shapes(*((8, 2, 50, 16) if smoke else ()))
    values = [torch.randn(s, device=device) for s in shapes]
    state = [list(x) for x in zip(*(ops.new_state(v) for v in values))]
    copies = [torch.empty_like(v) for v in values]
    numel = sum(v.numel() for v in values)
    t_copy = _event_time(lambda: torch._foreach_copy_(copies, values), device)
    t_op = _event_time(lambda: ops.temporal_update(values, *state), device)
    copy_gbs, op_gbs = 8 * numel / t_copy / 1e9, 24 * numel / t_op / 1e9  # 24 B/element, steady
    worst_update = op_gbs / copy_gbs
    lines.append(f"| GPT-2-medium parameters ({len(values)} tensors, {numel / 1e6:.0f}M) fp32 | "
                 f"temporal_update | {t_op * 1e3:.3f} | {op_gbs:.0f} | {copy_gbs:.0f} | "
                 f"{worst_update:.0%} |")
    return lines, min(worst, worst_update)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script runs")
    p.add_argument("--skip-tests", action="store_true", help="leave out the test stage")
    p.add_argument("--build-cpp", action="store_true",
                   help="build the C++ extension in place first, where it does not load")
    args = p.parse_args()
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke to try the script on CPU)", file=sys.stderr)
        return 2
    summary = [f"# GPU check ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", ""]

    env = [f"date {datetime.datetime.now(datetime.timezone.utc).isoformat()}",
           f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (smoke)'}",
           f"torch {torch.__version__}"]
    try:
        import triton
        env.append(f"triton {triton.__version__}")
    except ImportError as e:
        env.append(f"triton not importable: {e}")
    cpp = _cpp_status()
    if args.build_cpp and cpp != "loaded":
        rc, secs = _run([sys.executable, "setup.py", "build_ext", "--inplace"],
                        os.path.join(args.out, "build.txt"), timeout=180,
                        env={**os.environ, "MAX_JOBS": str(os.cpu_count() or 1)})
        env.append(f"C++ extension build: {'done' if rc == 0 else f'FAILED (rc {rc})'} in {secs:.0f} s, build.txt")
        cpp = _cpp_status()
    env.append(f"C++ extension: {cpp} (eager observation: "
               f"{'the C++ Observer' if cpp == 'loaded' else 'the Python function'})")
    with open(os.path.join(args.out, "env.txt"), "w") as f:
        f.write("\n".join(env) + "\n")
    summary += [f"- {line}" for line in env]

    def pytest_stage(name, out_name, args_, timeout):
        """One pytest run (collection only with --smoke), its line in the summary."""
        cmd = [sys.executable, "-m", "pytest", "-q", "--maxfail=5", "-p", "no:cacheprovider", *args_]
        rc, secs = _run(cmd + (["--collect-only"] if args.smoke else []),
                        os.path.join(args.out, out_name), timeout=timeout)
        what = "collected" if args.smoke else "passed"
        summary.append(f"- {name}: {what if rc == 0 else f'FAILED (rc {rc})'} in {secs:.0f} s, {out_name}")

    if not args.skip_tests:
        pytest_stage("CUDA tests (tests/test_cuda.py)", "tests.txt", ["tests/test_cuda.py"], 100)

    t = time.time()
    try:
        lines, worst = kernels(device, args.smoke)
        with open(os.path.join(args.out, "kernels.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        summary.append(f"- kernels: worst {worst:.0%} of copy bandwidth (goal >= 80%) in "
                       f"{time.time() - t:.0f} s, kernels.md")
    except Exception as e:  # the next stage still runs
        summary.append(f"- kernels: FAILED ({type(e).__name__}: {e})")

    if not args.skip_tests:
        workers = ["-n", "4"] if importlib.util.find_spec("xdist") and not args.smoke else []
        pytest_stage("op harness on the device (tests/test_ops.py -k triton)", "ops.txt",
                     [*workers, "-k", "triton", "tests/test_ops.py"], 40)

    model = "mlp" if args.smoke else "gpt2-medium"
    steps = ["--steps", "2", "--warmup", "0"] if args.smoke else ["--steps", "15", "--warmup", "3"]
    rc, secs = _run([sys.executable, "-m", "lrfluct_fast.cli", "bench", "--device", device,
                     "--model", model, *steps, "--modes", "none-twin", "lrfluct",
                     "lrfluct-no-weights", "hook-streaming", "--out", os.path.join(args.out, "bench")],
                    os.path.join(args.out, "bench.txt"), timeout=75)
    summary.append(f"- {model} overhead (`lrfluct bench`): {'done' if rc == 0 else f'FAILED (rc {rc})'} "
                   f"in {secs:.0f} s, bench/bench.md (goal: lrfluct-no-weights <= +2%, read against "
                   f"none-twin's noise floor)")
    summary.append(f"- whole check: {time.time() - started:.0f} s")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
