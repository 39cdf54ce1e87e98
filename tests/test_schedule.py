"""A scheduler built before Trainer.unfreeze_features schedules the features' group too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sch

from helpers import blobs, trainer
from vggtransfer._optimizer import adopt_new_group
from vggtransfer._progress import format_record

MAKERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: sch.StepLR(o, step_size=1, gamma=0.5),
    "ExponentialLR": lambda o: sch.ExponentialLR(o, gamma=0.7),
    "CosineAnnealingLR": lambda o: sch.CosineAnnealingLR(o, T_max=5),
    "CosineAnnealingWarmRestarts": lambda o: sch.CosineAnnealingWarmRestarts(o, T_0=2),
    "LambdaLR": lambda o: sch.LambdaLR(o, lambda epoch: 0.5**epoch),
    "MultiplicativeLR": lambda o: sch.MultiplicativeLR(o, lambda epoch: 0.8),
    "LinearLR": lambda o: sch.LinearLR(o, start_factor=0.25, total_iters=4),
    "PolynomialLR": lambda o: sch.PolynomialLR(o, total_iters=8, power=2.0),
    "OneCycleLR": lambda o: sch.OneCycleLR(o, max_lr=1.0, total_steps=12),
    "CyclicLR": lambda o: sch.CyclicLR(o, base_lr=0.1, max_lr=1.0, step_size_up=2),
    "ReduceLROnPlateau": lambda o: sch.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "SequentialLR": lambda o: sch.SequentialLR(
        o, [sch.LinearLR(o, start_factor=0.5, total_iters=3), sch.ExponentialLR(o, gamma=0.5)], milestones=[3]
    ),
    "ChainedScheduler": lambda o: sch.ChainedScheduler(
        [sch.ExponentialLR(o, gamma=0.9), sch.LambdaLR(o, lambda epoch: 1 / (1 + epoch))]
    ),
}


def _step(scheduler: Any) -> None:
    if isinstance(scheduler, sch.ReduceLROnPlateau):
        scheduler.step(1.0)  # never improves: reduces every step
    else:
        scheduler.step()


@pytest.mark.parametrize("name", list(MAKERS))
def test_new_group_starts_at_its_rate_and_follows_the_schedule(name: str) -> None:
    head, features = nn.Linear(3, 2), nn.Linear(3, 3)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    scheduler = MAKERS[name](optimizer)
    for _ in range(3):
        optimizer.step()
        _step(scheduler)
    head_lr = optimizer.param_groups[0]["lr"]
    optimizer.add_param_group({"params": features.parameters(), "lr": head_lr / 10})

    adopt_new_group(scheduler, optimizer)

    for _ in range(6):
        optimizer.step()
        _step(scheduler)
        first, second = (group["lr"] for group in optimizer.param_groups)
        assert second == pytest.approx(first / 10, rel=1e-6, abs=1e-12)
    assert len(scheduler.get_last_lr()) == 2


def test_without_adopting_the_new_group_schedulers_break() -> None:
    """The failure this module exists for (if PyTorch fixes it, adopt_new_group can go)."""
    optimizer = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.5)
    scheduler = sch.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    optimizer.add_param_group({"params": nn.Linear(3, 3).parameters(), "lr": 0.05})
    optimizer.step()
    with pytest.raises(ValueError, match="zip"):
        scheduler.step()


def test_adopting_twice_changes_nothing() -> None:
    optimizer = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.5)
    scheduler = sch.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    optimizer.add_param_group({"params": nn.Linear(3, 3).parameters(), "lr": 0.05})
    adopt_new_group(scheduler, optimizer)
    adopt_new_group(scheduler, optimizer)
    assert scheduler.base_lrs == pytest.approx([0.5, 0.05])
    assert len(scheduler.lr_lambdas) == 2


def test_trainer_unfreeze_under_cosine_schedule_trains_and_resumes(tmp_path: Path) -> None:
    def cosine(optimizer: torch.optim.Optimizer) -> sch.LRScheduler:
        return sch.CosineAnnealingLR(optimizer, T_max=4)

    t = trainer(lr=1e-3, scheduler=cosine)
    t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    head_lr = t.optimizer.param_groups[0]["lr"]
    t.unfreeze_features()
    t.fit(blobs(16), epochs=2, batch_size=8, num_workers=0)
    records = t.history.records
    assert "features_lr" not in records[0]
    assert records[1]["features_lr"] == pytest.approx(head_lr / 10)
    for record in records[1:]:
        assert record["features_lr"] == pytest.approx(record["lr"] / 10)
    assert f"lr {records[1]['lr']:.0e}  features lr {records[1]['features_lr']:.0e}  " in format_record(
        records[1], 3
    )
    t.save_checkpoint(tmp_path / "ck.pt")

    resumed = trainer(lr=1e-3, scheduler=cosine)
    resumed.load_checkpoint(tmp_path / "ck.pt")
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in t.optimizer.param_groups]
    assert resumed.scheduler.base_lrs == t.scheduler.base_lrs
