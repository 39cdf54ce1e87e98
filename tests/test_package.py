"""The package as users meet it: public names, typing marker, docs and CI in step with the code."""

from __future__ import annotations

import inspect
import re
import runpy
import subprocess
import sys
from pathlib import Path

import vggtransfer as vt

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_import_and_have_docstrings_with_examples() -> None:
    required = {
        "create_model",
        "freeze_features",
        "unfreeze_features",
        "replace_classifier",
        "append_classifier",
        "imagenet_transform",
        "unnormalize",
        "IMAGENET_MEAN",
        "IMAGENET_STD",
    }
    assert required <= set(vt.__all__)
    for name in vt.__all__:
        obj = getattr(vt, name)
        if inspect.isfunction(obj):
            assert obj.__doc__ and "Example:" in obj.__doc__, f"{name} needs a docstring with an Example"


def test_py_typed_marker_ships() -> None:
    assert (Path(vt.__file__).parent / "py.typed").is_file()


def test_api_page_is_in_step_with_docstrings() -> None:
    namespace = runpy.run_path(str(ROOT / "tools" / "gen_api_docs.py"))
    assert (ROOT / "docs" / "api.md").read_text(encoding="utf-8") == namespace["render"](), (
        "docs/api.md is out of date: run python tools/gen_api_docs.py"
    )


def test_every_public_name_is_documented_in_api_page() -> None:
    import vggtransfer.data

    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in vt.__all__ if name != "__version__" and f"`vt.{name}`" not in page]
    missing += [name for name in vggtransfer.data.__all__ if f"`vggtransfer.data.{name}`" not in page]
    assert missing == []


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci


def test_docs_links_resolve() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"


def test_import_is_light() -> None:
    # Importing vggtransfer must not pull in optional extras (torch itself imports tqdm if present).
    code = "import sys, vggtransfer; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
