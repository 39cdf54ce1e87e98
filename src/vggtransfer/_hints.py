"""The "did you mean ...?" of an error about an unknown name."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["did_you_mean"]


def did_you_mean(word: str, choices: Sequence[str], *, prefix: str = "") -> str:
    """``"did you mean 'a', 'b'? "`` for the up to 3 choices closest to ``word``, or ``""``.

    Example:
        >>> did_you_mean("VGG17", ["vgg16", "resnet18"])
        "did you mean 'vgg16'? "
    """
    # Case-blind, so that "VGG16" finds "vgg16"; the choices are named as they are spelt.
    spelt = {choice.lower(): choice for choice in choices}
    close = [spelt[c] for c in difflib.get_close_matches(word.lower(), list(spelt), n=3)]
    return f"did you mean {', '.join(repr(prefix + c) for c in close)}? " if close else ""
