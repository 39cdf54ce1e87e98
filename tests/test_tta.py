"""Test-time augmentation: evaluate and predict average the softmax of each image and its mirror image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import photos
import vggtransfer as vt
from helpers import ToyVGG, blobs, toy, trainer

TTA_OFF = "off: tta=True needs each image flipped, which cached features do not hold"


def _mean_softmax(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """By hand: the mean of the softmaxes of the images and of their horizontal flips."""
    with torch.no_grad():
        model.eval()
        return (model(images).softmax(dim=1) + model(images.flip(-1)).softmax(dim=1)) / 2


def _probabilities(predictions: list[vt.Prediction]) -> torch.Tensor:
    return torch.tensor([list(p.probabilities.values()) for p in predictions])


def test_predict_tta_is_the_mean_of_the_two_softmaxes_and_restores_the_mode() -> None:
    t = trainer()
    images = blobs(7, seed=3).tensors[0]
    expected = _mean_softmax(t.model, images)
    t.model.train()
    averaged = t.predict(images, batch_size=3, tta=True)
    assert t.model.training  # mode restored
    assert torch.allclose(_probabilities(averaged), expected, rtol=0, atol=1e-6)
    assert [p.index for p in averaged] == expected.argmax(dim=1).tolist()
    assert [p.label for p in averaged] == [["cool", "warm"][i] for i in expected.argmax(dim=1).tolist()]
    plain = _probabilities(t.predict(images, batch_size=3))
    assert (plain - expected).abs().max() > 1e-3  # the flip matters for this model
    single = t.predict(images[0], tta=True)
    assert isinstance(single, vt.Prediction)
    assert list(single.probabilities.values()) == pytest.approx(expected[0].tolist(), abs=1e-6)


def test_predict_tta_on_paths_pil_images_and_uint8_tensors(tmp_path: Path) -> None:
    t = trainer(transform=vt.imagenet_transform(size=32))
    path = photos.save(photos.photo(photos.CAT, 1), tmp_path / "cat.jpg")
    with Image.open(path) as opened:
        pil = photos.photo(photos.DOG, 2)
        preprocessed = torch.stack([t.transform(opened), t.transform(pil)])
        raw = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    expected = _mean_softmax(t.model, preprocessed)
    from_path = t.predict(path, tta=True)
    from_str = t.predict(str(path), tta=True)
    from_pil = t.predict(pil, tta=True)
    from_list = t.predict([path, pil], tta=True)
    from_uint8 = t.predict(raw, tta=True)
    from_uint8_batch = t.predict(raw[None], tta=True)
    assert isinstance(from_path, vt.Prediction) and isinstance(from_pil, vt.Prediction)
    assert list(from_path.probabilities.values()) == pytest.approx(expected[0].tolist(), abs=1e-6)
    assert from_str.probabilities == from_path.probabilities
    assert list(from_pil.probabilities.values()) == pytest.approx(expected[1].tolist(), abs=1e-6)
    assert torch.allclose(_probabilities(from_list), expected, rtol=0, atol=1e-6)
    assert list(from_uint8.probabilities.values()) == pytest.approx(expected[1].tolist(), abs=1e-6)
    assert list(from_uint8_batch[0].probabilities.values()) == pytest.approx(expected[1].tolist(), abs=1e-6)
    # the flip is of the preprocessed tensor: not the same as without TTA
    assert list(t.predict(path).probabilities.values()) != pytest.approx(expected[0].tolist(), abs=1e-4)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_evaluate_tta_loss_accuracy_and_confusion_equal_hand_computed(smoothing: float) -> None:
    t = trainer(loss_fn=nn.CrossEntropyLoss(label_smoothing=smoothing), cache_features=False)
    t.fit(blobs(32), epochs=1, batch_size=8, num_workers=0)
    images, labels = blobs(11, seed=4).tensors
    mean = _mean_softmax(t.model, images)
    t.model.train()
    report = t.evaluate(TensorDataset(images, labels), batch_size=4, num_workers=0, tta=True)
    assert t.model.training  # mode restored
    expected_loss = nn.functional.cross_entropy(mean.log(), labels, label_smoothing=smoothing)
    if smoothing == 0.0:  # the negative log of the averaged probability of the true class
        assert float(expected_loss) == pytest.approx(float(-mean[torch.arange(11), labels].log().mean()))
    assert report["loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    predicted = mean.argmax(dim=1)
    assert report["accuracy"] == pytest.approx(float((predicted == labels).double().mean()))
    matrix = [[int(((labels == i) & (predicted == j)).sum()) for j in range(2)] for i in range(2)]
    assert report["confusion_matrix"] == matrix and report["count"] == 11
    plain = t.evaluate(TensorDataset(images, labels), batch_size=4, num_workers=0)
    assert abs(plain["loss"] - report["loss"]) > 1e-4  # the flip matters for this model


class _Mirrored(ToyVGG):
    """A ToyVGG whose logits are the sum over an image and its mirror image: flip-invariant, bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + super().forward(x.flip(-1))


def test_a_flip_invariant_model_gives_the_same_with_and_without_tta() -> None:
    torch.manual_seed(0)
    model = vt.replace_classifier(vt.freeze_features(_Mirrored()), 2)
    t = trainer(model, cache_features=False)
    data = blobs(9, seed=2)
    with_tta = t.evaluate(data, batch_size=4, num_workers=0, tta=True)
    without = t.evaluate(data, batch_size=4, num_workers=0)
    assert with_tta["loss"] == pytest.approx(without["loss"], rel=1e-6)
    assert with_tta["confusion_matrix"] == without["confusion_matrix"]
    images = data.tensors[0]
    assert torch.allclose(
        _probabilities(t.predict(images, tta=True)), _probabilities(t.predict(images)), rtol=0, atol=1e-6
    )


def test_evaluate_tta_runs_on_the_images_and_says_why_in_the_cache_report() -> None:
    t = trainer()
    val = blobs(10, seed=6)
    t.fit(blobs(16), val, epochs=1, batch_size=8, num_workers=0)
    assert t.cache_report["fit(val)"] == "on"
    report = t.evaluate(val, batch_size=8, num_workers=0, tta=True)
    assert t.cache_report["evaluate"] == TTA_OFF
    mean = _mean_softmax(t.model, val.tensors[0])
    assert report["loss"] == pytest.approx(
        float(-mean[torch.arange(10), val.tensors[1]].log().mean()), rel=1e-5
    )
    t.evaluate(val, batch_size=8, num_workers=0)
    assert t.cache_report["evaluate"] == "on (reused)"  # the cache is still there for tta=False
    forced = trainer(cache_features=False)
    forced.evaluate(val, num_workers=0, tta=True)
    assert forced.cache_report["evaluate"] == "off: cache_features=False"


@pytest.mark.parametrize("value", ["crops", 1, 0, None, torch.tensor(True)])
def test_tta_must_be_true_or_false(value: object) -> None:
    t = trainer()
    t.model.train()
    found = f"{value!r} ({type(value).__name__})"
    for call, caller in (
        (lambda: t.evaluate(blobs(4), num_workers=0, tta=value), "evaluate"),  # type: ignore[arg-type]
        (lambda: t.predict(torch.zeros(3, 32, 32), tta=value), "predict"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError) as error:
            call()
        assert str(error.value) == (
            f"{caller}: expected tta to be True (average the original and the horizontally flipped view) "
            f"or False but got {found}"
        )
    assert t.cache_report == {} and t.model.training


def _squared_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((logits[:, 0] - targets.float()) ** 2).mean()


@pytest.mark.parametrize(("loss_fn", "name"), [(nn.MSELoss(), "MSELoss"), (_squared_error, "_squared_error")])
def test_evaluate_tta_needs_cross_entropy(loss_fn: object, name: str) -> None:
    t = trainer(loss_fn=loss_fn)
    with pytest.raises(ValueError) as error:
        t.evaluate(blobs(4), num_workers=0, tta=True)
    assert str(error.value) == (
        "evaluate: tta=True averages class probabilities, which needs loss_fn to be an nn.CrossEntropyLoss "
        "(the loss is then the negative log of the averaged probability of the true class), but the "
        f"Trainer's loss_fn is {name}; evaluate with tta=False, or compute your metric from "
        "predict(..., tta=True)'s probabilities"
    )
    assert t.cache_report == {}
    # predict's probabilities are softmaxes whatever the loss: TTA averages them there too
    images = blobs(3).tensors[0]
    expected = _mean_softmax(t.model, images)
    assert torch.allclose(_probabilities(t.predict(images, tta=True)), expected, rtol=0, atol=1e-6)


def test_tta_keeps_a_confident_mistake_finite() -> None:
    # The model is certain of the wrong class: the true class's probability, e^-200, is 0 in
    # float32, so the log of the averaged probabilities must be computed from the logs.
    model = toy()
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.copy_(torch.tensor([0.0, 200.0]))
    t = trainer(model, cache_features=False)
    data = TensorDataset(torch.randn(2, 3, 32, 32), torch.tensor([0, 0]))
    report = t.evaluate(data, num_workers=0, tta=True)
    assert report["loss"] == pytest.approx(200.0, rel=1e-6)  # -log(e^-200), computed from logs
    assert report["accuracy"] == 0.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_tta_on_cuda_with_autocast_and_channels_last_agrees_with_the_cpu() -> None:
    gpu = trainer(device="cuda", channels_last=True, cache_features=False)
    cpu = trainer(cache_features=False)
    data = blobs(12, seed=5)
    on_gpu = gpu.evaluate(data, batch_size=5, num_workers=0, tta=True)
    on_cpu = cpu.evaluate(data, batch_size=5, num_workers=0, tta=True)
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=5e-2) and on_gpu["count"] == 12
    images = data.tensors[0]
    assert torch.allclose(
        _probabilities(gpu.predict(images, tta=True)), _mean_softmax(cpu.model, images), atol=2e-2
    )


def test_a_numpy_bool_is_taken_as_the_bool_it_is() -> None:
    t = trainer()
    image = blobs(1).tensors[0][0]
    assert t.predict(image, tta=np.True_).probabilities == t.predict(image, tta=True).probabilities
    assert t.predict(image, tta=np.False_).probabilities == t.predict(image).probabilities
