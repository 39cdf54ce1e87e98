"""What every ``vggtransfer`` subcommand shares: the usage error, checked options, data, checkpoints.

Each check turns what the user typed into a value or a :class:`UsageError` (one line, exit 2)
before anything is built, read or written.
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._arch_spec import ArchSpec, load_for_arch, parse_arch
from ._checkpoint import LoadedModel
from ._checkpoint_file import CheckpointError
from ._models import WeightsNotAvailableError
from ._runtime import resolve_device, resolve_precision
from ._spec import build_spec
from ._trainer import Trainer
from .data import DogsVsCats

__all__ = [
    "DATA_HELP",
    "Parser",
    "UsageError",
    "add_arch",
    "arch_of",
    "check_folder",
    "check_out",
    "check_outside",
    "check_positive",
    "check_runtime",
    "claim_run_folder",
    "describe_model",
    "free_file",
    "in_option_words",
    "make_trainer",
    "open_checkpoint",
    "read_labelled",
    "run_folder",
    "usage_errors",
]

#: What DATA may be, for help texts.
DATA_HELP = "class folders, Kaggle's flat train/ or PetImages"


class UsageError(Exception):
    """What the user typed cannot be run: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting.

    Its help lists every option's default.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        raise UsageError(message)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show or the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


@contextmanager
def usage_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the library's errors of ``kinds`` about what the user passed into a :class:`UsageError`."""
    try:
        yield
    except kinds as error:
        raise UsageError(str(error)) from None


def run_folder(base: Path) -> Path:
    """``base`` if it does not exist yet, else ``base2``, ``base3``, ...: a run never overwrites another."""
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}{number}")
    return candidate


def free_file(path: Path) -> Path:
    """``path`` if no file has that name yet, else ``stem2.suffix``, ``stem3.suffix``, ...

    Example:
        >>> free_file(Path("a-name-nobody-has.csv")).name
        'a-name-nobody-has.csv'
    """
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}{number}{path.suffix}")
    return candidate


def check_out(out: Path, inputs: dict[str, Path | None], option: str = "--out") -> None:
    """``out`` is new or an empty folder, and outside every input folder (the data stays untouched)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"{option} {str(out)!r} exists and is not an empty folder; a run never overwrites another"
        )
    check_outside(out, option, inputs)


def check_outside(out: Path, option: str, inputs: dict[str, Path | None]) -> None:
    """``out`` is not inside an input folder: written files would become images (or classes) of it."""
    for what, folder in inputs.items():
        if folder is not None and out.resolve().is_relative_to(folder.resolve()):
            raise UsageError(
                f"{option} {str(out)!r} is inside {what} {str(folder)!r}; expected a folder outside the "
                f"images, so that the files written never mix with them (e.g. runs/...)"
            )


def claim_run_folder(out: Path, base: Path | None) -> Path:
    """Create the run folder just before the first file is written; with ``base``, the next free number.

    ``mkdir`` fails when another process created the folder first, so two runs started at the
    same time never share (or overwrite) one numbered folder: the later one takes the next number.
    """
    while base is not None:
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            out = run_folder(base)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_folder(path: Path | None, what: str) -> None:
    """``path`` (when given) is an existing folder."""
    if path is not None and not path.is_dir():
        found = "does not exist" if not path.exists() else "is a file, not a folder"
        raise UsageError(f"{what} {str(path)!r} {found}; expected a folder of images ({DATA_HELP})")


def check_positive(value: float | None, option: str, *, zero: bool = False) -> None:
    """``value`` (when given) is finite and above 0 (or at least 0 with ``zero``)."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        smallest = "0" if zero else ("1" if isinstance(value, int) else "")
        bound = f"{smallest} or more" if smallest else "more than 0"
        raise UsageError(f"expected {option} to be {bound} but got {value:g}")


def add_arch(
    parser: argparse.ArgumentParser, *, required: bool = False, many: bool = False, default: str | None = None
) -> None:
    """The ``--arch SPEC`` option."""
    parser.add_argument(
        "--arch",
        required=required,
        default=default,
        nargs="+" if many else None,
        metavar="SPEC",
        help="a torchvision name (vgg16_bn), timm:NAME, or module:callable, a factory returning a model",
    )


def arch_of(text: str | None) -> ArchSpec | None:
    """``--arch`` checked; None when not given."""
    if text is None:
        return None
    with usage_errors(ValueError, ModuleNotFoundError):
        return parse_arch(text)


def read_labelled(path: Path, what: str, transform: Any = None) -> DogsVsCats:
    """A labelled DogsVsCats folder (scanned once, with progress), or a UsageError saying why not."""
    check_folder(path, what)
    with usage_errors(ValueError, FileNotFoundError):
        data = DogsVsCats(path, transform=transform)
    if not data.labelled:
        raise UsageError(
            f"{what} {str(path)!r} has no labels (no class folders, no cat./dog. names); expected {DATA_HELP}"
        )
    return data


def open_checkpoint(path: Path, arch: str | None, device: str = "cpu") -> LoadedModel:
    """The model, class names and transform of a checkpoint, checked against ``--arch``."""
    if not path.is_file():
        raise UsageError(f"CHECKPOINT {str(path)!r} is not a file")
    spec = arch_of(arch)
    with usage_errors(CheckpointError, WeightsNotAvailableError, ValueError):
        return load_for_arch(path, spec, device=device)


def make_trainer(model: Any, **options: Any) -> Trainer:
    """A Trainer; a value it refuses (``--device``, ``--class-weights``, ...) is a usage error."""
    try:
        return Trainer(model, **options)
    except (ValueError, TypeError) as error:
        raise UsageError(in_option_words(str(error))) from None


#: The Trainer's argument names that the command spells as options.
_OPTIONS = ("device", "precision", "class_weights", "cache_views", "lr")


def in_option_words(message: str, names: tuple[str, ...] = _OPTIONS) -> str:
    """A library message about ``device='x'`` or ``class_weights`` as the command's ``--device x``."""
    message = re.sub(r"^(Trainer|fit|compare_backbones|vggtransfer \w+): ", "", message)
    message = message.replace("class_weights='balanced'", "--class-weights balanced")
    for name in names:
        option = "--" + name.replace("_", "-")
        message = re.sub(rf"\b{name}=", option + " ", message)
        message = re.sub(rf"(?<![-\w.]){name}\b", option, message)  # not torch.device
    return message


def check_runtime(device: str, precision: str) -> None:
    """``--device`` exists here and ``--precision`` runs on it: said before anything is built or read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Trainer says its warnings when it is built
            resolve_precision(precision, resolve_device(device, "Trainer"))
    except ValueError as error:
        raise UsageError(in_option_words(str(error))) from None


def describe_model(model: Any) -> str:
    """One paragraph for report.md: how the model was built, and its trainable share."""
    spec = build_spec(model)
    parts = [f"`{spec.get('factory') or spec.get('arch') or type(model).__name__}`"]
    if spec.get("factory"):
        parts.append("built by a user factory (its own weights)")
    elif "weights" in spec or spec.get("arch"):
        parts.append(f"weights `{spec.get('weights') or 'random'}`")
    head = spec.get("head")
    if head:
        layers = " → ".join(str(width) for width in [*head.get("hidden", ()), head["num_classes"]])
        where = "appended after the network" if head["method"] == "append" else "in place of the classifier"
        parts.append(f"a new head {where} (widths {layers}, dropout {head['dropout']})")
    if spec.get("freeze"):
        parts.append(f"features frozen (BatchNorm {spec['freeze']['batchnorm']})")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts.append(f"{trainable:,} of {total:,} parameters trainable")
    return "; ".join(parts) + "."
