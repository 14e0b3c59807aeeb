"""load_run: a run directory read back (metrics as numpy arrays, summaries per step)."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from .files import (METRICS_FILE, SCALARS_FILE, SUMMARY_DIR, SUMMARY_NAME, WINDOW_HEAD, read_csv,
                    read_run_info, record_width, window_file, window_layouts)


# -- reading a run back -----------------------------------------------------------------------
class Metrics(dict):
    """{column: numpy array}, one entry per (logged step, layer): "step" (int64), "layer"
    (str), then every metric (float64)."""

    def to_pandas(self):
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("to_pandas() needs pandas (pip install pandas)") from e
        return pd.DataFrame(dict(self))


@dataclass
class WindowRows:
    """The closed windows of one statistic (instrument's `windows` option), one row each."""
    step: np.ndarray         # int64 [W]: the run's step at which each window closed
    first_step: np.ndarray   # int64 [W]: Monitor.steps of its first and last step
    last_step: np.ndarray
    layers: dict[str, dict[str, np.ndarray]]  # {layer: {key: [W, N]}}, the keys of mon.summary()


@dataclass
class Run:
    """A run directory read back by load_run."""
    path: str
    info: dict[str, Any]     # run.json
    metrics: Metrics
    summaries: list[tuple[int, dict[str, dict[str, np.ndarray]]]]  # (step, {layer: {key: array}})
    windows: dict[str, WindowRows]  # {statistic: its closed windows}
    # {name: (steps int64 [S], values float64 [S])}: scalars.csv (Monitor.log_scalars), file order
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    @property
    def layers(self) -> list[str]:
        return list(self.info["layers"])

    def series(self, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric of one layer."""
        sel = self.metrics["layer"] == layer
        return self.metrics["step"][sel], self.metrics[metric][sel]

    def to_pandas(self):
        return self.metrics.to_pandas()


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory: run.json, metrics.csv, scalars.csv, summaries/ and windows/ (see
    the module docstring).

    A partial last line of metrics.csv or scalars.csv, a last step with only some of its layers, and temp
    files are ignored (a run killed while writing); a corrupt file raises ValueError naming it.
    """
    path = os.fspath(path)
    info = read_run_info(path)
    columns = ["step", "layer", *info.get("metric_columns", [])]
    file = os.path.join(path, METRICS_FILE)
    header, rows = read_csv(file) if os.path.exists(file) else (None, [])
    columns = header or columns
    # A write interrupted mid-step leaves that step with only some layers: not a logged step.
    tail = 0
    while tail < len(rows) and rows[-1 - tail][1][0] == rows[-1][1][0]:
        tail += 1
    if rows and tail < len(info["layers"]):
        rows = rows[:-tail]
    table = Metrics()
    table["step"] = np.array([int(r[0]) for _, r in rows], dtype=np.int64)
    table["layer"] = np.array([r[1] for _, r in rows], dtype=str)
    for j, c in enumerate(columns[2:], start=2):
        table[c] = np.array([float(r[j]) for _, r in rows], dtype=np.float64)
    return Run(path, info, table, _read_summaries(path), _read_windows(path, info),
               _read_scalars(path))


def _read_scalars(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    file = os.path.join(path, SCALARS_FILE)
    _, rows = read_csv(file, "name") if os.path.exists(file) else (None, [])
    series: dict[str, tuple[list[int], list[float]]] = {}
    for _, (step, name, value) in rows:
        steps, values = series.setdefault(name, ([], []))
        steps.append(int(step))
        values.append(float(value))
    return {name: (np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64))
            for name, (steps, values) in series.items()}


def _read_windows(path: str, info) -> dict[str, WindowRows]:
    """windows/<statistic>.f64 as rows; a partial last record (a killed write) is left out."""
    out = {}
    for statistic, layout in window_layouts(info).items():
        file = window_file(path, statistic)
        width = record_width(layout)
        data = np.fromfile(file, dtype="<f8") if os.path.exists(file) else np.zeros(0)
        rows = data[:data.size // width * width].reshape(-1, width)
        head = {name: rows[:, i].astype(np.int64) for i, name in enumerate(WINDOW_HEAD)}
        layers: dict[str, dict[str, np.ndarray]] = {}
        col = len(WINDOW_HEAD)
        for layer, key, n in layout:
            values = rows[:, col:col + n]
            if key.endswith((".count", ".nonfinite")):
                values = values.astype(np.int64)
            layers.setdefault(layer, {})[key] = values
            col += n
        out[statistic] = WindowRows(layers=layers, **head)
    return out


def _read_summaries(path: str):
    sdir = os.path.join(path, SUMMARY_DIR)
    if not os.path.isdir(sdir):
        return []
    out = []
    for name in os.listdir(sdir):
        m = SUMMARY_NAME.fullmatch(name)
        if not m:
            continue  # temp files of a write that did not finish
        file = os.path.join(sdir, name)
        layers: dict[str, dict[str, np.ndarray]] = {}
        if not zipfile.is_zipfile(file):
            raise ValueError(f"corrupt summary file {file}: not an .npz (zip) archive")
        try:
            with np.load(file, allow_pickle=False) as z:
                for key in z.files:
                    layer, _, stat = key.rpartition("/")
                    layers.setdefault(layer, {})[stat] = z[key]
        except Exception as e:  # zip, npy header, pickle, truncation: all mean a corrupt file
            raise ValueError(f"corrupt summary file {file}: {type(e).__name__}: {e}") from None
        out.append((int(m.group(1)), layers))
    out.sort(key=lambda t: t[0])
    return out
