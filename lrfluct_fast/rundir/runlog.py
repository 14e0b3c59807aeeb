"""RunLog: the Monitor's side of a run directory: when to log, what to copy, and resuming
a run."""
from __future__ import annotations

import numbers
import os
import uuid
import warnings
import weakref
from datetime import datetime, timezone
from typing import Any

import torch

from .. import distributed, fsdp, metrics, options, windows
from .files import (FORMAT, METRICS_FILE, RUN_FILE, SCALARS_FILE, SCALARS_HEADER, SUMMARY_DIR, WINDOW_DIR,
                    atomic_write, csv_header, has_data, read_run_info, remove_temp_files,
                    truncate_after, window_layouts, write_json)
from .writer import Item, ScalarItem, WindowItem, Writer, snapshot


# instrument() options that only say where and how often to write: they may change when a
# run resumes; the others define the statistics and must not.
LOG_OPTIONS = ("log_dir", "log_every", "summary_every", "tensorboard", "log_errors")


def _coverage(monitor) -> dict[str, Any]:
    """run.json's "skipped" ([module, reason] pairs) and "coverage" (parameter counts), as
    monitor.coverage() reports them at instrument."""
    c = monitor.coverage()
    return {"skipped": [[name, reason] for name, reason in c["skipped"]],
            "coverage": {k: c[k] for k in ("trainable_parameters", "monitored_parameters")}}


def check_scalars(values, step) -> dict[str, float]:
    """Monitor.log_scalars' arguments checked: {name: float} back; errors name the argument."""
    if not isinstance(values, dict):
        raise TypeError(f"values must be a dict {{name: number}}, got {type(values).__name__}")
    out = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name or any(c in name for c in "\r\n"):
            raise ValueError(f"values: a name must be a non-empty str on one line, got {name!r}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"values[{name!r}] must be a real number, got {value!r} "
                            f"({type(value).__name__})")
        out[name] = float(value)
    if step is not None and (not isinstance(step, numbers.Integral) or isinstance(step, bool)
                             or step < 0):
        raise ValueError(f"step must be None or an integer >= 0, got {step!r}")
    return out


# -- the Monitor's side -----------------------------------------------------------------------
class RunLog:
    """When to log, what to copy, and the resume of a run directory. Every rank holds one
    (its logging steps are collectives under a process group); rank 0's has the writer."""

    def __init__(self, monitor):
        opts = monitor.options
        self.path = os.fspath(opts["log_dir"])
        self.log_every, self.summary_every = opts["log_every"], opts["summary_every"]
        self.step = 0
        self.last_summary = -1
        self.run_id = uuid.uuid4().hex
        self.pending: str | None = None   # run id of a run found in log_dir, until resumed
        self.writer: Writer | None = None
        self.columns = list(metrics.layer_metrics({}).keys())
        states = monitor._states()
        if distributed.rank() != 0:
            return
        self.info = {
            "format": FORMAT, "run_id": self.run_id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "world_size": distributed.world_size(),
            "options": {k: v for k, v in opts.items() if k != "log_dir"},
            "layers": [name for name, _ in states],
            "neurons": {name: st.neurons for name, st in states},
            "metric_columns": self.columns, "resumes": [],
            **_coverage(monitor),
        }
        win = monitor._windows
        if win is not None:
            self.info["windows"] = {
                statistic: {"every": every, "record": "float64 little-endian: step, first_step, "
                                                      "last_step, then each column's values",
                            "columns": [[name, key, monitor.states[name].neurons]
                                        for name in win.layers(statistic)
                                        for key in windows.ROW_KEYS[statistic]]}
                for statistic, every in win.every.items()}
        self._open()
        specs = {name: (dict(st.track), st.weight_mode) for name, st in states}
        self.writer = Writer(self.path, specs,
                              dict(dead_threshold=opts["dead_threshold"], energy=opts["energy"]),
                              self.columns, opts["tensorboard"], opts["log_errors"],
                              window_layouts(self.info))
        weakref.finalize(monitor, self.writer.stop_soon)

    def _open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        remove_temp_files(self.path)  # of writes a killed or failed run did not finish
        if not os.path.exists(os.path.join(self.path, RUN_FILE)):
            # _create writes run.json first: these files are not ours
            if os.path.exists(os.path.join(self.path, METRICS_FILE)) or has_data(self.path):
                raise ValueError(f"log_dir {self.path} holds {METRICS_FILE} or summaries but no "
                                 f"{RUN_FILE}: choose an empty directory")
            return self._create()
        theirs = read_run_info(self.path)
        free = LOG_OPTIONS + options.FREE_AT_RESUME
        stats = {k: v for k, v in self.info["options"].items() if k not in free}
        their_stats = {k: v for k, v in {**options.DEFAULTS, **theirs.get("options", {})}.items()
                       if k not in free}  # DEFAULTS: options added since that run
        if theirs["layers"] != self.info["layers"] or their_stats != stats:
            raise ValueError(
                f"log_dir {self.path} holds run {theirs['run_id']} of other layers or options "
                f"(layers {theirs['layers']}, options {their_stats}; now {self.info['layers']}, "
                f"{stats}): choose another directory")
        if not has_data(self.path):
            return self._create()
        self.pending = self.run_id = theirs["run_id"]
        self.info = {**self.info, **{k: theirs[k] for k in ("run_id", "created", "resumes") if k in theirs}}

    def _create(self) -> None:
        os.makedirs(os.path.join(self.path, SUMMARY_DIR), exist_ok=True)
        os.makedirs(os.path.join(self.path, WINDOW_DIR), exist_ok=True)
        write_json(os.path.join(self.path, RUN_FILE), self.info)
        atomic_write(os.path.join(self.path, METRICS_FILE), csv_header(self.columns).encode())
        atomic_write(os.path.join(self.path, SCALARS_FILE), SCALARS_HEADER.encode())

    def _check_pending(self) -> None:
        if self.pending is not None:
            raise ValueError(
                f"log_dir {self.path} holds run {self.pending} with logged steps: to resume it, "
                f"call load_state_dict(<its checkpoint>) before step(); to start a new run, "
                f"choose another directory")

    def raise_failure(self) -> None:
        if self.writer is not None and self.writer.failure is not None:
            raise RuntimeError(f"lrfluct_fast: writing the run directory {self.path} failed "
                               f"(log_errors='raise')") from self.writer.failure

    # -- called by the Monitor --
    def after_step(self, monitor) -> None:
        self._check_pending()
        self.step += 1
        self.raise_failure()
        want_metrics = self.step % self.log_every == 0
        want_summary = self.step % self.summary_every == 0
        if want_metrics or want_summary:
            self.log(monitor, want_metrics, want_summary)

    def log(self, monitor, want_metrics: bool, want_summary: bool) -> None:
        monitor.wait_for_weights()  # overlap_weights: the update may still run on its stream
        # Every rank reaches here at the same steps (the all_gather is a collective).
        if want_summary:
            self.last_summary = self.step
        states = monitor._states()
        gathered = layout = None
        if distributed.world_size() > 1:
            flat, layout = distributed.pack(states)
            gathered = distributed.all_gather(flat) if layout else None
        spreads = fsdp.gathered_spreads(states)  # a collective when a layer is FSDP-sharded
        if self.writer is not None and distributed.rank() != 0:
            warnings.warn("lrfluct_fast: this rank is not rank 0 (instrument ran before "
                          "init_process_group): it stops writing the run directory",
                          RuntimeWarning)
            self.writer.stop_soon()
            self.writer = None
        if self.writer is None:
            return
        bufs = snapshot(states, per_rank=gathered is None, spreads=spreads)
        event = None
        if any(t.is_cuda for b in bufs.values() for t in b.values()):
            event = torch.cuda.Event()
            event.record()
        self.writer.put(Item(self.step, monitor.steps, bufs, gathered, layout,
                              want_metrics, want_summary, event))

    def put_window(self, row) -> None:
        """A closed window (windows.py: statistic, first and last step, device copies) to the
        writer, as a record of this run step."""
        if self.writer is None:
            return
        statistic, first, last, copies = row
        event = None
        if any(t.is_cuda for b in copies.values() for t in b.values()):
            event = torch.cuda.Event()
            event.record()
        self.writer.put(WindowItem(self.step, statistic, first, last, copies, event))

    def put_scalars(self, values: dict[str, float], step: int | None) -> None:
        """Rows of scalars.csv at `step` (None: this run step), to the writer."""
        self._check_pending()
        self.raise_failure()
        if self.writer is not None:
            self.writer.put(ScalarItem(self.step if step is None else step, values))

    def flush(self, monitor) -> None:
        self._check_pending()
        if self.last_summary != self.step and self.step > 0:
            self.log(monitor, False, True)
        if self.writer is not None:
            self.writer.drain()
        self.raise_failure()

    def close(self, monitor) -> None:
        try:
            if self.pending is None:  # a run found in log_dir and never resumed is left as it is
                self.flush(monitor)
        finally:
            if self.writer is not None:
                self.writer.stop()
                if self.writer.errors and self.writer.log_errors == "warn":
                    warnings.warn(f"lrfluct_fast: {self.writer.errors} writes to the run "
                                  f"directory {self.path} failed", RuntimeWarning)
                self.writer = None

    def state_dict(self) -> dict[str, Any]:
        if self.writer is not None:
            self.writer.drain()  # the files hold every step up to this checkpoint
        return {"format": FORMAT, "run_id": self.run_id, "step": self.step}

    def load_state_dict(self, saved: dict[str, Any] | None, steps: int) -> None:
        """Continue the run of `saved` (Monitor.state_dict()["run"]; None when the checkpoint
        was taken without a run directory) from its step."""
        step = int(saved["step"]) if saved else steps
        saved_id = saved.get("run_id") if saved else None
        if self.writer is not None:
            self.writer.drain()
            if saved_id is not None and saved_id == self.run_id:
                truncate_after(self.path, step, self.columns)
            elif has_data(self.path):
                of = f"run {saved_id}" if saved_id else "a monitor without a run directory"
                raise ValueError(f"log_dir {self.path} holds run {self.run_id} with logged steps, "
                                 f"the state dict is of {of}: resume from a checkpoint of that "
                                 f"run, or choose another directory")
            elif saved_id is not None:
                self.run_id = saved_id  # an empty directory continues the checkpoint's run
            resumes = [*self.info.get("resumes", []),
                       {"step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
            self.info = {**self.info, "run_id": self.run_id, "resumes": resumes}
            write_json(os.path.join(self.path, RUN_FILE), self.info)
            self.writer.purge_step = step + 1
        self.pending = None
        self.step = step
        self.last_summary = -1
