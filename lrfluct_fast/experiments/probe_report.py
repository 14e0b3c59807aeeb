"""report.md's sections on sharpness and weight spectra, compared with published results.

Owns the numbers derived from probes.py's result keys and the wording of their comparison,
computed from the numbers per seed and summed up over the seeds (seeds.py), never fixed in
advance. report.py places the sections; this module reads the result mappings by seed and
lr and the run's config.

Edge of stability (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs
at the Edge of Stability"): with full-batch gradient descent at step size lr the sharpness
(top Hessian eigenvalue of the training loss) rises during training (progressive sharpening)
until it reaches 2/lr, then hovers around it. For Adam (Cohen et al. 2022, "Adaptive Gradient
Methods at the Edge of Stability") the preconditioned sharpness does the same at
(2 + 2 beta1) / ((1 - beta1) lr), 38/lr for torch's beta1 = 0.9. Checked per (seed, lr):
  rises     late, the median of the measurements in the second half of training, is above
            early, their median in its first quarter (a median: Adam's first steps, with a
            tiny second moment, can give one huge preconditioned value)
  at edge   late lies within EDGE (0.8 to 1.25) times the threshold
The first measurement is after `sharpness_every` steps, the probe batch a fixed subset.

Spectra (Martin & Mahoney, heavy-tailed self-regularization): training leaves the bulk of a
layer's spectrum near its random start at small learning rates and grows outliers (a larger
top singular value, a lower stable rank) at large ones; well-trained layers have a
heavy-tailed eigenvalue density of W^T W with a power-law exponent alpha in about 2 to 4.
Checked per seed over the layers with at least MIN_EIGENVALUES eigenvalues (a power-law fit
on fewer says little): each claim holds for the seed when it holds in more than half of them.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .report import fmt, markdown_table
from .seeds import claim_verdict, over_seeds

BySeed = Mapping[int, Mapping[float, Mapping[str, np.ndarray]]]
EDGE = (0.8, 1.25)
ALPHA_RANGE = (2.0, 4.0)
MIN_EIGENVALUES = 32
ADAM_BETA1 = 0.9  # torch's default, what train.make_optimizer uses


def threshold(optimizer: str, lr: float) -> float:
    """The stability threshold of the tracked sharpness: 2/lr for SGD, 38/lr for Adam."""
    if optimizer == "adam":
        return (2 + 2 * ADAM_BETA1) / ((1 - ADAM_BETA1) * lr)
    return 2.0 / lr


def tracked_key(optimizer: str) -> str:
    """The sharpness the threshold applies to: the preconditioned one for Adam."""
    return "sharpness/preconditioned" if optimizer == "adam" else "sharpness/value"


def sharpness_numbers(res, optimizer: str) -> dict[str, float]:
    """The tracked sharpness's early value (median over the first quarter of training), peak
    and late value (median over the second half) as fractions of the threshold; late's value
    and raw sharpness."""
    steps = np.asarray(res["sharpness/step"], dtype=np.float64)
    tracked = np.asarray(res[tracked_key(optimizer)], dtype=np.float64)
    raw = np.asarray(res["sharpness/value"], dtype=np.float64)
    limit = threshold(optimizer, float(res["lr"]))
    late = steps > steps[-1] / 2  # the last measurement is always there
    early = (steps <= steps[-1] / 4) | (steps == steps[0])  # the first one always
    return {"early": float(np.median(tracked[early])) / limit, "peak": tracked.max() / limit,
            "late": float(np.median(tracked[late])) / limit,
            "late_value": float(np.median(tracked[late])),
            "raw_late": float(np.median(raw[late]))}


def has_sharpness(by_seed: BySeed) -> bool:
    return all("sharpness/value" in res for r in by_seed.values() for res in r.values())


def has_spectra(by_seed: BySeed) -> bool:
    return all("spectra/epoch" in res for r in by_seed.values() for res in r.values())


def sharpness_section(by_seed: BySeed, config: Mapping) -> list[str]:
    optimizer = config["optimizer"]
    lrs = sorted(next(iter(by_seed.values())), reverse=True)
    numbers = {s: {lr: sharpness_numbers(r[lr], optimizer) for lr in lrs}
               for s, r in by_seed.items()}
    over = {lr: {k: over_seeds(numbers[s][lr][k] for s in numbers)
                 for k in ("early", "peak", "late", "late_value", "raw_late")} for lr in lrs}
    name = ("preconditioned sharpness (top eigenvalue of P^-1 H, P = sqrt(v_hat) + eps)"
            if optimizer == "adam" else "sharpness (top Hessian eigenvalue)")
    limit = "38/lr" if optimizer == "adam" else "2/lr"
    full_batch = int(config["batch_size"]) >= int(config["samples"])
    columns = ["early", "peak", "late", "late_value"] + (["raw_late"] if optimizer == "adam"
                                                          else [])
    header = ["lr", limit, "early / threshold", "peak / threshold", "late / threshold",
              "late value"] + (["late sharpness (not preconditioned)"] if optimizer == "adam"
                               else [])
    text = [
        "## Sharpness and the edge of stability",
        f"The {name} of the training loss on the first {config['sharpness_probe']} training "
        f"images, every {config['sharpness_every']} optimizer steps and after the last, against "
        f"its stability threshold {limit}. Early: the median of the measurements in the first "
        f"quarter of training; peak: the largest; late: their median in the second half; each "
        f"as a fraction of {limit}.",
        markdown_table(header, [[f"{lr:g}", fmt(threshold(optimizer, lr))]
                                + [over[lr][k].text(fmt) for k in columns] for lr in lrs]),
    ]
    claims = []
    for lr in lrs:
        rises = {s: _above(numbers[s][lr]["late"], numbers[s][lr]["early"]) for s in numbers}
        edge = {s: _within(numbers[s][lr]["late"], EDGE) for s in numbers}
        claims.append(f"{claim_verdict(rises)} at lr {lr:g} that the {name.split(' (')[0]} "
                      f"rises during training (progressive sharpening), late above early: "
                      f"early {over[lr]['early'].text(fmt)}, late {over[lr]['late'].text(fmt)} "
                      f"x {limit}.")
        claims.append(f"{claim_verdict(edge)} at lr {lr:g} that it settles at the edge of "
                      f"stability, late within {EDGE[0]:g}-{EDGE[1]:g} x {limit}: late / "
                      f"{limit} {over[lr]['late'].text(fmt)}.")
    if optimizer == "adam":
        source = ("Cohen et al. 2022 (adaptive edge of stability): Adam's preconditioned "
                  "sharpness equilibrates at 38/lr (beta1 = 0.9).")
    else:
        source = ("Cohen et al. 2021 (edge of stability): full-batch gradient descent's "
                  "sharpness rises to 2/lr and hovers there.")
    if not full_batch:
        source += (f" This run uses mini-batches of {config['batch_size']} of "
                   f"{config['samples']} images, not the full batch of that result: stochastic "
                   f"steps usually settle below the threshold (`--optimizer sgd --full-batch` "
                   f"runs the classic setting).")
    text += [source, "\n".join(f"- {c}" for c in claims)]
    return text


def _above(a: float, b: float) -> bool | None:
    return None if not (np.isfinite(a) and np.isfinite(b)) else bool(a > b)


def _within(x: float, bounds: tuple[float, float]) -> bool | None:
    return None if not np.isfinite(x) else bool(bounds[0] <= x <= bounds[1])


def _fit_layers(res) -> list[str]:
    return [str(l) for l in res["layers"]
            if int(res[f"spectra/{l}/eigenvalues"]) >= MIN_EIGENVALUES]


def spectra_rows(res) -> list[dict]:
    """Per layer of one (seed, lr): initial and final spectral norm, stable rank, alpha."""
    rows = []
    for layer in (str(l) for l in res["layers"]):
        row = {"layer": layer, "eigenvalues": int(res[f"spectra/{layer}/eigenvalues"])}
        for key in ("spectral_norm", "stable_rank", "alpha"):
            series = np.asarray(res[f"spectra/{layer}/{key}"], dtype=np.float64)
            row[f"{key}_initial"], row[f"{key}_final"] = float(series[0]), float(series[-1])
        rows.append(row)
    return rows


def _majority(flags: list[bool | None]) -> bool | None:
    decided = [f for f in flags if f is not None]
    return None if not decided else sum(decided) > len(decided) / 2


def spectra_section(by_seed: BySeed, config: Mapping) -> list[str]:
    lrs = sorted(next(iter(by_seed.values())), reverse=True)
    hi, lo = lrs[0], lrs[-1]
    rows = {s: {lr: {x["layer"]: x for x in spectra_rows(r[lr])} for lr in lrs}
            for s, r in by_seed.items()}
    first = next(iter(by_seed.values()))[hi]
    layers = [str(l) for l in first["layers"]]
    fitted = _fit_layers(first)
    keys = ("spectral_norm_initial", "spectral_norm_final", "stable_rank_initial",
            "stable_rank_final", "alpha_initial", "alpha_final")
    table = markdown_table(
        ["lr", "layer", "eigenvalues", "top singular value: initial", "final",
         "stable rank: initial", "final", "alpha: initial", "final"],
        [[f"{lr:g}", layer, str(rows[next(iter(rows))][lr][layer]["eigenvalues"])]
         + [over_seeds(rows[s][lr][layer][k] for s in rows).text(fmt) for k in keys]
         for lr in lrs for layer in layers])

    def ratio(s, lr, layer, key):
        x = rows[s][lr][layer]
        return x[f"{key}_final"] / x[f"{key}_initial"]

    def per_seed(test) -> dict[int, bool | None]:
        return {s: _majority([test(s, layer) for layer in fitted]) for s in rows}

    def listing(key: str) -> str:
        return "; ".join(
            f"lr {lr:g}: " + ", ".join(
                f"{layer} {over_seeds(ratio(s, lr, layer, key) for s in rows).text(fmt)}"
                for layer in fitted) for lr in (hi, lo))

    claims = []
    if len(lrs) >= 2 and fitted:
        grows = per_seed(lambda s, l: _above(ratio(s, hi, l, "spectral_norm"),
                                             ratio(s, lo, l, "spectral_norm")))
        claims.append(f"{claim_verdict(grows)} that the largest learning rate grows outliers "
                      f"more than the smallest: a larger top singular value, final / initial "
                      f"({listing('spectral_norm')}).")
        drops = per_seed(lambda s, l: _above(ratio(s, lo, l, "stable_rank"),
                                             ratio(s, hi, l, "stable_rank")))
        claims.append(f"{claim_verdict(drops)} that it lowers the stable rank more (fewer "
                      f"directions carry the weight): stable rank final / initial "
                      f"({listing('stable_rank')}).")
        keeps = per_seed(lambda s, l: _within(ratio(s, lo, l, "stable_rank"), EDGE))
        claims.append(f"{claim_verdict(keeps)} that the smallest learning rate keeps the bulk "
                      f"of the spectrum: stable rank final / initial within {EDGE[0]:g}-"
                      f"{EDGE[1]:g} at lr {lo:g}.")
    if fitted:
        for lr in lrs:
            heavy = per_seed(lambda s, l: _within(rows[s][lr][l]["alpha_final"], ALPHA_RANGE))
            claims.append(
                f"{claim_verdict(heavy)} at lr {lr:g} that the layers end heavy-tailed with "
                f"alpha in {ALPHA_RANGE[0]:g}-{ALPHA_RANGE[1]:g} (final alpha: " + ", ".join(
                    f"{l} {over_seeds(rows[s][lr][l]['alpha_final'] for s in rows).text(fmt)}"
                    for l in fitted) + ").")
    skipped = [l for l in layers if l not in fitted]
    scope = (f"Claims are checked per seed on the {len(fitted)} layers with at least "
             f"{MIN_EIGENVALUES} eigenvalues (holding for the seed when true in more than half "
             f"of them)" + (f"; {', '.join(skipped)} have fewer and are left out." if skipped
                            else "."))
    return [
        "## Weight spectra",
        "Per layer, the eigenvalues of W^T W (W viewed as [out, fan-in]) at initialisation and "
        "after the last epoch: the top singular value, the stable rank ||W||_F^2 / ||W||_2^2 "
        "and alpha, the exponent of a power law fitted to the eigenvalue density's tail "
        "(the smaller, the heavier the tail; a random matrix at initialisation has no power-law "
        "tail and a large fitted alpha).",
        table,
        "Compared with Martin & Mahoney (heavy-tailed self-regularization): small learning "
        "rates keep the bulk of the spectrum, large ones grow outliers, and well-trained "
        f"layers have alpha in about {ALPHA_RANGE[0]:g}-{ALPHA_RANGE[1]:g}. {scope}",
        "\n".join(f"- {c}" for c in claims) if claims else
        "No layer is large enough for these claims.",
    ]
