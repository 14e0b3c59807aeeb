"""`lrfluct bench` as a user runs it: a user's factory end to end, and the one-line errors."""
import json
import os
import sys

import pytest
import torch
from torch import nn

from lrfluct_fast import cli
from lrfluct_fast.benchmark import runner
from lrfluct_fast.benchmark.models import Workload, mse_loss

sys.path.insert(0, os.path.dirname(__file__))  # so "factories:tiny" imports


def test_overhead_pairs_the_steps_of_a_round():
    """Drift across rounds and a spike in one step do not show up as overhead (the ratio of
    the two medians here would say 25%)."""
    none = runner.ModeResult(times=[1.0, 2.0, 4.0])
    monitored = runner.ModeResult(times=[2.5, 2.2, 4.4])
    over = runner.overheads({"none": none, "lrfluct": monitored})
    assert over["none"] == 0
    assert over["lrfluct"] == pytest.approx(0.1)


def test_run_length_gives_each_mode_turns_of_consecutive_steps():
    """--run-length 3: after one warm-up round, each mode trains 3 steps in a row per turn and
    all but the first of them are timed, until every mode has `steps` timed steps."""
    trained = []  # the mode of every step, in order
    made = []     # runner.run makes one workload per mode, in the order of `modes`

    def make(device):
        mode = ("none", "lrfluct")[len(made)]
        made.append(mode)
        model = nn.Linear(3, 2)

        def loss(m, batch):
            trained.append(mode)
            return mse_loss(m, batch)
        return Workload(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        (torch.randn(4, 3), torch.randn(4, 2)), loss)

    results = runner.run(make, "cpu", ("none", "lrfluct"), steps=5, warmup=1, run_length=3)
    assert [len(r.times) for r in results.values()] == [5, 5]
    assert runner.turns_for(5, 3) == 3  # 2 timed steps a turn
    assert trained == (["none", "lrfluct"]
                       + ["lrfluct"] * 3 + ["none"] * 3 + ["none"] * 3 + ["lrfluct"] * 3
                       + ["lrfluct"] * 3 + ["none"] * 3)
    with pytest.raises(ValueError, match="run_length must be >= 1"):
        runner.run(make, "cpu", ("none",), steps=1, warmup=0, run_length=0)


def test_user_factory_writes_report(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--model", "factories:tiny", "--steps", "3", "--warmup", "1",
                   "--modes", "lrfluct", "hook-streaming", "hook-snapshot", "--out", str(out)])
    assert rc == 0
    report = (out / "bench.md").read_text()
    assert "--modes lrfluct hook-streaming hook-snapshot" in report  # the command that made it
    for mode in ("none", "lrfluct", "hook-streaming", "hook-snapshot"):
        assert f"| {mode} |" in report
    assert "(agree)" in report
    raw = json.loads((out / "bench.json").read_text())
    assert len(raw["factories:tiny"]["lrfluct"]["times_s"]) == 3
    assert raw["factories:tiny"]["agreement_max_rel_diff"] < 1e-3
    # lrfluct's memory is flat; the snapshot's grows with every step
    assert len(set(raw["factories:tiny"]["lrfluct"]["monitor_bytes"])) == 1
    snap = raw["factories:tiny"]["hook-snapshot"]["monitor_bytes"]
    assert snap[0] < snap[1] < snap[2]
    assert (out / "overhead.png").stat().st_size > 0


def test_lrfluct_variants_split_the_cost(tmp_path):
    """The opt-in modes run lrfluct with other options: neuron-mode weights keep O(neurons)
    state, and without weights the monitor keeps only the activation and gradient buffers."""
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--model", "factories:tiny", "--steps", "2", "--warmup", "0",
                   "--modes", "lrfluct", "lrfluct-neuron", "lrfluct-no-weights", "--out", str(out)])
    assert rc == 0
    raw = json.loads((out / "bench.json").read_text())["factories:tiny"]
    memory = {m: raw[m]["monitor_bytes"][-1] for m in ("lrfluct", "lrfluct-neuron", "lrfluct-no-weights")}
    assert memory["lrfluct-no-weights"] < memory["lrfluct-neuron"] < memory["lrfluct"]
    assert "| lrfluct-neuron |" in (out / "bench.md").read_text()


def test_plain_twin_reports_the_noise_floor(tmp_path):
    """none-twin is a second unmonitored copy of the model: no monitor, and its overhead
    against none, stated under the table, is the noise an overhead is read against."""
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--model", "factories:tiny", "--steps", "3", "--warmup", "0",
                   "--modes", "none-twin", "lrfluct", "--out", str(out)])
    assert rc == 0
    raw = json.loads((out / "bench.json").read_text())["factories:tiny"]
    assert raw["none-twin"]["monitor_bytes"] == [0, 0, 0]
    assert raw["lrfluct"]["monitor_bytes"][0] > 0
    twin = runner.overheads({m: runner.ModeResult(times=raw[m]["times_s"]) for m in ("none", "none-twin")})
    report = (out / "bench.md").read_text()
    assert "| none-twin |" in report
    assert f"Noise floor: none-twin, a second plain copy of the model, measured {twin['none-twin']:+.1%}" in report
    assert runner.attach("none-twin", nn.Linear(2, 2)) == (None, runner.contextlib.nullcontext)
    assert runner.report_modes()[:2] == ("none", "none-twin")  # `lrfluct bench` without --modes


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_module:f"], "cannot load factory"),
    (["--model", "factories:missing"], "cannot load factory"),
    (["--model", "factories:not_callable"], "is not callable"),
    (["--model", "resnet"], "unknown model"),
    (["--model", "hf:resnet"], "unknown model 'hf:resnet': use one of hf:gpt2"),
    (["--model", "factories:wrong"], "must return (model, optimizer, batch"),
    (["--device", "cuda:7"], "CUDA is not available"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--run-length", "0"], "--run-length must be >= 1"),
    (["--modes", "telepathy"], "unknown or unavailable modes"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    if "cuda" in argv[-1]:
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    rc = cli.main(["bench", "--out", str(tmp_path / "b"), "--steps", "1", "--warmup", "0",
                   "--model", "factories:tiny", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and message in err[0], err


def test_transformers_architecture_from_its_config(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--model", "hf:gpt2", "--steps", "1", "--warmup", "0",
                   "--modes", "lrfluct", "--out", str(out)])
    assert rc == 0
    report = (out / "bench.md").read_text()
    assert "## hf:gpt2" in report and "| lrfluct |" in report and "(agree)" in report


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli.main(["bench", "--model", "factories:tiny", "--out", str(blocker / "sub")])
    assert rc == 2
    assert "cannot write to --out" in capsys.readouterr().err


# Runs a script as the GPU machine does: from the checkout, with the package not installed
# (an editable install's finder and a path entry for the checkout are taken away first).
NOT_INSTALLED = """
import os, runpy, sys
root, script = sys.argv[1], sys.argv[2]
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')
                    and 'editable' not in getattr(f, '__name__', '')]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
assert 'lrfluct_fast' not in sys.modules
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name='__main__')
"""


def test_gpu_check_script_runs_in_smoke_mode(tmp_path):
    # every stage on CPU at tiny sizes (the test stages only collect): a GPU session finds it
    # working, though nothing installs the package there
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu"
    done = subprocess.run([sys.executable, "-c", NOT_INSTALLED, root,
                           os.path.join(root, "bench", "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = (out / "summary.md").read_text()
    assert "FAILED" not in summary, summary
    assert "kernels: worst" in summary and summary.count(": collected in") == 2, summary
    assert "| accumulate_stats |" in (out / "kernels.md").read_text()
    assert (out / "bench" / "bench.md").exists()


@pytest.mark.parametrize("mode,parts", [
    ("lrfluct-activations", {"activations"}),
    ("lrfluct-gradients", {"gradients"}),
    ("lrfluct-weights", {"weights", "biases"}),
])
def test_split_variants_monitor_one_part(mode, parts):
    """The variants that split lrfluct's cost each switch on only their part of the monitor."""
    from torch import nn
    assert mode in runner.known_modes()
    monitor, _ = runner.attach(mode, nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    on = {p for p in ("activations", "gradients", "weights", "biases") if monitor.options[p]}
    monitor.remove()
    assert on == parts
