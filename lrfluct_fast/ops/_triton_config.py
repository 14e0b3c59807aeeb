"""Whether the Triton kernels can run, and the launch settings of every one of them.

Owns: the optional `import triton` (the package must import without it), the check that
a tensor's device can run the kernels, and `launch_config`, the one place where block
sizes, warps and grid shapes are chosen. It holds no kernel.

Two regimes: compiled kernels on CUDA tensors, and the Triton interpreter
(`TRITON_INTERPRET=1` set before triton is imported) on CPU tensors, which is how CI runs
them. The interpreter runs one numpy program instance at a time, so it gets few programs
with big blocks; the GPU gets enough programs to fill every SM.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    TRITON_ERROR: str | None = None
except ImportError as e:  # optional dependency: `pip install lrfluct_fast[triton]`
    triton = tl = None
    TRITON_ERROR = f"{type(e).__name__}: {e}"

# Kernels are interpreted when this was set as triton was imported (the same import as here).
INTERPRET = TRITON_ERROR is None and os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable() -> bool:
    """Triton kernels may serve CUDA tensors (importable, not disabled by LRFLUCT_DISABLE_TRITON=1)."""
    return TRITON_ERROR is None and os.environ.get("LRFLUCT_DISABLE_TRITON") != "1"


def require(device: torch.device) -> None:
    """Raise a RuntimeError unless Triton kernels can run on tensors of `device`."""
    if TRITON_ERROR is not None:
        raise RuntimeError(f"lrfluct_fast: Triton kernels need triton ({TRITON_ERROR}); "
                           "install it with `pip install triton`")
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError("lrfluct_fast: Triton kernels run on CUDA tensors, or on CPU tensors "
                           "with TRITON_INTERPRET=1 set before triton is imported")


def device_guard(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _no_guard()


class _no_guard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def acc_type(dtype: torch.dtype):
    """Triton accumulation type for a torch statistics dtype (float32 or float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def triton_type(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


TILE = 2048        # batch_stats: elements of x per tile on a GPU
MAX_CHUNKS = 1024  # batch_stats: row chunks at most, so the combine kernel is one tree


def launch_config(op: str, device: torch.device, **size) -> dict:
    """Block sizes, warps and grid for one launch of `op` on tensors of `device`.

    batch_stats(rows, cols, batch, length, rows_contiguous): x as [batch, cols, length];
        tiles [BLOCK_R, BLOCK_N]; grid (neuron blocks, row chunks) with enough programs for ~4
        per SM (interpreter: ~4 in all, so the cross-chunk merge still runs); the combine
        kernel reduces [C_BLOCK, COLS] partials (all chunks of COLS neurons) per program.
    merge_stats(cols), temporal_update(): BLOCK elements per step; temporal_update's
        programs each own CHUNK consecutive elements of one tensor, and update their float64
        masters MASTER_BLOCK elements at a time.
    """
    interp = INTERPRET
    warps = 4
    if op == "batch_stats":
        rows, cols, batch, length = size["rows"], size["cols"], size["batch"], size["length"]
        if interp:
            # At most 64 rows a tile, as on a GPU: numpy sums a tile's rows one after another in
            # float32, so taller tiles would lose precision the GPU's tree reduction does not.
            block_n = min(512, _pow2(cols))
            block_r = min(_pow2(length), max(16, 32768 // block_n), 64)
            programs = 4
        elif size["rows_contiguous"]:
            # memory runs along the rows (a conv output [B, C, H*W]): 128 rows of 32 neurons
            block_r = min(128, max(16, _pow2(length)))
            block_n = min(_pow2(cols), max(1, TILE // block_r))
            programs = 4 * _sm_count(device)
        else:
            # 128 neurons: 512 contiguous bytes per fp32 row
            block_n = min(128, max(16, _pow2(cols)))
            block_r = min(max(16, TILE // block_n), 256)
            programs = 4 * _sm_count(device)
        col_blocks = _cdiv(cols, block_n)
        tiles = max(1, batch * _cdiv(length, block_r))
        chunks = min(tiles, max(1, _cdiv(programs, col_blocks)), MAX_CHUNKS)
        tiles_per_chunk = _cdiv(tiles, chunks)
        chunks = _cdiv(tiles, tiles_per_chunk)
        c_block = _pow2(chunks)  # the combine kernel reduces every chunk of its neurons at once
        # 512 partials a program: 4 a thread, 110 registers on sm_90 (1024: 135)
        combine_cols = max(1, min(_pow2(cols), (16384 if interp else 512) // c_block))
        # 8 warps: 8 elements of a tile a thread, each with its (count, mean, M2, positive):
        # 70-124 registers on sm_90 at the shapes of tests/triton_sm90_compile.py (4 warps: 143)
        return dict(BLOCK_R=block_r, BLOCK_N=block_n, col_blocks=col_blocks, chunks=chunks,
                    tiles_per_chunk=tiles_per_chunk, C_BLOCK=c_block, COLS=combine_cols,
                    num_warps=warps if interp else 8, combine_warps=warps)
    if op == "merge_stats":
        # float64 arithmetic: 4 columns a thread; 8 spilled registers on sm_90 with float64 state
        block = min(4096 if interp else 512, _pow2(size["cols"]))
        return dict(BLOCK=block, num_warps=warps)
    if op == "temporal_update":
        # GPU: 16 steps of 1024 per program, so a 10M-parameter model still makes ~600 programs.
        # 8 warps: 4 elements a thread keeps registers near 80 (the pointers are int64).
        # Interpreter: numpy ops on 16K elements cost little more than on 4K, and there are 4x fewer.
        block = 16384 if interp else 1024
        # The float64 master, touched once a block or for a rare escaping value: one element a
        # thread (at 4 a thread its loops took 228 registers on sm_90, the common loop 88).
        master_block = block if interp else block // 4
        return dict(BLOCK=block, MASTER_BLOCK=master_block, CHUNK=block if interp else 16 * block,
                    num_warps=8)
    raise KeyError(op)
