"""WeightStream: Monitor.step's weight update on a side CUDA stream (`instrument(...,
overlap_weights=True)`), so it runs while the next forward does.

The update reads the parameters the optimizer just wrote and writes only the monitor's
temporal state. Its ordering:
- the side stream waits for the current stream before the update: the optimizer's writes are
  done before the update reads them;
- the next optimizer step waits for the update (an optimizer step pre-hook makes the current
  stream wait on the update's event): no parameter changes while the update reads it;
- a read of the temporal state (summaries, state_dict, windows) waits for it too
  (`Monitor` calls `wait()`).
The next forward and backward only read the parameters, as the update does, so they overlap it.
Other in-place writes to the parameters (a `model.load_state_dict`, a manual `p.data` edit)
must call `mon.wait_for_weights()` first. This module owns the stream, its event and the hook.
"""
from __future__ import annotations

from typing import Callable

import torch


def check_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"overlap_weights=True runs the weight update on a side CUDA stream: "
                         f"the model's parameters must be on a CUDA device, got {device}")


class WeightStream:
    def __init__(self, device: torch.device):
        check_device(device)
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.done: torch.cuda.Event | None = None
        self._hook = torch.optim.optimizer.register_optimizer_step_pre_hook(self._before_optimizer_step)

    def run(self, update: Callable[[], None]) -> None:
        """`update` on the side stream, after everything queued on the current stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            update()
        self.done = self.stream.record_event()

    def wait(self) -> None:
        """Make the current stream wait for the last update (no host synchronisation)."""
        if self.done is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.wait()

    def close(self) -> None:
        self.wait()
        self._hook.remove()
