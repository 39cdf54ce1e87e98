"""``vggtransfer evaluate`` and ``vggtransfer export``: commands on a trained checkpoint."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from ._cli_common import (
    DATA_HELP,
    UsageError,
    add_arch,
    check_out,
    check_positive,
    check_runtime,
    describe_model,
    make_trainer,
    open_checkpoint,
    read_labelled,
    usage_errors,
)
from ._export import EXPORT_FORMATS, export
from ._report import write_report
from .data import ScanReport

__all__ = ["add_parsers", "metrics_lines", "scan_of"]


def add_parsers(commands: Any) -> None:
    """Register ``evaluate`` and ``export`` with their options."""
    evaluate = commands.add_parser("evaluate", help="accuracy, per-class metrics and a report on a folder")
    evaluate.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    evaluate.add_argument("data", type=Path, metavar="DATA", help=DATA_HELP)
    add_arch(evaluate)
    evaluate.add_argument(
        "--report", type=Path, metavar="DIR", help="write report.md, the plots and misclassified.csv"
    )
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per step")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    evaluate.set_defaults(run=_evaluate)
    exporting = commands.add_parser(
        "export", help="write an ONNX or TorchScript file, checked against PyTorch"
    )
    exporting.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    exporting.add_argument("--format", choices=EXPORT_FORMATS, default="onnx", help="the file's format")
    exporting.add_argument("--out", type=Path, required=True, metavar="FILE", help="the file to write")
    add_arch(exporting)
    exporting.set_defaults(run=_export)


def _evaluate(args: argparse.Namespace) -> int:
    check_positive(args.batch_size, "--batch-size")
    if args.report is not None:  # a report never replaces another (such as a training run's)
        check_out(args.report, {"DATA": args.data}, "--report")
    check_runtime(args.device, "auto")
    model, names, transform = open_checkpoint(args.checkpoint, args.arch)
    data = read_labelled(args.data, "DATA", transform)
    if names is not None and data.classes != names:
        raise UsageError(
            f"DATA {str(args.data)!r} has the classes {data.classes} but the checkpoint was trained on {names}; "
            f"expected the same class folders"
        )
    trainer = make_trainer(model, device=args.device, class_names=names, transform=transform, progress=True)
    if args.report is None:
        metrics = trainer.evaluate(data, batch_size=args.batch_size)
    else:
        command = shlex.join(["vggtransfer", "evaluate", *args.argv])
        evaluation = write_report(
            trainer, data, args.report, batch_size=args.batch_size, num_workers=None, scan=scan_of(data),
            model=describe_model(model), command=command,
        )  # fmt: skip
        metrics = evaluation.metrics
    print("\n".join(metrics_lines(metrics)))
    if args.report is not None:
        print(f"wrote {args.report / 'report.md'}, confusion_matrix.png, errors.png, misclassified.csv")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.out.exists() and args.out.resolve() == args.checkpoint.resolve():
        raise UsageError(f"--out {str(args.out)!r} is the checkpoint itself; expected another file")
    if args.out.is_dir():
        raise UsageError(f"--out {str(args.out)!r} is a folder; expected a file name such as model.onnx")
    if args.out.parent.exists() and not args.out.parent.is_dir():
        raise UsageError(
            f"--out {str(args.out)!r} is in {str(args.out.parent)!r}, which is a file; expected a path in a folder"
        )
    model, names, transform = open_checkpoint(args.checkpoint, args.arch)
    with usage_errors(ValueError, TypeError):
        result = export(
            model,
            args.out,
            format=args.format,
            image_size=transform.size,
            class_names=names,
            transform=transform,
        )
    print(
        f"wrote {result.path} ({result.format}, input [batch, 3, {transform.size}, {transform.size}], "
        f"classes {result.class_names}; largest difference from PyTorch {result.max_abs_diff:.2g})"
    )
    return 0


def scan_of(data: Any) -> ScanReport:
    """The scan a DogsVsCats did when it was built, for the report's bad-file list."""
    return ScanReport(good=[path for path, _ in data.samples], bad=list(data.bad_files))


def metrics_lines(metrics: dict[str, Any]) -> list[str]:
    """The metrics of ``Trainer.evaluate`` as a few printed lines: totals, then one per class."""
    lines = [
        f"accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f}, "
        f"loss {metrics['loss']:.4f} on {metrics['count']} images"
    ]
    width = max(len(name) for name in metrics["per_class"])
    for name, row in metrics["per_class"].items():
        lines.append(
            f"  {name:<{width}}  precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
            f"F1 {row['f1']:.3f}  ({row['support']} images)"
        )
    return lines
