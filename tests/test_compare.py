"""compare_backbones: ranking, rows, failures, cache reuse across calls, the saved report."""

from __future__ import annotations

import gc
import json
import math
import sys
import urllib.error
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.models import SqueezeNet1_1_Weights

import photos
import vggtransfer as vt
from helpers import Named, ToyVGG, blobs, toy, trainer
from vggtransfer._spec import record
from vggtransfer.data import DogsVsCats

ROW_KEYS = {
    "name",
    "error",
    "val_accuracy",
    "val_loss",
    "train_accuracy",
    "train_loss",
    "params",
    "feature_dim",
    "build_s",
    "feature_pass_s",
    "head_s",
    "images_per_s",
    "cache",
}


def blind() -> nn.Module:
    """A frozen ToyVGG whose features are the same for every image: it cannot learn anything."""
    model = toy()
    with torch.no_grad():
        model.features[0].weight.zero_()
        model.features[0].bias.zero_()
    return model


def compare(train: Any, val: Any, models: Any, **options: Any) -> vt.Comparison:
    settings = {"epochs": 3, "batch_size": 8, "device": "cpu", "progress": False, "num_workers": 0}
    settings.update(options)
    return vt.compare_backbones(train, val, models, **settings)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_ranks_the_backbone_that_learns_above_the_one_that_cannot(cache: Path) -> None:
    comparison = compare(blobs(32), blobs(16, seed=7), {"blind": blind, "toy": toy}, cache_dir=cache)
    assert comparison.best == "toy"
    assert [row["name"] for row in comparison.rows] == ["blind", "toy"]  # the order given
    blind_row, toy_row = comparison.rows
    assert all(set(row) == ROW_KEYS and row["error"] is None for row in comparison.rows)
    assert toy_row["val_accuracy"] == 1.0 and blind_row["val_accuracy"] == 0.5
    assert toy_row["val_loss"] < blind_row["val_loss"]
    assert toy_row["params"] == sum(p.numel() for p in toy().parameters())
    assert toy_row["feature_dim"] == 64
    assert toy_row["cache"] == {"fit(train)": "on", "fit(val)": "on"}
    assert toy_row["feature_pass_s"] > 0 and toy_row["head_s"] > 0
    assert toy_row["images_per_s"] == pytest.approx(48 / toy_row["feature_pass_s"])
    assert comparison.settings["train_images"] == 32 and comparison.settings["val_images"] == 16
    # the row is what a single Trainer with the same settings and head measures
    reference = toy()
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the seed
        vt.replace_classifier(reference, 2)
    single = trainer(reference, seed=0, class_names=None)
    history = single.fit(blobs(32), blobs(16, seed=7), epochs=3, batch_size=8, num_workers=0)
    assert toy_row["val_loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-6)
    assert toy_row["train_accuracy"] == history[-1]["train_accuracy"]


def test_ties_in_accuracy_go_to_the_lower_loss_and_failures_are_never_best() -> None:
    rows = [
        {"name": "a", "val_accuracy": 0.9, "val_loss": 0.30, "error": None},
        {"name": "failed", "val_accuracy": None, "val_loss": None, "error": "RuntimeError: boom"},
        {"name": "b", "val_accuracy": 0.9, "val_loss": 0.25, "error": None},
        {"name": "c", "val_accuracy": 0.8, "val_loss": 0.10, "error": None},
        {"name": "nan", "val_accuracy": 1.0, "val_loss": math.nan, "error": None},  # nothing to rank by
    ]
    comparison = vt.Comparison(rows)
    assert comparison.best == "b"
    table = comparison.to_markdown().splitlines()
    assert [line.split(" | ")[0] for line in table[2:7]] == ["| **b**", "| a", "| c", "| failed", "| nan"]
    assert table[5].endswith("| RuntimeError: boom |")
    assert table[-1] == "Best: **b**, validation accuracy 90.00% (loss 0.2500)."
    nobody = vt.Comparison([rows[1]])
    assert nobody.best is None
    assert nobody.to_markdown().splitlines()[-1] == (
        "No backbone completed: all 1 failed, so there is no best one (the error column says why)."
    )


def test_a_failing_backbone_is_reported_while_the_others_complete(cache: Path) -> None:
    def out_of_memory() -> nn.Module:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    models = {"oom": out_of_memory, "toy": toy, "number": lambda: 5, "headless": lambda: nn.Conv2d(3, 3, 1)}
    comparison = compare(blobs(16), blobs(8, seed=7), models, cache_dir=cache, epochs=1)
    errors = {row["name"]: row["error"] for row in comparison.rows}
    assert errors["oom"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert errors["number"] == "TypeError: models['number'] returned int, expected an nn.Module"
    assert errors["headless"].startswith("TypeError: freeze_features: ")
    assert errors["toy"] is None and comparison.best == "toy"
    failed = [row for row in comparison.rows if row["error"] is not None]
    assert all(row["val_accuracy"] is None and row["feature_pass_s"] is None for row in failed)
    assert "| oom |" in comparison.to_markdown()


def test_interrupting_a_comparison_is_not_a_failure(cache: Path) -> None:
    def interrupted() -> nn.Module:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compare(blobs(16), blobs(8), {"toy": toy, "stop": interrupted}, cache_dir=cache, epochs=1)


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", refuse)


def test_torchvision_names_offline_fail_until_their_weights_are_in_torch_home(
    torch_home: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch)
    names = ["squeezenet1_1", "shufflenet_v2_x0_5"]
    train, val = blobs(16), blobs(8, seed=7)
    nothing = compare(train, val, names, cache_dir=cache, epochs=1)
    assert nothing.best is None
    assert all(
        row["error"].startswith("WeightsNotAvailableError: could not download") for row in nothing.rows
    )
    assert "No backbone completed" in nothing.to_markdown()

    path = vt.cached_weights_path(SqueezeNet1_1_Weights.DEFAULT)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    comparison = compare(train, val, names, cache_dir=cache, epochs=1)
    squeezenet, shufflenet = comparison.rows
    assert squeezenet["error"] is None and comparison.best == "squeezenet1_1"
    assert shufflenet["error"].startswith("WeightsNotAvailableError: ")
    assert squeezenet["feature_dim"] == 512

    saved = comparison.save(tmp_path / "report")
    checkpoint = torch.load(saved / "best.pt", weights_only=True)
    assert checkpoint["head_only"] is True  # the backbone is rebuilt from TORCH_HOME
    model, _, _ = vt.load_model(saved / "best.pt")
    evaluated = vt.Trainer(model, device="cpu", progress=False).evaluate(val, batch_size=8, num_workers=0)
    assert evaluated["accuracy"] == squeezenet["val_accuracy"]
    assert evaluated["loss"] == pytest.approx(squeezenet["val_loss"], rel=1e-5)


def test_a_second_comparison_and_a_later_fit_read_the_features_from_disk(cache: Path) -> None:
    train, val = blobs(32), blobs(16, seed=7)
    first = compare(train, val, {"toy": toy}, cache_dir=cache)
    assert first.rows[0]["cache"] == {"fit(train)": "on", "fit(val)": "on"}
    assert len(list(cache.glob("*.json"))) == 2  # fits in memory, and is on disk all the same

    second = compare(train, val, {"toy": toy}, cache_dir=cache)
    row = second.rows[0]
    assert row["cache"] == {"fit(train)": "on (from disk)", "fit(val)": "on (from disk)"}
    assert row["images_per_s"] is None  # no image went through the backbone
    assert row["val_loss"] == first.rows[0]["val_loss"]
    assert row["train_loss"] == first.rows[0]["train_loss"]

    later = trainer(toy(), cache_dir=cache)  # a plain Trainer, without persist_cache
    later.fit(train, val, epochs=1, batch_size=8, num_workers=0)
    assert later.cache_report == {"fit(train)": "on (from disk)", "fit(val)": "on (from disk)"}


def test_only_one_backbone_is_alive_at_a_time(cache: Path) -> None:
    built: list[weakref.ref[nn.Module]] = []
    alive_when_built: list[int] = []

    def tracked() -> nn.Module:
        alive_when_built.append(sum(ref() is not None for ref in built))
        model = toy()
        built.append(weakref.ref(model))
        return model

    def cyclic() -> nn.Module:
        model = tracked()
        model.__dict__["me"] = [model]  # a reference cycle: only the garbage collector frees it
        return model

    models = {"a": tracked, "b": cyclic, "c": tracked, "d": cyclic}
    comparison = compare(blobs(16), blobs(8), models, cache_dir=cache, epochs=1)
    assert alive_when_built == [0, 0, 0, 0]
    assert all(row["error"] is None for row in comparison.rows)


def test_modules_given_in_a_dict_are_copied_not_changed(cache: Path) -> None:
    mine = ToyVGG()
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    comparison = compare(blobs(16), blobs(8), {"mine": mine}, cache_dir=cache, epochs=1)
    assert comparison.rows[0]["error"] is None
    assert mine.classifier[-1].out_features == 1000 and all(p.requires_grad for p in mine.parameters())
    assert all(torch.equal(before[k], v) for k, v in mine.state_dict().items())


def test_save_writes_the_table_the_plot_and_the_best_checkpoint(cache: Path, tmp_path: Path) -> None:
    comparison = compare(
        blobs(16), blobs(8, seed=7), {"toy": toy, "blind": blind, "broken": lambda: 1 / 0}, cache_dir=cache
    )
    folder = comparison.save(tmp_path / "out" / "report")
    assert folder == tmp_path / "out" / "report"
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pt",
        "comparison.json",
        "comparison.md",
        "comparison.png",
    ]
    report = json.loads((folder / "comparison.json").read_text())
    assert report["best"] == "toy" and [r["name"] for r in report["rows"]] == ["toy", "blind", "broken"]
    assert report["rows"][2]["error"] == "ZeroDivisionError: division by zero"
    assert report["settings"]["epochs"] == 3
    assert (folder / "comparison.md").read_text() == comparison.to_markdown()
    assert comparison.to_markdown().startswith("| model | val accuracy | val loss | train accuracy |")
    with Image.open(folder / "comparison.png") as png:
        assert png.format == "PNG" and png.size == (700, 480)
    checkpoint = torch.load(folder / "best.pt", weights_only=True)
    assert checkpoint["head_only"] is False  # a random-init toy cannot be rebuilt from weights
    restored = toy()
    restored.load_state_dict(checkpoint["model"])
    evaluated = trainer(restored).evaluate(blobs(8, seed=7), batch_size=8, num_workers=0)
    assert evaluated["accuracy"] == comparison.rows[0]["val_accuracy"]


def test_the_temporary_checkpoint_goes_with_the_comparison(cache: Path, tmp_path: Path) -> None:
    comparison = compare(blobs(16), blobs(8), {"toy": toy}, cache_dir=cache, epochs=1)
    folder = comparison._checkpoint.folder
    assert (folder / "best.pt").is_file()
    del comparison
    gc.collect()
    assert not folder.exists()

    nobody = compare(blobs(16), blobs(8), {"broken": lambda: 1 / 0}, cache_dir=cache, epochs=1)
    saved = nobody.save(tmp_path / "none")
    assert sorted(p.name for p in saved.iterdir()) == ["comparison.json", "comparison.md", "comparison.png"]


class _Recording(TensorDataset):
    """Remembers which samples were read."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.read: set[int] = set()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        self.read.add(int(index))
        return super().__getitem__(index)


def _recording(n: int, ones: int, seed: int = 0) -> _Recording:
    labels = torch.tensor([0] * (n - ones) + [1] * ones)
    images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return _Recording(images, labels)


def test_max_images_takes_a_seeded_class_stratified_subset_and_cuts_val_alike(cache: Path) -> None:
    train, val = _recording(32, 16), _recording(16, 8, seed=1)
    comparison = compare(train, val, {"toy": toy}, cache_dir=cache, epochs=1, max_images=8, seed=3)
    settings = comparison.settings
    assert settings["train_images"] == 8 and settings["val_images"] == 4
    kept, kept_val = settings["train_positions"], settings["val_positions"]
    assert len(kept) == 8 and sum(i >= 16 for i in kept) == 4  # 4 of each class
    assert len(kept_val) == 4 and sum(i >= 8 for i in kept_val) == 2
    assert train.read - {0} <= set(kept) <= train.read  # beyond the first sample, checked up front
    again = compare(_recording(32, 16), val, {"toy": toy}, cache_dir=cache, epochs=1, max_images=8, seed=3)
    assert again.settings["train_positions"] == kept  # the same subset, so the same disk cache
    assert again.rows[0]["cache"] == {"fit(train)": "on (from disk)", "fit(val)": "on (from disk)"}
    other = compare(train, val, {"toy": toy}, cache_dir=cache, epochs=1, max_images=8, seed=4)
    assert len(other.settings["train_positions"]) == 8 and other.settings["train_positions"] != kept

    # 30 of class 0 and 2 of class 1: the small class keeps one
    rare = compare(_recording(32, 2), val, {"toy": toy}, cache_dir=cache, epochs=1, max_images=4)
    assert [i >= 30 for i in rare.settings["train_positions"]].count(True) == 1
    assert comparison.settings["max_images"] == 8 and [i >= 8 for i in rare.settings["val_positions"]] == [
        False,
        True,
    ]


class _SizeSpy(ToyVGG):
    """A ToyVGG that records the size of the images it sees."""

    def __init__(self, seen: list[int]) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(x.shape[-1]))
        return super().forward(x)


class _PILImages(Dataset):
    """A Dataset of PIL images without a transform attribute."""

    def __init__(self, images: list[Image.Image], labels: list[int]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], self.labels[index]


def test_folders_and_pil_datasets_get_each_backbones_preprocessing(tmp_path: Path, cache: Path) -> None:
    photos.class_folders(tmp_path / "train", {"cats": 3, "dogs": 3})
    photos.class_folders(tmp_path / "val", {"cats": 1, "dogs": 1}, seed=50)
    seen: dict[str, list[int]] = {"imagenet": [], "efficientnet": []}

    def spy(seen: list[int]) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same weights every time, so the same disk cache
            return _SizeSpy(seen)

    def imagenet() -> nn.Module:
        return spy(seen["imagenet"])

    def efficientnet() -> nn.Module:
        model = spy(seen["efficientnet"])
        record(model, weights="EfficientNet_B1_Weights.IMAGENET1K_V2")  # that preset: 240 px, bicubic
        return model

    models = {"imagenet": imagenet, "efficientnet": efficientnet}
    comparison = compare(tmp_path / "train", str(tmp_path / "val"), models, cache_dir=cache, epochs=1)
    assert [row["error"] for row in comparison.rows] == [None, None]
    assert set(seen["imagenet"]) == {224} and set(seen["efficientnet"]) == {240}
    assert comparison.settings["class_names"] == ["cats", "dogs"]
    assert all(row["cache"] == {"fit(train)": "on", "fit(val)": "on"} for row in comparison.rows)
    assert len(list(cache.glob("*.json"))) == 4  # the folders' files key the disk cache

    # the same folders as datasets: their keys are the folders'
    seen["imagenet"].clear()
    folder_data = DogsVsCats(tmp_path / "train")
    again = compare(
        folder_data, DogsVsCats(tmp_path / "val"), {"imagenet": imagenet}, cache_dir=cache, epochs=1
    )
    assert again.rows[0]["cache"] == {"fit(train)": "on (from disk)", "fit(val)": "on (from disk)"}
    assert seen["imagenet"] == [] and folder_data.transform is None  # the user's dataset is unchanged

    images = [photos.photo(label, seed) for label in (0, 1) for seed in range(2)]
    pil = compare(
        _PILImages(images, [0, 0, 1, 1]),
        _PILImages(images, [0, 0, 1, 1]),
        {"imagenet": imagenet},
        cache_dir=cache,
        epochs=1,
    )
    assert pil.rows[0]["error"] is None and set(seen["imagenet"]) == {224}
    assert pil.rows[0]["cache"] == {"fit(train)": "on", "fit(val)": "on"}  # in memory: no key to find it by


def _never_built() -> nn.Module:
    raise AssertionError("a backbone was built before the arguments were checked")


BAD_ARGUMENTS = [
    (
        {"models": []},
        ValueError,
        "compare_backbones: expected models to name at least one backbone but got an empty list",
    ),
    (
        {"models": {}},
        ValueError,
        "compare_backbones: expected models to name at least one backbone but got an empty dict",
    ),
    (
        {"models": "resnet18"},
        TypeError,
        "compare_backbones: expected models to be a list of torchvision architecture names, or a dict from name "
        "to an nn.Module or to a function that returns one, but got str; for one backbone write ['resnet18']",
    ),
    (
        {"models": ToyVGG()},
        TypeError,
        "compare_backbones: expected models to be a list of torchvision architecture names, or a dict from name "
        "to an nn.Module or to a function that returns one, but got ToyVGG",
    ),
    (
        {"models": ["resnet18", 50]},
        TypeError,
        "compare_backbones: expected every name in models to be a str such as 'resnet50' but got 50 (int); for "
        "your own models pass a dict from name to model",
    ),
    (
        {"models": ["resnet18", "resnet18"]},
        ValueError,
        "compare_backbones: expected distinct names in models but ['resnet18'] appear more than once; each "
        "name is a row of the comparison",
    ),
    (
        {"models": ["resnet81"]},
        ValueError,
        "compare_backbones: unknown architecture 'resnet81' in models; did you mean 'resnet18', 'resnet152', "
        "'resnet101'? "
        "expected torchvision classification models (see vt.classification_models()) or 'timm:NAME'",
    ),
    (
        {"models": {1: toy}},
        TypeError,
        "compare_backbones: expected every key of models to be a non-empty name (str) but got 1",
    ),
    (
        {"models": {"a": "resnet18"}},
        TypeError,
        "compare_backbones: expected models['a'] to be an nn.Module or a function that returns one but got "
        "'resnet18' (str); for torchvision names pass a list of names",
    ),
    (
        {"epochs": 0},
        ValueError,
        "compare_backbones: expected epochs to be a positive int (1 or more) but got 0",
    ),
    (
        {"epochs": 2.5},
        TypeError,
        "compare_backbones: expected epochs to be a positive int but got 2.5 (float)",
    ),
    (
        {"batch_size": 0},
        ValueError,
        "compare_backbones: expected batch_size to be a positive int (1 or more) but got 0",
    ),
    (
        {"lr": -1.0},
        ValueError,
        "compare_backbones: expected lr to be a finite number > 0 such as 1e-3 but got -1.0",
    ),
    ({"seed": -1}, ValueError, "compare_backbones: expected seed to be an int in [0, 2**63) but got -1"),
    (
        {"device": "gpu"},
        ValueError,
        "compare_backbones: expected device to be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device but got 'gpu'",
    ),
    (
        {"cache_dir": 5},
        TypeError,
        "compare_backbones: expected cache_dir to be a path (str or os.PathLike) or None but got 5",
    ),
    (
        {"progress": "yes"},
        TypeError,
        "compare_backbones: expected progress to be True or False but got 'yes'",
    ),
    (
        {"max_images": 0},
        ValueError,
        "compare_backbones: expected max_images to be a positive int (1 or more) but got 0",
    ),
    (
        {"max_images": True},
        TypeError,
        "compare_backbones: expected max_images to be a positive int but got True (bool)",
    ),
    (
        {"max_images": 1},
        ValueError,
        "compare_backbones: expected max_images to be at least the number of classes in the training data (2), "
        "so that each keeps an image, but got 1",
    ),
    (
        {"num_workers": -1},
        ValueError,
        "compare_backbones: expected num_workers to be None or an int >= 0 but got -1",
    ),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_ARGUMENTS)
def test_arguments_are_checked_before_any_backbone_is_built(
    options: dict[str, Any], error: type[Exception], message: str, cache: Path
) -> None:
    arguments = {"train": blobs(8), "val": blobs(4), "models": {"never": _never_built}, "cache_dir": cache}
    arguments.update(options)
    with pytest.raises(error) as info:
        vt.compare_backbones(**arguments)
    assert str(info.value) == message
    assert not cache.exists()


def _pil_with_transform() -> Dataset:
    data = _PILImages([photos.photo(0), photos.photo(1)], [0, 1])
    data.transform = lambda image: image.resize((32, 32))  # type: ignore[attr-defined]
    return data


BAD_DATA = [
    (
        lambda tmp: DataLoader(blobs(8)),
        TypeError,
        "compare_backbones(train): expected a Dataset or a folder but got a DataLoader; pass its dataset "
        "(compare_backbones batches it with batch_size and preprocesses it for each backbone)",
    ),
    (
        lambda tmp: None,
        TypeError,
        "compare_backbones(train): expected a folder of images (str or os.PathLike) or a torch Dataset of "
        "(image, label) samples but got NoneType",
    ),
    (
        lambda tmp: blobs(0),
        ValueError,
        "compare_backbones(train): the dataset is empty; expected at least one (image, label) sample",
    ),
    (
        lambda tmp: tmp / "missing",
        FileNotFoundError,
        "compare_backbones(train): the folder '{tmp}/missing' does not exist or is not a folder; expected a "
        "folder of images (one folder per class) or a Dataset",
    ),
    (
        lambda tmp: _pil_with_transform(),
        ValueError,
        "compare_backbones(train): the dataset yields PIL images through its own transform function, but "
        "compare_backbones preprocesses PIL images for each backbone as its weights expect; set its transform "
        "to None (each backbone's preprocessing is then used) or to one that returns tensors (then used for "
        "every backbone)",
    ),
    (
        lambda tmp: TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0.0, 1.0, 0.0, 1.0])),
        TypeError,
        "compare_backbones(train): expected the label of each sample to be an int class index but the first "
        "one is a torch.float32 tensor (tensor(0.)); labels are not rounded or converted",
    ),
    (
        lambda tmp: TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)),
        ValueError,
        "compare_backbones: the training data has 1 class(es) [0]; a classifier needs at least two: add data "
        "of another class",
    ),
    (
        lambda tmp: Named(blobs(8), ["cool", "warm", "hot"]),
        ValueError,
        "compare_backbones: the training data's classes ['cool', 'warm', 'hot'] differ from the validation "
        "data's ['cool', 'warm']; labels would be compared across different classes. Give both the same classes",
    ),
]


@pytest.mark.parametrize(("make", "error", "message"), BAD_DATA)
def test_data_errors_are_raised_before_any_backbone_is_built(
    make: Any, error: type[Exception], message: str, tmp_path: Path
) -> None:
    val = Named(blobs(4), ["cool", "warm"])
    with pytest.raises(error) as info:
        vt.compare_backbones(make(tmp_path), val, {"never": _never_built}, cache_dir=tmp_path / "c")
    assert str(info.value) == message.format(tmp=tmp_path)


def test_validation_labels_must_be_classes_of_the_training_data(tmp_path: Path) -> None:
    val = TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError) as info:
        vt.compare_backbones(blobs(8), val, {"never": _never_built}, cache_dir=tmp_path)
    assert str(info.value) == (
        "compare_backbones: the validation data has labels [2, 3] but the training data has 2 classes "
        "(labels 0 to 1); give both sets the same classes"
    )
    photos.kaggle_test(tmp_path / "test1", [0, 1])
    with pytest.raises(ValueError) as info:
        vt.compare_backbones(tmp_path / "test1", val, {"never": _never_built}, cache_dir=tmp_path)
    assert str(info.value).startswith(
        f"compare_backbones(train): the folder '{tmp_path / 'test1'}' holds unlabelled images"
    )


def test_save_without_matplotlib_says_what_to_install_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    comparison = vt.Comparison([{"name": "a", "val_accuracy": 0.5, "val_loss": 0.7, "error": None}])
    with pytest.raises(TypeError) as wrong:
        comparison.save(3)  # type: ignore[arg-type]
    assert str(wrong.value) == "Comparison.save: expected folder to be a path (str or os.PathLike) but got 3"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError) as missing:
        comparison.save(tmp_path / "report")
    assert str(missing.value) == (
        'Comparison.save needs matplotlib, which is not installed; install it with: pip install "vggtransfer[plots]"'
    )
    assert not (tmp_path / "report").exists()


def test_save_refuses_an_empty_path_or_a_file_and_drops_a_stale_best_checkpoint(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rows = [{"name": "a", "val_accuracy": None, "val_loss": None, "error": "RuntimeError: boom"}]
    failed = vt.Comparison(rows)
    with pytest.raises(ValueError) as error:
        failed.save("")
    assert str(error.value) == "Comparison.save: expected folder to be a folder's path but got an empty path"
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ValueError) as error:
        failed.save(tmp_path / "a-file")
    assert str(error.value) == (
        f"Comparison.save: expected folder to be a folder's path but got {str(tmp_path / 'a-file')!r}, "
        f"which is a file"
    )
    assert (tmp_path / "a-file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file"
    ]
    compare(blobs(16), blobs(8, seed=7), {"toy": toy}, cache_dir=cache).save(tmp_path / "report")
    assert (tmp_path / "report" / "best.pt").exists()
    failed.save(tmp_path / "report")  # a comparison without a best: no best.pt to contradict it
    assert not (tmp_path / "report" / "best.pt").exists()
    assert json.loads((tmp_path / "report" / "comparison.json").read_text())["best"] is None


def test_comparison_json_is_strict_json(tmp_path: Path) -> None:
    rows = [
        {"name": "a", "val_accuracy": 0.5, "val_loss": math.inf, "train_loss": math.nan, "error": None},
        {"name": "b", "val_accuracy": 0.75, "val_loss": 0.5, "feature_pass_s": 1.0, "error": None},
    ]
    settings = {"max_images": np.int64(4), "lr": np.float32(0.5)}
    vt.Comparison(rows, settings).save(tmp_path)
    text = (tmp_path / "comparison.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in comparison.json"))
    assert report["rows"][0]["val_loss"] is None and report["rows"][0]["train_loss"] is None
    assert report["settings"] == {"max_images": 4, "lr": 0.5}


def test_timm_names_are_checked_before_any_backbone_is_built() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ValueError) as error:
        compare(blobs(16), blobs(8, seed=7), ["squeezenet1_1", "timm:resnet181"])
    assert str(error.value).startswith(
        "compare_backbones: unknown timm model 'timm:resnet181'; did you mean 'timm:resnet18"
    )


def test_a_cache_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    expected = (
        f"expected cache_dir to be a folder but {str(tmp_path / 'file')!r} is a file; pass a folder's "
        f"path (it is created if missing), or None for the default cache folder"
    )
    with pytest.raises(ValueError) as error:
        compare(blobs(16), blobs(8, seed=7), {"toy": toy}, cache_dir=tmp_path / "file")
    assert str(error.value) == f"compare_backbones: {expected}"
    with pytest.raises(ValueError) as error:
        trainer(cache_dir=tmp_path / "file")
    assert str(error.value) == f"Trainer: {expected}"
    assert (tmp_path / "file").read_text() == "mine"
