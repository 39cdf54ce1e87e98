"""``compare_backbones``: train the same head on several frozen backbones and rank them.

Each backbone is built, frozen and given the same head, then trained by a :class:`Trainer` that
caches its features on disk (``persist_cache=True``), so that a rerun, or a later ``fit`` of one
of them on the same data, skips the feature pass. Backbones are built one at a time and dropped
before the next; one that fails is reported in its row and the others go on.
"""

from __future__ import annotations

import copy
import gc
import os
import secrets
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ._arguments import (
    check_cache_dir,
    check_learning_rate,
    check_positive_int,
    check_seed,
    check_workers,
)
from ._compare_data import ComparisonData, prepare_data
from ._comparison import BestCheckpoint, Comparison, attach_checkpoint
from ._freeze import freeze_features
from ._heads import find_classifier, replace_classifier
from ._hints import did_you_mean
from ._models import classification_models, create_model
from ._progress import make_progress
from ._runtime import resolve_device
from ._spec import build_spec
from ._timm import TIMM_PREFIX, check_timm_arch
from ._trainer import Trainer
from ._transforms import default_transform

__all__ = ["check_model_names", "compare_backbones"]

_CALLER = "compare_backbones"


# A row's keys, in the order a row shows them; a failed row has None for the measured ones.
_METRICS = (
    "val_accuracy",
    "val_loss",
    "train_accuracy",
    "train_loss",
    "feature_pass_s",
    "head_s",
    "images_per_s",
)
_ROW_KEYS = ("name", "error", *_METRICS[:4], "params", "feature_dim", "build_s", *_METRICS[4:], "cache")


@dataclass(frozen=True)
class _Settings:
    """The checked arguments every trial shares."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    device: torch.device
    cache_dir: Path | None
    progress: bool
    num_workers: int | None


def compare_backbones(
    train: Dataset[Any] | str | os.PathLike[str],
    val: Dataset[Any] | str | os.PathLike[str],
    models: Sequence[str] | Mapping[str, nn.Module | Callable[[], nn.Module]],
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    max_images: int | None = None,
    num_workers: int | None = None,
) -> Comparison:
    """Train the same head on several frozen backbones, evaluate each on ``val`` and rank them.

    Every backbone gets :func:`freeze_features` and the same :func:`replace_classifier` head
    (its defaults), then one feature pass over ``train`` and ``val``, cached on disk in
    ``cache_dir`` under the keys a :class:`Trainer` uses, so that a rerun, or a later ``fit``
    of one of them on the same data, reads the features instead of computing them. The head
    is then trained for ``epochs`` epochs with Adam at ``lr`` and evaluated on ``val``.

    Backbones are built one at a time, and each is dropped (with its Trainer and in-memory
    features) before the next is built, so only one is in memory at a time; modules given in
    a dict are yours, so those stay in memory, and each is copied before it is frozen and
    given the head, leaving yours as they were. A backbone that fails (weights not
    available offline, out of memory, no head to replace) has the reason in its row's
    ``error``, and the others go on; a data or argument error is raised before any backbone
    is built.

    Args:
        train: A folder of images (one folder per class, or the other layouts
            :class:`vggtransfer.data.DogsVsCats` reads), or a Dataset of ``(image, label)``.
            Tensors are used as they are for every backbone; a folder's images and a Dataset
            of PIL images (without a transform of its own) get each backbone's preprocessing
            from its weights. A Dataset of PIL images is taken to give the same image for an
            index every time, as files do.
        val: The validation data, in the same forms; backbones are ranked on it.
        models: A list of torchvision architecture names, each built by
            :func:`create_model` with its default (pretrained) weights; or a dict from name to
            a function that returns an ``nn.Module`` (called when its turn comes; what it
            returns is frozen and given the head in place), or to an ``nn.Module`` (copied
            first). Any family whose head :func:`replace_classifier` finds works.
        epochs: Epochs of head training per backbone.
        batch_size: Samples per step.
        lr: Learning rate of the head.
        seed: Seeds the shuffling, dropout and head initialisation (the same for every
            backbone) and the ``max_images`` subset; None draws one (see ``settings``).
        device: ``"auto"`` picks CUDA, then Apple MPS, then the CPU.
        cache_dir: The feature cache folder; default ``$VGGTRANSFER_CACHE`` or
            ``~/.cache/vggtransfer/features``.
        progress: Print each backbone's progress and result.
        max_images: Use at most this many training images: a class-stratified subset drawn
            from ``seed`` (every class keeps at least one). The validation set is cut by the
            same fraction (rounded up), also stratified, so a quick comparison stays
            proportionate. None uses all.
        num_workers: Loader processes for the feature passes; default one per usable core
            but one.

    Returns:
        A :class:`Comparison`. Each row has ``name``, ``error`` (None, or the exception's
        type and message), ``val_accuracy``, ``val_loss`` (after the last epoch),
        ``train_accuracy``, ``train_loss`` (during the last epoch), ``params`` (all parameters
        of the model with its new head), ``feature_dim`` (the head's input width),
        ``build_s`` (building the model), ``feature_pass_s`` (the fit's time outside its
        epochs: computing or reading the cached features), ``head_s`` (the epochs),
        ``images_per_s`` (images through the backbone per second of feature pass; None when
        every feature came from the cache), and ``cache`` (the Trainer's cache report). A
        failed row has None for what was not measured. With caching off (see ``cache``) the
        backbone runs inside every epoch and its time is in ``head_s``.

    Raises:
        TypeError, ValueError: an argument or the data is not what is expected; the message
            says what was found and what is allowed.
        FileNotFoundError: ``train`` or ``val`` names a folder that does not exist.

    Example:
        >>> import tempfile, torch, vggtransfer as vt
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> models = {
        ...     "squeezenet": lambda: vt.create_model("squeezenet1_1", weights=None),  # tiny, random weights
        ...     "broken": lambda: 1 / 0,
        ... }
        >>> with tempfile.TemporaryDirectory() as cache:
        ...     comparison = vt.compare_backbones(
        ...         data, data, models, epochs=1, batch_size=4, device="cpu", cache_dir=cache,
        ...         progress=False, num_workers=0,
        ...     )
        >>> comparison.best, comparison.rows[0]["feature_dim"], comparison.rows[1]["error"]
        ('squeezenet', 512, 'ZeroDivisionError: division by zero')
    """
    builders = _check_models(models)
    settings = _check_settings(
        epochs, batch_size, lr, seed, device, cache_dir, progress, max_images, num_workers
    )
    data = prepare_data(train, val, max_images, settings.seed)
    report = make_progress(progress)
    best = BestCheckpoint()
    rows = []
    for number, (name, build) in enumerate(builders.items(), start=1):
        report.message(f"{_CALLER}: {number}/{len(builders)} {name}")
        row, built = _trial(name, build, data, settings, best)
        rows.append(row)
        _release_memory(built, settings.device)
        report.message(_summary(rows[-1]))
    comparison = attach_checkpoint(Comparison(rows, _settings_record(settings, data, max_images)), best)
    if comparison.best is None:
        report.message(f"{_CALLER}: no backbone completed; see the error of each row")
    return comparison


def _check_models(models: object) -> dict[str, Callable[[], nn.Module]]:
    """``models`` checked, as builders by name in the order given (nothing is built yet)."""
    if isinstance(models, Mapping):
        return _check_mapping(models)
    if isinstance(models, (str, bytes, nn.Module)) or not isinstance(models, Sequence):
        hint = f"; for one backbone write [{models!r}]" if isinstance(models, str) else ""
        raise TypeError(
            f"{_CALLER}: expected models to be a list of torchvision architecture names, or a dict from "
            f"name to an nn.Module or to a function that returns one, but got {type(models).__name__}{hint}"
        )
    if not models:
        raise ValueError(f"{_CALLER}: expected models to name at least one backbone but got an empty list")
    for name in models:
        if not isinstance(name, str):
            raise TypeError(
                f"{_CALLER}: expected every name in models to be a str such as 'resnet50' but got "
                f"{name!r} ({type(name).__name__}); for your own models pass a dict from name to model"
            )
    check_model_names(list(models))
    return {name: _named_builder(name) for name in models}


def check_model_names(names: list[str]) -> None:
    """Names that ``create_model`` can build (torchvision's, or ``timm:`` ones), none twice.

    Raises:
        ValueError: a repeated or unknown name, with the closest known ones.
    """
    _refuse_repeats(names)
    known = classification_models()
    for name in names:
        if name.startswith(TIMM_PREFIX):
            try:
                check_timm_arch(name)  # unknown names and tags now, before any backbone is built
            except ValueError as error:
                raise ValueError(f"{_CALLER}: {str(error).removeprefix('create_model: ')}") from None
        elif name not in known:
            hint = did_you_mean(name, known)
            raise ValueError(
                f"{_CALLER}: unknown architecture {name!r} in models; {hint}expected torchvision "
                f"classification models (see vt.classification_models()) or 'timm:NAME'"
            )


def _check_mapping(models: Mapping[Any, Any]) -> dict[str, Callable[[], nn.Module]]:
    if not models:
        raise ValueError(f"{_CALLER}: expected models to name at least one backbone but got an empty dict")
    builders: dict[str, Callable[[], nn.Module]] = {}
    for name, value in models.items():
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{_CALLER}: expected every key of models to be a non-empty name (str) but got {name!r}"
            )
        if isinstance(value, nn.Module):
            builders[name] = _copier(value)
        elif callable(value):
            builders[name] = _called(name, value)
        else:
            raise TypeError(
                f"{_CALLER}: expected models[{name!r}] to be an nn.Module or a function that returns one "
                f"but got {value!r} ({type(value).__name__}); for torchvision names pass a list of names"
            )
    return builders


def _refuse_repeats(names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"{_CALLER}: expected distinct names in models but {repeated} appear more than once; "
            f"each name is a row of the comparison"
        )


def _named_builder(name: str) -> Callable[[], nn.Module]:
    return lambda: create_model(name)


def _copier(module: nn.Module) -> Callable[[], nn.Module]:
    return lambda: copy.deepcopy(module)


def _called(name: str, make: Callable[[], Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = make()
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{name!r}] returned {type(model).__name__}, expected an nn.Module")
        return model

    return build


def _check_settings(
    epochs: object,
    batch_size: object,
    lr: object,
    seed: object,
    device: object,
    cache_dir: object,
    progress: object,
    max_images: object,
    num_workers: object,
) -> _Settings:
    """Every plain argument checked, in signature order, before any data is read."""
    epochs = check_positive_int(epochs, "epochs", _CALLER)
    batch_size = check_positive_int(batch_size, "batch_size", _CALLER)
    rate = check_learning_rate(lr, "lr", _CALLER)
    checked_seed = check_seed(seed, _CALLER)
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{_CALLER}: expected device to be a str or a torch.device but got {device!r}")
    resolved = resolve_device(device, _CALLER)
    folder = check_cache_dir(cache_dir, _CALLER)
    if not isinstance(progress, bool):
        raise TypeError(f"{_CALLER}: expected progress to be True or False but got {progress!r}")
    if max_images is not None:
        check_positive_int(max_images, "max_images", _CALLER)
    workers = check_workers(num_workers, _CALLER)
    return _Settings(
        epochs=epochs,
        batch_size=batch_size,
        lr=rate,
        seed=checked_seed if checked_seed is not None else secrets.randbits(62),
        device=resolved,
        cache_dir=folder,
        progress=progress,
        num_workers=workers,
    )


def _trial(
    name: str,
    build: Callable[[], nn.Module],
    data: ComparisonData,
    settings: _Settings,
    best: BestCheckpoint,
) -> tuple[dict[str, Any], weakref.ref[nn.Module] | None]:
    """Build, train and evaluate one backbone; a failure becomes the row's ``error``.

    Everything the trial holds (model, Trainer, features) is local, so it is garbage once this
    returns, also after an exception: the row keeps only plain values. Returns the row and a
    weak reference to the model (None if none was built), to check that it is gone.
    """
    row: dict[str, Any] = dict.fromkeys(_ROW_KEYS)
    row.update(name=name, error=None)
    built = None
    try:
        started = time.perf_counter()
        model = freeze_features(build())
        built = weakref.ref(model)
        with torch.random.fork_rng():  # the same head for every backbone and every run of this seed
            torch.manual_seed(settings.seed)
            replace_classifier(model, data.num_classes)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["feature_dim"] = _head_input_width(model)
        trainer = Trainer(
            model,
            lr=settings.lr,
            seed=settings.seed,
            device=settings.device,
            class_names=data.class_names,
            cache_dir=settings.cache_dir,
            progress=settings.progress,
            cache_features="auto",
            persist_cache=True,
        )
        row["build_s"] = time.perf_counter() - started
        _fit(trainer, data, settings, row)
        if best.improves(row):
            spec = build_spec(trainer.network)
            rebuildable = bool(spec.get("arch") and spec.get("weights"))  # else the whole model is saved
            trainer.save_checkpoint(best.path, head_only=rebuildable, training_state=False)
            best.row = dict(row)
    except Exception as exc:  # any failure of one backbone is its row's; KeyboardInterrupt is not caught
        row.update(dict.fromkeys(_METRICS), error=f"{type(exc).__name__}: {exc}")
    return row, built


def _fit(trainer: Trainer, data: ComparisonData, settings: _Settings, row: dict[str, Any]) -> None:
    """Train the head, and record metrics, times and the cache report in ``row``."""
    transform = default_transform(trainer.network)  # what the backbone's weights expect
    train, val = data.train.for_backbone(transform), data.val.for_backbone(transform)
    started = time.perf_counter()
    try:
        history = trainer.fit(
            train,
            val,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            num_workers=settings.num_workers,
        )
    finally:
        row["cache"] = dict(trainer.cache_report)
    elapsed = time.perf_counter() - started
    last = history[-1]
    head_s = sum(history["time_s"])
    computed = sum(
        size
        for role, size in (("fit(train)", len(data.train)), ("fit(val)", len(data.val)))
        if row["cache"].get(role) == "on"
    )
    feature_pass_s = max(elapsed - head_s, 0.0)
    row.update(
        val_accuracy=last["val_accuracy"],
        val_loss=last["val_loss"],
        train_accuracy=last["train_accuracy"],
        train_loss=last["train_loss"],
        feature_pass_s=feature_pass_s,
        head_s=head_s,
        images_per_s=computed / feature_pass_s if computed and feature_pass_s > 0 else None,
    )


def _head_input_width(model: nn.Module) -> int | None:
    """The input width of the head's first Linear layer: what the new head sees of each image."""
    _, head = find_classifier(model)
    first = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    return None if first is None else int(first.in_features)


def _release_memory(built: weakref.ref[nn.Module] | None, device: torch.device) -> None:
    """Make sure the last backbone is gone before the next is built, and CUDA's cached blocks too."""
    if built is not None and built() is not None:
        # Held by reference cycles (an exception's traceback, a model's own hooks): collect them.
        # A full collection takes a good fraction of a second, so only when it is needed.
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _summary(row: dict[str, Any]) -> str:
    if row["error"] is not None:
        first_line = str(row["error"]).splitlines()[0]
        return f"{_CALLER}: {row['name']} failed: {first_line}"
    return (
        f"{_CALLER}: {row['name']}: val accuracy {100 * row['val_accuracy']:.2f}%, val loss "
        f"{row['val_loss']:.4f} (feature pass {row['feature_pass_s']:.1f}s, head {row['head_s']:.1f}s)"
    )


def _settings_record(settings: _Settings, data: ComparisonData, max_images: object) -> dict[str, Any]:
    return {
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "seed": settings.seed,
        "device": str(settings.device),
        "max_images": max_images,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "train_positions": data.train_positions,
        "val_positions": data.val_positions,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
    }
