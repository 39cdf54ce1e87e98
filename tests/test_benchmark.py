"""The benchmark script still runs (tiny sizes; the numbers themselves are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
