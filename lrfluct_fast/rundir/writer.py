"""The writer thread: device-side snapshots at a logging step, host copies, summaries,
metrics and file writes off the training step's critical path."""
from __future__ import annotations

import atexit
import csv
import io
import os
import queue
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch

import numpy as np
from .. import distributed, drift, fsdp, metrics, ops, windows
from .files import (METRICS_FILE, SCALARS_FILE, SCALARS_HEADER, SUMMARY_DIR, TB_DIR, atomic_write,
                    csv_header, cut_partial_line, cut_window_records, window_file)


QUEUE_SIZE = 8
_STOP = object()


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("tensorboard=True needs the tensorboard package "
                          "(pip install tensorboard)") from e
    return SummaryWriter


# -- snapshot: the only work a logging step does on the statistics --------------------------
@torch.no_grad()
def snapshot(states, *, per_rank: bool = True, kinds=None, spreads=None) -> dict[str, dict[str, torch.Tensor]]:
    """Device-side copies of what a logged step needs: {layer: {buffer key: tensor}}.

    The whole run's statistics (windows.whole_run), or with `kinds` the open window of those
    statistics alone (a window's row). The element-mode weight state (weight-sized) is
    replaced by its per-neuron "weight.spread"; per_rank=False leaves out the activation and
    gradient statistics (they travel through distributed.pack instead). The temporal state of
    FSDP-sharded weights and biases is left out: `spreads` (fsdp.gathered_spreads) stand in
    for it. The drift state (drift=True, weight-sized) is replaced by its per-neuron
    "weight.drift" and "weight.update_size".
    """
    out = {}
    for name, st in states:
        snap = {}
        if kinds is None:
            buffers = windows.whole_run(st.buffers)
        else:
            buffers = {k: t for k, t in st.buffers.items() if k.partition(".")[0] in kinds}
        sharded = fsdp.sharded_roles(st)
        element = (st.track["weight"] and st.weight_mode == "element" and "weight" not in sharded
                   and "weight.moments" in buffers)
        for key, t in buffers.items():
            kind = key.partition(".")[0]
            if ((kind == "weight" and element) or (kind in distributed.PER_RANK and not per_rank)
                    or kind in sharded or key.startswith(drift.PREFIX)):
                continue
            snap[key] = t.clone()
        if drift.has_state(buffers):
            snap.update(drift.per_neuron(st, buffers))
        if element:
            snap["weight.spread"] = _weight_spread(st, *st.temporal_state("weight", buffers))
        snap.update((spreads or {}).get(name, {}))
        out[name] = snap
    return out


def _weight_spread(st, *state: torch.Tensor) -> torch.Tensor:
    """metrics.weight_spread of the temporal variance of LayerState st, on the device ([N])."""
    _, _, var = ops.temporal_stats(*state)  # nan where an element has no observation
    return st.weight_rows(var).mean(1).sqrt()


@dataclass
class Item:
    step: int                       # the run's step
    steps: int                      # Monitor.steps (since reset): the summaries' "steps"
    buffers: dict
    gathered: torch.Tensor | None   # distributed.all_gather(pack(...)), or None
    layout: list | None
    metrics: bool
    summary: bool
    event: Any = None               # CUDA event recorded after the copies


@dataclass
class WindowItem:
    step: int                       # the run's step at which the window closed
    statistic: str
    first_step: int                 # Monitor.steps of the window's first and last step
    last_step: int
    buffers: dict                   # snapshot(..., kinds=(statistic,))
    event: Any = None


@dataclass
class ScalarItem:
    step: int                       # the step given to Monitor.log_scalars (the run's by default)
    values: dict[str, float]        # {name: value}: one row of scalars.csv each


# -- the writer thread ------------------------------------------------------------------------
class Writer:
    """Turns snapshots into files, in a daemon thread fed by a bounded queue."""

    def __init__(self, path: str, specs, metric_options, columns, tensorboard: bool,
                 log_errors: str, window_layouts=None):
        self.path, self.specs, self.metric_options = path, specs, metric_options
        self.window_layouts = window_layouts or {}  # {statistic: [[layer, key, neurons], ...]}
        self.columns, self.tensorboard, self.log_errors = columns, tensorboard, log_errors
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.errors = 0
        self.failure: BaseException | None = None   # the first error, with log_errors="raise"
        self.purge_step: int | None = None          # TensorBoard: drop events from here on
        self._tb = None
        self._cut_tail = True  # metrics.csv may end in a partial line: cut it before appending
        self._cut_windows = True  # and a window file in part of a record
        self._cut_scalars = True  # and scalars.csv in a partial line
        self._failing = False       # the last write failed (and that spell was warned of)
        self._summary_owed = False  # a summary write failed: write one at the next success
        self._thread = threading.Thread(target=self._loop, name="lrfluct-rundir", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def put(self, item) -> None:
        """Blocks while the queue is full (nothing is dropped)."""
        while True:
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise RuntimeError("lrfluct_fast: the run directory writer thread is gone") from None

    def drain(self) -> None:
        if self._thread.is_alive():
            self.queue.join()

    def stop(self, timeout: float | None = None) -> None:
        """Write what is queued, close TensorBoard, end the thread."""
        if self._thread.is_alive():
            try:
                self.queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)

    def stop_soon(self) -> None:
        try:
            self.queue.put_nowait(_STOP)
        except queue.Full:
            pass

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is _STOP:
                    if self._tb is not None:
                        self._tb.close()
                    return
                if self.failure is None:  # after a failure with log_errors="raise": discard
                    self._writers[type(item)](self, item)
                    self._failing = False
            except BaseException as err:  # the thread must outlive any error
                self._failed(err, item)
            finally:
                self.queue.task_done()

    def _failed(self, err: BaseException, item) -> None:
        self.errors += 1
        self._cut_tail = self._cut_windows = self._cut_scalars = True
        if self.log_errors == "raise":
            self.failure = self.failure or err
            return
        if getattr(item, "summary", False):
            self._summary_owed = True
        if not self._failing:  # one warning per spell of failures (a full disk: not one per step)
            self._failing = True
            step = getattr(item, "step", "?")
            warnings.warn(f"lrfluct_fast: writing step {step} to the run directory {self.path} "
                          f"failed ({type(err).__name__}: {err}); training goes on, the records "
                          f"of the steps whose writes fail are lost, and the summary is written "
                          f"again at the first write that succeeds (no more warnings until "
                          f"then; log_errors='raise' stops training instead)", RuntimeWarning)

    def _write(self, item: Item) -> None:
        if item.event is not None:
            item.event.synchronize()
        host = {name: {k: t.cpu().numpy() for k, t in bufs.items()}
                for name, bufs in item.buffers.items()}
        if item.gathered is not None:
            for name, merged in distributed.merge_ranks(item.gathered.cpu(), item.layout).items():
                host[name].update(merged)
        summaries = {name: metrics.layer_summary(host[name], track=track, weight_mode=mode,
                                                 steps=item.steps)
                     for name, (track, mode) in self.specs.items()}
        if item.metrics:
            self._append_metrics(item.step, summaries)
        if item.summary or self._summary_owed:
            self._write_summary(item.step, summaries)
            self._summary_owed = False
        if self._tb is not None:
            self._tb.flush()

    def _write_window(self, item: WindowItem) -> None:
        """One closed window: a record of float64 values appended to windows/<statistic>.f64
        (files.WINDOW_HEAD, then each column of run.json's layout)."""
        if item.event is not None:
            item.event.synchronize()
        layout = self.window_layouts[item.statistic]
        if self._cut_windows:
            for statistic, columns in self.window_layouts.items():
                cut_window_records(self.path, statistic, columns)
            self._cut_windows = False
        modes = {name: mode for name, (_, mode) in self.specs.items()}
        rows = windows.row_summaries(item.statistic, item.buffers, modes)
        record = np.concatenate([np.array([item.step, item.first_step, item.last_step], "<f8")]
                                + [np.asarray(rows[layer][key], "<f8").reshape(n)
                                   for layer, key, n in layout])
        _append(window_file(self.path, item.statistic), record.tobytes())

    def _write_scalars(self, item: ScalarItem) -> None:
        """Rows `step,name,value` appended to scalars.csv in one write."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for name, value in item.values.items():
            w.writerow([item.step, name, repr(float(value))])
        path = os.path.join(self.path, SCALARS_FILE)
        if self._cut_scalars:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))  # a run directory made before scalars.csv
            cut_partial_line(path, SCALARS_HEADER)
            self._cut_scalars = False
        _append(path, buf.getvalue().encode("utf-8"), create=False)
        if self.tensorboard:
            tb = self._tb_writer()
            for name, value in item.values.items():
                tb.add_scalar(name, value, item.step)
            tb.flush()

    _writers = {Item: _write, WindowItem: _write_window, ScalarItem: _write_scalars}

    def _append_metrics(self, step: int, summaries) -> None:
        values = {name: metrics.layer_metrics(s, **self.metric_options) for name, s in summaries.items()}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for name, m in values.items():
            w.writerow([step, name, *(m[c] for c in self.columns)])
        path = os.path.join(self.path, METRICS_FILE)
        if self._cut_tail:
            cut_partial_line(path, csv_header(self.columns))
            self._cut_tail = False
        _append(path, buf.getvalue().encode("utf-8"), create=False)  # a vanished file is an error
        if self.tensorboard:
            tb = self._tb_writer()
            for name, m in values.items():
                for c, v in m.items():
                    tb.add_scalar(f"{name}/{c}", v, step)

    def _write_summary(self, step: int, summaries) -> None:
        arrays = {f"{name}/{key}": v for name, s in summaries.items() for key, v in s.items()}
        atomic_write(os.path.join(self.path, SUMMARY_DIR, f"step_{step:09d}.npz"),
                     lambda f: np.savez(f, **arrays))
        if self.tensorboard:
            tb = self._tb_writer()
            for name, s in summaries.items():
                for key in ("weight.spread", "bias.spread"):
                    v = s.get(key)
                    v = v[np.isfinite(v)] if v is not None else None
                    if v is not None and v.size:
                        tb.add_histogram(f"{name}/{key}", v, step)

    def _tb_writer(self):
        if self._tb is None:
            self._tb = summary_writer_class()(os.path.join(self.path, TB_DIR),
                                               purge_step=self.purge_step)
        return self._tb


def _append(path: str, data: bytes, create: bool = True) -> None:
    """`data` at the end of `path`, in as few writes as the system allows."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


_LIVE: "weakref.WeakSet[Writer]" = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for w in list(_LIVE):
        w.stop(timeout=30.0)
