from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights, VGG16_Weights

import vggtransfer as vt


def _random_state_dict(arch: str) -> dict[str, torch.Tensor]:
    return torchvision.models.get_model(arch, weights=None).state_dict()


def _put_in_cache(torch_home: Path, weights, state_dict: dict) -> Path:
    path = vt.cached_weights_path(weights)
    assert path.is_relative_to(torch_home)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path


def _same_weights(model: torch.nn.Module, state_dict: dict) -> bool:
    got = model.state_dict()
    return got.keys() == state_dict.keys() and all(torch.equal(got[k], state_dict[k]) for k in got)


class Payload:
    """A pickle that runs code when loaded with the full unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_random_init_records_build_spec() -> None:
    model = vt.create_model("vgg11", weights=None)
    assert vt.build_spec(model) == {"arch": "vgg11"}


def test_pretrained_weights_come_from_torch_home_cache(torch_home: Path) -> None:
    expected = _random_state_dict("resnet18")
    _put_in_cache(torch_home, ResNet18_Weights.IMAGENET1K_V1, expected)
    for weights in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", ResNet18_Weights.DEFAULT):
        model = vt.create_model("resnet18", weights=weights, progress=False)
        assert _same_weights(model, expected)
        assert vt.build_spec(model)["weights"] == "ResNet18_Weights.IMAGENET1K_V1"


def test_pretrained_googlenet_returns_single_tensor_in_train_mode(torch_home: Path) -> None:
    from torchvision.models import GoogLeNet_Weights

    state = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict()
    _put_in_cache(torch_home, GoogLeNet_Weights.DEFAULT, state)
    for weights in ("DEFAULT", None):
        model = vt.create_model("googlenet", weights=weights, progress=False)
        assert isinstance(model.train()(torch.randn(2, 3, 64, 64)), torch.Tensor)


def test_local_state_dict_file(tmp_path: Path) -> None:
    expected = _random_state_dict("resnet18")  # any architecture: a twelfth of VGG11's bytes
    path = tmp_path / "my-resnet18.pth"
    torch.save(expected, path)
    for weights in (path, str(path)):
        model = vt.create_model("resnet18", weights=weights)
        assert _same_weights(model, expected)
    assert vt.build_spec(model)["weights"] == f"file:{path.resolve()}"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_local_file_with_wrapper_prefixes(tmp_path: Path, prefix: str) -> None:
    expected = _random_state_dict("resnet18")
    path = tmp_path / "wrapped.pth"
    torch.save({prefix + k: v for k, v in expected.items()}, path)
    assert _same_weights(vt.create_model("resnet18", weights=path), expected)


def test_local_file_of_other_architecture_is_refused_with_differences(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(_random_state_dict("resnet34"), path)
    with pytest.raises(ValueError) as info:
        vt.create_model("resnet18", weights=path)
    message = str(info.value)
    assert message.startswith(f"the weights in {path} do not fit this model; nothing was loaded:\n  ")
    assert "unexpected keys (e.g. layer1.2.conv1.weight" in message


def test_local_file_shape_mismatch_is_named(tmp_path: Path) -> None:
    state = vt.replace_classifier(torchvision.models.resnet18(), 2, hidden=()).state_dict()
    path = tmp_path / "two-class.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"shape mismatch fc.weight: model has \[1000, 512\], file has \[2, 512\]"
    ):
        vt.create_model("resnet18", weights=path)


def test_missing_local_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"weights file '{missing}' does not exist"):
        vt.create_model("vgg11", weights=missing)


def test_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="it looks like a training checkpoint: load it with vt.load_model"):
        vt.create_model("vgg11", weights=path)


@pytest.mark.parametrize("where", ["cache", "local"])
def test_malicious_pickle_is_refused_without_running(
    where: str, tmp_path: Path, torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even with the override that turns weights_only off for callers that do not ask for it.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "payload-ran"
    evil = {"fc.weight": torch.zeros(1), "fc.bias": Payload(marker)}
    if where == "cache":
        path = _put_in_cache(torch_home, ResNet18_Weights.IMAGENET1K_V1, evil)
        expected = f"refusing to load the cached weights file '{path}': it is not a plain tensor file"
        weights: object = "DEFAULT"
    else:
        path = tmp_path / "evil.pth"
        torch.save(evil, path)
        expected = f"refusing to load '{path}': it is not a plain tensor file"
        weights = path
    with pytest.raises(ValueError, match=expected):
        vt.create_model("resnet18", weights=weights, progress=False)
    assert not marker.exists()


def test_offline_download_explains_url_cache_path_and_local_file(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(vt.WeightsNotAvailableError) as info:
        vt.create_model("vgg16_bn", progress=False)
    cache_file = torch_home / "hub" / "checkpoints" / "vgg16_bn-6c64b313.pth"
    assert str(info.value) == (
        "could not download the pretrained weights VGG16_BN_Weights.IMAGENET1K_V1 for 'vgg16_bn' "
        "(<urlopen error [Errno -3] Temporary failure in name resolution>).\n"
        "  URL:        https://download.pytorch.org/models/vgg16_bn-6c64b313.pth\n"
        f"  cache file: {cache_file}  (under TORCH_HOME={torch_home})\n"
        "To fix it, do one of:\n"
        "  - download the URL on a machine with internet access and copy the file to the cache file path above;\n"
        "  - pass the file directly: create_model('vgg16_bn', weights='/path/to/vgg16_bn-6c64b313.pth');\n"
        "  - use weights=None to start from random weights (no transfer learning)."
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not cache_file.exists()


def test_corrupt_cache_file_says_delete_it(torch_home: Path) -> None:
    path = vt.cached_weights_path(ResNet18_Weights.DEFAULT)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="it is probably truncated. Delete it and run again"):
        vt.create_model("resnet18", progress=False)


@pytest.mark.parametrize(
    ("arch", "weights", "error", "message"),
    [
        ("vgg16bn", None, ValueError, "create_model: unknown arch 'vgg16bn'; did you mean 'vgg16_bn'"),
        (16, None, TypeError, "create_model: expected arch to be a model name \\(str\\) but got int"),
        (
            "vgg16",
            "imagenet",
            ValueError,
            "create_model: weights 'imagenet' do not exist for 'vgg16'; expected one of 'DEFAULT', 'IMAGENET1K_V1', 'IMAGENET1K_FEATURES'",
        ),
        ("vgg16", "imagenet1k_v1", ValueError, "Did you mean 'IMAGENET1K_V1'"),
        (
            "vgg16",
            ResNet18_Weights.DEFAULT,
            ValueError,
            "weights ResNet18_Weights.IMAGENET1K_V1 belong to another architecture; expected a member of VGG16_Weights",
        ),
        (
            "vgg16",
            3.5,
            TypeError,
            "expected weights to be a str, a WeightsEnum, a path or None but got float",
        ),
    ],
)
def test_create_model_argument_errors(arch, weights, error, message) -> None:
    with pytest.raises(error, match=message):
        vt.create_model(arch, weights=weights)


@pytest.mark.slow
def test_vgg16_features_only_weights(torch_home: Path) -> None:
    """The real IMAGENET1K_FEATURES path: NaN classifier, its own normalisation."""
    state = _random_state_dict("vgg16")
    for key in state:
        if key.startswith("classifier."):
            state[key] = torch.full_like(state[key], float("nan"))
    _put_in_cache(torch_home, VGG16_Weights.IMAGENET1K_FEATURES, state)
    model = vt.create_model("vgg16", weights="IMAGENET1K_FEATURES", progress=False)
    with pytest.raises(ValueError, match=r"unusable \(weights VGG16_Weights.IMAGENET1K_FEATURES\)"):
        vt.append_classifier(model, 2)
    vt.freeze_features(vt.replace_classifier(model, 2))
    transform = vt.imagenet_transform(weights=VGG16_Weights.IMAGENET1K_FEATURES)
    assert transform.mean == (0.48235, 0.45882, 0.40784)
    assert transform.std == (1 / 255, 1 / 255, 1 / 255)
    x = transform(torch.full((3, 40, 40), 0.5)).unsqueeze(0)
    assert torch.isfinite(model(x)).all()


def test_classification_models_lists_torchvision_names() -> None:
    names = vt.classification_models()
    assert {"vgg16", "vgg16_bn", "resnet50", "vit_b_16"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names


def test_timm_names_without_timm_installed_say_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` sees where it is not installed
    with pytest.raises(ModuleNotFoundError) as info:
        vt.create_model("timm:resnet18", weights=None)
    assert str(info.value) == (
        "create_model('timm:resnet18') needs timm, which is not installed; install it with: "
        "pip install 'vggtransfer[timm]'"
    )
    assert info.value.name == "timm"
