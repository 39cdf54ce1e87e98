"""Building torchvision classification models, with pretrained weights fetched safely."""

from __future__ import annotations

import difflib
import http.client
import os
import pickle
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any, Union

import torch
import torchvision.models
from torch import nn
from torchvision.models import WeightsEnum, get_model, get_model_weights, list_models

from ._hints import did_you_mean
from ._spec import record
from ._state_dict import load_exactly, read_state_dict

__all__ = [
    "Weights",
    "WeightsNotAvailableError",
    "apply_head_record",
    "cached_weights_path",
    "classification_models",
    "create_model",
    "rebuild_model",
]

#: What ``create_model(weights=...)`` accepts.
Weights = Union[str, WeightsEnum, "os.PathLike[str]", None]

# Inception-style models return a (logits, aux1, aux2) tuple in training mode while their
# auxiliary heads exist. Every other family returns one tensor, so a random-init model is built
# without them; torchvision's pretrained builders already drop them unless asked to keep them.
_UNIFORM_OUTPUT_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False},
    "inception_v3": {"aux_logits": False},
}

_WEIGHTS_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

# What a failed download looks like: urllib's errors (offline, DNS, HTTP status), sockets that
# time out or reset, and torch.hub's RuntimeError for a download whose SHA-256 does not match.
_DOWNLOAD_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class WeightsNotAvailableError(RuntimeError):
    """Pretrained weights could not be downloaded and are not in the local cache.

    The message names the URL, the cache file torchvision looks for, and how to pass a local
    file instead. Catch it to fall back to another source of weights.
    """


def classification_models() -> list[str]:
    """Names of every torchvision image-classification model ``create_model`` can build.

    Example:
        >>> import vggtransfer as vt
        >>> "vgg16_bn" in vt.classification_models()
        True

    """
    names: list[str] = list_models(module=torchvision.models)
    return names


def create_model(
    arch: str = "vgg16_bn",
    *,
    weights: Weights = "DEFAULT",
    progress: bool = True,
    **builder_kwargs: Any,
) -> nn.Module:
    """Build a torchvision (or timm) classification model, optionally with pretrained weights.

    The model comes back exactly as torchvision builds it (so ``model.features`` and
    ``model.classifier`` are where torchvision puts them), in training mode, on the CPU.
    Pretrained files are read with the safe ``weights_only`` unpickler before torchvision
    touches them, so a tampered cache file is refused instead of executed.

    With the ``timm`` extra installed, ``arch="timm:NAME"`` builds ``timm.create_model(NAME)``
    instead, e.g. ``"timm:convnext_atto"`` or, with a pretrained tag, ``"timm:resnet18.a1_in1k"``.
    Its weights are ``"DEFAULT"`` (timm's pretrained weights for that tag, downloaded by timm
    from the Hugging Face hub), ``None`` or a local ``.safetensors`` / ``.pth`` file. The head
    functions, freezing and :func:`default_transform` follow what the model declares in its
    ``pretrained_cfg`` (classifier name, input size, crop, interpolation, mean and std). The
    build record names the tag timm resolved (``"timm:resnet18.a1_in1k"`` for
    ``"timm:resnet18"``), so checkpoints rebuild the same weights with later timm releases.

    Args:
        arch: A torchvision classification model name, e.g. ``"vgg16"``, ``"vgg16_bn"``,
            ``"resnet50"`` (see :func:`classification_models`), or ``"timm:"`` followed by a
            timm model name (see ``timm.list_models()``).
        weights: Which weights to start from:

            * ``"DEFAULT"``: the best ImageNet weights torchvision has for ``arch``;
            * an enum member name such as ``"IMAGENET1K_V1"`` (or the full
              ``"VGG16_Weights.IMAGENET1K_V1"``), or the member itself;
            * a path to a local ``.pth`` state dict of the same architecture (offline machines);
            * ``None``: random initialisation, no download.

            Downloads go to torchvision's cache, ``$TORCH_HOME/hub/checkpoints`` (timm's to
            the Hugging Face cache, ``$HF_HOME``).
        progress: Show a progress bar while downloading (torchvision; the Hugging Face hub
            shows its own).
        **builder_kwargs: Passed to the torchvision builder, e.g. ``dropout=0.2``, or to
            ``timm.create_model``, e.g. ``drop_path_rate=0.1``.

    Returns:
        The model. vggtransfer records ``arch`` and ``weights`` on it so checkpoints can rebuild it.

    Raises:
        TypeError: ``arch`` is not a string or ``weights`` is of an unsupported type.
        ValueError: ``arch`` is unknown, the weights name does not exist for ``arch``, or the
            file holds weights of another shape or is not a plain state dict.
        FileNotFoundError: ``weights`` is a path that does not exist.
        ModuleNotFoundError: ``arch`` is a ``"timm:"`` name and timm is not installed.
        WeightsNotAvailableError: the download failed (for example on an offline machine).

    Example:
        >>> import vggtransfer as vt
        >>> model = vt.create_model("vgg11", weights=None)
        >>> model.classifier[-1].out_features
        1000

    """
    if isinstance(arch, str) and arch.startswith("timm:"):
        return _create_timm_model(arch, weights, builder_kwargs)
    arch = _check_arch(arch)
    resolved = _resolve_weights(arch, weights)
    if isinstance(resolved, WeightsEnum):
        _fetch_and_verify(arch, resolved, progress=progress)
        model: nn.Module = get_model(arch, weights=resolved, progress=progress, **builder_kwargs)
        weights_record: str | None = f"{type(resolved).__name__}.{resolved.name}"
    else:
        # Read a local file before building, so a wrong path fails without the build's cost.
        state_dict = read_state_dict(resolved) if isinstance(resolved, Path) else None
        kwargs = {**_UNIFORM_OUTPUT_KWARGS.get(arch, {}), **builder_kwargs}
        model = get_model(arch, weights=None, **kwargs)
        weights_record = None
        if isinstance(resolved, Path) and state_dict is not None:
            load_exactly(model, state_dict, source=str(resolved))
            weights_record = f"file:{resolved.resolve()}"
    record(
        model,
        arch=arch,
        weights=weights_record,
        builder_kwargs=dict(builder_kwargs) or None,
        random_init_kwargs={**_architecture_kwargs(arch, model), **builder_kwargs} or None,
    )
    return model


def _create_timm_model(arch: str, weights: object, builder_kwargs: dict[str, Any]) -> nn.Module:
    """``create_model`` for ``"timm:NAME"``: build with timm, load a local file exactly, record."""
    from ._timm import build_timm_model, check_timm_arch, read_weights_file, timm_arch_record

    name = check_timm_arch(arch)
    source = _resolve_timm_weights(arch, weights)
    # Read a local file before building, so a wrong path fails without the build's cost.
    state_dict = read_weights_file(source) if isinstance(source, Path) else None
    model = build_timm_model(name, pretrained=source == "DEFAULT", builder_kwargs=builder_kwargs)
    weights_record = "DEFAULT" if source == "DEFAULT" else None
    if isinstance(source, Path) and state_dict is not None:
        load_exactly(model, state_dict, source=str(source))
        weights_record = f"file:{source.resolve()}"
    record(
        model,
        arch=timm_arch_record(name, model),
        weights=weights_record,
        builder_kwargs=dict(builder_kwargs) or None,
        random_init_kwargs=dict(builder_kwargs) or None,
    )
    return model


def _resolve_timm_weights(arch: str, weights: object) -> str | Path | None:
    """``"DEFAULT"`` (timm's pretrained weights), a local file, or None for random weights."""
    if weights is None or (isinstance(weights, str) and weights == "DEFAULT"):
        return weights
    if isinstance(weights, os.PathLike):
        return Path(weights)
    expected = (
        "expected 'DEFAULT' (timm's pretrained weights), None for random initialisation, or a path "
        "to a local .safetensors or .pth file"
    )
    if isinstance(weights, WeightsEnum):
        raise ValueError(
            f"create_model: weights {weights!r} are torchvision weights, which do not fit the timm "
            f"model {arch!r}; {expected}"
        )
    if not isinstance(weights, str):
        raise TypeError(
            f"create_model: expected weights to be a str, a path or None for timm model {arch!r} "
            f"but got {type(weights).__name__}"
        )
    if _looks_like_path(weights) or weights.endswith(".safetensors"):
        return Path(weights)
    from ._timm import timm_pretrained_tags

    arch_name = arch[len("timm:") :].split(".")[0]
    hint = (
        f" timm chooses pretrained weights by a tag in the name: did you mean arch "
        f"'timm:{arch_name}.{weights}'?"
        if weights in timm_pretrained_tags(arch_name)
        else f" timm chooses pretrained weights by a tag in the name, e.g. 'timm:{arch_name}.TAG' "
        f"(see timm.list_pretrained({arch_name + '.*'!r}))."
    )
    raise ValueError(f"create_model: weights {weights!r} do not exist for {arch!r}; {expected}.{hint}")


def _architecture_kwargs(arch: str, model: nn.Module) -> dict[str, Any]:
    """Builder options that pretrained builders set implicitly, needed to rebuild the same network.

    A checkpoint rebuilds its model with ``weights=None`` (no download), so options that
    torchvision's builders derive from the weights must be spelt out: GoogLeNet and Inception
    rescale their input when pretrained, and ViT's image size comes from the weights.
    """
    kwargs: dict[str, Any] = dict(_UNIFORM_OUTPUT_KWARGS.get(arch, {}))
    if isinstance(getattr(model, "transform_input", None), bool):
        kwargs["transform_input"] = model.transform_input
    if arch.startswith("vit_") and isinstance(getattr(model, "image_size", None), int):
        kwargs["image_size"] = model.image_size
    return kwargs


def rebuild_model(spec: dict[str, Any], *, pretrained: bool) -> nn.Module:
    """Build the model described by a :func:`build_spec` record: backbone, head, freeze policy.

    Args:
        spec: The record, as stored in a checkpoint.
        pretrained: Load the backbone's recorded weights (needed when the checkpoint holds only
            the head); otherwise start from random weights that the checkpoint then overwrites.

    Raises:
        ValueError: the record names no architecture, or names weights that cannot be rebuilt.
    """
    arch = spec.get("arch")
    if not isinstance(arch, str):
        raise ValueError(
            "the checkpoint does not say how its model was built (no 'arch' in its build record): "
            "it was saved from a model not made by vt.create_model; build that model yourself, with "
            "the same head, and pass it: vt.load_model(path, model=model)"
        )
    weights: Weights = None
    if pretrained:
        recorded = spec.get("weights")
        if not recorded:
            raise ValueError(
                f"the checkpoint holds only the head of a {arch!r} whose backbone had random weights, "
                f"which cannot be rebuilt; save full checkpoints (head_only=False) for such models"
            )
        weights = recorded[len("file:") :] if recorded.startswith("file:") else recorded
    kwargs_key = "builder_kwargs" if pretrained else "random_init_kwargs"
    model = create_model(arch, weights=weights, progress=False, **spec.get(kwargs_key, {}))
    return apply_head_record(model, spec)


def apply_head_record(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Give a backbone the head and freeze policy that a :func:`build_spec` record describes.

    The second half of :func:`rebuild_model`, also used for backbones vggtransfer cannot build
    itself (a user's factory), so that they get exactly the layout a checkpoint's weights fit.
    """
    from ._freeze import freeze_features
    from ._heads import append_classifier, replace_classifier

    head = spec.get("head")
    if head:
        options = {"hidden": tuple(head["hidden"]), "dropout": head["dropout"]}
        if head["method"] == "append":
            model = append_classifier(model, head["num_classes"], **options)
        else:
            model = replace_classifier(
                model,
                head["num_classes"],
                keep_hidden=head.get("keep_hidden", False),
                # Files from before this option kept such dropout: rebuild their layout.
                keep_input_dropout=head.get("keep_input_dropout", True),
                **options,
            )
    freeze = spec.get("freeze")
    if freeze:
        freeze_features(model, batchnorm=freeze["batchnorm"])
    return model


def _check_arch(arch: object) -> str:
    if not isinstance(arch, str):
        raise TypeError(
            f"create_model: expected arch to be a model name (str) but got {type(arch).__name__}; "
            f"to use your own nn.Module, pass it straight to freeze_features/replace_classifier"
        )
    known = classification_models()
    if arch not in known:
        hint = did_you_mean(arch, known)
        raise ValueError(
            f"create_model: unknown arch {arch!r}; {hint}expected one of torchvision's "
            f"classification models ({len(known)} names, see vt.classification_models())"
        )
    return arch


def _resolve_weights(arch: str, weights: object) -> WeightsEnum | Path | None:
    """Turn the many accepted spellings of ``weights`` into an enum member, a file, or None."""
    if weights is None:
        return None
    enum_cls = get_model_weights(arch)
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum_cls):
            raise ValueError(
                f"create_model: weights {weights!r} belong to another architecture; expected a "
                f"member of {enum_cls.__name__} for {arch!r}, e.g. {enum_cls.__name__}.DEFAULT"
            )
        return weights
    if isinstance(weights, os.PathLike):
        return Path(weights)
    if not isinstance(weights, str):
        raise TypeError(
            f"create_model: expected weights to be a str, a WeightsEnum, a path or None but got "
            f"{type(weights).__name__}"
        )
    if _looks_like_path(weights):
        return Path(weights)
    name = weights.split(".", 1)[1] if weights.startswith(f"{enum_cls.__name__}.") else weights
    try:
        return enum_cls[name]
    except KeyError:
        choices = ["DEFAULT", *enum_cls.__members__]
        close = difflib.get_close_matches(name.upper(), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"create_model: weights {weights!r} do not exist for {arch!r}; expected one of "
            f"{', '.join(repr(c) for c in dict.fromkeys(choices))}, None for random "
            f"initialisation, or a path to a local .pth file.{hint}"
        ) from None


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith(_WEIGHTS_FILE_SUFFIXES) or Path(text).exists()


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torch.hub caches, and looks for, the file of ``weights``.

    That is ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``. On a machine without
    internet, copy the downloaded file there and ``create_model`` finds it.

    Example:
        >>> import vggtransfer as vt
        >>> from torchvision.models import VGG16_BN_Weights
        >>> vt.cached_weights_path(VGG16_BN_Weights.DEFAULT).name
        'vgg16_bn-6c64b313.pth'
    """
    filename: str = os.path.basename(urllib.parse.urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _fetch_and_verify(arch: str, weights: WeightsEnum, *, progress: bool) -> None:
    """Download ``weights`` into the cache if needed and check the file with the safe unpickler.

    torchvision's builders read the cached file with the full unpickler; reading it here first
    with ``weights_only=True`` means a file that could run code is refused before that happens.
    """
    cache_file = cached_weights_path(weights)
    try:
        torch.hub.load_state_dict_from_url(
            weights.url, progress=progress, check_hash=True, map_location="cpu", weights_only=True
        )
    except _DOWNLOAD_ERRORS as exc:
        raise WeightsNotAvailableError(_download_help(arch, weights, cache_file, exc)) from None
    except pickle.UnpicklingError:
        raise ValueError(
            f"refusing to load the cached weights file {str(cache_file)!r}: it is not a plain "
            f"tensor file and would need the full pickle loader, which can run arbitrary code. "
            f"Delete it and download it again, or pass a trusted local file with weights=PATH"
        ) from None
    except RuntimeError as exc:
        if "invalid hash value" in str(exc):
            raise WeightsNotAvailableError(_download_help(arch, weights, cache_file, exc)) from None
        raise ValueError(
            f"cannot read the cached weights file {str(cache_file)!r} ({exc}); it is probably "
            f"truncated. Delete it and run again to download it afresh"
        ) from None


def _download_help(arch: str, weights: WeightsEnum, cache_file: Path, exc: BaseException) -> str:
    name = f"{type(weights).__name__}.{weights.name}"
    return (
        f"could not download the pretrained weights {name} for {arch!r} ({exc}).\n"
        f"  URL:        {weights.url}\n"
        f"  cache file: {cache_file}  (under TORCH_HOME={Path(torch.hub.get_dir()).parent})\n"
        f"To fix it, do one of:\n"
        f"  - download the URL on a machine with internet access and copy the file to the cache "
        f"file path above;\n"
        f"  - pass the file directly: create_model({arch!r}, weights='/path/to/{cache_file.name}');\n"
        f"  - use weights=None to start from random weights (no transfer learning)."
    )
