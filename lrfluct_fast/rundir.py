"""rundir: the run directory of a long training run, the thread that writes it, load_run.

Owns the files under `log_dir` and the writer thread. It reads the Monitor's statistics only
through copies taken in Monitor.step (snapshot) and must not touch the LayerStates, the
model or the optimizer. Only rank 0 writes (see distributed.py).

Files (numpy and pandas read each directly):
  run.json      {"format", "run_id", "created", "world_size", "options", "layers",
                "neurons", "metric_columns", "resumes"}; written whole (temp name, then
                os.replace) at instrument and on resume.
  metrics.csv   header `step,layer,<the keys of mon.metrics()[layer]>`, then one row per
                (logged step, layer), appended every log_every steps; a step's rows go out
                as complete lines in one os.write. Read it with
                np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding=None)
                or pandas.read_csv(path).
  summaries/step_{step:09d}.npz
                every summary_every steps and at flush()/close(): one array per
                "{layer}/{key}", the per-neuron keys of mon.summary() ([N] arrays and the
                scalar "steps"). The per-element weight.temporal_var is not written (it is
                weight-sized; mon.summary() and state_dict() have it). Written as
                summaries/.step_{step:09d}.npz.tmp, then os.replace'd.
  tensorboard/  with tensorboard=True: scalars "{layer}/{metric}" every log_every steps,
                histograms "{layer}/weight.spread" and "{layer}/bias.spread" per summary.
`step` is the run's step: Monitor.step() calls since the run began. reset() does not restart
it and a resumed run continues it (the summaries' "steps" key restarts at reset()).

Crash safety: a SIGKILL at any moment leaves a directory load_run reads. run.json and
summaries appear whole or not at all; load_run ignores a partial last line of metrics.csv
(and a last step with only some of its layers) and leftover temp files; the writer cuts a
partial last line before it appends again. What is lost is what had not reached the files:
the writer's queue. flush() and state_dict() wait until it is written. (Nothing is
fsync'ed: a machine crash or power loss can lose more.)

Off the training step's critical path: at a logging step, step() takes device-side copies
(clone(); the element-mode weight state is reduced on the device to the per-neuron spread,
so a copy is O(neurons)) and puts them on a queue of QUEUE_SIZE items; the writer thread
copies them to the host, computes summaries and metrics and writes. step() never
synchronises with the device. When the queue is full, step() BLOCKS until the writer takes
an item: nothing is dropped, so the files have no gaps (a stalled filesystem stalls
training). Under a process group a logging step also runs one all_gather.

Bounded: the Monitor's state is fixed-size, the queue holds at most QUEUE_SIZE snapshots and
the writer keeps no per-step history, so memory is flat over any number of steps
(measured: 28k logged steps and 1400 summaries of a 2-layer net, no RSS growth after
warm-up; tests/test_rundir.py checks 20k steps).
Disk (measured): metrics.csv grows ~100 bytes per layer per logged step (9 columns, floats
in Python's shortest repr); a summary file is ~3.5 kB per layer (12 arrays with their
npy and zip headers) plus 88 bytes per neuron (11 float64/int64 values). E.g. 100 layers of
1024 neurons, log_every=100, summary_every=1000, 100k steps: 10 MB of metrics.csv and 100
summaries of 9.4 MB each: for wide models, raise summary_every.

Resume: Monitor.state_dict() holds {"run_id", "step"} and waits for the writer. A new
process calls instrument(..., log_dir=same dir), then load_state_dict(checkpoint): rows of
metrics.csv after the checkpoint's step (logged by the crashed run after its checkpoint) are
dropped by rewriting the file atomically, later summaries are deleted, TensorBoard purges
later events, and logging goes on from the checkpoint's step: no gap, no duplicated step.

Refused: a log_dir holding another run with other layers or statistics options (ValueError
at instrument), or a run with logged data that is not resumed (ValueError at the first
step() or flush(), or at load_state_dict of another run's checkpoint).
Write errors (full disk, removed directory): a RuntimeWarning, that item is lost, training
goes on; with log_errors="raise" the next step(), flush() or close() raises RuntimeError.
"""
from __future__ import annotations

import atexit
import csv
import io
import json
import os
import queue
import re
import threading
import uuid
import warnings
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from . import distributed, metrics, ops

FORMAT = 1
RUN_FILE, METRICS_FILE, SUMMARY_DIR, TB_DIR = "run.json", "metrics.csv", "summaries", "tensorboard"
QUEUE_SIZE = 8
# instrument() options that only say where and how often to write: they may change when a
# run resumes; the others define the statistics and must not.
LOG_OPTIONS = ("log_dir", "log_every", "summary_every", "tensorboard", "log_errors")
_SUMMARY_NAME = re.compile(r"step_(\d{9,})\.npz")
_STOP = object()


def check_options(opts: dict[str, Any]) -> None:
    """Validate the run-directory options of instrument()."""
    log_dir = opts["log_dir"]
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a path or None, got {type(log_dir).__name__}")
    for key in ("log_every", "summary_every"):
        v = opts[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
    if opts["log_errors"] not in ("warn", "raise"):
        raise ValueError(f"log_errors must be 'warn' or 'raise', got {opts['log_errors']!r}")
    if not isinstance(opts["tensorboard"], bool):
        raise ValueError(f"tensorboard must be True or False, got {opts['tensorboard']!r}")
    if opts["tensorboard"]:
        if log_dir is None:
            raise ValueError("tensorboard=True writes into the run directory: pass log_dir too")
        _summary_writer_class()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("tensorboard=True needs the tensorboard package "
                          "(pip install tensorboard)") from e
    return SummaryWriter


# -- snapshot: the only work a logging step does on the statistics --------------------------
@torch.no_grad()
def snapshot(states, *, per_rank: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Device-side copies of what a logged step needs: {layer: {buffer key: tensor}}.

    The element-mode weight state (weight-sized) is replaced by its per-neuron
    "weight.spread"; per_rank=False leaves out the activation and gradient statistics
    (they travel through distributed.pack instead).
    """
    out = {}
    for name, st in states:
        snap = {}
        element = st.track["weight"] and st.weight_mode == "element"
        for key, t in st.buffers.items():
            kind = key.partition(".")[0]
            if (kind == "weight" and element) or (kind in distributed.PER_RANK and not per_rank):
                continue
            snap[key] = t.clone()
        if element:
            snap["weight.spread"] = _weight_spread(st.buffers["weight.counts"],
                                                   st.buffers["weight.moments"])
        out[name] = snap
    return out


def _weight_spread(counts: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """metrics.weight_spread of the temporal variance, on the device ([N])."""
    dtype = torch.float32 if counts.device.type == "mps" else torch.float64
    n = counts.to(dtype)
    var = torch.where(n > 0, moments[ops.M2].to(dtype) / n, torch.nan)
    return var.reshape(var.shape[0], -1).mean(1).sqrt()


@dataclass
class _Item:
    step: int                       # the run's step
    steps: int                      # Monitor.steps (since reset): the summaries' "steps"
    buffers: dict
    gathered: torch.Tensor | None   # distributed.all_gather(pack(...)), or None
    layout: list | None
    metrics: bool
    summary: bool
    event: Any = None               # CUDA event recorded after the copies


# -- the writer thread ------------------------------------------------------------------------
class _Writer:
    """Turns snapshots into files, in a daemon thread fed by a bounded queue."""

    def __init__(self, path: str, specs, metric_options, columns, tensorboard: bool,
                 log_errors: str):
        self.path, self.specs, self.metric_options = path, specs, metric_options
        self.columns, self.tensorboard, self.log_errors = columns, tensorboard, log_errors
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.errors = 0
        self.failure: BaseException | None = None   # the first error, with log_errors="raise"
        self.purge_step: int | None = None          # TensorBoard: drop events from here on
        self._tb = None
        self._cut_tail = True  # metrics.csv may end in a partial line: cut it before appending
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
                    self._write(item)
            except BaseException as err:  # the thread must outlive any error
                self._failed(err, item)
            finally:
                self.queue.task_done()

    def _failed(self, err: BaseException, item) -> None:
        self.errors += 1
        self._cut_tail = True
        if self.log_errors == "raise":
            self.failure = self.failure or err
            return
        if self.errors == 1 or self.errors % 100 == 0:
            step = getattr(item, "step", "?")
            warnings.warn(f"lrfluct_fast: writing step {step} to the run directory {self.path} "
                          f"failed ({type(err).__name__}: {err}); training goes on and that "
                          f"step's records are lost ({self.errors} failed writes so far; "
                          f"log_errors='raise' stops training instead)", RuntimeWarning)

    def _write(self, item: _Item) -> None:
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
        if item.summary:
            self._write_summary(item.step, summaries)
        if self._tb is not None:
            self._tb.flush()

    def _append_metrics(self, step: int, summaries) -> None:
        values = {name: metrics.layer_metrics(s, **self.metric_options) for name, s in summaries.items()}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for name, m in values.items():
            w.writerow([step, name, *(m[c] for c in self.columns)])
        path = os.path.join(self.path, METRICS_FILE)
        if self._cut_tail:
            _cut_partial_line(path, _header(self.columns))
            self._cut_tail = False
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # no O_CREAT: a vanished file is an error
        try:
            data = memoryview(buf.getvalue().encode("utf-8"))
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        if self.tensorboard:
            tb = self._tb_writer()
            for name, m in values.items():
                for c, v in m.items():
                    tb.add_scalar(f"{name}/{c}", v, step)

    def _write_summary(self, step: int, summaries) -> None:
        arrays = {f"{name}/{key}": v for name, s in summaries.items() for key, v in s.items()}
        sdir = os.path.join(self.path, SUMMARY_DIR)
        tmp = os.path.join(sdir, f".step_{step:09d}.npz.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, os.path.join(sdir, f"step_{step:09d}.npz"))
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
            self._tb = _summary_writer_class()(os.path.join(self.path, TB_DIR),
                                               purge_step=self.purge_step)
        return self._tb


_LIVE: "weakref.WeakSet[_Writer]" = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for w in list(_LIVE):
        w.stop(timeout=30.0)


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
        self.writer: _Writer | None = None
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
        }
        self._open()
        specs = {name: (dict(st.track), st.weight_mode) for name, st in states}
        self.writer = _Writer(self.path, specs,
                              dict(dead_threshold=opts["dead_threshold"], energy=opts["energy"]),
                              self.columns, opts["tensorboard"], opts["log_errors"])
        weakref.finalize(monitor, self.writer.stop_soon)

    def _open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        if not os.path.exists(os.path.join(self.path, RUN_FILE)):
            # _create writes run.json first: these files are not ours
            if os.path.exists(os.path.join(self.path, METRICS_FILE)) or _has_data(self.path):
                raise ValueError(f"log_dir {self.path} holds {METRICS_FILE} or summaries but no "
                                 f"{RUN_FILE}: choose an empty directory")
            return self._create()
        theirs = _read_run_info(self.path)
        stats = {k: v for k, v in self.info["options"].items() if k not in LOG_OPTIONS}
        their_stats = {k: v for k, v in theirs.get("options", {}).items() if k not in LOG_OPTIONS}
        if theirs["layers"] != self.info["layers"] or their_stats != stats:
            raise ValueError(
                f"log_dir {self.path} holds run {theirs['run_id']} of other layers or options "
                f"(layers {theirs['layers']}, options {their_stats}; now {self.info['layers']}, "
                f"{stats}): choose another directory")
        if not _has_data(self.path):
            return self._create()
        self.pending = self.run_id = theirs["run_id"]
        self.info = {**self.info, **{k: theirs[k] for k in ("run_id", "created", "resumes") if k in theirs}}

    def _create(self) -> None:
        os.makedirs(os.path.join(self.path, SUMMARY_DIR), exist_ok=True)
        _write_json(os.path.join(self.path, RUN_FILE), self.info)
        _atomic_write(os.path.join(self.path, METRICS_FILE), _header(self.columns).encode())

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
        # Every rank reaches here at the same steps (the all_gather is a collective).
        if want_summary:
            self.last_summary = self.step
        states = monitor._states()
        gathered = layout = None
        if distributed.world_size() > 1:
            flat, layout = distributed.pack(states)
            gathered = distributed.all_gather(flat) if layout else None
        if self.writer is not None and distributed.rank() != 0:
            warnings.warn("lrfluct_fast: this rank is not rank 0 (instrument ran before "
                          "init_process_group): it stops writing the run directory",
                          RuntimeWarning)
            self.writer.stop_soon()
            self.writer = None
        if self.writer is None:
            return
        bufs = snapshot(states, per_rank=gathered is None)
        event = None
        if any(t.is_cuda for b in bufs.values() for t in b.values()):
            event = torch.cuda.Event()
            event.record()
        self.writer.put(_Item(self.step, monitor.steps, bufs, gathered, layout,
                              want_metrics, want_summary, event))

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
                _truncate(self.path, step, self.columns)
            elif _has_data(self.path):
                of = f"run {saved_id}" if saved_id else "a monitor without a run directory"
                raise ValueError(f"log_dir {self.path} holds run {self.run_id} with logged steps, "
                                 f"the state dict is of {of}: resume from a checkpoint of that "
                                 f"run, or choose another directory")
            elif saved_id is not None:
                self.run_id = saved_id  # an empty directory continues the checkpoint's run
            resumes = [*self.info.get("resumes", []),
                       {"step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
            self.info = {**self.info, "run_id": self.run_id, "resumes": resumes}
            _write_json(os.path.join(self.path, RUN_FILE), self.info)
            self.writer.purge_step = step + 1
        self.pending = None
        self.step = step
        self.last_summary = -1


# -- files ------------------------------------------------------------------------------------
def _header(columns) -> str:
    return ",".join(["step", "layer", *columns]) + "\n"


def _atomic_write(path: str, data: bytes) -> None:
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def _cut_partial_line(path: str, header: str) -> None:
    """Drop a last line without its newline (a write that was killed or failed)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            f.write(header.encode())
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            i = f.read(pos - start).rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            pos = start
        f.seek(0)
        f.truncate(0)
        f.write(header.encode())


def _has_data(path: str) -> bool:
    """The directory holds logged steps: metrics rows or summaries."""
    try:
        with open(os.path.join(path, METRICS_FILE), "rb") as f:
            head = f.read(65536)
        nl = head.find(b"\n")
        if nl >= 0 and len(head) > nl + 1:
            return True
    except FileNotFoundError:
        pass
    sdir = os.path.join(path, SUMMARY_DIR)
    return os.path.isdir(sdir) and any(_SUMMARY_NAME.fullmatch(f) for f in os.listdir(sdir))


def _truncate(path: str, step: int, columns) -> None:
    """Keep what was logged up to `step`: metrics.csv rewritten atomically, later summaries
    and leftover temp files removed."""
    file = os.path.join(path, METRICS_FILE)
    header, rows = _read_csv(file) if os.path.exists(file) else (None, [])
    buf = io.StringIO()
    buf.write(",".join(header) + "\n" if header else _header(columns))
    w = csv.writer(buf, lineterminator="\n")
    for _, row in rows:
        if int(row[0]) <= step:
            w.writerow(row)
    _atomic_write(file, buf.getvalue().encode("utf-8"))
    sdir = os.path.join(path, SUMMARY_DIR)
    os.makedirs(sdir, exist_ok=True)
    for name in os.listdir(sdir):
        m = _SUMMARY_NAME.fullmatch(name)
        if (m and int(m.group(1)) > step) or name.endswith(".tmp"):
            os.remove(os.path.join(sdir, name))
    for name in os.listdir(path):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(path, name))


def _read_csv(file: str) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """(header, [(line number, row)]) of the complete lines of metrics.csv; ValueError naming
    the file and line for anything that is not a metrics row."""
    with open(file, "rb") as f:
        raw = f.read()
    raw = raw[:raw.rfind(b"\n") + 1]  # a partial last line is a killed write, not data
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"corrupt metrics file {file}: {e}") from None
    if not rows:
        return None, []
    header = rows[0]
    if header[:2] != ["step", "layer"]:
        raise ValueError(f"corrupt metrics file {file}: line 1 is not the header 'step,layer,...'")
    out = []
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"corrupt metrics file {file}, line {i}: {len(row)} fields, "
                             f"the header has {len(header)}")
        try:
            int(row[0])
            [float(v) for v in row[2:]]
        except ValueError:
            raise ValueError(f"corrupt metrics file {file}, line {i}: not a number in {row}") from None
        out.append((i, row))
    return header, out


def _read_run_info(path: str) -> dict[str, Any]:
    file = os.path.join(path, RUN_FILE)
    try:
        with open(file, "rb") as f:
            info = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is not a run directory: it has no {RUN_FILE}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt run file {file}: {e}") from None
    if not isinstance(info, dict) or not {"run_id", "layers", "format"} <= set(info):
        raise ValueError(f"corrupt run file {file}: not an lrfluct_fast run description")
    if info["format"] != FORMAT:
        raise ValueError(f"{file}: run directory format {info['format']!r}, this version reads {FORMAT}")
    return info


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
class Run:
    """A run directory read back by load_run."""
    path: str
    info: dict[str, Any]     # run.json
    metrics: Metrics
    summaries: list[tuple[int, dict[str, dict[str, np.ndarray]]]]  # (step, {layer: {key: array}})

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
    """Read a run directory: run.json, metrics.csv and summaries/ (see the module docstring).

    A partial last line of metrics.csv, a last step with only some of its layers, and temp
    files are ignored (a run killed while writing); a corrupt file raises ValueError naming it.
    """
    path = os.fspath(path)
    info = _read_run_info(path)
    columns = ["step", "layer", *info.get("metric_columns", [])]
    file = os.path.join(path, METRICS_FILE)
    header, rows = _read_csv(file) if os.path.exists(file) else (None, [])
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
    return Run(path, info, table, _read_summaries(path))


def _read_summaries(path: str):
    sdir = os.path.join(path, SUMMARY_DIR)
    if not os.path.isdir(sdir):
        return []
    out = []
    for name in os.listdir(sdir):
        m = _SUMMARY_NAME.fullmatch(name)
        if not m:
            continue  # temp files of a write that did not finish
        file = os.path.join(sdir, name)
        layers: dict[str, dict[str, np.ndarray]] = {}
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
