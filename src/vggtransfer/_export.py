"""Model export to ONNX or TorchScript, with the class names and preprocessing inside the file.

A deployed model needs three things beside its weights: which output is which class, how an
image becomes its input tensor, and proof that the exported graph computes what the PyTorch
model does. :func:`export` writes all three: the names and the :class:`ImageTransform` settings
(as JSON) go into ONNX ``metadata_props`` or TorchScript extra files, and a parity check runs the
written file against the eager model before it takes the place of ``path``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ._checkpoint import load_model
from ._transforms import ImageTransform, default_transform

__all__ = ["EXPORT_FORMATS", "EXPORT_TOLERANCE", "ONNX_OPSET", "Export", "export"]

#: The formats :func:`export` writes.
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
#: The largest maximum absolute difference of the logits (fp32, CPU) an export may show.
EXPORT_TOLERANCE: float = 1e-3
#: The ONNX opset of exported graphs: 18 is torch's own default and onnxruntime >= 1.14 runs it.
ONNX_OPSET: int = 18

_PARITY_BATCH = 3  # not the traced batch of 2: the check also proves that the batch axis is dynamic
_INSTALL = 'pip install "vggtransfer[export]"'


class Export(NamedTuple):
    """What :func:`export` returns: where the file is, its format and its parity with PyTorch."""

    path: Path
    format: str
    max_abs_diff: float
    class_names: list[str] | None


def export(
    checkpoint_or_model: str | os.PathLike[str] | nn.Module,
    path: str | os.PathLike[str],
    *,
    format: Literal["onnx", "torchscript"] = "onnx",
    image_size: int = 224,
    class_names: list[str] | None = None,
    transform: ImageTransform | None = None,
) -> Export:
    """Export a model to ONNX or TorchScript for inference without vggtransfer.

    The file takes ``[batch, 3, image_size, image_size]`` float32 images (named ``image`` in
    ONNX, any batch size) and returns ``[batch, classes]`` logits (``logits``). It carries, as
    ONNX ``metadata_props`` or TorchScript extra files, the keys ``class_names`` (a JSON list, or
    ``null``), ``transform`` (the evaluation :class:`ImageTransform` as JSON, see
    :meth:`ImageTransform.to_dict`) and ``vggtransfer_version``. Before the file replaces
    ``path``, a random batch of 3 runs through the written file (onnxruntime, or
    ``torch.jit.load``) and through the model in eval mode; the largest absolute difference of
    the logits is returned, and above :data:`EXPORT_TOLERANCE` the export is refused. The file
    is written atomically: a failed export leaves ``path`` as it was.

    Args:
        checkpoint_or_model: A checkpoint written by :meth:`Trainer.save_checkpoint` (loaded
            with :func:`load_model`), or a model. A model is exported on the CPU in float32
            (a copy, if it is elsewhere) and left in the train/eval mode it had.
        path: The file to write; its folder is created if needed.
        format: ``"onnx"`` (needs the ``export`` extra) or ``"torchscript"``.
        image_size: The height and width of the input; it must equal the transform's size.
        class_names: One name per output; default: the checkpoint's, or None for a model.
        transform: The preprocessing to record; default: the checkpoint's, or for a model
            the evaluation transform of its weights (:func:`imagenet_transform`) at
            ``image_size``.

    Returns:
        ``Export(path, format, max_abs_diff, class_names)``.

    Raises:
        TypeError, ValueError: an argument is not what is allowed (the message says which).
        ModuleNotFoundError: ONNX export without onnx, onnxscript or onnxruntime installed.
        RuntimeError: the written file's logits differ from PyTorch's by more than the tolerance.

    Example:
        >>> import json, tempfile, torch, vggtransfer as vt
        >>> model = vt.replace_classifier(vt.create_model("resnet18", weights=None), 2)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     result = vt.export(model, f"{folder}/pets.pt", format="torchscript", image_size=32,
        ...                        class_names=["cat", "dog"])
        ...     extra = {"class_names": ""}
        ...     scripted = torch.jit.load(result.path, _extra_files=extra)
        ...     logits = scripted(torch.zeros(5, 3, 32, 32))
        >>> result.format, result.max_abs_diff < vt.EXPORT_TOLERANCE, json.loads(extra["class_names"])
        ('torchscript', True, ['cat', 'dog'])
        >>> logits.shape  # any batch size
        torch.Size([5, 2])
    """
    # Every argument is checked, and the checkpoint read, before the folder is created.
    target, kind, size = _check_target(path), _check_format(format), _check_size(image_size)
    model, names, preprocessing = _resolve_source(checkpoint_or_model, class_names, transform, size)
    if kind == "onnx":
        _onnx_modules()  # a missing extra is said before any work
    with _eval_on_cpu(model) as network:
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        probe = torch.randn(_PARITY_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
        expected = _run_eager(network, probe)
        _check_output(expected, names)
        metadata = {
            "class_names": json.dumps(names),
            "transform": json.dumps(preprocessing.to_dict()),
            "vggtransfer_version": _version(),
        }
        with _temporary_file(target) as scratch:
            if kind == "onnx":
                _write_onnx(network, example, scratch, metadata)
                actual = _run_onnx(scratch, probe)
            else:
                _write_torchscript(network, example, scratch, metadata)
                actual = _run_torchscript(scratch, probe)
            difference = float((actual.float() - expected.float()).abs().max())
            if not difference <= EXPORT_TOLERANCE:  # NaN fails too
                raise RuntimeError(
                    f"export: the exported {kind} model's logits differ from PyTorch's by up to "
                    f"{difference:.3g}, above the tolerance of {EXPORT_TOLERANCE:g}; nothing was written "
                    f"to {str(target)!r}. Is the model deterministic in eval mode (no random layers)?"
                )
            os.replace(scratch, target)
    return Export(target, kind, difference, names)


def _check_target(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"export: expected path to be a file path (str or os.PathLike) but got {path!r} "
            f"({type(path).__name__})"
        )
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(
            f"export: expected path to be a file but {str(target)!r} is an existing folder; "
            f"give a file name inside it, such as {str(target / 'model.onnx')!r}"
        )
    return target


def _check_format(value: object) -> str:
    if not isinstance(value, str) or value not in EXPORT_FORMATS:
        raise ValueError(f"export: expected format 'onnx' or 'torchscript' but got {value!r}")
    return value


def _check_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"export: expected image_size to be a positive int such as 224 but got {value!r}")
    return value


def _resolve_source(
    source: object, names: object, transform: object, size: int
) -> tuple[nn.Module, list[str] | None, ImageTransform]:
    """The model, its class names and its evaluation transform, from a checkpoint or a module."""
    if transform is not None and not isinstance(transform, ImageTransform):
        raise TypeError(
            f"export: expected transform to be a vt.ImageTransform (from vt.imagenet_transform) or "
            f"None but got {type(transform).__name__}"
        )
    checked = _check_names(names)
    if isinstance(source, nn.Module):
        model, recorded, preprocessing = source, None, transform or _sized(default_transform(source), size)
    elif isinstance(source, (str, os.PathLike)):
        model, recorded, loaded = load_model(source)
        preprocessing = transform or loaded
    else:
        raise TypeError(
            f"export: expected checkpoint_or_model to be a checkpoint path or an nn.Module but got "
            f"{type(source).__name__}"
        )
    preprocessing = ImageTransform.from_dict({**preprocessing.to_dict(), "train": False})
    if preprocessing.size != size:
        raise ValueError(
            f"export: expected image_size to equal the transform's size {preprocessing.size} (the "
            f"images it makes) but got image_size={size}; pass image_size={preprocessing.size}"
        )
    return model, checked if checked is not None else recorded, preprocessing


def _sized(transform: ImageTransform, size: int) -> ImageTransform:
    """``transform`` at ``size``, its resize scaled in proportion (as imagenet_transform does)."""
    resize = max(size, round(size * transform.resize / transform.size))
    return ImageTransform.from_dict({**transform.to_dict(), "size": size, "resize": resize})


def _check_names(value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise TypeError(
            f"export: expected class_names to be a list of strings such as ['cat', 'dog'] or None "
            f"but got {value!r}"
        )
    if len(set(value)) != len(value):
        raise ValueError(f"export: expected distinct class_names but got {list(value)}")
    return list(value)


def _run_eager(network: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    try:
        with torch.no_grad():
            logits: torch.Tensor = network(probe)
    except RuntimeError as exc:  # too small for the model's pooling, or not 3-channel input
        raise ValueError(
            f"export: the model cannot run on images of shape {list(probe.shape[1:])} "
            f"({type(exc).__name__}: {str(exc)[:200]}); choose an image_size it accepts, such as 224"
        ) from None
    return logits


def _check_output(logits: object, names: list[str] | None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"export: expected the model to return one [batch, classes] tensor but got {found}")
    if names is not None and len(names) != logits.shape[1]:
        raise ValueError(
            f"export: expected one class name per output ({logits.shape[1]}) but got "
            f"{len(names)} class_names {names}"
        )


@contextlib.contextmanager
def _eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode on the CPU in float32 (a copy if it is not there); modes restored after."""
    modes = [(module, module.training) for module in model.modules()]
    tensors = [*model.parameters(), *model.buffers()]
    on_cpu = all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors
    )
    network = model if on_cpu else _cpu_copy(model)
    try:
        yield network.eval()
    finally:
        for module, training in modes:  # per module: layers held in eval mode stay so
            module.train(training)


def _cpu_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to("cpu", torch.float32)


@contextlib.contextmanager
def _temporary_file(target: Path) -> Iterator[Path]:
    """A fresh file beside ``target`` (its folder created), removed unless it has been moved into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise type(exc)(
            f"export: {str(target)!r} cannot be written ({exc.strerror or exc}); nothing was "
            f"exported. Choose a writable folder"
        ) from None
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes the file private; give the export the usual permissions
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _onnx_modules() -> tuple[Any, Any]:
    """Return the onnx and onnxruntime modules, or raise the install command (onnxscript: torch's exporter)."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"export to ONNX needs onnx, onnxscript and onnxruntime ({exc.name} is missing); "
            f"install them with: {_INSTALL}",
            name=exc.name,
        ) from None
    return onnx, onnxruntime


def _write_onnx(network: nn.Module, example: torch.Tensor, scratch: Path, metadata: dict[str, str]) -> None:
    onnx, _ = _onnx_modules()
    # torch's default exporter (dynamo=True, built on onnxscript): the TorchScript-based one is
    # deprecated. The example batch is 2 because torch.export specialises a dimension of size 1.
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        network,
        (example,),
        input_names=["image"],
        output_names=["logits"],
        opset_version=ONNX_OPSET,
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # None only for dynamo=False
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(scratch))


def _run_onnx(scratch: Path, images: torch.Tensor) -> torch.Tensor:
    _, onnxruntime = _onnx_modules()
    session = onnxruntime.InferenceSession(str(scratch), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": images.numpy()})
    return torch.from_numpy(logits)


def _write_torchscript(
    network: nn.Module, example: torch.Tensor, scratch: Path, metadata: dict[str, str]
) -> None:
    with torch.no_grad(), _quiet_jit():
        traced = torch.jit.trace(network, example, check_trace=False)  # type: ignore[no-untyped-call]
        torch.jit.save(traced, str(scratch), _extra_files=metadata)


def _run_torchscript(scratch: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), _quiet_jit():
        logits: torch.Tensor = torch.jit.load(str(scratch))(images)  # type: ignore[no-untyped-call]
    return logits


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    # torch 2.14 marks every torch.jit call deprecated; the user asked for TorchScript, so the
    # four warnings per export say nothing they can act on (docs/export.md says it once).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def _version() -> str:
    try:
        return version("vggtransfer")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
