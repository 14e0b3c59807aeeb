"""`lrfluct show`: the HTML page of run directories written by instrumented training: what it
shows, a run still being written, a run killed mid-write, an empty run, bad input (one line,
exit code 2), and the page rendered in headless Chromium.

The run is a seeded 3-layer MLP with a scalar parameter (a skipped module) trained with
windows and several summaries; scalars.csv is written by the test in the agreed format
(`step,name,value`; "sharpness", "preconditioned_sharpness", "spectra/{layer}/...").
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest
import torch

import lrfluct_fast as lf
from lrfluct_fast.cli import main
from lrfluct_fast.rundir.files import atomic_write
from lrfluct_fast.show import lines

LAYERS = ["body.0", "body.2", "body.4"]
WINDOWS = {"weight": 4, "gradient": 4, "activation": 8}
STEPS = 20


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16),
                                        torch.nn.ReLU(), torch.nn.Linear(16, 4))
        self.temperature = torch.nn.Parameter(torch.tensor(1.0))  # scalar: a skipped module

    def forward(self, x):
        return self.body(x) * self.temperature


def _train(path, steps, **options):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a thread pool on busy cores only waits
    try:
        return _train_steps(path, steps, **options)
    finally:
        torch.set_num_threads(threads)


def _train_steps(path, steps, *, every_step=None, **options):
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    mon = lf.instrument(net, log_dir=path, **{"log_every": 2, "summary_every": 5, "windows": WINDOWS,
                                               **options})
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        opt.zero_grad()
        net(torch.randn(16, 8, generator=gen)).square().mean().backward()
        opt.step()
        mon.step()
        if every_step is not None:
            every_step(step)
    mon.close()
    return mon


def _write_scalars(path, steps):
    rows = ["step,name,value"]
    for step in steps:
        rows += [f"{step},sharpness,{10 + step / 10}", f"{step},preconditioned_sharpness,{3 - step / 100}"]
        rows += [f"{step},spectra/{layer}/{q},{i + step / 50 + k}" for i, layer in enumerate(LAYERS)
                 for k, q in enumerate(("top_singular", "alpha"))]
    (path / "scalars.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("show") / "run"
    _train(path, STEPS)
    _write_scalars(path, range(4, STEPS + 1, 4))
    return path


def _show(capsys, *argv):
    rc = main(["show", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _page(capsys, path, *argv) -> str:
    rc, out, err = _show(capsys, path, *argv)
    assert rc == 0 and err == "", err
    file = out.strip()
    assert out.count("\n") == 1 and os.path.isfile(file)
    return open(file, encoding="utf-8").read()


def _copy(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("report.html"))


def _last_step(page: str) -> int:
    return int(re.search(r"last logged step (\d+)", page).group(1))


# ---------------------------------------------------------------------------------------
# what the page shows
# ---------------------------------------------------------------------------------------
def test_page_of_a_run(run_dir, capsys):
    rc, out, err = _show(capsys, run_dir)
    assert rc == 0 and err == "" and out == f"{run_dir / 'report.html'}\n"
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    run = lf.load_run(run_dir)
    assert _last_step(page) == STEPS
    # self-contained: nothing fetched from anywhere
    assert not re.search(r"<script|<link|<iframe|(src|href)=\"(?!data:|#)", page)
    # every metric: an overview panel, then a grid of one panel per layer
    metrics = [c for c in run.metrics if c not in ("step", "layer")]
    assert len(metrics) == 7
    assert page.count("<svg") == len(metrics) * (1 + len(LAYERS)) + 2 + 2 * len(LAYERS)  # + scalars
    for metric in metrics:
        assert f'id="metric-{metric}"' in page
    for i, layer in enumerate(LAYERS):
        assert page.count(f'title="#{i} {layer}"') == len(metrics) + 2  # + the two spectra grids
    # per-neuron maps, one per layer: weight, activation and gradient windows and summaries,
    # bias summaries (no bias windows)
    assert page.count("data:image/png;base64,") == 7 * len(LAYERS)
    for title in ("weight spread", "activation std", "gradient std", "bias spread"):
        assert f"{title} <span" in page
    assert "weight drift" not in page  # not in this run's summaries
    # the layers table holds the last logged value of each metric
    steps, pr = run.series("body.2", "participation_ratio")
    assert steps[-1] == STEPS and f'<td class="n">{lines.fmt(pr[-1])}</td>' in page
    # sharpness and spectra from scalars.csv
    for name in ("sharpness", "preconditioned_sharpness", "spectra: top_singular", "spectra: alpha"):
        assert f">{name}<" in page
    # run.json: options, monitored layers with neurons, skipped modules, coverage
    info = run.info
    assert info["skipped"] == [["temperature", "a scalar parameter has no neurons"]]
    total = sum(p.numel() for p in Net().parameters())
    assert info["coverage"] == {"trainable_parameters": total, "monitored_parameters": total - 1}
    assert "<td>temperature</td><td>a scalar parameter has no neurons</td>" in page
    assert f"Monitored {total - 1} of {total} trainable parameters ({100 * (total - 1) / total:.2f}%)" in page
    assert "<td>log_every</td><td><code>2</code>" in page


def test_out_option_and_quantities_added_later(run_dir, tmp_path, capsys):
    """--out; per-neuron drift and update size in the summaries get their maps; a run without
    scalars.csv says so; a run.json of an older version (no skipped, no coverage) still reads."""
    d = _copy(run_dir, tmp_path)
    (d / "scalars.csv").unlink()
    info = json.loads((d / "run.json").read_text())
    del info["skipped"], info["coverage"]
    (d / "run.json").write_text(json.dumps(info))
    for name in os.listdir(d / "summaries"):
        file = d / "summaries" / name
        with np.load(file) as z:
            arrays = dict(z)
        step = int(name[5:14])
        for layer in LAYERS:
            n = arrays[f"{layer}/weight.spread"].shape[0]
            arrays[f"{layer}/weight.drift"] = np.linspace(0, 1e-3 * step, n)
            arrays[f"{layer}/weight.update_size"] = np.full(n, 1e-4 * step)
        np.savez(file, **arrays)
    out = tmp_path / "page.html"
    page = _page(capsys, d, "--out", out)
    assert not (d / "report.html").exists()
    assert page.count("data:image/png;base64,") == 9 * len(LAYERS)
    assert "weight drift <span" in page and "weight update size <span" in page
    assert "Not logged: this run has no scalars.csv" in page
    assert "Skipped modules: not recorded" in page


def test_empty_run(tmp_path, capsys):
    """run.json but no logged step: a page that says so, exit 0."""
    _train(tmp_path / "run", 0)
    page = _page(capsys, tmp_path / "run")
    assert "No logged steps yet" in page and "last logged step –" in page
    assert all(f"<span id=\"layer-{i}\">{layer}</span>" in page for i, layer in enumerate(LAYERS))


# ---------------------------------------------------------------------------------------
# robustness: a run being written, a run killed mid-write
# ---------------------------------------------------------------------------------------
def test_run_being_written_by_training(tmp_path, capsys):
    """show while the training writes: every run of show succeeds."""
    path = tmp_path / "run"
    instrumented = threading.Event()

    def every_step(step):
        instrumented.set()
        threading.Event().wait(0.1)  # training takes a while: show runs several times meanwhile

    trainer = threading.Thread(target=_train, args=(path, 12),
                               kwargs=dict(log_every=1, summary_every=3, every_step=every_step))
    trainer.start()
    instrumented.wait(timeout=60)
    results = []
    while trainer.is_alive():
        results.append(main(["show", str(path), "--out", str(tmp_path / "page.html")]))
    trainer.join()
    out, err = capsys.readouterr()
    assert err == "" and len(results) >= 2 and set(results) == {0}, (results, err)
    assert _last_step(_page(capsys, path)) == 12


def test_run_being_appended_in_pieces(run_dir, tmp_path, capsys):
    """A writer that appends the run's files a few bytes at a time (lines and window records cut
    anywhere) and adds summaries, while show runs over and over: every run of show succeeds,
    and the last page shows the whole run."""
    d = tmp_path / "growing"
    (d / "summaries").mkdir(parents=True)
    (d / "windows").mkdir()
    shutil.copy(run_dir / "run.json", d / "run.json")
    appends = [name for name in ("metrics.csv", "scalars.csv", *[f"windows/{s}.f64" for s in WINDOWS])]
    sources = {name: (run_dir / name).read_bytes() for name in appends}
    summaries = sorted(os.listdir(run_dir / "summaries"))
    done = threading.Event()

    def writer():
        files = {name: open(d / name, "ab", buffering=0) for name in appends}
        pos = dict.fromkeys(appends, 0)
        try:
            for i in range(10 ** 6):
                progressed = False
                for name, data in sources.items():
                    chunk = data[pos[name]:pos[name] + 97]  # a prime: cuts fall everywhere
                    if chunk:
                        files[name].write(chunk)
                        pos[name] += len(chunk)
                        progressed = True
                if i % 5 == 0 and i // 5 < len(summaries):
                    name = summaries[i // 5]
                    atomic_write(str(d / "summaries" / name), (run_dir / "summaries" / name).read_bytes())
                    progressed = True
                if not progressed:
                    return
                threading.Event().wait(0.01)
        finally:
            for f in files.values():
                f.close()
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    results = []
    while not done.is_set():
        results.append(main(["show", str(d), "--out", str(tmp_path / "page.html")]))
    thread.join()
    out, err = capsys.readouterr()
    assert err == "" and len(results) >= 2 and set(results) == {0}, (results, err)
    assert _last_step(_page(capsys, d)) == STEPS


def test_killed_run(run_dir, tmp_path, capsys):
    """What a SIGKILL mid-write leaves: a partial last line of metrics.csv and scalars.csv, a
    last step with only some of its layers, temp files, a partial window record."""
    d = _copy(run_dir, tmp_path)
    with open(d / "metrics.csv", "a") as f:
        f.write(f"{STEPS + 2},body.0,0.5,0.5,3,0,0.5,0,24\n{STEPS + 2},body.2,0.1,0.")
    with open(d / "scalars.csv", "a") as f:
        f.write(f"{STEPS + 2},sharpn")
    with open(d / "windows" / "weight.f64", "ab") as f:
        f.write(np.arange(5, dtype="<f8").tobytes())
    (d / "summaries" / f".step_{STEPS + 2:09d}.npz.tmp").write_bytes(b"PK\x03\x04 partial")
    (d / ".run.json.tmp").write_text('{"run_id": ')
    page = _page(capsys, d)
    assert _last_step(page) == STEPS
    assert f"{STEPS // WINDOWS['weight']} weight windows" in page
    assert page.count("data:image/png;base64,") == 7 * len(LAYERS)


# ---------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2
# ---------------------------------------------------------------------------------------
def _garbage_run_json(d):
    (d / "run.json").write_text('{"run_id": "abc", ')


def _truncated_summary(d):
    file = d / "summaries" / sorted(os.listdir(d / "summaries"))[-1]
    file.write_bytes(file.read_bytes()[:300])


def _bad_metrics_line(d):
    text = (d / "metrics.csv").read_text().splitlines()
    text[3] += "x"  # a value that is not a number
    (d / "metrics.csv").write_text("\n".join(text) + "\n")


def _bad_scalars(d):
    (d / "scalars.csv").write_text("step,name,value\n5,sharpness,high\n")


@pytest.mark.parametrize("case, breaks, message", [
    ("missing", lambda d: shutil.rmtree(d), "does not exist"),
    ("file", lambda d: (shutil.rmtree(d), d.write_text("x")), "is a file"),
    ("no run.json", lambda d: (d / "run.json").unlink(), "has no run.json"),
    ("garbage run.json", _garbage_run_json, "corrupt run file"),
    ("truncated summary", _truncated_summary, "corrupt summary file"),
    ("corrupt metrics.csv", _bad_metrics_line, "corrupt metrics file"),
    ("corrupt scalars.csv", _bad_scalars, "corrupt scalars file"),
])
def test_bad_input(run_dir, tmp_path, capsys, case, breaks, message):
    d = _copy(run_dir, tmp_path)
    breaks(d)
    rc, out, err = _show(capsys, d)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("lrfluct show: error: ") and message in err, err


def test_unwritable_out(run_dir, tmp_path, capsys):
    rc, out, err = _show(capsys, run_dir, "--out", tmp_path / "no" / "such" / "dir" / "page.html")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "--out" in err and "cannot write" in err


# ---------------------------------------------------------------------------------------
# the page in a browser
# ---------------------------------------------------------------------------------------
def test_page_renders_in_chromium(run_dir, tmp_path, capsys):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = tmp_path / "page.html"
    _page(capsys, run_dir, "--out", page)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
                   capture_output=True, timeout=60, check=True)
    from matplotlib.image import imread
    pixels = (imread(shot)[..., :3] * 255).round().astype(np.uint32).reshape(-1, 3)
    assert pixels.shape[0] == 1200 * 2000
    colours = np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2]).size
    white = np.all(pixels >= 250, axis=1).mean()
    assert colours > 200 and white < 0.9, (colours, white)
