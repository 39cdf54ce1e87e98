"""The "did you mean ...?" of an error about an unknown name."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["did_you_mean"]


def did_you_mean(word: str, choices: Sequence[str], *, prefix: str = "") -> str:
    """``"did you mean 'a', 'b'? "`` for the up to 3 choices closest to ``word``, or ``""``.

    Example:
        >>> did_you_mean("vgg17", ["vgg16", "resnet18"])
        "did you mean 'vgg16'? "
    """
    close = difflib.get_close_matches(word, choices, n=3)
    return f"did you mean {', '.join(repr(prefix + c) for c in close)}? " if close else ""
