"""Shared fixtures: small offline models, a private TORCH_HOME, and the real photo sample."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

# tests/helpers.py is imported by tests and by the subprocesses they start.
sys.path.insert(0, str(Path(__file__).resolve().parent))

PETS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxford-pets-sample"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty TORCH_HOME, so tests never see or fill the user's weight cache."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def pets_dir() -> Path:
    """The read-only Oxford-IIIT Pet sample (cats/, dogs/); skips when it is not on this machine."""
    if not (PETS / "cats").is_dir():
        pytest.skip(
            f"real photo sample not found at {PETS} (only present in the project's CI and dev machines)"
        )
    return PETS


@pytest.fixture
def pet_photos(pets_dir: Path, tmp_path: Path) -> list[Path]:
    """Copies of a few real photos in tmp_path, safe to alter."""
    out = tmp_path / "photos"
    out.mkdir()
    picked = sorted((pets_dir / "cats").glob("*.jpg"))[:3] + sorted((pets_dir / "dogs").glob("*.jpg"))[:3]
    return [Path(shutil.copy(p, out / p.name)) for p in picked]
