"""The CUDA paths: bf16 and channels-last defaults, fp16 with gradient scaling, caching, compiling.

Skipped without a GPU (the development machines and CI have none); benchmarks/gpu_run.sh runs
them on a lent one with ``pytest -m cuda``. Tolerances are loose where GPU kernels legitimately
differ from the CPU's (bf16 rounding, TF32 convolutions, non-deterministic reductions).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import blobs, trainer, vgg

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


def test_defaults_on_cuda_are_bf16_channels_last_and_features_stay_on_the_gpu() -> None:
    t = trainer(vgg(), device="cuda")
    assert t.precision.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert t.channels_last and torch.backends.cudnn.benchmark
    history = t.fit(blobs(), blobs(16, seed=7), epochs=3, batch_size=16, num_workers=0)
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert t.cache_report["fit(train)"] == "on"
    assert all(fs.features.device.type == "cuda" for fs in t._cache.sets.values())


def test_bf16_on_cuda_agrees_with_fp32_on_cpu() -> None:
    gpu = trainer(vgg(), device="cuda")
    cpu = trainer(vgg(), device="cpu")
    h_gpu = gpu.fit(blobs(), blobs(16, seed=7), epochs=2, batch_size=16, num_workers=0)
    h_cpu = cpu.fit(blobs(), blobs(16, seed=7), epochs=2, batch_size=16, num_workers=0)
    assert h_gpu["train_loss"] == pytest.approx(h_cpu["train_loss"], rel=5e-2)
    assert h_gpu["val_accuracy"] == pytest.approx(h_cpu["val_accuracy"], abs=1 / 16 + 1e-9)


def test_cached_and_uncached_training_agree_on_cuda() -> None:
    cached = trainer(vgg(), device="cuda", precision="fp32")
    plain = trainer(vgg(), device="cuda", precision="fp32", cache_features=False)
    h_cached = cached.fit(blobs(), epochs=2, batch_size=16, num_workers=0)
    h_plain = plain.fit(blobs(), epochs=2, batch_size=16, num_workers=0)
    assert h_cached["train_loss"] == pytest.approx(h_plain["train_loss"], rel=1e-3)


def test_fp16_with_gradient_scaling_trains_and_resumes(tmp_path: Path) -> None:
    t = trainer(vgg(), device="cuda", precision="fp16", cache_features=False)
    t.unfreeze_features()
    history = t.fit(blobs(), epochs=2, batch_size=16, num_workers=0)
    assert all(torch.isfinite(torch.tensor(history["train_loss"])))
    assert t.scaler.is_enabled() and t.scaler.get_scale() > 0
    path = t.save_checkpoint(tmp_path / "fp16.pt")
    resumed = trainer(vgg(), device="cuda", precision="fp16", cache_features=False)
    resumed.load_checkpoint(path)
    assert resumed.scaler.get_scale() == t.scaler.get_scale()
    resumed.fit(blobs(), epochs=3, batch_size=16, num_workers=0)
    assert resumed.epoch == 3


def test_compiled_steps_and_feature_pass_on_cuda() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1, bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(4),
            )
            self.classifier = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.features(x), 1))

    import vggtransfer as vt

    def run(compiled: bool) -> vt.Trainer:
        torch.manual_seed(0)
        t = trainer(
            vt.freeze_features(Tiny()), device="cuda", compile_model=compiled, compile_features=compiled
        )
        t.fit(blobs(32), epochs=2, batch_size=8, num_workers=0)  # cached: compiled feature pass and head
        t.unfreeze_features()
        t.fit(blobs(32), epochs=3, batch_size=8, num_workers=0)  # the whole model, compiled
        return t

    eager, compiled = run(False), run(True)
    assert compiled.history["train_loss"] == pytest.approx(eager.history["train_loss"], rel=5e-2)


def test_find_lr_with_fp16_on_cuda_restores_weights_scaler_and_generators() -> None:
    t = trainer(vgg(), device="cuda", precision="fp16", cache_features=False)
    t.unfreeze_features()
    t.fit(blobs(), epochs=1, batch_size=16, num_workers=0)
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    scaler, generator = t.scaler.state_dict(), torch.cuda.get_rng_state()
    result = t.find_lr(blobs(), start_lr=1e-5, end_lr=1e3, steps=12, batch_size=16, num_workers=0)
    assert 1e-5 <= result.suggestion <= 1e3 and len(result.losses) == len(result.lrs)
    after = t.model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in weights.items())
    assert t.scaler.state_dict() == scaler and torch.equal(torch.cuda.get_rng_state(), generator)
