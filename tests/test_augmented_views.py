"""Trainer(cache_views=K): K cached feature passes through a random transform, one view per epoch."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import photos
import vggtransfer as vt
from helpers import Augmented, Jitter, blobs, toy, trainer, weights_equal
from vggtransfer._augmented_views import SeededView, sample_seed, view_batches, view_choice
from vggtransfer._feature_store import FeatureSet
from vggtransfer.data import DogsVsCats


def _views(t: vt.Trainer) -> list[torch.Tensor]:
    return [s.features for s in t._cache.sets.values()]


def test_views_are_computed_once_then_every_epoch_trains_on_them(tmp_path: Path) -> None:
    data = Augmented(folder=tmp_path)
    t = trainer(cache_views=2)
    history = t.fit(data, epochs=6, batch_size=8, num_workers=0)
    assert t.cache_report["fit(train)"] == "on (2 augmented views)"
    assert data.reads == 1 + 2 * len(data)  # the first sample checked, two passes, none per epoch
    assert len(t._cache.sets) == 2
    first, second = _views(t)
    assert not torch.equal(first, second)  # each view has its own augmentation
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_a_view_is_the_transform_under_its_sample_seed(tmp_path: Path) -> None:
    data = Augmented(8, folder=tmp_path)
    model = toy()
    t = trainer(model, cache_views=2)
    t.fit(data, epochs=1, batch_size=4, num_workers=0)
    stored = _views(t)
    captured: list[torch.Tensor] = []
    hook = model.classifier.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    with torch.no_grad():
        for view in range(2):
            for index in range(len(data)):
                torch.manual_seed(sample_seed(1234, view, index))
                model.eval()(data[index][0].unsqueeze(0))
                # One image at a time against batches of 4: equal up to float summation order.
                torch.testing.assert_close(captured.pop()[0], stored[view][index], rtol=1e-5, atol=1e-6)
                torch.manual_seed(sample_seed(1234, 1 - view, index))  # the other view's draw
                model(data[index][0].unsqueeze(0))
                assert not torch.allclose(captured.pop()[0], stored[view][index], rtol=1e-3, atol=1e-4)
    hook.remove()


def test_views_do_not_depend_on_workers_and_follow_the_seed(tmp_path: Path) -> None:
    alone = trainer(cache_views=2)
    alone.fit(Augmented(folder=tmp_path), epochs=2, batch_size=8, num_workers=0)
    workers = trainer(cache_views=2)
    workers.fit(Augmented(folder=tmp_path), epochs=2, batch_size=8, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(_views(alone), _views(workers), strict=True))
    assert weights_equal(alone.network, workers.network)
    other = trainer(cache_views=2, seed=99)
    other.fit(Augmented(folder=tmp_path), epochs=1, batch_size=8, num_workers=0)
    assert not torch.equal(_views(alone)[0], _views(other)[0])


def test_each_sample_comes_from_the_view_chosen_for_its_epoch() -> None:
    rows = torch.arange(10, dtype=torch.float32).view(10, 1)
    views = [
        FeatureSet(rows, torch.zeros(10, dtype=torch.long)),
        FeatureSet(rows + 1000, torch.zeros(10, dtype=torch.long)),
    ]
    order = [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]
    choice = view_choice(seed=5, epoch=2, size=10, views=2)
    got = torch.cat([f for f, _ in view_batches(views, choice, order, 3, torch.device("cpu"))]).view(-1)
    assert got.tolist() == [i + 1000.0 * int(choice[i]) for i in order]
    assert set(choice.tolist()) == {0, 1}
    assert torch.equal(choice, view_choice(seed=5, epoch=2, size=10, views=2))
    assert not torch.equal(choice, view_choice(seed=5, epoch=3, size=10, views=2))


def test_views_resume_exactly(tmp_path: Path) -> None:
    straight = trainer(cache_views=3)
    straight.fit(Augmented(), epochs=4, batch_size=8, num_workers=0)
    first = trainer(cache_views=3)
    first.fit(Augmented(), epochs=2, batch_size=8, num_workers=0)
    first.save_checkpoint(tmp_path / "half.pt")
    resumed = trainer(cache_views=3)
    resumed.load_checkpoint(tmp_path / "half.pt")
    resumed.fit(Augmented(), epochs=4, batch_size=8, num_workers=0)
    assert weights_equal(straight.network, resumed.network)
    assert straight.history.to_dict()["records"][-1]["train_loss"] == resumed.history[-1]["train_loss"]
    other = trainer(cache_views=2)
    with pytest.raises(vt.CheckpointError) as error:
        other.load_checkpoint(tmp_path / "half.pt")
    assert str(error.value) == (
        f"checkpoint {str(tmp_path / 'half.pt')!r} was trained with cache_views=3 but this Trainer has "
        f"cache_views=2; build the Trainer with cache_views=3 to resume it"
    )
    assert other.epoch == 0


def test_the_views_pass_leaves_the_callers_random_streams_alone() -> None:
    def draws() -> tuple[float, float, float]:
        return float(torch.rand(())), random.random(), float(np.random.rand())

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    trainer(cache_views=2).fit(Augmented(), epochs=1, batch_size=8, num_workers=0)
    assert draws() == expected


def test_views_on_disk_are_found_by_a_later_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VGGTRANSFER_CACHE_MEMORY_GB", "0")  # every set goes to disk
    photos.class_folders(tmp_path / "pets", {"cats": 3, "dogs": 3})
    data = DogsVsCats(tmp_path / "pets", transform=vt.imagenet_transform(train=True, size=32))

    def report(**kwargs) -> str:
        t = trainer(class_names=None, cache_dir=tmp_path / "cache", **kwargs)
        t.fit(data, epochs=1, batch_size=3, num_workers=0)
        return t.cache_report["fit(train)"]

    assert report(cache_views=2) == "on (2 augmented views)"
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 2
    assert report(cache_views=2) == "on (2 augmented views, from disk)"
    assert report(cache_views=2, seed=7) == "on (2 augmented views)"  # another seed, other views
    assert report(cache_views=3) == "on (3 augmented views)"  # K is part of the key


def test_without_views_a_random_transform_is_left_off_or_refused() -> None:
    t = trainer()
    t.fit(Augmented(), epochs=1, batch_size=8, num_workers=0)
    assert t.cache_report["fit(train)"] == (
        "off: the transform declares itself random; pass cache_views=K to cache K augmented views of every image"
    )
    with pytest.raises(ValueError, match="cache_features=True, but the transform declares itself random"):
        trainer(cache_features=True).fit(Augmented(), epochs=1, batch_size=8, num_workers=0)


def test_views_of_deterministic_data_cache_once_and_say_so() -> None:
    t = trainer(cache_views=2)
    t.fit(blobs(16), blobs(8, seed=3), epochs=1, batch_size=8, num_workers=0)
    assert t.cache_report == {
        "fit(train)": "on; cache_views=2 unused, the transform is deterministic",
        "fit(val)": "on",  # validation is never augmented
    }
    assert len(t._cache.sets) == 2


def test_views_need_frozen_features() -> None:
    model = vt.unfreeze_features(toy())
    t = trainer(model, cache_views=2)
    t.fit(Augmented(), epochs=1, batch_size=8, num_workers=0)
    assert t.cache_report["fit(train)"].startswith(
        "off: parameter 'features.0.weight' outside the head is trainable"
    )
    with pytest.raises(ValueError, match="cache_features=True, but parameter 'features.0.weight'"):
        trainer(vt.unfreeze_features(toy()), cache_views=2, cache_features=True).fit(
            Augmented(), epochs=1, batch_size=8, num_workers=0
        )


def test_a_transform_declared_deterministic_is_cached_under_auto() -> None:
    class Steady(Jitter):
        deterministic = True

    data = Augmented()
    data.transform = Steady()
    t = trainer()
    t.fit(data, epochs=1, batch_size=8, num_workers=0)
    assert t.cache_report["fit(train)"] == "on"


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "Trainer: expected cache_views to be a positive int (1 or more) but got 0"),
        (True, TypeError, "Trainer: expected cache_views to be a positive int but got True (bool)"),
        ("2", TypeError, "Trainer: expected cache_views to be a positive int but got '2' (str)"),
        (2.0, TypeError, "Trainer: expected cache_views to be a positive int but got 2.0 (float)"),
        (5000, ValueError, "Trainer: expected cache_views to be at most 1000 but got 5000"),
    ],
)
def test_cache_views_is_checked(value: object, error: type[Exception], message: str) -> None:
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as raised:
        trainer(model, cache_views=value)
    assert str(raised.value) == message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cache_views_without_caching_is_refused() -> None:
    with pytest.raises(ValueError) as raised:
        trainer(cache_views=2, cache_features=False)
    assert str(raised.value) == (
        "Trainer: cache_views=2 caches augmented views of the features, but cache_features=False turns "
        "caching off; drop one of the two"
    )


def test_seeded_view_reads_through_its_dataset() -> None:
    base = TensorDataset(torch.arange(4.0).view(4, 1), torch.arange(4))
    view = SeededView(base, seed=1, view=0)
    assert len(view) == 4 and torch.equal(view[2][0], base[2][0])


def test_views_share_the_memory_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 24 samples of the toy's 64 float32 head inputs: 6 kB a set. 9 kB holds one set, not two.
    monkeypatch.setenv("VGGTRANSFER_CACHE_MEMORY_GB", "9e-6")
    single = trainer(cache_dir=tmp_path / "single")
    single.fit(blobs(24), epochs=1, batch_size=8, num_workers=0)
    assert single.cache_report["fit(train)"] == "on" and not (tmp_path / "single").exists()
    views = trainer(cache_views=2, cache_dir=tmp_path / "views")
    views.fit(Augmented(24, folder=tmp_path / "files"), epochs=1, batch_size=8, num_workers=0)
    assert len(list((tmp_path / "views").glob("*.bin"))) == 2  # each view got half: both on disk


def test_only_training_reports_suggest_views() -> None:
    t = trainer()
    t.fit(Augmented(), Augmented(8, seed=3), epochs=1, batch_size=8, num_workers=0)
    t.evaluate(Augmented(8, seed=3), num_workers=0)
    reason = "off: the transform declares itself random"
    assert t.cache_report == {
        "fit(train)": f"{reason}; pass cache_views=K to cache K augmented views of every image",
        "fit(val)": reason,  # views are for training alone: no hint where they cannot help
        "evaluate": reason,
    }
