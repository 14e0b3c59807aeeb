"""The run directory (lrfluct_fast.rundir): files against the Monitor, crash safety (SIGKILL of a
training process), resume without gap or duplicate, bad input, write errors, TensorBoard,
flat memory over 20k steps, and a training step that takes device copies only.

The model is a seeded 2-layer net and batch(step) a seeded batch, so a run interrupted and
resumed can be compared with one that was not.
"""
from __future__ import annotations

import errno
import importlib
import importlib.util
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import lrfluct_fast as lf
from lrfluct_fast import rundir

LAYERS = ["0", "2"]
COUNT_KEYS = {"activation.count", "activation.nonfinite", "gradient.count",
              "gradient.nonfinite", "steps"}


def _make(seed=0, hidden=32):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))
    return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def _batch(step):
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(step))


def _train_step(net, opt, mon, step):
    opt.zero_grad()
    net(_batch(step)).square().mean().backward()
    opt.step()
    mon.step()


def _run(path, steps, **options):
    net, opt = _make()
    mon = lf.instrument(net, log_dir=path, **options)
    for step in range(1, steps + 1):
        _train_step(net, opt, mon, step)
    return net, opt, mon


def _assert_summary_close(got, want, msg=""):
    for key, value in got.items():
        if key in COUNT_KEYS:
            np.testing.assert_array_equal(value, want[key], err_msg=f"{msg} {key}")
        else:
            np.testing.assert_allclose(value, want[key], rtol=1e-9, err_msg=f"{msg} {key}")


# ---------------------------------------------------------------------------------------
# 1. what is written is what the Monitor reports
# ---------------------------------------------------------------------------------------
def test_files_match_monitor_and_read_directly(tmp_path):
    d = tmp_path / "run"
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d, log_every=2, summary_every=4)
    want_metrics, want_summaries = {}, {}
    for step in range(1, 11):
        _train_step(net, opt, mon, step)
        if step % 2 == 0:
            want_metrics[step] = mon.metrics()
        if step % 4 == 0:
            want_summaries[step] = mon.summary()
        if step == 6:
            mon.reset()  # a new statistics window; the run's step goes on
    want_summaries[10] = mon.summary()
    mon.close()

    run = lf.load_run(d)
    assert run.layers == LAYERS and len(run.run_id) == 32
    assert run.info["options"]["log_every"] == 2 and run.info["neurons"] == {"0": 32, "2": 4}
    assert run.metrics["step"].tolist() == [s for s in range(2, 11, 2) for _ in LAYERS]
    assert run.metrics["layer"].tolist() == LAYERS * 5
    for step, per_layer in want_metrics.items():
        for layer, m in per_layer.items():
            for name, value in m.items():
                steps, values = run.series(layer, name)
                np.testing.assert_allclose(values[steps == step], [value], rtol=1e-9,
                                           err_msg=f"step {step} {layer} {name}")
    assert [step for step, _ in run.summaries] == [4, 8, 10]  # every 4 steps, and at close
    for step, logged in run.summaries:
        assert set(logged) == set(LAYERS)
        for layer, s in logged.items():
            # per-neuron keys only: the weight-sized temporal variance is not written
            assert set(s) == set(want_summaries[step][layer]) - {"weight.temporal_var"}
            _assert_summary_close(s, want_summaries[step][layer], f"step {step} {layer}")
    assert run.summaries[1][1]["0"]["steps"] == 2  # reset at step 6

    # numpy (and pandas) read the files directly
    table = np.genfromtxt(d / "metrics.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert table["step"].tolist() == run.metrics["step"].tolist()
    np.testing.assert_allclose(table["participation_ratio"], run.metrics["participation_ratio"])
    with np.load(d / "summaries" / "step_000000004.npz") as z:
        np.testing.assert_allclose(z["2/weight.spread"], want_summaries[4]["2"]["weight.spread"])
    if importlib.util.find_spec("pandas"):
        import pandas as pd
        df = run.to_pandas()
        assert list(df.columns) == list(run.metrics)
        pd.testing.assert_frame_equal(df.drop(columns="layer"),
                                      pd.read_csv(d / "metrics.csv").drop(columns="layer"))


def test_step_takes_device_copies_only(tmp_path, monkeypatch):
    """No .cpu()/.item()/.numpy()/.tolist() in the training thread during step(); the writer
    thread does the host copies."""
    # the plain-torch fallback's CPU-only Welford reads its CPU tally on the host, by design;
    # what is checked here is the code a GPU runs too
    update_module = importlib.import_module("lrfluct_fast.ops.temporal_update")
    monkeypatch.setattr(update_module, "_welford_in_place", lambda *a: False)
    net, opt = _make()
    mon = lf.instrument(net, log_dir=tmp_path / "run", log_every=1, summary_every=2)
    in_step, calls = [False], []
    for name in ("cpu", "item", "numpy", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if in_step[0] and threading.current_thread() is threading.main_thread():
                calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    for step in range(1, 5):
        opt.zero_grad()
        net(_batch(step)).square().mean().backward()
        opt.step()
        in_step[0] = True
        mon.step()
        in_step[0] = False
    mon.close()
    assert calls == []
    run = lf.load_run(tmp_path / "run")
    assert run.metrics["step"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


# ---------------------------------------------------------------------------------------
# 2. crash safety and resume
# ---------------------------------------------------------------------------------------
RESUME_OPTIONS = dict(log_every=1, summary_every=3)


def _crash_child(tmp):
    """Trains until killed, checkpointing every 10 steps (run in a subprocess)."""
    net, opt = _make()
    mon = lf.instrument(net, log_dir=os.path.join(tmp, "run"), **RESUME_OPTIONS)
    for step in itertools.count(1):
        _train_step(net, opt, mon, step)
        if step % 10 == 0:
            ckpt = {"step": step, "model": net.state_dict(), "opt": opt.state_dict(),
                    "monitor": mon.state_dict()}
            torch.save(ckpt, os.path.join(tmp, "ckpt.tmp"))
            os.replace(os.path.join(tmp, "ckpt.tmp"), os.path.join(tmp, "ckpt.pt"))


def _logged_steps(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n") // len(LAYERS)
    except FileNotFoundError:
        return 0


def test_sigkill_leaves_a_loadable_directory_and_resume_continues_it(tmp_path):
    tmp = str(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "import test_rundir; test_rundir._crash_child(sys.argv[2])",
         os.path.dirname(os.path.abspath(__file__)), tmp],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while _logged_steps(os.path.join(tmp, "run", "metrics.csv")) < 36:
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "the training process did not get to step 36"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)  # while it trains and writes
    finally:
        child.kill()
        child.wait()

    crashed = lf.load_run(os.path.join(tmp, "run"))
    steps = crashed.metrics["step"].tolist()
    last = steps[-1]
    assert last >= 36 and steps == [s for s in range(1, last + 1) for _ in LAYERS]
    # a kill between a step's metrics and its summary can leave that summary unwritten
    logged = [s for s, _ in crashed.summaries]
    assert logged == list(range(3, 3 * len(logged) + 1, 3)) and 3 * len(logged) >= last - 3

    ckpt = torch.load(os.path.join(tmp, "ckpt.pt"))
    saved = ckpt["step"]
    assert saved >= 30
    net, opt = _make()
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    mon = lf.instrument(net, log_dir=os.path.join(tmp, "run"), **RESUME_OPTIONS)
    mon.load_state_dict(ckpt["monitor"])
    end = max(last, saved) + 4
    for step in range(saved + 1, end + 1):
        _train_step(net, opt, mon, step)
    mon.close()

    *_, ref_mon = _run(os.path.join(tmp, "reference"), end, **RESUME_OPTIONS)
    ref_mon.close()
    resumed, ref = lf.load_run(os.path.join(tmp, "run")), lf.load_run(os.path.join(tmp, "reference"))
    assert resumed.run_id == crashed.run_id
    assert [r["step"] for r in resumed.info["resumes"]] == [saved]
    # no gap, no duplicated step, and the numbers of a run that was never interrupted
    assert resumed.metrics["step"].tolist() == ref.metrics["step"].tolist()
    for key in ref.metrics:
        if key not in ("step", "layer"):
            np.testing.assert_allclose(resumed.metrics[key], ref.metrics[key], rtol=1e-6, err_msg=key)
    assert [s for s, _ in resumed.summaries] == [s for s, _ in ref.summaries]
    for (step, got), (_, want) in zip(resumed.summaries, ref.summaries):
        for layer in LAYERS:
            for key, value in got[layer].items():
                np.testing.assert_allclose(value, want[layer][key], rtol=1e-6, err_msg=f"{step} {key}")


def test_partial_line_and_temp_files_ignored_and_resume_drops_later_rows(tmp_path):
    d = tmp_path / "run"
    net, opt, mon = _run(d, 4, log_every=1, summary_every=2)
    sd = mon.state_dict()
    for step in (5, 6):
        _train_step(net, opt, mon, step)
    mon.close()
    # what a run killed mid-write leaves behind
    with open(d / "metrics.csv", "ab") as f:
        f.write(b"7,0,0.25,0.5")
    (d / "summaries" / ".step_000000008.npz.tmp").write_bytes(b"PK\x03\x04half")
    (d / ".run.json.tmp").write_bytes(b'{"run_id": ')
    run = lf.load_run(d)
    assert run.metrics["step"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert [s for s, _ in run.summaries] == [2, 4, 6]

    net, opt = _make()
    mon = lf.instrument(net, log_dir=d, log_every=1, summary_every=2)
    mon.load_state_dict(sd)  # step 4: rows 5, 6, the partial line and temp files go
    assert sorted(os.listdir(d / "summaries")) == ["step_000000002.npz", "step_000000004.npz"]
    assert not (d / ".run.json.tmp").exists()
    for step in (5, 6, 7):
        _train_step(net, opt, mon, step)
    mon.close()
    run = lf.load_run(d)
    assert run.metrics["step"].tolist() == [s for s in range(1, 8) for _ in LAYERS]
    assert [s for s, _ in run.summaries] == [2, 4, 6, 7]


# ---------------------------------------------------------------------------------------
# 3. bad input
# ---------------------------------------------------------------------------------------
def test_log_dir_holding_another_run_raises(tmp_path):
    d, other = tmp_path / "run", tmp_path / "other"
    _, _, mon = _run(d, 2, log_every=1)
    sd_same = mon.state_dict()
    mon.close()
    _, _, mon_other = _run(other, 2, log_every=1)
    sd_other = mon_other.state_dict()
    mon_other.close()
    plain_net, _ = _make()
    plain = lf.instrument(plain_net)
    sd_plain = plain.state_dict()
    plain.remove()

    wider, _ = _make(hidden=16)
    with pytest.raises(ValueError, match="other layers or options"):
        lf.instrument(torch.nn.Sequential(torch.nn.Linear(8, 4)), log_dir=d)
    with pytest.raises(ValueError, match="other layers or options"):
        lf.instrument(_make()[0], log_dir=d, weight_mode="neuron")
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d)  # same layers: may be a resume, decided by load_state_dict
    with pytest.raises(ValueError, match="holds run .* call load_state_dict"):
        _train_step(net, opt, mon, 1)
    with pytest.raises(ValueError, match="holds run"):
        mon.load_state_dict(sd_other)
    with pytest.raises(ValueError, match="without a run directory"):
        mon.load_state_dict(sd_plain)
    mon.remove()  # leaves the run as it was
    assert lf.load_run(d).metrics["step"].tolist() == [1, 1, 2, 2]
    mon = lf.instrument(_make()[0], log_dir=d)
    mon.load_state_dict(sd_same)
    mon.close()

    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "metrics.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no run.json"):
        lf.instrument(_make()[0], log_dir=tmp_path / "stray")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("unrelated files are fine\n")
    lf.instrument(_make()[0], log_dir=tmp_path / "notes").close()
    lf.instrument(wider, log_dir=tmp_path / "fresh").close()


def test_corrupt_files_raise_naming_the_file(tmp_path):
    d = tmp_path / "run"
    _, _, mon = _run(d, 4, log_every=1, summary_every=2)
    mon.close()
    npz = d / "summaries" / "step_000000002.npz"
    good = npz.read_bytes()
    npz.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match="corrupt summary file .*step_000000002.npz"):
        lf.load_run(d)
    npz.write_bytes(np.random.default_rng(0).bytes(len(good)))
    with pytest.raises(ValueError, match="corrupt summary file .*step_000000002.npz: not an .npz"):
        lf.load_run(d)
    npz.write_bytes(good)

    csv_file = d / "metrics.csv"
    lines = csv_file.read_text().splitlines(keepends=True)
    csv_file.write_text("".join(lines[:2] + ["2,0,oops\n"] + lines[3:]))
    with pytest.raises(ValueError, match=r"metrics.csv, line 3"):
        lf.load_run(d)
    csv_file.write_text("".join(lines[:2] + ["2,0,x" + lines[2][5:]] + lines[3:]))
    with pytest.raises(ValueError, match=r"metrics.csv, line 3: not a number"):
        lf.load_run(d)
    csv_file.write_text("".join(lines))

    info = (d / "run.json").read_text()
    (d / "run.json").write_text(info.replace('"layers": [', '"layers": null, "old": ['))
    with pytest.raises(ValueError, match="corrupt run file .*run.json: 'layers' must be a JSON "
                                         "array, got null"):
        lf.load_run(d)
    (d / "run.json").write_text('{"run_id": "abc", ')
    with pytest.raises(ValueError, match="corrupt run file .*run.json"):
        lf.load_run(d)
    (d / "run.json").unlink()
    with pytest.raises(ValueError, match="not a run directory: it has no run.json"):
        lf.load_run(d)
    with pytest.raises(ValueError, match="metrics.csv is not a run directory: it is a file"):
        lf.load_run(d / "metrics.csv")
    with pytest.raises(ValueError, match="nowhere is not a run directory: it does not exist"):
        lf.load_run(d / "nowhere")


def test_bad_options_raise(tmp_path, monkeypatch):
    net, _ = _make()
    for opts in (dict(log_every=0), dict(log_errors="ignore")):
        with pytest.raises(ValueError):
            lf.instrument(net, **opts)
    for opts in (dict(summary_every=1.5), dict(tensorboard="yes", log_dir=tmp_path)):
        with pytest.raises(TypeError):
            lf.instrument(net, **opts)
    with pytest.raises(TypeError, match="log_dir"):
        lf.instrument(net, log_dir=3)
    with pytest.raises(ValueError, match="pass log_dir"):
        lf.instrument(net, tensorboard=True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        lf.instrument(net, log_dir=tmp_path / "tb", tensorboard=True)
    assert not hasattr(net[0], "_lrfluct")  # nothing was left instrumented


# ---------------------------------------------------------------------------------------
# 4. write errors
# ---------------------------------------------------------------------------------------
def test_write_error_warns_and_training_goes_on(tmp_path):
    d = tmp_path / "run"
    net, opt, mon = _run(d, 2, log_every=1)
    mon.flush()
    shutil.rmtree(d)  # the directory disappears under a running training
    with pytest.warns(RuntimeWarning, match="failed .*training goes on"):
        for step in range(3, 6):
            _train_step(net, opt, mon, step)
        mon.flush()
    assert mon.summary()["0"]["steps"] == 5
    with pytest.warns(RuntimeWarning, match="writes to the run directory .* failed"):
        mon.close()


def _temp_files(d):
    return [os.path.join(root, f) for root, _, files in os.walk(d) for f in files
            if f.endswith(".tmp")]


def test_full_disk_one_warning_no_temp_files_and_summary_written_again(tmp_path, monkeypatch):
    """60 steps on a full disk (each summary write fails halfway through its file), then
    space returns: one warning, no orphan temp file, and the next write brings the summary."""
    d = tmp_path / "run"
    net, opt, mon = _run(d, 1, log_every=1, summary_every=10)
    mon._run.writer.drain()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half a summary")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))  # metrics.csv appends fail too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2, 62):
            _train_step(net, opt, mon, step)
        mon._run.writer.drain()
    assert len([w for w in caught if "run directory" in str(w.message)]) == 1
    assert _temp_files(d) == []
    monkeypatch.undo()  # space returns
    _train_step(net, opt, mon, 62)  # not a summary step: the owed summary comes with it
    mon._run.writer.drain()
    run = lf.load_run(d)
    assert [s for s, _ in run.summaries] == [62]
    _assert_summary_close(run.summaries[-1][1]["0"], mon.summary()["0"])
    assert sorted(set(run.metrics["step"])) == [1, 62]  # the failed steps' rows are lost
    with pytest.warns(RuntimeWarning, match="60 writes to the run directory .* failed"):
        mon.close()


def test_temp_files_removed_when_the_directory_is_opened(tmp_path):
    d = tmp_path / "run"
    _, _, mon = _run(d, 2, summary_every=1)
    mon.close()
    (d / "summaries" / ".step_000000003.npz.tmp").write_bytes(b"PK\x03\x04half")
    (d / ".metrics.csv.tmp").write_bytes(b"step,layer\n")
    mon2 = lf.instrument(_make()[0], log_dir=d)
    assert _temp_files(d) == []
    mon2.remove()


def test_write_error_raises_with_log_errors_raise(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    net, opt, mon = _run(tmp_path / "run", 1, log_every=1, summary_every=2, log_errors="raise")
    monkeypatch.setattr(np, "savez", disk_full)  # the module the writer saves with
    _train_step(net, opt, mon, 2)  # its summary write fails in the writer thread
    with pytest.raises(RuntimeError, match="log_errors='raise'") as info:
        mon.flush()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    with pytest.raises(RuntimeError):
        _train_step(net, opt, mon, 3)
    with pytest.raises(RuntimeError):
        mon.close()
    mon.remove()


# ---------------------------------------------------------------------------------------
# 5. TensorBoard
# ---------------------------------------------------------------------------------------
def test_tensorboard_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, _, mon = _run(tmp_path / "run", 4, log_every=1, summary_every=2, tensorboard=True)
    mon.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {f"{layer}/{m}" for layer in LAYERS for m in ("participation_ratio", "spread_of_spread")} \
        <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("0/participation_ratio")] == [1, 2, 3, 4]
    assert {"0/weight.spread", "2/bias.spread"} <= set(tags["histograms"])
    assert [e.step for e in acc.Histograms("0/weight.spread")] == [2, 4]


# ---------------------------------------------------------------------------------------
# 6. bounded over a long run
# ---------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_memory_flat_over_20k_steps(tmp_path):
    """20k steps (a real training step every 50th, mon.step() alone otherwise, to stay cheap),
    log_every=50: the Monitor's state, the writer's queue and the process RSS stay flat."""
    net, opt = _make()
    mon = lf.instrument(net, log_dir=tmp_path / "run", log_every=50, summary_every=1000)
    writer = mon._run.writer
    state, peak_queue, base = mon.memory_bytes(), 0, None
    for step in range(1, 20001):
        if step % 50 == 0:
            _train_step(net, opt, mon, step)
        else:
            mon.step()
        peak_queue = max(peak_queue, writer.queue.qsize())
        if step == 5000:
            mon.flush()
            base = _rss()
    mon.flush()
    grown = _rss() - base
    assert mon.memory_bytes() == state
    assert writer.queue.maxsize == rundir.QUEUE_SIZE and peak_queue <= rundir.QUEUE_SIZE
    assert writer.queue.qsize() == 0
    assert grown < 1 << 20, f"RSS grew {grown} bytes over 15k steps"
    mon.close()
    run = lf.load_run(tmp_path / "run")
    assert len(run.metrics["step"]) == 20000 // 50 * len(LAYERS)
    assert [s for s, _ in run.summaries] == list(range(1000, 20001, 1000))
