"""matplotlib, the optional ``plots`` extra, imported only when something is drawn."""

from __future__ import annotations

from typing import Any

__all__ = ["pyplot"]


def pyplot(caller: str) -> Any:
    """Pyplot on the file-only Agg backend, or an error naming ``caller`` and what to install.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f'{caller} needs matplotlib, which is not installed; install it with: pip install "vggtransfer[plots]"',
            name="matplotlib",
        ) from None
    return plt
