from __future__ import annotations

import contextlib
import errno
import io
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights

import helpers
import vggtransfer as vt
from helpers import ToyVGG, blobs, toy, trainer, vgg, weights_equal
from vggtransfer._checkpoint_file import atomic_save, tensor_checksum


def small_resnet() -> torch.nn.Module:
    """A frozen resnet18 with the recipe's head, the same for every call: rebuildable, a twelfth of VGG11."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return vt.replace_classifier(vt.freeze_features(vt.create_model("resnet18", weights=None)), 2)


def _fit(t: vt.Trainer, epochs: int) -> None:
    t.fit(blobs(48), blobs(16, seed=7), epochs=epochs, batch_size=8, num_workers=0)


# ---------------------------------------------------------------------------- exact resume


def test_resume_in_process_gives_bitwise_identical_weights(tmp_path: Path) -> None:
    straight = trainer()
    _fit(straight, 4)

    first = trainer()
    _fit(first, 2)
    first.save_checkpoint(tmp_path / "ck.pt")
    torch.manual_seed(999)  # the global RNG is somewhere else entirely now
    resumed = trainer(seed=1)  # seed, like everything else, comes from the checkpoint
    resumed.load_checkpoint(tmp_path / "ck.pt")
    _fit(resumed, 4)

    assert weights_equal(straight.model, resumed.model)

    def timeless(history: vt.History) -> list[dict[str, float]]:
        return [{k: v for k, v in record.items() if k != "time_s"} for record in history]

    assert len(resumed.history) == 4 and timeless(resumed.history) == timeless(straight.history)
    assert (
        resumed.optimizer.state_dict()["state"][0]["step"]
        == straight.optimizer.state_dict()["state"][0]["step"]
    )


RESUME_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import blobs, trainer
t = trainer()
t.load_checkpoint({checkpoint!r})
if t.unfreeze_lr is None and {unfreeze}:
    raise SystemExit("checkpoint should have recorded the unfreeze")
t.fit(blobs(48), blobs(16, seed=7), epochs=4, batch_size=8, num_workers=0)
torch.save(t.model.state_dict(), {out!r})
"""


@pytest.mark.slow
def test_resume_across_unfreeze_in_fresh_and_same_process_gives_bitwise_identical_weights(
    tmp_path: Path,
) -> None:
    straight = trainer()
    _fit(straight, 2)
    straight.unfreeze_features(lr=1e-4)
    _fit(straight, 4)

    first = trainer()
    _fit(first, 2)
    first.unfreeze_features(lr=1e-4)
    _fit(first, 3)
    first.save_checkpoint(tmp_path / "ck.pt")

    script = RESUME_SCRIPT.format(
        tests=str(Path(__file__).parent),
        checkpoint=str(tmp_path / "ck.pt"),
        out=str(tmp_path / "final.pt"),
        unfreeze=True,
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    expected = straight.model.state_dict()
    assert final.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(expected[k], final[k])] == []

    # the same in this process: a Trainer built frozen, like the original, is unfrozen by the checkpoint
    resumed = trainer()
    resumed.load_checkpoint(tmp_path / "ck.pt")
    assert resumed.unfreeze_lr == 1e-4 and len(resumed.optimizer.param_groups) == 2
    _fit(resumed, 4)
    assert weights_equal(straight.model, resumed.model)


# ---------------------------------------------------------------------------- atomic writes


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _save_killed_at(stage: str, path: str, payload: dict) -> None:
    """In a child process: save ``payload`` over the file at ``path``, SIGKILLed at ``stage``.

    The child computes nothing with torch (a forked process must not start OpenMP work).
    """
    import vggtransfer._checkpoint_file as checkpoint_file

    real_replace, real_save = os.replace, torch.save

    def half_written(obj, file) -> None:  # torch.save that is killed halfway through writing
        buffer = io.BytesIO()
        real_save(obj, buffer)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        file.flush()
        _die()

    def replace(src, dst) -> None:
        if stage == "before_rename":
            _die()
        real_replace(src, dst)
        _die()  # "after_rename": before the folder is fsynced

    if stage == "mid_write":
        checkpoint_file.torch.save = half_written  # type: ignore[attr-defined]
    elif stage == "before_fsync":
        checkpoint_file.os.fsync = lambda fd: _die()  # type: ignore[attr-defined]
    else:
        checkpoint_file.os.replace = replace  # type: ignore[attr-defined]
    atomic_save(payload, path)


@pytest.mark.parametrize("stage", ["mid_write", "before_fsync", "before_rename", "after_rename"])
def test_save_killed_at_any_stage_leaves_the_old_or_the_new_file(tmp_path: Path, stage: str) -> None:
    path = tmp_path / "ck.pt"
    atomic_save({"format": "test", "version": 1, "weights": torch.full((256, 1024), 1.0)}, path)
    new = {"format": "test", "version": 2, "weights": torch.full((256, 1024), 2.0)}
    process = multiprocessing.get_context("fork").Process(
        target=_save_killed_at, args=(stage, str(path), new)
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == -signal.SIGKILL
    data = torch.load(path, weights_only=True)  # never torn
    expected = 2 if stage == "after_rename" else 1
    assert data["version"] == expected and bool((data["weights"] == expected).all())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ck.pt"]
    # A killed writer cannot clean up: its temporary file is hidden, and named so it can be found.
    assert all(name.startswith(".ck.pt.") and name.endswith(".tmp") for name in leftovers)
    assert len(leftovers) == (0 if stage == "after_rename" else 1)


def test_failed_save_keeps_previous_file_and_removes_temporary(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    atomic_save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        atomic_save({"v": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


# ---------------------------------------------------------------------------- refusing bad files


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "payload-ran"
    t = trainer()
    path = t.save_checkpoint(tmp_path / "ck.pt")
    data = torch.load(path, weights_only=True)
    data["class_names"] = Payload(marker)
    torch.save(data, path)
    expected = (
        f"refusing to load checkpoint '{path}': the safe loader cannot read it \\(WeightsUnpickler error: "
        f"Unsupported global: GLOBAL getattr .*\\)\\. Either it holds objects that only the full pickle loader can build"
    )
    with pytest.raises(vt.CheckpointError, match=expected):
        trainer().load_checkpoint(path)
    with pytest.raises(vt.CheckpointError, match=expected):
        vt.load_model(path)
    assert not marker.exists()


def _tampered(tmp_path: Path, change) -> tuple[vt.Trainer, Path]:
    # The architecture check needs a model vt.create_model built (it records the arch).
    build = vgg if change is _other_arch else toy
    t = trainer(build())
    _fit(t, 1)
    path = t.save_checkpoint(tmp_path / "ck.pt")
    data = torch.load(path, weights_only=True)
    change(data)
    # A consistent edit (as another program would make it): the checks behind the checksum are tested.
    data["checksum"] = tensor_checksum(data)
    torch.save(data, path)
    return trainer(build()), path


def _drop_key(data: dict) -> None:
    del data["model"]["classifier.0.bias"]


def _nan(data: dict) -> None:
    data["model"]["classifier.3.weight"][0, 0] = float("nan")


def _version(data: dict) -> None:
    data["format_version"] = 99


def _three_classes(data: dict) -> None:
    data["class_names"] = ["cool", "warm", "hot"]


def _renamed_classes(data: dict) -> None:
    data["class_names"] = ["dog", "cat"]


def _other_arch(data: dict) -> None:
    data["build"]["arch"] = "vgg16_bn"


def _reshaped(data: dict) -> None:
    data["model"]["classifier.3.weight"] = torch.zeros(3, 500)


def _optimizer(data: dict) -> None:
    data["trainer"]["optimizer"]["param_groups"][0]["params"] = [0, 1]


def _setter(*keys: str | int, value: object):
    """A change that sets ``data[k1][k2]...`` to ``value`` (a callable value is given the old one)."""

    def change(data: dict) -> None:
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value

    change.__name__ = "_" + "_".join(str(k) for k in keys if not str(k).isdigit())
    return change


OPTIMIZER_STATE = ("trainer", "optimizer", "state", 0)
TAMPERING = [
    (_drop_key, r"does not fit this model; nothing was loaded:\n  1 missing keys \(e.g. classifier.0.bias\)"),
    (_nan, r"holds NaN or infinite values in 1 tensors \(first: classifier.3.weight\)"),
    (_version, "has format version 99, but this vggtransfer reads versions 1 to 2; upgrade vggtransfer"),
    (_three_classes, r"has 3 classes \['cool', 'warm', 'hot'\] but this model has 2 outputs"),
    (
        _renamed_classes,
        r"has classes \['dog', 'cat'\] but this Trainer has \['cool', 'warm'\]; predictions would be misnamed",
    ),
    (_other_arch, "was saved from a 'vgg16_bn' model but this model is a 'vgg11_bn'"),
    (_reshaped, r"shape mismatch classifier.3.weight: model has \[2, 500\], file has \[3, 500\]"),
    (
        _optimizer,
        r"holds optimizer state for parameter groups of sizes \[2\] but this Trainer's optimizer would have \[4\]",
    ),
    # Before these checks, a wrong-shaped Adam state crashed the process (SIGSEGV) in the next fit.
    (
        _setter(*OPTIMIZER_STATE, "exp_avg", value=torch.zeros(3, 7)),
        r"optimizer state 'exp_avg' of parameter 0 has shape \[3, 7\] but the parameter has \[500, 64\]",
    ),
    (
        _setter(*OPTIMIZER_STATE, "exp_avg_sq", value=lambda t: torch.full_like(t, float("nan"))),
        r"holds NaN or infinite values in optimizer state 'exp_avg_sq' of parameter 0; resuming would train",
    ),
    (
        _setter(
            "trainer",
            "optimizer",
            "param_groups",
            0,
            value=lambda g: {"params": g["params"], "lr": g["lr"], "momentum": 0.9},
        ),
        r"holds the state of another kind of optimizer: its parameter groups lack \['amsgrad', 'betas', 'eps', 'weight_decay'\]",
    ),
    # A 0-d exp_avg passed the shape check (it skipped 0-d values) and crashed fit with SIGSEGV.
    (
        _setter(*OPTIMIZER_STATE, "exp_avg", value=torch.tensor(0.0)),
        r"optimizer state 'exp_avg' of parameter 0 has shape \[\] but the parameter has \[500, 64\]",
    ),
    (
        _setter(*OPTIMIZER_STATE, "step", value=torch.tensor(-1.0)),
        r"is damaged: optimizer state 'step' of parameter 0",
    ),
    (
        _setter("trainer", "optimizer", "param_groups", 0, "betas", value="x"),
        r"is damaged: its optimizer setting 'betas' is 'x', where this Adam has \(0.9, 0.999\)",
    ),
    (
        _setter("trainer", "optimizer", "param_groups", 0, "weight_decay", value=float("nan")),
        r"is damaged: its optimizer setting 'weight_decay' is nan",
    ),
    (
        _setter("class_names", value=["cool", "cool"]),
        r"is damaged: its class names \['cool', 'cool'\] repeat a name",
    ),
    (
        _setter("trainer", "scheduler", value={"last_epoch": 3}),
        r"was saved with an LR scheduler, but this Trainer has none",
    ),
    (
        _setter("trainer", "epoch", value="two"),
        r"is damaged: trainer field 'epoch' should be an int >= 0 but is 'two'",
    ),
    (
        _setter("trainer", "seed", value=-5),
        r"is damaged: trainer field 'seed' should be an int >= 0 but is -5",
    ),
    (
        _setter("trainer", "rng", "torch", value=torch.zeros(3)),
        r"random-number state for torch is not a uint8 tensor",
    ),
    (
        _setter("trainer", "rng", "torch", value=lambda t: torch.zeros_like(t)),
        r"its random-number state cannot be restored \(RuntimeError: ",
    ),
    (
        _setter("trainer", "rng", "python", value=lambda p: [7, p[1], p[2]]),
        r"its random-number state cannot be restored \(ValueError: ",
    ),
    (
        _setter(*OPTIMIZER_STATE, value=lambda state: {k: v for k, v in state.items() if k != "exp_avg_sq"}),
        r"does not fit this Trainer's Adam: the state of parameter 0 has \['exp_avg', 'step'\] where "
        r"\['exp_avg', 'exp_avg_sq', 'step'\] are expected",
    ),
    (
        _setter("trainer", "rng", "python", value=[3, [1, 2], None]),
        r"random-number state for Python's random module",
    ),
    (
        _setter("trainer", "history", value={"records": [{"epoch": "x"}]}),
        r"trainer field 'history' is not a list",
    ),
    (
        _setter("trainer", "best", value={"value": 1.0}),
        r"trainer field 'best' lacks value, epoch, wait or state",
    ),
    (_setter("trainer", "unfreeze_lr", value=-1.0), r"trainer field 'unfreeze_lr' is -1.0"),
    (_setter("transform", value={"size": -3}), r"is damaged: its transform settings do not build"),
    (_setter("class_names", value="cool"), r"is damaged: class_names should be a list of str but is 'cool'"),
    (_setter("extra", value=[1, 2]), r"is damaged: 'extra' is not a dict"),
    (
        _setter("trainer", "class_weights_in_effect", value=[1.0, float("nan")]),
        r"is damaged: trainer field 'class_weights_in_effect' is not a list of finite numbers >= 0 but \[1.0, nan\]",
    ),
]


@pytest.mark.parametrize(
    ("change", "message"), TAMPERING, ids=[f"{i}{c.__name__}" for i, (c, _) in enumerate(TAMPERING)]
)
def test_tampered_checkpoint_is_refused_and_nothing_changes(tmp_path: Path, change, message: str) -> None:
    fresh, path = _tampered(tmp_path, change)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    optimizer_before = fresh.optimizer.state_dict()
    rng, names = torch.get_rng_state(), list(fresh.class_names or [])
    with pytest.raises(vt.CheckpointError, match=message):
        fresh.load_checkpoint(path)
    assert (
        torch.equal(torch.get_rng_state(), rng) and (fresh.class_names or []) == names and fresh.extra == {}
    )
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    assert fresh.optimizer.state_dict()["state"] == optimizer_before["state"] == {}
    assert fresh.epoch == 0 and len(fresh.history) == 0


def test_not_a_checkpoint_and_truncated_files(tmp_path: Path) -> None:
    plain = tmp_path / "weights.pth"
    torch.save(vgg().state_dict(), plain)
    with pytest.raises(
        vt.CheckpointError,
        match=r"is not a vggtransfer checkpoint \(format None, expected 'vggtransfer.checkpoint'\); for a plain state dict use vt.create_model\(arch, weights=path\)",
    ):
        vt.load_model(plain)
    path = trainer().save_checkpoint(tmp_path / "ck.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        vt.CheckpointError,
        match=rf"^cannot read checkpoint '{truncated}' \(RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory\); the file is truncated, damaged or not a PyTorch file",
    ):
        trainer().load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="checkpoint '.*nope.pt' does not exist"):
        vt.load_model(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------- load_model, head-only


def test_load_model_rebuilds_without_training_code(tmp_path: Path) -> None:
    t = trainer(vgg(), transform=vt.imagenet_transform(size=32))  # rebuilt from its build record
    _fit(t, 2)
    path = t.save_checkpoint(tmp_path / "ck.pt")
    model, class_names, transform = vt.load_model(path)
    assert class_names == ["cool", "warm"]
    assert transform == vt.imagenet_transform(size=32)
    assert not model.training
    assert weights_equal(model, t.model)
    images = blobs(4, seed=11).tensors[0]
    t.model.eval()
    assert torch.equal(model(images), t.model(images))
    # the frozen-is-frozen policy is rebuilt too
    assert not any(p.requires_grad for p in model.features.parameters())


def _pretrained_resnet(torch_home: Path) -> nn.Module:
    """resnet18 'pretrained' from a random file placed in the temporary TORCH_HOME cache."""
    path = vt.cached_weights_path(ResNet18_Weights.IMAGENET1K_V1)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.resnet18().state_dict(), path)
    model = vt.create_model("resnet18", progress=False)
    return vt.replace_classifier(vt.freeze_features(model), 2)


def test_head_only_checkpoint_is_small_and_rebuilds_backbone(tmp_path: Path, torch_home: Path) -> None:
    t = vt.Trainer(
        _pretrained_resnet(torch_home), device="cpu", progress=False, seed=0, class_names=["cool", "warm"]
    )
    t.fit(blobs(16, size=64), epochs=1, batch_size=8, num_workers=0)
    full = t.save_checkpoint(tmp_path / "full.pt")
    head = t.save_checkpoint(tmp_path / "head.pt", head_only=True)
    deploy = t.save_checkpoint(tmp_path / "deploy.pt", head_only=True, training_state=False)
    head_bytes = sum(p.numel() * p.element_size() for p in t.model.fc.parameters())
    assert head_bytes < deploy.stat().st_size < head_bytes * 1.1
    assert deploy.stat().st_size < head.stat().st_size < full.stat().st_size / 10  # Adam: 2 values per weight
    assert set(torch.load(head, weights_only=True)["model"]) == {
        "fc.0.weight",
        "fc.0.bias",
        "fc.3.weight",
        "fc.3.bias",
    }
    with pytest.raises(
        vt.CheckpointError, match="was saved for deployment \\(training_state=False\\): it has no optimizer"
    ):
        vt.Trainer(_pretrained_resnet(torch_home), device="cpu", progress=False).load_checkpoint(deploy)
    assert weights_equal(vt.load_model(deploy).model, t.model)

    model, names, _ = vt.load_model(head)
    assert names == ["cool", "warm"] and weights_equal(model, t.model)

    resumed = vt.Trainer(_pretrained_resnet(torch_home), device="cpu", progress=False, seed=5)
    resumed.load_checkpoint(head)
    assert weights_equal(resumed.model, t.model) and resumed.epoch == 1


def test_head_only_refuses_other_backbone(tmp_path: Path, torch_home: Path) -> None:
    t = vt.Trainer(_pretrained_resnet(torch_home), device="cpu", progress=False, seed=0)
    head = t.save_checkpoint(tmp_path / "head.pt", head_only=True)
    torch.save(
        torchvision.models.resnet18().state_dict(), vt.cached_weights_path(ResNet18_Weights.IMAGENET1K_V1)
    )
    with pytest.raises(
        vt.CheckpointError,
        match=r"holds only a head trained on a specific backbone \(resnet18, weights ResNet18_Weights.IMAGENET1K_V1\), and this model's frozen backbone differs",
    ):
        vt.load_model(head)


def test_head_only_needs_rebuildable_backbone(tmp_path: Path) -> None:
    with pytest.raises(
        vt.CheckpointError,
        match="head_only=True needs a backbone that can be rebuilt from pretrained weights",
    ):
        trainer().save_checkpoint(tmp_path / "head.pt", head_only=True)
    assert not (tmp_path / "head.pt").exists()


# ---------------------------------------------------------------------------- portability


def test_wrapped_models_save_without_prefixes_and_prefixed_files_load(tmp_path: Path) -> None:
    inner = vgg()
    t = vt.Trainer(nn.DataParallel(inner), device="cpu", progress=False, seed=0, class_names=["cool", "warm"])
    path = t.save_checkpoint(tmp_path / "ck.pt")
    keys = list(torch.load(path, weights_only=True)["model"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    data = torch.load(path, weights_only=True)
    data["model"] = {f"module._orig_mod.{k}": v for k, v in data["model"].items()}
    data["checksum"] = tensor_checksum(data)  # as a program that saved the wrapped model would
    torch.save(data, path)
    fresh = trainer(vgg())
    fresh.load_checkpoint(path)
    assert weights_equal(fresh.model, inner)


def _save_with_cuda_tags(obj: object, path: Path) -> None:
    """torch.save, but every storage is recorded as living on cuda:0, as on a GPU machine."""
    registry = torch.serialization._package_registry
    saved = list(registry)
    torch.serialization.register_package(-1, lambda storage: "cuda:0", lambda storage, location: None)
    try:
        torch.save(obj, path)
    finally:
        registry[:] = saved


def test_checkpoint_written_on_cuda_loads_on_cpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to prove the point")
    t = trainer(small_resnet())  # vt.load_model rebuilds it from its build record
    _fit(t, 1)
    path = t.save_checkpoint(tmp_path / "ck.pt")
    data = torch.load(path, weights_only=True)
    gpu_path = tmp_path / "from-gpu.pt"
    _save_with_cuda_tags(data, gpu_path)
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        torch.load(gpu_path, weights_only=True)  # proves the file really names CUDA storages
    model, _, _ = vt.load_model(gpu_path)
    assert weights_equal(model, t.model)
    fresh = trainer(small_resnet())
    fresh.load_checkpoint(gpu_path)
    assert fresh.epoch == 1


@pytest.mark.cuda
def test_cuda_checkpoint_round_trip(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    t = trainer(vgg(), device="cuda")
    _fit(t, 1)
    path = t.save_checkpoint(tmp_path / "ck.pt")
    assert all(v.device.type == "cpu" for v in torch.load(path, weights_only=True)["model"].values())
    model, _, _ = vt.load_model(path, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_checkpoint_is_plain_data_readable_without_vggtransfer(tmp_path: Path) -> None:
    path = trainer().save_checkpoint(tmp_path / "ck.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["vggtransfer"] = None  # not importable: the file must not need it
        data = torch.load({str(path)!r}, weights_only=True)
        print(data["format"], data["format_version"], sorted(data["trainer"])[:3])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.startswith("vggtransfer.checkpoint 2 ")


# ---------------------------------------------------------------------------- hostile files, plain data, full disk


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100), "a JPEG image"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "an HTML page"),
        (b'{"epoch": 3, "weights": []}', "JSON or other text"),
        (b"epoch=3\nloss=0.2\n", "a text file"),
        (bytes(range(7, 256)) * 4, "not a PyTorch file (unknown binary data)"),
        (b"", "empty (0 bytes)"),
    ],
)
def test_files_that_are_not_checkpoints_are_named_for_what_they_are(
    tmp_path: Path, content: bytes, kind: str
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    for load in (vt.load_model, trainer().load_checkpoint):
        with pytest.raises(vt.CheckpointError) as raised:
            load(path)
        assert str(raised.value) == (
            f"{str(path)!r} is not a vggtransfer checkpoint: it is {kind}, not a file written by torch.save. "
            f"Checkpoints come from Trainer.save_checkpoint (e.g. runs/pets/best.pt)"
        )
    assert path.read_bytes() == content


def test_random_bytes_after_a_zip_or_pickle_signature_are_a_checkpoint_error(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (4096,), generator=generator, dtype=torch.uint8).numpy().tobytes()
    for signature in (b"PK\x03\x04", b"\x80\x02"):
        path = tmp_path / "random.pt"
        path.write_bytes(signature + noise)
        with pytest.raises(vt.CheckpointError) as raised:
            vt.load_model(path)
        assert re.match(
            r"^(cannot read|refusing to load) checkpoint '.*random.pt'.* damaged", str(raised.value)
        )


def _tensor_member_offset(path: Path) -> int:
    """Where the bytes of the largest tensor start inside a torch.save zip file."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
    with path.open("rb") as file:
        file.seek(member.header_offset + 26)
        name_length, extra_length = (
            int.from_bytes(file.read(2), "little"),
            int.from_bytes(file.read(2), "little"),
        )
    return member.header_offset + 30 + name_length + extra_length + member.file_size // 2


def test_one_flipped_byte_in_tensor_data_is_found(tmp_path: Path) -> None:
    t = trainer()
    path = t.save_checkpoint(tmp_path / "ck.pt")
    data = bytearray(path.read_bytes())
    data[_tensor_member_offset(path)] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = trainer()
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    for load in (vt.load_model, fresh.load_checkpoint):
        with pytest.raises(
            vt.CheckpointError, match=r"is corrupted: its tensor data does not match the checksum"
        ):
            load(path)
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())


def test_numpy_values_and_paths_are_saved_as_plain_data_and_load_again(tmp_path: Path) -> None:
    t = trainer()
    t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    t.lr = np.float64(1e-3)  # set after construction, as users do
    t.class_names = np.array(["cool", "warm"])
    t.extra = {
        "data": tmp_path / "pets",
        "counts": np.array([3, 5]),
        "mean": np.float32(0.5),
        "ids": (np.int64(1),),
    }
    path = t.save_checkpoint(tmp_path / "ck.pt")
    fresh = trainer()
    fresh.load_checkpoint(path)
    assert fresh.extra == {"data": str(tmp_path / "pets"), "counts": [3, 5], "mean": 0.5, "ids": (1,)}
    assert type(fresh.extra["counts"][0]) is int and fresh.class_names == ["cool", "warm"]
    saved = torch.load(path, weights_only=True)
    assert type(saved["trainer"]["lr"]) is float and saved["class_names"] == ["cool", "warm"]


def test_extra_that_no_checkpoint_can_hold_is_refused_before_writing(tmp_path: Path) -> None:
    t = trainer()
    t.extra = {"split": {"train": [1, 2, {3}]}}
    with pytest.raises(
        TypeError,
        match=r"^save_checkpoint: extra\['split'\]\['train'\]\[2\] is a set \(\{3\}\), which a checkpoint cannot hold",
    ):
        t.save_checkpoint(tmp_path / "ck.pt")
    assert list(tmp_path.iterdir()) == []


def test_load_model_refuses_class_names_that_do_not_fit_the_outputs(tmp_path: Path) -> None:
    path = trainer(vgg()).save_checkpoint(tmp_path / "ck.pt", training_state=False)
    data = torch.load(path, weights_only=True)
    data["class_names"] = ["cool", "warm", "hot"]
    torch.save(data, path)
    with pytest.raises(
        vt.CheckpointError, match=r"has 3 classes \['cool', 'warm', 'hot'\] but this model has 2 outputs"
    ):
        vt.load_model(path)


@contextlib.contextmanager
def _small_disk(folder: Path, megabytes: int, monkeypatch: pytest.MonkeyPatch):
    """A file system with ``megabytes`` of room at ``folder``: a real tmpfs as root, else an injected ENOSPC."""
    folder.mkdir()
    if (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    ):
        try:
            yield "tmpfs"
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    import vggtransfer._checkpoint_file as checkpoint_file

    real_fdopen = os.fdopen

    class Full(io.RawIOBase):
        def __init__(self, file) -> None:
            self.file, self.written = file, 0

        def write(self, data) -> int:
            if self.written + len(data) > megabytes * 1_000_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.file.write(data)

        def flush(self) -> None:
            self.file.flush()

        def fileno(self) -> int:
            return self.file.fileno()

        def __exit__(self, *exc) -> None:
            self.file.close()

    monkeypatch.setattr(checkpoint_file.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    yield "injected"


def test_a_full_disk_keeps_the_old_checkpoint_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "disk"
    small = trainer()
    big = vt.Trainer(
        vt.replace_classifier(vt.freeze_features(ToyVGG()), 2, hidden=(16384,)), device="cpu", progress=False
    )
    with _small_disk(folder, 2, monkeypatch):
        path = small.save_checkpoint(folder / "ck.pt")  # well under 2 MB
        saved = path.read_bytes()
        with pytest.raises(OSError) as raised:
            big.save_checkpoint(folder / "ck.pt")  # about 3.3 MB of weights and Adam state
        assert raised.value.errno == errno.ENOSPC
        assert re.match(
            rf"\[Errno {errno.ENOSPC}\] no space left to write '{folder}/ck.pt': it needs about \d+\.\d MB and \d+\.\d MB are free\. "
            r"The previous file is kept and no partial file was left",
            str(raised.value),
        )
        assert path.read_bytes() == saved and [p.name for p in folder.iterdir()] == ["ck.pt"]
        trainer().load_checkpoint(path)  # the old file still loads


def test_version_1_files_without_a_checksum_still_load(tmp_path: Path) -> None:
    t = trainer()
    t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    path = t.save_checkpoint(tmp_path / "ck.pt")
    data = torch.load(path, weights_only=True)
    data["format_version"] = 1
    del data["checksum"]
    torch.save(data, path)
    fresh = trainer()
    fresh.load_checkpoint(path)
    assert fresh.epoch == 1 and weights_equal(fresh.model, t.model)


def test_a_checkpoint_from_before_the_dropout_change_still_rebuilds(tmp_path: Path) -> None:
    # vggtransfer 0.1's first releases kept MobileNet's Dropout(0.2) in front of the new head; their
    # build records have no keep_input_dropout. Such a file must rebuild in its own layout.
    old = vt.replace_classifier(vt.create_model("efficientnet_b0", weights=None), 2, keep_input_dropout=True)
    assert [type(m).__name__ for m in old.classifier] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    spec = old.__dict__["_vggtransfer_spec"]
    del spec["head"]["keep_input_dropout"]  # as the old release recorded it
    path = vt.Trainer(old, device="cpu", progress=False).save_checkpoint(
        tmp_path / "old.pt", training_state=False
    )
    model, _, _ = vt.load_model(path)
    assert [type(m).__name__ for m in model.classifier] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert weights_equal(model, old)


def test_a_scheduler_state_of_another_kind_is_refused_before_anything_changes(tmp_path: Path) -> None:
    def step_lr(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)

    t = trainer(scheduler=step_lr)
    t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    path = t.save_checkpoint(tmp_path / "ck.pt")
    data = torch.load(path, weights_only=True)
    data["trainer"]["scheduler"] = {"last_epoch": "x", "lr_lambdas": [None]}
    data["checksum"] = tensor_checksum(data)
    torch.save(data, path)
    fresh = trainer(scheduler=step_lr)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(
        vt.CheckpointError,
        match=r"holds a scheduler state without 'step_size': it was saved with another kind",
    ):
        fresh.load_checkpoint(path)
    data["trainer"]["scheduler"] = {**t.scheduler.state_dict(), "last_epoch": "x"}
    data["checksum"] = tensor_checksum(data)
    torch.save(data, path)
    with pytest.raises(
        vt.CheckpointError,
        match=r"is damaged: its scheduler state 'last_epoch' is 'x', where a int was expected",
    ):
        fresh.load_checkpoint(path)
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and fresh.epoch == 0 and fresh.scheduler.last_epoch == 0


def test_numpy_strings_as_class_names_save_as_plain_str(tmp_path: Path) -> None:
    t = trainer(class_names=None)
    t.fit(helpers.Named(blobs(16), list(np.array(["cool", "warm"]))), epochs=1, batch_size=8, num_workers=0)
    t.extra = {"when": np.datetime64("2026-12-01")}
    with pytest.raises(
        TypeError, match=r"^save_checkpoint: extra\['when'\] is a date \(datetime.date\(2026, 12, 1\)\)"
    ):
        t.save_checkpoint(tmp_path / "ck.pt")  # refused when saving, not when loading
    t.extra = {"name": np.str_("pets")}
    path = t.save_checkpoint(tmp_path / "ck.pt")
    fresh = trainer()
    fresh.load_checkpoint(path)
    assert [type(n) for n in fresh.class_names] == [str, str] and type(fresh.extra["name"]) is str


def test_a_folder_or_fifo_is_not_a_checkpoint(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):
        with pytest.raises(vt.CheckpointError, match=r"is not a regular file; give the path of a .pt file"):
            vt.load_model(path)


def test_reduce_lr_on_plateau_checkpoints_round_trip(tmp_path: Path) -> None:
    def plateau(optimizer):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)

    t = trainer(scheduler=plateau)
    t.fit(blobs(16), blobs(8, seed=3), epochs=2, batch_size=8, num_workers=0)
    path = t.save_checkpoint(tmp_path / "ck.pt")  # its state holds mode_worse = inf
    fresh = trainer(scheduler=plateau)
    fresh.load_checkpoint(path)
    assert fresh.scheduler.state_dict() == t.scheduler.state_dict()


def test_special_files_are_never_replaced_by_a_checkpoint(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path):
        with pytest.raises(
            FileExistsError, match=r"exists and is not a regular file; refusing to replace it"
        ):
            trainer().save_checkpoint(target)
    assert fifo.is_fifo() and tmp_path.is_dir()


def test_a_build_record_that_does_not_build_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = trainer(vgg()).save_checkpoint(tmp_path / "ck.pt", training_state=False)
    data = torch.load(path, weights_only=True)
    for change in ({"random_init_kwargs": {"bogus": 1}}, {"freeze": "yes"}, {"head": {"num_classes": 2}}):
        edited = {**data, "build": {**data["build"], **change}}
        torch.save(edited, path)
        with pytest.raises(
            vt.CheckpointError, match=r"cannot rebuild the model of checkpoint .* from its build record \("
        ):
            vt.load_model(path)


def test_load_model_takes_a_model_built_by_the_user(tmp_path: Path) -> None:
    t = trainer(toy())  # a ToyVGG: no architecture record that load_model could rebuild from
    t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    path = t.save_checkpoint(tmp_path / "toy.pt", training_state=False)
    with pytest.raises(vt.CheckpointError) as error:
        vt.load_model(path)
    assert (
        "build that model yourself, with the same head, and pass it: vt.load_model(path, model=model)"
        in str(error.value)
    )
    fresh = toy(seed=5)
    loaded = vt.load_model(path, model=fresh)
    assert loaded.model is fresh and not fresh.training
    assert weights_equal(fresh, t.network) and loaded.class_names == ["cool", "warm"]


def test_load_model_refuses_a_model_that_does_not_fit_and_leaves_it_unchanged(tmp_path: Path) -> None:
    path = trainer(toy()).save_checkpoint(tmp_path / "toy.pt", training_state=False)
    three = toy(num_classes=3)
    before = {k: v.clone() for k, v in three.state_dict().items()}
    with pytest.raises(vt.CheckpointError) as error:
        vt.load_model(path, model=three)
    assert str(error.value) == (
        f"checkpoint {str(path)!r} has 2 classes ['cool', 'warm'] but this model has 3 outputs; build it "
        f"with vt.replace_classifier(model, 2)"
    )
    assert all(torch.equal(before[k], v) for k, v in three.state_dict().items())
    resnet = vt.replace_classifier(vt.create_model("resnet18", weights=None), 2)
    with pytest.raises(vt.CheckpointError, match="missing|unexpected|does not fit"):
        vt.load_model(path, model=resnet)
    with pytest.raises(TypeError) as error:
        vt.load_model(path, model="toy")  # type: ignore[arg-type]
    assert str(error.value) == "load_model: expected model to be an nn.Module or None but got str"
