"""FSDP2 (fully_shard) on 2 and 3 gloo ranks against one process that saw the union of their data.

One spawn per world size runs every case (a process start costs seconds). The model has an
Embedding (neurons on dim 1: each rank holds a share of every neuron), two blocks sharded on
their own (one activation-checkpointed with reshard_after_forward=True, one with
reshard_after_forward=False), LayerNorms (a kind with its own weight_rows) and a head Linear
sharded alone (its class is FSDP's and the wrapper's at once) with 2 neurons, so the third
of 3 ranks holds none of its rows. The vocabulary (11) and the hidden width (7) split
unevenly over 2 and 3 ranks.

Runs: weight_mode="element" (both world sizes, with a run directory), weight_mode="neuron"
and a bf16 MixedPrecisionPolicy (2 ranks), the refusals (2 ranks; windows of sharded weights
and biases among them), and a resume from a checkpoint (model and optimizer by
torch.distributed.checkpoint, the monitor per rank) that must give the uninterrupted run's
summary bit for bit; the 3-rank run tries the 2-rank run's monitor states first.

Why the runs agree: each optimizer step takes MICRO micro-batches (gradient accumulation; no
gradient sync on the first); rank r trains on rows [ROWS r, ROWS (r + 1)) of each
micro-batch of ROWS * world rows, with loss (sum of its rows' losses) / (rows of the whole
step), so every row's dL/dz equals that of one process on all rows with the mean loss. FSDP
averages the ranks' gradients, so the learning rate is world times the single process's.
Activation and gradient statistics are merged across ranks, weight and bias spreads summed
from the shards, when a summary is taken.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lrfluct_fast as lf

from spawn_ranks import spawn

STEPS, MICRO, ROWS, SEQ, VOCAB, D, HIDDEN = 3, 2, 3, 2, 11, 6, 7
LR = 0.05
COUNT_KEYS = ("activation.count", "activation.nonfinite", "gradient.count",
              "gradient.nonfinite", "steps")
TEMPORAL_KEYS = ("weight.spread", "bias.spread")


class FeedForward(nn.Module):
    def __init__(self, checkpointed: bool):
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D), nn.LayerNorm(D)
        self.checkpointed = checkpointed

    def _inner(self, x):
        return self.norm(x + self.down(F.relu(self.up(x))))

    def forward(self, x):
        return checkpoint(self._inner, x, use_reentrant=False) if self.checkpointed else self._inner(x)


class ShardNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Embedding(VOCAB, D)
        self.block1, self.block2 = FeedForward(checkpointed=True), FeedForward(checkpointed=False)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.inp(x))))


def build(seed: int = 0) -> ShardNet:
    torch.manual_seed(seed)
    return ShardNet()


def shard(model: ShardNet, mesh, mp_policy=None) -> ShardNet:
    """Each block, the head alone and the root, as users shard a transformer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    fully_shard(model.block1, reshard_after_forward=True, **kw)
    fully_shard(model.block2, reshard_after_forward=False, **kw)
    fully_shard(model.head, **kw)
    fully_shard(model, **kw)
    return model


def data(world: int):
    """[step][micro] token inputs of ROWS * world rows."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (STEPS, MICRO, ROWS * world, SEQ), generator=g)


def train(model, mon, opt, steps, rows, total_rows, sync=None, first=0):
    """Steps [first, first + len(steps)): MICRO micro-batches each, loss = sum / total_rows."""
    for micro_batches in steps:
        opt.zero_grad()
        for i, x in enumerate(micro_batches):
            if sync is not None:
                sync(i == MICRO - 1)
            model(x[rows]).square().sum().div(total_rows).backward()
        opt.step()
        mon.step()


def _flat(summary):
    return {f"{layer}/{k}": v for layer, s in summary.items() for k, v in s.items()}


# ---------------------------------------------------------------------------------------
# the ranks
# ---------------------------------------------------------------------------------------
def _sharded(world, mesh, seed=0, mp_policy=None, **options):
    """(model, monitor, optimizer): a model sharded, then instrumented."""
    model = shard(build(seed), mesh, mp_policy)
    mon = lf.instrument(model, **options)
    return model, mon, torch.optim.SGD(model.parameters(), lr=LR * world, momentum=0.9)


def _train_rank(rank, world, model, mon, opt, steps):
    train(model, mon, opt, steps, slice(rank * ROWS, (rank + 1) * ROWS), MICRO * ROWS * world,
          sync=model.set_requires_gradient_sync)


def _run(rank, world, mesh, mp_policy=None, **options):
    """One training run; returns (model, monitor, its summary)."""
    model, mon, opt = _sharded(world, mesh, mp_policy=mp_policy, **options)
    _train_rank(rank, world, model, mon, opt, data(world))
    return model, mon, mon.summary()


def _refusals(rank, world, mesh):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}

    def refused(key, fn):
        try:
            fn()
        except ValueError as e:
            out[key] = str(e)

    refused("fsdp1", lambda: lf.instrument(FullyShardedDataParallel(
        nn.Linear(4, 4), use_orig_params=True, device_id=torch.device("cpu"))))
    lin = nn.Linear(4, 3)
    lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
    refused("tensor_parallel", lambda: lf.instrument(nn.Sequential(lin)))
    dim1 = nn.Sequential(nn.Linear(6, 6))
    fully_shard(dim1, mesh=mesh, shard_placement_fn=lambda p: Shard(p.dim() - 1))
    refused("placement", lambda: lf.instrument(dim1))
    deconv = nn.Sequential(nn.ConvTranspose1d(4, 3, 2))
    fully_shard(deconv, mesh=mesh)
    refused("neuron_mode", lambda: lf.instrument(deconv, weight_mode="neuron"))
    unsharded = shard(build(), mesh)
    unsharded(data(world)[0, 0])  # the root keeps its unsharded parameters after a forward
    refused("unsharded", lambda: lf.instrument(unsharded))

    windowed = shard(build(), mesh)  # windows of sharded weights or biases
    refused("windows", lambda: lf.instrument(windowed, windows={"weight": 2, "bias": 3}))
    out["windows_left_unwrapped"] = not any(hasattr(m, "_lrfluct") for m in windowed.modules())
    refused("drift", lambda: lf.instrument(shard(build(), mesh), drift=True))

    late = build()  # instrumented, then sharded: refused at the first step
    mon = lf.instrument(late)
    shard(late, mesh)
    opt = torch.optim.SGD(late.parameters(), lr=LR)
    refused("late", lambda: train(late, mon, opt, data(world)[:1], slice(0, ROWS), ROWS))
    mon.remove()
    return out


def _resume(rank, world, mesh, tmp):
    """Steps 1..STEPS-1, a checkpoint (model and optimizer by torch.distributed.checkpoint,
    the monitor per rank), then a fresh model loads it and takes the last step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    steps = data(world)
    model, mon, opt = _sharded(world, mesh)
    _train_rank(rank, world, model, mon, opt, steps[:-1])
    ckpt = os.path.join(tmp, f"ckpt{world}")
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=ckpt)
    torch.save(mon.state_dict(), os.path.join(ckpt, f"monitor_rank{rank}.pt"))
    dist.barrier()

    model, mon, opt = _sharded(world, mesh, seed=1)  # other weights: all from the checkpoint
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out, wrong = {}, {"other_rank": os.path.join(ckpt, f"monitor_rank{(rank + 1) % world}.pt")}
    if world == 3:  # the 2-rank run's states on 3 ranks
        wrong["other_world"] = os.path.join(tmp, "..", "w2", "ckpt2", f"monitor_rank{rank % 2}.pt")
    for key, path in wrong.items():
        try:
            mon.load_state_dict(torch.load(path))
        except ValueError as e:
            out[key] = str(e)
    mon.load_state_dict(torch.load(os.path.join(ckpt, f"monitor_rank{rank}.pt")))
    _train_rank(rank, world, model, mon, opt, steps[-1:])
    return mon.summary(), out


def _worker(rank, world, tmp):
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
        from torch.distributed.tensor import init_device_mesh

        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}",
                                rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        mesh = init_device_mesh("cpu", (world,))
        info = {}
        model, mon, summary = _run(rank, world, mesh, log_dir=os.path.join(tmp, "run"),
                                   log_every=1, summary_every=STEPS)
        np.savez(os.path.join(tmp, f"element{rank}.npz"), **_flat(summary))
        info["memory"] = mon.memory_bytes()
        head = type(model.head)
        info["head_class"] = [head.__name__, issubclass(head, FSDPModule)]
        mon.close()
        for m in (model, model.block1, model.block2, model.head):
            m.unshard()  # the modules hold whole parameters: step() reads the shards still
        mon.step()       # (recording a whole parameter would raise: not the shard's shape)
        info["step_unsharded"] = mon.steps
        for m in (model, model.block1, model.block2, model.head):
            m.reshard()
        mon.remove()
        info["head_class_removed"] = type(model.head).__name__
        model(data(world)[0, 0]).sum().backward()  # FSDP still runs the unwrapped model
        if world == 2:
            *_, summary = _run(rank, world, mesh, weight_mode="neuron")
            np.savez(os.path.join(tmp, f"neuron{rank}.npz"), **_flat(summary))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            _, mon, summary = _run(rank, world, mesh, mp_policy=policy)
            np.savez(os.path.join(tmp, f"bf16_{rank}.npz"), **_flat(summary))
            info["bf16_memory"] = mon.memory_bytes()
            info["refusals"] = _refusals(rank, world, mesh)
        summary, info["resume"] = _resume(rank, world, mesh, tmp)
        np.savez(os.path.join(tmp, f"resumed{rank}.npz"), **_flat(summary))
        with open(os.path.join(tmp, f"info{rank}.json"), "w") as f:
            json.dump(info, f)
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(tmp, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo workers may abort in interpreter teardown


def _spawn(tmp, world):
    assert spawn(_worker, world, tmp) == [0] * world
    return tmp


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    out = {}
    for world in (2, 3):  # the 3-rank run loads the 2-rank run's monitor states
        tmp = base / f"w{world}"
        tmp.mkdir()
        out[world] = _spawn(str(tmp), world)
    return out


# ---------------------------------------------------------------------------------------
# the single process
# ---------------------------------------------------------------------------------------
def single_process(world, weight_mode="element"):
    model = build(0)
    mon = lf.instrument(model, weight_mode=weight_mode)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    train(model, mon, opt, data(world), slice(None), MICRO * ROWS * world)
    return mon, _flat(mon.summary())


def _load(tmp, name, world):
    return [dict(np.load(os.path.join(tmp, f"{name}{r}.npz"))) for r in range(world)]


def _info(tmp, world):
    out = []
    for r in range(world):
        with open(os.path.join(tmp, f"info{r}.json")) as f:
            out.append(json.load(f))
    return out


def assert_matches(got, want, *, rtol=2e-5, temporal_rtol=1e-3, msg=""):
    """Every key of the sharded summary equals the single process's; only the per-element
    weight.temporal_var of sharded layers is not gathered."""
    assert set(want) - set(got) == {k for k in want if k.endswith("/weight.temporal_var")}, msg
    assert set(got) <= set(want), msg
    for key, value in got.items():
        stat = key.rpartition("/")[2]
        if stat in COUNT_KEYS:
            np.testing.assert_array_equal(value, want[key], err_msg=f"{msg} {key}")
            continue
        tol = temporal_rtol if stat in TEMPORAL_KEYS else rtol
        scale = np.nanmax(np.abs(want[key])) if np.size(want[key]) else 0.0
        np.testing.assert_allclose(value, want[key], rtol=tol, atol=1e-6 * scale,
                                   err_msg=f"{msg} {key}")


def _max_error(got, want, keys):
    """The largest error over `keys`, relative to each array's largest value."""
    return max(float(np.nanmax(np.abs(got[k] - want[k])) / np.nanmax(np.abs(want[k])))
               for k in keys if np.size(want[k]))


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_summaries_equal_single_process(ranks, world):
    tmp = ranks[world]
    mon, want = single_process(world)
    got = _load(tmp, "element", world)
    for r in range(world):
        assert_matches(got[r], want, msg=f"rank {r} of {world}")
        assert (got[r]["inp/activation.count"] == STEPS * MICRO * ROWS * world * SEQ).all()
    for key in got[0]:  # every rank returns the same whole-layer summary
        for r in range(1, world):
            np.testing.assert_array_equal(got[0][key], got[r][key], err_msg=key)
    # rank 0 logged the same summaries, spreads gathered, into the run directory
    run = lf.load_run(os.path.join(tmp, "run"))
    [(step, logged)] = run.summaries
    assert step == STEPS
    assert_matches({f"{layer}/{k}": v for layer, s in logged.items() for k, v in s.items()},
                   want, msg="logged")
    # each rank keeps its shards' weight statistics only
    info = _info(tmp, world)
    for r in range(world):
        assert info[r]["memory"] < mon.memory_bytes()
    assert info[0]["head_class"] == ["FluctFSDPLinear", True]
    assert all(i["step_unsharded"] == STEPS + 1 for i in info)
    assert info[0]["head_class_removed"] == "FSDPLinear"


def test_neuron_mode_and_mixed_precision(ranks):
    tmp = ranks[2]
    _, want = single_process(2, weight_mode="neuron")
    for r, got in enumerate(_load(tmp, "neuron", 2)):
        assert_matches(got, want, msg=f"neuron mode, rank {r}")
    # bf16 parameters in the forward and backward, float32 shards and reduction: the
    # statistics of a float32 run within bf16's precision, every row counted
    _, want = single_process(2)
    for r, got in enumerate(_load(tmp, "bf16_", 2)):
        for key in got:
            if key.rpartition("/")[2] in COUNT_KEYS:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        # measured: at most 0.012 of the layer's largest value for the activation mean and var
        # and the gradient var, 0.044 for the spreads (differences of weights over 3 steps);
        # the gradient means, sums of terms of both signs, are left out
        stats = [k for k in got if k.endswith(("activation.mean", "activation.var", "gradient.var"))]
        assert _max_error(got, want, stats) < 0.03
        assert _max_error(got, want, [k for k in got if k.endswith(TEMPORAL_KEYS)]) < 0.1
    info = _info(tmp, 2)
    assert info[0]["bf16_memory"] == info[0]["memory"]  # float32 state for bf16 parameters


@pytest.mark.parametrize("world", [2, 3])
def test_resume_per_rank(ranks, world):
    tmp = ranks[world]
    want = _load(tmp, "element", world)
    for r, got in enumerate(_load(tmp, "resumed", world)):
        assert set(got) == set(want[r])
        for key, value in got.items():  # the same computation, restored: the same bits
            np.testing.assert_array_equal(value, want[r][key], err_msg=f"rank {r} {key}")
    info = _info(tmp, world)
    for r in range(world):
        assert f"state of rank {(r + 1) % world} loaded on rank {r}" in info[r]["resume"]["other_rank"]
        if world == 3:
            assert "saved on 2 FSDP ranks, loaded on 3" in info[r]["resume"]["other_world"]


def test_refusals(ranks):
    for r, info in enumerate(_info(ranks[2], 2)):
        got = info["refusals"]
        assert "FSDP1" in got["fsdp1"] and "fully_shard" in got["fsdp1"]
        assert "fully_shard did not make" in got["tensor_parallel"] and "Shard(0)" in got["tensor_parallel"]
        assert "placements (Shard(dim=1),)" in got["placement"]
        assert "weight_mode='neuron'" in got["neuron_mode"] and "'0'" in got["neuron_mode"]
        assert "unsharded parameters" in got["unsharded"]
        assert "after instrument()" in got["late"] and "instrument after fully_shard" in got["late"]
        assert "windows of ['bias', 'weight']" in got["windows"] and "FSDP2" in got["windows"]
        assert "block1.down.weight" in got["windows"] and ", ..." in got["windows"]
        assert got["windows_left_unwrapped"]
        assert "drift=True is not supported for weights sharded by FSDP2" in got["drift"]
        assert "all_reduce inside every step" in got["drift"]
