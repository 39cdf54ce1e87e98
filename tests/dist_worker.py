"""Run by tests/test_distributed.py under torchrun: train a small model, save what rank 0 sees."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vggtransfer as vt
from helpers import blobs


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = vt.create_model("vgg11_bn", weights=None)
    # no dropout: one process and several draw their masks differently
    return vt.replace_classifier(vt.freeze_features(model), 2, dropout=0.0)


def main() -> None:
    out, cache, epochs, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rank_seed = int(os.environ.get("RANK", "0"))  # a different init per rank: rank 0's must win
    trainer = vt.Trainer(
        build(rank_seed),
        device="cpu",
        seed=0,
        progress=False,
        cache_features={"cache": True, "plain": False}[cache],
        class_names=["cool", "warm"],
    )
    if len(sys.argv) > 5:  # resume from a checkpoint first (e.g. one written by a single process)
        trainer.load_checkpoint(sys.argv[5])
    trainer.fit(
        blobs(32),
        blobs(12, seed=7),
        epochs=epochs,
        batch_size=batch,
        num_workers=0,
        checkpoint_dir=out / "checkpoints",
    )
    report = trainer.evaluate(blobs(12, seed=7), batch_size=batch, num_workers=0)
    if vt.is_main_process():
        torch.save(trainer.network.state_dict(), out / "final.pt")
        (out / "result.json").write_text(
            json.dumps(
                {
                    "history": trainer.history.to_dict(),
                    "evaluate": report,
                    "cache": trainer.cache_report,
                    "world": trainer.world_size,
                }
            )
        )


if __name__ == "__main__":
    main()
