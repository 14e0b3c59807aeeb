"""C++ batch_stats on a conv output [B, C, S]: read in place vs copied to rows first.

Times, interleaved in one process on one thread, `batch_stats(x)` on a contiguous
[B, C, S] tensor (the kernel reads runs of S values in place) against the path it replaced,
`batch_stats(x.movedim(1, 2).reshape(-1, C).contiguous())` (a transposing copy, then the
rows kernel), and the rows kernel alone on an already-transposed copy. GB/s = input bytes
per second.

    python bench/conv_layout.py [--threads 1] [--repeats 30]
"""
from __future__ import annotations

import argparse
import time

import torch

import lrfluct_fast  # noqa: F401  registers torch.ops.lrfluct

SHAPES = [(64, 32, 1024), (64, 128, 64), (256, 16, 256), (8, 256, 16), (32, 64, 4096)]


def median_s(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    op = torch.ops.lrfluct.batch_stats
    print("| [B, C, S] | copy + rows GB/s | rows alone GB/s | in place GB/s | in place vs copy + rows |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(shape)
        rows = x.movedim(1, 2).reshape(-1, shape[1]).contiguous()
        paths = {
            "copy": lambda: op(x.movedim(1, 2).reshape(-1, shape[1]).contiguous()),
            "rows": lambda: op(rows),
            "in_place": lambda: op(x),
        }
        rounds = [{k: median_s(f, args.repeats) for k, f in paths.items()} for _ in range(3)]
        best = {k: sorted(r[k] for r in rounds)[1] for k in paths}  # median of the rounds
        gb = x.numel() * x.element_size() / 1e9
        print(f"| {'x'.join(map(str, shape))} | {gb / best['copy']:.1f} | {gb / best['rows']:.1f} "
              f"| {gb / best['in_place']:.1f} | {best['copy'] / best['in_place']:.2f}x |")


if __name__ == "__main__":
    main()
