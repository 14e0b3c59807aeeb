"""The `lrfluct` command: parses arguments and hands each subcommand to the module that owns it.

Subcommands live in their own modules, each exposing `add_arguments(parser)` and
`run(args) -> int`; this file only lists them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("lrfluct_fast.info", "version, backend, torch version and threads"),
    "reproduce": ("lrfluct_fast.experiments.reproduce", "the paper's learning-rate experiment"),
    "bench": ("lrfluct_fast.benchmark.command", "lrfluct against hook-based capture, interleaved"),
    "show": ("lrfluct_fast.show.command", "an HTML page of a run directory (figures inline)"),
}


class UsageError(Exception):
    """A bad argument: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="lrfluct", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lrfluct_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"lrfluct {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lrfluct {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run as `python -m lrfluct_fast.cli`: use the importable module's main, so commands'
    # UsageError (lrfluct_fast.cli.UsageError) is the class caught there.
    from lrfluct_fast.cli import main as package_main
    sys.exit(package_main())
