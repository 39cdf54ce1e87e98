"""torch.distributed on CPU with Gloo: torchrun-launched processes on loopback."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch

import vggtransfer as vt
from helpers import Augmented, blobs, torchrun
from vggtransfer._distributed import detect

WORKER = Path(__file__).resolve().parent / "dist_worker.py"


@functools.cache  # the tests only read the result
def _single(cache: bool | str, epochs: int, batch: int) -> vt.Trainer:
    """One process, as dist_worker.py trains: ``cache`` True, False, or "views" (cache_views=2)."""
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import build

    views = cache == "views"
    trainer = vt.Trainer(
        build(0), device="cpu", seed=0, progress=False, cache_features="auto" if views else cache,
        cache_views=2 if views else None, class_names=["cool", "warm"],
    )  # fmt: skip
    train = Augmented(32) if views else blobs(32)
    trainer.fit(train, blobs(12, seed=7), epochs=epochs, batch_size=batch, num_workers=0)
    return trainer


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process launch (batch 4, 2 epochs) for every test here: starting it is the slow part.

    Jobs: ``cache`` and ``plain`` train from scratch with and without feature caching, ``views``
    with cache_views=2 on randomly augmented data; ``resume``
    first loads ``one.pt``, written by a single process after one epoch with batch 8.
    """
    out = tmp_path_factory.mktemp("two-processes")
    _single(True, epochs=1, batch=8).save_checkpoint(out / "one.pt")
    jobs = ["cache:cache", "plain:plain", "views:views", f"resume:cache:{out / 'one.pt'}"]
    result = torchrun(str(WORKER), str(out), "2", "4", *jobs, nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["cache", "plain", "views"])
def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(
    two_process_runs: Path, cache: str
) -> None:
    out = two_process_runs / cache
    result = _result(out)
    single = _single({"cache": True, "plain": False, "views": "views"}[cache], epochs=2, batch=8)
    assert result["world"] == 2
    # Augmented views: each process computes its share of every view, seeded per sample, so the
    # gathered views, and the training on them, are those of one process.
    expected_cache = {"cache": "on", "plain": "off: cache_features=False", "views": "on (2 augmented views)"}
    assert result["cache"]["fit(train)"] == expected_cache[cache]
    distributed = torch.load(out / "final.pt", weights_only=True)
    expected = single.network.state_dict()
    assert distributed.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(distributed[key].float(), expected[key].float(), rtol=1e-4, atol=1e-5), key
    # every rank reported the same, all-reduced epoch numbers, equal to the single process's
    for ours, theirs in zip(result["history"]["records"], single.history.records, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ours["val_accuracy"] == pytest.approx(theirs["val_accuracy"])
    assert result["evaluate"]["count"] == 12
    # test-time augmentation: each process its share of the images, summed as without it
    averaged = single.evaluate(blobs(12, seed=7), batch_size=8, num_workers=0, tta=True)
    assert result["evaluate_tta"]["count"] == 12
    assert result["evaluate_tta"]["loss"] == pytest.approx(averaged["loss"], rel=1e-4)
    assert result["evaluate_tta"]["confusion_matrix"] == averaged["confusion_matrix"]
    assert result["evaluate_tta"]["loss"] != pytest.approx(result["evaluate"]["loss"], rel=1e-4)
    # rank 0 alone wrote the checkpoints, once each, completely
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_processes_agree_on_a_drawn_seed_and_on_a_failed_save(two_process_runs: Path) -> None:
    ranks = [json.loads((two_process_runs / "agreement" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["seed"] == ranks[1]["seed"]  # else their shards of each epoch would overlap
    assert [r["save"] for r in ranks] == ["FileExistsError", "RuntimeError"]  # raised, not hung


@pytest.mark.slow
def test_find_lr_under_torchrun_gives_every_process_the_curve_of_one(two_process_runs: Path) -> None:
    texts = [(two_process_runs / "find_lr" / f"rank{r}.json").read_text() for r in (0, 1)]
    assert texts[0] == texts[1]  # the same rates and losses: both stopped at the same step
    record = json.loads(texts[0])
    assert record["restored"] and 2 < len(record["lrs"]) < 30  # diverged and ended without a hang
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import random_labels, small

    single = vt.Trainer(small(0), device="cpu", seed=0, progress=False).find_lr(
        random_labels(), start_lr=1e-4, end_lr=1e4, steps=30, batch_size=8, num_workers=0
    )
    # two processes of 4 samples a step take the steps of one process of 8 (until divergence amplifies)
    assert record["losses"][:6] == pytest.approx(single.losses[:6], rel=1e-4)


def test_two_process_checkpoint_resumes_in_one_process(two_process_runs: Path) -> None:
    checkpoint = two_process_runs / "cache" / "checkpoints" / "last.pt"
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import build

    resumed = vt.Trainer(build(0), device="cpu", progress=False, class_names=["cool", "warm"])
    resumed.load_checkpoint(checkpoint)
    assert resumed.epoch == 2 and resumed.world_size == 1
    keys = torch.load(checkpoint, weights_only=True)["model"].keys()
    assert not any(k.startswith("module.") for k in keys)
    resumed.fit(blobs(32), epochs=3, batch_size=8, num_workers=0)
    assert resumed.epoch == 3


@pytest.mark.slow
def test_single_process_checkpoint_resumes_on_two_processes(two_process_runs: Path) -> None:
    result = _result(two_process_runs / "resume")
    one = torch.load(two_process_runs / "one.pt", weights_only=True)
    assert [r["epoch"] for r in result["history"]["records"]] == [1, 2]
    assert (
        result["history"]["records"][0] == one["trainer"]["history"]["records"][0]
    )  # restored, not retrained
    straight = _single(True, epochs=2, batch=8)
    assert result["history"]["records"][1]["train_loss"] == pytest.approx(
        straight.history.records[1]["train_loss"], rel=1e-4
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"WORLD_SIZE": "2"},
            r"looks like a distributed launch \(WORLD_SIZE=2\) but RANK, LOCAL_RANK are not set\. Launch with torchrun",
        ),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "but MASTER_ADDR, MASTER_PORT are not set"),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "29500"},
            "but MASTER_ADDR is not set",
        ),
        (
            {"RANK": "x", "WORLD_SIZE": "1", "LOCAL_RANK": "0"},
            "expected RANK, WORLD_SIZE and LOCAL_RANK to be integers",
        ),
        (
            {
                "RANK": "3",
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "1",
            },
            "expected 0 <= RANK < WORLD_SIZE",
        ),
    ],
)
def test_half_configured_environment_is_explained(environ: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        detect(environ)


def test_plain_process_and_single_rank_launch() -> None:
    assert detect({}) is None
    env = detect({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert env is not None and env.is_main and env.world_size == 1
    assert vt.is_main_process()


def test_trainer_refuses_half_configured_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="looks like a distributed launch"):
        vt.Trainer(torch.nn.Sequential(torch.nn.Linear(2, 2)), device="cpu")
