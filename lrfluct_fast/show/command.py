"""`lrfluct show RUN_DIR [--out FILE]`: write the HTML page of a run directory.

Reads the directory with lf.load_run (a run still being written or killed mid-write reads as
far as its complete records go) and writes the page atomically, by default to
RUN_DIR/report.html, then prints its path. A run with run.json but nothing logged yet gets a
page that says so (exit 0). A missing directory, a directory without run.json and a corrupt
file (run.json, metrics.csv, a summary, scalars.csv) are reported in one line on stderr with
exit code 2.
"""
from __future__ import annotations

import argparse
import os

from ..cli import UsageError

REPORT_FILE = "report.html"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (instrument's log_dir)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help=f"the HTML file to write (default RUN_DIR/{REPORT_FILE})")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def run(args) -> int:
    from ..rundir import load_run
    from ..rundir.files import atomic_write
    from . import page

    try:
        html = page.render(load_run(args.run_dir))
    except (ValueError, OSError) as e:
        raise UsageError(_one_line(e)) from None
    out = args.out if args.out is not None else os.path.join(args.run_dir, REPORT_FILE)
    try:
        atomic_write(out, html.encode("utf-8"))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write it: {e.strerror or _one_line(e)}") from None
    print(out)
    return 0
