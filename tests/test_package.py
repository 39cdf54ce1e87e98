"""The package as users meet it: public names, typing marker, docs and CI in step with the code."""

from __future__ import annotations

import ast
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
    code = (
        "import sys, vggtransfer; "
        "print('matplotlib' in sys.modules, 'timm' in sys.modules, 'tensorboard' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def _code_lines(node: ast.AST, source: list[str]) -> int:
    """Lines of ``node`` that hold code: not blank, not only a comment, not its docstring."""
    body = getattr(node, "body", [])
    skip: set[int] = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))  # type: ignore[operator]
    lines = range(node.lineno, node.end_lineno + 1)  # type: ignore[attr-defined]
    return sum(
        1
        for n in lines
        if n not in skip and source[n - 1].strip() and not source[n - 1].strip().startswith("#")
    )


def test_size_limits_keep_the_trainer_a_short_loop() -> None:
    # The design rule of issue 10: collaborators in their own modules, a loop that fits on a screen.
    src = ROOT / "src" / "vggtransfer"
    trainer_file = src / "_trainer.py"
    assert len(trainer_file.read_text(encoding="utf-8").splitlines()) <= 500
    too_long = []
    for path in sorted(src.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = _code_lines(node, lines)
                limit = 30 if (path == trainer_file and node.name == "fit") else 60
                if count > limit:
                    too_long.append(f"{path.name}:{node.name} has {count} code lines (limit {limit})")
    assert too_long == []


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = []
    for path in sorted((ROOT / "src" / "vggtransfer").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert offenders == []


def test_module_all_lists_name_what_the_module_defines_and_others_import() -> None:
    import importlib

    src = ROOT / "src" / "vggtransfer"
    imported: dict[str, set[str]] = {}
    for path in sorted(src.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                imported.setdefault(node.module, set()).update(a.name for a in node.names)
    problems = []
    for module_name, names in sorted(imported.items()):
        module = importlib.import_module(f"vggtransfer.{module_name}")
        listed = set(getattr(module, "__all__", ()))
        problems += [f"{module_name}.__all__ lacks {n}" for n in sorted(names - listed)]
        problems += [
            f"{module_name}.__all__ names missing {n}" for n in sorted(listed) if not hasattr(module, n)
        ]
    assert problems == []
