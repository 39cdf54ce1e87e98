"""Write docs/api.md from the docstrings of vggtransfer's public names.

python tools/gen_api_docs.py          # rewrite docs/api.md
python tools/gen_api_docs.py --check  # exit 1 if docs/api.md is out of date (run by the tests)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import vggtransfer as vt
import vggtransfer.data as vt_data

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"

HEADER = """# API reference

Generated from the docstrings by `python tools/gen_api_docs.py`; a test fails when this page and
the code disagree. Everything here is importable as `import vggtransfer as vt; vt.NAME`.
"""


def _section(name: str, module: object = vt, prefix: str = "vt.") -> str:
    obj = getattr(module, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        kind = "class" if inspect.isclass(obj) else "function"
        try:
            signature = f"{name}{inspect.signature(obj)}"
        except (TypeError, ValueError):
            signature = name
        doc = inspect.getdoc(obj) or ""
        body = f"```python\n{signature}\n```\n\n{doc}\n"
        if inspect.isclass(obj):
            methods = [
                (m, member)
                for m, member in vars(obj).items()
                if not m.startswith("_")
                and (inspect.isfunction(member) or isinstance(member, (property, classmethod)))
            ]
            for method_name, member in methods:
                target = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                doc_text = inspect.getdoc(target) or ""
                if isinstance(member, property) or "\n" not in doc_text:
                    body += f"\n- `{method_name}`: {doc_text.split(chr(10) * 2)[0]}"
                else:
                    signature = f"{method_name}{inspect.signature(target)}"
                    body += f"\n\n### `{name}.{method_name}`\n\n```python\n{signature}\n```\n\n{doc_text}\n"
            if methods:
                body += "\n"
        return f"## `{prefix}{name}` ({kind})\n\n{body}"
    return f"## `{prefix}{name}`\n\n```python\n{name} = {obj!r}\n```\n"


# The order a reader meets them in; names not listed follow alphabetically, so none is left out.
ORDER = [
    "create_model",
    "classification_models",
    "cached_weights_path",
    "WeightsNotAvailableError",
    "freeze_features",
    "unfreeze_features",
    "feature_extractor",
    "BatchNormPolicy",
    "replace_classifier",
    "append_classifier",
    "find_classifier",
    "HEAD_ATTRIBUTES",
    "imagenet_transform",
    "ImageTransform",
    "to_rgb",
    "unnormalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Trainer",
    "EarlyStopping",
    "History",
    "Callback",
    "CSVLogger",
    "TensorBoardLogger",
    "LRFinder",
    "Prediction",
    "evaluate_samples",
    "Evaluation",
    "SampleResult",
    "write_report",
    "compare_backbones",
    "Comparison",
    "load_model",
    "LoadedModel",
    "write_kaggle_submission",
    "Submission",
    "CheckpointError",
    "FORMAT_VERSION",
    "export",
    "Export",
    "EXPORT_FORMATS",
    "EXPORT_TOLERANCE",
    "ONNX_OPSET",
    "build_spec",
    "is_main_process",
]


def render() -> str:
    public = [name for name in vt.__all__ if name != "__version__"]
    names = [name for name in ORDER if name in public] + sorted(set(public) - set(ORDER))
    data_names = sorted(
        vt_data.__all__, key=lambda n: DATA_ORDER.index(n) if n in DATA_ORDER else len(DATA_ORDER)
    )
    data_part = "\n".join(_section(name, vt_data, "vggtransfer.data.") for name in data_names)
    return HEADER + "\n" + "\n".join(_section(name) for name in names) + DATA_HEADER + data_part


DATA_ORDER = [
    "scan_images",
    "ScanReport",
    "BadFile",
    "DogsVsCats",
    "ImageList",
    "oxford_pets",
    "stratified_split",
    "Split",
]
DATA_HEADER = """
# `vggtransfer.data`

Scanning image folders, dataset layouts and splits: `from vggtransfer.data import DogsVsCats`.

"""


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if API_PAGE.read_text(encoding="utf-8") != text:
            print(f"{API_PAGE} is out of date: run python tools/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    API_PAGE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
