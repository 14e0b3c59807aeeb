"""instrument() and Monitor: wrap a model's layers, step the weight statistics, read results.

The Monitor owns the set of wrapped layers and their LayerStates, the step count and the
options. It touches a model only by swapping served modules' classes (instrument) and
back (remove); it never changes parameters, gradients or the optimizer. The training-step
path (forward, backward, step()) never synchronises with the host: summaries copy to the
host only when asked for.

Options (keyword arguments of `instrument`; options.py checks each one's type and range):
  activations, gradients, weights, biases   what to track (all True)
  every        observe one step in `every` (1): forwards/backwards of that step and the
               weights after it; the others run the plain torch path
  weight_mode  "element" (default): per-element temporal variance of every weight,
               3 float32 + 3 float64 + 1 int32 of state per weight (40 bytes; the float64
               master keeps long runs exact); weight.spread_j is the RMS over
               neuron j's incoming weights of their temporal std.
               "neuron": O(neurons) memory; records each neuron's RMS incoming weight
               r_j = sqrt(mean_i w_ji^2) per step, and weight.spread_j is the temporal std
               of r_j. It sees changes of a neuron's weight scale, not rotations at
               constant norm, so it is a different (smaller) number than the element mode's;
               weight.temporal_var is absent.
  dead_threshold  a neuron is dead when its active fraction is below this (0.01)
  energy       the per-neuron energy of the participation ratio: "weight" (spread^2),
               "gradient" (gradient var) or "activation" (activation var)
  log_dir      a run directory to write (None: off); see rundir/__init__.py for its files,
               crash safety and resume. Written by a writer thread, by rank 0 only.
  log_every    metrics (mon.metrics() values) appended to metrics.csv every this many steps (100)
  summary_every  per-neuron summaries written every this many steps (1000), and at
               flush() / close()
  tensorboard  also write TensorBoard scalars and histograms (False; needs tensorboard)
  log_errors   a failed write: "warn" (training goes on) or "raise" (the next step raises)
  windows      {statistic: steps}: each of "activation", "gradient", "weight", "bias" named
               gets its own window of that many steps (1: every step), closed by step()
               into a row of per-neuron summaries (mon.closed_windows(), and the run
               directory with log_dir); statistics not named have one window, the whole
               run. summary() stays the whole run either way (windows.py). None: no windows.
  grad_scaler  the torch.amp.GradScaler of the training loop (None): dL/dz is recorded
               divided by its scale, and the gradient statistics of a step the scaler skips
               (inf/nan gradients) are dropped. Call mon.step() after scaler.update().
  overlap_weights  True: step()'s weight update runs on a side CUDA stream, overlapping the
               next forward; the next optimizer step, summaries, state_dict and windows wait
               for it on the device (overlap.py). CUDA parameters only. Default False.
  drift        True: summaries gain "weight.drift" (each neuron's L2 distance from its weights
               at the first observed step) and "weight.update_size" (the mean L2 norm of its
               weights' change per observed step); see drift.py for reset, every, windows,
               resume and FSDP. Two weight-sized copies of state and about three extra reads
               of the weights per observed step. Default False.

Threads: summary(), metrics() and state_dict() may be called from any thread and return
the statistics of one moment (reads.py: another thread's read is served at the training
thread's next step(), which otherwise pays one attribute check); so may closed_windows().
The other methods (step, reset, paused, close_windows, flush, close, load_state_dict,
remove) belong to the training thread.

Under an initialized torch.distributed process group, summary(), metrics() and logging merge
every rank's activation and gradient statistics (distributed.py): they are collectives, to be
called on every rank. A model sharded by FSDP2 (fully_shard) is monitored when instrumented
after sharding: each rank keeps the weight statistics of its own shard (fsdp.py); state_dict()
is then per rank.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _backend, distributed, drift, fsdp, metrics, ops, rundir, windows
from . import options as options_
from .layers import kind_of, parameter_kind, parameter_value
from .nn import GradScale, LayerState, unwrap, wrap
from . import overlap
from .overlap import WeightStream
from .reads import ConsistentReads

_thread_id = threading.get_ident
READ_TIMEOUT_S = 60.0  # how long a read from another thread waits for a step boundary

# Layout of state_dict(); 2: weight and bias temporal state as (tally, skipped, moments);
# 3: (tally, skipped, moments, master), a float64 master under a float32 block (version 2 is read).
STATE_VERSION = 3


class Monitor:
    """Per-neuron statistics of the layers `instrument` wrapped. See the module docstring."""

    def __init__(self, model: nn.Module, states: dict[str, LayerState], layers: dict[str, nn.Module],
                 skipped: list[tuple[str, str]], options: dict[str, Any],
                 grad_scale: GradScale | None = None):
        self.model = model
        self.states = states   # layer name -> its statistics
        self.layers = layers   # layer name -> the module holding its parameters
        self.skipped = skipped
        self.options = options
        self.steps = 0
        self._grad_scale = grad_scale
        self._warned: set[tuple[str, str]] = set()  # (layer, kind) already warned of no data
        self._plan: _StepPlan | None = None  # what step() records, checked once (see _StepPlan)
        self._drift_observed = 0  # observed steps in the drift state (drift=True; drift.py)
        self._sampling = True
        self._removed = False
        self._run: rundir.RunLog | None = None  # the run directory, with instrument(log_dir=...)
        self._reads = ConsistentReads()  # summary() and state_dict() from other threads
        # windows per statistic (windows.py): adds the whole-run totals to the states' buffers
        self._windows = windows.Windows(options["windows"], states) if options["windows"] else None
        # overlap_weights: the weight update on a side CUDA stream (overlap.py)
        self._weight_stream = None
        if options.get("overlap_weights"):
            self._weight_stream = WeightStream(next(iter(states.values())).device)

    def _states(self):
        return list(self.states.items())

    # -- training-step path ---------------------------------------------------------------
    def step(self) -> None:
        """Call after optimizer.step(): records weights and biases (one multi-tensor call)."""
        # Grad mode set by hand, not by @torch.no_grad(): the decorator is five Python calls a
        # step, 8-11 us of the autoencoder's step once the step's data evicted their code.
        grad_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            self._check_live()
            if self.steps % self.options["every"] == 0:
                self._record_weights()
            self.steps += 1
            if self._grad_scale is not None:
                self._commit_scaled_gradients()
            observe_next = self.steps % self.options["every"] == 0
            if observe_next != self._sampling:  # every > 1: flips; every == 1: never, no loop
                self._sampling = observe_next
                for _, st in self._states():
                    st.sampling = observe_next
            if self._run is not None:
                self._run.after_step(self)
            if self._windows is not None:
                if self._windows.closes_at(self.steps):
                    self.wait_for_weights()
                self._windows.after_step(self.steps, self._run.put_window if self._run is not None else None)
            reads = self._reads
            reads.training_thread = _thread_id()
            if reads.pending is not None:  # another thread waits for a step boundary to read at
                reads.serve(lambda: self._statistics(copy=True))
        finally:
            torch.set_grad_enabled(grad_enabled)

    def _record_weights(self) -> None:
        plan = self._plan
        if plan is not None and plan.native is not None:
            if plan.native.run(ops.FLUSH_EVERY):  # False: it found a watched parameter changed
                return
            plan = None
        if plan is None or not plan.valid():
            plan = self._new_plan()
            if plan.native is not None:
                plan.native.run(ops.FLUSH_EVERY)  # checked just now: it runs
                return
        started = self._drift_observed > 0
        if self._weight_stream is not None:
            self._weight_stream.run(lambda: self._update_weights(plan, started))
        else:
            self._update_weights(plan, started)
        if plan.drift is not None:
            self._drift_observed += 1

    def _update_weights(self, plan: "_StepPlan", drift_started: bool) -> None:
        values = plan.values + [_computed_value(m, st, role) for m, st, role in plan.computed]
        if values:
            ops.temporal_update(values, *plan.temporal, flush_every=ops.FLUSH_EVERY)
        if plan.drift is not None:
            plan.drift.update([v if isinstance(v, torch.Tensor) else _raw_weight(m, st)
                               for v, m, st in plan.drift_values], drift_started)

    def wait_for_weights(self) -> None:
        """With overlap_weights=True: make the current CUDA stream wait for the last weight
        update (no host synchronisation). Summaries, state_dict, windows and the next
        optimizer step do it themselves; call it before writing parameters in place by other
        means (model.load_state_dict, p.data edits). Without the option: nothing to wait for."""
        if self._weight_stream is not None:
            self._weight_stream.wait()

    def _new_plan(self) -> "_StepPlan":
        """Check every recorded parameter (placement, shape) and list what step() hands the
        temporal update; kept while no parameter is replaced, moved or cast."""
        plan = _StepPlan()
        for name, m in self.layers.items():
            st = self.states[name]
            for role in ("weight", "bias"):
                if not st.track[role] or (role == "weight" and st.weight_shared_with is not None):
                    continue
                value = _checked_value(m, st, role)
                direct = (isinstance(value, nn.Parameter) and role not in st.shards
                          and (role == "bias" or st.weight_mode == "element"))
                if direct:  # the parameter itself, read in place: nothing to compute per step
                    plan.read_in_place(m, st.params[role], value, st.temporal_state(role))
                else:       # parametrized, or the per-neuron RMS: computed each step
                    plan.compute(m, st, role, st.temporal_state(role))
                    source = (st.rms_source(value) if role == "weight" and role not in st.shards
                              and isinstance(value, nn.Parameter) else None)
                    if source is not None:  # a per-neuron RMS the C++ step can take in place
                        plan.rms_in_place(m, st.params[role], value, *source)
        drifting = [(name, st) for name, st in self.states.items() if drift.has_state(st.buffers)]
        if drifting:
            plan.drift = drift.DriftStep(st for _, st in drifting)
            for name, st in drifting:
                value = _checked_value(self.layers[name], st, "weight")
                if isinstance(value, nn.Parameter):  # read in place, watched like the others
                    plan.watch(self.layers[name], st.params["weight"], value)
                plan.drift_values.append((value.detach() if isinstance(value, nn.Parameter) else None,
                                          self.layers[name], st))  # else computed each step
        plan.temporal = plan.states()
        if self._weight_stream is None:
            plan.native = plan.native_plan()
        self._plan = plan
        return plan

    def _commit_scaled_gradients(self) -> None:
        """This step's gradient statistics into the running state, unless the scaler skipped it."""
        staged = [st for _, st in self._states() if st.staged is not None]
        if staged:
            keep = self._grad_scale.kept(staged[0].device)
            for st in staged:
                st.commit_staged(keep.to(st.device))

    @contextlib.contextmanager
    def paused(self):
        """Observe nothing inside: no forward run and no backward run in the block is counted
        (measurement passes such as Hessian-vector products or a gradient penalty's first
        backward). The weights' statistics are recorded by step() as usual."""
        self._check_live()
        states = [st for _, st in self._states()]
        before = [st.paused for st in states]
        for st in states:
            st.paused = True
        try:
            yield self
        finally:
            for st, was in zip(states, before):
                st.paused = was

    def reset(self) -> None:
        """Start anew: forget every statistic (whole-run totals and open windows) and the
        step count. Closed windows not read yet stay readable (closed_windows())."""
        self._check_live()
        self.steps = 0
        self._drift_observed = 0
        self._warned.clear()
        self._sampling = True
        for _, st in self._states():
            st.reset()
            st.sampling = True
        if self._windows is not None:
            self._windows.restart(0)

    # -- results --------------------------------------------------------------------------
    def summary(self, *, timeout: float | None = READ_TIMEOUT_S) -> dict[str, dict[str, np.ndarray]]:
        """{layer: {key: numpy array}} with the keys of DESIGN section 2 (on every rank, merged;
        without weight.temporal_var for FSDP-sharded layers).

        From any thread, the statistics of one moment: read directly in the training thread,
        else at its next step boundary (reads.py); `timeout` (seconds, None: no limit) bounds
        the wait while the statistics keep changing without one."""
        self._check_live()
        buffers, steps = self._read("summary()", timeout)
        host = distributed.host_buffers({name: drift.reduced(self.states[name], windows.whole_run(bufs))
                                         for name, bufs in buffers.items()},
                                        self._states())  # every rank's batches, gathered spreads
        out = {name: metrics.layer_summary(host[name], track=st.track, weight_mode=st.weight_mode,
                                           steps=steps, weight_rows=_numpy(st.weight_rows))
               for name, st in self._states()}
        self._warn_unobserved(out)
        self._warn_nonfinite_drift(out)
        return out

    def _warn_nonfinite_drift(self, summaries) -> None:
        """One warning naming each layer (once) whose weights were non-finite (drift=True)."""
        bad = [name for name in drift.nonfinite_layers(summaries, self._drift_observed)
               if (name, "drift") not in self._warned]
        if bad:
            self._warned.update((name, "drift") for name in bad)
            warnings.warn(f"lrfluct_fast: non-finite weights in layer(s) {', '.join(map(repr, bad))}: "
                          f"their weight.drift / weight.update_size are nan for the neurons "
                          f"concerned", RuntimeWarning, stacklevel=3)

    def _read(self, what: str, timeout) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
        """({layer: {buffer key: tensor}}, steps) of one moment (see summary())."""
        if timeout is not None:
            options_.check_seconds("timeout", timeout)
        if distributed.world_size() > 1 and not self._reads.in_training_thread():
            raise RuntimeError(f"{what} under a process group is a collective: call it from "
                               f"the training thread, on every rank")
        return self._reads.read(lambda: self._statistics(copy=not self._reads.in_training_thread()),
                                self._counts_fingerprint, torch.equal, timeout, what)

    def _statistics(self, copy: bool):
        """The statistics buffers and the step count: the live tensors, or host copies."""
        take = (lambda t: t.to("cpu", copy=True)) if copy else (lambda t: t)
        self.wait_for_weights()
        return ({name: {k: take(t) for k, t in st.buffers.items()} for name, st in self._states()},
                self.steps)

    def _counts_fingerprint(self) -> torch.Tensor:
        """Every count and tally in one host tensor: any write to the statistics changes it."""
        parts = [t.reshape(-1) for _, st in self._states() for k, t in st.buffers.items()
                 if k.endswith((".counts", ".tally"))]
        return torch.cat([p.to("cpu") for p in parts]) if parts else torch.zeros(0)

    def _warn_unobserved(self, summaries) -> None:
        """One warning naming each layer (once) with no activation or gradient observation."""
        missing = []
        for name, st in self._states():
            kinds = [k for k in ("activation", "gradient") if st.track[k] and st.neurons
                     and (name, k) not in self._warned
                     and summaries[name][f"{k}.count"].sum() + summaries[name][f"{k}.nonfinite"].sum() == 0]
            if kinds:
                self._warned.update((name, k) for k in kinds)
                cause = st.unobserved or "no training forward ran through it"
                missing.append(f"{name!r} ({' and '.join(kinds)}: {cause})")
        if missing:
            warnings.warn(f"lrfluct_fast: no observation for layer(s) {', '.join(missing)}; "
                          f"their statistics and the metrics derived from them are nan",
                          RuntimeWarning, stacklevel=3)

    def closed_windows(self, statistic: str | None = None) -> list[windows.Window]:
        """The windows closed since the last call (instrument's `windows` option), oldest
        first, each a windows.Window (statistic, first_step, last_step, layers: {layer:
        {key: [N] per-neuron array}}); of one statistic ("activation", "gradient", "weight",
        "bias") or all. Returned rows are forgotten; at most windows.KEPT_ROWS unread rows
        are kept (with log_dir every row is also in the run directory: lf.load_run)."""
        self._check_live()
        if statistic is not None:
            options_.check_choice("statistic", statistic, windows.STATISTICS)
        return self._windows.take_rows(statistic) if self._windows is not None else []

    def close_windows(self, *statistics: str) -> None:
        """Close the open windows of `statistics` (default: every windowed statistic) now,
        after the last step(), when they hold a step (an epoch's end). The next window of
        each ends at the next multiple of its length. Training thread only."""
        self._check_live()
        if self._windows is None:
            raise ValueError("close_windows() needs windows: instrument(model, windows={...})")
        for statistic in statistics:
            options_.check_choice("statistic", statistic, tuple(self._windows.every))
        self.wait_for_weights()
        self._windows.close_now(self.steps, self._run.put_window if self._run is not None else None,
                                statistics)

    def metrics(self, *, timeout: float | None = READ_TIMEOUT_S) -> dict[str, dict[str, float]]:
        """{layer: {metric: float}}: spread_of_spread, spread_cv, participation_ratio, ...
        of one summary() (from any thread, as summary())."""
        return {name: metrics.layer_metrics(s, dead_threshold=self.options["dead_threshold"],
                                            energy=self.options["energy"])
                for name, s in self.summary(timeout=timeout).items()}

    def memory_bytes(self) -> int:
        """Bytes of statistics state the monitor holds (flat over steps)."""
        self._check_live()
        unique = {id(t): t for _, st in self._states() for t in st.buffers.values()}  # tied: once
        return sum(t.numel() * t.element_size() for t in unique.values())

    # -- run directory --------------------------------------------------------------------
    def flush(self) -> None:
        """Write a summary of this step and wait until the run directory holds everything
        logged so far (no-op without log_dir; a collective under a process group)."""
        self._check_live()
        if self._run is not None:
            self._run.flush(self)

    def log_scalars(self, values: dict[str, float], step: int | None = None) -> None:
        """Append {name: value} (a sharpness, a spectral norm) to the run directory's
        scalars.csv at `step` (default: the run's step, Monitor.step() calls since the run
        began), one row per name, by the writer thread; cut on resume like metrics.csv.
        A no-op without log_dir; the arguments are checked either way."""
        self._check_live()
        values = rundir.check_scalars(values, step)
        if self._run is not None:
            self._run.put_scalars(values, None if step is None else int(step))

    def close(self) -> None:
        """flush(), then end the writer; monitoring goes on without a run directory."""
        if self._run is not None and not self._removed:
            run, self._run = self._run, None
            run.close(self)

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The statistics, step count and options, for load_state_dict (a checkpoint); under
        FSDP2, this rank's shards ("sharding": loaded on the same rank only)."""
        self._check_live()
        buffers, steps = self._read("state_dict()", READ_TIMEOUT_S)
        devices = {name: {k: t.device for k, t in st.buffers.items()} for name, st in self._states()}
        sd = {"version": STATE_VERSION, "steps": steps, "options": dict(self.options),
              "layers": {name: {k: t.to(devices[name][k], copy=True) for k, t in bufs.items()}
                         for name, bufs in buffers.items()}}
        sharding = fsdp.sharding_info(self._states())
        if sharding is not None:
            sd["sharding"] = sharding
        if self._run is not None:
            sd["run"] = self._run.state_dict()  # waits until the files hold every logged step
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore statistics saved by state_dict() into a Monitor of the same model and options."""
        self._check_live()
        _check_state_dict(sd)
        if sd["version"] == 2:
            sd = {**sd, "layers": {name: LayerState.upgrade_single_level(saved)
                                   for name, saved in sd["layers"].items()}}
        saved_opts, opts = ({k: v for k, v in {**options_.DEFAULTS, **o}.items()
                             if k not in rundir.LOG_OPTIONS + options_.FREE_AT_RESUME}
                            for o in (sd["options"], self.options))  # DEFAULTS: options added later
        if saved_opts != opts:
            raise ValueError(f"monitor options differ: saved {saved_opts}, now {opts}")
        fsdp.check_resume(sd.get("sharding"), fsdp.sharding_info(self._states()))
        if set(sd["layers"]) != set(self.layers):
            raise ValueError(f"monitored layers differ: saved {sorted(sd['layers'])}, "
                             f"now {sorted(self.layers)}")
        # drift state (drift.py): restored when every drifting layer has it, else started anew
        drift_saved = all(drift.has_state(sd["layers"][name]) for name, st in self._states()
                          if drift.has_state(st.buffers))
        for name, st in self._states():
            saved = sd["layers"][name]
            for key, t in st.buffers.items():
                if key.startswith(drift.PREFIX) and not drift_saved:
                    continue
                if not isinstance(saved.get(key), torch.Tensor) or saved[key].shape != t.shape:
                    raise ValueError(f"state of layer {name!r}: {key} missing or of another shape")
        if self._run is not None:
            self._run.load_state_dict(sd.get("run"), int(sd["steps"]))
        self._drift_observed = 0
        for name, st in self._states():
            for key, t in st.buffers.items():
                if key.startswith(drift.PREFIX) and not drift_saved:
                    t.zero_()
                    continue
                t.copy_(sd["layers"][name][key])
                if key == drift.PREFIX + "tally":
                    self._drift_observed = int(t[0])
        if not drift_saved:
            warnings.warn("lrfluct_fast: the monitor state holds no drift state (saved with "
                          "drift=False or by an older version): weight.drift and "
                          "weight.update_size count from the first step after this load",
                          RuntimeWarning, stacklevel=2)
            if st.staged is not None:
                for t in st.staged:
                    t.zero_()
        self.steps = int(sd["steps"])
        if self._windows is not None:
            self._windows.restart(self.steps)
        self._sampling = self.steps % self.options["every"] == 0
        for _, st in self._states():
            st.sampling = self._sampling

    def remove(self) -> None:
        """Put the original torch modules back (same objects, trained parameters kept)."""
        if self._removed:
            return
        try:
            self.close()  # writes the last summary (a collective under a process group)
        finally:
            for m in self.layers.values():
                unwrap(m)
            if self._weight_stream is not None:
                self._weight_stream.close()
            self._removed = True

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this Monitor was removed; call lf.instrument(model) again")

    def coverage(self) -> dict[str, Any]:
        """How much of the model is monitored: trainable parameters in monitored layers (a
        parameter shared by several layers, such as tied embeddings, counted once), their
        fraction, and each skipped module with its reason."""
        monitored = {id(p) for name, m in self.layers.items()
                     for p in _parameters_of(m, self.states[name])}
        trainable = {id(p): p.numel() for p in self.model.parameters() if p.requires_grad}
        total = sum(trainable.values())
        covered = sum(n for i, n in trainable.items() if i in monitored)
        return {"trainable_parameters": total, "monitored_parameters": covered,
                "fraction": covered / total if total else float("nan"),
                "layers": len(self.states), "skipped": list(self.skipped)}

    def __str__(self) -> str:
        c = self.coverage()
        lines = [f"{self!r}",
                 f"monitored: {c['monitored_parameters']:,} of {c['trainable_parameters']:,} "
                 f"trainable parameters ({100 * c['fraction']:.2f}%) in {c['layers']} layers"]
        lines += [f"skipped {name or '(model)'}: {reason}" for name, reason in c["skipped"]]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Monitor({len(self.states)} layers, {len(self.skipped)} skipped, "
                f"steps={self.steps}, backend={_backend_name(self.layers)})")


def _check_state_dict(sd) -> None:
    """Refuse what is not a Monitor.state_dict(), naming what is wrong."""
    if not isinstance(sd, dict):
        raise TypeError(f"load_state_dict expects the dict of Monitor.state_dict(), "
                        f"got {options_.describe(sd)}")
    if sd.get("version") not in (2, STATE_VERSION):
        raise ValueError(f"unsupported monitor state version {sd.get('version')!r} "
                         f"(this version reads 2 and {STATE_VERSION})")
    for key, kind, what in (("steps", int, "an integer"), ("options", dict, "a dict"),
                            ("layers", dict, "a dict")):
        if not isinstance(sd.get(key), kind) or isinstance(sd.get(key), bool):
            raise ValueError(f"monitor state: {key!r} must be {what}, "
                             f"got {options_.describe(sd.get(key))}")
    if sd["steps"] < 0:
        raise ValueError(f"monitor state: 'steps' must be >= 0, got {sd['steps']}")
    bad = [name for name, saved in sd["layers"].items() if not isinstance(saved, dict)]
    if bad:
        raise ValueError(f"monitor state: layers {bad} do not map buffer names to tensors")
    if sd.get("run") is not None and not isinstance(sd["run"], dict):
        raise ValueError(f"monitor state: 'run' must be a dict or None, got {options_.describe(sd['run'])}")


class _StepPlan:
    """What Monitor.step hands the temporal update: the parameters it reads in place (their
    detached aliases, made once) and those it computes each step (parametrized weights and
    biases, the per-neuron RMS), with their states in the same order. It stays valid while
    every watched attribute still holds the same parameter with the same storage (a move or
    cast gives it new storage), so a step costs a few attribute reads per tensor; anything
    else rebuilds it with every check. On CPU, with every value read in place or the
    per-neuron RMS of a parameter read in place, the step is one C++ call (`native`, a
    `_C.TemporalPlan`) that makes those reads itself."""

    def __init__(self):
        self.values: list[torch.Tensor] = []
        self.computed: list[tuple[nn.Module, LayerState, str]] = []
        self._direct_states, self._computed_states = [], []
        self._watch: list[tuple[dict, str, nn.Parameter, int, torch.dtype]] = []
        # drift=True (drift.py): the pass, and per layer (its weight read in place or None:
        # computed each step, module, LayerState)
        self.drift: drift.DriftStep | None = None
        self.drift_values: list[tuple[torch.Tensor | None, nn.Module, LayerState]] = []
        self.native = None  # the C++ TemporalPlan, where native_plan() gives one
        self.rms: list[tuple[torch.Tensor, int]] = []  # (parameter, neuron axis) per RMS it can take

    def native_plan(self):
        """The step in C++, for a plan that reads contiguous CPU parameters in place and
        computes nothing but per-neuron RMS weights of such parameters (no drift): a
        `_C.TemporalPlan` that keeps the checked lists, makes valid()'s checks itself and
        computes each RMS into a buffer of its own; None otherwise. A strided parameter (a
        channels_last conv weight) stays with ops.temporal_update, which reads it afresh at
        every call."""
        sources = self.values + [w for w, _ in self.rms]
        if (len(self.rms) != len(self.computed) or self.drift is not None or not sources
                or _backend.cpp_error() is not None
                or any(v.device.type != "cpu" or not v.is_contiguous() for v in sources)):
            return None
        from . import _C
        rms = [(w, axis, torch.empty(w.shape[axis], dtype=torch.float32)) for w, axis in self.rms]
        return _C.TemporalPlan(self.values + [out for _, _, out in rms], *self.temporal,
                               [(owner, name, p) for owner, name, p, _, _ in self._watch], rms)

    def watch(self, module: nn.Module, attr: str, p: nn.Parameter) -> None:
        """Keep the plan while module.<attr> is still `p`, with the same storage and dtype."""
        owner_path, _, name = attr.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        self._watch.append((owner._parameters, name, p, p.data_ptr(), p.dtype))

    def read_in_place(self, module: nn.Module, attr: str, p: nn.Parameter, state: list) -> None:
        self.watch(module, attr, p)
        self.values.append(p.detach())
        self._direct_states.append(state)

    def compute(self, module: nn.Module, layer: LayerState, role: str, state: list) -> None:
        self.computed.append((module, layer, role))
        self._computed_states.append(state)

    def rms_in_place(self, module: nn.Module, attr: str, p: nn.Parameter, t: torch.Tensor,
                     axis: int) -> None:
        """The last computed value is the per-neuron RMS of t (p or a view of it) over every
        axis but `axis`, which the C++ plan can read in place (LayerState.rms_source); the
        Python path computes it as before."""
        self.watch(module, attr, p)
        self.rms.append((t, axis))

    def states(self):
        """(tallies, skipped, moments, masters) lists, in the order step() builds its values."""
        return tuple(list(part) for part in zip(*(self._direct_states + self._computed_states)))

    def valid(self) -> bool:
        return all(params.get(name) is p and p.data_ptr() == ptr and p.dtype == dtype
                   for params, name, p, ptr, dtype in self._watch)


def _checked_value(module: nn.Module, state: LayerState, role: str) -> torch.Tensor:
    """A layer's weight or bias as step() records it (its local shard under FSDP), refused
    when moved, cast or replaced since instrument."""
    value = state.local_value(role, parameter_value(module, state.params[role]))
    state.check_placement(f"its {role}", value, state.recorded_shape(role))
    return value


def _computed_value(module: nn.Module, state: LayerState, role: str) -> torch.Tensor:
    """This step's observation of a weight or bias step() cannot read in place, checked first."""
    value = _checked_value(module, state, role)
    return state.weight_observation(value) if role == "weight" else value.detach()


def _raw_weight(module: nn.Module, state: LayerState) -> torch.Tensor:
    """This step's weight values (a parametrized weight computed), checked first."""
    return _checked_value(module, state, "weight").detach()


def _parameters_of(module: nn.Module, state: LayerState):
    """The parameter objects a layer's statistics cover: its kind's weight and bias, with what
    they are computed from when parametrized; a whole wrapped module's own parameters."""
    if state.rows is None:  # a parameter alone
        return [getattr(module, state.params["weight"])]
    own = list(module.parameters(recurse=False))
    plist = getattr(module, "parametrizations", None)
    return own + (list(plist.parameters()) if plist is not None else [])


def _numpy(fn):
    """A function of torch tensors applied to numpy arrays."""
    return lambda a: fn(torch.from_numpy(np.ascontiguousarray(a))).numpy()


def _backend_name(layers) -> str:
    from ._backend import backend
    devices = {p.device for m in layers.values() for p in m.parameters()}
    return ",".join(sorted({backend(d) for d in devices})) or "none"


def instrument(model: nn.Module, **options) -> Monitor:
    """Wrap every module of `model` that a layer kind serves (lrfluct_fast.layers: Linear,
    ConvNd, ConvTransposeNd, MultiheadAttention, Embedding, norms, transformers' Conv1D and
    RMS norms, and what lf.register_layer added) in place; returns the Monitor.

    The own parameters of other modules are tracked alone (temporal statistics, neurons along
    their last dim); what cannot be served is listed in `monitor.skipped` as (name, reason).
    A module reachable under two names is wrapped once, under its first name.
    Instrument after moving the model to its device and dtype: a layer that later computes
    on another device or in another precision raises at its next forward or step(). Under
    FSDP2, instrument after fully_shard (fsdp.py): a model sharded later raises at step().
    """
    opts = options_.check(options)
    fsdp.check_model(model)
    scaler = opts["grad_scaler"]
    grad_scale = GradScale(scaler) if scaler is not None else None
    opts["grad_scaler"] = scaler is not None  # the options are saved with the state: no object
    for name, m in model.named_modules():
        if hasattr(m, "_lrfluct"):
            raise ValueError(f"module {name!r} is already instrumented; call remove() on its Monitor first")
    layer_opts = {k: opts[k] for k in ("activations", "gradients", "weights", "biases", "weight_mode",
                                       "drift")}
    states, layers, skipped, wrapped = {}, {}, [], []  # wrapped: names of layers of a kind
    for name, m in model.named_modules():
        if isinstance(m, parametrize.ParametrizationList):
            continue  # a parametrized tensor is read through the module that owns it
        kind = kind_of(m)
        reason = kind.check(m) if kind is not None and kind.check is not None else None
        if kind is not None and reason is None:
            states[name] = LayerState(name, m, kind, grad_scale=grad_scale, **layer_opts)
            layers[name] = m
            wrapped.append(name)
        elif reason is not None:
            skipped.append((name, f"{type(m).__name__}: {reason}"))
        covered = {kind.weight[0] if kind and kind.weight else None,
                   kind.bias[0] if kind and kind.bias else None} if reason is None else set()
        for pname, p in m.named_parameters(recurse=False):
            if pname in covered:
                continue
            full = f"{name}.{pname}" if name else pname
            if p.dim() == 0:
                skipped.append((full, "a scalar parameter has no neurons"))
            elif opts["weights"]:  # a parameter alone: its temporal statistics
                axis = ((kind.alone_axes or {}).get(pname, -1) if kind is not None else -1)
                states[full] = LayerState(full, m, parameter_kind(pname, axis), grad_scale=None,
                                          **layer_opts)
                layers[full] = m
    if not states:
        raise ValueError(f"nothing to monitor in {type(model).__name__}: no module of a "
                         f"registered layer kind (skipped: {skipped or 'none'})")
    owners: dict[int, LayerState] = {}
    for st in states.values():  # a tied weight (GPT-2's wte and lm_head) is recorded once
        if st.track["weight"] and opts["weight_mode"] == "element":
            owner = owners.setdefault(st.weight_id, st)
            if owner is not st:
                st.share_weight_state(owner)
    windows.check_sharded(opts["windows"] or {}, states)
    if opts["drift"]:
        drift.check(states)
    if opts["overlap_weights"]:
        overlap.check_device(next(iter(states.values())).device)
    for name in wrapped:  # every state is built: only now is the model touched
        wrap(layers[name], states[name])
    mon = Monitor(model, states, layers, skipped, opts, grad_scale)
    if opts["log_dir"] is not None:
        try:
            mon._run = rundir.RunLog(mon)
        except BaseException:
            mon.remove()
            raise
    return mon
