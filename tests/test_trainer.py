from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import vggtransfer as vt
from helpers import Named, blobs, toy, trainer, weights_equal


def test_fit_learns_loss_down_accuracy_up() -> None:
    data = blobs(64)
    t = trainer()
    history = t.fit(data, blobs(32, seed=1), epochs=4, batch_size=16, num_workers=0)
    assert len(history) == 4 and t.epoch == 4
    assert history["train_loss"][-1] < history["train_loss"][0] * 0.5
    assert history["val_accuracy"][-1] >= 0.9
    assert set(history.last) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "lr",
        "time_s",
    }
    assert all(0.0 <= a <= 1.0 for a in history["train_accuracy"])


def test_fit_keeps_frozen_batchnorm_bitwise_across_epochs() -> None:
    t = trainer()
    before = {k: v.clone() for k, v in t.model.features.state_dict().items()}
    t.fit(blobs(), epochs=3, batch_size=16, num_workers=0)
    after = t.model.features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_epochs_is_the_total_to_reach() -> None:
    t = trainer()
    t.fit(blobs(), epochs=2, batch_size=16, num_workers=0)
    t.fit(blobs(), epochs=3, batch_size=16, num_workers=0)
    assert t.epoch == 3 and t.history["epoch"] == [1, 2, 3]
    t.fit(blobs(), epochs=3, batch_size=16, num_workers=0)  # nothing left to do
    assert len(t.history) == 3


def test_default_optimizer_holds_only_trainable_parameters() -> None:
    t = trainer()
    held = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in t.model.parameters() if p.requires_grad}
    assert isinstance(t.optimizer, torch.optim.Adam)


def test_optimizer_with_frozen_parameters_warns_with_hint() -> None:
    model = toy()
    with pytest.warns(
        UserWarning,
        match=r"the optimizer holds \d+ frozen parameters .* HINT: build the optimizer from the trainable parameters only",
    ):
        vt.Trainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", progress=False)


def test_model_without_trainable_parameters_is_refused() -> None:
    model = toy().requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no trainable parameters"):
        vt.Trainer(model, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"device": "tpu"},
            "Trainer: expected device to be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device but got 'tpu'",
        ),
        ({"device": "cuda"}, "Trainer: device 'cuda' was requested but CUDA is not available"),
        (
            {"precision": "fp8"},
            "Trainer: expected precision to be 'auto', 'fp32', 'bf16' or 'fp16' but got 'fp8'",
        ),
        ({"precision": "fp16", "device": "cpu"}, "Trainer: precision='fp16' needs a GPU"),
    ],
)
def test_device_and_precision_errors(kwargs: dict, message: str) -> None:
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        vt.Trainer(nn.Linear(4, 2), **kwargs)


def test_auto_device_and_precision_on_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    t = vt.Trainer(toy(), progress=False)
    assert t.device.type in ("cpu", "mps") and t.precision.name == "fp32"


@pytest.mark.filterwarnings("ignore:Trainer. precision=.bf16. on a CPU without native")
def test_bf16_autocast_trains_on_cpu() -> None:
    t = trainer(precision="bf16")
    history = t.fit(blobs(), epochs=2, batch_size=16, num_workers=0)
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_user_dataloader_and_class_names_from_dataset() -> None:
    t = vt.Trainer(toy(), device="cpu", seed=0, progress=False)
    loader = DataLoader(Named(blobs(), ["cool", "warm"]), batch_size=16, shuffle=True)
    t.fit(loader, epochs=1)
    assert t.class_names == ["cool", "warm"]
    with pytest.raises(
        ValueError,
        match=r"the training data's classes \['a', 'b'\] differ from the Trainer's class_names \['cool', 'warm'\]",
    ):
        t.fit(Named(blobs(), ["a", "b"]), epochs=2, num_workers=0)


def test_bad_datasets_are_explained_before_training() -> None:
    class PILData(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int):
            return Image.new("RGB", (32, 32)), 0

    t = trainer()
    with pytest.raises(
        TypeError,
        match="expected the image of each sample to be a tensor but the first one is a Image; give the dataset a transform",
    ):
        t.fit(PILData(), epochs=1)
    with pytest.raises(ValueError, match="fit\\(train\\): the dataset is empty"):
        t.fit(TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)), epochs=1)
    with pytest.raises(
        TypeError, match="expected a torch Dataset \\(with __len__\\) or a DataLoader but got list"
    ):
        t.fit([1, 2, 3], epochs=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected epochs to be an int >= 0"):
        t.fit(blobs(), epochs=-1)
    assert t.epoch == 0


def test_evaluate_reports_confusion_matrix_and_per_class_metrics() -> None:
    t = trainer()
    t.fit(blobs(64), epochs=3, batch_size=16, num_workers=0)
    # a validation set of 10 warm and 6 cool images
    data = blobs(32, seed=5)
    keep = [i for i in range(32) if data[i][1] == 1][:10] + [i for i in range(32) if data[i][1] == 0][:6]
    subset = TensorDataset(data.tensors[0][keep], data.tensors[1][keep])
    report = t.evaluate(subset, num_workers=0)
    matrix = report["confusion_matrix"]
    assert report["class_names"] == ["cool", "warm"] and report["count"] == 16
    assert [sum(row) for row in matrix] == [6, 10]
    correct = matrix[0][0] + matrix[1][1]
    assert report["accuracy"] == pytest.approx(correct / 16)
    warm = report["per_class"]["warm"]
    assert warm["support"] == 10
    assert warm["recall"] == pytest.approx(matrix[1][1] / 10)
    predicted_warm = matrix[0][1] + matrix[1][1]
    assert warm["precision"] == pytest.approx(matrix[1][1] / predicted_warm if predicted_warm else 0.0)
    assert 0 < report["loss"] < 1


def test_predict_tensors_single_and_batch_in_eval_mode() -> None:
    t = trainer()
    t.fit(blobs(64), epochs=3, batch_size=16, num_workers=0)
    images, labels = blobs(8, seed=9).tensors
    t.model.train()
    single = t.predict(images[0])
    assert isinstance(single, vt.Prediction)
    with torch.no_grad():
        expected = t.model.eval()(images[:1]).softmax(dim=1)[0]
    t.model.train()
    assert single.index == int(expected.argmax()) and single.label == ["cool", "warm"][single.index]
    assert list(single.probabilities) == ["cool", "warm"]
    assert list(single.probabilities.values()) == pytest.approx(expected.tolist(), abs=1e-6)
    batch = t.predict(images, batch_size=3)
    assert [p.index for p in batch] == labels.tolist()
    assert t.model.training  # mode restored
    again = t.predict(images[0])
    assert again.probabilities == single.probabilities  # no dropout: eval mode


def test_predict_real_photos_in_every_mode(pet_photos: list[Path], tmp_path: Path) -> None:
    model = vt.replace_classifier(vt.freeze_features(vt.create_model("vgg11", weights=None)), 2)
    t = vt.Trainer(
        model,
        device="cpu",
        progress=False,
        class_names=["cat", "dog"],
        transform=vt.imagenet_transform(size=64),
    )
    source = pet_photos[0]
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    variants = {
        "palette.png": rgb.quantize(64),
        "grey.png": rgb.convert("L"),
        "alpha.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "grey16.png": Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257),
    }
    paths = [source]
    for name, image in variants.items():
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    predictions = t.predict(paths)
    assert len(predictions) == len(paths)
    # each file gives what the model says about its transformed pixels
    for path, prediction in zip(paths, predictions, strict=True):
        with Image.open(path) as image, torch.no_grad():
            expected = t.model.eval()(t.transform(image)[None]).softmax(dim=1)[0]
        assert list(prediction.probabilities.values()) == pytest.approx(expected.tolist(), abs=1e-5)
        assert prediction.label == ["cat", "dog"][int(expected.argmax())]
    # a PIL image and its path give the same answer (batch of 1 vs 6: float rounding only)
    with Image.open(source) as image:
        assert t.predict(image).probabilities == pytest.approx(predictions[0].probabilities, abs=1e-5)


def test_predict_honours_exif_orientation(pet_photos: list[Path], tmp_path: Path) -> None:
    model = vt.replace_classifier(vt.create_model("vgg11", weights=None), 2)
    t = vt.Trainer(model, device="cpu", progress=False, transform=vt.imagenet_transform(size=64))
    with Image.open(pet_photos[3]) as image:
        upright = image.convert("RGB")
    # store the photo rotated, with an EXIF tag that says how to turn it upright
    exif = Image.Exif()
    exif[0x0112] = 8  # display rotated 90 degrees counter-clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_270)
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=100)
    with Image.open(path) as image:
        restored = vt.to_rgb(image)
    assert restored.size == upright.size
    expected = t.predict(restored).probabilities
    assert t.predict(path).probabilities == pytest.approx(expected)
    assert t.predict(stored).probabilities != pytest.approx(expected)


def test_predict_input_errors(tmp_path: Path) -> None:
    t = trainer()
    with pytest.raises(FileNotFoundError, match="predict: image file '.*missing.jpg' does not exist"):
        t.predict(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="predict: cannot read '.*notes.jpg' as an image"):
        t.predict(str(tmp_path / "notes.jpg"))
    with pytest.raises(
        TypeError,
        match="predict: expected an image path, a PIL image, a tensor \\[C, H, W\\] or \\[B, C, H, W\\], or a non-empty list of these, but got int",
    ):
        t.predict(3)  # type: ignore[arg-type]


def test_early_stopping_stops_and_restores_best_weights() -> None:
    # Learning rate far too high: validation loss gets worse after the first epochs.
    t = trainer(lr=0.05)
    stopper = vt.EarlyStopping(monitor="val_loss", patience=1)

    history = t.fit(
        blobs(48), blobs(32, seed=3), epochs=12, batch_size=8, num_workers=0, early_stopping=stopper
    )
    losses = history["val_loss"]
    best_epoch = 1 + losses.index(min(losses))
    assert len(history) < 12, "should have stopped early"
    assert len(history) == best_epoch + 1  # patience 1: one epoch without improvement
    # the restored weights reproduce the best validation loss
    assert t.evaluate(blobs(32, seed=3), num_workers=0)["loss"] == pytest.approx(min(losses), rel=1e-5)


def test_early_stopping_needs_validation_for_val_metric() -> None:
    with pytest.raises(
        ValueError, match="early stopping monitors 'val_accuracy' but no validation data was given"
    ):
        trainer().fit(blobs(), epochs=1, early_stopping=vt.EarlyStopping(monitor="val_accuracy"))
    with pytest.raises(ValueError, match="EarlyStopping: expected monitor to be 'val_loss'"):
        vt.EarlyStopping(monitor="loss")


def test_checkpoint_dir_keeps_last_and_best(tmp_path: Path) -> None:
    t = trainer(lr=0.05)
    history = t.fit(
        blobs(48), blobs(32, seed=3), epochs=5, batch_size=8, num_workers=0, checkpoint_dir=tmp_path
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 5
    losses = history["val_loss"]
    assert best["trainer"]["epoch"] == 1 + losses.index(min(losses))


class NaNAt(Dataset):
    """Clean blobs, except one sample whose image is NaN."""

    def __init__(self, index: int) -> None:
        self.data, self.index = blobs(32), index

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image, label = self.data[i]
        return (torch.full_like(image, float("nan")) if i == self.index else image), label


def test_nan_loss_stops_with_epoch_and_step_and_writes_no_nan_checkpoint(tmp_path: Path) -> None:
    t = trainer()
    loader = DataLoader(NaNAt(index=20), batch_size=8, shuffle=False)  # sample 20 is in step 3
    with pytest.raises(
        FloatingPointError,
        match=r"fit: the loss became nan at epoch 1, step 3; training stopped before the optimizer applied it",
    ):
        t.fit(loader, epochs=2, checkpoint_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_save_checkpoint_refuses_nan_weights(tmp_path: Path) -> None:
    t = trainer()
    with torch.no_grad():
        t.model.classifier[0].weight[0, 0] = float("nan")
    with pytest.raises(
        vt.CheckpointError,
        match=r"save_checkpoint: the model holds NaN or infinite values in 1 tensors \(first: classifier.0.weight\)",
    ):
        t.save_checkpoint(tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


class InterruptAt(Dataset):
    """Raises KeyboardInterrupt, as Ctrl-C would, when sample ``index`` is read in epoch 2."""

    def __init__(self, index: int) -> None:
        self.data, self.index, self.reads = blobs(32), index, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads == len(self.data) + self.index:
            raise KeyboardInterrupt
        return self.data[i]


def test_ctrl_c_saves_loadable_interrupted_checkpoint_and_reraises(tmp_path: Path) -> None:
    t = trainer()
    with pytest.raises(KeyboardInterrupt):
        t.fit(InterruptAt(10), epochs=3, batch_size=8, num_workers=0, checkpoint_dir=tmp_path)
    path = tmp_path / "interrupted.pt"
    assert path.is_file()
    resumed = trainer()
    resumed.load_checkpoint(path)
    assert resumed.epoch == 1 and weights_equal(resumed.model, t.model)
    assert torch.load(path, weights_only=True)["trainer"]["interrupted"] is True
    resumed.fit(blobs(32), epochs=3, batch_size=8, num_workers=0)
    assert resumed.epoch == 3


def test_progress_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    t = trainer(progress=True)
    t.fit(blobs(), blobs(16, seed=2), epochs=2, batch_size=16, num_workers=0)
    all_lines = capsys.readouterr().err.strip().splitlines()
    assert all_lines[0].startswith(
        "feature caching: 48 samples of fit(train) through the frozen backbone once"
    )
    assert all_lines[1].startswith("feature caching: 16 samples of fit(val)")
    lines = all_lines[2:]
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2  train loss ")
    assert " val loss " in lines[0] and " acc " in lines[0] and lines[0].endswith("s")


def test_progress_bar_on_a_terminal_shows_loss_and_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    t = trainer(progress=True)
    t.fit(blobs(), epochs=1, batch_size=16, num_workers=0)
    output = terminal.getvalue()
    assert "img/s" in output and "loss=" in output and "epoch 1/1  train loss" in output


def test_progress_false_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    trainer(progress=False).fit(blobs(), epochs=1, batch_size=16, num_workers=0)
    assert capsys.readouterr() == ("", "")


def test_history_json_round_trip_and_plot(tmp_path: Path) -> None:
    t = trainer()
    history = t.fit(blobs(), blobs(16, seed=2), epochs=2, batch_size=16, num_workers=0)
    path = history.save_json(tmp_path / "history.json")
    assert vt.History.load_json(path) == history
    assert json.loads(path.read_text())["records"][1]["epoch"] == 2
    png = history.plot(tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size == (1000, 400)


def test_history_reads_like_a_list_of_epoch_records() -> None:
    history = vt.History([{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}])
    assert [record["epoch"] for record in history] == [1, 2]
    assert list(history) == history.records and history[-1] == {"epoch": 2, "train_loss": 0.25}
    next(iter(history))["epoch"] = 99  # records handed out are copies
    assert history["epoch"] == [1, 2]
    with pytest.raises(IndexError, match="History has 2 epoch records; index 5 is out of range"):
        history[5]
    with pytest.raises(
        KeyError, match="History has no metric 'val_loss'; it has \\['epoch', 'train_loss'\\]"
    ):
        history["val_loss"]


def test_load_model_device_errors_name_load_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^load_model: expected device to be 'auto', 'cpu'"):
        vt.load_model(tmp_path / "missing.pt", device="tpu")


def test_history_plot_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    history = vt.History([{"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.7}])
    with pytest.raises(
        ModuleNotFoundError,
        match=r'History.plot needs matplotlib, which is not installed; install it with: pip install "vggtransfer\[plots\]"',
    ):
        history.plot(tmp_path / "curves.png")


def test_trainer_unfreeze_adds_feature_group_at_lower_lr() -> None:
    t = trainer(lr=1e-3)
    t.unfreeze_features()
    assert [group["lr"] for group in t.optimizer.param_groups] == [1e-3, 1e-4]
    assert all(p.requires_grad for p in t.model.parameters())
    before = t.model.features[0].weight.clone()
    t.fit(blobs(), epochs=1, batch_size=16, num_workers=0)
    assert not torch.equal(before, t.model.features[0].weight)


def test_scheduler_factory_is_stepped_per_epoch() -> None:
    t = trainer(
        lr=1e-3,
        scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
    )
    history = t.fit(blobs(), epochs=3, batch_size=16, num_workers=0)
    assert history["lr"] == pytest.approx([1e-3, 5e-4, 2.5e-4])


class ReadLog(Dataset):
    """Blobs that note every read, with the reading process's id, in a file (works across processes)."""

    def __init__(self, log: Path) -> None:
        self.data, self.log = blobs(32), log

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        with self.log.open("a") as file:
            file.write(f"{os.getpid()} {i}\n")
        return self.data[i]


def test_loader_workers_only_feed_the_one_feature_pass(tmp_path: Path) -> None:
    log = tmp_path / "reads.txt"
    t = trainer(cache_features=True)  # ReadLog has no transform to inspect: trust it
    history = t.fit(ReadLog(log), epochs=3, batch_size=8, num_workers=2)
    reads = [line.split() for line in log.read_text().splitlines()]
    main = [i for pid, i in reads if int(pid) == os.getpid()]
    in_workers = sorted(int(i) for pid, i in reads if int(pid) != os.getpid())
    assert main == ["0"]  # the first-sample check, before any loader starts
    assert in_workers == list(range(32))  # every sample read once, by the workers, for 3 epochs
    assert t.cache_report["fit(train)"] == "on" and len(history) == 3
    alone = trainer(cache_features=True)
    alone.fit(blobs(32), epochs=3, batch_size=8, num_workers=0)
    assert history["train_loss"] == pytest.approx(alone.history["train_loss"], rel=1e-6)


def test_custom_loss_fn_and_non_vggtransfer_model() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    calls = []

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)

    t = vt.Trainer(Tiny(), loss_fn=loss_fn, device="cpu", progress=False, seed=0)
    t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    assert len(calls) == 2
    image = blobs(2).tensors[0][0]
    prediction = t.predict(image)
    with torch.no_grad():
        index = int(t.model.eval()(image[None]).argmax())
    assert (prediction.index, prediction.label) == (index, str(index))  # no class names: indices


# ---------------------------------------------------------------------------- bad arguments, bad data

TRAINER_ARGUMENT_ERRORS = [
    ({"lr": "x"}, TypeError, "Trainer: expected lr to be a number such as 1e-3 but got 'x' (str)"),
    ({"lr": -1.0}, ValueError, "Trainer: expected lr to be a finite number > 0 such as 1e-3 but got -1.0"),
    (
        {"seed": "abc"},
        TypeError,
        "Trainer: expected seed to be None or an int in [0, 2**63) but got 'abc' (str)",
    ),
    (
        {"seed": 1.5},
        TypeError,
        "Trainer: expected seed to be None or an int in [0, 2**63) but got 1.5 (float)",
    ),
    ({"seed": 2**70}, ValueError, f"Trainer: expected seed to be an int in [0, 2**63) but got {2**70}"),
    (
        {"optimizer": "adam"},
        TypeError,
        "Trainer: expected optimizer to be a torch.optim.Optimizer or None but got 'adam'",
    ),
    (
        {"scheduler": 5},
        TypeError,
        "Trainer: expected scheduler to be a torch LR scheduler, a function that makes one",
    ),
    (
        {"loss_fn": 5},
        TypeError,
        "Trainer: expected loss_fn to be callable, such as nn.CrossEntropyLoss(), but got 5",
    ),
    (
        {"transform": "resize"},
        TypeError,
        "Trainer: expected transform to be callable, such as vt.imagenet_transform()",
    ),
    (
        {"cache_dir": 5},
        TypeError,
        "Trainer: expected cache_dir to be a path (str or os.PathLike) or None but got 5",
    ),
    (
        {"class_names": "cats"},
        TypeError,
        "Trainer: expected class_names to be a list of strings, one per class",
    ),
    (
        {"class_names": ["cat", "cat"]},
        ValueError,
        "Trainer: class_names must be distinct but ['cat'] appear more",
    ),
    (
        {"class_names": ["a", "b", "c"]},
        ValueError,
        "Trainer: got 3 class_names ['a', 'b', 'c'] but the model has 2 outputs",
    ),
    ({"class_names": [1, 2]}, TypeError, "Trainer: expected every class name to be a str but got 1 (int)"),
    (
        {"channels_last": "yes"},
        TypeError,
        "Trainer: expected channels_last to be 'auto', True or False but got 'yes'",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), TRAINER_ARGUMENT_ERRORS)
def test_bad_trainer_arguments_are_refused_before_anything_changes(
    kwargs: dict, error: type, message: str
) -> None:
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as raised:
        vt.Trainer(model, device="cpu", progress=False, **kwargs)
    assert str(raised.value).startswith(message)
    assert all(  # the model was not moved or changed
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )


def test_numpy_values_are_accepted_where_python_ones_are(tmp_path: Path) -> None:
    t = vt.Trainer(toy(), device="cpu", progress=False, lr=np.float64(1e-3), seed=np.int64(7),
                   class_names=np.array(["cool", "warm"]))  # fmt: skip
    assert (t.lr, t.seed, t.class_names) == (1e-3, 7, ["cool", "warm"])
    assert type(t.lr) is float and type(t.seed) is int
    t.fit(blobs(16), epochs=1, batch_size=np.int64(8), num_workers=np.int64(0))
    assert len(t.history) == 1


def test_one_output_with_cross_entropy_is_refused_with_the_two_ways_out() -> None:
    with pytest.raises(
        ValueError, match=r"^Trainer: the model has 1 output, and the default loss .* is then 0"
    ):
        vt.Trainer(toy(num_classes=1), device="cpu", progress=False)
    vt.Trainer(toy(num_classes=1), device="cpu", progress=False, loss_fn=lambda logits, y: logits.sum())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"batch_size": None},
            TypeError,
            "fit: expected batch_size to be a positive int but got None (NoneType)",
        ),
        (
            {"batch_size": 0},
            ValueError,
            "fit: expected batch_size to be a positive int (1 or more) but got 0",
        ),
        (
            {"num_workers": "2"},
            TypeError,
            "fit: expected num_workers to be None (automatic) or an int >= 0 but got '2'",
        ),
        ({"num_workers": -1}, ValueError, "fit: expected num_workers to be None or an int >= 0 but got -1"),
        ({"num_workers": 2**40}, ValueError, f"fit: num_workers={2**40} loader processes for"),
        (
            {"batch_size": 2**63},
            ValueError,
            f"fit: expected batch_size to be at most {2**31} but got {2**63}",
        ),
        (
            {"early_stopping": 5},
            TypeError,
            "fit: expected early_stopping to be a vt.EarlyStopping or None but got int",
        ),
        (
            {"checkpoint_dir": 5},
            TypeError,
            "fit: expected checkpoint_dir to be a folder path (str or os.PathLike)",
        ),
        (
            {"epochs": 2.0},
            TypeError,
            "fit: expected epochs to be an int >= 0 (the total to reach) but got 2.0 (float)",
        ),
        (
            {"epochs": -1},
            ValueError,
            "fit: expected epochs to be an int >= 0 (the total to reach) but got -1",
        ),
    ],
)
def test_bad_fit_arguments_are_refused_before_training(kwargs: dict, error: type, message: str) -> None:
    t = trainer()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(error) as raised:
        t.fit(blobs(16), **{"epochs": 1, **kwargs})
    assert str(raised.value).startswith(message)
    assert t.epoch == 0 and all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_predict_batch_size_and_mixed_sizes_are_checked() -> None:
    t = trainer()
    with pytest.raises(
        ValueError, match=r"^predict: expected batch_size to be a positive int \(1 or more\) but got 0$"
    ):
        t.predict(torch.zeros(3, 32, 32), batch_size=0)
    assert len(t.predict(torch.zeros(3, 3, 32, 32), batch_size=np.int64(2))) == 3
    with pytest.raises(
        ValueError,
        match=r"^predict: the inputs have different sizes after preprocessing \(\[\[3, 32, 32\], \[3, 48, 48\]\]\)",
    ):
        t.predict([torch.zeros(3, 32, 32), torch.zeros(3, 48, 48)])


def test_unfreeze_learning_rate_is_checked() -> None:
    t = trainer()
    with pytest.raises(
        TypeError, match=r"^unfreeze_features: expected lr to be a number such as 1e-3 but got 'x' \(str\)"
    ):
        t.unfreeze_features(lr="x")  # type: ignore[arg-type]
    assert t.unfreeze_lr is None and len(t.optimizer.param_groups) == 1


def _labelled(labels: list[int] | torch.Tensor) -> TensorDataset:
    images = blobs(len(labels)).tensors[0]
    return TensorDataset(images, torch.as_tensor(labels))


class Listed(Dataset):
    """Samples from a list, so that labels are only seen batch by batch (nothing to read up front)."""

    def __init__(self, samples: list) -> None:
        self.samples_ = samples

    def __len__(self) -> int:
        return len(self.samples_)

    def __getitem__(self, i: int):
        return self.samples_[i]


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            2,
            "fit(train): label 2 is out of range for a model with 2 outputs; labels must be class indices 0 to 1.",
        ),
        (-1, "fit(train): label -1 is out of range for a model with 2 outputs"),
        (
            -100,
            "fit(train): label -100 is out of range for a model with 2 outputs; labels must be class indices 0 to 1 (-100 is cross-entropy's ignore_index",
        ),
    ],
)
def test_out_of_range_labels_are_named(bad: int, message: str, cache: bool) -> None:
    labels = [0, 1] * 7 + [bad, 0]
    # Labels a TensorDataset holds are checked before training; others batch by batch, before the
    # batch reaches the loss (here the second batch: one step is done).
    known, listed = _labelled(labels), Listed(list(zip(blobs(16).tensors[0], labels, strict=True)))
    for data, steps in ((known, 0), (listed, 0 if cache else 1)):
        t = trainer(cache_features=cache)
        with pytest.raises(ValueError) as raised:
            t.fit(data, epochs=1, batch_size=8, num_workers=0)
        assert str(raised.value).startswith(message)
        assert t.epoch == 0 and t.global_step == steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_float_and_bool_labels_are_a_type_error_on_both_paths(dtype: torch.dtype) -> None:
    labels = torch.tensor([0, 1] * 8).to(dtype)
    for cache in (True, False):
        with pytest.raises(
            TypeError,
            match=f"expected integer class indices as labels but got a {dtype} tensor|the first one is a {dtype} tensor",
        ):
            trainer(cache_features=cache).fit(_labelled(labels), epochs=1, batch_size=8, num_workers=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_images_of_different_sizes_in_a_batch_are_explained(workers: int) -> None:
    samples = [(torch.randn(3, 32, 32), 0)] * 5 + [(torch.randn(3, 48, 40), 1)] * 3
    t = trainer(cache_features=False)
    with pytest.raises(ValueError) as raised:
        t.fit(Listed(samples), epochs=1, batch_size=8, num_workers=workers)
    assert str(raised.value) == (
        "fit(train): the images of one batch have different sizes, [3, 32, 32] and [3, 48, 40], so they "
        "cannot be stacked; give the dataset a transform that gives every image one size, e.g. "
        "vt.imagenet_transform() (resize and centre crop)"
    )


def test_single_class_data_on_a_two_output_model_is_refused_before_training(tmp_path: Path) -> None:
    t = vt.Trainer(toy(), device="cpu", progress=False)
    with pytest.raises(
        ValueError, match=r"^fit: the training data has 1 classes \['cat'\] but the model has 2 outputs"
    ):
        t.fit(
            Named(_labelled([0] * 8), ["cat"]), epochs=1, batch_size=4, num_workers=0, checkpoint_dir=tmp_path
        )
    assert list(tmp_path.iterdir()) == [] and t.class_names is None


def test_unwritable_checkpoint_dir_is_found_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    t = trainer()
    with pytest.raises(OSError, match=r"^\[Errno \d+\] fit: checkpoint_dir '.*a-file/run' cannot be written"):
        t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0, checkpoint_dir=blocker / "run")
    assert t.epoch == 0
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    with (
        _read_only(readonly),
        pytest.raises(
            OSError, match=r"fit: checkpoint_dir '.*readonly' cannot be written \((Read-only|Permission)"
        ),
    ):
        t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0, checkpoint_dir=readonly)
    assert t.epoch == 0 and list(readonly.iterdir()) == []


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` made unwritable: a read-only tmpfs mounted on it as root (root ignores permissions)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_one_output_model_trains_with_its_own_loss_and_float_labels() -> None:
    # The way out the one-output error recommends: labels are then not class indices, and are not checked.
    def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets.float())

    data = blobs(32)
    floats = TensorDataset(data.tensors[0], data.tensors[1].float())
    for labels in (data, floats):
        t = vt.Trainer(toy(num_classes=1), device="cpu", progress=False, seed=0, loss_fn=bce)
        history = t.fit(labels, epochs=3, batch_size=8, num_workers=0)
        assert history["train_loss"][-1] < history["train_loss"][0]


def test_a_float_label_after_int_ones_is_caught_on_the_cached_path_too() -> None:
    samples = [(image, 0 if i < 8 else 1.0) for i, image in enumerate(blobs(16).tensors[0])]
    with pytest.raises(
        TypeError, match=r"^fit\(train\): expected integer class indices as labels but got a torch.float"
    ):
        trainer(cache_features=True).fit(Listed(samples), epochs=1, batch_size=8, num_workers=0)


def test_predict_refuses_a_fifo_instead_of_waiting_for_it(tmp_path: Path) -> None:
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    with pytest.raises(
        ValueError, match=r"^predict: '.*camera.jpg' is not a regular file; give the path of an image file"
    ):
        trainer().predict(fifo)
