"""Progress output: a tqdm bar on a terminal, one line per epoch elsewhere.

:func:`make_progress` serves ``Trainer.fit``; :func:`task_bar` the other long passes (a report's
evaluation, the command's predictions).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

__all__ = ["Progress", "Silent", "make_progress", "task_bar"]


class Progress(Protocol):
    """What the training loop reports; each implementation decides what to show."""

    def start_epoch(self, epoch: int, epochs: int, steps: int | None, phase: str) -> None: ...

    def step(self, loss: float | None, samples: int) -> None: ...

    def end_epoch(self, record: dict[str, float]) -> None: ...

    def message(self, text: str) -> None: ...


class Silent:
    """``progress=False``: nothing at all."""

    def start_epoch(self, epoch: int, epochs: int, steps: int | None, phase: str) -> None:
        pass

    def step(self, loss: float | None, samples: int) -> None:
        pass

    def end_epoch(self, record: dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def format_record(record: dict[str, float], epochs: int) -> str:
    """``epoch 3/10  train loss 0.2134 acc 91.20%  val loss 0.2503 acc 90.00%  lr 1e-03  12.3s``."""
    parts = [f"epoch {int(record['epoch'])}/{epochs}"]
    for split in ("train", "val"):
        if f"{split}_loss" in record:
            parts.append(
                f"{split} loss {record[f'{split}_loss']:.4f} acc {100 * record[f'{split}_accuracy']:.2f}%"
            )
    if "lr" in record:
        parts.append(f"lr {record['lr']:.0e}")
    if "features_lr" in record:
        parts.append(f"features lr {record['features_lr']:.0e}")
    if "time_s" in record:
        parts.append(f"{record['time_s']:.1f}s")
    return "  ".join(parts)


class Lines:
    """One concise line per epoch: for logs, notebooks and pipes where a bar would garble."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.epochs = 0

    def start_epoch(self, epoch: int, epochs: int, steps: int | None, phase: str) -> None:
        self.epochs = epochs

    def step(self, loss: float | None, samples: int) -> None:
        pass

    def end_epoch(self, record: dict[str, float]) -> None:
        print(format_record(record, self.epochs), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class Bar:
    """A tqdm bar per epoch with the running loss and throughput in images per second."""

    def __init__(self, tqdm: Any, stream: TextIO) -> None:
        self.tqdm = tqdm
        self.stream = stream
        self.bar: Any = None
        self.epochs = 0
        self.loss_sum = 0.0
        self.seen = 0
        self.started = 0.0

    def start_epoch(self, epoch: int, epochs: int, steps: int | None, phase: str) -> None:
        self.epochs = epochs
        self.loss_sum, self.seen, self.started = 0.0, 0, time.perf_counter()
        description = f"{phase} {epoch}/{epochs}" if epochs else phase
        # Redraw on every step: an epoch on cached features can last less than tqdm's default
        # 0.1 s refresh interval, and would otherwise never show its loss and throughput.
        self.bar = self.tqdm(
            total=steps,
            desc=description,
            file=self.stream,
            leave=False,
            dynamic_ncols=True,
            mininterval=0,
            miniters=1,
        )

    def step(self, loss: float | None, samples: int) -> None:
        self.seen += samples
        postfix = {"img/s": f"{self.seen / max(time.perf_counter() - self.started, 1e-9):.0f}"}
        if loss is not None and math.isfinite(loss):
            self.loss_sum += loss * samples
            postfix["loss"] = f"{self.loss_sum / self.seen:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)  # redraws, with the postfix

    def end_epoch(self, record: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
        self.tqdm.write(format_record(record, self.epochs), file=self.stream)

    def message(self, text: str) -> None:
        self.tqdm.write(text, file=self.stream)


def make_progress(progress: bool, stream: TextIO | None = None) -> Progress:
    """A bar when tqdm is installed and ``stream`` is a terminal, lines otherwise, or nothing."""
    if not progress:
        return Silent()
    stream = stream or sys.stderr
    if stream.isatty():
        try:
            from tqdm.auto import tqdm
        except ModuleNotFoundError:
            pass  # the optional "progress" extra is not installed: lines are just as informative
        else:
            return Bar(tqdm, stream)
    return Lines(stream)


@contextmanager
def task_bar(
    total: int | None, description: str, *, enabled: bool = True, stream: TextIO | None = None
) -> Iterator[Callable[[int], None]]:
    """A tqdm bar of ``total`` items, advanced by the function it yields; silent off a terminal.

    Off a terminal (a log file, CI) or without tqdm the pass shows nothing: its result is printed
    when it ends, and a line per batch would only bury it.
    """
    stream = stream or sys.stderr
    bar: Any = None
    if enabled and stream.isatty():
        try:
            from tqdm.auto import tqdm
        except ModuleNotFoundError:
            pass
        else:
            bar = tqdm(
                total=total, desc=description, file=stream, leave=False, dynamic_ncols=True, unit="img"
            )
    try:
        yield (bar.update if bar is not None else lambda _: None)
    finally:
        if bar is not None:
            bar.close()
