"""Shared fixtures: small offline models, a private TORCH_HOME, generated photos and the real sample.

Every test stands on its own on a fresh clone: photos are generated (tests/photos.py). The real
Oxford-IIIT Pet sample adds coverage where it exists: tests that read it take the ``pets_dir``
fixture, are marked ``real_photos`` and skip without it. Its folder is
``VGGTRANSFER_TEST_PHOTOS`` if set, else ``../shared/data/oxford-pets-sample`` beside the
checkout; set the variable to a path that does not exist to run the suite as a fresh clone does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# tests/helpers.py and tests/photos.py are imported by tests and by the subprocesses they start.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import photos

PETS = Path(
    os.environ.get("VGGTRANSFER_TEST_PHOTOS")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxford-pets-sample"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_photos: reads the real photo sample (VGGTRANSFER_TEST_PHOTOS); skipped where it is absent",
    )


def pytest_report_header(config: pytest.Config) -> str:
    found = "found" if (PETS / "cats").is_dir() else "absent: tests marked real_photos skip"
    return f"real photo sample: {PETS} ({found})"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # every test that reads the real sample is marked, so `-m "not real_photos"` leaves them all out
    for item in items:
        if "pets_dir" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("real_photos"):
            item.add_marker("real_photos")


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
    """The read-only real photo sample (cats/, dogs/); skips when it is not on this machine."""
    if not (PETS / "cats").is_dir():
        pytest.skip(f"real photo sample not found at {PETS} (set VGGTRANSFER_TEST_PHOTOS to its folder)")
    return PETS


@pytest.fixture
def pet_photos(tmp_path: Path) -> list[Path]:
    """Six generated photos in tmp_path, three "cats" then three "dogs" (JPEG, not square), safe to alter."""
    out = tmp_path / "photos"
    return [
        photos.save(photos.photo(label, seed), out / f"{kind}-{seed}.jpg")
        for label, kind in ((photos.CAT, "cat"), (photos.DOG, "dog"))
        for seed in range(3)
    ]
