"""LightningCallback: a Lightning 2.x fit monitored by lrfluct_fast, with no change to the
LightningModule.

    from lrfluct_fast.integrations import LightningCallback
    trainer = L.Trainer(callbacks=[LightningCallback(log_dir="runs/exp1")], ...)
    trainer.fit(module)                            # or fit(module, ckpt_path="last")

Owns when the LightningModule is instrumented, stepped, saved, restored and released. It
must not touch parameters, gradients or optimizers: the wrappers swap module classes in
place and keep every parameter object, so the optimizers configure_optimizers builds update
the weights the monitor records.

- setup (stage "fit"): lf.instrument(pl_module, **options), before the strategy wraps the
  module (DDP: every rank instruments its own copy, once; only rank 0 writes the run
  directory) and before a checkpoint is restored. The precision plugin's GradScaler
  ("16-mixed") becomes the grad_scaler option.
- on_train_batch_end: mon.step() when trainer.global_step moved since the last batch, i.e.
  once per optimizer step; with accumulate_grad_batches=k, after every k-th batch. Lightning
  counts a step the GradScaler skipped and a step whose training_step returned None (no
  backward ran) in global_step; so does the monitor: the scaler's skipped step has its
  gradient statistics dropped (grad_scaler option), the None step recorded none, and the
  unchanged weights are recorded, so the monitor's step stays trainer.global_step.
  The metrics go to trainer.loggers as "lrfluct/{layer}/{metric}" at the steps that are
  multiples of the Trainer's log_every_n_steps.
- on_save_checkpoint: the monitor's state_dict() in the checkpoint under "lrfluct_monitor"
  (every rank's, gathered to the saving rank under a process group: each rank's activation
  and gradient statistics are its own). on_load_checkpoint: load_state_dict of this rank's:
  the run directory drops what was logged after the checkpoint and goes on from its step (no
  gap, no duplicate step).
- on_fit_end: mon.remove() (its run directory closed), unless keep=True.
"""
from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from .. import distributed
from . import common

CHECKPOINT_KEY = "lrfluct_monitor"


class LightningCallback(pl.Callback, common.MonitorHolder):
    """Monitors a Lightning fit; `**options` are instrument()'s (checked now), `keep=True`
    keeps the wrappers after fit. The Monitor is `callback.monitor`."""

    def __init__(self, *, keep: bool = False, **options):
        common.MonitorHolder.__init__(self, keep, options)
        self._seen_step = 0

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and not self._live():
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.monitor = common.instrument_with_scaler(pl_module, self.options, scaler)

    def on_train_start(self, trainer, pl_module):
        self._seen_step = trainer.global_step  # a restored checkpoint's step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._live() or trainer.global_step == self._seen_step:
            return  # a batch whose gradients accumulate: no optimizer step yet
        self._seen_step = trainer.global_step
        self.monitor.step()
        every = trainer.log_every_n_steps
        if trainer.loggers and every > 0 and trainer.global_step % every == 0:
            entries = common.log_entries(self.monitor)  # on every rank: a collective
            for logger in trainer.loggers:
                logger.log_metrics(entries, step=trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not self._live():
            return
        state = self.monitor.state_dict()
        if distributed.world_size() > 1:
            ranks = [None] * distributed.world_size()
            dist.all_gather_object(ranks, _to_cpu(state))
        else:
            ranks = [state]
        checkpoint[CHECKPOINT_KEY] = {"world_size": len(ranks), "ranks": ranks}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if not self._live():
            return
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            warnings.warn("lrfluct_fast: the checkpoint holds no monitor state: monitoring "
                          "starts anew from its step", RuntimeWarning, stacklevel=2)
            return
        if saved["world_size"] != distributed.world_size():
            raise ValueError(f"the checkpoint's monitor state is of {saved['world_size']} ranks, "
                             f"this run has {distributed.world_size()}: resume on as many ranks")
        self.monitor.load_state_dict(saved["ranks"][distributed.rank()])

    def on_fit_end(self, trainer, pl_module):
        if self._live() and not self.keep:
            self.monitor.remove()


def _to_cpu(tree):
    """A state dict with its tensors copied to the CPU (all_gather_object pickles them)."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    return tree
