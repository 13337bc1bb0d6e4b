"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

logger = logging.getLogger("dvmrl")

# An option value that is a negative number, in any form that float() reads
# as a number or as infinity / NaN. argparse (CPython 3.11) matches only
# -1 and -0.5, so it reads -1e9 as an unknown option and reports "expected
# one argument" for the option before it.
NEGATIVE_NUMBER = re.compile(
    r"^-(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)$",
    re.IGNORECASE,
)


# The rules of --alloy-notation (dvmrl.compositions), for the help of every
# command that has the option. "%%" is argparse's escape for "%".
ALLOY_NOTATION_RULES = (
    "next to a group every part needs its share, and the shares sum to 100 "
    "(at.%%) or 1; a formula without a group reads as usual, so Ni60Al10 is "
    "Ni6Al"
)


class UsageError(Exception):
    """Bad command-line input; the CLI prints it and exits with code 2."""


def _int_at_least(text: str, minimum: int) -> int:
    """Parse an integer >= ``minimum`` for argparse, naming the text when invalid."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= {minimum}, got {value}"
        )
    return value


def path_text(text: str) -> str:
    """Accept a file or folder path for argparse, rejecting an empty one.

    Path("") means the current folder, so an empty --out would write there.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a path, got {text!r}; pass a file or folder name"
        )
    return text


def output_file_problem(path: str) -> str | None:
    """Return why an output file cannot be written at ``path``, or None.

    Benchmarks and long jobs check their output paths before the work, so
    that a typo does not lose a run's results at its end.
    """
    target = Path(path)
    if target.is_dir():
        return f"{path} is a folder; pass a file name"
    folder = target.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return f"folder {folder} of {path} is missing or not writable"
    return None


def bench_threads_problem(requested: int | None) -> str | None:
    """Return why a benchmark's thread count would distort its timings, or None.

    ``requested`` is --threads (None: OMP_NUM_THREADS when set, else the cores
    available, as dvmrl.set_num_threads resolves it). More threads than
    cores measure oversubscription.
    """
    from dvmrl._runtime import _available_cores, set_num_threads

    cores = _available_cores()
    try:
        threads = set_num_threads(requested)
    except ValueError as err:
        return str(err)
    if threads <= cores:
        return None
    source = f"--threads {threads}" if requested is not None else (
        f"OMP_NUM_THREADS={threads}"
    )
    return (
        f"{source} exceeds the {cores} cores available, so the timings would measure "
        f"oversubscription; pass --threads {cores} or fewer"
    )


def check_bench_compute(parser: argparse.ArgumentParser, args) -> None:
    """Check a benchmark's --threads and, when it has one, --device.

    Calls ``parser.error`` (exit 2) with bench_threads_problem's message or
    the device error, and leaves ``args.device`` resolved ("cpu", "cuda:0").
    """
    from dvmrl._runtime import resolve_device

    if getattr(args, "device", None) is not None:
        try:
            args.device = str(resolve_device(args.device))
        except (ValueError, RuntimeError) as err:
            parser.error(f"--device: {err}")
    problem = bench_threads_problem(args.threads)
    if problem:
        parser.error(problem)


def plural(count: int, noun: str) -> str:
    """Return the count with its noun, such as "1 element" or "3 elements"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def positive_int(text: str) -> int:
    """Parse an integer >= 1 for argparse."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """Parse an integer >= 0 for argparse."""
    return _int_at_least(text, 0)


# Target kinds of a CSV file, as dvmrl.datasets.STABILITY_THRESHOLDS lists them.
TARGET_KINDS = ("formation_energy", "energy_above_hull")

# Seeds reach numpy's legacy generators and C++ code, which take 32-bit seeds.
MAX_SEED = 2**32 - 1


def seed_int(text: str) -> int:
    """Parse a seed for argparse: an integer from 0 to MAX_SEED."""
    value = _int_at_least(text, 0)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected a seed from 0 to {MAX_SEED}, got {value}"
        )
    return value


def accept_negative_numbers(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` read every :data:`NEGATIVE_NUMBER` as an option value.

    Call it before adding options. No option name of ``parser`` may look
    like a negative number.
    """
    # NOTE: _negative_number_matcher is a private attribute of argparse
    # parsers, checked on CPython 3.11 only. A Python whose argparse drops it
    # ignores this assignment, and "--option=-1e9" then still works.
    parser._negative_number_matcher = NEGATIVE_NUMBER


def _parse_float(text: str, valid, expected: str, unparsable: str) -> float:
    """Parse a float for argparse, or raise a message that names the text.

    ``valid(value)`` decides whether the number is in range; ``expected``
    describes that range and ``unparsable`` what text that is no number
    should have been.
    """
    try:
        value = float(text)
    except ValueError:
        message = f"expected {unparsable}, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def finite_float(text: str) -> float:
    """Parse a finite float for argparse."""
    return _parse_float(text, math.isfinite, "a finite number", "a number")


def non_negative_float(text: str) -> float:
    """Parse a finite float >= 0 for argparse."""
    return _parse_float(
        text,
        lambda value: math.isfinite(value) and value >= 0,
        "a finite number >= 0",
        "a number",
    )


def positive_float(text: str) -> float:
    """Parse a finite float > 0 for argparse."""
    return _parse_float(
        text,
        lambda value: math.isfinite(value) and value > 0,
        "a finite number > 0",
        "a number",
    )


def fraction(text: str) -> float:
    """Parse a fraction in [0, 1) for argparse (a dropout rate, a data share)."""
    expected = "a fraction in [0, 1)"
    value = _parse_float(text, lambda value: 0.0 <= value < 1.0, expected, expected)
    # Adding 0.0 turns -0.0 into 0.0, so run.json never stores a negative zero.
    return value + 0.0


def add_compute_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` and ``--threads``, which every computing command takes."""
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (CUDA when a GPU is usable); default: auto",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help=(
            "CPU threads for dvmrl's kernels and PyTorch; default: OMP_NUM_THREADS "
            "when set, else the cores available"
        ),
    )


def setup_compute(args: argparse.Namespace):
    """Apply ``--threads`` and resolve ``--device``; return the torch.device.

    Raises:
        UsageError: when the device name is unknown or CUDA is not usable.
    """
    from dvmrl._runtime import _available_cores, resolve_device, set_num_threads

    try:
        threads = set_num_threads(args.threads)
    except ValueError as err:
        raise UsageError(f"--threads: {err}") from None
    cores = _available_cores()
    if threads > cores:
        # More threads than cores only wait for each other.
        if args.threads is not None:
            source, fix = f"--threads {threads}", f"pass --threads {cores} or fewer"
        else:
            source = f"OMP_NUM_THREADS={threads}"
            fix = f"set OMP_NUM_THREADS or pass --threads to {cores} or fewer"
        logger.warning(
            "%s exceeds the %d CPU cores this process may use, so the extra "
            "threads share cores and slow each other; %s",
            source,
            cores,
            fix,
        )
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        raise UsageError(str(err)) from err
    info_cuda = ""
    if device.type == "cuda":
        from dvmrl._runtime import build_info

        info = build_info()
        info_cuda = " (CUDA kernels compiled in)" if info["cuda_compiled"] else (
            " (core built without CUDA: plain PyTorch path)"
        )
    logger.info("device %s%s, %d CPU threads", device, info_cuda, threads)
    return device


def check_output_folder(
    folder: Path, option: str, reported_path: Path | None = None
) -> None:
    """Raise ValueError unless ``folder`` is, or can be created as, a writable folder.

    Runs before any work, so that a bad path fails at once and not after
    training or scoring. ``reported_path`` is the path that the messages name.
    """
    reported = folder if reported_path is None else reported_path
    if reported == folder and folder.exists() and not folder.is_dir():
        raise ValueError(
            f"{option} {reported}: the path is a file, not a folder; pass a folder path"
        )
    # The first component that exists must be a writable folder, because
    # every missing one below it is created there.
    ancestor = folder
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"{option} {reported}: {ancestor} is a file, so nothing can be written "
            "under it; pass a path in a folder"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"{option} {reported}: the folder {ancestor} is not writable; pass a "
            "path in a writable folder"
        )
    from dvmrl._files import probe_folder

    try:
        probe_folder(ancestor)
    except OSError as err:
        raise ValueError(
            f"{option} {reported}: nothing can be created in the folder {ancestor} "
            f"({err.strerror or err}); pass a path in a writable folder"
        ) from None


def check_output_file(
    path: Path, option: str, example: str = "predictions.csv"
) -> None:
    """Raise ValueError unless ``path`` can be written as a file.

    ``example`` is the file name that the message suggests inside a folder.
    """
    if path.is_dir():
        raise ValueError(
            f"{option} {path}: the path is a folder; pass a file path such as "
            f"{path / example}"
        )
    check_output_folder(path.parent, option, reported_path=path)


def add_csv_column_options(
    parser: argparse.ArgumentParser,
    default_note: str = "",
    kind_note: str | None = None,
) -> None:
    """Add --formula-column, --target-column and --target-kind for a CSV --data.

    All default to None, so that :func:`csv_columns` can tell an option
    given from one left out. ``default_note`` goes before the default name
    in the help, such as "the checkpoint's for its own data, else ", and
    ``kind_note`` (default: ``default_note``) before that of --target-kind.
    """
    for option, column in (
        ("--formula-column", "formula"),
        ("--target-column", "target"),
    ):
        unit = " (eV/atom)" if column == "target" else ""
        parser.add_argument(
            option,
            default=None,
            type=column_name,
            metavar="NAME",
            help=f"{column}{unit} column of a CSV --data file; default: "
            f"{default_note}{column}",
        )
    add_target_kind_option(parser, default_note if kind_note is None else kind_note)


def stated_or_given_kind(data: str, requested: str | None) -> str | None:
    """Return the target kind of ``data``: the ``requested`` one, else its stated one.

    A vendored set or a fetched file states its own kind (None for other
    CSV files). reject_csv_options rejects --target-kind for a vendored set.

    Raises:
        UsageError: when ``requested`` contradicts the kind that a fetched file
            states.
    """
    from dvmrl.datasets import DATASETS, stated_target_kind

    stated = stated_target_kind(data)
    if requested is None:
        return stated
    if stated is not None and requested != stated and data not in DATASETS:
        raise UsageError(
            f"--target-kind {requested}: {data} is a file of dvmrl data fetch, whose "
            f".json file beside it states that its targets are {stated}; drop "
            "--target-kind"
        )
    return requested


def column_name(text: str) -> str:
    """Parse a CSV column option: any header name, but not an empty one."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected the name of a column of the CSV header, got {text!r}"
        )
    return text


def add_target_kind_option(
    parser: argparse.ArgumentParser,
    default_note: str = "",
    effect: str = "it sets the stability threshold and the plot labels",
) -> None:
    """Add --target-kind, what the targets of a CSV file are (default None).

    ``default_note`` goes before the default kind in the help, and
    ``effect`` says what the kind changes in the command's output.
    """
    parser.add_argument(
        "--target-kind",
        choices=TARGET_KINDS,
        default=None,
        help="what the targets of a CSV file are: formation_energy (stable when "
        f"<= 0 eV/atom) or energy_above_hull (stable when <= 0.025 eV/atom); "
        f"{effect}. A file from dvmrl data fetch states its own; default: "
        f"{default_note}formation_energy",
    )


def reject_csv_options(args: argparse.Namespace, data: str) -> None:
    """Raise ValueError for CSV-only options given with a vendored data set.

    --formula-column, --target-column, --target-kind and --alloy-notation
    describe how to read a user's CSV file. A vendored data set has fixed
    columns, a known target and standard formulas, so these options would do
    nothing there.
    """
    from dvmrl.datasets import DATASETS

    if data not in DATASETS:
        return
    options = [
        option
        for key, option in (
            ("formula_column", "--formula-column"),
            ("target_column", "--target-column"),
            ("target_kind", "--target-kind"),
        )
        if getattr(args, key, None) is not None
    ]
    if getattr(args, "alloy_notation", False):
        options.append("--alloy-notation")
    if not options:
        return
    names = " and ".join(options)
    verb, pronoun = ("applies", "it") if len(options) == 1 else ("apply", "them")
    raise ValueError(
        f"{names} {verb} only to a CSV file, not to the vendored data set "
        f"{data!r}; leave {pronoun} out"
    )


def csv_columns(
    settings: dict, args: argparse.Namespace | None = None
) -> dict[str, str]:
    """Return how to read a CSV file, as keywords of ``dvmrl.datasets.resolve_data``.

    The keywords are the column names and the target kind. Each is the
    option given in ``args``, else the one stored in ``settings`` (a run
    configuration or checkpoint metadata), else the default: "formula",
    "target" and "formation_energy". Runs from before these options stored
    none of them, so they get the defaults.
    """
    columns = {}
    for key, default in (
        ("formula_column", "formula"),
        ("target_column", "target"),
        ("target_kind", "formation_energy"),
    ):
        option_value = getattr(args, key, None) if args is not None else None
        columns[key] = option_value or settings.get(key) or default
    return columns


def data_reference(source: str) -> str:
    """Return a CSV path as an absolute path, so that a checkpoint finds its data.

    A vendored data set name is returned as given, also when a file of that
    name lies in the working folder: ``resolve_data`` loads the vendored set
    then, so the reference must name it. An empty string is returned as
    given too, rather than as the working folder.
    """
    from dvmrl.datasets import DATASETS

    if source in DATASETS or source == "":
        return source
    path = Path(source)
    if path.suffix.lower() in (".csv", ".gz") or path.exists():
        return str(path.resolve())
    return source
