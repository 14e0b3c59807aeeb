"""`lrfluct reproduce`: the learning-rate experiment of arXiv 2511.10435, end to end.

Owns the command's options, their validation, the output folder (config, resume, atomic
per-(seed, lr) results) and the order of the work: per seed, data -> one model per lr; then
figures -> report. Training, figures, the report and the over-seeds convention belong to
train.py, plots.py, report.py and seeds.py.

The experiment: an autoencoder trained on the eight-shapes dataset at learning rates
1e-2, 1e-3, 1e-4, once per seed (`--seeds`; a seed fixes the images, the initial weights and
the batch order, so within a seed every lr starts from the same weights and sees the same
batches), every Linear / Conv2d layer monitored (activations, gradients, weight and bias
fluctuations); the report compares the spread of the spread and the participating neurons
with the reconstruction quality, as mean and spread over the seeds, and says for which seeds
each of the paper's claims holds.

Defaults, chosen where the paper's text was not available, all options:
  data       1024 training + 256 test images, 32 x 32 (shapes.py for the generator)
  model      MLP autoencoder 1024-256-64-16-64-256-1024, ReLU hidden, sigmoid output
  training   Adam, batch 64 (`--full-batch`: all images per step; with `--optimizer sgd`
             that is full-batch gradient descent), MSE; 150 epochs so the default run takes
             about 2 minutes per seed on 2 CPU cores (the paper's window is 1000 epochs:
             `--epochs 1000`)
  seeds      DEFAULT_SEEDS below; `--seed S` is the deprecated spelling of `--seeds S`
  statistics per-epoch windows (`--window 1`); the report uses the last one
  probes     sharpness every 100 optimizer steps on the first 256 training images (all of
             them with full batches), each layer's top singular value every step, its
             spectral summary at every window's close (probes.py; 11-15 s of each lr's
             32-34 s at these defaults, measured on 2 shared cores)
  monitor    `fused` = lrfluct_fast.instrument; `hooks` = the hook-based baseline
  device     cpu (the model is small; `--device cuda` when wanted), one torch thread
             (`--threads`: with 2 cores shared with other work, 2 threads ran a step
             10x slower than 1 in our measurements; 1 costs little on an idle machine)

Output folder (`--out`, default runs/reproduce): config.json (with the seeds),
lr_<lr>_seed<s>.npz per learning rate and seed (written atomically as soon as that pair
finishes; keys in train.py and probes.py), seven PNGs (five without the probes) and
report.md. Re-running with the same config skips the pairs already saved; a different config
(other seeds included) is refused unless `--overwrite`, which deletes this command's files
(and only those) first.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from .autoencoder import ARCHS, DEFAULT_LATENT, DEFAULT_WIDTHS
from .train import MONITORS, OPTIMIZERS

DEFAULT_LRS = (1e-2, 1e-3, 1e-4)
DEFAULT_SEEDS = (0,)
DEFAULT_BATCH_SIZE = 64
DEFAULT_SHARPNESS_EVERY = 100
DEFAULT_SHARPNESS_PROBE = 256
DEFAULT_SPECTRA_EVERY = 1
DEFAULT_EPOCHS = 150
CONFIG = "config.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Train the paper's autoencoder on eight synthetic shapes at several "
                     "learning rates with every layer monitored; write per-lr statistics "
                     "(npz), figures and report.md to --out.")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), metavar="LR",
                   help="learning rates (default: 1e-2 1e-3 1e-4)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"epochs per learning rate (default {DEFAULT_EPOCHS}, about 2-3 "
                        f"minutes on 2 CPU cores; the paper's window is --epochs 1000)")
    p.add_argument("--out", default=os.path.join("runs", "reproduce"),
                   help="output folder (default runs/reproduce); re-running with the same "
                        "config resumes")
    p.add_argument("--overwrite", action="store_true",
                   help="delete this command's files in --out first, whatever their config")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--monitor", choices=MONITORS, default="fused",
                   help="fused: lrfluct_fast.instrument (default); hooks: the hook baseline")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help=f"seeds; every learning rate is trained once per seed, each seed "
                        f"drawing its own data, initial weights and batch order (default "
                        f"{' '.join(map(str, DEFAULT_SEEDS))}); the report gives each number "
                        f"as the mean over seeds and their spread")
    p.add_argument("--seed", type=int, default=None,
                   help="deprecated: one seed, the same as --seeds S")
    g = p.add_argument_group("data")
    g.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    g.add_argument("--samples", type=int, default=1024, help="training images (default 1024)")
    g.add_argument("--test-samples", type=int, default=256, help="test images (default 256)")
    g.add_argument("--jitter", type=float, default=0.12,
                   help="max centre offset, fraction of the side (default 0.12)")
    g.add_argument("--scale-range", type=float, nargs=2, default=[0.2, 0.35], metavar=("LO", "HI"),
                   help="shape radius range, fraction of the side (default 0.2 0.35)")
    g.add_argument("--rotation", action=argparse.BooleanOptionalAction, default=True,
                   help="random rotation (default on)")
    g.add_argument("--noise", type=float, default=0.0, help="Gaussian pixel noise std (default 0)")
    g = p.add_argument_group("model and training")
    g.add_argument("--arch", choices=ARCHS, default="mlp", help="default mlp")
    g.add_argument("--widths", type=int, nargs="+", default=None, metavar="W",
                   help="hidden widths (mlp, default 256 64) or channels (conv, default 16 32)")
    g.add_argument("--latent", type=int, default=DEFAULT_LATENT,
                   help=f"bottleneck width (default {DEFAULT_LATENT})")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"default {DEFAULT_BATCH_SIZE}; --samples (or --full-batch) for "
                        f"full-batch training")
    g.add_argument("--full-batch", action="store_true",
                   help="one batch of all --samples images per step (full-batch gradient "
                        "descent with --optimizer sgd, the classic edge-of-stability setting)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="default adam")
    g.add_argument("--window", type=int, default=1,
                   help="epochs per statistics window (default 1); the report uses the last")
    g = p.add_argument_group("sharpness and spectra")
    g.add_argument("--sharpness-every", type=int, default=DEFAULT_SHARPNESS_EVERY, metavar="K",
                   help=f"optimizer steps between sharpness measurements (top Hessian "
                        f"eigenvalue of the loss on a fixed probe batch; with Adam also the "
                        f"preconditioned one), and after the last step; 0: off (default "
                        f"{DEFAULT_SHARPNESS_EVERY})")
    g.add_argument("--sharpness-probe", type=int, default=None, metavar="N",
                   help=f"the first N training images form the probe batch (default "
                        f"{DEFAULT_SHARPNESS_PROBE}, or all of them with full batches: the "
                        f"sharpness of the loss gradient descent follows)")
    g.add_argument("--spectra-every", type=int, default=DEFAULT_SPECTRA_EVERY, metavar="K",
                   help=f"optimizer steps between updates of each layer's top singular value "
                        f"(one power-iteration step); the spectral summary (alpha, stable "
                        f"rank) is taken at every window's close; 0: off (default "
                        f"{DEFAULT_SPECTRA_EVERY})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads during the run (default 1: the layers are "
                        "small, and one thread is far faster when the cores are shared; "
                        "0 keeps torch's setting); not part of the config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def result_filename(seed: int, lr: float) -> str:
    return f"lr_{lr:g}_seed{seed}.npz"


def resolve_seeds(args) -> list[int]:
    """--seeds, or the deprecated --seed S as one seed (with a note on stderr), or the default."""
    from ..cli import UsageError

    if args.seed is not None:
        if args.seeds is not None:
            raise UsageError("--seed is the deprecated form of --seeds: give --seeds only")
        print("lrfluct reproduce: --seed S is deprecated; use --seeds S (several seeds: "
              "--seeds 0 1 2)", file=sys.stderr)
        seeds = [args.seed]
    else:
        seeds = list(DEFAULT_SEEDS if args.seeds is None else args.seeds)
    if min(seeds) < 0:
        raise UsageError(f"--seeds must be >= 0, got {min(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must be distinct, got {' '.join(map(str, seeds))}")
    return seeds


def resolve_batch_size(args) -> int:
    from ..cli import UsageError

    if not args.full_batch:
        return DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if args.batch_size is not None and args.batch_size != args.samples:
        raise UsageError(f"--full-batch uses batches of --samples ({args.samples}) images; "
                         f"drop --batch-size {args.batch_size}")
    return args.samples


def make_config(args) -> dict:
    """Validated, JSON-normal config of everything that changes the results."""
    from ..cli import UsageError

    lrs = [float(lr) for lr in args.lrs]
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(f"--lrs: learning rates must be finite and > 0, got {lr:g}")
    names = [result_filename(0, lr) for lr in lrs]
    if len(set(names)) != len(names):
        raise UsageError("--lrs: learning rates must be distinct (to 6 significant digits)")
    seeds = resolve_seeds(args)
    for name in ("epochs", "samples", "test_samples", "batch_size", "window", "latent"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    batch_size = resolve_batch_size(args)
    for name in ("sharpness_every", "spectra_every"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (0: off), got "
                             f"{getattr(args, name)}")
    if args.sharpness_every and args.monitor != "fused":
        raise UsageError(f"--monitor {args.monitor} cannot be paused while the sharpness is "
                         f"measured (its statistics would count the Hessian's forwards): "
                         f"add --sharpness-every 0")
    if args.sharpness_probe is not None and args.sharpness_probe < 1:
        raise UsageError(f"--sharpness-probe must be >= 1, got {args.sharpness_probe}")
    probe = (args.sharpness_probe if args.sharpness_probe is not None else args.samples
             if batch_size >= args.samples else DEFAULT_SHARPNESS_PROBE)
    if args.image_size < 4:
        raise UsageError(f"--image-size must be >= 4, got {args.image_size}")
    widths = list(DEFAULT_WIDTHS[args.arch] if args.widths is None else args.widths)
    if min(widths) < 1:
        raise UsageError(f"--widths must all be >= 1, got {widths}")
    if args.arch == "conv" and args.image_size % 2 ** len(widths):
        raise UsageError(f"--arch conv with {len(widths)} widths needs --image-size divisible "
                         f"by {2 ** len(widths)}, got {args.image_size}")
    if not 0 <= args.jitter < 0.5:
        raise UsageError(f"--jitter must be in [0, 0.5), got {args.jitter:g}")
    lo, hi = args.scale_range
    if not 0 < lo <= hi:
        raise UsageError(f"--scale-range needs 0 < LO <= HI, got {lo:g} {hi:g}")
    if not (math.isfinite(args.noise) and args.noise >= 0):
        raise UsageError(f"--noise must be >= 0, got {args.noise:g}")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available (torch "
                             f"{torch.__version__}); use --device cpu")
    config = {
        "lrs": lrs, "epochs": args.epochs, "seeds": seeds, "device": args.device,
        "monitor": args.monitor, "image_size": args.image_size, "samples": args.samples,
        "test_samples": args.test_samples, "jitter": args.jitter,
        "scale_range": [float(lo), float(hi)], "rotation": bool(args.rotation),
        "noise": args.noise, "arch": args.arch, "widths": widths, "latent": args.latent,
        "batch_size": batch_size, "optimizer": args.optimizer, "window": args.window,
        "sharpness_every": args.sharpness_every, "sharpness_probe": min(probe, args.samples),
        "spectra_every": args.spectra_every,
    }
    return json.loads(json.dumps(config))


def _atomic_write_bytes(path: str, write) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_result(path: str, result: dict) -> None:
    _atomic_write_bytes(path, lambda f: np.savez(f, **result))


def load_result(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def our_files(out: str) -> list[str]:
    """This command's files present in out (what --overwrite deletes)."""
    from .plots import FIGURES

    names = {CONFIG, "report.md", *FIGURES}
    found = []
    for name in sorted(os.listdir(out)):
        if name in names or (name.startswith("lr_") and name.endswith(".npz")):
            found.append(os.path.join(out, name))
    return found


def prepare_out(out: str, config: dict, overwrite: bool) -> None:
    """Create out, check it holds nothing or a run of the same config, write config.json."""
    from ..cli import UsageError

    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    cfg_path = os.path.join(out, CONFIG)
    if overwrite:
        for path in our_files(out):
            os.remove(path)
    elif os.path.exists(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old != config:
            diff = ("unreadable config.json" if not isinstance(old, dict) else ", ".join(
                f"{k}: {old.get(k)!r} -> {config.get(k)!r}"
                for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)))
            raise UsageError(f"--out {out} holds a run with another config ({diff}); "
                             f"use another --out or pass --overwrite")
    elif os.listdir(out):
        raise UsageError(f"--out {out} is not empty and holds no reproduce run; "
                         f"use another --out or pass --overwrite")
    text = json.dumps(config, indent=2) + "\n"
    try:
        _atomic_write_bytes(cfg_path, lambda f: f.write(text.encode()))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _finished(path: str, seed: int, lr: float, config: dict):
    """The saved result of (seed, lr) if it is complete and matches the config, else None."""
    if not os.path.exists(path):
        return None
    try:
        res = load_result(path)
        if (float(res["lr"]) == lr and int(res["seed"]) == seed
                and int(res["epochs"]) == config["epochs"]):
            return res
    except Exception:  # a truncated or foreign file: train this pair again
        pass
    return None


def run(args) -> int:
    import torch

    from ..cli import UsageError
    from . import plots, report
    from .train import MonitorUnavailable, resolve_monitor

    config = make_config(args)
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    try:
        factory = resolve_monitor(config["monitor"])
    except MonitorUnavailable as e:
        raise UsageError(f"--monitor {config['monitor']}: {e}") from None
    out = args.out
    prepare_out(out, config, args.overwrite)

    results: dict[int, dict[float, dict]] = {seed: {} for seed in config["seeds"]}
    todo = []
    for seed in config["seeds"]:
        for lr in config["lrs"]:
            name = result_filename(seed, lr)
            res = _finished(os.path.join(out, name), seed, lr, config)
            if res is None:
                todo.append((seed, lr))
            else:
                results[seed][lr] = res
                print(f"seed {seed} lr {lr:g}: found {name}, skipped", file=sys.stderr)

    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        _train_missing(todo, config, out, results, args.no_progress, factory)
    finally:
        torch.set_num_threads(threads)

    ordered = {seed: {lr: results[seed][lr] for lr in config["lrs"]} for seed in config["seeds"]}
    t = time.perf_counter()
    plots.write_all(ordered, out, config["optimizer"])
    path = report.write_report(ordered, config, os.path.join(out, "report.md"))
    print(f"figures and report ({time.perf_counter() - t:.1f} s): {path}")
    return 0


def make_data(config: dict, seed: int, device) -> dict[str, tuple]:
    """The seed's training and test images (torch, on device) with their labels. The test
    images come from the entropy (seed, 1), so no seed's test set is another's training set."""
    import torch

    from .shapes import make_shapes

    data = {}
    for split, n, entropy in (("train", config["samples"], seed),
                              ("test", config["test_samples"], np.random.SeedSequence((seed, 1)))):
        images, labels = make_shapes(
            n, config["image_size"], seed=entropy, jitter=config["jitter"],
            scale_range=tuple(config["scale_range"]), rotation=config["rotation"],
            noise=config["noise"])
        data[split] = (torch.from_numpy(images).to(device), labels)
    return data


def _train_missing(todo, config, out, results, no_progress, factory) -> None:
    """Train every (seed, lr) of todo, saving each result as soon as it is done."""
    import torch
    from tqdm import tqdm

    from .autoencoder import build_autoencoder
    from .train import train_autoencoder

    if not todo:
        return
    device = torch.device(config["device"])
    data: dict[int, dict] = {}
    bar = tqdm(total=config["epochs"] * len(todo), unit="epoch", desc="reproduce",
               disable=no_progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for seed, lr in todo:
            if seed not in data:
                data = {seed: make_data(config, seed, device)}  # todo is grouped by seed
            train, test = data[seed]["train"], data[seed]["test"]
            torch.manual_seed(seed)
            model = build_autoencoder(config["arch"], config["image_size"],
                                      config["widths"], config["latent"]).to(device)
            res = train_autoencoder(
                model, train[0], test[0], test[1], lr=lr,
                epochs=config["epochs"], batch_size=config["batch_size"],
                optimizer=config["optimizer"], window=config["window"],
                seed=seed, monitor=factory, progress=bar,
                sharpness_every=config["sharpness_every"],
                sharpness_probe=config["sharpness_probe"], spectra_every=config["spectra_every"])
            path = os.path.join(out, result_filename(seed, lr))
            save_result(path, res)
            results[seed][lr] = res
            tqdm.write(f"seed {seed} lr {lr:g}: test MSE {float(res['final/test_loss']):.4g} "
                       f"({float(res['wall_s']):.1f} s) -> {path}", file=sys.stderr)
    finally:
        bar.close()
