"""Sharpness: the top Hessian eigenvalue of the training loss, measured along a training run.

Owns the Hessian-vector product (HVP) operator, the Lanczos iteration and SharpnessTracker.
A measurement must leave training exactly as it was: it never writes a parameter, a
parameter's .grad, the optimizer, the model's buffers (BatchNorm running statistics are put
back) or the global random state (forked), and it runs under `monitor.paused()` so the
monitor observes none of its forwards and backwards.

Definitions
  sharpness                 the largest algebraic eigenvalue of H, the Hessian of the loss on
                            the probe batch with respect to the trainable parameters (not the
                            largest by magnitude: a dominant negative eigenvalue is not
                            reported). Full-batch gradient descent at learning rate lr is
                            stable along the top eigenvector while it is below 2/lr; at the
                            edge of stability it rises to ~2/lr and hovers there.
  preconditioned_sharpness  the largest eigenvalue of P^-1 H with P = diag(sqrt(v_hat) + eps),
                            Adam's (AdamW's) denominator from the optimizer's current state
                            (v_hat the bias-corrected second moment; the max of it with
                            amsgrad). Computed as the same eigenvalue of the symmetric
                            P^-1/2 H P^-1/2. Adam's edge of stability is
                            (2 + 2 beta1) / (1 - beta1) / lr: 38/lr for beta1 = 0.9.

Method: Lanczos with full reorthogonalisation on HVPs (one forward and one create_graph
backward per measurement, then one double backward per HVP through torch.autograd.grad).
The largest Ritz value converges to the largest algebraic eigenvalue directly, whatever the
sign of the dominant one (power iteration would find the eigenvalue largest in magnitude
and need a shifted second run). It stops when the Ritz residual ||H y - theta y|| is at most
tol times the largest |Ritz value| (an eigenvalue of H then lies within that residual of
theta; the error of the top Ritz value is in practice ~residual^2 / gap, far below), or
after `iters` HVPs. Warm start: a tracker starts
each measurement from the previous eigenvector, so a measurement after a few training steps
takes fewer HVPs. Memory: the graph of the create_graph backward plus one parameter-sized
vector per Lanczos step (iters at most; full reorthogonalisation keeps the basis).

Cost (measured: bench/sharpness_cost.py, bench/RESULTS.md): on the paper's MLP autoencoder
(561k parameters, float32, one CPU thread), probe batch 256, Adam: the Hessian graph costs
1.5 training steps of batch 64 and one HVP 2.4; a cold measure() of both quantities took
6 + 8 HVPs (669 ms, 48 steps), a warm one 10 steps later 3 + 5-8 HVPs (413 ms, 29 steps).
Lanczos came within 1e-3 of the top eigenvalue in 5 (plain) and 7 (preconditioned) HVPs
where power iteration from the same start needed 7 and 13.

A non-finite loss or HVP makes a measurement nan, with a RuntimeWarning saying which; the
tracker then keeps its previous eigenvector for the next warm start.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch
from torch import nn

from .options import check_count, describe

__all__ = ["SharpnessTracker", "adam_preconditioner", "top_hessian_eigenvalue"]

START_SEED = 0  # the random start vector of a cold measurement: the same for every run


class NonFinite(Exception):
    """A loss or a Hessian-vector product that is not finite: the measurement is nan."""


# -- argument checks ----------------------------------------------------------------------
def _check_tol(tol) -> None:
    if not isinstance(tol, numbers.Real) or isinstance(tol, bool):
        raise TypeError(f"tol must be a number in (0, 1), got {describe(tol)}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {describe(tol)}")


def _check_params(params) -> list[torch.Tensor]:
    params = list(params) if not isinstance(params, torch.Tensor) else [params]
    if not params:
        raise ValueError("params must hold at least one tensor that requires grad, got none")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError(f"params[{i}] must be a tensor that requires grad, got {describe(p)}")
        if not p.is_floating_point():
            raise ValueError(f"params[{i}] must be floating point, got {p.dtype}")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"params must all be on one device, got {sorted(map(str, devices))}")
    return params


def _check_like(what: str, tensors, params, positive: bool = False) -> list[torch.Tensor]:
    """`tensors` (init or preconditioner): one tensor per parameter, of its shape."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(params):
        raise ValueError(f"{what} must be a list of {len(params)} tensors (one per parameter), "
                         f"got {describe(tensors)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else describe(t)
            raise ValueError(f"{what}[{i}] must be a tensor of shape {tuple(p.shape)} "
                             f"(params[{i}]'s), got {shape}")
        if positive and not bool(torch.isfinite(t).all() and (t > 0).all()):
            raise ValueError(f"{what}[{i}] must be finite and positive everywhere")
    return list(tensors)


# -- flat vectors -------------------------------------------------------------------------
def _work_dtype(params) -> torch.dtype:
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def flatten(tensors, dtype) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _split(flat: torch.Tensor, params) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params:
        out.append(flat[i:i + p.numel()].view(p.shape).to(p.dtype))
        i += p.numel()
    return out


class HessianOperator:
    """v -> H v on flat vectors, H the Hessian of loss_fn() at params: one forward and one
    create_graph backward when built, then one double backward per product."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params):
        self.params = params
        self.dtype = _work_dtype(params)
        self.size = sum(p.numel() for p in params)
        self.products = 0
        with torch.enable_grad():
            loss = loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {describe(loss)}")
            if not bool(torch.isfinite(loss.detach()).all()):
                raise NonFinite(f"the loss is not finite ({float(loss.detach())})")
            if not loss.requires_grad:
                raise ValueError("loss_fn returned a loss that does not depend on the parameters "
                                 "(it does not require grad)")
            grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True,
                                        allow_unused=True)
        # a gradient without a graph is constant in the parameters: its rows of H are 0
        self.curved = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[i] for i in self.curved]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        if not self.grads:
            return torch.zeros_like(v)
        vs = _split(v, self.params)
        with torch.enable_grad():
            hv = torch.autograd.grad(self.grads, self.params,
                                     grad_outputs=[vs[i] for i in self.curved],
                                     retain_graph=True, allow_unused=True)
        out = torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1).to(v.dtype)
                         for h, p in zip(hv, self.params)])
        if not bool(torch.isfinite(out).all()):
            raise NonFinite(f"Hessian-vector product {self.products} is not finite")
        return out


def lanczos_top(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *,
                iters: int, tol: float) -> tuple[float, torch.Tensor, int]:
    """(largest eigenvalue, its unit Ritz vector, products used) of the symmetric operator
    `matvec`, by Lanczos with full reorthogonalisation from `start` (see the module
    docstring for the stopping rule)."""
    n = start.numel()
    basis = torch.empty((min(iters, 8), n), dtype=start.dtype, device=start.device)
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    theta, ritz = float("nan"), np.ones(1)
    for k in range(iters):
        w = matvec(basis[k])
        alpha = float(w @ basis[k])
        alphas.append(alpha)
        # full reorthogonalisation, twice (Gram-Schmidt twice is enough in floating point)
        for _ in range(2):
            w = w - basis[:k + 1].T @ (basis[:k + 1] @ w)
        beta = float(w.norm())
        evals, evecs = _tridiagonal_eigh(alphas, betas)
        theta, ritz = float(evals[-1]), evecs[:, -1]
        scale = max(abs(evals[0]), abs(evals[-1]))
        if beta * abs(ritz[-1]) <= tol * scale or beta <= 1e-12 * max(scale, 1e-300) \
                or k + 1 == min(iters, n):
            break
        betas.append(beta)
        if k + 1 == basis.shape[0]:  # grow the basis by doubling: no copy per step
            grown = torch.empty((min(2 * basis.shape[0], iters), n), dtype=basis.dtype,
                                device=basis.device)
            grown[:k + 1] = basis
            basis = grown
        basis[k + 1] = w / beta
    used = len(alphas)
    vector = torch.as_tensor(ritz, dtype=basis.dtype, device=basis.device) @ basis[:used]
    return theta, vector / vector.norm(), used


def _tridiagonal_eigh(alphas, betas):
    t = np.diag(np.asarray(alphas, dtype=np.float64))
    if betas:
        off = np.asarray(betas, dtype=np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(t)


def start_vector(init, params, dtype) -> torch.Tensor:
    if init is not None:
        start = flatten(init, dtype).to(params[0].device)
        if not bool(torch.isfinite(start).all()) or float(start.norm()) == 0:
            raise ValueError("init must be finite and not all zero")
        return start
    gen = torch.Generator().manual_seed(START_SEED)
    size = sum(p.numel() for p in params)
    return torch.randn(size, generator=gen, dtype=torch.float64).to(params[0].device, dtype)


def _top_eigenvalue(hessian: HessianOperator, init, preconditioner, iters: int, tol: float):
    """(eigenvalue, flat eigenvector, products) of H or of P^-1/2 H P^-1/2."""
    start = start_vector(init, hessian.params, hessian.dtype)
    if preconditioner is None:
        matvec = hessian
    else:
        scale = flatten(preconditioner, hessian.dtype).to(start.device).rsqrt()
        matvec = lambda u: scale * hessian(scale * u)  # noqa: E731
    return lanczos_top(matvec, start, iters=iters, tol=tol)


def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params, *, init=None,
                           iters: int = 100, tol: float = 1e-3,
                           preconditioner=None) -> tuple[float, list[torch.Tensor]]:
    """The largest algebraic eigenvalue of the Hessian of loss_fn() at `params`, and its unit
    eigenvector (one tensor per parameter).

    loss_fn() -> scalar loss; params: tensors that require grad (one device). init: a start
    vector (one tensor per parameter, e.g. the previous eigenvector), else a seeded random
    one. preconditioner: one positive tensor P per parameter: then the top eigenvalue of
    P^-1 H, computed as that of P^-1/2 H P^-1/2, whose eigenvector is returned (P^-1/2 times
    it is the eigenvector of P^-1 H). A non-finite loss or HVP gives (nan, the start vector)
    with a RuntimeWarning. Nothing is written to the parameters or their .grad.
    """
    params = _check_params(params)
    check_count("iters", iters)
    _check_tol(tol)
    if init is not None:
        _check_like("init", init, params)
    if preconditioner is not None:
        _check_like("preconditioner", preconditioner, params, positive=True)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {describe(loss_fn)}")
    try:
        hessian = HessianOperator(loss_fn, params)
        value, vector, _ = _top_eigenvalue(hessian, init, preconditioner, iters, tol)
    except NonFinite as e:
        warnings.warn(f"lrfluct_fast: top Hessian eigenvalue is nan: {e}", RuntimeWarning)
        return float("nan"), _split(start_vector(init, params, _work_dtype(params)), params)
    return value, _split(vector, params)


# -- Adam's preconditioner ------------------------------------------------------------------
def adam_preconditioner(optimizer, params=None) -> list[torch.Tensor] | None:
    """Adam's denominator sqrt(v_hat) + eps per parameter (v_hat the bias-corrected second
    moment, its running max with amsgrad), in the order of the optimizer's param_groups, or
    of `params` when given. None if the optimizer is not an Adam or AdamW, or has no state
    yet for one of those parameters (before its first step)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return None
    groups = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            groups[p] = group
    params = list(groups) if params is None else list(params)
    out = []
    for p in params:
        state = optimizer.state.get(p)
        if p not in groups or not state or "exp_avg_sq" not in state:
            return None
        group = groups[p]
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        correction = 1 - group["betas"][1] ** float(state["step"])
        out.append((v.detach() / correction).sqrt() + group["eps"])
    return out


# -- the tracker --------------------------------------------------------------------------
@contextlib.contextmanager
def _isolated(model: nn.Module, monitor):
    """A measurement's surroundings: nothing observed, the global random state forked (a
    dropout mask drawn inside does not shift the training run's), buffers put back."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    paused = monitor.paused() if monitor is not None else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=devices), paused, torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)


class SharpnessTracker:
    """Sharpness (and, with an Adam or AdamW optimizer, the preconditioned sharpness) of a
    fixed probe batch, measured every `every` steps, warm-started from the previous
    eigenvector.

        tracker = SharpnessTracker(model, lambda m, b: F.mse_loss(m(b), b), probe,
                                   every=100, optimizer=opt, monitor=mon)
        for step, batch in enumerate(loader):
            ...; opt.step(); mon.step()
            tracker.maybe_measure(step)      # {"sharpness": ..., ...} every 100 steps

    loss_fn(model, probe) -> scalar loss. probe: a tensor, or a tuple/list/dict of them.
    The constructor runs loss_fn once on the probe (nothing observed, nothing kept): a probe
    the model cannot take is refused there, with a ValueError naming the probe.
    With `monitor` (an lf.Monitor), measurements run under monitor.paused() and each
    measurement's values are logged to its run directory (mon.log_scalars, scalars.csv) at
    the step passed to measure. iters: the most HVPs per eigenvalue; tol: see the module
    docstring. history: {"step", "sharpness"[, "preconditioned_sharpness"]} lists;
    last_products: the HVPs each quantity took in the last measurement.
    """

    def __init__(self, model: nn.Module, loss_fn, probe, *, every: int, optimizer=None,
                 monitor=None, iters: int = 20, tol: float = 1e-3):
        from .monitor import Monitor
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {describe(model)}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, probe), got {describe(loss_fn)}")
        if not isinstance(probe, (torch.Tensor, tuple, list, Mapping)):
            raise TypeError(f"probe must be a tensor or a tuple, list or dict of tensors, "
                            f"got {describe(probe)}")
        check_count("every", every)
        check_count("iters", iters)
        _check_tol(tol)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be None or a torch.optim.Optimizer, got {describe(optimizer)}")
        if monitor is not None and not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be None or an lrfluct_fast Monitor, got {describe(monitor)}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters (none requires grad): "
                             "there is no Hessian to measure")
        _check_params(self.params)
        self.adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        if self.adam:
            held = {p for g in optimizer.param_groups for p in g["params"]}
            names = [n for n, p in model.named_parameters() if p.requires_grad and p not in held]
            if names:
                raise ValueError(f"optimizer does not hold the trainable parameters {names}: the "
                                 f"preconditioned sharpness needs Adam's state of every one")
        self.model, self.loss_fn, self.probe = model, loss_fn, probe
        self.every, self.iters, self.tol = int(every), int(iters), float(tol)
        self.optimizer, self.monitor = optimizer, monitor
        self.keys = ("sharpness", "preconditioned_sharpness") if self.adam else ("sharpness",)
        self.history: dict[str, list[float]] = {"step": [], **{k: [] for k in self.keys}}
        self.last_products: dict[str, int] = {}
        self._vectors: dict[str, list[torch.Tensor] | None] = {k: None for k in self.keys}
        self._check_probe()

    def _loss(self) -> torch.Tensor:
        return self.loss_fn(self.model, self.probe)

    def _check_probe(self) -> None:
        with _isolated(self.model, self.monitor):
            try:
                loss = self._loss()
            except Exception as e:
                raise ValueError(f"probe: loss_fn(model, probe) failed on the probe batch "
                                 f"({type(e).__name__}: {e}); pass a batch the model takes") from e
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                raise ValueError(f"loss_fn(model, probe) must return a scalar floating-point "
                                 f"tensor, got {describe(loss)}")
            if not loss.requires_grad:
                raise ValueError("loss_fn(model, probe) returned a loss that does not depend on "
                                 "the model's trainable parameters (it does not require grad)")

    def maybe_measure(self, step: int) -> dict[str, float] | None:
        """measure(step) when step % every == 0, else None."""
        check_count("step", step, minimum=0)
        return self.measure(step) if step % self.every == 0 else None

    def measure(self, step: int) -> dict[str, float]:
        """Measure now; record in history, log to the monitor's run directory, return
        {"sharpness": ...[, "preconditioned_sharpness": ...]} (nan where a measurement
        failed, with a RuntimeWarning; Adam before its first step has no preconditioner:
        nan, without a warning)."""
        check_count("step", step, minimum=0)
        out = {k: float("nan") for k in self.keys}
        self.last_products = {k: 0 for k in self.keys}
        key = self.keys[0]
        with _isolated(self.model, self.monitor):
            try:
                hessian = HessianOperator(self._loss, self.params)
                for key in self.keys:
                    precondition = None
                    if key == "preconditioned_sharpness":
                        precondition = adam_preconditioner(self.optimizer, self.params)
                        if precondition is None:
                            continue
                    before = hessian.products
                    value, vector, _ = _top_eigenvalue(hessian, self._vectors[key], precondition,
                                                       self.iters, self.tol)
                    self.last_products[key] = hessian.products - before
                    out[key] = value
                    self._vectors[key] = _split(vector, self.params)
            except NonFinite as e:
                failed = self.keys[self.keys.index(key):]
                warnings.warn(f"lrfluct_fast: {' and '.join(failed)} at step {step} is nan: {e}; "
                              f"training is not affected", RuntimeWarning)
        self.history["step"].append(step)
        for k in self.keys:
            self.history[k].append(out[k])
        if self.monitor is not None:
            self.monitor.log_scalars(out, step=step)
        return out
