"""Windows per statistic: activation, gradient, weight and bias statistics each over their
own window of steps, and the whole run beside them.

instrument(model, windows={"gradient": 1, "weight": 1000}) closes the gradient window after
every step and the weight window every 1000 steps; a statistic not named keeps one window,
the whole run (since instrument or reset()). Monitor.step() closes a window after its last
step: it takes device copies of that statistic's per-neuron summaries (the row, see
`ROW_KEYS`), merges the window's buffers into the statistic's whole-run totals with Chan's
formula (ops.merge_stats; for weights and biases the window's two-level temporal state, read
by ops.temporal_stats, into the float64 master of the totals) and zeroes them for the next
window. Nothing synchronises with the
host; the row goes to the run directory's writer (log_dir) and to the Monitor's memory
(Monitor.closed_windows(), at most KEPT_ROWS unread rows).

The whole-run totals live in the LayerState's buffers under "run.<buffer key>" (so reset(),
state_dict(), load_state_dict() and memory_bytes() cover them); `whole_run` merges them with
the open window when a summary is read or logged, so summary() stays the whole run.

It owns the window bookkeeping, the rows and the merge of windows into totals; it changes
no statistic of an open window and never touches the model.
"""
from __future__ import annotations

import threading
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from . import chan, fsdp, metrics, ops
from .nn.layer_state import TEMPORAL_PARTS

STATISTICS = ("activation", "gradient", "weight", "bias")
# the per-neuron keys of a closed window's row, per statistic (the keys of mon.summary())
ROW_KEYS = {"activation": ("activation.count", "activation.mean", "activation.var",
                           "activation.nonfinite", "activation.active_fraction"),
            "gradient": ("gradient.count", "gradient.mean", "gradient.var", "gradient.nonfinite"),
            "weight": ("weight.spread",), "bias": ("bias.spread",)}
KEPT_ROWS = 1000  # closed windows the Monitor holds until closed_windows() reads them
RUN = "run."      # prefix of a whole-run total's buffer key
MASTER_ROWS = (ops.MASTER_COUNT, ops.MASTER_MEAN, ops.MASTER_M2)  # chan.merge's argument order


@dataclass
class Window:
    """One closed window of one statistic: its per-neuron summaries."""
    statistic: str
    first_step: int   # Monitor.steps of the window's first and last step (since reset)
    last_step: int
    layers: dict[str, dict[str, np.ndarray]]   # {layer: {key of ROW_KEYS[statistic]: [N]}}


def _parts(statistic: str) -> tuple[str, ...]:
    return ("counts", "moments") if statistic in ("activation", "gradient") else TEMPORAL_PARTS


def _merge_into(total: dict[str, torch.Tensor], window: dict[str, torch.Tensor], statistic: str) -> None:
    """total (in place) += window, both the buffers of one statistic (Chan's formula)."""
    if statistic in ("activation", "gradient"):
        ops.merge_stats(total["counts"], total["moments"], window["counts"], window["moments"])
        return
    # two-level temporal states (ops.temporal_update). The total's block stays empty: its
    # float64 master holds the run; the window's master (its closed blocks) and open block
    # are Chan-merged into it, each element's block holding its count less the master's.
    closed, block = window["master"], window["moments"].double()
    n = ops.temporal_counts(window["tally"], window["skipped"]).double()
    master = total["master"]
    merged = chan.merge(*(master[row] for row in MASTER_ROWS), *(closed[row] for row in MASTER_ROWS))
    merged = chan.merge(*merged, n - closed[ops.MASTER_COUNT], block[ops.SHIFT] + block[ops.MEAN],
                        block[ops.M2])
    for row, value in zip(MASTER_ROWS, merged):
        master[row] = value
    total["skipped"] += window["skipped"]
    tally = total["tally"]
    tally += window["tally"]
    tally[ops.FLUSHED] = tally[ops.CALLS]  # the block is empty


def as_total(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A temporal state (ops.new_state's four parts) in the layout of a whole-run total: the
    same statistics, all in the master, the block empty."""
    total = {p: torch.zeros_like(t) for p, t in zip(TEMPORAL_PARTS, state)}
    _merge_into(total, dict(zip(TEMPORAL_PARTS, state)), "weight")
    return tuple(total[p] for p in TEMPORAL_PARTS)


def whole_run(buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's buffers with each windowed statistic's whole-run totals merged with its open
    window (new tensors; the others as they are), without the "run." keys."""
    out = {k: t for k, t in buffers.items() if not k.startswith(RUN)}
    for statistic in STATISTICS:
        if f"{RUN}{statistic}.moments" not in buffers:
            continue
        merged = {p: buffers[f"{RUN}{statistic}.{p}"].clone() for p in _parts(statistic)}
        _merge_into(merged, {p: buffers[f"{statistic}.{p}"] for p in _parts(statistic)}, statistic)
        out.update({f"{statistic}.{p}": t for p, t in merged.items()})
    return out


def check_option(windows, world_size: int) -> dict[str, int]:
    """The `windows` option: None or {statistic: steps per window}."""
    from .options import check_count, describe
    if windows is None:
        return {}
    if not isinstance(windows, dict):
        raise TypeError(f"windows must be None or a dict {{statistic: steps per window}} with "
                        f"statistics {', '.join(STATISTICS)}, got {describe(windows)}")
    for statistic, steps in windows.items():
        if statistic not in STATISTICS:
            raise ValueError(f"windows: unknown statistic {statistic!r}; the statistics are "
                             f"{', '.join(STATISTICS)}")
        check_count(f"windows[{statistic!r}]", steps)
    per_rank = sorted(set(windows) & {"activation", "gradient"})
    if per_rank and world_size > 1:
        raise ValueError(f"windows of {per_rank} under a process group are not supported (their "
                         f"statistics are merged over ranks only when read); window weights and "
                         f"biases, or read summary() at your window's end")
    return {s: int(windows[s]) for s in STATISTICS if s in windows}


def check_sharded(every: dict[str, int], states) -> None:
    """Refuse weight and bias windows of layers whose temporal state FSDP2 shards (each rank
    holds its own shard's; a window's row would need the ranks' spreads gathered at every
    close, inside step())."""
    sharded = sorted(f"{name}.{role}" for name, st in states.items()
                     for role in fsdp.sharded_roles(st) if role in every)
    if sharded:
        roles = sorted({key.rpartition(".")[2] for key in sharded})
        raise ValueError(f"windows of {roles} are not supported "
                         f"for parameters sharded by FSDP2 ({', '.join(sharded[:5])}"
                         f"{', ...' if len(sharded) > 5 else ''}): leave them out of windows (their "
                         f"whole-run spreads are in summary()), or read summary() at your "
                         f"window's end")


class Windows:
    """The windows of a Monitor's statistics: when each closes, its rows, its totals."""

    def __init__(self, every: dict[str, int], states):
        self.every = every
        self.states = states   # {layer: LayerState}
        self.first = dict.fromkeys(every, 1)
        self.rows: deque = deque()
        self._rows_lock = threading.Lock()  # closed_windows() may run in another thread
        self._dropped_warned = False
        owners = {}
        for name, st in states.items():
            for statistic in every:
                if not st.track[statistic]:
                    continue
                shared = statistic == "weight" and st.weight_shared_with is not None
                for part in _parts(statistic):
                    key = f"{statistic}.{part}"
                    if shared:  # a tied weight: its totals are the owner's, merged once
                        st.buffers[RUN + key] = owners[(st.weight_shared_with, key)]
                    else:
                        st.buffers[RUN + key] = owners[(name, key)] = torch.zeros_like(st.buffers[key])

    def layers(self, statistic: str) -> list[str]:
        return [name for name, st in self.states.items() if st.track[statistic]]

    def closes_at(self, steps: int) -> bool:
        """Whether after_step(steps) closes a window."""
        return any(steps % every == 0 for every in self.every.values())

    def after_step(self, steps: int, writer_put=None) -> None:
        """Close every window whose last step was step `steps` (Monitor.steps)."""
        for statistic, every in self.every.items():
            if steps % every == 0:
                self._close(statistic, steps, writer_put)

    def close_now(self, steps: int, writer_put=None, statistics=None) -> None:
        """Close the open windows (of `statistics`, default all) that hold a step."""
        for statistic in statistics or self.every:
            if self.first[statistic] <= steps:
                self._close(statistic, steps, writer_put)

    def _close(self, statistic: str, steps: int, writer_put) -> None:
        from .rundir.writer import snapshot  # the device copies a logged summary takes
        names = self.layers(statistic)
        copies = snapshot([(n, self.states[n]) for n in names], kinds=(statistic,))
        row = (statistic, self.first[statistic], steps, copies)
        if writer_put is not None:
            writer_put(row)
        with self._rows_lock:
            dropped = len(self.rows) == KEPT_ROWS
            if dropped:
                self.rows.popleft()
            self.rows.append(row)
        if dropped and writer_put is None and not self._dropped_warned:
            self._dropped_warned = True
            warnings.warn(f"lrfluct_fast: more than {KEPT_ROWS} closed windows were not read "
                          f"with mon.closed_windows(): the oldest are dropped (pass log_dir "
                          f"to keep every window on disk)", RuntimeWarning, stacklevel=4)
        for name in names:
            st = self.states[name]
            if statistic == "weight" and st.weight_shared_with is not None:
                continue  # the owner merges the tied state once
            window = {p: st.buffers[f"{statistic}.{p}"] for p in _parts(statistic)}
            _merge_into({p: st.buffers[f"{RUN}{statistic}.{p}"] for p in _parts(statistic)},
                        window, statistic)
            for t in window.values():
                t.zero_()
        self.first[statistic] = steps + 1

    def restart(self, steps: int) -> None:
        """After reset() (steps 0) or load_state_dict(): each window starts after `steps`,
        aligned to its length as step() closes them."""
        self.first = {s: steps - steps % every + 1 for s, every in self.every.items()}

    def take_rows(self, statistic: str | None = None) -> list[Window]:
        """The closed windows not read yet (of one statistic, or all), oldest first; read
        rows are forgotten."""
        with self._rows_lock:
            take = [r for r in self.rows if statistic is None or r[0] == statistic]
            self.rows = deque(r for r in self.rows if not (statistic is None or r[0] == statistic))
        modes = {name: st.weight_mode for name, st in self.states.items()}
        return [Window(s, first, last, row_summaries(s, copies, modes))
                for s, first, last, copies in take]


def row_summaries(statistic: str, copies, modes: dict[str, str]) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {row key: [N] array}} from the device copies a window's close took; `modes`:
    each layer's weight_mode."""
    track = {s: s == statistic for s in STATISTICS}
    out = {}
    for name, bufs in copies.items():
        host = {k: t.cpu().numpy() for k, t in bufs.items()}
        summary = metrics.layer_summary(host, track=track, weight_mode=modes[name], steps=0)
        out[name] = {k: summary[k] for k in ROW_KEYS[statistic]}
    return out
