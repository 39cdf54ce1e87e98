"""The head-finding protocol: one way to find, replace and extend a classifier on every family.

torchvision puts the classifier under one of four names: ``classifier`` (VGG, AlexNet, MobileNet,
EfficientNet, ConvNeXt, DenseNet, MNASNet, SqueezeNet, MaxViT), ``fc`` (ResNet, RegNet,
GoogLeNet, Inception, ShuffleNet), ``heads`` (ViT) and ``head`` (Swin). The head is either one
``nn.Linear`` or an ``nn.Sequential`` whose *projections* (``nn.Linear``, or the 1x1
``nn.Conv2d`` of SqueezeNet) are interleaved with activations, dropout and, before the first
projection, shape-preparing layers (ConvNeXt's LayerNorm2d + Flatten, MaxViT's pool + Flatten +
LayerNorm). Replacing a head keeps that preparation and swaps everything from the first
projection on, so the new head receives exactly what the old one did. Dropout before the first
projection (EfficientNet's and MobileNet V2's ``Dropout(0.2)``) is regularisation of the old
head, not preparation, and goes with it: the new head brings its own dropout.

timm models say where their classifier is (``pretrained_cfg["classifier"]``: ``"fc"``, ``"head"``,
``"classifier"``, or a dotted path such as ConvNeXt's ``"head.fc"``, whose parent holds the pooling
and normalisation). That declaration is used instead of the search above, so the head's name may be
a dotted path: it is also the state-dict prefix of the head (``head.fc.``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from ._spec import build_spec, record

__all__ = [
    "HEAD_ATTRIBUTES",
    "AppendedClassifier",
    "Head",
    "append_classifier",
    "declares_classifier",
    "find_classifier",
    "is_appended",
    "known_output_count",
    "locate_head",
    "output_count",
    "replace_classifier",
]

M = TypeVar("M", bound=nn.Module)

#: Attribute names searched, in order, for a model's classifier head.
HEAD_ATTRIBUTES = ("classifier", "fc", "heads", "head")


@dataclass(frozen=True)
class Head:
    """Where a model's classifier head is and what it is made of."""

    name: str
    module: nn.Module
    layers: tuple[nn.Module, ...]
    projections: tuple[int, ...]  # indices into ``layers``


def _is_projection(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    # SqueezeNet classifies with a 1x1 convolution followed by global pooling.
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1)


def locate_head(model: nn.Module, caller: str) -> Head:
    """The classifier head of ``model``; ``caller`` names the public function in errors.

    Raises:
        TypeError: ``model`` is not a module, or has no recognisable head.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: expected model to be an nn.Module but got {type(model).__name__}")
    declared = _declared_head(model, caller)
    if declared is not None:
        return declared
    for name in HEAD_ATTRIBUTES:
        head = _head_at(name, getattr(model, name, None))
        if head is not None:
            return head
    found = {
        name: type(getattr(model, name)).__name__
        for name in HEAD_ATTRIBUTES
        if isinstance(getattr(model, name, None), nn.Module)
    }
    found_text = (
        ", ".join(f"{name}={kind}" for name, kind in found.items()) if found else "none of those attributes"
    )
    raise TypeError(
        f"{caller}: cannot find the classifier head of {type(model).__name__}; expected an "
        f"attribute named one of {', '.join(HEAD_ATTRIBUTES)} that is an nn.Linear or an "
        f"nn.Sequential containing nn.Linear layers, but found {found_text}. Give your model a "
        f"`classifier` (nn.Linear or nn.Sequential ending in nn.Linear) and a `features` module"
    )


def _head_at(name: str, module: object) -> Head | None:
    """``module`` as a head: an ``nn.Linear``, or an ``nn.Sequential`` with a projection in it."""
    if isinstance(module, nn.Linear):
        return Head(name, module, (module,), (0,))
    if isinstance(module, nn.Sequential):
        layers = tuple(module.children())
        projections = tuple(i for i, layer in enumerate(layers) if _is_projection(layer))
        if projections:
            return Head(name, module, layers, projections)
    return None


def declares_classifier(model: nn.Module) -> bool:
    """Whether ``model`` says where its classifier is, as timm models do in ``pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and cfg.get("classifier") is not None


def _declared_head(model: nn.Module, caller: str) -> Head | None:
    """The head at the path ``model`` declares for its classifier (timm models), or None.

    timm names it ``"fc"``, ``"head"``, ``"classifier"`` or, for heads with their own pooling
    and normalisation (ConvNeXt), a dotted path such as ``"head.fc"``.
    """
    if not declares_classifier(model):
        return None
    path = model.pretrained_cfg["classifier"]  # type: ignore[index]
    if not isinstance(path, str):
        names = tuple(path) if isinstance(path, (list, tuple)) else path
        raise TypeError(
            f"{caller}: {type(model).__name__} declares the classifiers {names!r} "
            f"(pretrained_cfg['classifier']), as timm's distilled models do; vggtransfer needs a "
            f"model with one classifier head: use the variant without distillation"
        )
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None  # the declaration is stale: search the usual attributes
    # A bare 1x1 convolution is a classifier too (timm's DLA), with pooling left to replace_classifier.
    if _is_projection(module) and not isinstance(module, nn.Linear):
        return Head(path, module, (module,), (0,))
    head = _head_at(path, module)
    if head is None:
        raise TypeError(
            f"{caller}: the classifier that {type(model).__name__} declares "
            f"(pretrained_cfg['classifier'] = {path!r}) is a {type(module).__name__}; expected an "
            f"nn.Linear or an nn.Sequential containing nn.Linear layers. A timm model built with "
            f"num_classes=0 has no classifier: build it with num_classes >= 1 (the default)"
        )
    return head


def find_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """Return the attribute name and module of ``model``'s classifier head.

    For a timm model the name is the path its ``pretrained_cfg["classifier"]`` declares, which
    may be dotted (``"head.fc"`` for ConvNeXt): ``model.get_submodule(name)`` is the head.

    Raises:
        TypeError: no attribute named ``classifier``, ``fc``, ``heads`` or ``head`` holds an
            ``nn.Linear`` or an ``nn.Sequential`` with one, or the classifier a timm model
            declares is not one (``num_classes=0``) or is several (distilled models).

    Example:
        >>> import vggtransfer as vt
        >>> name, head = vt.find_classifier(vt.create_model("resnet18", weights=None))
        >>> name, head.in_features
        ('fc', 512)

    """
    head = locate_head(model, "find_classifier")
    return head.name, head.module


def known_output_count(model: nn.Module) -> int | None:
    """:func:`output_count`, or None for a model whose head cannot be found (the user's own)."""
    try:
        return output_count(model)
    except TypeError:
        return None


def output_count(model: nn.Module, caller: str = "Trainer") -> int:
    """How many classes ``model`` predicts: the width of its head's last projection."""
    head = build_spec(model).get("head")
    if head:
        return int(head["num_classes"])
    found = locate_head(model, caller)
    return _out_features(found.layers[found.projections[-1]])


def _in_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels  # type: ignore[return-value]


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels  # type: ignore[return-value]


def _check_head_options(caller: str, num_classes: object, hidden: object, dropout: object) -> tuple[int, ...]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"{caller}: expected num_classes to be an int but got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"{caller}: expected num_classes >= 1 but got {num_classes}")
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise TypeError(
            f"{caller}: expected hidden to be a sequence of layer widths such as (500,) or () but "
            f"got {hidden!r}"
        )
    widths = tuple(hidden)
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{caller}: expected every hidden width to be a positive int but got {hidden!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{caller}: expected dropout to be a probability in [0, 1) but got {dropout!r}")
    return widths


def _mlp(in_features: int, hidden: tuple[int, ...], num_classes: int, dropout: float) -> list[nn.Module]:
    """Linear - ReLU - Dropout for each hidden width, then the output Linear."""
    layers: list[nn.Module] = []
    width = in_features
    for next_width in hidden:
        layers += [nn.Linear(width, next_width), nn.ReLU(), nn.Dropout(dropout)]
        width = next_width
    layers.append(nn.Linear(width, num_classes))
    return layers


def _like(new: M, reference: nn.Module) -> M:
    """Put ``new`` on the device and dtype of ``reference``'s parameters."""
    param = next(reference.parameters(), None)
    return new if param is None else new.to(device=param.device, dtype=param.dtype)


def replace_classifier(
    model: M,
    num_classes: int,
    *,
    hidden: Sequence[int] = (500,),
    dropout: float = 0.3,
    keep_hidden: bool = False,
    keep_input_dropout: bool = False,
) -> M:
    """Replace the classifier head of ``model`` with a new one for ``num_classes`` classes, in place.

    This is the transfer-learning recipe's head swap: on VGG16 the 4096-wide classifier becomes
    ``Linear(25088, 500) - ReLU - Dropout(0.3) - Linear(500, num_classes)``. The input width is
    read from the model, so the same call works on every torchvision family (and on your own
    model with a ``features`` module and a ``classifier``).

    What is kept: the layers before the old head's first ``nn.Linear`` that prepare its input
    (ConvNeXt's LayerNorm2d and Flatten, MaxViT's pooling, Flatten and LayerNorm), with their
    weights. Dropout there (EfficientNet's and MobileNet V2's ``Dropout(0.2)``) is dropped, so
    every family gets exactly ``Linear - ReLU - Dropout - Linear``. With ``keep_hidden=True``
    everything before the last ``nn.Linear`` is kept as it was, dropout included.

    Args:
        model: The model to change.
        num_classes: Number of output classes.
        hidden: Widths of the new hidden layers; ``()`` gives a single ``nn.Linear``.
        dropout: Dropout probability after each hidden layer.
        keep_hidden: Keep the pretrained hidden fully-connected layers (VGG's two 4096-wide
            ones) and replace only what follows the last of them. With ``hidden=()`` this
            replaces just the final ``nn.Linear``.
        keep_input_dropout: Keep dropout found before the old head's first ``nn.Linear``, as
            vggtransfer 0.1's first releases did (checkpoints of those record no such option
            and are rebuilt with it).

    Returns:
        ``model`` itself, changed in place. The new layers are trainable, on the device and
        dtype of the old head.

    Raises:
        TypeError: the head cannot be found, or an option has the wrong type.
        ValueError: an option is out of range.

    Example:
        >>> import vggtransfer as vt
        >>> model = vt.replace_classifier(vt.create_model("vgg11", weights=None), 2)
        >>> model.classifier
        Sequential(
          (0): Linear(in_features=25088, out_features=500, bias=True)
          (1): ReLU()
          (2): Dropout(p=0.3, inplace=False)
          (3): Linear(in_features=500, out_features=2, bias=True)
        )
        >>> vt.replace_classifier(model, 3, hidden=(), keep_hidden=True).classifier[-1]
        Linear(in_features=500, out_features=3, bias=True)

    """
    widths = _check_head_options("replace_classifier", num_classes, hidden, dropout)
    head = locate_head(model, "replace_classifier")
    cut = head.projections[-1] if keep_hidden else head.projections[0]
    kept = list(head.layers[:cut])
    if not (keep_hidden or keep_input_dropout):  # the old head's own dropout is not input preparation
        kept = [layer for layer in kept if not isinstance(layer, _DropoutNd)]
    first_new = head.layers[cut]
    if isinstance(first_new, nn.Conv2d):
        # Pool and flatten so that the new Linear layers see [B, C]; the model's own
        # torch.flatten(x, 1) after the classifier then leaves [B, num_classes] unchanged.
        kept += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    new_layers = _mlp(_in_features(first_new), widths, num_classes, float(dropout))
    if not kept and len(new_layers) == 1 and isinstance(head.module, nn.Linear):
        new_head: nn.Module = new_layers[0]  # keep resnet.fc a plain Linear
    else:
        new_head = nn.Sequential(*kept, *new_layers)
    parent, _, attribute = head.name.rpartition(".")  # a dotted path (timm's "head.fc") sets a child's child
    setattr(model.get_submodule(parent), attribute, _like(new_head, head.module))
    record(
        model,
        head={
            "method": "replace",
            "num_classes": num_classes,
            "hidden": list(widths),
            "dropout": float(dropout),
            "keep_hidden": keep_hidden,
            "keep_input_dropout": keep_input_dropout,
        },
    )
    return model


class AppendedClassifier(nn.Sequential, Generic[M]):
    """What :func:`append_classifier` returns: ``net`` (the whole pretrained network), then ``classifier``.

    An ``nn.Sequential`` with two named children, so its state-dict keys are ``net.*`` and
    ``classifier.*``; typed so that ``append_classifier(vgg).net`` is known to be the VGG.
    """

    net: M
    classifier: nn.Sequential

    def __init__(self, net: M, classifier: nn.Sequential) -> None:
        super().__init__(OrderedDict(net=net, classifier=classifier))


def append_classifier(
    model: M,
    num_classes: int,
    *,
    hidden: Sequence[int] = (500,),
    dropout: float = 0.3,
) -> AppendedClassifier[M]:
    """Stack a new head for ``num_classes`` classes after the whole pretrained network.

    The other half of the recipe: the 1000-class ImageNet net stays intact and its logits feed
    ``Linear(1000, 500) - ReLU - Dropout(0.3) - Linear(500, num_classes)``. Use it when the
    pretrained classifier's outputs are informative for the new task; use
    :func:`replace_classifier` to discard them.

    Args:
        model: The network to extend; it must have a usable classifier head.
        num_classes: Number of output classes.
        hidden: Widths of the new hidden layers; ``()`` gives a single ``nn.Linear``.
        dropout: Dropout probability after each hidden layer.

    Returns:
        A new :class:`AppendedClassifier`, an ``nn.Sequential`` of ``net=model`` and
        ``classifier=head``. ``model`` is not copied: the result holds it as ``.net``.

    Raises:
        TypeError: the head cannot be found, or an option has the wrong type.
        ValueError: an option is out of range, or the model's classifier is unusable, as with
            ``VGG16_Weights.IMAGENET1K_FEATURES`` whose classifier is NaN-filled.

    Example:
        >>> import vggtransfer as vt
        >>> model = vt.append_classifier(vt.create_model("vgg11", weights=None), 2)
        >>> [name for name, _ in model.named_children()]
        ['net', 'classifier']
        >>> model.classifier[0]
        Linear(in_features=1000, out_features=500, bias=True)

    """
    widths = _check_head_options("append_classifier", num_classes, hidden, dropout)
    head = locate_head(model, "append_classifier")
    _refuse_unusable_classifier(model, head)
    out = _out_features(head.layers[head.projections[-1]])
    new_head = _like(nn.Sequential(*_mlp(out, widths, num_classes, float(dropout))), head.module)
    appended = AppendedClassifier(model, new_head)
    spec = build_spec(model)
    spec.pop("freeze", None)  # freezing describes the outer model; it is recorded when applied
    record(appended, **spec)
    record(
        appended,
        head={
            "method": "append",
            "num_classes": num_classes,
            "hidden": list(widths),
            "dropout": float(dropout),
        },
    )
    return appended


def _refuse_unusable_classifier(model: nn.Module, head: Head) -> None:
    spec = build_spec(model)
    weights = spec.get("weights") or ""
    with torch.no_grad():
        bad = sum(int((~torch.isfinite(p)).sum()) for p in head.module.parameters())
    # Checked by name too: the NaNs are only there once the file is loaded, and a head that
    # vggtransfer replaced since is new, hence usable.
    features_only = weights.endswith(".IMAGENET1K_FEATURES") and "head" not in spec
    if bad or features_only:
        source = f" (weights {weights})" if weights else ""
        raise ValueError(
            f"append_classifier: the classifier of this model is unusable{source}: "
            f"{bad} of its values are NaN or infinite, so its outputs carry no information. "
            f"Features-only weights such as VGG16_Weights.IMAGENET1K_FEATURES ship no classifier. "
            f"Use replace_classifier(model, num_classes) instead, which discards the old classifier."
        )


def is_appended(model: nn.Module) -> bool:
    """Whether ``model`` has the layout made by :func:`append_classifier`."""
    return isinstance(model, nn.Sequential) and [name for name, _ in model.named_children()] == [
        "net",
        "classifier",
    ]
