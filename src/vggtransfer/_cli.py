"""The ``vggtransfer`` command: train, evaluate, predict, export, compare and scan.

Each subcommand lives in the module named after what it works on (``_cli_train``,
``_cli_checkpoint`` for evaluate and export, ``_cli_predict``, ``_cli_data`` for scan and
compare) and is a thin layer over the library's public API. A mistake in what the user typed
(an unknown option, a path that does not exist, a checkpoint that does not load) prints one
line, ``vggtransfer <command>: error: ...``, and exits 2 without a traceback; a failure while
working exits 1; Ctrl-C exits 130; success exits 0. The last lines printed say where every
output is.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ._cli_checkpoint import add_parsers as add_checkpoint_commands
from ._cli_common import Parser, UsageError, in_option_words
from ._cli_data import add_parsers as add_data_commands
from ._cli_predict import add_parser as add_predict
from ._cli_train import add_parser as add_train

__all__ = ["COMMANDS", "main"]

#: The subcommands, in the order of the workflow.
COMMANDS = ("train", "evaluate", "predict", "export", "compare", "scan")


def _parser() -> Parser:
    parser = Parser(prog="vggtransfer", description="Transfer learning with torchvision models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_train(commands)
    add_checkpoint_commands(commands)  # evaluate, export
    add_predict(commands)
    add_data_commands(commands)  # compare, scan
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Example:
        >>> from vggtransfer._cli import main
        >>> main(["predict"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # Errors name the subcommand, also those argparse finds before it knows which one it is.
    where = f"vggtransfer {argv[0]}" if argv and argv[0] in COMMANDS else "vggtransfer"
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line(where)
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help()
                return 2
            args.argv = argv[1:]  # what was typed after the subcommand: the reports' reproducing command
            return int(args.run(args))
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except UsageError as error:
        print(f"{where}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vggtransfer: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a failure while working: one line, no traceback
        print(f"{where}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def _one_line(where: str) -> Callable[..., None]:
    """The library's warnings as the command's own lines, without Python's file and source line."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        print(f"{where}: warning: {in_option_words(str(message))}", file=sys.stderr)

    return show
