"""What ``--arch`` names: a torchvision model, a ``timm:`` model, or a user's ``module:callable`` factory.

A factory is the one way to train a model that vggtransfer cannot build itself, and it is code,
so it is imported only because the user typed its name, never because a checkpoint names it.
The factory's name goes into the model's build record; a checkpoint of such a model can then be
loaded only by a user who names the same factory again (:func:`load_for_arch`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ._checkpoint import LoadedModel, load_read
from ._checkpoint_file import CheckpointError, read_checkpoint
from ._hints import did_you_mean
from ._models import Weights, apply_head_record, classification_models, create_model
from ._runtime import resolve_device
from ._spec import record
from ._timm import TIMM_PREFIX, check_timm_arch

__all__ = ["ArchSpec", "FactoryError", "check_arch_name", "load_for_arch", "parse_arch"]

#: The build record's key for the factory that made a model's backbone.
FACTORY_KEY = "factory"

_FORMS = "a torchvision model name (vgg16_bn), timm:NAME, or module:callable (my_models:build)"


class FactoryError(RuntimeError):
    """A user's factory failed while being imported or called: the error is in the user's code."""


@dataclass(frozen=True)
class ArchSpec:
    """A checked ``--arch`` value.

    Attributes:
        text: What was typed, e.g. ``"vgg16_bn"``, ``"timm:convnext_atto"``, ``"my_models:build"``.
        kind: ``"torchvision"``, ``"timm"`` or ``"factory"``.
    """

    text: str
    kind: str

    def build(self, weights: Weights = "DEFAULT") -> nn.Module:
        """The backbone: ``create_model(text, weights=weights)``, or the factory's model.

        A factory loads its own weights, so ``weights`` does not apply to it; its model is
        recorded as built by this factory.

        Raises:
            FactoryError: importing or calling the factory raised (in the user's code).
            ValueError: the factory cannot be found, or returned something other than a module.
        """
        if self.kind != "factory":
            return create_model(self.text, weights=weights)
        with _working_folder_importable():
            made = _call(_import_factory(self.text), self.text)
        record(made, **{FACTORY_KEY: self.text})
        return made

    def matches(self, build: dict[str, Any]) -> bool:
        """Whether a checkpoint's build record was made by this spec."""
        if self.kind == "factory":
            return build.get(FACTORY_KEY) == self.text
        if build.get(FACTORY_KEY) is not None:
            return False
        arch = build.get("arch")
        # timm records the pretrained tag it resolved: "timm:resnet18" made "timm:resnet18.a1_in1k".
        return arch == self.text or (
            self.kind == "timm" and isinstance(arch, str) and arch.startswith(self.text + ".")
        )


def parse_arch(text: str, option: str = "--arch") -> ArchSpec:
    """Check ``text`` and say what it names; nothing is imported or built yet but timm's name list.

    Raises:
        ValueError: an unknown name (with the closest known ones) or a malformed factory.
        ModuleNotFoundError: a ``timm:`` name without timm installed.

    Example:
        >>> parse_arch("vgg16_bn").kind, parse_arch("my_models:build").kind
        ('torchvision', 'factory')
    """
    if text.startswith(TIMM_PREFIX):
        check_arch_name(text, option)
        return ArchSpec(text, "timm")
    if ":" not in text:
        check_arch_name(text, option)
        return ArchSpec(text, "torchvision")
    module, _, attribute = text.rpartition(":")  # rpartition: a Windows path keeps its drive colon
    is_file = module.endswith(".py")
    if not (attribute and all(p.isidentifier() for p in attribute.split("."))) or not (
        is_file or (module and all(p.isidentifier() for p in module.split(".")))
    ):
        raise ValueError(f"expected {option} to be {_FORMS}, but got {text!r}")
    return ArchSpec(text, "factory")


def check_arch_name(name: str, option: str) -> None:
    """A torchvision or ``timm:`` name that ``create_model`` builds.

    Raises:
        ValueError: unknown name, with the closest known ones.
    """
    if name.startswith(TIMM_PREFIX):
        try:
            check_timm_arch(name)
        except ValueError as error:
            raise ValueError(f"{option}: {str(error).removeprefix('create_model: ')}") from None
        return
    known = classification_models()
    if name not in known:
        hint = did_you_mean(name, known)
        raise ValueError(
            f"{option}: unknown architecture {name!r}; {hint}expected {_FORMS} "
            f"(torchvision's names: vt.classification_models())"
        )


def load_for_arch(path: Path, arch: ArchSpec | None, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load checkpoint ``path``; a factory-built model only when ``arch`` names the same factory.

    The checkpoint never makes this import anything: for a factory's model, the factory that
    ``arch`` names (what the user typed) builds the backbone, the recorded head and freeze
    policy are applied, and every weight is checked before loading, as :func:`load_model` does.

    Raises:
        CheckpointError: the file does not load, or ``arch`` is not what it was trained with.
        FactoryError, ValueError: as :meth:`ArchSpec.build`.
    """
    data = read_checkpoint(path)  # once: the checks below and the load share it
    build = data["build"]
    factory = build.get(FACTORY_KEY)
    if factory is not None and not isinstance(factory, str):
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its factory is {factory!r:.80}")
    trained = factory or build.get("arch")
    if arch is None and factory is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a model built by the factory {factory!r}; checkpoints "
            f"never import code, so name it again: --arch {factory}"
        )
    if arch is not None and trained is not None and not arch.matches(build):
        raise CheckpointError(
            f"--arch {arch.text!r} does not match checkpoint {str(path)!r}, which was trained with "
            f"--arch {trained}; pass --arch {trained}, or leave --arch out for torchvision and timm models"
        )
    model = apply_head_record(arch.build(), build) if arch is not None and arch.kind == "factory" else None
    return load_read(data, path, model=model, device=resolve_device(device, "load_model"))


def _import_factory(text: str) -> Callable[[], Any]:
    module_name, _, attribute = text.rpartition(":")
    module = _import(module_name, text)
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ValueError(
                f"--arch {text!r}: module {module_name!r} has no attribute {attribute!r}; its callables "
                f"are {', '.join(names[:12]) or 'none'}"
            )
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"--arch {text!r}: {attribute!r} is a {type(found).__name__}, not a callable")
    return found  # type: ignore[no-any-return]


def _import(module_name: str, text: str) -> ModuleType:
    """The module of a factory: a file ``x.py``, or a module importable from here or the working folder."""
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise ValueError(f"--arch {text!r}: there is no file {module_name!r}")
        if file.stem in sys.modules:  # registering the file under its name would replace that module
            raise ValueError(
                f"--arch {text!r}: a module named {file.stem!r} is already imported, so the file cannot be "
                f"imported under that name; rename {module_name!r}"
            )
        spec = importlib.util.spec_from_file_location(file.stem, file)
        assert spec is not None and spec.loader is not None  # a .py file always has a source loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[file.stem] = module  # so that the factory's classes pickle and import as usual
        try:
            _run_user_code(lambda: spec.loader.exec_module(module), f"importing {module_name!r}", text)  # type: ignore[union-attr]
        except BaseException:
            del sys.modules[file.stem]  # a module that failed to import is not left behind
            raise
        return module
    if importlib.util.find_spec(module_name.split(".")[0]) is None:
        raise ValueError(
            f"--arch {text!r}: no module named {module_name.split('.')[0]!r} here or in the working "
            f"folder; run from the folder that holds it, or name the file: path/to/{module_name.split('.')[-1]}.py:"
            f"{text.rpartition(':')[2]}"
        )
    return _run_user_code(lambda: importlib.import_module(module_name), f"importing {module_name!r}", text)  # type: ignore[no-any-return]


@contextmanager
def _working_folder_importable() -> Iterator[None]:
    """The working folder on ``sys.path`` while a factory is imported and called, then as it was.

    A console script does not look in the working folder, and ``--arch my_models:build`` should;
    left there, a local ``onnx.py`` or ``tqdm.py`` would later shadow the real package.
    """
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def _call(factory: Callable[[], Any], text: str) -> nn.Module:
    made = _run_user_code(factory, "calling it", text)
    if not isinstance(made, nn.Module):
        raise ValueError(
            f"--arch {text!r}: expected the factory to return an nn.Module but it returned a "
            f"{type(made).__name__}"
        )
    return made


def _run_user_code(run: Callable[[], Any], doing: str, text: str) -> Any:
    """Run the user's code; what it raises becomes one line that says where, not vggtransfer's traceback.

    ``SystemExit`` too: a factory that calls ``sys.exit(0)`` must not end the command with
    status 0 as if it had succeeded. Ctrl-C (KeyboardInterrupt) is left to stop the command.
    """
    try:
        return run()
    except (Exception, SystemExit) as error:  # anything: it is the user's code, reported with its location
        raise FactoryError(f"--arch {text!r}: {doing} raised {_described(error)}{_where(error)}") from error


def _described(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit (sys.exit({error.code!r})) instead of returning a model"
    if isinstance(error, SyntaxError):  # its own message already names the file and line
        return f"{type(error).__name__}: {error.msg}"
    return f"{type(error).__name__}: {error}"


def _where(error: BaseException) -> str:
    """`` (file, line N)``: the innermost frame of the user's own files, or a syntax error's place."""
    if isinstance(error, SyntaxError) and error.filename:
        return f" ({error.filename}, line {error.lineno})"
    frames = traceback.extract_tb(error.__traceback__)
    # Not vggtransfer's frames, not an installed package's, not importlib's frozen ones.
    ours = (str(Path(__file__).parent), "<frozen ")
    installed = (sys.prefix, sys.base_prefix, *ours)
    # A factory in an installed package: its innermost frame; in C (os.system): no place to name.
    own = [f for f in frames if not f.filename.startswith(installed)] or [
        f for f in frames if not f.filename.startswith(ours)
    ]
    return f" ({own[-1].filename}, line {own[-1].lineno})" if own else ""
