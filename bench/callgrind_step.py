"""Training steps of the paper autoencoder for valgrind's callgrind: instruction counts are
repeatable where this VM's wall times swing by 2x, so they tell a build's host work apart.

Runs 3 warm-up steps, then STEPS steps (Adam, batch 64, one thread) with the monitor set up by
MODE. Run it at two STEPS and take the difference, so import and set-up cancel:

    export PYTHONHASHSEED=0 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
    py=$(python -c 'import sys; print(sys.executable)')   # the interpreter, not a shell shim
    for n in 2 10; do
      valgrind --tool=callgrind --callgrind-out-file=cg.$n $py bench/callgrind_step.py both $n
    done
    callgrind_annotate cg.10 | grep _C.cpython   # minus the same lines of cg.2, over 8 steps

Only the project's own functions compare exactly between builds: MKL picks code paths that
valgrind counts differently from run to run.
"""
from __future__ import annotations

import sys

import torch

import lrfluct_fast as lf
from lrfluct_fast.experiments.autoencoder import build_autoencoder

MODES = {
    "plain": None,
    "act": dict(weights=False, biases=False, gradients=False),
    "grad": dict(weights=False, biases=False, activations=False),
    "both": dict(weights=False, biases=False),
    "all": {},
}


def main() -> None:
    mode, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    x = torch.rand(64, 1024)
    torch.manual_seed(0)
    model = build_autoencoder("mlp", 32)
    mon = None if MODES[mode] is None else lf.instrument(model, **MODES[mode])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3 + steps):
        opt.zero_grad(set_to_none=True)
        (model(x) - x).square().mean().backward()
        opt.step()
        if mon is not None:
            mon.step()


if __name__ == "__main__":
    main()
