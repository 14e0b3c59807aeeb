"""HFTrainerCallback: a transformers.Trainer run monitored by lrfluct_fast, with no change to
the training loop.

    from lrfluct_fast.integrations import HFTrainerCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[HFTrainerCallback(log_dir="runs/exp1")])
    trainer.train()                                # or train(resume_from_checkpoint=True)

Owns when the Trainer's model is instrumented, stepped, saved, restored and released. It
must not touch parameters, gradients or the optimizer: the wrappers swap module classes in
place and keep every parameter object, so the optimizer the Trainer built before
on_train_begin updates the weights the monitor records.

- on_train_begin: lf.instrument(model, **options) on the unwrapped model (self.model: under
  DDP every rank instruments its own copy, once; only rank 0 writes the run directory). The
  Trainer's GradScaler (fp16, accelerate's) becomes the grad_scaler option. A second train()
  while the monitor is kept (keep=True) goes on with it.
- on_step_end: mon.step(), once per optimizer step (the Trainer calls it after the last
  micro-batch of gradient accumulation, not after each one). A step the GradScaler skipped
  (accelerate's optimizer_step_was_skipped) is counted, as the Trainer's global_step counts
  it: its gradient statistics are dropped by the grad_scaler option and the unchanged weights
  are recorded, so the monitor's step stays the Trainer's global_step.
- on_save: the monitor's state_dict() as lrfluct_monitor.pt in the checkpoint folder
  (output_dir/checkpoint-{global_step}; one file per rank under a process group:
  lrfluct_monitor_rank{r}.pt).
- on_train_begin of a resumed run (global_step > 0): load_state_dict of that step's file,
  looked for in args.resume_from_checkpoint, then output_dir/checkpoint-{global_step}: the run
  directory drops what was logged after the checkpoint and goes on from its step (no gap, no
  duplicate step). Without a file it warns and monitors from here on.
- on_log: "lrfluct/{layer}/{metric}" entries of mon.metrics() added to the logs and to the
  Trainer's log history, once per logging step. The Trainer runs the report_to loggers
  (TensorBoard, W&B, ...) before the callbacks it is given; for them to receive the entries,
  put this callback first: trainer.callback_handler.callbacks.insert(0, callback).
- on_train_end: mon.remove() (its run directory closed), unless keep=True.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import TrainerCallback

from . import common


class HFTrainerCallback(TrainerCallback, common.MonitorHolder):
    """Monitors a transformers.Trainer run; `**options` are instrument()'s (checked now),
    `keep=True` keeps the wrappers after training. The Monitor is `callback.monitor`."""

    def __init__(self, *, keep: bool = False, **options):
        common.MonitorHolder.__init__(self, keep, options)
        self._logged_step = -1

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._live():
            self.monitor = common.instrument_with_scaler(model, self.options,
                                                         getattr(optimizer, "scaler", None))
        self._logged_step = -1
        if state.global_step > 0:
            self._resume(args, state.global_step)

    def _resume(self, args, step: int) -> None:
        folders = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
        folders.append(os.path.join(args.output_dir, f"checkpoint-{step}"))
        for folder in folders:
            path = os.path.join(folder, common.state_file_name())
            if os.path.isfile(path):
                self.monitor.load_state_dict(common.load_state(path))
                return
        warnings.warn(f"lrfluct_fast: the run resumes at step {step} but no monitor state "
                      f"{common.state_file_name()} was found in {folders}: monitoring starts "
                      f"anew from this step", RuntimeWarning, stacklevel=2)

    def on_step_end(self, args, state, control, **kwargs):
        if self._live():
            self.monitor.step()

    def on_save(self, args, state, control, **kwargs):
        if self._live():
            common.save_state(self.monitor,
                              os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._live() or logs is None or self.monitor.steps == 0:
            return
        if state.global_step == self._logged_step:
            return  # the metrics of this step went out with its first log (train, eval, end)
        self._logged_step = state.global_step
        entries = common.log_entries(self.monitor)
        logs.update(entries)
        history: list[dict[str, Any]] = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(entries)  # the Trainer appended a copy of logs before on_log

    def on_train_end(self, args, state, control, **kwargs):
        if self._live() and not self.keep:
            self.monitor.remove()
