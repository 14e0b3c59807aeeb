"""How far an instrumented model's gradients are from float64, beside the plain model's.

    python bench/invisible.py

Cases: the bias gradient of Linear(32, 64) on 65,536 rows whose first row of dL/dz is 100,
and on 1M rows whose first row is 1e4 (float32, error against the float64 column sum); the
Hessian-vector product and top Hessian eigenvalue of a small float64 MLP (error of the
instrumented model against the plain one). Prints a markdown table; nothing is timed.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

import lrfluct_fast as lf


def bias_gradient_errors(rows: int, outlier: float):
    torch.manual_seed(0)
    plain = nn.Linear(32, 64)
    wrapped = copy.deepcopy(plain)
    lf.instrument(wrapped)
    x, g = torch.randn(rows, 32), torch.randn(rows, 64)
    g[0] = outlier
    plain(x).backward(g)
    wrapped(x).backward(g)
    exact = g.double().sum(0)
    return [float((m.bias.grad.double() - exact).abs().max()) for m in (plain, wrapped)]


def second_order_differences():
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    wrapped = copy.deepcopy(plain)
    lf.instrument(wrapped)
    x = torch.randn(9, 5, dtype=torch.float64)
    hvps, tops = [], []
    for m in (plain, wrapped):
        names = [n for n, _ in m.named_parameters()]
        shapes = [p.shape for p in m.parameters()]
        flat0 = torch.cat([p.detach().flatten() for p in m.parameters()])

        def loss(flat, m=m, names=names, shapes=shapes):
            ps, i = {}, 0
            for n, s in zip(names, shapes):
                ps[n] = flat[i:i + s.numel()].view(s)
                i += s.numel()
            return functional_call(m, ps, (x,)).square().mean()
        v = torch.ones_like(flat0)
        hvps.append(torch.autograd.functional.hvp(loss, flat0, v)[1])
        tops.append(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat0))[-1])
    return float((hvps[0] - hvps[1]).abs().max()), float(tops[0]), float(tops[1])


def main() -> None:
    print("| case | plain torch: max error vs float64 | instrumented: max error vs float64 |")
    print("|---|---|---|")
    for rows, outlier in ((65536, 100.0), (1 << 20, 1e4)):
        p, w = bias_gradient_errors(rows, outlier)
        print(f"| bias grad, {rows} rows, first row {outlier:g} | {p:.3g} | {w:.3g} |")
    hvp, top_p, top_w = second_order_differences()
    print(f"\nfloat64 MLP: HVP max |instrumented - plain| = {hvp:.3g}; top Hessian eigenvalue "
          f"plain {top_p:.12g}, instrumented {top_w:.12g}")


if __name__ == "__main__":
    main()
