"""Trainer(callbacks=[...]): when they are called, with what; CSVLogger and TensorBoardLogger."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vggtransfer as vt
from helpers import blobs, trainer
from vggtransfer._callbacks import Callbacks


class Recorder(vt.Callback):
    """Records every call; optionally raises ``error`` at the end of epoch ``fail_at``."""

    def __init__(self, fail_at: int | None = None, error: type[BaseException] = RuntimeError) -> None:
        self.calls: list[tuple[str, object]] = []
        self.fail_at, self.error = fail_at, error

    def on_epoch_end(self, record: dict[str, float]) -> None:
        self.calls.append(("epoch", record))
        record["train_loss"] = -1.0  # a copy: the History must not change
        if record["epoch"] == self.fail_at:
            raise self.error("callback failed")

    def on_fit_end(self, history: vt.History) -> None:
        self.calls.append(("fit", history))


def _fit(t: vt.Trainer, epochs: int, **kwargs) -> vt.History:
    return t.fit(
        blobs(16, size=16), blobs(8, size=16, seed=1), epochs=epochs, batch_size=8, num_workers=0, **kwargs
    )


def test_callbacks_get_each_record_then_the_history_in_order() -> None:
    first, second = Recorder(), Recorder()
    t = trainer(callbacks=[first, second])
    history = _fit(t, 2)
    assert [kind for kind, _ in first.calls] == ["epoch", "epoch", "fit"]
    assert [record["epoch"] for kind, record in first.calls[:2]] == [1, 2]
    assert all(record["train_loss"] == -1.0 for _, record in first.calls[:2])  # changed by the callback...
    assert history["train_loss"][0] > 0  # ...in its own copy
    assert first.calls[2][1] is history and second.calls == first.calls
    only_end = SimpleNamespace(ends=[])
    only_end.on_fit_end = only_end.ends.append  # any object with one hook will do
    trainer(callbacks=(only_end,)).fit(blobs(8, size=16), epochs=1, batch_size=8, num_workers=0)
    assert len(only_end.ends) == 1


def test_early_stopping_ends_fit_normally_so_on_fit_end_is_called() -> None:
    recorder = Recorder()
    t = trainer(callbacks=[recorder])
    _fit(t, 10, early_stopping=vt.EarlyStopping(monitor="train_loss", patience=1, min_delta=1e9))
    assert [kind for kind, _ in recorder.calls] == ["epoch", "epoch", "fit"] and t.epoch == 2


def test_resumed_fit_calls_back_from_the_next_epoch(tmp_path: Path) -> None:
    _fit(trainer(), 2, checkpoint_dir=tmp_path)
    recorder = Recorder()
    resumed = trainer(callbacks=[recorder])
    resumed.load_checkpoint(tmp_path / "last.pt")
    _fit(resumed, 4)
    assert [record["epoch"] for kind, record in recorder.calls if kind == "epoch"] == [3, 4]


def test_a_raising_callback_keeps_that_epochs_checkpoint_and_skips_on_fit_end(tmp_path: Path) -> None:
    recorder = Recorder(fail_at=2)
    with pytest.raises(RuntimeError, match="callback failed"):
        _fit(trainer(callbacks=[recorder]), 3, checkpoint_dir=tmp_path)
    assert [kind for kind, _ in recorder.calls] == ["epoch", "epoch"]
    again = trainer()
    again.load_checkpoint(tmp_path / "last.pt")
    assert again.epoch == 2


def test_ctrl_c_saves_interrupted_pt_and_does_not_call_on_fit_end(tmp_path: Path) -> None:
    recorder = Recorder(fail_at=1, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _fit(trainer(callbacks=[recorder]), 3, checkpoint_dir=tmp_path)
    assert [kind for kind, _ in recorder.calls] == ["epoch"] and (tmp_path / "interrupted.pt").is_file()


def test_only_rank_zero_calls_back() -> None:
    recorder = Recorder()
    Callbacks([recorder], rank=1).epoch_end({"epoch": 1.0})
    Callbacks([recorder], rank=1).fit_end(vt.History())
    assert recorder.calls == []


class Nothing(vt.Callback):
    pass


class NotCallable:
    on_epoch_end = 3


BAD_CALLBACKS = [
    (Recorder(), "Trainer: expected callbacks to be a list of callbacks, such as [vt.CSVLogger('log.csv')], but got <"),
    ([Recorder(), object()], "Trainer: callbacks[1] (object) defines neither on_epoch_end(record) nor on_fit_end(history); a callback needs at least one of them"),
    ([Nothing()], "Trainer: callbacks[0] (Nothing) defines neither on_epoch_end(record) nor on_fit_end(history); a callback needs at least one of them"),
    ([NotCallable()], "Trainer: callbacks[0] (NotCallable) has on_epoch_end = 3, which is not callable; make it a method"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "message"), BAD_CALLBACKS, ids=["single", "object", "no-override", "not-callable"]
)
def test_bad_callbacks_are_refused_saying_which_and_what_it_lacks(value, message: str) -> None:
    with pytest.raises(TypeError, match=f"^{re.escape(message)}"):
        trainer(callbacks=value)


# ---------------------------------------------------------------------------- CSVLogger


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_csv_log_holds_the_history_exactly(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "log.csv"  # the folder is created
    t = trainer(callbacks=[vt.CSVLogger(path)])
    history = _fit(t, 2)
    rows = _rows(path)
    assert list(rows[0]) == list(history[0]) and next(iter(rows[0])) == "epoch"
    assert [{k: float(v) for k, v in row.items()} for row in rows] == list(history)


def test_csv_columns_grow_when_keys_appear_later(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    t = trainer(callbacks=[vt.CSVLogger(path)])
    t.fit(blobs(8, size=16), epochs=1, batch_size=8, num_workers=0)
    t.unfreeze_features()
    t.fit(blobs(8, size=16), blobs(8, size=16, seed=1), epochs=2, batch_size=8, num_workers=0)
    rows = _rows(path)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0]["features_lr"] == "" and rows[0]["val_loss"] == ""
    assert float(rows[1]["features_lr"]) == t.history[-1]["features_lr"]


def test_csv_log_of_a_resumed_run_keeps_earlier_rows_and_replaces_later_ones(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    _fit(trainer(callbacks=[vt.CSVLogger(path)]), 2, checkpoint_dir=tmp_path / "at2")
    first_two = path.read_bytes()
    t = trainer(callbacks=[vt.CSVLogger(path)])
    t.load_checkpoint(tmp_path / "at2" / "last.pt")
    _fit(t, 4)  # epochs 3 and 4 appended
    resumed = trainer(callbacks=[vt.CSVLogger(path)])
    resumed.load_checkpoint(tmp_path / "at2" / "last.pt")
    _fit(resumed, 3)  # epoch 3 again: 3 replaced, 4 gone
    assert path.read_bytes().startswith(first_two)
    rows = _rows(path)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert float(rows[2]["train_loss"]) == resumed.history[2]["train_loss"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"name,age\nbob,3\n", "its first column is 'name', not 'epoch'"),
        (b"epoch,train_loss\n1,0.5\nfirst,0.4\n", "line 3 is not a row of epoch numbers"),
        (b"epoch,train_loss\n1,0.5,extra\n", "line 2 is not a row of epoch numbers"),
        (b"\xff\xfe\x00binary", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    ],
)
def test_csv_logger_refuses_a_file_it_did_not_write_and_leaves_it_unchanged(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "mine.csv"
    path.write_bytes(content)
    message = (
        f"CSVLogger: {str(path)!r} exists but is not a CSV log of epochs; refusing to overwrite it. "
        f"Choose another path, or move the file away ({why})"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        vt.CSVLogger(path)
    assert path.read_bytes() == content
    with pytest.raises(
        TypeError, match=r"^CSVLogger: expected path to be a path \(str or os.PathLike\) but got 3 \(int\)$"
    ):
        vt.CSVLogger(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- TensorBoardLogger


def test_tensorboard_scalars_equal_the_history(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = trainer(callbacks=[vt.TensorBoardLogger(tmp_path / "board")])
    history = _fit(t, 2)
    events = EventAccumulator(str(tmp_path / "board"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(history[0]) - {"epoch"}
    for key in set(history[0]) - {"epoch"}:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == [
            float(torch.tensor(v, dtype=torch.float32)) for v in history[key]
        ]


def test_tensorboard_logger_without_tensorboard_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails as if not installed
    message = 'TensorBoardLogger needs the tensorboard package: pip install "vggtransfer[tensorboard]"'
    with pytest.raises(ImportError, match=f"^{re.escape(message)}$"):
        vt.TensorBoardLogger("runs")


def test_tensorboard_log_dir_must_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ValueError, match=r"^TensorBoardLogger: expected log_dir to be a folder but .* is a file"
    ):
        vt.TensorBoardLogger(tmp_path / "file")
