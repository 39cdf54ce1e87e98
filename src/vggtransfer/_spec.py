"""How a model was built, recorded on the model itself.

vggtransfer's builders (``create_model``, ``replace_classifier``, ``append_classifier``,
``freeze_features``) note what they did in a small JSON-compatible dict stored as a plain attribute
of the model. Checkpoints store it so that a model can be rebuilt without the code that made it.
A plain attribute survives ``copy.deepcopy`` and ``torch.save(model)`` and never enters the
state dict.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

__all__ = ["build_spec", "record"]

_SPEC_ATTR = "_vggtransfer_spec"


def build_spec(model: nn.Module) -> dict[str, Any]:
    """Return how vggtransfer built ``model``: arch, weights, head and freeze policy.

    The record is what checkpoints store to rebuild the model; it is empty for a model that
    vggtransfer did not build. The result is a copy: changing it changes nothing.

    Example:
        >>> import vggtransfer as vt
        >>> model = vt.freeze_features(vt.replace_classifier(vt.create_model("vgg11", weights=None), 2))
        >>> spec = vt.build_spec(model)
        >>> spec["arch"], spec["head"]["num_classes"], spec["freeze"]
        ('vgg11', 2, {'batchnorm': 'frozen'})
    """
    return copy.deepcopy(model.__dict__.get(_SPEC_ATTR, {}))


def record(model: nn.Module, **fields: Any) -> None:
    """Merge ``fields`` into the build record of ``model``; a value of None removes the field."""
    spec = model.__dict__.setdefault(_SPEC_ATTR, {})
    for key, value in fields.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = copy.deepcopy(value)
