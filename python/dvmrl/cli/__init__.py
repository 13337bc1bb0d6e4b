"""The ``dvmrl`` command: one entry point with a subcommand per task.

Exit codes: 0 on success, 2 on bad usage or bad input (the error names the
value and the fix), 1 when dvmrl or its environment fails (a full disk, an
unreachable service), 130 after Ctrl-C or SIGTERM, 141 when the reader of
standard output closed it early (``dvmrl predict ... | head``).
Errors go to stderr as one line; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import os

# PyTorch's bundled OpenMP runtime spins idle threads after each parallel
# region by default. On a loaded 2-core machine (load average 5) that made a
# forward+backward step of the plain PyTorch model at B = 16 about 3x slower
# (34-44 ms against 11-14 ms). Passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import errno
import importlib
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path

from dvmrl.cli._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    accept_negative_numbers,
)

# 128 + the signal number, as a shell reports a process ended by the signal.
EXIT_INTERRUPTED = 130  # SIGINT
EXIT_BROKEN_PIPE = 141  # SIGPIPE

# Each module defines add_parser(subparsers), which registers one or more
# subcommands and sets ``func(args) -> int`` on them.
_SUBCOMMAND_MODULES = [
    "dvmrl.cli.info",
    "dvmrl.cli.train",
    "dvmrl.cli.data",
    "dvmrl.cli.agent",
    "dvmrl.cli.run",
    "dvmrl.cli.validate",
]

logger = logging.getLogger("dvmrl")


class _Parser(argparse.ArgumentParser):
    """Argument parser whose errors are one line with a pointer to --help.

    It reads negative numbers such as -1e9 as option values, as it reads -1.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        accept_negative_numbers(self)

    def error(self, message: str):
        hint = f"see '{self.prog} --help'"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; {hint}\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    from dvmrl import __version__

    parser = _Parser(
        prog="dvmrl",
        description=(
            "Composition graph neural networks for alloy thermodynamics, with "
            "adversarial and dynamic validation and a meta-trained DQN agent."
        ),
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="log debug messages and print tracebacks (accepted anywhere on the line)",
    )
    parser.add_argument("--version", action="version", version=f"dvmrl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, command: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv, letting positionals of a subcommand follow its options.

    argparse stops filling a ``nargs="*"`` positional at the first option, so
    ``dvmrl predict model.pt --alloy-notation Ni3Al`` would leave ``Ni3Al``
    unrecognised. Such trailing words are appended to the subcommand's list
    positional instead.
    """
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    sub = _subcommand_parser(parser, args.command)
    action = getattr(args, f"{args.command}_command", None)
    if sub is not None and action is not None:
        # A grouped command such as "data info": its own page lists its options.
        sub = _subcommand_parser(sub, action) or sub
    list_positionals = [
        action
        for action in (sub._actions if sub is not None else [])
        if not action.option_strings and action.nargs in ("*", "+")
    ]
    # Words after a "--" are positionals even when they start with "-".
    marker = extras.index("--") if "--" in extras else len(extras)
    options = [word for word in extras[:marker] if word.startswith("-")]
    if options or not list_positionals:
        (sub or parser).error(f"unrecognized arguments: {' '.join(extras)}")
    words = extras[:marker] + extras[marker + 1 :]
    dest = list_positionals[-1].dest
    setattr(args, dest, list(getattr(args, dest) or []) + words)
    return args


def _is_broken_link(path: str) -> bool:
    """Return whether ``path`` is a symbolic link whose target does not resolve."""
    try:
        return os.path.islink(path) and not os.path.exists(path)
    except (OSError, ValueError):
        return False


def _has_saved_state(out: str) -> bool:
    """Return whether ``out`` contains something that --resume can continue.

    ``out`` is the run folder of train and run, or the agent file of agent
    train, whose progress file lies beside it. A path that the system
    rejected before anything was written contains nothing to resume.
    """
    from dvmrl.meta import state_paths

    path = Path(out)
    try:
        if path.is_dir():
            return any(path.iterdir())
        return state_paths(path)["progress"].is_file()
    except OSError:
        return False


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run the ``dvmrl`` command and return its exit code."""
    # SIGTERM (a batch system's time limit, kill) ends every command as
    # Ctrl-C does, so that commands save their state and exit 130. The
    # handler is set before the parser imports the subcommands and PyTorch.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_term = None
    if in_main_thread:
        previous_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM before a subcommand starts, such as while the
        # parser imports PyTorch (about a second): the same exit as an
        # interrupted command.
        print("dvmrl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_term)


def console_main() -> int:
    """Run the ``dvmrl`` command as a program (the console script, ``python -m``).

    Once the command has returned, only the interpreter's shutdown remains
    (about 0.7 s after dvmrl train in one measurement). A signal then would
    turn a finished command's exit status into 130 or 143, so the process
    ignores SIGINT and SIGTERM from that point. ``main`` itself leaves the
    handlers of a Python caller as they were.
    """
    code = main()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


def _terminate(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
    raise KeyboardInterrupt(f"signal {signum}")


def _command_name(args: argparse.Namespace) -> str:
    """Return the command for messages, with its action: "train", "data split"."""
    action = getattr(args, f"{args.command}_command", None)
    return args.command if action is None else f"{args.command} {action}"


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [word for word in argv if word != "--verbose"]
    parser = build_parser()
    args = _parse(parser, argv)
    args.verbose = verbose
    command = _command_name(args)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = int(args.func(args) or EXIT_OK)
        # Output to a pipe is block-buffered: flush here, so that a reader
        # that has gone raises BrokenPipeError below and not at exit.
        sys.stdout.flush()
        return code
    except (UsageError, ValueError, FileNotFoundError) as err:
        # Bad input from the user: one line that names the value and the fix.
        if verbose:
            traceback.print_exc()
        print(f"dvmrl {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        # An output path that cannot be used, such as a file where a folder
        # is needed.
        if verbose:
            traceback.print_exc()
        if err.filename is None:
            message = str(err)  # raised by dvmrl with its own message
        elif _is_broken_link(err.filename):
            # mkdir reports a link to nowhere as an existing file.
            message = (
                f"cannot use path {err.filename!r}: it is a symbolic link to "
                f"{os.readlink(err.filename)!r}, which does not exist or loops; "
                "create its target as a folder or choose another path"
            )
        else:
            message = (
                f"cannot use path {err.filename!r}: {err.strerror}; "
                "choose another path"
            )
        print(f"dvmrl {command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dvmrl {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader has gone (``| head``): stop quietly, as a pipeline stage
        # killed by SIGPIPE would. Standard output now points to /dev/null so
        # that the interpreter's final flush cannot raise a second time.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as err:
        # The system refused a read or write (a full disk, no permission):
        # the environment failed, not dvmrl, so no traceback hint.
        from dvmrl._files import FolderReplacedError
        if verbose:
            traceback.print_exc()
        message = err.strerror or str(err)
        if err.filename is not None:
            message = f"{message}: {err.filename}"
        if err.errno == errno.ENAMETOOLONG:
            message += "; choose a shorter path"
        out = getattr(args, "out", None)
        if (
            hasattr(args, "resume")
            and out
            and _has_saved_state(out)
            and not isinstance(err, FolderReplacedError)
        ):
            # Commands with --resume keep what they finished before the error.
            message += (
                "; after fixing that, continue the run with the same command and "
                "--resume"
            )
        print(f"dvmrl {command}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # noqa: BLE001 - the CLI reports every failure
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (rerun with --verbose for the traceback)"
        print(
            f"dvmrl {command}: internal error: {type(err).__name__}: {err}{hint}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
