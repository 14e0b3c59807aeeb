"""report.md of the learning-rate experiment: tables and a comparison with the paper.

Owns the derived numbers the report shows (pooled over the ReLU layers, per layer; per seed,
then over the seeds with seeds.py's convention) and the wording of the comparison, which is
computed from those numbers, never fixed in advance: each claim is checked on every seed and
said to hold for every seed, some or none. Reads the result mappings by seed and lr (as loaded
from the npz files) and the run's config; writes one markdown file atomically. Numbers are
printed with 4 significant digits.

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

from .seeds import OverSeeds, claim_verdict, convention, over_seeds

Results = Mapping[float, Mapping[str, np.ndarray]]  # one seed's results by lr
BySeed = Mapping[int, Results]
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


def _over(rows_by_seed: Mapping[int, list[dict]], ident: tuple[str, ...]) -> list[dict]:
    """Rows matched across seeds by the fields `ident`, every float field an OverSeeds."""
    first = next(iter(rows_by_seed.values()))
    out = []
    for i, row in enumerate(first):
        same = [rows[i] for rows in rows_by_seed.values()]
        if any(r[k] != row[k] for r in same for k in ident):
            raise ValueError(f"the seeds' results differ in layout at {row!r}")
        out.append({k: (v if k in ident or not isinstance(v, float) else
                        over_seeds(r[k] for r in same)) for k, v in row.items()})
    return out


def lr_rows_over_seeds(by_seed: BySeed) -> list[dict]:
    """lr_rows of every seed, each number an OverSeeds (lr largest first)."""
    return _over({s: lr_rows(r) for s, r in by_seed.items()}, ("lr",))


def layer_rows_over_seeds(by_seed: BySeed) -> list[dict]:
    """layer_rows of every seed, each number an OverSeeds."""
    return _over({s: layer_rows(r) for s, r in by_seed.items()}, ("lr", "layer"))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
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


def _above(a: float, b: float) -> bool | None:
    """a > b, None when either is nan (no observation decides nothing)."""
    return None if not (np.isfinite(a) and np.isfinite(b)) else bool(a > b)


def _lowest_at(values: dict[float, float], lr: float) -> bool | None:
    v = list(values.values())
    return None if not np.all(np.isfinite(v)) else min(values, key=values.get) == lr


def comparison(by_seed: BySeed, epochs: int) -> list[str]:
    """Sentences comparing the measured trends with the paper's claims, each claim checked
    on every seed."""
    lrs = sorted(next(iter(by_seed.values())))
    if len(lrs) < 2:
        return ["The comparison with the paper needs at least two learning rates; "
                "this run has one."]
    hi, lo = lrs[-1], lrs[0]
    # per seed, per lr: the pooled row
    r = {s: {row["lr"]: row for row in lr_rows(res)} for s, res in by_seed.items()}
    agg = {row["lr"]: row for row in lr_rows_over_seeds(by_seed)}
    out = []
    if (hi, lo) != (1e-2, 1e-4):
        out.append(f"The paper compares 1e-2 with 1e-4; here the largest lr ({hi:g}) and the "
                   f"smallest ({lo:g}) of this run stand in for them.")
    if epochs < PAPER_EPOCHS:
        out.append(f"This run trained {epochs} epochs, the paper {PAPER_EPOCHS}: trends in a "
                   f"shorter window can differ (the slow learning rates have had less time).")

    def values(key: str, at=None) -> str:
        return ", ".join(f"lr {lr:g}: {agg[lr][key].text(fmt)}" for lr in (at or reversed(lrs)))

    def claim(text: str, holds: dict[int, bool | None], shown: str) -> None:
        out.append(f"{claim_verdict(holds)} that {text}: {shown}.")

    # the paper does not say on which images it scores reconstruction: both are judged
    for key, where in (("train_mse", "training"), ("test_mse", "held-out test")):
        claim(f"the largest learning rate reconstructs the {where} images best (lowest final "
              f"MSE)", {s: _lowest_at({lr: r[s][lr][key] for lr in lrs}, hi) for s in r},
              f"final {where} MSE {values(key)}")
        claim(f"the smallest learning rate reconstructs the {where} images worse than the "
              f"largest", {s: _above(r[s][lo][key], r[s][hi][key]) for s in r},
              f"final {where} MSE {values(key, (hi, lo))}")
    claim("many neurons stay largely inactive at the largest learning rate: a higher dead "
          "fraction (ReLU layers) than at the smallest",
          {s: _above(r[s][hi]["dead_fraction"], r[s][lo]["dead_fraction"]) for s in r},
          f"dead fraction {values('dead_fraction', (hi, lo))}")
    claim("the smallest learning rate engages more neurons: a higher mean active fraction "
          "(ReLU layers) than at the largest",
          {s: _above(r[s][lo]["mean_active_fraction"], r[s][hi]["mean_active_fraction"])
           for s in r}, f"mean active fraction {values('mean_active_fraction', (hi, lo))}")
    claim("the smallest learning rate engages more neurons by the fluctuation participation "
          "ratio / N (ReLU layers) too",
          {s: _above(r[s][lo]["pr_over_n"], r[s][hi]["pr_over_n"]) for s in r},
          f"PR / N {values('pr_over_n', (hi, lo))}")

    found: dict[str, list[str]] = {"mean_spread": [], "spread_of_spread": []}
    for results in by_seed.values():
        rows = layer_rows(results)
        for layer in _names(results[hi], "layers"):
            for key, trends in found.items():
                trends.append(_trend({x["lr"]: x[key] for x in rows if x["layer"] == layer}))

    def counts(trends: list[str]) -> str:
        return ", ".join(f"{word} in {trends.count(word)}" for word in
                         ("increases", "decreases", "is not monotonic", "is undefined")
                         if trends.count(word))

    pairs = len(found["mean_spread"])
    out.append(f"Fluctuation size (the paper's abstract gives no number to compare with), over "
               f"the {pairs} (layer, seed) pairs: the mean weight spread "
               f"{counts(found['mean_spread'])}; the spread of the spread "
               f"{counts(found['spread_of_spread'])} (with the learning rate).")
    return out


def command_line(config: Mapping) -> str:
    """The `lrfluct reproduce` command that reproduces `config` (every option spelled out)."""
    c = config
    parts = ["lrfluct reproduce", "--lrs " + " ".join(f"{lr:g}" for lr in c["lrs"]),
             f"--epochs {c['epochs']}", "--seeds " + " ".join(str(s) for s in c["seeds"]),
             f"--device {c['device']}",
             f"--monitor {c['monitor']}", f"--image-size {c['image_size']}",
             f"--samples {c['samples']}", f"--test-samples {c['test_samples']}",
             f"--batch-size {c['batch_size']}", f"--optimizer {c['optimizer']}",
             f"--arch {c['arch']}", "--widths " + " ".join(str(w) for w in c["widths"]),
             f"--latent {c['latent']}", f"--window {c['window']}",
             f"--sharpness-every {c['sharpness_every']}",
             f"--sharpness-probe {c['sharpness_probe']}",
             f"--spectra-every {c['spectra_every']}", f"--jitter {c['jitter']:g}",
             "--scale-range " + " ".join(f"{s:g}" for s in c["scale_range"]),
             "--rotation" if c["rotation"] else "--no-rotation", f"--noise {c['noise']:g}"]
    return " ".join(parts)


def _cell(x) -> str:
    return x.text(fmt) if isinstance(x, OverSeeds) else str(x)


def render(by_seed: BySeed, config: Mapping) -> str:
    lr_tab = markdown_table(
        ["lr", "final test MSE", "final train MSE", "dead fraction (ReLU)",
         "mean active fraction (ReLU)", "PR / N (ReLU)", "train time (s)"],
        [[f"{x['lr']:g}"] + [_cell(x[k]) for k in ("test_mse", "train_mse", "dead_fraction",
                                                   "mean_active_fraction", "pr_over_n")]
         + [x["wall_s"].text(lambda v: f"{v:.1f}")] for x in lr_rows_over_seeds(by_seed)])
    layer_tab = markdown_table(
        ["lr", "layer", "ReLU", "N", "participation ratio", "PR / N", "dead fraction",
         "mean active fraction", "mean spread", "spread of the spread", "spread CV",
         "bias spread of the spread"],
        [[f"{x['lr']:g}", x["layer"], "yes" if x["relu"] else "no", str(x["neurons"])]
         + [_cell(x[k]) for k in ("participation_ratio", "pr_over_n", "dead_fraction",
                                  "mean_active_fraction", "mean_spread", "spread_of_spread",
                                  "spread_cv", "bias_spread_of_spread")]
         for x in layer_rows_over_seeds(by_seed)])
    window = int(config["window"])
    window_text = ("the whole run" if window >= int(config["epochs"])
                   else "the last epoch" if window == 1 else f"the last {window} epochs")
    batch = int(config["batch_size"])
    batch_text = ("full batch: every step uses all training images"
                  if batch >= int(config["samples"]) else f"mini-batches of {batch} images")
    # these draw from this module's numbers: imported here
    from . import probe_report
    from .plots import figures_for

    figures = ", ".join(f"`{f}`" for f in figures_for(by_seed))
    sections = [
        "# Learning rate vs neuronal fluctuations: reproduction",
        f"Experiment of *{PAPER}*: an autoencoder trained on eight synthetic shapes at several "
        f"learning rates ({config['optimizer']}, {batch_text}), with per-neuron fluctuation "
        f"statistics streamed by the `{config['monitor']}` monitor.",
        "## Results",
        f"{convention(list(config['seeds']))} Each seed draws its own images, initial weights "
        f"and batch order; within a seed every learning rate starts from the same weights.",
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
        "\n".join(f"- {s}" for s in comparison(by_seed, int(config["epochs"]))),
        *(probe_report.sharpness_section(by_seed, config)
          if probe_report.has_sharpness(by_seed) else []),
        *(probe_report.spectra_section(by_seed, config)
          if probe_report.has_spectra(by_seed) else []),
        f"Figures (the seed mean, with the range over the seeds shaded or as error bars): "
        f"{figures}.",
        "## Command and config",
        f"```\n{command_line(config)}\n```",
        f"```json\n{json.dumps(dict(config), indent=2)}\n```",
    ]
    return "\n\n".join(sections) + "\n"


def write_report(by_seed: BySeed, config: Mapping, path: str) -> str:
    text = render(by_seed, config)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
