"""Feature caching and the other fast paths give the results of the plain path."""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import vggtransfer as vt
from helpers import ToyVGG, blobs, toy, trainer
from vggtransfer.data import DogsVsCats


@pytest.fixture
def pet_folders(pet_photos: list[Path], tmp_path: Path) -> Path:
    """The copied photos as class folders: three cats, three dogs."""
    folder = tmp_path / "pets"
    for i, photo in enumerate(pet_photos):
        kind = "cats" if i < 3 else "dogs"
        (folder / kind).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / kind / photo.name)
    return folder


def _fit(t: vt.Trainer, epochs: int = 3) -> vt.History:
    return t.fit(blobs(48), blobs(16, seed=7), epochs=epochs, batch_size=8, num_workers=0)


def test_cached_training_matches_plain_training() -> None:
    plain = trainer(cache_features=False)
    cached = trainer(cache_features=True)
    h_plain, h_cached = _fit(plain), _fit(cached)
    assert plain.cache_report["fit(train)"] == "off: cache_features=False"
    assert cached.cache_report == {"fit(train)": "on", "fit(val)": "on"}
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert h_cached[key] == pytest.approx(h_plain[key], rel=1e-5, abs=1e-6)
    a, b = plain.model.state_dict(), cached.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)


def test_auto_caches_frozen_backbone_with_deterministic_data() -> None:
    t = trainer()
    _fit(t, 1)
    assert t.cache_report == {"fit(train)": "on", "fit(val)": "on"}
    _fit(t, 2)  # the next fit reuses the features
    assert t.cache_report == {"fit(train)": "on (reused)", "fit(val)": "on (reused)"}
    assert len(t._cache.sets) == 2


def test_append_classifier_caches_the_whole_frozen_net() -> None:
    model = vt.freeze_features(vt.append_classifier(ToyVGG(), 2))
    t = vt.Trainer(model, device="cpu", progress=False, seed=0)
    _fit(t, 1)
    assert t.cache_report["fit(train)"] == "on"
    features = next(iter(t._cache.sets.values())).features
    assert features.shape == (48, 1000)  # the net's logits are the head's input


def test_auto_refuses_unfrozen_backbone() -> None:
    t = trainer()
    t.unfreeze_features()
    _fit(t, 1)
    assert (
        t.cache_report["fit(train)"]
        == "off: parameter 'features.0.weight' outside the head is trainable (features are not frozen)"
    )


def test_auto_refuses_trainable_batchnorm() -> None:
    model = vt.replace_classifier(vt.freeze_features(ToyVGG(), batchnorm="trainable"), 2)
    t = vt.Trainer(model, device="cpu", progress=False, seed=0)
    _fit(t, 1)
    assert t.cache_report["fit(train)"].startswith(
        "off: parameter 'features.1.weight' outside the head is trainable"
    )


def test_auto_refuses_augmentation(pet_folders: Path) -> None:
    folder = pet_folders
    augmented = DogsVsCats(folder, transform=vt.imagenet_transform(train=True, size=32))
    t = trainer(class_names=None)
    t.fit(augmented, epochs=1, batch_size=3, num_workers=0)
    assert t.cache_report["fit(train)"] == (
        "off: the transform augments randomly (train=True); pass cache_views=K to cache K augmented "
        "views of every image"
    )
    plain = augmented.with_transform(vt.imagenet_transform(size=32))
    t.fit(plain, epochs=2, batch_size=3, num_workers=0)
    assert t.cache_report["fit(train)"] == "on"
    # Forcing the cache cannot override what vggtransfer knows: one augmentation replayed every
    # epoch is not augmentation.
    forced = trainer(class_names=None, cache_features=True)
    with pytest.raises(ValueError) as error:
        forced.fit(augmented, epochs=1, batch_size=3, num_workers=0)
    assert str(error.value) == (
        "fit(train): cache_features=True, but the transform augments randomly (train=True); pass "
        "cache_views=K to cache K augmented views of every image; caching would change the results"
    )
    assert forced.epoch == 0 and forced.cache_report == {}


class _WithTransform(torch.utils.data.Dataset):
    """Tensors passed through a transform vggtransfer cannot inspect (or no transform attribute)."""

    def __init__(
        self, inner: torch.utils.data.Dataset, transform=None, *, has_attribute: bool = True
    ) -> None:
        self.inner = inner
        if has_attribute:
            self.transform = transform

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.inner[index]
        return (self.transform(image) if getattr(self, "transform", None) else image), label


def test_auto_refuses_dataloaders_and_unknown_transforms() -> None:
    t = trainer()
    t.fit(DataLoader(blobs(16), batch_size=8), epochs=1)
    assert (
        t.cache_report["fit(train)"]
        == "off: a DataLoader was given (its order and batching are its own); pass the Dataset instead"
    )
    t.fit(_WithTransform(blobs(16), nn.Identity()), epochs=2, batch_size=8, num_workers=0)
    assert t.cache_report["fit(train)"] == (
        "off: the transform Identity is not a vggtransfer ImageTransform, so it may be random; "
        "pass cache_features=True if it is deterministic"
    )
    t.fit(_WithTransform(blobs(16), has_attribute=False), epochs=3, batch_size=8, num_workers=0)
    assert t.cache_report["fit(train)"] == (
        "off: cannot tell whether _WithTransform returns the same tensors every epoch"
    )
    # cache_features=True trusts what it cannot inspect, but still needs a Dataset.
    forced = trainer(cache_features=True)
    forced.fit(_WithTransform(blobs(16), nn.Identity()), epochs=1, batch_size=8, num_workers=0)
    assert forced.cache_report["fit(train)"] == "on"
    with pytest.raises(
        ValueError, match=r"^fit\(train\): cache_features=True needs a Dataset, but a DataLoader"
    ):
        forced.fit(DataLoader(blobs(16), batch_size=8), epochs=2)


def test_forced_caching_with_unfrozen_backbone_is_an_error() -> None:
    t = trainer(cache_features=True)
    t.unfreeze_features()
    with pytest.raises(
        ValueError,
        match="fit\\(train\\): cache_features=True, but parameter 'features.0.weight' outside the head is trainable",
    ):
        _fit(t, 1)
    with pytest.raises(ValueError, match="expected cache_features to be 'auto', True or False but got 'yes'"):
        trainer(cache_features="yes")


def test_cache_invalidated_when_weights_transform_or_data_change(
    pet_photos: list[Path], pet_folders: Path
) -> None:
    folder = pet_folders
    data = DogsVsCats(folder, transform=vt.imagenet_transform(size=32))
    t = trainer(class_names=None)
    t.fit(data, epochs=1, batch_size=3, num_workers=0)
    t.fit(data, epochs=2, batch_size=3, num_workers=0)
    assert t.cache_report["fit(train)"] == "on (reused)"

    # other preprocessing
    t.fit(data.with_transform(vt.imagenet_transform(size=48)), epochs=3, batch_size=3, num_workers=0)
    assert t.cache_report["fit(train)"] == "on"
    # a file changed on disk (same name)
    target = data.samples[0][0]
    shutil.copy(pet_photos[-1], target)
    changed = DogsVsCats(folder, transform=vt.imagenet_transform(size=32))
    t.fit(changed, epochs=4, batch_size=3, num_workers=0)
    assert t.cache_report["fit(train)"] == "on"
    # other frozen weights
    with torch.no_grad():
        t.model.features[0].weight.mul_(1.5)
    t.fit(changed, epochs=5, batch_size=3, num_workers=0)
    assert t.cache_report["fit(train)"] == "on"
    assert len(t._cache.sets) == 4


def test_features_past_the_memory_budget_go_to_a_reusable_disk_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VGGTRANSFER_CACHE_MEMORY_GB", "0")  # everything to disk
    plain = trainer(cache_features=False)
    on_disk = trainer(cache_dir=tmp_path / "cache")
    h_plain, h_disk = _fit(plain), _fit(on_disk)
    assert h_disk["train_loss"] == pytest.approx(h_plain["train_loss"], rel=1e-5)
    files = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert files == [".bin", ".bin", ".json", ".json", ".pt", ".pt"]
    again = trainer(cache_dir=tmp_path / "cache")  # a new run finds them
    h_again = _fit(again)
    assert again.cache_report == {"fit(train)": "on (from disk)", "fit(val)": "on (from disk)"}
    assert h_again["train_loss"] == h_disk["train_loss"]


class _Opaque(torch.utils.data.Dataset):
    """A dataset vggtransfer cannot fingerprint: its disk cache can never be found again."""

    def __init__(self, inner: torch.utils.data.Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return self.inner[index]


def test_disk_caches_are_pruned_to_the_limit_and_one_off_caches_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VGGTRANSFER_CACHE_MEMORY_GB", "0")  # everything to disk
    width = toy().classifier[0].in_features  # floats per cached sample
    monkeypatch.setenv("VGGTRANSFER_CACHE_LIMIT_GB", str(1.5 * 16 * width * 4 / 1e9))  # room for one
    cache = tmp_path / "cache"
    first, second = trainer(cache_dir=cache), trainer(cache_dir=cache)
    first.fit(blobs(16, seed=1), epochs=1, batch_size=8, num_workers=0)
    (first_entry,) = {p.name.split(".")[0] for p in cache.iterdir()}
    second.fit(blobs(16, seed=2), epochs=1, batch_size=8, num_workers=0)
    (second_entry,) = {p.name.split(".")[0] for p in cache.iterdir()}
    assert second_entry != first_entry  # the older one made room
    # the run whose cache was pruned keeps training on it: the mapping outlives the file name
    first.fit(blobs(16, seed=1), epochs=2, batch_size=8, num_workers=0)
    assert first.cache_report["fit(train)"] == "on (reused)" and math.isfinite(
        first.history[-1]["train_loss"]
    )

    opaque = trainer(cache_dir=cache, cache_features=True)
    history = opaque.fit(_Opaque(blobs(16, seed=3)), epochs=2, batch_size=8, num_workers=0)
    assert len(history) == 2 and opaque.cache_report["fit(train)"] == "on"
    assert {p.name.split(".")[0] for p in cache.iterdir()} == {second_entry}


@pytest.mark.parametrize("raw", ["lots", "nan", "-1", "inf"])
def test_malformed_cache_limit_is_refused_before_the_feature_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("VGGTRANSFER_CACHE_LIMIT_GB", raw)
    t = trainer(cache_dir=tmp_path / "cache")
    with pytest.raises(
        ValueError,
        match=rf"VGGTRANSFER_CACHE_LIMIT_GB must be a number of gigabytes \(like 50 or 0\.5\) but is '{raw}'",
    ):
        t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    assert t.epoch == 0 and not (tmp_path / "cache").exists()


def test_evaluate_uses_cached_features_only_when_present() -> None:
    t = trainer()
    val = blobs(16, seed=7)
    t.fit(blobs(48), val, epochs=1, batch_size=8, num_workers=0)
    cached = t.evaluate(val, batch_size=8, num_workers=0)
    assert t.cache_report["evaluate"] == "on (reused)"
    fresh = t.evaluate(blobs(16, seed=8), num_workers=0)
    assert fresh["count"] == 16 and t.cache_report["evaluate"] == "off: features not cached by fit"
    plain = vt.Trainer(t.model, device="cpu", progress=False, cache_features=False, class_names=t.class_names)
    assert plain.evaluate(val, batch_size=8, num_workers=0)["loss"] == pytest.approx(cached["loss"], rel=1e-5)


@pytest.mark.filterwarnings("ignore:Trainer. precision=.bf16. on a CPU without native")
def test_bf16_autocast_agrees_with_fp32() -> None:
    model = toy()
    images = blobs(8).tensors[0]
    fp32 = vt.Trainer(model, device="cpu", precision="fp32", progress=False)
    bf16 = vt.Trainer(model, device="cpu", precision="bf16", progress=False)
    a = torch.stack([torch.tensor(list(p.probabilities.values())) for p in fp32.predict(images)])
    b = torch.stack([torch.tensor(list(p.probabilities.values())) for p in bf16.predict(images)])
    assert torch.allclose(a, b, atol=0.05)
    assert not torch.equal(a, b)  # bf16 really ran


def test_channels_last_agrees_with_default_layout() -> None:
    images = blobs(8).tensors[0]
    default = vt.Trainer(toy(), device="cpu", channels_last=False, progress=False, seed=0)
    nhwc = vt.Trainer(toy(), device="cpu", channels_last=True, progress=False, seed=0)
    assert nhwc.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    a = [p.probabilities for p in default.predict(images)]
    b = [p.probabilities for p in nhwc.predict(images)]
    assert all(x == pytest.approx(y, abs=1e-5) for x, y in zip(a, b, strict=True))
    h_default = default.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    h_nhwc = nhwc.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    assert h_nhwc["train_loss"] == pytest.approx(h_default["train_loss"], rel=1e-4)


def test_fused_adam_is_the_default_and_matches_the_plain_loop() -> None:
    t = trainer()
    assert t.optimizer.defaults["fused"] is True
    reference = toy()
    head = [p for p in reference.parameters() if p.requires_grad]
    loop = vt.Trainer(
        reference,
        optimizer=torch.optim.Adam(head, lr=1e-3),
        device="cpu",
        progress=False,
        seed=1234,
        class_names=["cool", "warm"],
    )
    h_fused, h_loop = _fit(t, 2), _fit(loop, 2)
    assert h_fused["train_loss"] == pytest.approx(h_loop["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_compiled_feature_pass_matches_eager_and_follows_weight_changes() -> None:
    eager = trainer(cache_features=True)
    compiled = trainer(cache_features=True, compile_features=True)
    data = blobs(16)
    eager.fit(data, epochs=1, batch_size=8, num_workers=0)
    compiled.fit(data, epochs=1, batch_size=8, num_workers=0)
    (a,), (b,) = eager._cache.sets.values(), compiled._cache.sets.values()
    assert torch.allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
    # BatchNorm is folded into the convolutions as constants: new weights must recompile.
    for t in (eager, compiled):
        with torch.no_grad():
            t.model.features[1].running_mean.add_(0.5)
        t.fit(data, epochs=2, batch_size=8, num_workers=0)
    a2 = list(eager._cache.sets.values())[-1]  # recomputed for the new statistics
    b2 = list(compiled._cache.sets.values())[-1]
    assert len(compiled._cache.sets) == 2
    assert not torch.allclose(a.features, a2.features)
    assert torch.allclose(a2.features, b2.features, rtol=1e-4, atol=1e-5)


def test_torchvision_imagefolder_with_deterministic_transform_is_cached(pet_folders: Path) -> None:
    folder = pet_folders
    from torchvision.datasets import ImageFolder

    t = trainer(class_names=None)
    t.fit(
        ImageFolder(str(folder), transform=vt.imagenet_transform(size=32)),
        epochs=1,
        batch_size=3,
        num_workers=0,
    )
    assert t.cache_report["fit(train)"] == "on" and t.class_names == ["cats", "dogs"]
    t.fit(
        ImageFolder(str(folder), transform=lambda image: vt.imagenet_transform(size=32)(image)),
        epochs=2,
        batch_size=3,
        num_workers=0,
    )
    assert t.cache_report["fit(train)"].startswith(
        "off: the transform function is not a vggtransfer ImageTransform"
    )


class _Tiny(nn.Module):
    """A VGG in miniature (conv-BatchNorm features, dropout head) that compiles in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4)
        )
        self.classifier = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@pytest.mark.slow
def test_compiled_training_matches_eager_frozen_then_fine_tuned() -> None:
    def run(compile_model: bool) -> tuple[vt.Trainer, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = vt.freeze_features(_Tiny())
        frozen = {k: v.clone() for k, v in model.features.state_dict().items()}
        t = trainer(model, cache_features=False, compile_model=compile_model)
        t.fit(blobs(32), epochs=2, batch_size=8, num_workers=0)
        return t, frozen

    (eager, _), (compiled, frozen) = run(False), run(True)
    after = compiled.model.features.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "compiled steps changed frozen state"
    assert compiled.history["train_loss"] == pytest.approx(eager.history["train_loss"], rel=1e-5)

    for t in (eager, compiled):
        t.unfreeze_features()
        t.fit(blobs(32), epochs=4, batch_size=8, num_workers=0)
    assert compiled.history["train_loss"] == pytest.approx(eager.history["train_loss"], rel=1e-4)
    ours, theirs = compiled.model.state_dict(), eager.model.state_dict()
    assert not torch.equal(ours["features.1.running_mean"], frozen["1.running_mean"])
    for key in theirs:
        assert torch.allclose(ours[key].float(), theirs[key].float(), rtol=1e-4, atol=1e-5), key


def test_default_workers_use_this_process_cores_shared_among_local_processes() -> None:
    from vggtransfer._sources import default_workers

    def on(cores: int, environ: dict[str, str]) -> int:
        with patch.object(os, "sched_getaffinity", lambda pid: set(range(cores))):
            return default_workers(environ)

    assert on(16, {}) == 15  # the main process feeds the model
    assert on(16, {"LOCAL_WORLD_SIZE": "2"}) == 7  # two torchrun processes share the 16 cores
    assert on(2, {}) == 1 and on(1, {}) == 0
    assert on(128, {}) == 32  # capped
    assert on(4, {"LOCAL_WORLD_SIZE": "8"}) == 0 and on(4, {"LOCAL_WORLD_SIZE": "many"}) == 3


def _fake_entry(folder: Path, stem: str, size: int, used: float) -> list[Path]:
    files = [folder / f"{stem}.bin", folder / f"{stem}.targets.pt", folder / f"{stem}.json"]
    for path in files:
        path.write_bytes(bytes(size if path.suffix == ".bin" else 10))
        os.utime(path, (used, used))
    return files


def test_pruning_deletes_least_recently_used_caches_beyond_the_limit(tmp_path: Path) -> None:
    from vggtransfer._feature_store import open_features, prune_caches

    now = time.time()
    old, middle, new = ("a" * 32, "b" * 32, "c" * 32)
    for stem, age in ((old, 300), (middle, 200), (new, 100)):
        _fake_entry(tmp_path, stem, 1000, now - age)
    (tmp_path / ("d" * 32 + ".tmp")).write_bytes(bytes(10))  # another run writing now: kept
    stale = tmp_path / ("e" * 32 + ".tmp")
    stale.write_bytes(bytes(10))
    os.utime(stale, (now - 3 * 86400, now - 3 * 86400))  # left by a killed run: deleted
    (tmp_path / "notes.json").write_text("{}")  # not ours: never touched
    kept = tmp_path / ("f" * 32 + ".bin")
    _fake_entry(tmp_path, "f" * 32, 1000, now - 999)  # just written, though oldest by its times

    deleted = prune_caches(tmp_path, keep=kept, limit_bytes=2100)

    remaining = {p.name.split(".")[0][:1] for p in tmp_path.iterdir() if p.name != "notes.json"}
    assert remaining == {"c", "d", "f"}
    assert stale in deleted and (tmp_path / "notes.json").exists()

    # opening a cache marks it used, so pruning keeps it over ones used since it was written
    store = tmp_path / f"{new}.bin"
    store.write_bytes(bytes(24))
    (tmp_path / f"{new}.json").write_text('{"shape": [2, 3], "dtype": "float32"}')
    torch.save(torch.tensor([0, 1]), tmp_path / f"{new}.targets.pt")
    os.utime(tmp_path / f"{new}.json", (now - 500, now - 500))
    opened = open_features(store)
    assert opened is not None and opened.features.shape == (2, 3)
    assert (tmp_path / f"{new}.json").stat().st_mtime >= now


def test_a_disk_cache_is_keyed_by_the_label_mapping_too(pet_folders: Path, tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    transform = vt.imagenet_transform(size=32)
    cache = tmp_path / "cache"

    def fit(**options) -> vt.Trainer:
        t = trainer(class_names=None, cache_dir=cache, persist_cache=True)
        t.fit(ImageFolder(pet_folders, transform=transform, **options), epochs=1, batch_size=3, num_workers=0)
        return t

    assert fit().cache_report["fit(train)"] == "on"
    assert fit().cache_report["fit(train)"] == "on (from disk)"
    swapped = fit(target_transform=lambda label: 1 - label)  # other labels: not the same cache
    assert swapped.cache_report["fit(train)"] == "on"
    (targets,) = [s.targets for s in swapped._cache.sets.values()]
    assert targets.tolist() == [1, 1, 1, 0, 0, 0]


def test_a_cache_whose_labels_changed_unseen_is_refused(pet_folders: Path, tmp_path: Path) -> None:
    class Relabelled(DogsVsCats):
        """Labels changed by a means the cache key cannot see (here, an attribute of its own)."""

        swap = False

        def __getitem__(self, index: int):
            image, label = super().__getitem__(index)
            return image, 1 - label if self.swap else label

    data = Relabelled(pet_folders, transform=vt.imagenet_transform(size=32))
    trainer(class_names=None, cache_dir=tmp_path, persist_cache=True).fit(
        data, epochs=1, batch_size=3, num_workers=0
    )
    data.swap = True
    later = trainer(class_names=None, cache_dir=tmp_path)
    with pytest.raises(ValueError) as error:
        later.fit(data, epochs=1, batch_size=3, num_workers=0)
    assert str(error.value) == (
        "fit(train): the cached features were stored with label 0 for the first sample, but the dataset "
        "now gives 1; the labels changed without the cache key noticing. Delete the feature cache "
        "folder (cache_dir) or pass cache_features=False"
    )
    assert later.epoch == 0
