"""timm backbones (the "timm" extra): building, weights, preprocessing, feature caching, checkpoints.

Random weights only: "pretrained" weights are a random state dict in a temporary file, which timm
loads through ``pretrained_cfg_overlay=dict(file=...)`` exactly as it would a download, and the
Hugging Face hub is put offline with an empty cache so no test touches the network. The head
protocol and freezing on timm families are in test_heads.py and test_freeze.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import ResNet18_Weights

import vggtransfer as vt
from helpers import blobs, weights_equal

timm = pytest.importorskip("timm")


def _fit(t: vt.Trainer, epochs: int = 2) -> vt.History:
    return t.fit(blobs(16), blobs(8, seed=7), epochs=epochs, batch_size=8, num_workers=0)


def _trainer(model: nn.Module, **kwargs) -> vt.Trainer:
    options = {"device": "cpu", "seed": 0, "progress": False, "class_names": ["cool", "warm"]}
    return vt.Trainer(model, **{**options, **kwargs})


def _pretrained(tmp_path: Path, arch: str = "timm:test_convnext") -> nn.Module:
    """``arch`` with weights="DEFAULT" read by timm from a local random file instead of the hub."""
    path = tmp_path / "pretrained.pth"
    if not path.exists():
        torch.manual_seed(1)
        torch.save(timm.create_model(arch[len("timm:") :]).state_dict(), path)
    return vt.create_model(arch, pretrained_cfg_overlay={"file": str(path)})


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Hugging Face hub offline with an empty cache (read by huggingface_hub at call time)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # timm's URL fallback
    return cache


# ---------------------------------------------------------------------------- create_model


def test_create_model_builds_timm_and_records_the_resolved_tag() -> None:
    model = vt.create_model("timm:test_resnet", weights=None, drop_path_rate=0.1)
    assert type(model).__module__ == "timm.models.resnet"
    assert vt.build_spec(model) == {
        "arch": "timm:test_resnet.r160_in1k",  # the default tag, pinned for later timm releases
        "builder_kwargs": {"drop_path_rate": 0.1},
        "random_init_kwargs": {"drop_path_rate": 0.1},
    }
    tagged = vt.create_model("timm:resnet18.tv_in1k", weights=None)
    assert vt.build_spec(tagged)["arch"] == "timm:resnet18.tv_in1k"
    assert tagged.pretrained_cfg["tag"] == "tv_in1k"


def test_unknown_timm_names_and_tags_get_did_you_mean() -> None:
    with pytest.raises(ValueError) as info:
        vt.create_model("timm:test_convnxt", weights=None)
    assert str(info.value) == (
        "create_model: unknown timm model 'timm:test_convnxt'; did you mean 'timm:test_convnext', "
        "'timm:test_convnext3', 'timm:test_convnext2'? expected 'timm:' followed by one of timm's "
        f"{len(timm.list_models())} architectures (see timm.list_models())"
    )
    with pytest.raises(ValueError) as info:
        vt.create_model("timm:resnet18.tv_in1kk", weights=None)
    assert str(info.value) == (
        "create_model: timm has no pretrained tag 'tv_in1kk' for 'resnet18'; expected one of 'a1_in1k', "
        "'a2_in1k', 'a3_in1k', 'fb_ssl_yfcc100m_ft_in1k', 'fb_swsl_ig1b_ft_in1k', 'gluon_in1k', "
        "'tv_in1k', or no tag for timm's default. Did you mean 'timm:resnet18.tv_in1k'?"
    )


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        (
            "tv_in1k",
            ValueError,
            "create_model: weights 'tv_in1k' do not exist for 'timm:resnet18'; expected 'DEFAULT' (timm's "
            "pretrained weights), None for random initialisation, or a path to a local .safetensors or "
            ".pth file. timm chooses pretrained weights by a tag in the name: did you mean arch "
            "'timm:resnet18.tv_in1k'?",
        ),
        (
            "IMAGENET1K_V1",
            ValueError,
            "create_model: weights 'IMAGENET1K_V1' do not exist for 'timm:resnet18'; expected 'DEFAULT' "
            "(timm's pretrained weights), None for random initialisation, or a path to a local "
            ".safetensors or .pth file. timm chooses pretrained weights by a tag in the name, e.g. "
            "'timm:resnet18.TAG' (see timm.list_pretrained('resnet18.*')).",
        ),
        (
            ResNet18_Weights.IMAGENET1K_V1,
            ValueError,
            "create_model: weights ResNet18_Weights.IMAGENET1K_V1 are torchvision weights, which do not "
            "fit the timm model 'timm:resnet18'; expected 'DEFAULT' (timm's pretrained weights), None for "
            "random initialisation, or a path to a local .safetensors or .pth file",
        ),
        (
            3,
            TypeError,
            "create_model: expected weights to be a str, a path or None for timm model 'timm:resnet18' "
            "but got int",
        ),
    ],
)
def test_weights_a_timm_model_cannot_take_are_refused(weights: object, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        vt.create_model("timm:resnet18", weights=weights)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_local_weights_files_load_exactly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = timm.create_model("test_convnext").state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "model.safetensors"))
    for path in (tmp_path / "w.pth", str(tmp_path / "model.safetensors")):
        model = vt.create_model("timm:test_convnext", weights=path)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert vt.build_spec(model)["weights"] == f"file:{Path(path).resolve()}"
    with pytest.raises(ValueError, match=r"the weights in .*w.pth do not fit this model; nothing was loaded"):
        vt.create_model("timm:test_resnet", weights=tmp_path / "w.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"cannot read '.*bad.safetensors' as a safetensors file: "):
        vt.create_model("timm:test_convnext", weights=tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match=r"weights file '.*nope.safetensors' does not exist"):
        vt.create_model("timm:test_convnext", weights=tmp_path / "nope.safetensors")


def test_default_weights_come_through_timm_from_a_local_file(tmp_path: Path) -> None:
    model = _pretrained(tmp_path)
    assert weights_equal(model, _pretrained(tmp_path))
    assert not weights_equal(model, vt.create_model("timm:test_convnext", weights=None))
    assert vt.build_spec(model)["weights"] == "DEFAULT"


def test_offline_default_weights_are_weights_not_available_with_what_to_do(offline_hub: Path) -> None:
    with pytest.raises(vt.WeightsNotAvailableError) as info:
        vt.create_model("timm:test_resnet")
    first, *rest = str(info.value).splitlines()
    assert first.startswith("could not download timm's pretrained weights for 'timm:test_resnet' (")
    assert rest == [
        "  source: Hugging Face hub repository timm/test_resnet.r160_in1k",
        f"  cache:  {offline_hub}  (the Hugging Face cache, HF_HOME / HF_HUB_CACHE)",
        "To fix it, do one of:",
        "  - run the same create_model call once on a machine with internet access and copy its Hugging "
        "Face cache folder to the cache path above;",
        "  - download the weights file (model.safetensors or pytorch_model.bin) and pass it directly: "
        "create_model('timm:test_resnet', weights='/path/to/model.safetensors');",
        "  - use weights=None to start from random weights (no transfer learning).",
    ]


def test_default_weights_of_a_model_timm_has_none_for_are_refused() -> None:
    with pytest.raises(ValueError) as info:
        vt.create_model("timm:test_coatnet")
    assert str(info.value) == (
        "create_model: timm has no pretrained weights for 'timm:test_coatnet' (its pretrained_cfg names no "
        "file, URL or Hugging Face hub id); expected weights=None for random weights, a local file with "
        "weights=PATH, or a tagged name from timm.list_pretrained('test_coatnet.*')"
    )


# ---------------------------------------------------------------------------- preprocessing


def _timm_eval_sizes(model: nn.Module) -> tuple[int, int, str]:
    """Resize, crop and interpolation of timm's own evaluation transform for ``model``."""
    steps = timm.data.create_transform(**timm.data.resolve_model_data_config(model)).transforms
    return steps[0].size, steps[1].size[0], steps[0].interpolation.value


@pytest.mark.parametrize(
    ("arch", "options", "expected"),
    [
        ("timm:test_convnext", {}, (160, 168, (0.5,) * 3, (0.5,) * 3, "bicubic")),
        ("timm:test_resnet", {}, (160, 168, (0.5,) * 3, (0.5,) * 3, "bilinear")),
        ("timm:test_efficientnet", {}, (160, 168, vt.IMAGENET_MEAN, vt.IMAGENET_STD, "bicubic")),
        (
            "timm:test_resnet",
            {
                "pretrained_cfg_overlay": {
                    "input_size": (3, 64, 64),
                    "crop_pct": 0.875,
                    "interpolation": "nearest",
                }
            },
            (64, 73, (0.5,) * 3, (0.5,) * 3, "nearest"),
        ),
    ],
)
def test_default_transform_is_timms_evaluation_preprocessing(
    arch: str, options: dict, expected: tuple
) -> None:
    model = vt.create_model(arch, weights=None, **options)
    transform = _trainer(model, class_names=None).transform
    size, resize, mean, std, interpolation = expected
    assert transform == vt.ImageTransform(
        size=size, resize=resize, mean=mean, std=std, interpolation=interpolation
    )
    assert _timm_eval_sizes(model) == (transform.resize, transform.size, transform.interpolation)
    assert transform(torch.zeros(3, 100, 120, dtype=torch.uint8)).shape == (3, size, size)
    appended = vt.append_classifier(model, 2)  # the wrapped timm model's preprocessing
    assert _trainer(appended, class_names=None).transform == transform


@pytest.mark.parametrize(
    ("overlay", "problem"),
    [
        (
            {"crop_mode": "squash"},
            "crop_mode='squash' (expected 'center': resize the shorter side, then crop)",
        ),
        (
            {"interpolation": "lanczos"},
            "interpolation='lanczos' (expected one of 'bilinear', 'bicubic', 'nearest')",
        ),
        ({"input_size": (3, 160, 128)}, "input_size=(3, 160, 128) (expected 3 channels and a square image)"),
        ({"crop_pct": 1.25}, "crop_pct=1.25 (expected a crop fraction in (0, 1])"),
    ],
)
def test_preprocessing_an_image_transform_cannot_represent_is_refused(overlay: dict, problem: str) -> None:
    model = vt.create_model("timm:test_resnet", weights=None, pretrained_cfg_overlay=overlay)
    with pytest.raises(ValueError) as info:
        _trainer(model, class_names=None)
    assert str(info.value) == (
        f"default_transform: the preprocessing of timm model ResNet cannot be represented by "
        f"vt.ImageTransform: {problem}. Pass your own transform, e.g. Trainer(model, "
        f"transform=vt.ImageTransform(size=..., resize=..., mean=..., std=..., interpolation='bicubic'))"
    )
    assert _trainer(model, class_names=None, transform=vt.imagenet_transform(size=32)).transform.size == 32


# ---------------------------------------------------------------------------- feature caching


@pytest.mark.parametrize(
    ("arch", "options"),
    [("timm:test_convnext", {}), ("timm:test_vit", {"img_size": 32}), ("timm:test_resnet", {})],
)
def test_cached_training_matches_plain_training(arch: str, options: dict) -> None:
    def run(cache: bool) -> tuple[vt.Trainer, vt.History]:
        torch.manual_seed(0)
        model = vt.freeze_features(vt.replace_classifier(vt.create_model(arch, weights=None, **options), 2))
        t = _trainer(model, cache_features=cache)
        return t, _fit(t)

    (plain, h_plain), (cached, h_cached) = run(False), run(True)
    assert cached.cache_report == {"fit(train)": "on", "fit(val)": "on"}
    assert h_cached["train_loss"][-1] < h_cached["train_loss"][0] or h_cached["train_accuracy"][-1] > 0.5
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert h_cached[key] == pytest.approx(h_plain[key], rel=1e-5, abs=1e-6)
    a, b = plain.model.state_dict(), cached.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)


def test_functional_dropout_before_the_head_keeps_features_uncached() -> None:
    # timm's ResNet calls F.dropout(x, drop_rate, self.training) before fc: no module shows it.
    model = vt.create_model("timm:test_resnet", weights=None, drop_rate=0.5)
    t = _trainer(vt.freeze_features(vt.replace_classifier(model, 2)))
    _fit(t, 1)
    assert t.cache_report["fit(train)"] == (
        "off: 'the model' (ResNet) has drop_rate=0.5: timm may apply that dropout in training by a "
        "function call, which cached features cannot reproduce; build the model with drop_rate=0 to "
        "cache features"
    )


# ---------------------------------------------------------------------------- checkpoints


def test_full_checkpoint_of_a_random_init_model_round_trips(tmp_path: Path) -> None:
    model = vt.create_model("timm:test_vit", weights=None, img_size=32)
    t = _trainer(vt.freeze_features(vt.append_classifier(model, 2)), transform=vt.imagenet_transform(size=32))
    _fit(t, 1)
    path = t.save_checkpoint(tmp_path / "full.pt")
    loaded, names, transform = vt.load_model(path)
    assert names == ["cool", "warm"] and transform == vt.imagenet_transform(size=32)
    assert weights_equal(loaded, t.model)
    images = blobs(4, seed=3).tensors[0]
    t.model.eval()
    assert torch.equal(loaded(images), t.model(images))


def test_head_only_checkpoint_rebuilds_the_timm_backbone_and_its_preprocessing(tmp_path: Path) -> None:
    t = _trainer(vt.replace_classifier(vt.freeze_features(_pretrained(tmp_path)), 2))
    assert t.transform == vt.ImageTransform(
        size=160, resize=168, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic"
    )
    t.fit(blobs(8), epochs=1, batch_size=8, num_workers=0)
    assert t.cache_report["fit(train)"] == "on"
    head = t.save_checkpoint(tmp_path / "head.pt", head_only=True)
    # the dotted head's entries, and nothing of the frozen backbone (head.norm included)
    assert set(torch.load(head, weights_only=True)["model"]) == {
        "head.fc.0.weight",
        "head.fc.0.bias",
        "head.fc.3.weight",
        "head.fc.3.bias",
    }
    loaded, _, transform = vt.load_model(head)
    assert weights_equal(loaded, t.model) and transform == t.transform
    assert vt.build_spec(loaded) == vt.build_spec(t.model)
    resumed = _trainer(vt.replace_classifier(vt.freeze_features(_pretrained(tmp_path)), 2))
    resumed.load_checkpoint(head)
    assert weights_equal(resumed.model, t.model) and resumed.epoch == 1
    # another backbone under the same name is found out by the fingerprint
    torch.save(timm.create_model("test_convnext").state_dict(), tmp_path / "pretrained.pth")
    with pytest.raises(vt.CheckpointError, match="this model's frozen backbone differs"):
        vt.load_model(head)


# ---------------------------------------------------------------------------- compare_backbones


def test_compare_backbones_takes_timm_names_and_factories(offline_hub: Path, tmp_path: Path) -> None:
    settings = {"epochs": 2, "batch_size": 8, "device": "cpu", "progress": False, "num_workers": 0}
    train, val = blobs(16, size=64), blobs(8, size=64, seed=7)
    offline = vt.compare_backbones(train, val, ["timm:test_resnet"], cache_dir=tmp_path / "c", **settings)
    (row,) = offline.rows
    assert row["error"].startswith("WeightsNotAvailableError: ") and offline.best is None

    factories = {
        "convnext": lambda: _pretrained(tmp_path, "timm:test_convnext"),
        "resnet": lambda: _pretrained(tmp_path / "r", "timm:test_resnet"),
    }
    (tmp_path / "r").mkdir()
    comparison = vt.compare_backbones(train, val, factories, cache_dir=tmp_path / "c", **settings)
    assert [r["error"] for r in comparison.rows] == [None, None]
    assert [r["cache"]["fit(train)"] for r in comparison.rows] == ["on", "on"]
    assert comparison.best in factories
    model, _, _ = vt.load_model(comparison.save(tmp_path / "report") / "best.pt")
    assert vt.build_spec(model)["arch"].startswith("timm:test_")
