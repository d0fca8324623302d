"""AuraFlow from the command line: local generation, a no-download demo, the hosted API, ComfyUI headless runs.

Each command lives in its own module with ``register(subparsers)``, which adds its parser with ``func`` (called
with the parsed args, returning the exit code) and ``parser`` (for wording errors in its flags) as defaults.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import LoadError, NumericError, ParameterError
from . import batch, fetch, generate, queue, remote
from .flags import HelpFormatter, in_flag_words

COMMANDS = (generate, remote, fetch, queue, batch)  # in help order


class Parser(argparse.ArgumentParser):
    """argparse's errors (a flag's value of the wrong type, an unknown choice) in one line, with the flag's own help
    (its range) after a bad value, and exit code 2 as every other flag error."""

    def error(self, message):
        flag = message.split(":")[0].removeprefix("argument ").split("/")[0]
        action = self._option_string_actions.get(flag)
        hint = f"; {flag}: {action.help.split(';')[0].split(' (')[0]}" if "invalid" in message and action is not None \
            and action.help and "%(" not in action.help else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m aura_flow", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (ParameterError, LoadError) as exc:
        sys.stderr.write(f"error: {in_flag_words(str(exc), args.parser)}\n")
        return 2
    except NumericError as exc:  # the run went NaN: nothing was written
        sys.stderr.write(f"error: {in_flag_words(str(exc), args.parser)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
