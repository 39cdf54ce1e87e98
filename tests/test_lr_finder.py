"""Trainer.find_lr and LRFinder: the range test's curve, its suggestion, its plot, and a Trainer left as it was."""

from __future__ import annotations

import math
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import vggtransfer as vt
from helpers import blobs, trainer, weights_equal


def noisy(n: int = 48) -> TensorDataset:
    """Blobs with random labels: nothing to learn, so a large rate drives the loss up."""
    return TensorDataset(
        blobs(n).tensors[0], torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(3))
    )


def everything(t: vt.Trainer) -> dict[str, Any]:
    """What find_lr must leave as it was, as comparable copies (tensors cloned)."""

    def copied(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: copied(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copied(v) for v in value)
        return value

    return {
        "weights": copied(t.model.state_dict()),
        "grads": [(id(p.grad), None if p.grad is None else p.grad.clone()) for p in t.model.parameters()],
        "modes": [m.training for m in t.model.modules()],
        "optimizer": copied(t.optimizer.state_dict()),
        "scheduler": copied(t.scheduler.state_dict()) if t.scheduler is not None else None,
        "scaler": t.scaler.state_dict(),
        "counters": (t.epoch, t.global_step, t.history.to_dict()),
    }


def same(a: Any, b: Any) -> bool:
    """Bitwise equality of nested containers of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def drawing_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy that also draws from Python's and NumPy's generators, as augmentation code does."""
    random.random()
    np.random.rand()
    return F.cross_entropy(logits, targets)


@pytest.mark.parametrize("unfrozen", [False, True], ids=["cached-head", "fine-tuning-on-images"])
def test_find_lr_after_fit_restores_every_state_bitwise(unfrozen: bool) -> None:
    calls: list[int] = []

    def schedule(epoch: int) -> float:
        calls.append(epoch)
        return 0.5**epoch

    t = trainer(scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule), loss_fn=drawing_loss)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)  # its scale moves every step
    if unfrozen:
        t.unfreeze_features(lr=1e-4)  # two groups, and BatchNorm statistics that change in training
    t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)  # Adam moments, gradients, a stepped schedule
    t.model.eval()  # a mode that find_lr's training steps must not leave behind
    before, scheduled = everything(t), len(calls)
    seed_everything(7)
    expected = draws()
    seed_everything(7)
    result = t.find_lr(blobs(16), start_lr=1e-4, end_lr=1.0, steps=4, batch_size=8, num_workers=0)
    assert len(result.lrs) == 4  # it trained (and so changed everything) for four steps
    assert draws() == expected  # torch, Python and NumPy generators as if nothing had run
    assert same(everything(t), before)
    assert len(calls) == scheduled  # the schedule was never stepped


@pytest.mark.parametrize("unfrozen", [False, True], ids=["cached-head", "fine-tuning-on-images"])
def test_fit_after_find_lr_gives_bitwise_the_same_weights_as_fit_alone(unfrozen: bool) -> None:
    runs = []
    for find in (True, False):
        t = trainer()
        if unfrozen:
            t.unfreeze_features(lr=1e-4)
        t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
        if find:
            t.find_lr(blobs(16), start_lr=1e-3, end_lr=10.0, steps=5, batch_size=8, num_workers=0)
        history = t.fit(blobs(16), epochs=2, batch_size=8, num_workers=0)
        runs.append((t, history["train_loss"]))
    (with_test, losses), (alone, expected) = runs
    assert weights_equal(with_test.model, alone.model)
    assert losses == expected


class Failing:
    """Cross-entropy that raises ``error`` on call number ``at`` (counting from when it is armed)."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error, self.calls, self.at = error, 0, 0

    def arm(self, at: int) -> None:
        self.calls, self.at = 0, at

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise self.error("the loss failed")
        return F.cross_entropy(logits, targets)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_state_is_restored_when_the_loss_raises_mid_test(error: type[BaseException]) -> None:
    loss = Failing(error)
    t = trainer(loss_fn=loss)
    t.fit(blobs(32), epochs=1, batch_size=8, num_workers=0)
    before = everything(t)
    seed_everything(3)
    expected = draws()
    seed_everything(3)
    loss.arm(at=4)  # three steps applied, then the fourth loss raises
    with pytest.raises(error, match="^the loss failed$"):
        t.find_lr(blobs(32), start_lr=1e-2, end_lr=10.0, steps=10, batch_size=8, num_workers=0)
    assert same(everything(t), before)
    assert draws() == expected


def test_every_group_follows_the_exponential_rates_keeping_its_ratio() -> None:
    seen: list[tuple[float, ...]] = []
    t = trainer(lr=1e-3)
    t.unfreeze_features(lr=1e-4)  # the features at a tenth of the head's rate

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(group["lr"] for group in t.optimizer.param_groups))
        return F.cross_entropy(logits, targets)

    t.loss_fn = loss_fn
    result = t.find_lr(blobs(32), start_lr=1e-5, end_lr=1e-1, steps=9, batch_size=8, num_workers=0)
    expected = [1e-5 * (1e-1 / 1e-5) ** (i / 8) for i in range(9)]
    assert result.lrs == pytest.approx(expected, rel=1e-12) and result.lrs[0] == 1e-5
    assert len(result.losses) == len(result.lrs) == 9  # 9 steps over 4 batches per epoch: three epochs
    assert [head for head, _ in seen] == result.lrs
    assert [features / head for head, features in seen] == pytest.approx([0.1] * 9)
    assert [group["lr"] for group in t.optimizer.param_groups] == [1e-3, 1e-4]
    assert all(math.isfinite(loss) for loss in result.losses)
    assert isinstance(result.suggestion, float) and 1e-5 <= result.suggestion <= 1e-1


def test_a_diverging_loss_ends_the_test_early_without_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    t = trainer(progress=True)
    result = t.find_lr(noisy(), start_lr=1e-5, end_lr=1e4, steps=60, batch_size=8, num_workers=0)
    smoothed = result.smoothed
    assert 2 < len(result.lrs) < 60 and len(result.losses) == len(result.lrs)
    assert smoothed[-1] > 4 * min(smoothed[:-1])  # the rule that ended it, and not before
    assert all(s <= 4 * min(smoothed[: i + 1]) for i, s in enumerate(smoothed[:-1]))
    assert result.lrs[-1] < 1e4 and 1e-5 <= result.suggestion <= 1e4
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"find_lr: {len(result.lrs)} steps, lr 1.0e-05 to {result.lrs[-1]:.1e} (stopped: the loss diverged); "
        f"suggestion {result.suggestion:.1e}"
    )


def test_a_nan_loss_ends_the_test_and_the_suggestion_stays_finite() -> None:
    calls = [0]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        loss = F.cross_entropy(logits, targets)
        return loss * math.nan if calls[0] == 5 else loss

    t = trainer(loss_fn=loss_fn)
    before = everything(t)
    result = t.find_lr(blobs(32), start_lr=1e-4, end_lr=1.0, steps=20, batch_size=8, num_workers=0)
    assert len(result.lrs) == 5 and math.isnan(result.losses[-1])
    assert math.isfinite(result.suggestion) and 1e-4 <= result.suggestion <= 1.0
    assert same(everything(t), before)


def feature_calls(t: vt.Trainer) -> list[int]:
    calls: list[int] = []
    t.network.features.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_frozen_backbone_runs_on_cached_features_that_fit_then_reuses() -> None:
    t = trainer()
    calls = feature_calls(t)
    t.find_lr(blobs(32), steps=12, batch_size=8, num_workers=0)
    assert t.cache_report == {"find_lr": "on"}
    assert len(calls) == 4  # the one feature pass over 32 samples, not one per step
    t.fit(blobs(32), epochs=1, batch_size=8, num_workers=0)
    assert t.cache_report["fit(train)"] == "on (reused)" and len(calls) == 4


def test_an_unfrozen_backbone_runs_on_the_images() -> None:
    t = trainer()
    t.unfreeze_features()
    calls = feature_calls(t)
    t.find_lr(blobs(32), steps=6, batch_size=8, num_workers=0)
    assert t.cache_report["find_lr"].startswith(
        "off: parameter 'features.0.weight' outside the head is trainable"
    )
    assert len(calls) == 6


def test_the_same_seed_gives_the_same_curve_whatever_the_global_generator() -> None:
    t = trainer()  # the head has dropout, which draws random numbers every step
    torch.manual_seed(1)
    first = t.find_lr(blobs(32), start_lr=1e-4, end_lr=1.0, steps=8, batch_size=8, num_workers=0)
    torch.manual_seed(2)
    second = t.find_lr(blobs(32), start_lr=1e-4, end_lr=1.0, steps=8, batch_size=8, num_workers=0)
    assert first.losses == second.losses


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"start_lr": 0}, ValueError, "expected start_lr to be a finite number > 0 such as 1e-3 but got 0"),
        (
            {"start_lr": "1e-3"},
            TypeError,
            "expected start_lr to be a number such as 1e-3 but got '1e-3' (str)",
        ),
        (
            {"end_lr": math.inf},
            ValueError,
            "expected end_lr to be a finite number > 0 such as 1e-3 but got inf",
        ),
        (
            {"start_lr": 1e-3, "end_lr": 1e-4},
            ValueError,
            "expected end_lr to be greater than start_lr=0.001 (the rate rises from start_lr to end_lr) but got "
            "end_lr=0.0001",
        ),
        (
            {"start_lr": 1e-320, "end_lr": 1e308},
            ValueError,
            "expected end_lr / start_lr to be a finite ratio but 1e+308 / 1e-320 overflows; raise start_lr "
            "(the default is 1e-7) or lower end_lr",
        ),
        ({"steps": 1}, ValueError, "expected steps to be an int >= 2 (a curve needs two points) but got 1"),
        ({"steps": True}, TypeError, "expected steps to be an int >= 2 but got True (bool)"),
        ({"steps": 10.0}, TypeError, "expected steps to be an int >= 2 but got 10.0 (float)"),
        ({"batch_size": 0}, ValueError, "expected batch_size to be a positive int (1 or more) but got 0"),
        ({"batch_size": "8"}, TypeError, "expected batch_size to be a positive int but got '8' (str)"),
        ({"num_workers": -1}, ValueError, "expected num_workers to be None or an int >= 0 but got -1"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(kwargs: dict, error: type, message: str) -> None:
    t = trainer()
    before = everything(t)
    with pytest.raises(error, match=f"^{re.escape('Trainer.find_lr: ' + message)}$"):
        t.find_lr(blobs(16), **kwargs)
    assert t.cache_report == {} and same(everything(t), before)


def test_bad_data_is_named_and_numpy_numbers_are_accepted() -> None:
    t = trainer()
    with pytest.raises(
        ValueError, match=r"^find_lr: the dataset is empty; expected at least one \(image, label\)"
    ):
        t.find_lr(TensorDataset(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long)))
    result = t.find_lr(
        blobs(16),
        start_lr=np.float64(1e-4),
        end_lr=np.float32(1.0),
        steps=np.int64(3),
        batch_size=np.int64(8),
        num_workers=np.int64(0),
    )
    assert len(result.lrs) == 3 and type(result.lrs[0]) is float


def test_plot_writes_a_png_with_the_curve(tmp_path: Path) -> None:
    lrs = [1e-5 * 10 ** (i / 5) for i in range(31)]
    losses = [0.7 - 0.6 / (1 + math.exp(-4 * (math.log10(lr) + 3))) + (0.9 if lr > 1 else 0.0) for lr in lrs]
    losses[-1] = math.inf  # the step that ended the test
    result = vt.LRFinder(lrs, losses, 1e-5, 10.0, smoothing=0.6)
    path = result.plot(tmp_path / "new folder" / "lr.png")
    assert path == tmp_path / "new folder" / "lr.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (700, 450)
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 128).mean() > 0.01  # text, axes and curves drawn, not an empty canvas


def test_plot_path_errors(tmp_path: Path) -> None:
    result = vt.LRFinder([1e-3, 1e-2], [1.0, 0.5], 1e-3, 1e-2)
    with pytest.raises(
        TypeError,
        match=r"^LRFinder.plot: expected path to be a file path \(str or os.PathLike\) such as 'lr.png' but got 3 \(int\)$",
    ):
        result.plot(3)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"^LRFinder.plot: expected path to end in .png \(the plot is a PNG image\) but got '.*lr.jpg'$",
    ):
        result.plot(tmp_path / "lr.jpg")
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(
        ValueError, match=r"^LRFinder.plot: expected path to be a file but '.*taken.png' is a folder$"
    ):
        result.plot(tmp_path / "taken.png")
    with pytest.raises(
        ValueError, match="^LRFinder.plot: no finite loss was recorded, so there is no curve to draw$"
    ):
        vt.LRFinder([1e-3], [math.nan], 1e-3, 1e-2).plot(tmp_path / "lr.png")
    assert list(tmp_path.iterdir()) == [tmp_path / "taken.png"]


def test_plot_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        ModuleNotFoundError,
        match=r'^LRFinder.plot needs matplotlib, which is not installed; install it with: pip install "vggtransfer\[plots\]"$',
    ):
        vt.LRFinder([1e-3, 1e-2], [1.0, 0.5], 1e-3, 1e-2).plot(tmp_path / "lr.png")


DECADES = [1e-4, 1e-3, 1e-2, 1e-1, 1e0]


@pytest.mark.parametrize(
    ("lrs", "losses", "expected"),
    [
        (DECADES, [1.0, 0.8, 0.2, 0.5, 9.0], 1e-3),  # a tenth of the minimum's rate
        (DECADES, [1.0, 0.9, 0.8, 0.7, 0.6], 1e-1),  # still falling at end_lr: a tenth of it
        ([1e-4, 2e-4, 4e-4, 8e-4, 1e0], [0.6, 0.2, 0.9, 3.0, 9.0], 1e-4),  # a tenth is below start_lr
        (DECADES, [0.5, 0.5, 0.5, 0.5, 0.5], 1e-4),  # flat: start_lr
        (DECADES, [0.5, 0.499, 0.498, 0.5, 0.52], 1e-4),  # never 1% below the first value: flat
        (DECADES, [0.5, 0.6, 0.7, 0.8, 0.9], 1e-4),  # rising from the start: start_lr
        (DECADES, [math.nan] * 5, 1e-4),  # no finite loss: start_lr
        (DECADES, [1.0, 0.5, 0.1, math.inf, math.nan], 1e-3),  # the non-finite end is ignored
    ],
)
def test_suggestion_rule_and_its_fallbacks(lrs: list[float], losses: list[float], expected: float) -> None:
    result = vt.LRFinder(lrs, losses, 1e-4, 1e0, smoothing=0.0)
    assert result.suggestion == pytest.approx(expected, rel=1e-12)
    assert isinstance(result.suggestion, float)


def test_suggestion_of_one_point_and_of_no_point_is_start_lr() -> None:
    assert vt.LRFinder([1e-3], [0.7], 1e-3, 1.0).suggestion == 1e-3
    assert vt.LRFinder([], [], 1e-3, 1.0).suggestion == 1e-3


def test_smoothed_is_the_bias_corrected_moving_average() -> None:
    result = vt.LRFinder([1e-3, 1e-2, 1e-1], [1.0, 0.0, 3.0], 1e-3, 1e-1, smoothing=0.5)
    # averages 0.5, 0.25, 1.625 over corrections 0.5, 0.75, 0.875
    assert result.smoothed == pytest.approx([1.0, 1 / 3, 1.625 / 0.875], rel=1e-12)
    assert vt.LRFinder([1e-3, 1e-2], [2.0, 2.0], 1e-3, 1e-1, smoothing=0.9).smoothed == pytest.approx(
        [2.0, 2.0]
    )
    found = trainer().find_lr(blobs(16), steps=5, batch_size=8, num_workers=0)
    assert found.smoothing == 5 / 25  # steps / (steps + 20): a lag of a twentieth of the steps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ([1e-3], [1.0, 2.0], 1e-3, 1.0),
            "LRFinder: expected one loss per learning rate but got 1 lrs and 2 losses",
        ),
        (([], [], 1.0, 1.0), "LRFinder: expected end_lr to be greater than start_lr=1.0 but got 1.0"),
        (([], [], 1e-3, 1.0, 1.0), "LRFinder: expected smoothing to be a number in [0, 1) but got 1.0"),
        (
            ([], [], -1.0, 1.0),
            "LRFinder: expected start_lr to be a finite number > 0 such as 1e-3 but got -1.0",
        ),
    ],
)
def test_lrfinder_checks_what_it_is_given(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        vt.LRFinder(*args)


def test_repr_is_a_summary() -> None:
    result = vt.LRFinder([1e-4, 1e-3, 1e-2], [1.0, 0.5, 9.0], 1e-4, 1.0)
    assert repr(result) == "LRFinder(3 steps, lr 1.0e-04 to 1.0e-02, suggestion 1.0e-04)"


def test_a_loader_that_yields_nothing_is_an_error_not_an_endless_loop() -> None:
    empty = torch.utils.data.DataLoader(blobs(4), batch_size=8, drop_last=True)
    with pytest.raises(
        ValueError, match=r"^Trainer.find_lr: the training data gave no batches \(an empty DataLoader"
    ):
        trainer().find_lr(empty, steps=3)
