"""Spawning gloo ranks for the distributed tests: each rank runs worker(rank, world, tmp) and
writes error<rank>.txt with its traceback when it fails."""
from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp


def spawn(worker, world: int, tmp: str, timeout_s: float = 240) -> list[int]:
    """Run `world` processes of worker(rank, world, tmp); fail the test with a rank's
    traceback if one wrote it; returns their exit codes."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, tmp)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    for r in range(world):
        err = os.path.join(tmp, f"error{r}.txt")
        if os.path.exists(err):
            pytest.fail(f"rank {r} of {world} failed:\n{open(err).read()}")
    return [p.exitcode for p in procs]
