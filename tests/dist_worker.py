"""Run by tests/test_distributed.py under torchrun: train a small model, save what rank 0 sees."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vggtransfer as vt
from helpers import Augmented, blobs


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = vt.create_model("vgg11_bn", weights=None)
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
