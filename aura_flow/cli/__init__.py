"""AuraFlow from the command line: local generation, a no-download demo, the hosted API, ComfyUI headless runs.

Each command lives in its own module that defines ``register(subparsers)``; the parser it adds sets
``func=run`` (called with the parsed args, returning the exit code). Modules load only when listed here.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command modules, in help order; each has register(subparsers)
COMMAND_MODULES = (
    "aura_flow.cli.generate",  # generate, demo
    "aura_flow.cli.remote",  # remote
    "aura_flow.headless",  # queue
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aura_flow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command module not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from ..errors import LoadError, ParameterError

    try:
        return int(args.func(args) or 0)
    except (ParameterError, LoadError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
