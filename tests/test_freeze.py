from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import vggtransfer as vt
from helpers import ToyVGG


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _assert_bitwise_equal(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == []


def _train_steps(model: nn.Module, steps: int = 2, size: int = 32) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        model.train()
        x = torch.randn(4, 3, size, size)
        y = torch.tensor([0, 1, 0, 1])
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_frozen_batchnorm_features_are_bitwise_unchanged_after_training() -> None:
    model = vt.replace_classifier(vt.create_model("vgg11_bn", weights=None), 2)
    vt.freeze_features(model)
    features_before = _snapshot(model.features)
    head_before = _snapshot(model.classifier)

    _train_steps(model)
    model.train()  # a later train() call must not wake the frozen part up
    _train_steps(model)

    _assert_bitwise_equal(features_before, model.features)
    assert "1.num_batches_tracked" in features_before
    # the head did train
    assert any(not torch.equal(head_before[k], v) for k, v in model.classifier.state_dict().items())


def test_without_freeze_features_batchnorm_statistics_drift() -> None:
    # The control experiment: plain requires_grad=False leaves BatchNorm updating its statistics.
    model = vt.replace_classifier(vt.create_model("vgg11_bn", weights=None), 2)
    model.features.requires_grad_(False)
    before = _snapshot(model.features)
    _train_steps(model, steps=1)
    assert not torch.equal(before["1.running_mean"], model.features.state_dict()["1.running_mean"])


def test_frozen_part_runs_in_eval_mode_after_train_call() -> None:
    model = vt.freeze_features(vt.create_model("vgg11_bn", weights=None))
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert not any(m.training for m in model.features.modules())
    assert model.classifier.training


def test_dropout_in_frozen_part_is_inactive() -> None:
    # Appended models freeze the whole net, VGG's classifier dropout included.
    net = vt.create_model("vgg11", weights=None)
    model = vt.freeze_features(vt.append_classifier(net, 2))
    model.train()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.net(x), model.net(x))


def test_trainable_batchnorm_keeps_training_statistics_and_affine() -> None:
    model = vt.replace_classifier(vt.create_model("vgg11_bn", weights=None), 2)
    vt.freeze_features(model, batchnorm="trainable")
    bn = model.features[1]
    conv = model.features[0]
    assert bn.weight.requires_grad and bn.bias.requires_grad
    assert not conv.weight.requires_grad
    before = _snapshot(model.features)
    _train_steps(model, steps=1)
    assert not torch.equal(before["1.running_mean"], bn.running_mean)
    assert not torch.equal(before["1.weight"], bn.weight)
    assert torch.equal(before["0.weight"], conv.weight)


def test_unfreeze_restores_training_of_every_layer() -> None:
    model = vt.replace_classifier(vt.create_model("vgg11_bn", weights=None), 2)
    vt.freeze_features(model)
    vt.unfreeze_features(model)
    assert all(p.requires_grad for p in model.parameters())
    before = _snapshot(model.features)
    _train_steps(model, steps=1)
    assert not torch.equal(before["0.weight"], model.features.state_dict()["0.weight"])
    assert not torch.equal(before["1.running_mean"], model.features.state_dict()["1.running_mean"])
    assert "freeze" not in vt.build_spec(model)


def test_freeze_twice_replaces_policy_without_stacking_hooks() -> None:
    model = vt.create_model("vgg11_bn", weights=None)
    vt.freeze_features(model, batchnorm="trainable")
    vt.freeze_features(model)
    bn = model.features[1]
    assert not bn.weight.requires_grad
    assert len(bn._forward_pre_hooks) == 1
    assert vt.build_spec(model)["freeze"] == {"batchnorm": "frozen"}


def test_frozen_guarantee_survives_deepcopy_and_pickle() -> None:
    model = vt.replace_classifier(vt.freeze_features(vt.create_model("vgg11_bn", weights=None)), 2)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        before = _snapshot(clone.features)
        _train_steps(clone, steps=1)
        _assert_bitwise_equal(before, clone.features)
        vt.unfreeze_features(clone)  # handles still point at the clone's own hooks
        assert all(len(m._forward_pre_hooks) == 0 for m in clone.modules())
    assert len(model.features[1]._forward_pre_hooks) == 1  # the original is untouched


@pytest.mark.parametrize(
    "arch",
    [
        "resnet18",
        "vit_b_32",
        "mobilenet_v3_small",
        # timm: the declared classifier; ConvNeXt's is head.fc, so the head's norm is frozen too
        "timm:test_convnext",
        "timm:test_efficientnet",
        "timm:test_vit",
    ],
)
def test_models_without_vgg_layout_freeze_everything_but_head(arch: str) -> None:
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    options = {"img_size": 64} if arch == "timm:test_vit" else {}
    model = vt.replace_classifier(vt.create_model(arch, weights=None, **options), 2)
    vt.freeze_features(model)
    head_name, _ = vt.find_classifier(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(head_name + ".") for name in trainable)
    if arch == "vit_b_32":
        assert not model.class_token.requires_grad
    if arch == "timm:test_vit":
        assert not model.cls_token.requires_grad and not model.pos_embed.requires_grad
    if arch == "timm:test_convnext":
        assert head_name == "head.fc" and not model.head.norm.weight.requires_grad
    size = 224 if arch.startswith("vit") else 64
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(head_name + ".")}
    _train_steps(model, steps=1, size=size)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in backbone.items())


def test_freeze_rejects_unknown_policy_and_headless_module() -> None:
    with pytest.raises(ValueError, match="expected batchnorm to be 'frozen' or 'trainable' but got 'eval'"):
        vt.freeze_features(ToyVGG(), batchnorm="eval")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot find the classifier head of Conv2d"):
        vt.freeze_features(nn.Conv2d(3, 3, 1))


def test_timm_declared_classifier_wins_over_a_features_module() -> None:
    # timm's VGG has `features`, then `pre_logits` (its fc6/fc7 as convolutions), then `head.fc`:
    # everything before the classifier it declares is its feature extractor, pre_logits included.
    vgg = pytest.importorskip("timm.models.vgg")
    model = vgg.VGG(cfg=[8, "M", 16, "M"], mlp_ratio=1 / 256)
    model.pretrained_cfg = {"classifier": "head.fc"}  # what timm.create_model sets
    vt.freeze_features(vt.replace_classifier(model, 2))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.fc.0.weight", "head.fc.0.bias", "head.fc.3.weight", "head.fc.3.bias"}
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert not model.pre_logits.training  # its dropout is held inactive like the features'
