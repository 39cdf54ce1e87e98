"""Trainer(class_weights=...): the weighted training loss, "balanced", checks, checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import vggtransfer as vt
from helpers import Named, blobs, toy, trainer, weights_equal
from vggtransfer._class_weights import WeightedCrossEntropy
from vggtransfer._labels import dataset_labels


def imbalanced(n0: int, n1: int, seed: int, size: int = 16, signal: float = 0.2) -> TensorDataset:
    """Two classes, ``n0`` cool and ``n1`` warm images, told apart by a faint colour under noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * n0 + [1] * n1)
    colour = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1) * (labels.float() * 2 - 1).view(-1, 1, 1, 1)
    return TensorDataset(
        signal * colour + torch.randn(len(labels), 3, size, size, generator=generator), labels
    )


def test_balanced_weights_raise_minority_recall_on_9_to_1_data() -> None:
    train, val = imbalanced(72, 8, seed=0), imbalanced(40, 40, seed=1)
    recalls = {}
    for setting in (None, "balanced"):
        t = trainer(class_weights=setting, lr=3e-3)
        t.fit(train, epochs=6, batch_size=16, num_workers=0)
        recalls[setting] = t.evaluate(val)["per_class"]["warm"]["recall"]
    assert recalls[None] <= 0.1  # unweighted: the majority class almost always
    assert recalls["balanced"] >= 0.8


def test_balanced_weights_are_n_over_classes_times_count_and_set_at_fit() -> None:
    t = trainer(class_weights="balanced")
    assert t.class_weights is None
    t.fit(imbalanced(6, 2, seed=0), epochs=1, batch_size=4, num_workers=0)
    assert t.class_weights == [8 / (2 * 6), 8 / (2 * 2)]
    assert trainer(class_weights=(1, 3)).class_weights == [1.0, 3.0]


def test_training_loss_is_exactly_cross_entropy_with_weight_and_evaluate_is_unweighted() -> None:
    data = imbalanced(6, 2, seed=0)
    t = trainer(class_weights=[1.0, 3.0])
    history = t.fit(data, data, epochs=1, batch_size=8, num_workers=0)
    logits, targets = torch.randn(8, 2, generator=torch.Generator().manual_seed(3)), data.tensors[1]
    expected = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]))(logits, targets)
    assert torch.equal(t._train_loss(logits, targets), expected)
    with torch.no_grad():
        model_logits = t.model.eval()(data.tensors[0])
    unweighted = nn.CrossEntropyLoss()(model_logits, targets).item()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]))(model_logits, targets).item()
    assert t.evaluate(data)["loss"] == pytest.approx(unweighted, rel=1e-5)
    assert history[-1]["val_loss"] == pytest.approx(unweighted, rel=1e-5)
    assert abs(weighted - unweighted) > 1e-3  # the test could tell them apart


def test_a_batch_of_zero_weight_classes_has_loss_zero_not_nan() -> None:
    loss = WeightedCrossEntropy([0.0, 1.0], torch.device("cpu"))
    logits = torch.randn(3, 2, requires_grad=True)
    value = loss(logits, torch.tensor([0, 0, 0]))
    value.backward()
    assert value.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 2))
    mixed = torch.tensor([0, 1, 1])
    reference = nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0]))(logits, mixed)
    assert loss(logits, mixed).item() == pytest.approx(reference.item(), rel=1e-6)


def test_a_class_without_training_samples_gets_weight_zero_and_a_warning() -> None:
    t = trainer(toy(num_classes=3), class_weights="balanced", class_names=["a", "b", "c"])
    with pytest.warns(
        UserWarning,
        match=re.escape(
            "fit: class_weights='balanced': class 'c' (label 2) has no training samples, so its weight is 0 "
            "and the model cannot learn it from this data; add samples of it"
        ),
    ):
        t.fit(imbalanced(3, 1, seed=0), epochs=1, batch_size=4, num_workers=0)
    assert t.class_weights == [4 / (2 * 3), 4 / (2 * 1), 0.0]


class Opaque(Dataset):
    """Labels known only by reading the samples; counts the reads."""

    def __init__(self, inner: Dataset) -> None:
        self.inner, self.reads = inner, 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        self.reads += 1
        return self.inner[index]


def test_dataset_labels_read_attributes_before_samples() -> None:
    data = imbalanced(3, 2, seed=0)
    assert dataset_labels(data, "fit") == [0, 0, 0, 1, 1]
    assert dataset_labels(Subset(data, [4, 0]), "fit") == [1, 0]
    assert dataset_labels(DataLoader(data, batch_size=2), "fit") == [0, 0, 0, 1, 1]
    inner = Opaque(data)
    listed = Named(inner, ["cool", "warm"])
    listed.targets = [0, 0, 0, 1, 1]  # type: ignore[attr-defined]  # as ImageFolder records them
    assert dataset_labels(Subset(listed, [1, 3]), "fit") == [0, 1] and inner.reads == 0
    assert dataset_labels(inner, "fit") == [0, 0, 0, 1, 1] and inner.reads == 5  # read sample by sample


BAD_SETTINGS = [
    ("balance", ValueError, "Trainer: expected class_weights to be None, 'balanced', or one weight per class (a list of numbers >= 0, such as [1.0, 4.0]) but got 'balance'"),
    ({0: 1.0, 1: 3.0}, TypeError, "Trainer: expected class_weights to be None, 'balanced', or one weight per class (a list of numbers >= 0, such as [1.0, 4.0]) but got a dict ({0: 1.0, 1: 3.0}); list the weights in class order instead, e.g. [weights[c] for c in range(num_classes)]"),
    (True, TypeError, "Trainer: expected class_weights to be None, 'balanced', or one weight per class (a list of numbers >= 0, such as [1.0, 4.0]) but got True (bool)"),
    ([1.0, True], TypeError, "Trainer: expected every class weight to be a number but class_weights[1] is True (bool)"),
    ([1.0, "3"], TypeError, "Trainer: expected every class weight to be a number but class_weights[1] is '3' (str)"),
    ([1.0, -1.0], ValueError, "Trainer: expected every class weight to be a finite number >= 0 but class_weights[1] is -1.0"),
    ([float("nan"), 1.0], ValueError, "Trainer: expected every class weight to be a finite number >= 0 but class_weights[0] is nan"),
    ([0, 0.0], ValueError, "Trainer: expected at least one class weight > 0 but got [0, 0.0]: the loss would be 0 and nothing would be learnt"),
    ([1.0, 2.0, 3.0], ValueError, "Trainer: got 3 class_weights [1.0, 2.0, 3.0] but the model has 2 classes; give one weight per class, in output order, or class_weights='balanced'"),
    (torch.ones(2, 2), TypeError, "Trainer: expected class_weights as a tensor or array to be 1-D and of numbers but got 2-D of torch.float32; pass one weight per class, such as torch.tensor([1.0, 4.0])"),
    (torch.tensor([True, False]), TypeError, "Trainer: expected class_weights as a tensor or array to be 1-D and of numbers but got 1-D of torch.bool; pass one weight per class, such as torch.tensor([1.0, 4.0])"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "error", "message"), BAD_SETTINGS, ids=[str(i) for i in range(len(BAD_SETTINGS))]
)
def test_bad_class_weights_are_refused_before_anything_changes(value, error, message: str) -> None:
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        trainer(model, class_weights=value)
    assert weights_equal_dict(before, model.state_dict())


def weights_equal_dict(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_class_weights_with_a_custom_loss_is_refused_with_the_way_to_weight_it() -> None:
    message = (
        "Trainer: class_weights weights the default cross-entropy loss, but a custom loss_fn was given "
        "too; leave class_weights out and weight your loss yourself, e.g. "
        "loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 4.0]))"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        trainer(class_weights="balanced", loss_fn=nn.CrossEntropyLoss())
    assert trainer(class_weights=torch.tensor([1, 2])).class_weights == [1.0, 2.0]


def test_cached_features_train_on_the_same_weighted_loss() -> None:
    data = imbalanced(6, 2, seed=0)
    runs = {}
    for cache in (True, False):
        t = trainer(class_weights="balanced", cache_features=cache)
        runs[cache] = t.fit(data, epochs=2, batch_size=4, num_workers=0)["train_loss"]
        assert t.cache_report["fit(train)"] == ("on" if cache else "off: cache_features=False")
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
    unweighted = trainer(cache_features=True).fit(data, epochs=2, batch_size=4, num_workers=0)["train_loss"]
    assert abs(unweighted[0] - runs[True][0]) > 1e-3


def test_bf16_autocast_computes_the_weighted_loss_in_fp32() -> None:
    loss = WeightedCrossEntropy([1.0, 3.0], torch.device("cpu"))
    logits, targets = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), targets)
    assert value.dtype == torch.float32
    expected = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]))(logits.bfloat16().float(), targets)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def _fit(t: vt.Trainer, epochs: int) -> None:
    t.fit(imbalanced(12, 4, seed=0), blobs(8, size=16), epochs=epochs, batch_size=4, num_workers=0)


def test_resume_with_balanced_weights_is_bitwise_identical(tmp_path: Path) -> None:
    straight = trainer(class_weights="balanced")
    _fit(straight, 2)
    first = trainer(class_weights="balanced")
    _fit(first, 1)
    first.save_checkpoint(tmp_path / "ck.pt")
    resumed = trainer(class_weights="balanced")
    resumed.load_checkpoint(tmp_path / "ck.pt")
    assert resumed.class_weights == first.class_weights == [16 / (2 * 12), 16 / (2 * 4)]
    _fit(resumed, 2)
    assert weights_equal(straight.model, resumed.model) and resumed.class_weights == straight.class_weights


def test_loading_into_a_trainer_with_other_class_weights_is_refused(tmp_path: Path) -> None:
    first = trainer(class_weights="balanced")
    _fit(first, 1)
    path = first.save_checkpoint(tmp_path / "ck.pt")
    for other, shown in ((None, "None"), ([1.0, 2.0], "[1.0, 2.0]")):
        fresh = trainer(class_weights=other)
        before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
        message = (
            f"checkpoint {str(path)!r} was trained with class_weights='balanced' but this Trainer has "
            f"class_weights={shown}; build the Trainer with class_weights='balanced' to resume it"
        )
        with pytest.raises(vt.CheckpointError, match=f"^{re.escape(message)}$"):
            fresh.load_checkpoint(path)
        assert fresh.epoch == 0 and weights_equal_dict(before, fresh.model.state_dict())
        assert fresh.class_weights == (None if other is None else other)
    unweighted = trainer()
    _fit(unweighted, 1)
    with pytest.raises(vt.CheckpointError, match="was trained with class_weights=None but this Trainer has"):
        trainer(class_weights="balanced").load_checkpoint(unweighted.save_checkpoint(tmp_path / "plain.pt"))


def test_dataset_labels_refuse_what_is_not_a_class_index() -> None:
    data = TensorDataset(torch.zeros(3, 3, 4, 4), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError) as caught:
        dataset_labels(Subset(data, [2, 0]), "fit: class_weights='balanced'")
    assert str(caught.value) == (
        "fit: class_weights='balanced': expected every label to be a class index (an int >= 0) but "
        "sample 0 has 1.0"
    )
