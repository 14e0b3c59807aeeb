"""Consistent reads (lrfluct_fast/reads.py): summary(), metrics() and state_dict() from another
thread than the training thread return the statistics of one moment.

A torn read is made certain, not left to chance: a merge of one layer's statistics is
stalled half-way (half of its neurons updated) while another thread reads.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import lrfluct_fast as lf
from lrfluct_fast import ops, reads

ROWS = 8  # a batch's rows: each training step adds ROWS to every neuron's counts


def _make():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    mon = lf.instrument(net)
    for st in mon.states.values():
        st.observer = None  # the Python path, so the stall below can hold a merge
    return net, mon, torch.optim.SGD(net.parameters(), lr=0.1)


def _train_step(net, opt, mon, step):
    opt.zero_grad()
    net(torch.randn(ROWS, 4, generator=torch.Generator().manual_seed(step))).square().mean().backward()
    opt.step()
    mon.step()


class _StalledMerge:
    """ops.accumulate_stats (a backward's merge of dL/dz's and the pending activation
    statistics) that, once armed, writes half of the neurons, signals, waits until released,
    then writes the rest."""

    def __init__(self, monkeypatch):
        self.armed = False
        self.halfway, self.release = threading.Event(), threading.Event()
        self._accumulate = ops.accumulate_stats
        monkeypatch.setattr(ops, "accumulate_stats", self)

    def __call__(self, x, *state):
        if not self.armed:
            return self._accumulate(x, *state)
        self.armed = False
        merged = [None if t is None or i in (2, 3) else t.clone() for i, t in enumerate(state)]
        merged[2:4] = state[2:4]  # the pending batch is read only
        self._accumulate(x, *merged)
        targets = [(t, m) for i, (t, m) in enumerate(zip(state, merged)) if i not in (2, 3) and t is not None]
        half = state[0].shape[1] // 2
        for t, m in targets:
            t[:, :half] = m[:, :half]
        self.halfway.set()
        self.release.wait(10)
        for t, m in targets:
            t[:, half:] = m[:, half:]


def _counts_consistent(summary, steps):
    for name, s in summary.items():
        for key in ("activation.count", "gradient.count"):
            assert (s[key] == steps * ROWS).all(), (name, key, s[key])
    assert all(int(s["steps"]) == steps for s in summary.values())


def test_read_from_another_thread_is_not_torn(monkeypatch):
    net, mon, opt = _make()
    stall = _StalledMerge(monkeypatch)

    def train():
        _train_step(net, opt, mon, 1)   # this thread is now the training thread
        stall.armed = True
        _train_step(net, opt, mon, 2)   # one of its merges stalls half-way
        stall.release.wait(10)
    trainer = threading.Thread(target=train)
    trainer.start()
    assert stall.halfway.wait(10)
    live = {name: st.buffers["activation.counts"][0].clone() for name, st in mon.states.items()}
    assert any(c.min() != c.max() for c in live.values())  # what a direct read would copy: torn

    result = {}
    reader = threading.Thread(target=lambda: result.update(summary=mon.summary(timeout=10)))
    reader.start()
    time.sleep(0.2)             # the reader waits for the step boundary ...
    assert "summary" not in result
    stall.release.set()         # ... which comes at the end of step 2
    reader.join(10)
    trainer.join(10)
    _counts_consistent(result["summary"], 2)
    want = mon.summary()        # the monitor is idle now: the same statistics
    for name, s in result["summary"].items():
        for key, v in s.items():
            np.testing.assert_array_equal(v, want[name][key], err_msg=f"{name} {key}")


def test_training_thread_reads_directly_and_pays_nothing_without_a_reader():
    net, mon, opt = _make()
    _train_step(net, opt, mon, 1)
    assert mon._reads.pending is None
    _counts_consistent(mon.summary(timeout=0), 1)  # no waiting in the training thread


def test_read_while_idle_from_another_thread():
    """Training ran in a thread that has finished: the main thread's read is taken once the
    counts have stayed still for IDLE_S."""
    net, mon, opt = _make()
    trainer = threading.Thread(target=lambda: [_train_step(net, opt, mon, s) for s in (1, 2, 3)])
    trainer.start()
    trainer.join()
    start = time.monotonic()
    _counts_consistent(mon.summary(timeout=10), 3)
    assert reads.IDLE_S <= time.monotonic() - start < reads.IDLE_S + 2
    sd = mon.state_dict()
    assert sd["steps"] == 3 and int(sd["layers"]["0"]["activation.counts"][0, 0]) == 3 * ROWS


def test_read_times_out_when_statistics_keep_changing_without_a_step():
    net, mon, opt = _make()
    stepped, done = threading.Event(), threading.Event()

    def train_without_step():
        _train_step(net, opt, mon, 1)
        stepped.set()
        while not done.is_set():  # backwards, but never mon.step()
            net(torch.randn(ROWS, 4)).square().mean().backward()
            time.sleep(0.01)
    trainer = threading.Thread(target=train_without_step)
    trainer.start()
    stepped.wait(10)
    try:
        with pytest.raises(TimeoutError, match=r"summary\(\) from another thread waited 0.3 s"):
            mon.metrics(timeout=0.3)
    finally:
        done.set()
        trainer.join()
    assert mon._reads.pending is None  # the abandoned request is withdrawn


def test_bad_timeout_refused():
    _, mon, _ = _make()
    for value, error in (("1", TypeError), (-1, ValueError), (float("nan"), ValueError)):
        with pytest.raises(error, match="timeout must be a number of seconds >= 0 or None"):
            mon.summary(timeout=value)
