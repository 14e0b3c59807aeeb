"""`lrfluct bench`: lrfluct against hook-based capture on built-in models or the user's own.

Runs the modes interleaved in one process (runner.py), prints a table per model and writes
to --out: bench.md (the tables, the agreement check, the scaling study), bench.json (raw
step times and memory), overhead.png, and with --scaling scaling.png and memory.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from functools import partial

import torch

from ..cli import UsageError
from . import models, runner

SCALING = {  # MLP shapes for the scaling study: (width, depth, batch)
    "width": [(w, 4, 256) for w in (256, 512, 1024, 2048)],
    "layers": [(1024, d, 256) for d in (2, 4, 8)],
    "batch": [(1024, 4, b) for b in (64, 256, 1024)],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=["mlp", "autoencoder"],
                   help="mlp, gpt, autoencoder, hf:NAME (a transformers architecture from its "
                        "config: hf:gpt2, hf:llama, hf:bert, hf:t5, hf:vit) or package.module:factory "
                        "(a function factory(device) -> (model, optimizer, batch[, loss_fn])); "
                        "default: mlp autoencoder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (default 2)")
    p.add_argument("--run-length", type=int, default=1,
                   help="steps each mode runs per turn (default 1: every step starts with caches "
                        "the other modes evicted); K > 1 times all but a turn's first step, as "
                        "in a run that trains one model")
    p.add_argument("--modes", nargs="+", default=None,
                   help=f"any of {', '.join(runner.known_modes())} (default: "
                        f"{', '.join(runner.report_modes())}); lrfluct-neuron, lrfluct-no-weights, "
                        "lrfluct-activations, lrfluct-gradients and lrfluct-weights split lrfluct's "
                        "cost, lrfluct-drift adds drift=True's; none-twin, a second plain copy "
                        "of the model, is the noise floor its overheads are read against")
    p.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    p.add_argument("--scaling", action="store_true",
                   help="also measure overhead against width, layers and batch (MLP), and "
                        "monitor memory against steps")
    p.add_argument("--memory-steps", type=int, default=2000,
                   help="steps of the memory-against-steps study (with --scaling; default 2000)")


def _steps_per_mode(args) -> int:
    """Steps each mode runs in one runner.run, warm-up included (for the progress bar)."""
    return args.warmup + runner.turns_for(args.steps, args.run_length) * args.run_length


def _check(args) -> list[str]:
    if args.steps < 1 or args.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    if args.run_length < 1:
        raise UsageError(f"--run-length must be >= 1, got {args.run_length}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")
    modes = args.modes or list(runner.report_modes())
    unknown = set(modes) - set(runner.known_modes())
    if unknown:
        raise UsageError(f"unknown or unavailable modes {sorted(unknown)}; available: "
                         f"{', '.join(runner.known_modes())}")
    if "none" not in modes:
        modes = ["none", *modes]
    try:
        args.factories = {spec: models.resolve(spec) for spec in args.model}
        for spec, make in args.factories.items():
            if spec not in models.BUILTIN:
                make(args.device)  # a user's factory: check what it returns before any output
    except models.FactoryError as e:
        raise UsageError(str(e)) from None
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to --out {args.out!r}: {e.strerror}") from None
    return modes


def _progress(total: int, desc: str):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    return bar, (lambda mode: (bar.set_postfix_str(mode), bar.update()))


def _table(results, modes) -> list[str]:
    over = runner.overheads(results)
    rows = ["| mode | median step ms | IQR ms | overhead vs none | monitor MB | growth / step |",
            "|---|---|---|---|---|---|"]
    for mode in modes:
        r = results[mode]
        growth = r.growth_per_step()
        growth_s = "reset at budget" if r.resets else (f"{growth / 2**20:.2f} MB" if growth == growth else "-")
        rows.append(f"| {mode} | {r.median * 1e3:.1f} | {r.iqr * 1e3:.1f} | {over[mode]:+.1%} | "
                    f"{r.memory[-1] / 2**20:.1f} | {growth_s} |")
    return rows


def _noise_floor(results) -> list[str]:
    if runner.PLAIN_TWIN not in results:
        return []
    twin = runner.overheads(results)[runner.PLAIN_TWIN]
    return [f"Noise floor: {runner.PLAIN_TWIN}, a second plain copy of the model, measured "
            f"{twin:+.1%} against none; overheads within about that are this machine's noise.", ""]


def _run_model(spec, args, modes, raw):
    make = args.factories[spec]
    bar, tick = _progress(_steps_per_mode(args) * len(modes), f"bench {spec}")
    try:
        results = runner.run(make, args.device, modes, args.steps, args.warmup, progress=tick,
                             run_length=args.run_length)
    finally:
        bar.close()
    agree, where = runner.agreement(make, args.device)
    raw[spec] = {m: {"times_s": r.times, "monitor_bytes": r.memory, "snapshot_resets": r.resets}
                 for m, r in results.items()}
    raw[spec]["agreement_max_rel_diff"] = agree
    lines = [f"## {spec}", "", *_table(results, modes), "",
             f"Agreement: lrfluct vs hook-streaming statistics, max relative difference over "
             f"every summary key over 2 steps of one model monitored both ways: {agree:.1e} at {where} "
             f"({'agree' if agree < 1e-3 else 'DISAGREE'}).", "", *_noise_floor(results)]
    print("\n".join(lines))
    return results, lines


def _scaling(args, modes, raw):
    lines = ["## Scaling (MLP, Adam; overhead against none)", ""]
    study = {}
    total = sum(len(v) for v in SCALING.values()) * _steps_per_mode(args) * len(modes)
    bar, tick = _progress(total, "scaling")
    try:
        for axis, shapes in SCALING.items():
            lines += [f"### against {axis}", "", "| width x layers, batch | " +
                      " | ".join(m for m in modes if m != "none") + " |",
                      "|---|" + "---|" * (len(modes) - 1)]
            for width, depth, batch in shapes:
                make = partial(models.mlp, width=width, depth=depth, batch=batch)
                res = runner.run(make, args.device, modes, args.steps, args.warmup, progress=tick,
                                 run_length=args.run_length)
                over = runner.overheads(res)
                study.setdefault(axis, []).append({"width": width, "depth": depth, "batch": batch,
                                                   **{m: over[m] for m in modes}})
                lines.append(f"| {width} x {depth}, {batch} | " +
                             " | ".join(f"{over[m]:+.1%}" for m in modes if m != "none") + " |")
            lines.append("")
    finally:
        bar.close()
    lines += _real_architecture_row(args, modes, raw)
    curves = {}
    for mode in modes:
        if mode in ("none", runner.PLAIN_TWIN, "backpack"):
            continue
        curves[mode] = runner.memory_curve(models.autoencoder, args.device, mode,
                                           args.memory_steps, every=max(1, args.memory_steps // 20))
    lines += ["### monitor memory against steps (autoencoder)", "",
              "| mode | steps run | MB at start | MB at end | growth / step |", "|---|---|---|---|---|"]
    for mode, curve in curves.items():
        (s0, b0), (s1, b1) = curve[1] if len(curve) > 1 else curve[0], curve[-1]
        growth = (b1 - b0) / (s1 - s0) if s1 > s0 else 0.0
        stopped = " (stopped at the 1 GiB budget)" if s1 < args.memory_steps else ""
        lines.append(f"| {mode} | {s1}{stopped} | {b0 / 2**20:.2f} | {b1 / 2**20:.2f} | "
                     f"{growth / 2**10:.1f} KiB |")
    lines.append("")
    raw["scaling"] = study
    raw["memory_curves"] = curves
    print("\n".join(lines))
    return study, curves, lines


def _real_architecture_row(args, modes, raw) -> list[str]:
    """The scaling study's real-architecture row: transformers' GPT-2 blocks (hf:gpt2)."""
    try:
        make = models.resolve("hf:gpt2")
        make(args.device)
    except models.FactoryError as e:
        return ["### a real architecture", "", f"skipped: {e}", ""]
    res = runner.run(make, args.device, modes, args.steps, args.warmup, run_length=args.run_length)
    over = runner.overheads(res)
    raw["scaling_real"] = {"model": "hf:gpt2", **{m: over[m] for m in modes}}
    _, _, cfg, batch, seq = models.HF_PRESETS["gpt2"]
    return ["### a real architecture", "",
            "| model | " + " | ".join(m for m in modes if m != "none") + " |",
            "|---|" + "---|" * (len(modes) - 1),
            f"| hf:gpt2 ({cfg['n_layer']} GPT-2 blocks, d 768), {batch} x {seq} tokens | " +
            " | ".join(f"{over[m]:+.1%}" for m in modes if m != "none") + " |", ""]


def _charts(all_results, study, curves, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(all_results)
    modes = [m for m in next(iter(all_results.values())) if m != "none"]
    for i, mode in enumerate(modes):
        vals = [runner.overheads(all_results[n])[mode] * 100 for n in names]
        ax.bar([j + i * 0.8 / len(modes) for j in range(len(names))], vals, 0.8 / len(modes), label=mode)
    ax.set_xticks([j + 0.4 - 0.4 / len(modes) for j in range(len(names))], names)
    ax.set_ylabel("step-time overhead vs none (%)")
    ax.set_yscale("symlog")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "overhead.png"), dpi=120)
    plt.close(fig)
    if study:
        fig, axes = plt.subplots(1, len(study), figsize=(4 * len(study), 3.2))
        for ax, (axis, rows) in zip(axes, study.items()):
            xs = [r[{"width": "width", "layers": "depth", "batch": "batch"}[axis]] for r in rows]
            for mode in modes:
                ax.plot(xs, [r[mode] * 100 for r in rows], marker="o", label=mode)
            ax.set_xlabel(axis)
            ax.set_xscale("log", base=2)
            ax.set_yscale("symlog")
            ax.set_ylabel("overhead (%)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "scaling.png"), dpi=120)
        plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for mode, curve in curves.items():
            ax.plot([s for s, _ in curve], [b / 2**20 for _, b in curve], marker=".", label=mode)
        ax.set_xlabel("steps")
        ax.set_ylabel("monitor memory (MB)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "memory.png"), dpi=120)
        plt.close(fig)


def run(args) -> int:
    modes = _check(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        platform.processor() or platform.machine())
    header = [f"# lrfluct bench ({datetime.date.today()}, {args.device}: {device_name}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__})", "",
              f"Command: `lrfluct bench --model {' '.join(args.model)} --device {args.device} "
              f"--steps {args.steps} --warmup {args.warmup}"
              f"{f' --run-length {args.run_length}' if args.run_length > 1 else ''}"
              f"{' --modes ' + ' '.join(args.modes) if args.modes else ''}"
              f"{' --scaling' if args.scaling else ''}`", "",
              "Modes run interleaved in one process, "
              + ("one step per turn (each step starts with caches the other modes evicted)"
                 if args.run_length == 1 else
                 f"{args.run_length} steps per turn, the first untimed (caches as in a run that "
                 "trains one model)")
              + "; overhead = median over rounds of step time / none's in the same round - 1; "
              "monitor MB = statistics state held by the monitor (the snapshot's copies for "
              "hook-snapshot).", ""]
    print("\n".join(header))
    raw, lines, all_results = {"modes": modes}, list(header), {}
    for spec in args.model:
        results, model_lines = _run_model(spec, args, modes, raw)
        all_results[spec] = results
        lines += model_lines
    study, curves = {}, {}
    if args.scaling:
        study, curves, scaling_lines = _scaling(args, modes, raw)
        lines += scaling_lines
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(raw, f, indent=1)
    _charts(all_results, study, curves, args.out)
    print(f"wrote {args.out}/bench.md, bench.json and charts")
    return 0
