"""The learning-rate experiment: dataset, models, the `reproduce` command end to end.

Runs are tiny (8 x 8 images, a few dozen samples, 2 epochs) so the whole file stays fast.
The end-to-end runs use the fused monitor when lrfluct_fast.instrument exists, else the hook
baseline (the command's behaviour does not depend on which).
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import lrfluct_fast as lf
from lrfluct_fast import cli
from lrfluct_fast.experiments import reproduce
from lrfluct_fast.experiments.autoencoder import build_autoencoder, monitored_layers, relu_layers
from lrfluct_fast.experiments.plots import FIGURES
from lrfluct_fast.experiments.shapes import CLASSES, make_shapes, render
from lrfluct_fast.experiments.train import train_autoencoder

HAS_FUSED = hasattr(lf, "instrument")
MONITOR = "fused" if HAS_FUSED else "hooks"
TINY = ["--epochs", "2", "--image-size", "8", "--samples", "32", "--test-samples", "16",
        "--batch-size", "8", "--widths", "16", "8", "--latent", "4", "--no-progress",
        "--monitor", MONITOR]
LRS = ["--lrs", "1e-2", "1e-3"]


# -- dataset ---------------------------------------------------------------------------------
def test_shapes_deterministic_for_a_seed():
    a, la = make_shapes(40, 16, seed=3, noise=0.05)
    b, lb = make_shapes(40, 16, seed=3, noise=0.05)
    c, _ = make_shapes(40, 16, seed=4, noise=0.05)
    assert a.shape == (40, 1, 16, 16) and a.dtype == np.float32 and la.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_shapes_all_eight_classes_balanced():
    _, labels = make_shapes(83, 8, seed=0)
    counts = np.bincount(labels, minlength=8)
    assert len(CLASSES) == 8 and counts.min() >= 10 and counts.max() <= 11


def test_shapes_distinct():
    # same pose for every class: any two must differ on a visible part of the image
    images = render(np.arange(8), 16, 16, 12, 0.0, 32)
    for i in range(8):
        assert images[i].mean() > 0.1, CLASSES[i]
        for j in range(i):
            assert np.abs(images[i] - images[j]).mean() > 0.02, (CLASSES[i], CLASSES[j])


def test_shapes_stay_in_frame_and_options_apply():
    plain, _ = make_shapes(16, 16, seed=1, jitter=0.0, rotation=False)
    rotated, _ = make_shapes(16, 16, seed=1, jitter=0.0, rotation=True)
    assert not np.array_equal(plain, rotated)
    # the default jitter and scale range keep every shape off the border
    images, _ = make_shapes(200, 32, seed=2)
    border = np.concatenate([images[:, 0, 0], images[:, 0, -1],
                             images[:, 0, :, 0], images[:, 0, :, -1]])
    assert border.max() < 0.5


# -- models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_autoencoder_shapes_and_layer_names(arch):
    torch.manual_seed(0)
    model = build_autoencoder(arch, 16, latent=4)
    x = torch.rand(3, 1, 16, 16)
    y = model(x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    layers = monitored_layers(model)
    assert layers[0].startswith("encoder.") and layers[-1] == "decoder.out"
    relus = relu_layers(model)
    assert relus and set(relus) < set(layers) and "decoder.out" not in relus
    assert "encoder.latent" in layers and "encoder.latent" not in relus


# -- the command -----------------------------------------------------------------------------
def _run(capsys, *argv):
    code = cli.main(["reproduce", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _close(text: str, value) -> bool:
    value = float(value)
    if text == "nan":
        return not np.isfinite(value)
    return np.isclose(float(text), value, rtol=1e-3, atol=0)


def _over_two_seeds(cell: str, values) -> bool:
    """A report cell "mean (min–max)" against the two seeds' values."""
    m = re.fullmatch(r"(\S+) \((\S+)–(\S+)\)", cell)
    assert m, cell
    return all(_close(t, v) for t, v in zip(m.groups(), (np.mean(values), min(values),
                                                          max(values))))


SEEDS = (0, 1)


def _load(out, lrs=(1e-2, 1e-3)):
    return {s: {lr: reproduce.load_result(str(out / reproduce.result_filename(s, lr)))
                for lr in lrs} for s in SEEDS}


def test_reproduce_writes_every_artifact_and_a_consistent_report(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(capsys, *TINY, *LRS, "--seeds", *map(str, SEEDS), "--sharpness-every",
                        "3", "--out", str(out))
    assert code == 0, err
    names = [f"lr_{lr}_seed{s}.npz" for s in SEEDS for lr in ("0.01", "0.001")]
    for name in ("config.json", "report.md", *names, *FIGURES):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert '"seeds": [\n    0,\n    1\n  ]' in (out / "config.json").read_text()

    res = _load(out)
    layers = [str(n) for n in res[0][1e-2]["layers"]]
    for s in SEEDS:
        assert int(res[s][1e-2]["seed"]) == s
        assert res[s][1e-2]["history/train_loss"].shape == (2,)
        assert res[s][1e-2][f"history/{layers[0]}/weight.spread"].shape == (2, 16)
        assert int(res[s][1e-2][f"summary/{layers[0]}/steps"]) == 4  # one epoch, 32 / 8
        # sharpness every 3 steps and after the last (8); spectra every step and window
        r = res[s][1e-2]
        assert r["sharpness/step"].tolist() == [3, 6, 8]
        assert r["sharpness/value"].shape == r["sharpness/preconditioned"].shape == (3,)
        assert r["spectra/step"].tolist() == list(range(1, 9))
        assert r["spectra/epoch"].tolist() == [0, 1, 2]
        for layer in layers:
            assert r[f"spectra/{layer}/top_singular"].shape == (8,)
            for key in ("alpha", "stable_rank", "spectral_norm"):
                assert r[f"spectra/{layer}/{key}"].shape == (3,)
        # the tracked top singular value ends near the exact one of the last summary
        assert np.isclose(r[f"spectra/{layers[0]}/top_singular"][-1],
                          r[f"spectra/{layers[0]}/spectral_norm"][-1], rtol=0.1)
    # each seed draws its own data and initial weights
    assert not np.array_equal(res[0][1e-2]["recon/inputs"], res[1][1e-2]["recon/inputs"])

    text = (out / "report.md").read_text()
    assert "reproduce --lrs 0.01 0.001 --epochs 2 --seeds 0 1" in text
    assert "Two seeds (0, 1)" in text and "range (min–max)" in text
    rows = _table_rows(text, "lr")
    assert [r[0] for r in rows] == ["0.01", "0.001"]
    for r in rows:
        lr = float(r[0])
        assert _over_two_seeds(r[1], [res[s][lr]["final/test_loss"] for s in SEEDS])
        assert _over_two_seeds(r[2], [res[s][lr]["final/train_loss"] for s in SEEDS])
    layer_rows = _table_rows(text, "lr | layer")
    assert len(layer_rows) == 2 * len(layers)
    for lr_text, layer, _relu, n, pr, _pr_n, dead, _active, _spread, sos, *_ in layer_rows:
        r = {s: res[s][float(lr_text)] for s in SEEDS}
        assert int(n) == r[0][f"summary/{layer}/weight.spread"].size
        assert _over_two_seeds(pr, [r[s][f"metrics/{layer}/participation_ratio"] for s in SEEDS])
        assert _over_two_seeds(dead, [r[s][f"metrics/{layer}/dead_fraction"] for s in SEEDS])
        # the saved metric is the spread of the saved spreads
        assert _over_two_seeds(sos, [np.std(r[s][f"summary/{layer}/weight.spread"])
                                     for s in SEEDS])

    # the sharpness table: Adam's threshold 38/lr and the late preconditioned value, recomputed
    sharp_rows = _table_rows(text, "lr | 38/lr")
    assert [r[0] for r in sharp_rows] == ["0.01", "0.001"]
    for lr_text, limit, _early, _peak, _late, late_value, _raw in sharp_rows:
        lr = float(lr_text)
        assert _close(limit, 38 / lr)
        late = [np.median(res[s][lr]["sharpness/preconditioned"][1:]) for s in SEEDS]  # 6, 8
        assert _over_two_seeds(late_value, late)
    assert "## Weight spectra" in text and "Martin & Mahoney" in text

    # the dead-fraction claim's verdict, recomputed from the files
    def dead(r):
        relus = [str(n) for n in r["relu_layers"]]
        n = [r[f"summary/{l}/weight.spread"].size for l in relus]
        return sum(float(r[f"metrics/{l}/dead_count"]) for l in relus) / sum(n)

    holds = [s for s in SEEDS if dead(res[s][1e-2]) > dead(res[s][1e-3])]
    word = ("no seed", "some seeds", "every seed")[(len(holds) > 0) + (len(holds) == 2)]
    line = next(l for l in text.splitlines() if "higher dead fraction" in l)
    assert line.startswith(f"- **Holds for {word}** ({len(holds)} of 2"), line
    verdicts = re.findall(r"^- \*\*(Holds for every seed|Holds for some seeds|Holds for no seed|"
                          r"Cannot tell)\*\*", text, flags=re.M)
    assert len(verdicts) == 7 + 2 * 2  # the paper's, and two sharpness claims per lr


def test_reproduce_resumes_every_seed_and_survives_an_interrupt(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    from lrfluct_fast.experiments import train
    real = train.train_autoencoder
    calls, interrupted = [], []

    def interrupted_on_second(*args, **kwargs):
        calls.append((kwargs["seed"], kwargs["lr"]))
        if len(calls) == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_autoencoder", interrupted_on_second)
    argv = [*TINY, *LRS, "--seeds", "0", "1", "--sharpness-every", "0", "--spectra-every", "0",
            "--out", str(out)]
    code, _, err = _run(capsys, *argv)
    assert code == 130
    assert sorted(p for p in os.listdir(out) if p.endswith(".npz")) == ["lr_0.01_seed0.npz"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    first = (out / "lr_0.01_seed0.npz").read_bytes()

    calls.clear()
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    assert calls == [(0, 1e-3), (1, 1e-2), (1, 1e-3)]  # the finished pair is skipped
    assert "seed 0 lr 0.01: found lr_0.01_seed0.npz, skipped" in err
    assert (out / "lr_0.01_seed0.npz").read_bytes() == first
    text = (out / "report.md").read_text()
    # sharpness and spectra off: no keys, figures or sections
    assert not [k for k in reproduce.load_result(str(out / "lr_0.01_seed1.npz"))
                if k.startswith(("sharpness/", "spectra/"))]
    assert not (out / "sharpness.png").exists() and not (out / "spectra.png").exists()
    assert "## Sharpness" not in text and "## Weight spectra" not in text

    # one more seed is another config: refused, not mixed in
    code, _, err = _run(capsys, *argv, "--seeds", "0", "1", "2")
    assert code == 2 and "seeds: [0, 1] -> [0, 1, 2]" in err


def test_reproduce_refuses_another_config_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"epochs": 5}\n')
    code, _, err = _run(capsys, *TINY, *LRS, "--out", str(out))
    assert code == 2
    assert err.count("\n") == 1 and "another config" in err and "--overwrite" in err
    assert "epochs: 5 -> 2" in err

    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, *TINY, *LRS, "--out", str(tmp_path / "stray"))
    assert code == 2 and "not empty" in err

    a_file = tmp_path / "file"
    a_file.write_text("x")
    bad = [
        ["--lrs", "0"], ["--lrs", "-0.001"], ["--lrs", "nan"], ["--lrs", "1e-3", "0.001"],
        ["--epochs", "0"], ["--batch-size", "0"], ["--scale-range", "0.3", "0.2"],
        ["--out", str(a_file)], ["--out", str(a_file / "sub")],
        ["--arch", "conv", "--image-size", "10"], ["--threads", "-1"],
        ["--seeds", "-1"], ["--seeds", "1", "1"], ["--seed", "1", "--seeds", "2"],
        ["--full-batch", "--batch-size", "8"], ["--sharpness-every", "-1"],
        ["--spectra-every", "-1"], ["--sharpness-probe", "0"],
        ["--monitor", "hooks"],  # cannot be paused for the sharpness (on by default)
    ]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for extra in bad:
        argv = [*TINY, "--out", str(tmp_path / "fresh"), *extra]
        code, _, err = _run(capsys, *argv)
        assert code == 2, (extra, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "fresh").exists()


def test_reproduce_overwrite_replaces_a_run_and_runs_full_batch_sgd(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"epochs": 5}\n')
    (out / "lr_0.5.npz").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    at = TINY.index("--batch-size")
    tiny = TINY[:at] + TINY[at + 2:]
    # the deprecated --seed still runs, as one seed
    code, _, err = _run(capsys, *tiny, "--lrs", "1e-2", "--epochs", "1", "--overwrite",
                        "--optimizer", "sgd", "--full-batch", "--seed", "3", "--out", str(out))
    assert code == 0, err
    assert "--seed S is deprecated; use --seeds S" in err
    assert not (out / "lr_0.5.npz").exists() and (out / "notes.txt").read_text() == "mine"
    res = reproduce.load_result(str(out / "lr_0.01_seed3.npz"))
    assert int(res["steps_per_epoch"]) == 1 and int(res["seed"]) == 3
    text = (out / "report.md").read_text()
    assert "needs at least two learning rates" in text
    assert "(sgd, full batch: every step uses all training images)" in text
    assert "One seed (3)" in text and "--seeds 3 " in text and "--batch-size 32 " in text
    # full-batch SGD: the sharpness of all images against 2/lr, nothing preconditioned
    assert "--sharpness-probe 32 " in text and "sharpness/preconditioned" not in res
    assert "| lr | 2/lr |" in text and "Cohen et al. 2021" in text
    assert (out / "sharpness.png").exists()


def test_over_seeds_convention():
    from lrfluct_fast.experiments.seeds import claim_verdict, over_seeds

    fmt = "{:.4g}".format
    assert over_seeds([2.0]).text(fmt) == "2"
    assert over_seeds([1.0, 3.0]).text(fmt) == "2 (1–3)"
    assert (over_seeds([1.0, 3.0]).lo, over_seeds([1.0, 3.0]).hi) == (1.0, 3.0)
    three = over_seeds([1.0, 2.0, 6.0])
    assert three.text(fmt) == f"3 ± {np.std([1, 2, 6], ddof=1):.4g}"
    assert over_seeds([1.0, float("nan"), 3.0]).text(fmt) == "2 (1–3) [2 of 3 seeds]"
    assert over_seeds([float("nan")]).text(fmt) == "nan"
    assert claim_verdict({0: True, 1: True}) == "**Holds for every seed** (2 of 2)"
    assert claim_verdict({0: False, 1: True, 2: True}) == \
        "**Holds for some seeds** (2 of 3: seed 1, 2)"
    assert claim_verdict({0: False, 1: None}) == \
        "**Holds for no seed** (0 of 1; cannot tell for seed 1 (nan))"
    assert claim_verdict({0: None}).startswith("**Cannot tell**")


# -- agreement with the float64 snapshot reference -------------------------------------------
def _train(monitor, arch):
    torch.manual_seed(0)
    images, labels = make_shapes(24, 8, seed=0)
    images = torch.from_numpy(images)
    model = build_autoencoder(arch, 8, widths=(12, 6) if arch == "mlp" else (4, 6), latent=3)
    return train_autoencoder(model, images, images[:8], labels[:8], lr=1e-2, epochs=2,
                             batch_size=8, window=1, monitor=monitor)


@pytest.mark.parametrize("monitor", [
    pytest.param("fused", marks=pytest.mark.skipif(
        not HAS_FUSED, reason="lrfluct_fast.instrument is not available yet")),
    "hooks",
])
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_run_statistics_match_the_snapshot_reference(monitor, arch):
    pytest.importorskip("lrfluct_fast.baselines")
    ref, got = _train("snapshot", arch), _train(monitor, arch)
    np.testing.assert_allclose(got["history/train_loss"], ref["history/train_loss"], rtol=1e-5)
    # per-epoch windows (the fused monitor's own, the others' reset) and the last one's summary;
    # the fused monitor's window rows are per neuron: no weight-shaped temporal_var
    keys = [k for k in ref if k.startswith(("summary/", "history/"))
            and not (monitor == "fused" and k.endswith("weight.temporal_var"))]
    assert keys and set(keys) <= set(got)
    assert got["history/window_end"].tolist() == [1, 2]
    for key in keys:
        r, g = np.asarray(ref[key], dtype=np.float64), np.asarray(got[key], dtype=np.float64)
        scale = np.nanmax(np.abs(r)) if np.isfinite(r).any() else 0.0
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-6 * scale, err_msg=key)


def test_edge_of_stability_verdicts_follow_the_numbers():
    from lrfluct_fast.experiments import probe_report

    steps = np.arange(10, 110, 10)
    rising = np.minimum(steps / 40, 1.02)  # reaches 2/lr x 1.02 and stays: at the edge
    config = {"optimizer": "sgd", "batch_size": 32, "samples": 32, "sharpness_probe": 32,
              "sharpness_every": 10}

    def run(lr, fraction):
        return {"lr": np.float64(lr), "sharpness/step": steps,
                "sharpness/value": fraction * 2 / lr}

    by_seed = {0: {1.0: run(1.0, rising), 0.1: run(0.1, rising / 10)},
               1: {1.0: run(1.0, rising), 0.1: run(0.1, rising[::-1] / 10)}}
    assert probe_report.threshold("adam", 0.01) == pytest.approx(3800)
    text = "\n".join(probe_report.sharpness_section(by_seed, config))
    claims = [l for l in text.splitlines() if l.startswith("- ")]
    assert claims[0].startswith("- **Holds for every seed** (2 of 2) at lr 1 that the sharpness "
                                "rises")
    assert claims[1].startswith("- **Holds for every seed** (2 of 2) at lr 1 that it settles")
    assert claims[2].startswith("- **Holds for some seeds** (1 of 2: seed 0) at lr 0.1")
    assert claims[3].startswith("- **Holds for no seed** (0 of 2) at lr 0.1 that it settles")
    assert "not the full batch" not in text and "Cohen et al. 2021" in text
