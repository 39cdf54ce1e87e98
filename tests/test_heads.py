from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import vggtransfer as vt
from helpers import ToyVGG

# One small member of every torchvision classification family, with the smallest input it accepts
# (MaxViT's 7x7 partitions need 224; ViT is built for 32 px).
FAMILIES = {
    "alexnet": 63,
    "convnext_tiny": 32,
    "densenet121": 32,
    "efficientnet_b0": 32,
    "googlenet": 32,
    "inception_v3": 75,
    "maxvit_t": 224,
    "mnasnet0_5": 32,
    "mobilenet_v2": 32,
    "mobilenet_v3_small": 32,
    "regnet_x_400mf": 32,
    "resnet18": 32,
    "shufflenet_v2_x0_5": 32,
    "squeezenet1_1": 32,
    "swin_t": 32,
    "vgg11": 32,
    "vit_b_32": 32,
}
# timm models (the "timm" extra), random weights: timm's tiny test_* architectures and a few real
# families, so the classifier sits at a plain attribute (fc, classifier, head), a dotted path
# (ConvNeXt's and ByobNet's head.fc) or is a 1x1 convolution (DLA).
TIMM_FAMILIES = {
    "timm:dla46_c": 32,
    "timm:resnet18": 32,
    "timm:test_byobnet": 32,
    "timm:test_convnext": 32,
    "timm:test_efficientnet": 32,
    "timm:test_resnet": 32,
    "timm:test_vit": 32,
}
BUILD_OPTIONS = {"vit_b_32": {"image_size": 32}, "timm:test_vit": {"img_size": 32}}


_BUILT: dict[str, nn.Module] = {}


def _build(arch: str) -> nn.Module:
    """A fresh copy of ``arch``: initialising the weights is what takes time, so it is done once."""
    if arch not in _BUILT:
        _BUILT[arch] = vt.create_model(arch, weights=None, **BUILD_OPTIONS.get(arch, {}))
    return copy.deepcopy(_BUILT[arch])


def test_families_cover_every_torchvision_prefix() -> None:
    prefixes = {name.split("_")[0].rstrip("0123456789") for name in vt.classification_models()}
    covered = {name.split("_")[0].rstrip("0123456789") for name in FAMILIES}
    # resnext and wide_resnet share ResNet's class; efficientnet_v2 and swin_v2 their v1 classes.
    assert prefixes - covered <= {"resnext", "wide"}


@pytest.fixture(autouse=True, scope="module")
def _forget_built_models():
    yield
    _BUILT.clear()  # about 2 GB of weights: not kept for the rest of the session


@pytest.fixture(params=[*sorted(FAMILIES), *TIMM_FAMILIES], scope="module")
def family(request: pytest.FixtureRequest) -> tuple[str, int]:
    if request.param.startswith("timm:"):
        pytest.importorskip("timm")
    return request.param, {**FAMILIES, **TIMM_FAMILIES}[request.param]


def _logits(model: nn.Module, size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size))


def test_replace_classifier_on_every_family(family: tuple[str, int]) -> None:
    arch, size = family
    model = vt.replace_classifier(_build(arch), 3)
    assert _logits(model, size).shape == (2, 3)
    name, head = vt.find_classifier(model)
    assert model.get_submodule(name) is head  # a dotted name (timm's head.fc) is a path to it
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears[-2:]] == [500, 3]


def test_append_classifier_on_every_family(family: tuple[str, int]) -> None:
    arch, size = family
    model = vt.append_classifier(_build(arch), 2, hidden=())
    assert _logits(model, size).shape == (2, 2)
    assert model.classifier[0].in_features == 1000


def test_freeze_then_train_head_only_on_every_family(family: tuple[str, int]) -> None:
    arch, size = family
    model = vt.freeze_features(vt.replace_classifier(_build(arch), 2))
    name, _ = vt.find_classifier(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert frozen, "something must be frozen"
    # only the head, plus layers between features and head that freeze_features leaves alone
    assert any(n.startswith(name + ".") for n in trainable)
    assert not any(n.startswith("features.") for n in trainable)
    model.train()
    loss = model(torch.randn(2, 3, size, size)).sum()
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_replace_classifier_vgg_recipe_shape() -> None:
    model = vt.replace_classifier(vt.create_model("vgg16", weights=None), 2)
    assert [type(m).__name__ for m in model.classifier] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert model.classifier[0].in_features == 25088
    assert model.classifier[2].p == 0.3
    assert vt.build_spec(model)["head"] == {
        "method": "replace",
        "num_classes": 2,
        "hidden": [500],
        "dropout": 0.3,
        "keep_hidden": False,
        "keep_input_dropout": False,
    }


def test_replace_classifier_keep_hidden_keeps_pretrained_fc_layers() -> None:
    model = vt.create_model("vgg11", weights=None)
    fc1, fc2 = model.classifier[0], model.classifier[3]
    vt.replace_classifier(model, 2, hidden=(), keep_hidden=True)
    assert model.classifier[0] is fc1 and model.classifier[3] is fc2
    assert isinstance(model.classifier[-1], nn.Linear)
    assert (model.classifier[-1].in_features, model.classifier[-1].out_features) == (4096, 2)
    assert len(model.classifier) == 7


def test_replace_keeps_layers_that_prepare_head_input() -> None:
    model = vt.create_model("convnext_tiny", weights=None)
    norm = model.classifier[0]
    vt.replace_classifier(model, 2, hidden=())
    assert model.classifier[0] is norm
    assert isinstance(model.classifier[-1], nn.Linear)


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "vgg11"])
def test_replace_drops_the_old_heads_dropout_and_gives_the_recipes_head(arch: str) -> None:
    # EfficientNet and MobileNet V2 start their head with Dropout(0.2): regularisation, not preparation.
    model = vt.replace_classifier(vt.create_model(arch, weights=None), 2)
    assert [type(m).__name__ for m in model.classifier] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert model.classifier[2].p == 0.3


def test_keep_hidden_keeps_everything_before_the_last_linear_dropout_included() -> None:
    model = vt.replace_classifier(
        vt.create_model("mobilenet_v3_small", weights=None), 2, hidden=(), keep_hidden=True
    )
    assert [type(m).__name__ for m in model.classifier] == ["Linear", "Hardswish", "Dropout", "Linear"]


def test_replace_on_plain_linear_head_stays_linear() -> None:
    model = vt.replace_classifier(vt.create_model("resnet18", weights=None), 5, hidden=())
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 5


def test_new_head_follows_device_and_dtype_of_old_head() -> None:
    model = vt.create_model("resnet18", weights=None).to(torch.float64)
    vt.replace_classifier(model, 2)
    assert all(p.dtype == torch.float64 for p in model.fc.parameters())


class UserNet(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@pytest.mark.parametrize(
    "classifier", [nn.Linear(8, 10), nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))]
)
def test_user_module_with_features_and_classifier(classifier: nn.Module) -> None:
    model = vt.freeze_features(vt.replace_classifier(UserNet(classifier), 2))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 2)
    assert not any(p.requires_grad for p in model.features.parameters())
    appended = vt.append_classifier(UserNet(classifier), 2)
    assert appended.classifier[0].in_features == 10


def test_headless_module_gets_type_error_naming_what_was_found() -> None:
    model = nn.Sequential(OrderedDict(body=nn.Conv2d(3, 3, 1), classifier=nn.ReLU()))
    with pytest.raises(TypeError) as info:
        vt.replace_classifier(model, 2)
    assert str(info.value) == (
        "replace_classifier: cannot find the classifier head of Sequential; expected an attribute named "
        "one of classifier, fc, heads, head that is an nn.Linear or an nn.Sequential containing nn.Linear "
        "layers, but found classifier=ReLU. Give your model a `classifier` (nn.Linear or nn.Sequential "
        "ending in nn.Linear) and a `features` module"
    )
    with pytest.raises(TypeError, match="append_classifier: expected model to be an nn.Module but got str"):
        vt.append_classifier("vgg16", 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_classes": 0}, ValueError, "replace_classifier: expected num_classes >= 1 but got 0"),
        (
            {"num_classes": 2.0},
            TypeError,
            "replace_classifier: expected num_classes to be an int but got float",
        ),
        ({"num_classes": 2, "hidden": 500}, TypeError, "expected hidden to be a sequence of layer widths"),
        (
            {"num_classes": 2, "hidden": (500, 0)},
            ValueError,
            r"every hidden width to be a positive int but got \(500, 0\)",
        ),
        (
            {"num_classes": 2, "dropout": 1.0},
            ValueError,
            r"expected dropout to be a probability in \[0, 1\) but got 1.0",
        ),
    ],
)
def test_replace_classifier_option_errors(kwargs: dict, error: type, message: str) -> None:
    model = ToyVGG()  # the checks come before the model matters
    before = model.classifier
    with pytest.raises(error, match=message):
        vt.replace_classifier(model, **kwargs)
    assert model.classifier is before


def test_append_refuses_nan_classifier() -> None:
    model = vt.create_model("vgg11", weights=None)
    with torch.no_grad():
        model.classifier[0].weight.fill_(float("nan"))
    with pytest.raises(
        ValueError,
        match=r"append_classifier: the classifier of this model is unusable: 102760448 of its values",
    ):
        vt.append_classifier(model, 2)
    # replacing the classifier is the way out
    fixed = vt.append_classifier(vt.replace_classifier(model, 1000, hidden=()), 2)
    assert torch.isfinite(fixed(torch.randn(1, 3, 32, 32))).all()


def test_append_records_spec_and_keeps_net_identity() -> None:
    net = vt.create_model("vgg11", weights=None)
    model = vt.append_classifier(net, 2)
    assert model.net is net
    spec = vt.build_spec(model)
    assert spec["arch"] == "vgg11"
    assert spec["head"]["method"] == "append"


def test_timm_dotted_head_is_replaced_in_place_keeping_its_pooling_and_norm() -> None:
    pytest.importorskip("timm")
    model = vt.create_model("timm:test_convnext", weights=None)
    head_module, norm = model.head, model.head.norm  # timm's NormMlpClassifierHead: pool, norm, fc
    vt.replace_classifier(model, 2, hidden=())
    assert vt.find_classifier(model)[0] == "head.fc"
    assert model.head is head_module and model.head.norm is norm
    assert isinstance(model.head.fc, nn.Linear) and model.head.fc.out_features == 2
    assert _logits(model, 32).shape == (2, 2)


def test_timm_model_without_one_classifier_is_refused_with_what_was_declared() -> None:
    pytest.importorskip("timm")
    headless = vt.create_model("timm:test_vit", weights=None, img_size=32, num_classes=0)
    with pytest.raises(TypeError) as info:
        vt.replace_classifier(headless, 2)
    assert str(info.value) == (
        "replace_classifier: the classifier that VisionTransformer declares (pretrained_cfg['classifier'] "
        "= 'head') is a Identity; expected an nn.Linear or an nn.Sequential containing nn.Linear layers. "
        "A timm model built with num_classes=0 has no classifier: build it with num_classes >= 1 (the default)"
    )
    distilled = vt.create_model(  # DeiT's distilled layout at toy size
        "timm:deit_tiny_distilled_patch16_224", weights=None, img_size=32, embed_dim=32, depth=1, num_heads=2
    )
    with pytest.raises(TypeError) as info:
        vt.append_classifier(distilled, 2)
    assert str(info.value) == (
        "append_classifier: VisionTransformerDistilled declares the classifiers ('head', 'head_dist') "
        "(pretrained_cfg['classifier']), as timm's distilled models do; vggtransfer needs a model with "
        "one classifier head: use the variant without distillation"
    )
