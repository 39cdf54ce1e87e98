"""Run by tests/test_distributed.py under torchrun: train a small model, save what rank 0 sees."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vggtransfer as vt
from helpers import Augmented, ToyVGG, blobs


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # resnet18: BatchNorm in the frozen part like VGG11_bn, at a twelfth of its 133M weights (each
    # job builds, broadcasts and saves it in every process: VGG made this launch the suite's slowest)
    model = vt.create_model("resnet18", weights=None)
    # no dropout: one process and several draw their masks differently
    return vt.replace_classifier(vt.freeze_features(model), 2, dropout=0.0)


def main() -> None:
    """``dist_worker.py OUT EPOCHS BATCH JOB...``, each JOB ``NAME:cache|plain|views[:CHECKPOINT]``.

    ``views`` trains on randomly augmented data with ``cache_views=2``.

    The jobs run one after the other in the same process group (one torchrun launch for all of
    them: starting Python and torch is most of a launch's cost); each writes into OUT/NAME.
    """
    out, epochs, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for job in sys.argv[4:]:
        name, cache, *resume = job.split(":", 2)
        run(out / name, cache, epochs, batch, resume[0] if resume else None)
    agreement(out / "agreement")
    lr_range(out / "find_lr")


def agreement(out: Path) -> None:
    """What every process must agree on: a drawn seed, and whether rank 0 could save."""
    rank = int(os.environ["RANK"])
    out.mkdir(parents=True, exist_ok=True)
    drawn = vt.Trainer(build(rank), device="cpu", progress=False)  # seed=None: each rank draws one
    blocker = out / "a-file"
    if rank == 0:
        blocker.write_text("not a folder")
    try:
        drawn.save_checkpoint(blocker / "ck.pt")  # rank 0 cannot write: nobody may wait for it
        failure = "none"
    except Exception as exc:
        failure = type(exc).__name__
    (out / f"rank{rank}.json").write_text(json.dumps({"seed": drawn.seed, "save": failure}))


def small(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return vt.replace_classifier(vt.freeze_features(ToyVGG()), 2, dropout=0.0)


def random_labels() -> torch.utils.data.TensorDataset:
    """Nothing to learn: a rising rate drives the loss up and ends the range test early."""
    labels = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(3))
    return torch.utils.data.TensorDataset(blobs(32).tensors[0], labels)


def lr_range(out: Path) -> None:
    """find_lr under torchrun: the curve each process records, and whether its weights came back."""
    rank = int(os.environ["RANK"])
    out.mkdir(parents=True, exist_ok=True)
    trainer = vt.Trainer(small(rank), device="cpu", seed=0, progress=False)  # rank 0's weights win
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    result = trainer.find_lr(
        random_labels(), start_lr=1e-4, end_lr=1e4, steps=30, batch_size=4, num_workers=0
    )
    after = trainer.network.state_dict()
    record = {"lrs": result.lrs, "losses": result.losses, "suggestion": result.suggestion}
    record["restored"] = all(torch.equal(value, after[key]) for key, value in before.items())
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def run(out: Path, cache: str, epochs: int, batch: int, resume: str | None) -> None:
    rank_seed = int(os.environ.get("RANK", "0"))  # a different init per rank: rank 0's must win
    trainer = vt.Trainer(
        build(rank_seed),
        device="cpu",
        seed=0,
        progress=False,
        cache_features={"cache": True, "plain": False, "views": "auto"}[cache],
        cache_views=2 if cache == "views" else None,
        class_names=["cool", "warm"],
    )
    if resume is not None:  # resume from a checkpoint first (e.g. one written by a single process)
        trainer.load_checkpoint(resume)
    trainer.fit(
        Augmented(32) if cache == "views" else blobs(32),
        blobs(12, seed=7),
        epochs=epochs,
        batch_size=batch,
        num_workers=0,
        checkpoint_dir=out / "checkpoints",
    )
    report = trainer.evaluate(blobs(12, seed=7), batch_size=batch, num_workers=0)
    averaged = trainer.evaluate(blobs(12, seed=7), batch_size=batch, num_workers=0, tta=True)
    if vt.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        torch.save(trainer.network.state_dict(), out / "final.pt")
        (out / "result.json").write_text(
            json.dumps(
                {
                    "history": trainer.history.to_dict(),
                    "evaluate": report,
                    "evaluate_tta": averaged,
                    "cache": trainer.cache_report,
                    "world": trainer.world_size,
                }
            )
        )


if __name__ == "__main__":
    main()
