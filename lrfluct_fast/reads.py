"""Consistent reads: the statistics of one moment, for a reader in any thread.

The training thread (the one that calls Monitor.step(); until then, the one that called
instrument) changes the statistics buffers in its backwards and its step(). A reader in
another thread that copied them directly could copy a layer half-way through a merge
(counts unequal across its neurons) or layers from different steps. So:

- A read from the training thread reads the buffers directly: nothing else writes them.
- A read from another thread posts a request and waits. The training thread serves it at
  its next step boundary, at the end of Monitor.step(): it copies every buffer to the host
  (the only cost it ever pays, and only while a read is pending; otherwise one attribute
  check per step), so the reader gets the statistics right after that step.
- While waiting, the reader watches the counts and tallies (O(neurons)): when none has
  changed for IDLE_S seconds, the monitor is idle (training finished or stopped, an
  evaluation phase, a data-loader stall); the reader then copies the buffers itself and keeps
  the copy if the counts are still unchanged after it. Every write to the statistics
  changes a count or a tally, so such a copy is of one moment; it is the statistics of the
  last step boundary unless a single layer's backward takes longer than IDLE_S.
- When the statistics keep changing and no step boundary comes within `timeout` seconds,
  the read raises TimeoutError naming the call.

It owns the request and its hand-over between threads; it never writes the statistics.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

IDLE_S = 1.0   # no count or tally changed for this long: the monitor is idle
POLL_S = 0.05  # how often a waiting reader looks at the counts


class _Request:
    def __init__(self):
        self.done = threading.Event()
        self.waiters = 0
        self.result: Any = None
        self.error: BaseException | None = None


class ConsistentReads:
    """Hands a snapshot taken at a step boundary from the training thread to readers."""

    def __init__(self):
        self.pending: _Request | None = None   # the training step checks only this
        self.training_thread = threading.get_ident()
        self._lock = threading.Lock()

    def in_training_thread(self) -> bool:
        return threading.get_ident() == self.training_thread

    def serve(self, take: Callable[[], Any]) -> None:
        """At a step boundary, in the training thread: answer the pending read with take()."""
        with self._lock:
            request, self.pending = self.pending, None
        if request is None:
            return
        try:
            request.result = take()
        except BaseException as err:  # the reader raises it; the training step goes on
            request.error = err
        request.done.set()

    def read(self, take: Callable[[], Any], fingerprint: Callable[[], Any],
             same: Callable[[Any, Any], bool], timeout: float | None, what: str):
        """take() of one moment: directly in the training thread, else served at a step
        boundary or taken while idle (module docstring). `fingerprint` returns the counts
        and tallies, `same` compares two fingerprints."""
        if self.in_training_thread():
            return take()
        with self._lock:
            request = self.pending or _Request()
            request.waiters += 1
            self.pending = request
        try:
            return self._wait(request, take, fingerprint, same, timeout, what)
        finally:
            with self._lock:
                request.waiters -= 1
                if request.waiters == 0 and self.pending is request:
                    self.pending = None

    def _wait(self, request, take, fingerprint, same, timeout, what):
        start = time.monotonic()
        last, quiet_since = fingerprint(), start
        while True:
            if request.done.wait(POLL_S):
                if request.error is not None:
                    raise request.error
                return request.result
            now = time.monotonic()
            seen = fingerprint()
            if not same(seen, last):
                last, quiet_since = seen, now
            elif now - quiet_since >= IDLE_S:
                snapshot = take()
                after = fingerprint()
                if same(after, last):
                    return snapshot
                last, quiet_since = after, time.monotonic()
            if timeout is not None and now - start >= timeout:
                raise TimeoutError(
                    f"{what} from another thread waited {timeout:g} s for the training thread "
                    f"to reach mon.step() while its statistics kept changing; call it from "
                    f"the training thread, or pass a longer timeout")
