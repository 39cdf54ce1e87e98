"""The picture of a comparison: validation accuracy against feature-pass time, one point per backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_comparison"]


def plot_comparison(
    plt: Any, points: list[tuple[str, float, float]], best: str | None, failed: list[str], path: Path
) -> None:
    """Draw ``(name, feature-pass seconds, validation accuracy)`` points into the PNG ``path``.

    The best backbone is a larger orange star; backbones that failed are listed under the plot.
    """
    figure, axis = plt.subplots(figsize=(7, 4.8))
    # Backbones of about the same accuracy sit on one line, where labels to the right of their
    # points would run into the next point: those get labels above and below in turn instead.
    rows: dict[int, int] = {}
    for name, seconds, accuracy in sorted(points, key=lambda p: p[1]):
        chosen = name == best
        row = round(100 * accuracy / 3)  # within about 3 points
        shared = sum(round(100 * a / 3) == row for _, _, a in points) > 1
        turn = rows[row] = rows.get(row, -1) + 1
        axis.scatter(
            [seconds],
            [100 * accuracy],
            s=160 if chosen else 50,
            marker="*" if chosen else "o",
            color="tab:orange" if chosen else "tab:blue",
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
        )
        axis.annotate(
            f"{name} (best)" if chosen else name,
            (seconds, 100 * accuracy),
            xytext=(0, 9 if turn % 2 == 0 else -9) if shared else (9, 0),
            textcoords="offset points",
            ha="center" if shared else "left",
            va=("bottom" if turn % 2 == 0 else "top") if shared else "center",
            fontsize=9,
            fontweight="bold" if chosen else "normal",
        )
    times = [seconds for _, seconds, _ in points]
    log = bool(times) and min(times) > 0 and max(times) / min(times) > 30
    if log:
        axis.set_xscale("log")  # a rerun's disk reads next to fresh passes: seconds over decades
    if points:
        axis.margins(x=0.2, y=0.15)
        low, high = axis.get_ylim()  # accuracy is a percentage: no axis far above 100 or below 0
        axis.set_ylim(max(low, 0.0), min(high, 100.0 + 0.05 * (high - low)))
        if not log:  # times from zero, so that their ratios read off the plot; room for the labels
            axis.set_xlim(0.0, max(max(times) * 1.35, 1e-3))
    else:  # empty axes, but with sensible ranges rather than matplotlib's -0.06 to 0.06
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 100)
        axis.text(0.5, 0.5, "no backbone completed", transform=axis.transAxes, ha="center", va="center")
    axis.set_xlabel("feature pass (s): computing or reading the cached features once")
    axis.set_ylabel("validation accuracy (%)")
    axis.set_title("Backbones compared: accuracy against feature-pass time")
    axis.grid(alpha=0.3)
    if failed:
        figure.text(0.01, 0.01, "failed: " + ", ".join(failed), fontsize=8, color="tab:red")
    figure.tight_layout(rect=(0, 0.04 if failed else 0, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
