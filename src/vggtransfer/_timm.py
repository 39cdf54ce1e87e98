"""timm backbones: ``create_model("timm:NAME")`` builds a model of the timm library when it is installed.

timm is an optional extra (``pip install 'vggtransfer[timm]'``) and is imported only here, only
when a ``"timm:"`` name is used or a timm model is preprocessed: ``import vggtransfer`` stays light.

A timm model describes itself in ``model.pretrained_cfg``: which submodule is its classifier
(``"fc"``, ``"head"``, ``"head.fc"`` for ConvNeXt), and how its images were preprocessed (input
size, crop fraction, interpolation, mean and std). The head protocol (``_heads``) and
``default_transform`` read that declaration instead of guessing. Weights come from the Hugging
Face hub (or a URL), downloaded by timm itself; a failed download becomes
:class:`WeightsNotAvailableError` with instructions, as for torchvision.
"""

from __future__ import annotations

import difflib
import http.client
import importlib
import math
import pickle
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ._hints import did_you_mean
from ._models import WeightsNotAvailableError
from ._state_dict import as_state_dict, read_state_dict

__all__ = [
    "TIMM_PREFIX",
    "build_timm_model",
    "check_timm_arch",
    "import_timm",
    "read_weights_file",
    "timm_arch_record",
    "timm_eval_settings",
    "timm_pretrained_tags",
]

#: What starts a timm model name in ``create_model``.
TIMM_PREFIX = "timm:"

# What a failed download looks like. The Hugging Face hub's errors (offline mode, entry not in
# the cache, HTTP errors) and urllib's are all OSError subclasses.
_DOWNLOAD_ERRORS = (OSError, http.client.HTTPException)

# The resampling modes ImageTransform can apply, by timm's name for them.
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def import_timm(what: str) -> ModuleType:
    """The ``timm`` module; ``what`` names the caller's object in the error when it is missing.

    Raises:
        ModuleNotFoundError: timm is not installed, with the command that installs it.
    """
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"{what} needs timm, which is not installed; install it with: pip install 'vggtransfer[timm]'",
            name="timm",
        ) from None


def timm_pretrained_tags(arch_name: str) -> list[str]:
    """The pretrained tags timm knows for ``arch_name`` (``['a1_in1k', ...]`` for resnet18)."""
    timm = import_timm(f"create_model({TIMM_PREFIX}{arch_name!r})")
    return [name.split(".", 1)[1] for name in timm.list_pretrained(f"{arch_name}.*")]


def check_timm_arch(arch: str) -> str:
    """The timm model name in ``arch`` (``"timm:resnet18.a1_in1k"`` -> ``"resnet18.a1_in1k"``).

    Raises:
        ModuleNotFoundError: timm is not installed.
        ValueError: timm has no such architecture, or no such pretrained tag for it.
    """
    timm = import_timm(f"create_model({arch!r})")
    name = arch[len(TIMM_PREFIX) :]
    arch_name, _, tag = name.partition(".")
    if not timm.is_model(arch_name):
        known = timm.list_models()
        hint = did_you_mean(arch_name, known, prefix=TIMM_PREFIX)
        raise ValueError(
            f"create_model: unknown timm model {arch!r}; {hint}expected 'timm:' followed by one of "
            f"timm's {len(known)} architectures (see timm.list_models())"
        )
    if tag:
        try:
            timm.get_pretrained_cfg(name)
        except RuntimeError:
            tags = timm_pretrained_tags(arch_name)
            close = difflib.get_close_matches(tag, tags, n=1)
            hint = f" Did you mean {f'{TIMM_PREFIX}{arch_name}.{close[0]}'!r}?" if close else ""
            raise ValueError(
                f"create_model: timm has no pretrained tag {tag!r} for {arch_name!r}; expected one "
                f"of {', '.join(repr(t) for t in tags) or 'none (it has no pretrained weights)'}, "
                f"or no tag for timm's default.{hint}"
            ) from None
    return name


def build_timm_model(name: str, *, pretrained: bool, builder_kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=...)``, with download failures explained.

    Raises:
        WeightsNotAvailableError: ``pretrained`` and the weights could not be downloaded.
        ValueError: ``pretrained`` but timm has no weights for ``name``, or the downloaded file
            is not a plain tensor file.
        ModuleNotFoundError: timm is not installed.
    """
    timm = import_timm(f"create_model({TIMM_PREFIX + name!r})")
    try:
        model: nn.Module = timm.create_model(name, pretrained=pretrained, **builder_kwargs)
    except pickle.UnpicklingError:
        raise ValueError(
            f"refusing timm's pretrained weights file for {TIMM_PREFIX + name!r}: it is not a plain "
            f"tensor file and would need the full pickle loader, which can run arbitrary code. Delete "
            f"it from the Hugging Face cache, or pass a trusted local file with weights=PATH"
        ) from None
    except _DOWNLOAD_ERRORS as exc:
        if not pretrained:
            raise
        raise WeightsNotAvailableError(_download_help(name, exc)) from None
    except RuntimeError as exc:
        if not str(exc).startswith("No pretrained weights exist"):
            raise
        arch_name = name.split(".")[0]
        raise ValueError(
            f"create_model: timm has no pretrained weights for {TIMM_PREFIX + name!r} (its pretrained_cfg "
            f"names no file, URL or Hugging Face hub id); expected weights=None for random weights, a "
            f"local file with weights=PATH, or a tagged name from timm.list_pretrained({arch_name + '.*'!r})"
        ) from None
    return model


def _download_help(name: str, exc: BaseException) -> str:
    cfg: dict[str, Any] = {}
    try:
        timm = import_timm("create_model")
        cfg = dict(timm.get_pretrained_cfg(name, allow_unregistered=True).to_dict())
    except (RuntimeError, AttributeError):
        pass
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    source = f"Hugging Face hub repository {hub_id}" if hub_id else f"URL {url}"
    cache = _hub_cache()
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    arch = TIMM_PREFIX + name
    return (
        f"could not download timm's pretrained weights for {arch!r} ({reason[:300]}).\n"
        f"  source: {source}\n"
        f"  cache:  {cache}  (the Hugging Face cache, HF_HOME / HF_HUB_CACHE)\n"
        f"To fix it, do one of:\n"
        f"  - run the same create_model call once on a machine with internet access and copy its "
        f"Hugging Face cache folder to the cache path above;\n"
        f"  - download the weights file (model.safetensors or pytorch_model.bin) and pass it "
        f"directly: create_model({arch!r}, weights='/path/to/model.safetensors');\n"
        f"  - use weights=None to start from random weights (no transfer learning)."
    )


def _hub_cache() -> str:
    try:
        constants = importlib.import_module("huggingface_hub.constants")
        return str(constants.HF_HUB_CACHE)
    except (ModuleNotFoundError, AttributeError):
        return "~/.cache/huggingface/hub"


def timm_arch_record(name: str, model: nn.Module) -> str:
    """The ``arch`` to record: ``name`` with the pretrained tag timm resolved for it.

    Pinning the tag means a checkpoint rebuilds the same configuration and weights even if a
    later timm release changes which tag is its default.
    """
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    if "." in name or not isinstance(tag, str) or not tag:
        return TIMM_PREFIX + name
    return f"{TIMM_PREFIX}{name}.{tag}"


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A local weights file: ``.safetensors`` (what the Hugging Face hub ships) or a ``.pth`` state dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a plain state dict.
    """
    if path.suffix != ".safetensors":
        return read_state_dict(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist; expected a path to a .safetensors or .pth "
            f"file of the same architecture"
        )
    try:
        safetensors_torch = importlib.import_module("safetensors.torch")
        loaded = safetensors_torch.load_file(str(path), device="cpu")
    except Exception as exc:  # a damaged file: safetensors raises its own error types
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot read {str(path)!r} as a safetensors file: {reason}. It may be truncated or of "
            f"another format"
        ) from None
    return as_state_dict(loaded, source=str(path))


def timm_eval_settings(model: nn.Module) -> dict[str, Any] | None:
    """:class:`ImageTransform` settings of a timm model's evaluation preprocessing; None for others.

    timm's evaluation transform (``crop_mode="center"``) resizes the shorter side to
    ``floor(size / crop_pct)`` and centre-crops ``size``, which is what ImageTransform does.

    Raises:
        ValueError: the preprocessing cannot be represented: a crop mode other than ``center``,
            a resampling mode other than bilinear, bicubic or nearest, a non-square or
            non-RGB input, or ``crop_pct > 1``.
    """
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        return None
    timm = import_timm("default_transform of a timm model")
    config = timm.data.resolve_model_data_config(model)
    channels, height, width = config["input_size"]
    crop_pct, crop_mode, interpolation = config["crop_pct"], config["crop_mode"], config["interpolation"]
    problem = None
    if channels != 3 or height != width:
        problem = f"input_size={tuple(config['input_size'])} (expected 3 channels and a square image)"
    elif crop_mode != "center":
        problem = f"crop_mode={crop_mode!r} (expected 'center': resize the shorter side, then crop)"
    elif interpolation not in _INTERPOLATIONS:
        problem = f"interpolation={interpolation!r} (expected one of {', '.join(map(repr, _INTERPOLATIONS))})"
    elif not 0 < crop_pct <= 1:
        problem = f"crop_pct={crop_pct} (expected a crop fraction in (0, 1])"
    if problem:
        raise ValueError(
            f"default_transform: the preprocessing of timm model {type(model).__name__} cannot be "
            f"represented by vt.ImageTransform: {problem}. Pass your own transform, e.g. "
            f"Trainer(model, transform=vt.ImageTransform(size=..., resize=..., mean=..., std=..., "
            f"interpolation='bicubic'))"
        )
    return {
        "size": int(height),
        "resize": math.floor(height / crop_pct),  # timm's own rounding of the resize size
        "mean": tuple(float(m) for m in config["mean"]),
        "std": tuple(float(s) for s in config["std"]),
        "interpolation": interpolation,
    }
