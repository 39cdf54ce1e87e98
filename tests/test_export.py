"""vt.export: ONNX and TorchScript files that carry their class names and preprocessing, checked for parity."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vggtransfer as vt
from helpers import toy, trainer

SIZE = 32  # ToyVGG runs at any size; 32 px keeps an ONNX export around a second or two
NAMES = ["cool", "warm"]


def images(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def eager(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch)


def checkpoint(folder: Path) -> Path:
    # load_model rebuilds from the build record, so a torchvision model (untrained, 32 px)
    model = vt.freeze_features(vt.replace_classifier(vt.create_model("resnet18", weights=None), 2))
    coach = trainer(model, transform=vt.imagenet_transform(size=SIZE))
    return coach.save_checkpoint(folder / "run.pt", training_state=False)


class Noisy(nn.Module):
    """Random in eval mode too: no exported graph can reproduce its logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))[:, :2] + torch.rand(x.shape[0], 2)


def test_onnx_carries_names_and_transform_and_matches_pytorch(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = toy()  # ToyVGG: an ONNX export of resnet18 takes 7 s on 2 cores, this one about 1 s
    transform = vt.imagenet_transform(size=SIZE)
    result = vt.export(
        model, tmp_path / "out" / "model.onnx", image_size=SIZE, class_names=NAMES, transform=transform
    )
    assert result.path == tmp_path / "out" / "model.onnx" and result.format == "onnx"
    assert result.class_names == NAMES
    assert isinstance(result.max_abs_diff, float) and 0 <= result.max_abs_diff < vt.EXPORT_TOLERANCE
    proto = onnx.load(str(result.path))
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert json.loads(metadata["class_names"]) == NAMES
    assert vt.ImageTransform.from_dict(json.loads(metadata["transform"])) == vt.imagenet_transform(size=SIZE)
    assert metadata["vggtransfer_version"] == vt.__version__
    assert [op.version for op in proto.opset_import if op.domain == ""] == [vt.ONNX_OPSET]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape[1:] == [3, SIZE, SIZE]
    for n in (1, 3):  # the batch axis is dynamic: neither is the traced batch of 2
        (logits,) = session.run(["logits"], {"image": images(n).numpy()})
        assert logits.shape == (n, 2)
        assert (torch.from_numpy(logits) - eager(model, images(n))).abs().max() < vt.EXPORT_TOLERANCE


def test_torchscript_from_a_module_keeps_its_modes_and_matches_pytorch(tmp_path: Path) -> None:
    model = toy().train()
    model.features[1].eval()  # a layer held in eval mode, as frozen BatchNorm is while training
    modes = [m.training for m in model.modules()]
    result = vt.export(model, tmp_path / "model.pt", format="torchscript", image_size=SIZE, class_names=NAMES)
    assert [m.training for m in model.modules()] == modes
    assert result.format == "torchscript" and result.max_abs_diff < vt.EXPORT_TOLERANCE
    extra = {"class_names": "", "transform": "", "vggtransfer_version": ""}
    scripted = torch.jit.load(str(result.path), _extra_files=extra)
    assert json.loads(extra["class_names"]) == NAMES
    # the default for a model: its weights' evaluation transform, at the exported size
    assert json.loads(extra["transform"]) == vt.imagenet_transform(size=SIZE).to_dict()
    assert extra["vggtransfer_version"] == vt.__version__.encode()
    for n in (1, 3):
        with torch.no_grad():
            assert torch.allclose(scripted(images(n)), eager(model, images(n)), atol=vt.EXPORT_TOLERANCE)


def test_torchscript_from_a_checkpoint_carries_its_names_and_transform(tmp_path: Path) -> None:
    source = checkpoint(tmp_path)
    result = vt.export(source, tmp_path / "model.pt", format="torchscript", image_size=SIZE)
    assert result.class_names == NAMES and result.max_abs_diff < vt.EXPORT_TOLERANCE
    extra = {"class_names": "", "transform": ""}  # read back as bytes
    scripted = torch.jit.load(str(result.path), _extra_files=extra)
    assert json.loads(extra["class_names"]) == NAMES
    assert vt.ImageTransform.from_dict(json.loads(extra["transform"])) == vt.imagenet_transform(size=SIZE)
    model = vt.load_model(source).model
    for n in (1, 3):
        with torch.no_grad():
            assert torch.allclose(scripted(images(n)), eager(model, images(n)), atol=vt.EXPORT_TOLERANCE)


def test_a_model_off_the_cpu_or_not_in_float32_is_exported_from_a_copy(tmp_path: Path) -> None:
    model = toy().double()
    result = vt.export(model, tmp_path / "model.pt", format="torchscript", image_size=SIZE)
    assert result.class_names is None
    assert all(p.dtype == torch.float64 for p in model.parameters())
    scripted = torch.jit.load(str(result.path))
    assert next(scripted.parameters()).dtype == torch.float32


def test_a_parity_failure_raises_and_leaves_the_existing_file_alone(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"the good export")
    with pytest.raises(RuntimeError) as info:
        vt.export(Noisy(), target, format="torchscript", image_size=SIZE)
    message = str(info.value)
    assert message.startswith(
        "export: the exported torchscript model's logits differ from PyTorch's by up to "
    )
    assert message.endswith(
        f"above the tolerance of 0.001; nothing was written to {str(target)!r}. Is the model "
        f"deterministic in eval mode (no random layers)?"
    )
    assert target.read_bytes() == b"the good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


def test_the_file_gets_the_usual_permissions_and_an_unwritable_folder_is_said(tmp_path: Path) -> None:
    result = vt.export(toy(), tmp_path / "model.pt", format="torchscript", image_size=SIZE)
    umask = os.umask(0)
    os.umask(umask)
    assert result.path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError) as info:
        vt.export(toy(), blocker / "model.pt", format="torchscript", image_size=SIZE)
    assert str(info.value).startswith(f"export: {str(blocker / 'model.pt')!r} cannot be written (")
    assert str(info.value).endswith("); nothing was exported. Choose a writable folder")


def test_a_failing_exporter_leaves_the_existing_file_alone(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the good export")
    with pytest.raises(RuntimeError, match="^exporter failed$"):
        vt.export(toy(), target, image_size=SIZE)
    assert target.read_bytes() == b"the good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_onnx_without_the_extra_says_what_to_install(tmp_path: Path, monkeypatch, missing: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError) as info:
        vt.export(toy(), tmp_path / "model.onnx", image_size=SIZE)
    assert str(info.value) == (
        f"export to ONNX needs onnx, onnxscript and onnxruntime ({missing} is missing); "
        f'install them with: pip install "vggtransfer[export]"'
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"format": "tflite"},
            ValueError,
            "export: expected format 'onnx' or 'torchscript' but got 'tflite'",
        ),
        (
            {"image_size": 0},
            ValueError,
            "export: expected image_size to be a positive int such as 224 but got 0",
        ),
        (
            {"image_size": 32.0},
            ValueError,
            "export: expected image_size to be a positive int such as 224 but got 32.0",
        ),
        (
            {"image_size": 1, "transform": vt.imagenet_transform(size=1)},
            ValueError,
            "export: the model cannot run on images of shape [3, 1, 1] (RuntimeError: Given input size: "
            "(8x1x1). Calculated output size: (8x0x0). Output size is too small); choose an image_size it "
            "accepts, such as 224",
        ),
        (
            {"class_names": "cool"},
            TypeError,
            "export: expected class_names to be a list of strings such as ['cat', 'dog'] or None but got 'cool'",
        ),
        (
            {"class_names": ["a", "a"]},
            ValueError,
            "export: expected distinct class_names but got ['a', 'a']",
        ),
        (
            {"class_names": ["a", "b", "c"]},
            ValueError,
            "export: expected one class name per output (2) but got 3 class_names ['a', 'b', 'c']",
        ),
        (
            {"transform": lambda image: image},
            TypeError,
            "export: expected transform to be a vt.ImageTransform (from vt.imagenet_transform) or None but got function",
        ),
        (
            {"transform": vt.imagenet_transform()},
            ValueError,
            "export: expected image_size to equal the transform's size 224 (the images it makes) but got "
            "image_size=32; pass image_size=224",
        ),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, kwargs: dict, error: type, message: str
) -> None:
    options = {"format": "torchscript", "image_size": SIZE, **kwargs}
    with pytest.raises(error) as info:
        vt.export(toy(), tmp_path / "new" / "model.pt", **options)
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


def test_bad_sources_and_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError) as info:
        vt.export(42, tmp_path / "model.pt", format="torchscript")  # type: ignore[arg-type]
    assert (
        str(info.value)
        == "export: expected checkpoint_or_model to be a checkpoint path or an nn.Module but got int"
    )
    with pytest.raises(TypeError) as info:
        vt.export(toy(), 3, format="torchscript")  # type: ignore[arg-type]
    assert str(info.value) == "export: expected path to be a file path (str or os.PathLike) but got 3 (int)"
    with pytest.raises(IsADirectoryError) as info:
        vt.export(toy(), tmp_path, format="torchscript")
    assert str(info.value) == (
        f"export: expected path to be a file but {str(tmp_path)!r} is an existing folder; "
        f"give a file name inside it, such as {str(tmp_path / 'model.onnx')!r}"
    )
    with pytest.raises(FileNotFoundError, match="^checkpoint '.*absent.pt' does not exist$"):
        vt.export(tmp_path / "absent.pt", tmp_path / "model.pt", format="torchscript")
    assert list(tmp_path.iterdir()) == []
