"""The benchmark script still runs (tiny sizes; the numbers themselves are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import photos

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_benchmark_script_runs_and_reports_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        "--images",
        "8",
        "--size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--fine-tune-steps",
        "1",
        "--data",
        str(tmp_path / "none"),
        "--out",
        str(out),
    ]
    result = _run("seed_vs_vggtransfer.py", args)
    assert "vggtransfer (fp32): **speed-up of the frozen run** |" in result.stdout
    assert "vggtransfer (fp32): **speed-up of full fine-tuning** |" in result.stdout
    data = json.loads(out.read_text())
    assert data["vggtransfer"]["cached"].startswith("on")
    assert set(data) >= {"seed", "vggtransfer", "fine_tune_seed", "fine_tune_vggtransfer", "machine"}


@pytest.mark.slow
def test_end_to_end_script_times_every_phase_from_files_to_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    args = ["--files", "24", "--image-size", "32", "--epochs", "2", "--arch", "vgg11", "--device", "cpu"]
    args += ["--workers", "0", "--photos", str(tmp_path / "none"), "--out", str(out)]
    result = _run("end_to_end.py", args)
    data = json.loads(out.read_text())
    phases = ["import_s", "scan_s", "model_s", "fit_s", "checkpoint_s"]
    assert data["total_s"] == pytest.approx(sum(data[p] for p in phases))
    assert data["files"] == 24 and data["cached"] == "on"
    assert "| **files on disk to saved checkpoint** |" in result.stdout


@pytest.mark.slow
def test_augmentation_script_compares_uncached_views_and_none(tmp_path: Path) -> None:
    photos.class_folders(tmp_path / "pets", {"cats": 5, "dogs": 5})
    out = tmp_path / "aug.json"
    args = ["--data", str(tmp_path / "pets"), "--arch", "vgg11", "--size", "32", "--epochs", "2"]
    result = _run("augmentation.py", [*args, "--batch-size", "4", "--workers", "0", "--out", str(out)])
    data = json.loads(out.read_text())
    caches = {r["variant"]: r["cache"] for r in data["results"]}
    assert caches["uncached"].startswith("off: the transform augments randomly")
    assert caches["views"] == "on (2 augmented views)"
    assert caches["no-augmentation"] == "on"
    assert data["views_over_uncached_time"] > 0
    assert "| views |" in result.stdout


@pytest.mark.slow
def test_cpu_feature_pass_script_reports_both_dtypes_and_the_matmul_share(tmp_path: Path) -> None:
    photos.class_folders(tmp_path / "pets", {"cats": 3, "dogs": 3})
    out = tmp_path / "cpu.json"
    args = ["--sizes", "32", "--batch-size", "2", "--repeats", "1", "--matmul-seconds", "0.1"]
    _run("cpu_feature_pass.py", [*args, "--data", str(tmp_path / "pets"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert [row["dtype"] for row in data["feature_pass"]] == ["fp32", "bf16"]
    assert all(row["share_of_matmul_rate"] > 0 for row in data["feature_pass"])
    assert 0 <= data["agreement"]["prediction_agreement"] <= 1
    assert isinstance(data["native_bf16"], list)


@pytest.mark.slow
def test_compare_backbones_script_measures_both_targets(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    args = ["--tensors", "--image-size", "32", "--images", "16", "--val", "8", "--epochs", "1"]
    args += ["--batch-size", "8", "--archs", "squeezenet1_1", "--device", "cpu", "--workers", "0"]
    result = _run("compare_backbones.py", [*args, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["rerun_speedup"] == pytest.approx(data["first_s"] / data["second_s"])
    assert data["overhead"] == pytest.approx(data["first_s"] / data["singles_fit_s"])
    assert [row["cache"]["fit(train)"] for row in data["first_rows"]] == ["on"]
    assert [row["cache"]["fit(train)"] for row in data["second_rows"]] == ["on (from disk)"]
    assert "| **rerun speed-up** (first / second) |" in result.stdout
    assert "| **comparison overhead** (first / sum of single fits) |" in result.stdout
