"""Runnable op benchmark report: `python bench/report.py [--quick]` prints a markdown table.

Every op of a shape is timed interleaved with a plain copy of the same tensor (round-robin
repetitions in one process, median of each), so the copy's GB/s is the bandwidth that the
machine gives at that moment, and each kernel is reported as a fraction of it.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import lrfluct_fast as lf
from ops_cases import BACKENDS, CUDA_BACKENDS, OPS, SHAPES, make_case


def time_interleaved(cases: dict, repeats: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = {name: [] for name in cases}
    for fn, _ in cases.values():
        fn()  # warm-up: allocation, first-touch page faults, Triton compilation
    for _ in range(repeats):
        for name, (fn, _) in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest shapes, fewer repeats")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", default=None, help="RxN ... (default: 1024x1024 4096x4096 4096x8192)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes
              else SHAPES[:1] if args.quick else SHAPES)
    where = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# lrfluct_fast op benchmark ({datetime.date.today()}, {where}, torch {torch.__version__}, "
          f"{args.device} backend {lf.backend(args.device)}, {args.dtype})\n")
    print("| shape | op | backend | median ms | GB/s | of copy GB/s | speed-up vs torch |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        big = shape[0] * shape[1] > 2**22
        for op in [op for op in OPS if op != "copy"]:
            cases = {"copy": make_case("copy", "cpp", shape, dtype, args.device)}
            for backend in (CUDA_BACKENDS if args.device == "cuda" else BACKENDS):
                if backend in ("cpp", "triton") and lf.backend(args.device) != backend:
                    continue
                case = make_case(op, backend, shape, dtype, args.device)
                if case is not None:
                    cases[backend] = case
            repeats = 20 if args.device == "cuda" else 3 if big or args.quick else 10
            t = time_interleaved(cases, repeats, args.device)
            copy_gbs = cases["copy"][1] / t["copy"] / 1e9
            for name, (_, nbytes) in cases.items():
                gbs = nbytes / t[name] / 1e9
                speedup = f"{t['torch'] / t[name]:.1f}x" if "torch" in t else ""
                label = "copy" if name == "copy" else op
                print(f"| {shape[0]}x{shape[1]} | {label} | {'-' if name == 'copy' else name} | "
                      f"{t[name] * 1e3:.2f} | {gbs:.1f} | {gbs / copy_gbs:.0%} | {speedup} |")


if __name__ == "__main__":
    main()
