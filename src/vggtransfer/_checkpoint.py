"""Checkpoints of a training run: what they hold, what loading checks, the files ``fit`` keeps.

A checkpoint is built by :func:`make_payload` from explicit parts (the network, the training
objects, the run's counters) and written by ``_checkpoint_file``. Reading one back for a resume
(:func:`read_resume`) checks everything against the Trainer that will receive it (architecture,
classes, weights' keys and shapes, NaN, the optimizer's groups) and only then hands over a
:class:`ResumePoint`; :func:`load_model` rebuilds a model for inference. :class:`EpochFiles` is
the folder of ``last.pt``, ``best.pt`` and ``interrupted.pt``.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from ._checkpoint_checks import (
    check_against_live_states,
    check_cache_views,
    check_class_weights_fields,
    check_identity,
    check_model_state,
    check_optimizer,
    check_trainer_fields,
    plain,
)
from ._checkpoint_file import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    check_finite,
    read_checkpoint,
    tensor_checksum,
    to_cpu,
)
from ._class_weights import ClassWeights
from ._early_stopping import BestTracker
from ._freeze import frozen_keys
from ._history import History
from ._models import WeightsNotAvailableError, rebuild_model
from ._progress import Progress
from ._rng import capture_rng, restore_rng
from ._runtime import Runtime, resolve_device
from ._spec import build_spec
from ._state_dict import cpu_state_dict, fingerprint, merge_into
from ._transforms import ImageTransform, default_transform

if TYPE_CHECKING:
    from ._trainer import Trainer

__all__ = [
    "EpochFiles",
    "LoadedModel",
    "ResumePoint",
    "TrainingObjects",
    "check_savable",
    "load_model",
    "load_read",
    "load_trainer",
    "make_payload",
    "read_resume",
    "save_trainer",
    "write_on_rank_zero",
]


@dataclass
class TrainingObjects:
    """The stateful objects a resume restores beyond the weights, and the settings it must match.

    ``cache_views`` and ``class_weights`` are the Trainer's; a checkpoint records them, and
    resuming into a Trainer built with other ones is refused.
    """

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    best: BestTracker
    cache_views: int | None = None
    class_weights: ClassWeights | None = None


def save_trainer(
    trainer: Trainer,
    path: str | os.PathLike[str],
    parts: TrainingObjects,
    *,
    head_only: bool,
    training_state: bool,
    interrupted: bool,
    extra: dict[str, Any] | None,
) -> Path:
    """The work of :meth:`Trainer.save_checkpoint`: the run's fields made plain and checked, then written.

    ``parts`` are the Trainer's training objects; they are saved only with ``training_state``.
    """
    network = trainer.network
    weights = parts.class_weights.state() if parts.class_weights is not None else {}
    counters = {
        "epoch": trainer.epoch, "global_step": trainer.global_step, "interrupted": interrupted,
        "seed": trainer.seed, "lr": trainer.lr, "precision": trainer.precision.name,
        "unfreeze_lr": trainer.unfreeze_lr, "cache_views": parts.cache_views,
        "history": trainer.history.to_dict(), **weights,
    }  # fmt: skip
    # Checked by every process (they hold the same weights), so that all raise together.
    fields = check_savable(
        network,
        head_only=head_only,
        fields={
            "class_names": trainer.class_names,
            "extra": trainer.extra if extra is None else extra,
            "counters": counters,
        },
    )
    path = Path(path)
    objects = parts if training_state else None
    # Under torchrun rank 0 alone writes; every process learns whether it could.
    write_on_rank_zero(
        lambda: make_payload(
            network, head_only=head_only, transform=trainer.transform, objects=objects, **fields
        ),
        path,
        trainer.runtime,
    )
    return path


def load_trainer(trainer: Trainer, path: str | os.PathLike[str], parts: TrainingObjects) -> None:
    """The work of :meth:`Trainer.load_checkpoint`: read and check everything, then apply it all.

    Raises:
        CheckpointError: see :func:`read_resume`; the Trainer is then as it was.
    """
    point = read_resume(
        path, network=trainer.network, optimizer=parts.optimizer, scheduler=parts.scheduler,
        scaler=parts.scaler, class_names=trainer.class_names, unfrozen=trainer.unfreeze_lr is not None,
        cache_views=parts.cache_views,
        class_weights=parts.class_weights.setting if parts.class_weights is not None else None,
    )  # fmt: skip
    # Everything checked: apply.
    if point.unfreeze_lr is not None:
        trainer.unfreeze_features(lr=point.unfreeze_lr)
    point.apply(trainer.network, parts)
    trainer.epoch, trainer.global_step, trainer.seed = point.epoch, point.global_step, point.seed
    trainer.history = point.history
    if point.class_names is not None:
        trainer.class_names = point.class_names
    if point.transform is not None:
        trainer.transform = point.transform
    trainer.extra = point.extra
    if parts.class_weights is not None:
        parts.class_weights.weights = point.class_weights
    restore_rng(point.rng)


def check_savable(network: nn.Module, *, head_only: bool, fields: dict[str, Any]) -> dict[str, Any]:
    """Refuse what cannot be saved and loaded back, before anything is written; return ``fields`` as plain data.

    Every torchrun process runs this (they hold the same weights and data), so that all raise
    together rather than leave the others waiting for rank 0's file.

    Raises:
        CheckpointError: NaN or infinite weights, or ``head_only`` for a backbone that
            cannot be rebuilt.
        TypeError: a field holds something no checkpoint can (see :func:`plain`).
    """
    if head_only and not build_spec(network).get("weights"):
        raise CheckpointError(
            "save_checkpoint: head_only=True needs a backbone that can be rebuilt from pretrained "
            "weights, but this model was not built by vt.create_model with weights; save a full "
            "checkpoint (head_only=False)"
        )
    check_finite(network.state_dict(), what="save_checkpoint: the model")
    return {name: plain(value, name) for name, value in fields.items()}


def make_payload(
    network: nn.Module,
    *,
    head_only: bool,
    counters: dict[str, Any],
    class_names: list[str] | None,
    transform: Any,
    extra: dict[str, Any],
    objects: TrainingObjects | None,
) -> dict[str, Any]:
    """The checkpoint's content: plain data and CPU tensors only.

    Args:
        network: The unwrapped model.
        head_only: Leave out the frozen entries, recording their fingerprint instead.
        counters: The run's plain fields (from :func:`check_savable`): epoch, global_step,
            interrupted, seed, lr, precision, unfreeze_lr, cache_views, history (as a dict),
            class_weights (the setting) and class_weights_in_effect.
        class_names: Names in output order, or None (plain, from :func:`check_savable`).
        transform: The Trainer's transform; recorded when it is an :class:`ImageTransform`.
        extra: The user's plain data (from :func:`check_savable`).
        objects: The training objects to resume from; None for a deployment file.
    """
    spec = build_spec(network)
    skip = frozen_keys(network) if head_only else set()
    trainer: dict[str, Any] = {**counters, "resumable": objects is not None}
    if objects is not None:
        trainer.update(
            optimizer=to_cpu(objects.optimizer.state_dict()),
            scheduler=to_cpu(objects.scheduler.state_dict()) if objects.scheduler is not None else None,
            scaler=objects.scaler.state_dict(),
            best=to_cpu(objects.best.state_dict()),
            rng=capture_rng(),
        )
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cpu_state_dict(network, skip=skip),
        "head_only": head_only,
        "backbone_sha256": fingerprint(network.state_dict(), skip) if head_only else None,
        "build": spec,
        "class_names": class_names,
        "transform": transform.to_dict() if isinstance(transform, ImageTransform) else None,
        "extra": copy.deepcopy(extra),
        "trainer": trainer,
    }
    payload["checksum"] = tensor_checksum(payload)  # a flipped bit anywhere in the tensors is found on load
    return payload


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint checked against the Trainer that will resume from it.

    ``unfreeze_lr`` is set when the checkpoint was saved after fine-tuning started and the
    Trainer has not unfrozen yet: it must do so (at that rate) before applying the rest.
    """

    model: dict[str, torch.Tensor]
    unfreeze_lr: float | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None
    best: dict[str, Any]
    rng: dict[str, Any]
    epoch: int
    global_step: int
    seed: int
    history: History
    class_names: list[str] | None
    transform: ImageTransform | None
    extra: dict[str, Any]
    class_weights: list[float] | None = None

    def apply(self, network: nn.Module, objects: TrainingObjects) -> None:
        """Load the weights and the training objects' states (after any unfreezing)."""
        merge_into(network, self.model)
        objects.optimizer.load_state_dict(self.optimizer)
        if objects.scheduler is not None and self.scheduler is not None:
            objects.scheduler.load_state_dict(self.scheduler)
        if self.scaler:
            objects.scaler.load_state_dict(self.scaler)
        objects.best.load_state_dict(self.best)


def read_resume(
    path: str | os.PathLike[str],
    *,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    class_names: list[str] | None,
    unfrozen: bool,
    cache_views: int | None = None,
    class_weights: str | list[float] | None = None,
) -> ResumePoint:
    """Read ``path`` and check it fits ``network`` and ``optimizer``; nothing is changed.

    Raises:
        CheckpointError: unreadable or unsafe file, unknown format version, other
            architecture, other class count or names, a deployment file, missing or
            unexpected weights, shape mismatches, NaN weights, or an optimizer of another shape.
    """
    source = str(path)
    data = read_checkpoint(path)
    check_identity(data, network, class_names, source=source)
    saved = data["trainer"]
    if not saved.get("resumable", False):
        raise CheckpointError(
            f"checkpoint {source!r} was saved for deployment (training_state=False): it has "
            f"no optimizer or random states to resume from. Load it with vt.load_model(path)"
        )
    saved_unfreeze = saved.get("unfreeze_lr")
    if saved_unfreeze is None and unfrozen:
        raise CheckpointError(
            f"checkpoint {source!r} was saved before the features were unfrozen, but this "
            f"Trainer has already unfrozen them; load it into a Trainer built like the original"
        )
    check_trainer_fields(saved, network, source=source)
    check_cache_views(saved, cache_views, source=source)
    check_class_weights_fields(saved, class_weights, source=source)
    check_against_live_states(saved, scheduler, scaler, source=source)
    needs_unfreeze = saved_unfreeze is not None and not unfrozen
    target_frozen = set() if needs_unfreeze else frozen_keys(network)
    check_model_state(data, network, target_frozen if data["head_only"] else set(), source=source)
    params = [list(group["params"]) for group in optimizer.param_groups]
    if needs_unfreeze:  # the group unfreeze_features will add: every parameter not held yet
        held = {id(p) for group in params for p in group}
        params.append([p for p in network.parameters() if id(p) not in held])
    check_optimizer(optimizer, saved["optimizer"], params, source=source)
    transform = _transform_of(data, source)
    if not isinstance(data.get("extra", {}), dict):
        raise CheckpointError(f"checkpoint {source!r} is damaged: 'extra' is not a dict")
    names = data.get("class_names")
    return ResumePoint(
        model=data["model"],
        unfreeze_lr=float(saved_unfreeze) if needs_unfreeze else None,
        optimizer=saved["optimizer"],
        scheduler=saved.get("scheduler"),
        scaler=saved.get("scaler"),
        best=dict(saved["best"]),
        rng=saved["rng"],
        epoch=int(saved["epoch"]),
        global_step=int(saved["global_step"]),
        seed=int(saved["seed"]),
        history=History.from_dict(saved["history"]),
        class_names=list(names) if names is not None else None,
        transform=transform,
        extra=dict(data.get("extra") or {}),
        class_weights=_in_effect(saved.get("class_weights_in_effect")),
    )


def _in_effect(weights: list[float] | None) -> list[float] | None:
    return [float(w) for w in weights] if weights is not None else None


def write_on_rank_zero(make: Callable[[], dict[str, Any]], path: Path, runtime: Runtime) -> None:
    """Rank 0 builds and writes the file; every process returns only once it is written, or raises.

    A failed write (a full disk) raises on rank 0 as it is and on the others as a RuntimeError,
    rather than leaving them waiting for a file that never comes.
    """
    error: Exception | None = None
    if runtime.rank == 0:
        try:
            atomic_save(make(), path)
        except Exception as exc:
            error = exc
    if not runtime.all_agree(error is None):
        raise error or RuntimeError(
            f"save_checkpoint: rank 0 could not write {str(path)!r}; its error says why"
        )


class EpochFiles:
    """The checkpoints ``fit`` keeps in ``checkpoint_dir``.

    ``last.pt`` after every epoch, ``best.pt`` after every epoch that improved the monitored
    metric, and ``interrupted.pt`` on Ctrl-C (in the working directory when there is no folder).
    """

    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        """Check, before any training, that ``folder`` can be created and written to.

        Raises:
            TypeError: ``folder`` is not a path.
            OSError: the folder cannot be created or written (read-only, not a folder, no space).
        """
        if folder is not None and not isinstance(folder, (str, os.PathLike)):
            raise TypeError(
                f"fit: expected checkpoint_dir to be a folder path (str or os.PathLike) or None but "
                f"got {type(folder).__name__}"
            )
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            _check_writable(self.folder)

    def after_epoch(self, save: Callable[[Path], Path], *, improved: bool) -> None:
        """Write ``last.pt``, and ``best.pt`` when the epoch improved; nothing without a folder."""
        if self.folder is None:
            return
        save(self.folder / "last.pt")
        if improved:
            save(self.folder / "best.pt")

    def interrupted(self, save: Callable[[Path], Path], progress: Progress) -> None:
        """Write ``interrupted.pt`` and say where; NaN weights are reported, not saved."""
        path = (self.folder or Path.cwd()) / "interrupted.pt"
        try:
            save(path)
        except CheckpointError as exc:  # NaN weights: say so, but still stop as asked
            progress.message(f"interrupted: no checkpoint written ({exc})")
        else:
            progress.message(
                f"interrupted: saved a checkpoint to {path}; resume with trainer.load_checkpoint(path)"
            )


def _check_writable(folder: Path) -> None:
    # Found out now rather than after the first epoch: create the folder, write and remove a probe.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise type(exc)(
            exc.errno,
            f"fit: checkpoint_dir {str(folder)!r} cannot be written ({exc.strerror or exc}); nothing "
            f"was trained. Choose a writable folder, or leave checkpoint_dir out",
        ) from None


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns: unpack it as ``model, class_names, transform``."""

    model: nn.Module
    class_names: list[str] | None
    transform: ImageTransform


def load_model(
    path: str | os.PathLike[str], *, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a checkpoint into a freshly built model, ready for inference.

    The model is rebuilt from the checkpoint's build record (architecture, head, freeze
    policy), so no training code or data is needed; a head-only checkpoint rebuilds the
    pretrained backbone (from torchvision's cache or the recorded local file) and checks its
    fingerprint before attaching the head. A model that vggtransfer did not build (your own
    module, a factory's) has no record to rebuild from: build it again, with the same head,
    and pass it as ``model``. It is checked against the checkpoint (architecture when both
    record one, class count, every weight's name and shape) before anything is loaded into it.

    Args:
        path: A checkpoint written by :meth:`Trainer.save_checkpoint`.
        model: The model to load into instead of rebuilding one; on any error it is unchanged.
        device: Where to put the model.

    Returns:
        ``LoadedModel(model, class_names, transform)``: the model in eval mode, the class names
        (or None), and the evaluation transform it was trained with.

    Raises:
        CheckpointError: the file is unreadable, unsafe, of an unknown version, or its content
            does not fit the architecture it names.
        WeightsNotAvailableError: a head-only checkpoint's backbone weights cannot be found.

    Example:
        >>> import tempfile, vggtransfer as vt
        >>> model = vt.replace_classifier(vt.create_model("resnet18", weights=None), 2)
        >>> trainer = vt.Trainer(model, device="cpu", class_names=["cat", "dog"], progress=False)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = trainer.save_checkpoint(f"{folder}/pets.pt", training_state=False)
        ...     model, class_names, transform = vt.load_model(path)
        >>> class_names, model.fc[-1].out_features, model.training
        (['cat', 'dog'], 2, False)
    """
    target = resolve_device(device, "load_model")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"load_model: expected model to be an nn.Module or None but got {type(model).__name__}"
        )
    return load_read(read_checkpoint(path), path, model=model, device=target)


def load_read(
    data: dict[str, Any], path: str | os.PathLike[str], *, model: nn.Module | None, device: torch.device
) -> LoadedModel:
    """:func:`load_model` for a checkpoint already read (and checked) by ``read_checkpoint``.

    For callers that looked inside the file first (the command's ``--arch`` check): a 500 MB
    checkpoint is then read once, not twice.
    """
    network = model if model is not None else _rebuild(data, path)
    frozen = frozen_keys(network) if data["head_only"] else set()
    check_identity(data, network, None, source=str(path))
    check_model_state(data, network, frozen, source=str(path))
    recorded = _transform_of(data, str(path))
    merge_into(network, data["model"])
    transform = (
        ImageTransform.from_dict({**recorded.to_dict(), "train": False})
        if recorded
        else default_transform(network)
    )
    names = data.get("class_names")
    return LoadedModel(network.to(device).eval(), list(names) if names else None, transform)


def _rebuild(data: dict[str, Any], path: str | os.PathLike[str]) -> nn.Module:
    """The model of the checkpoint's build record; a record that does not build is a damaged file."""
    try:
        return rebuild_model(data["build"], pretrained=data["head_only"])
    except WeightsNotAvailableError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
        # The build record is as hostile as the rest of the file: whatever building it raises.
        raise CheckpointError(
            f"cannot rebuild the model of checkpoint {str(path)!r} from its build record "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from None


def _transform_of(data: dict[str, Any], source: str) -> ImageTransform | None:
    """The recorded preprocessing, or None; settings that no longer build are a damaged file."""
    settings = data.get("transform")
    if settings is None:
        return None
    try:
        if not isinstance(settings, dict):
            raise TypeError(f"a {type(settings).__name__}")
        return ImageTransform.from_dict(settings)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: its transform settings do not build ({exc})"
        ) from None
