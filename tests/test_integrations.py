"""The training-framework callbacks (lrfluct_fast.integrations): a few CPU steps of a
transformers.Trainer and of a Lightning fit each, with a run directory, checkpoint and resume,
gradient accumulation, skipped optimizer steps, metrics in the frameworks' logs and the
wrappers' removal. Skipped when the framework is not installed; every file goes to tmp_path."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lrfluct_fast as lf
from lrfluct_fast.integrations import common

ROWS, SEQ = 2, 16  # batch size and tokens per sequence of the GPT-2 runs


def assert_same_summaries(a, b):
    assert a.keys() == b.keys()
    for layer in a:
        for key in a[layer]:
            np.testing.assert_allclose(b[layer][key], a[layer][key], rtol=1e-6, atol=0,
                                       err_msg=f"{layer} {key}")


def logged_steps(run_dir) -> list[int]:
    """The steps of the run directory's metrics.csv, each once (a step has one row per layer)."""
    run = lf.load_run(run_dir)
    steps = run.metrics["step"]
    per_step = {s: int((steps == s).sum()) for s in np.unique(steps)}
    assert set(per_step.values()) == {len(run.info["layers"])}, per_step  # no duplicated step
    return sorted(int(s) for s in per_step)


def assert_page_shows(run_dir, layer: str) -> None:
    """`lrfluct show` renders the run directory a framework run wrote."""
    from lrfluct_fast.cli import main
    out = os.path.join(run_dir, "page.html")
    assert main(["show", run_dir, "--out", out]) == 0
    with open(out, encoding="utf-8") as f:
        page = f.read()
    assert layer in page and "participation_ratio" in page


def wrapped(model) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, "_lrfluct")]


def test_import_needs_no_framework():
    code = ("import sys, lrfluct_fast.integrations; "
            "assert not {'transformers', 'lightning'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# -- transformers.Trainer ---------------------------------------------------------------------
class TokenData(torch.utils.data.Dataset):
    """8 random sequences of SEQ tokens, their own labels (a causal language model's)."""

    def __init__(self):
        self.tokens = torch.randint(0, 100, (8, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def hf_trainer(tmp_path, callback, trainer_class=None, **args):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": ROWS, "learning_rate": 1e-2,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True,
        "disable_tqdm": True, "seed": 0, **args})
    return (trainer_class or transformers.Trainer)(model=model, args=args, train_dataset=TokenData(),
                                                   callbacks=[callback])  # after report_to's


def hf_callback(**options):
    hf = pytest.importorskip("lrfluct_fast.integrations.hf", exc_type=ImportError)
    return hf.HFTrainerCallback(**options)


def test_hf_unknown_options_raise_naming_them():
    with pytest.raises(TypeError, match="log_evry"):
        hf_callback(log_evry=10)
    with pytest.raises(TypeError, match="keep"):
        hf_callback(keep="yes")
    with pytest.raises(ValueError, match="every"):
        hf_callback(every=0)


def test_hf_trainer_run_checkpoint_and_resume(tmp_path):
    run_dir = str(tmp_path / "run")
    callback = hf_callback(log_dir=run_dir, log_every=1, keep=True)
    trainer = hf_trainer(tmp_path, callback, max_steps=4, save_strategy="steps", save_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    mon = callback.monitor
    assert mon.steps == 4
    # the optimizer the Trainer built updates the very parameters the monitor records
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    fc = trainer.model.transformer.h[0].mlp.c_fc
    assert id(fc.weight) in optimized and not torch.equal(fc.weight, before["transformer.h.0.mlp.c_fc.weight"])
    uninterrupted = mon.summary()
    assert (uninterrupted["transformer.h.0.mlp.c_fc"]["weight.spread"] > 0).all()
    # the metrics of every logging step are in the Trainer's log history, with its loss
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
    for h in logged:
        assert "lrfluct/transformer.h.0.mlp.c_fc/participation_ratio" in h
    assert logged[-1]["lrfluct/lm_head/spread_of_spread"] == mon.metrics()["lm_head"]["spread_of_spread"]
    assert wrapped(trainer.model)  # keep=True: still instrumented after training
    mon.remove()
    assert os.path.isfile(tmp_path / "out" / "checkpoint-2" / common.state_file_name())

    # a new process resumes from the step-2 checkpoint: steps 3 and 4 again, same run directory
    resumed = hf_callback(log_dir=run_dir, log_every=1, keep=True)
    trainer = hf_trainer(tmp_path, resumed, max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.monitor.steps == 4
    assert_same_summaries(uninterrupted, resumed.monitor.summary())
    resumed.monitor.remove()
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert_page_shows(run_dir, "transformer.h.0.mlp.c_fc")


def test_hf_gradient_accumulation_counts_optimizer_steps_and_removes(tmp_path):
    """2 optimizer steps of 2 micro-batches; the callback put first, ahead of the callbacks
    the Trainer runs before the ones it is given (report_to's loggers), hands them its metrics."""
    transformers = pytest.importorskip("transformers")

    class Reporter(transformers.TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    callback, reporter = hf_callback(keep=True), Reporter()
    trainer = hf_trainer(tmp_path, reporter, max_steps=2, gradient_accumulation_steps=2)
    trainer.callback_handler.callbacks.insert(0, callback)
    trainer.train()
    mon = callback.monitor
    assert trainer.state.global_step == 2 and mon.steps == 2
    c_fc = mon.summary()["transformer.h.0.mlp.c_fc"]
    assert c_fc["steps"] == 2 and (c_fc["activation.count"] == 4 * ROWS * SEQ).all()  # 4 micro-batches
    assert [("lrfluct/lm_head/participation_ratio" in logs) for logs in reporter.logs] == [True, True, False]
    mon.remove()


def test_hf_removes_the_wrappers_at_train_end(tmp_path):
    callback = hf_callback()
    trainer = hf_trainer(tmp_path, callback, max_steps=1)
    trainer.train()
    assert not wrapped(trainer.model)
    with pytest.raises(RuntimeError, match="removed"):
        callback.monitor.summary()


def test_hf_step_skipped_by_the_grad_scaler(tmp_path):
    """fp16's GradScaler (accelerate's) on the CPU: an inf loss at the second step makes the
    scaler skip it. The step counts (as the Trainer's global_step) and its gradient
    statistics are dropped: 2 steps' rows remain."""
    transformers = pytest.importorskip("transformers")

    class InfAtSecondStep(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("inf") if self.state.global_step == 1 else loss

    callback = hf_callback(keep=True)
    trainer = hf_trainer(tmp_path, callback, trainer_class=InfAtSecondStep, max_steps=3, max_grad_norm=0.0)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer.train()
    mon = callback.monitor
    assert mon.options["grad_scaler"] is True and mon.steps == 3
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 7  # one skipped step halved it
    grads = mon.summary()["transformer.h.0.mlp.c_fc"]
    assert (grads["gradient.count"] == 2 * ROWS * SEQ).all() and (grads["gradient.nonfinite"] == 0).all()
    assert (grads["activation.count"] == 3 * ROWS * SEQ).all()
    mon.remove()


def _hf_ddp_worker(rank, world, tmp):
    """One rank of a 2-process Trainer run (gloo on CPU, as torchrun would start it)."""
    import pathlib
    import traceback
    import torch.distributed as dist
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=open(os.path.join(tmp, "port")).read(),
                          RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        torch.set_num_threads(1)
        callback = hf_callback(log_dir=os.path.join(tmp, "run"), log_every=1, keep=True)
        trainer = hf_trainer(pathlib.Path(tmp), callback, max_steps=3, ddp_backend="gloo",
                             save_strategy="steps", save_steps=3)
        trainer.train()
        assert dist.is_initialized() and dist.get_world_size() == world
        summary = callback.monitor.summary()  # a collective: every rank reads the merged statistics
        logged = [h for h in trainer.state.log_history if "loss" in h]
        np.savez(os.path.join(tmp, f"summary{rank}.npz"),
                 **{f"{layer}/{key}": v for layer, keys in summary.items() for key, v in keys.items()})
        with open(os.path.join(tmp, f"logged{rank}.txt"), "w") as f:
            f.write(" ".join(str(h["step"]) for h in logged if
                             "lrfluct/transformer.h.0.mlp.c_fc/participation_ratio" in h))
        callback.monitor.remove()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(tmp, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(2)
    os._exit(0)  # gloo workers may abort in interpreter teardown


def test_hf_trainer_on_two_processes(tmp_path):
    """A 2-process (DDP, gloo) Trainer run: each rank instruments its own model once, only rank
    0 writes the run directory, the summaries are every rank's batches merged, each rank saves
    its own monitor state with the checkpoint."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import socket
    from spawn_ranks import spawn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        (tmp_path / "port").write_text(str(s.getsockname()[1]))
    assert spawn(_hf_ddp_worker, 2, str(tmp_path), timeout_s=180) == [0, 0]
    run_dir = str(tmp_path / "run")
    assert logged_steps(run_dir) == [1, 2, 3]  # rank 0 alone wrote: no step twice
    for rank in (0, 1):
        assert (tmp_path / "out" / "checkpoint-3" / f"lrfluct_monitor_rank{rank}.pt").is_file()
        assert (tmp_path / f"logged{rank}.txt").read_text().split() == ["1", "2", "3"]
    s0, s1 = (np.load(tmp_path / f"summary{r}.npz") for r in (0, 1))
    assert sorted(s0.files) == sorted(s1.files)
    for key in s0.files:
        np.testing.assert_array_equal(s0[key], s1[key], err_msg=key)
    # 3 steps x 2 ranks x ROWS sequences of SEQ tokens, merged across the ranks
    assert (s0["transformer.h.0.mlp.c_fc/activation.count"] == 3 * 2 * ROWS * SEQ).all()
    assert_page_shows(run_dir, "transformer.h.0.mlp.c_fc")


# -- Lightning ----------------------------------------------------------------------------------
def lightning_module(skip_at=None):
    pl = pytest.importorskip("lightning.pytorch")

    class Regression(pl.LightningModule):
        """A tiny MLP; training_step returns None (Lightning skips the step) at step skip_at."""

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == skip_at:
                return None
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    return Regression()


def fit(tmp_path, callbacks, module, max_steps, batch_size, ckpt_path=None, **trainer_args):
    """fit on 4 fixed rows, every file in tmp_path."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4, 4, generator=g), torch.randn(4, 1, generator=g))
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=str(tmp_path),
                         logger=CSVLogger(str(tmp_path / "logs"), name="", version=0),
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", **trainer_args)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=batch_size), ckpt_path=ckpt_path)
    return trainer


def lightning_callback(**options):
    integration = pytest.importorskip("lrfluct_fast.integrations.lightning", exc_type=ImportError)
    return integration.LightningCallback(**options)


def test_lightning_unknown_options_raise_naming_them():
    with pytest.raises(TypeError, match="grad_scalar"):
        lightning_callback(grad_scalar=None)


def test_lightning_fit_checkpoint_and_resume(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    run_dir = str(tmp_path / "run")
    callback = lightning_callback(log_dir=run_dir, log_every=1, keep=True)
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2,
                                           save_top_k=-1, filename="{step}")
    module = lightning_module()
    before = module.net[0].weight.detach().clone()
    # one batch of every row a step: a resumed fit sees the same batches (a plain DataLoader
    # does not resume mid-epoch, Lightning restarts its epoch)
    fit(tmp_path, [callback, every_epoch], module, max_steps=4, batch_size=4)
    mon = callback.monitor
    assert mon.steps == 4 and wrapped(module)  # keep=True: still instrumented
    assert not torch.equal(module.net[0].weight, before)
    uninterrupted = mon.summary()
    assert (uninterrupted["net.0"]["weight.spread"] > 0).any()
    logged = np.genfromtxt(tmp_path / "logs" / "version_0" / "metrics.csv", delimiter=",",
                           names=True, dtype=None, encoding=None)
    assert list(logged["step"]) == [1, 2, 3, 4]
    assert logged["lrfluctnet0participation_ratio"][-1] == pytest.approx(
        mon.metrics()["net.0"]["participation_ratio"])
    mon.remove()

    resumed = lightning_callback(log_dir=run_dir, log_every=1, keep=True)
    fit(tmp_path, [resumed], lightning_module(), max_steps=4, batch_size=4,
        ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert resumed.monitor.steps == 4
    assert_same_summaries(uninterrupted, resumed.monitor.summary())
    resumed.monitor.remove()
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert_page_shows(run_dir, "net.0")


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_lightning_accumulation_and_skipped_step(tmp_path):
    """accumulate_grad_batches=2 on batches of one row: a monitor step every 2 batches.
    training_step returns None through step 2 (no backward: Lightning still counts the step):
    steps 1 and 3 leave 2 rows each. The last summary is the one remove() writes at fit end."""
    run_dir = str(tmp_path / "run")
    callback = lightning_callback(log_dir=run_dir, log_every=1)
    module = lightning_module(skip_at=1)
    trainer = fit(tmp_path, [callback], module, max_steps=3, batch_size=1, accumulate_grad_batches=2,
                  enable_checkpointing=False)
    assert trainer.global_step == 3 and callback.monitor.steps == 3
    assert not wrapped(module)  # removed at fit end
    step, last = lf.load_run(run_dir).summaries[-1]
    assert step == 3 and last["net.0"]["steps"] == 3
    assert (last["net.0"]["gradient.count"] == 4).all() and (last["net.0"]["activation.count"] == 4).all()
    assert logged_steps(run_dir) == [1, 2, 3]
