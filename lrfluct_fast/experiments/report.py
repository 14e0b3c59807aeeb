"""report.md of the learning-rate experiment: tables and a comparison with the paper.

Owns the derived numbers the report shows (pooled over the ReLU layers, per layer) and the
wording of the comparison, which is computed from those numbers, never fixed in advance.
Reads the per-lr result mappings (as loaded from the npz files) and the run's config; writes
one markdown file atomically. Numbers are printed with 4 significant digits.

The paper's claims compared (arXiv 2511.10435, from its abstract and summaries; its full
text was not available): the largest learning rate (1e-2) reconstructs best while many of
its neurons stay largely inactive; the smallest (1e-4) engages more neurons but
reconstructs worse within the same training window. With other lrs the largest and the
smallest of the run stand in for 1e-2 and 1e-4.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

Results = Mapping[float, Mapping[str, np.ndarray]]
PAPER = "Neuronal Fluctuations: Learning Rates vs Participating Neurons (arXiv 2511.10435)"
PAPER_EPOCHS = 1000


def fmt(x) -> str:
    x = float(x)
    return "nan" if not np.isfinite(x) else f"{x:.4g}"


def _names(res, key) -> list[str]:
    return [str(n) for n in res[key]]


def neurons(res, layer: str) -> int:
    return int(np.asarray(res[f"summary/{layer}/weight.spread"]).size)


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _nanstd(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.std()) if x.size else float("nan")


def pooled(res) -> dict[str, float]:
    """Quantities pooled over the ReLU layers (where 'dead' is meaningful) of one lr."""
    relus = _names(res, "relu_layers")
    n = np.array([neurons(res, l) for l in relus], dtype=np.float64)
    dead = np.array([float(res[f"metrics/{l}/dead_count"]) for l in relus])
    active = np.array([float(res[f"metrics/{l}/mean_active_fraction"]) for l in relus])
    pr = np.array([float(res[f"metrics/{l}/participation_ratio"]) for l in relus])
    total = n.sum()
    return {
        "neurons": float(total),
        "dead_fraction": float(np.nansum(dead) / total) if total else float("nan"),
        "mean_active_fraction": float(np.nansum(active * n) / total) if total else float("nan"),
        "pr_over_n": _nanmean(pr / n) if n.size else float("nan"),
    }


def lr_rows(results: Results) -> list[dict[str, float]]:
    """One row per lr (largest first): losses and the pooled participation numbers."""
    rows = []
    for lr in sorted(results, reverse=True):
        res = results[lr]
        rows.append({"lr": float(lr), "test_mse": float(res["final/test_loss"]),
                     "train_mse": float(res["final/train_loss"]), **pooled(res),
                     "wall_s": float(res["wall_s"])})
    return rows


def layer_rows(results: Results) -> list[dict]:
    """One row per (lr, layer): the final window's metrics and spreads."""
    rows = []
    for lr in sorted(results, reverse=True):
        res = results[lr]
        relus = set(_names(res, "relu_layers"))
        for layer in _names(res, "layers"):
            n = neurons(res, layer)
            m = lambda k: float(res[f"metrics/{layer}/{k}"])  # noqa: E731
            spread = np.asarray(res[f"summary/{layer}/weight.spread"], dtype=np.float64)
            bias = np.asarray(res[f"summary/{layer}/bias.spread"], dtype=np.float64)
            rows.append({
                "lr": float(lr), "layer": layer, "relu": layer in relus, "neurons": n,
                "participation_ratio": m("participation_ratio"),
                "pr_over_n": m("participation_ratio") / n,
                "dead_fraction": m("dead_fraction"),
                "mean_active_fraction": m("mean_active_fraction"),
                "mean_spread": _nanmean(spread),
                "spread_of_spread": m("spread_of_spread"),
                "spread_cv": m("spread_cv"),
                "bias_spread_of_spread": _nanstd(bias),
            })
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _trend(values_by_lr: dict[float, float]) -> str:
    """'increases' / 'decreases' with lr when strictly monotonic over the sorted lrs, else
    'is not monotonic' ('is undefined' with a nan)."""
    v = [values_by_lr[lr] for lr in sorted(values_by_lr)]
    if not np.all(np.isfinite(v)):
        return "is undefined"
    d = np.diff(v)
    if np.all(d > 0):
        return "increases"
    if np.all(d < 0):
        return "decreases"
    return "is not monotonic"


def comparison(results: Results, epochs: int) -> list[str]:
    """Sentences comparing the measured trends with the paper's claims."""
    lrs = sorted(results)
    if len(lrs) < 2:
        return ["The comparison with the paper needs at least two learning rates; "
                "this run has one."]
    hi, lo = lrs[-1], lrs[0]
    r = {lr: lr_rows({lr: results[lr]})[0] for lr in lrs}
    out = []
    if (hi, lo) != (1e-2, 1e-4):
        out.append(f"The paper compares 1e-2 with 1e-4; here the largest lr ({hi:g}) and the "
                   f"smallest ({lo:g}) of this run stand in for them.")
    if epochs < PAPER_EPOCHS:
        out.append(f"This run trained {epochs} epochs, the paper {PAPER_EPOCHS}: trends in a "
                   f"shorter window can differ (the slow learning rates have had less time).")

    def verdict(a: float, b: float) -> str:
        # the claim holds when a > b; nan (no observation, no fluctuation) decides nothing
        if not (np.isfinite(a) and np.isfinite(b)):
            return "**Cannot tell** (a value is nan) whether it agrees"
        return "**Agrees**" if a > b else "**Does not agree**"

    # the paper does not say on which images it scores reconstruction: both are judged
    for key, where in (("train_mse", "training"), ("test_mse", "held-out test")):
        values = [r[lr][key] for lr in lrs]
        listing = ", ".join(f"lr {lr:g}: {fmt(r[lr][key])}" for lr in reversed(lrs))
        if not np.all(np.isfinite(values)):
            out.append(f"{verdict(np.nan, np.nan)} on the {where} images about reconstruction "
                       f"({listing}).")
            continue
        best = lrs[int(np.argmin(values))]
        ok = (best == hi) + (r[lo][key] > r[hi][key])
        word = ("**Agrees**", "**Partly agrees**", "**Does not agree**")[2 - ok]
        out.append(f"{word} on the {where} images that the largest learning rate reconstructs "
                   f"best and the smallest worse than it: the lowest final MSE is at lr "
                   f"{best:g} ({listing}), and the smallest lr is "
                   f"{'worse' if r[lo][key] > r[hi][key] else 'not worse'} than the largest.")
    out.append(f"{verdict(r[hi]['dead_fraction'], r[lo]['dead_fraction'])} that many neurons "
               f"stay largely inactive at the largest learning rate: the dead fraction of the "
               f"ReLU layers is {fmt(r[hi]['dead_fraction'])} at lr {hi:g} vs "
               f"{fmt(r[lo]['dead_fraction'])} at lr {lo:g}.")
    a, b = r[lo]["mean_active_fraction"], r[hi]["mean_active_fraction"]
    pa, pb = r[lo]["pr_over_n"], r[hi]["pr_over_n"]
    if not (np.isfinite(pa) and np.isfinite(pb)):
        pr_text = "cannot be compared (nan)"
    else:
        pr_text = "points the same way" if (pa > pb) == (a > b) else "points the other way"
    out.append(f"{verdict(a, b)} that the smallest learning rate engages more neurons: the "
               f"mean active fraction of the ReLU layers is {fmt(r[lo]['mean_active_fraction'])} "
               f"at lr {lo:g} vs {fmt(r[hi]['mean_active_fraction'])} at lr {hi:g}; the "
               f"fluctuation participation ratio / N (ReLU layers) {pr_text} "
               f"({fmt(pa)} vs {fmt(pb)}).")
    layers = _names(results[hi], "layers")
    rows = layer_rows(results)
    spread = {l: {x["lr"]: x["mean_spread"] for x in rows if x["layer"] == l} for l in layers}
    sos = {l: {x["lr"]: x["spread_of_spread"] for x in rows if x["layer"] == l} for l in layers}
    def counts(trends: dict[str, dict[float, float]]) -> str:
        found = [_trend(t) for t in trends.values()]
        return ", ".join(f"{word} in {found.count(word)}" for word in
                         ("increases", "decreases", "is not monotonic", "is undefined")
                         if found.count(word))

    out.append(f"Fluctuation size (the paper's abstract gives no number to compare with), over "
               f"the {len(layers)} layers: the mean weight spread {counts(spread)}; the spread "
               f"of the spread {counts(sos)} (with the learning rate).")
    return out


def command_line(config: Mapping) -> str:
    """The `lrfluct reproduce` command that reproduces `config` (every option spelled out)."""
    c = config
    parts = ["lrfluct reproduce", "--lrs " + " ".join(f"{lr:g}" for lr in c["lrs"]),
             f"--epochs {c['epochs']}", f"--seed {c['seed']}", f"--device {c['device']}",
             f"--monitor {c['monitor']}", f"--image-size {c['image_size']}",
             f"--samples {c['samples']}", f"--test-samples {c['test_samples']}",
             f"--batch-size {c['batch_size']}", f"--optimizer {c['optimizer']}",
             f"--arch {c['arch']}", "--widths " + " ".join(str(w) for w in c["widths"]),
             f"--latent {c['latent']}", f"--window {c['window']}", f"--jitter {c['jitter']:g}",
             "--scale-range " + " ".join(f"{s:g}" for s in c["scale_range"]),
             "--rotation" if c["rotation"] else "--no-rotation", f"--noise {c['noise']:g}"]
    return " ".join(parts)


def render(results: Results, config: Mapping) -> str:
    lr_tab = _table(
        ["lr", "final test MSE", "final train MSE", "dead fraction (ReLU)",
         "mean active fraction (ReLU)", "PR / N (ReLU)", "train time (s)"],
        [[f"{x['lr']:g}", fmt(x["test_mse"]), fmt(x["train_mse"]), fmt(x["dead_fraction"]),
          fmt(x["mean_active_fraction"]), fmt(x["pr_over_n"]), f"{x['wall_s']:.1f}"]
         for x in lr_rows(results)])
    layer_tab = _table(
        ["lr", "layer", "ReLU", "N", "participation ratio", "PR / N", "dead fraction",
         "mean active fraction", "mean spread", "spread of the spread", "spread CV",
         "bias spread of the spread"],
        [[f"{x['lr']:g}", x["layer"], "yes" if x["relu"] else "no", str(x["neurons"]),
          fmt(x["participation_ratio"]),
          fmt(x["pr_over_n"]), fmt(x["dead_fraction"]), fmt(x["mean_active_fraction"]),
          fmt(x["mean_spread"]), fmt(x["spread_of_spread"]), fmt(x["spread_cv"]),
          fmt(x["bias_spread_of_spread"])] for x in layer_rows(results)])
    window = int(config["window"])
    window_text = ("the whole run" if window >= int(config["epochs"])
                   else "the last epoch" if window == 1 else f"the last {window} epochs")
    from .plots import FIGURES  # plots draws from this module's numbers: import here

    figures = ", ".join(f"`{f}`" for f in FIGURES)
    sections = [
        "# Learning rate vs neuronal fluctuations: reproduction",
        f"Experiment of *{PAPER}*: an autoencoder trained on eight synthetic shapes at several "
        f"learning rates, with per-neuron fluctuation statistics streamed by the "
        f"`{config['monitor']}` monitor.",
        "## Results",
        f"Final reconstruction loss: mean squared error per pixel over the whole test set "
        f"({config['test_samples']} images) and training set after the last epoch. Statistics "
        f"are those of the final window, {window_text}. Dead: a neuron whose pre-activation is "
        f"positive for less than the monitor's threshold (1% by default) of the window's "
        f"observations. Spread of neuron j: RMS over its incoming weights of their temporal std "
        f"over the window's optimizer steps; spread of the spread: its std over the layer's "
        f"neurons; PR: participation ratio of spread_j^2.",
        lr_tab,
        layer_tab,
        "## Comparison with the paper",
        "\n".join(f"- {s}" for s in comparison(results, int(config["epochs"]))),
        f"Figures: {figures}.",
        "## Command and config",
        f"```\n{command_line(config)}\n```",
        f"```json\n{json.dumps(dict(config), indent=2)}\n```",
    ]
    return "\n\n".join(sections) + "\n"


def write_report(results: Results, config: Mapping, path: str) -> str:
    text = render(results, config)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
