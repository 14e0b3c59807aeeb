"""Monitor memory per rank under FSDP2 (fully_shard) against the unsharded monitor.

    python bench/fsdp_memory.py [--world 2 3]

Builds the `lrfluct bench` GPT (vocabulary 1024, d_model 512, 6 blocks, 8 heads) on CPU,
shards each block and the root with fully_shard over W gloo ranks, instruments it, trains one
step, and prints per rank: Monitor.memory_bytes(), its share of the unsharded monitor's (the
same model instrumented in one process), and the parameter bytes the rank holds. Every number
is measured in this run. weight_mode="element" (the default; weight_mode="neuron" keeps
O(neurons) state in the first place).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lrfluct_fast as lf
from lrfluct_fast.benchmark.models import gpt, gpt_loss


def _workload():
    torch.manual_seed(0)
    w = gpt("cpu", batch=2, seq=32)
    return w.model, w.batch


def _train_one_step(model, mon, batch):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gpt_loss(model, batch).backward()
    opt.step()
    mon.step()


def _rank(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    mesh = init_device_mesh("cpu", (world,))
    model, batch = _workload()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mon = lf.instrument(model)
    _train_one_step(model, mon, batch)
    params = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"monitor": mon.memory_bytes(), "params": params}, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo workers may abort in interpreter teardown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 3])
    args = parser.parse_args()

    model, batch = _workload()
    mon = lf.instrument(model)
    _train_one_step(model, mon, batch)
    whole = mon.memory_bytes()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"GPT (vocab 1024, d_model 512, 6 blocks), weight_mode='element', "
          f"{sum(p.numel() for p in model.parameters()):,} parameters\n")
    print("| ranks | rank | monitor bytes | share of unsharded monitor | parameter bytes held |")
    print("|---|---|---|---|---|")
    print(f"| 1 (unsharded) | 0 | {whole:,} | 1.000 | {params:,} |")
    for world in args.world:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_rank, args=(r, world, tmp))
                     for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode != 0 for p in procs):
                raise SystemExit(f"a rank of {world} failed: exit codes {[p.exitcode for p in procs]}")
            for r in range(world):
                with open(os.path.join(tmp, f"rank{r}.json")) as f:
                    got = json.load(f)
                print(f"| {world} | {r} | {got['monitor']:,} | {got['monitor'] / whole:.3f} "
                      f"| {got['params']:,} |")


if __name__ == "__main__":
    main()
