"""Numbers over seeds in the learning-rate experiment: one convention for the report and figures.

Owns how the values of one quantity from several seeds are summarised and how a claim
checked per seed is summed up; knows nothing of which quantities or claims there are.

A quantity in the report: its mean over the seeds, with a spread that depends on how many
seeds there are,
  3 or more  the sample standard deviation (ddof=1): "mean ± std"
  2          the range: "mean (min–max)" (a std of two values says no more than the range)
  1          the value alone
In the figures: the mean, with the range min..max over the seeds as a band or error bars
(whatever the number of seeds: it stays within the data, so on the log axes too, where
mean - std of a positive quantity can fall below zero).
A nan value (the quantity is undefined for that seed, e.g. a participation ratio with no
fluctuation) is left out, and the text says over how many seeds the rest was taken.
A claim: per seed True, False or None (cannot tell); summed up as holding for every seed,
for some (naming them) or for none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class OverSeeds:
    """One quantity over the seeds: its finite values and how many seeds were asked."""

    values: tuple[float, ...]
    seeds: int

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); nan under two values."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else float("nan")

    @property
    def lo(self) -> float:
        return float(min(self.values)) if self.values else float("nan")

    @property
    def hi(self) -> float:
        return float(max(self.values)) if self.values else float("nan")

    def text(self, fmt: Callable[[float], str]) -> str:
        n = len(self.values)
        if n == 0:
            return "nan"
        body = (fmt(self.mean) if n == 1 else f"{fmt(self.mean)} ({fmt(self.lo)}–{fmt(self.hi)})"
                if n == 2 else f"{fmt(self.mean)} ± {fmt(self.std)}")
        return body if n == self.seeds else f"{body} [{n} of {self.seeds} seeds]"


def over_seeds(values: Iterable[float]) -> OverSeeds:
    values = [float(v) for v in values]
    return OverSeeds(tuple(v for v in values if np.isfinite(v)), len(values))


def convention(seeds: list[int]) -> str:
    """The sentence stating how the report's numbers were taken over these seeds."""
    names = ", ".join(str(s) for s in seeds)
    if len(seeds) == 1:
        return f"One seed ({names}): every number is that run's value."
    if len(seeds) == 2:
        return (f"Two seeds ({names}): every number is the mean over the seeds followed by "
                f"their range (min–max) in brackets.")
    return (f"{len(seeds)} seeds ({names}): every number is the mean over the seeds ± the "
            f"sample standard deviation over the seeds (ddof=1).")


def claim_verdict(holds: Mapping[int, bool | None]) -> str:
    """'**Holds for every seed**', '**Holds for some seeds** (...)' or '**Holds for no seed**'
    from each seed's outcome (None: that seed cannot tell), with the count."""
    decided = {s: h for s, h in holds.items() if h is not None}
    yes = [s for s, h in decided.items() if h]
    undecided = [s for s, h in holds.items() if h is None]
    if not decided:
        return f"**Cannot tell** for any seed ({len(holds)} undefined)"
    if len(yes) == len(decided):
        head = "**Holds for every seed**"
    elif yes:
        head = "**Holds for some seeds**"
    else:
        head = "**Holds for no seed**"
    detail = f"{len(yes)} of {len(decided)}"
    if yes and len(yes) < len(decided):
        detail += ": seed " + ", ".join(str(s) for s in yes)
    if undecided:
        detail += "; cannot tell for seed " + ", ".join(str(s) for s in undecided) + " (nan)"
    return f"{head} ({detail})"
