"""Monitor.log_scalars and the run directory's scalars.csv: rows as logged, read back by
load_run, a killed partial last line, resume without gap or duplicate, bad input."""
from __future__ import annotations

import os

import numpy as np
import pytest

import lrfluct_fast as lf
from test_rundir import _make, _train_step


def _train_and_log(net, opt, mon, steps):
    for step in steps:
        _train_step(net, opt, mon, step)
        mon.log_scalars({"sharpness": step / 4, "spectra/0/alpha": -step})  # at the run's step


def test_rows_as_logged_and_read_back(tmp_path):
    d = tmp_path / "run"
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d, log_every=5)
    assert (d / "scalars.csv").read_text() == "step,name,value\n"
    _train_and_log(net, opt, mon, range(1, 4))
    mon.log_scalars({"sharpness": float("nan")}, step=10)   # an explicit step; nan is a value
    mon.close()
    table = np.genfromtxt(d / "scalars.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert table.dtype.names == ("step", "name", "value")
    assert table["step"].tolist() == [1, 1, 2, 2, 3, 3, 10]
    run = lf.load_run(d)
    assert sorted(run.scalars) == ["sharpness", "spectra/0/alpha"]
    steps, values = run.scalars["sharpness"]
    assert steps.dtype == np.int64 and values.dtype == np.float64
    assert steps.tolist() == [1, 2, 3, 10]
    np.testing.assert_array_equal(values, [0.25, 0.5, 0.75, np.nan])
    assert run.scalars["spectra/0/alpha"][1].tolist() == [-1.0, -2.0, -3.0]


def test_without_a_run_directory_nothing_is_written_and_arguments_are_checked(tmp_path):
    net, opt = _make()
    mon = lf.instrument(net)
    mon.log_scalars({"sharpness": 1.5}, step=3)  # a no-op
    for values, step, error in [([("sharpness", 1.0)], None, TypeError),
                                ({"": 1.0}, None, ValueError),
                                ({"a\nb": 1.0}, None, ValueError),
                                ({3: 1.0}, None, ValueError),
                                ({"sharpness": "high"}, None, TypeError),
                                ({"sharpness": True}, None, TypeError),
                                ({"sharpness": 1.0}, -1, ValueError),
                                ({"sharpness": 1.0}, 2.5, ValueError)]:
        with pytest.raises(error, match="values|step"):
            mon.log_scalars(values, step=step)
    assert os.listdir(tmp_path) == []


def test_partial_last_line_ignored_then_cut(tmp_path):
    d = tmp_path / "run"
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d)
    _train_and_log(net, opt, mon, range(1, 3))
    sd = mon.state_dict()
    with open(d / "scalars.csv", "ab") as f:
        f.write(b"3,sharpn")                                 # a write killed mid-line
    assert lf.load_run(d).scalars["sharpness"][0].tolist() == [1, 2]
    mon.close()
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d)
    mon.load_state_dict(sd)                                  # the resume cuts the partial line
    _train_and_log(net, opt, mon, range(3, 5))
    mon.close()
    text = (d / "scalars.csv").read_text()
    assert "sharpn\n" not in text and text.count("\n") == 1 + 2 * 4
    assert lf.load_run(d).scalars["sharpness"][0].tolist() == [1, 2, 3, 4]


def test_writer_cuts_a_partial_line_before_its_first_append(tmp_path):
    d = tmp_path / "run"
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d)
    with open(d / "scalars.csv", "ab") as f:
        f.write(b"0,sharpn")
    mon.log_scalars({"sharpness": 1.0}, step=1)
    mon.close()
    assert (d / "scalars.csv").read_text() == "step,name,value\n1,sharpness,1.0\n"


def test_resume_drops_rows_after_the_checkpoint_no_gap_no_duplicate(tmp_path):
    d = tmp_path / "run"
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d, log_every=1)
    _train_and_log(net, opt, mon, range(1, 5))
    sd = mon.state_dict()                                    # at step 4
    _train_and_log(net, opt, mon, range(5, 8))               # logged after the checkpoint
    mon.flush()                                              # ... then the process dies
    assert lf.load_run(d).scalars["sharpness"][0].tolist() == list(range(1, 8))

    net, opt = _make()
    mon = lf.instrument(net, log_dir=d, log_every=1)
    mon.load_state_dict(sd)
    assert lf.load_run(d).scalars["sharpness"][0].tolist() == [1, 2, 3, 4]
    _train_and_log(net, opt, mon, range(5, 10))
    mon.close()
    run = lf.load_run(d)
    for name in ("sharpness", "spectra/0/alpha"):
        assert run.scalars[name][0].tolist() == list(range(1, 10))
    np.testing.assert_array_equal(run.scalars["sharpness"][1], np.arange(1, 10) / 4)
    assert sorted(set(run.metrics["step"].tolist())) == list(range(1, 10))


def test_a_directory_with_only_scalars_is_a_logged_run(tmp_path):
    d = tmp_path / "run"
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d, log_every=100, summary_every=100)
    mon.log_scalars({"sharpness": 2.0}, step=0)
    mon.close()
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d, log_every=100, summary_every=100)
    with pytest.raises(ValueError, match="holds run .* with logged steps"):
        mon.log_scalars({"sharpness": 3.0})


def test_corrupt_scalars_file_raises_naming_it(tmp_path):
    d = tmp_path / "run"
    net, opt = _make()
    mon = lf.instrument(net, log_dir=d)
    mon.close()
    (d / "scalars.csv").write_text("step,name,value\n1,sharpness,high\n")
    with pytest.raises(ValueError, match="corrupt scalars file .*scalars.csv, line 2"):
        lf.load_run(d)
