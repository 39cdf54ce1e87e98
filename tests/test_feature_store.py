"""The disk feature cache survives other writers, kills, full disks, damaged files and odd names."""

from __future__ import annotations

import errno
import gc
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
import torch
from PIL import Image

import vggtransfer as vt
from helpers import blobs, toy, trainer
from vggtransfer import _feature_store as store
from vggtransfer._feature_cache import data_key
from vggtransfer._feature_store import CacheSpaceError, prune_caches
from vggtransfer.data import DogsVsCats

# Floats per cached sample of toy(). Nothing here computes at import: the forkserver below imports
# this module, and its forks must find torch unused.
WIDTH = 64
POSIX = sys.platform != "win32"
if POSIX:
    import fcntl


def _fit(t: vt.Trainer, data: Any) -> None:
    t.fit(data, epochs=1, batch_size=8, num_workers=0)


def _cached(t: vt.Trainer) -> tuple[str, store.FeatureSet]:
    """The key and features of the one data set ``t`` has cached."""
    ((key, features),) = t._cache.sets.items()
    return key, features


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _entry(key: str) -> set[str]:
    return {f"{key}.bin", f"{key}.json", f"{key}.targets.pt"}


@pytest.fixture(scope="module")
def reference() -> tuple[torch.Tensor, torch.Tensor]:
    """Features and targets of ``blobs(16)`` through ``toy()``, cached in memory."""
    with patch.dict(os.environ):
        os.environ.pop("VGGTRANSFER_CACHE_MEMORY_GB", None)
        t = trainer()
        _fit(t, blobs(16))
    _, features = _cached(t)
    assert features.features.shape == (16, WIDTH) == (16, toy().classifier[0].in_features)
    return features.features.clone(), features.targets.clone()


@pytest.fixture
def on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VGGTRANSFER_CACHE_MEMORY_GB", "0")  # every cache to disk


def _same(features: store.FeatureSet, reference: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(features.features, reference[0]) and torch.equal(features.targets, reference[1])


# ---------------------------------------------------------------- damaged entries


def _rewrite(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path, str], None]:
    def damage(folder: Path, key: str) -> None:
        path = folder / f"{key}{name}"
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)

    return damage


def _remove(name: str) -> Callable[[Path, str], None]:
    return lambda folder, key: (folder / f"{key}{name}").unlink()


def _targets(tensor: Any) -> Callable[[Path, str], None]:
    return lambda folder, key: torch.save(tensor, folder / f"{key}.targets.pt")


def _description(meta: Any) -> Callable[[Path, str], None]:
    return _rewrite(".json", json.dumps(meta).encode())


SIZE = 16 * WIDTH * 4
DAMAGES: dict[str, tuple[Callable[[Path, str], None], str]] = {
    "empty json": (_rewrite(".json", b""), "KEY.json is empty"),
    "truncated json": (_rewrite(".json", lambda raw: raw[:12]), "KEY.json is not valid JSON"),
    "json not utf-8": (_rewrite(".json", b'{"shape": "\xff"}'), "KEY.json is not valid JSON"),
    "json list": (_description([16, WIDTH]), "KEY.json is not a JSON object"),
    "negative shape": (
        _description({"shape": [16, -WIDTH], "dtype": "float32"}),
        f"KEY.json has shape [16, -{WIDTH}], not a list of positive integers",
    ),
    "shape of strings": (
        _description({"shape": ["16", WIDTH], "dtype": "float32"}),
        f"KEY.json has shape ['16', {WIDTH}], not a list of positive integers",
    ),
    "no shape": (
        _description({"dtype": "float32"}),
        "KEY.json has shape None, not a list of positive integers",
    ),
    "other dtype": (
        _description({"shape": [16, WIDTH], "dtype": "float64"}),
        "KEY.json has dtype 'float64', not 'float32'",
    ),
    "shape of another size": (
        _description({"shape": [16, WIDTH + 1], "dtype": "float32"}),
        f"KEY.bin holds {SIZE} bytes but KEY.json describes {16 * (WIDTH + 1) * 4}",
    ),
    "short bin": (
        _rewrite(".bin", lambda raw: raw[:1000]),
        f"KEY.bin holds 1000 bytes but KEY.json describes {SIZE}",
    ),
    "missing bin": (_remove(".bin"), "KEY.bin is missing"),
    "missing targets": (_remove(".targets.pt"), "KEY.targets.pt is missing"),
    "garbage targets": (
        _rewrite(".targets.pt", b"garbage" * 20),
        "KEY.targets.pt cannot be read (UnpicklingError)",
    ),
    "torn targets": (
        _rewrite(".targets.pt", lambda raw: raw[: len(raw) // 2]),
        "KEY.targets.pt cannot be read (RuntimeError)",
    ),
    "targets too few": (_targets(torch.arange(15)), "KEY.targets.pt holds 15 targets for 16 samples"),
    "float targets": (_targets(torch.zeros(16)), "KEY.targets.pt does not hold a 1-d int64 tensor"),
    "targets not a tensor": (
        _targets({"targets": [0] * 16}),
        "KEY.targets.pt does not hold a 1-d int64 tensor",
    ),
}


@pytest.fixture(scope="module")
def two_entries(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A cache folder with the disk entries of ``blobs(16)`` (its key returned) and of another set."""
    cache = tmp_path_factory.mktemp("entries")
    with patch.dict(os.environ, {"VGGTRANSFER_CACHE_MEMORY_GB": "0"}):
        first = trainer(cache_dir=cache)
        _fit(first, blobs(16))
        _fit(trainer(cache_dir=cache), blobs(16, seed=5))
    return cache, _cached(first)[0]


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_entry_is_reported_deleted_and_rebuilt(
    kind: str,
    tmp_path: Path,
    on_disk: None,
    reference: tuple[torch.Tensor, torch.Tensor],
    two_entries: tuple[Path, str],
) -> None:
    damage, problem = DAMAGES[kind]
    cache, key = tmp_path / "cache", two_entries[1]
    shutil.copytree(two_entries[0], cache)
    others = {name: data for name, data in _files(cache).items() if not name.startswith(key)}
    damage(cache, key)

    t = trainer(cache_dir=cache)
    with pytest.warns(RuntimeWarning) as caught:
        _fit(t, blobs(16))
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert [str(w.message) for w in ours] == [
        f"the feature cache entry {cache / key} is damaged: {problem.replace('KEY', key)}. Its files "
        f"are deleted and the features computed again"
    ]
    assert ours[0].filename == __file__  # points at the fit that met it
    assert t.cache_report == {"fit(train)": "on"}
    assert _same(_cached(t)[1], reference)
    after = _files(cache)
    assert set(after) == _entry(key) | set(others)
    assert {name: after[name] for name in others} == others
    reopened = store.open_features(cache / f"{key}.bin")  # the rebuilt entry is whole
    assert reopened is not None and _same(reopened, reference)


def test_hostile_descriptions_are_reported_as_damage_not_crashes() -> None:
    for raw in (b"[" * 100_000, b"1e999", b'{"shape": [1e309], "dtype": "float32"}', b" " * 70_000):
        with pytest.raises(store._Damaged):
            store._described_shape(raw, "KEY.json")
    shape = [2**40, 2**40]  # sizes beyond any file: refused by the size check, not computed
    assert store._described_shape(json.dumps({"shape": shape, "dtype": "float32"}).encode(), "x") == shape


# ---------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 64 KiB file system (a real tmpfs when we may mount one, else fallocate refusing >32 KiB)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = False
    if sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount"):
        command = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)]
        mounted = subprocess.run(command, capture_output=True).returncode == 0
    if not mounted:
        real = getattr(os, "posix_fallocate", None)

        def fallocate(fd: int, offset: int, length: int) -> None:
            if length > 32 * 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if real is not None:
                real(fd, offset, length)

        monkeypatch.setattr(store.os, "posix_fallocate", fallocate, raising=False)
    try:
        yield folder
    finally:
        if mounted:
            gc.collect()  # unmap the caches on it
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("when", ["reserving", "writing"])
def test_a_full_disk_is_a_clear_error_that_leaves_nothing_behind(
    when: str, small_disk: Path, on_disk: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = small_disk / "cache"
    _fit(trainer(cache_dir=cache), blobs(16))  # 4 KiB of features: fits
    before = _files(cache)
    assert len(before) == 3
    big = blobs(400)  # 100 KiB of features: does not
    needed = 400 * WIDTH * 4
    if when == "writing":  # a file system that runs out after the reservation (copy-on-write)
        monkeypatch.setattr(store.os, "posix_fallocate", lambda fd, offset, length: None, raising=False)

        def pwrite(fd: int, data: Any, offset: int) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(store.os, "pwrite", pwrite, raising=False)

    with pytest.raises(CacheSpaceError) as caught:
        _fit(trainer(cache_dir=cache), big)

    error = caught.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    expected = (
        f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: the feature cache {cache}/KEY.bin needs "
        f"{needed} bytes ({needed / 1e6:.2f} MB) in {cache}. Free that much space there, point "
        f"cache_dir (or $VGGTRANSFER_CACHE) at a disk with room, or keep the features in memory by "
        f"raising $VGGTRANSFER_CACHE_MEMORY_GB"
    )
    assert re.fullmatch(re.escape(expected).replace("KEY", "[0-9a-f]{32}"), str(error)), str(error)
    assert _files(cache) == before  # no partial file; the older entry untouched
    old = trainer(cache_dir=cache)
    _fit(old, blobs(16))
    assert old.cache_report == {"fit(train)": "on (from disk)"}


# ---------------------------------------------------------------- other processes, kills


class _Hooked:
    """A Trainer's progress that calls ``hook`` once the first batch of a feature pass is stored."""

    def __init__(self, inner: Any, hook: Callable[[], None]) -> None:
        self.inner, self.hook, self.caching = inner, hook, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def start_epoch(self, epoch: int, epochs: int, steps: int | None, phase: str) -> None:
        self.caching = phase.startswith("caching features")
        self.inner.start_epoch(epoch, epochs, steps, phase)

    def step(self, loss: float | None, samples: int) -> None:
        self.inner.step(loss, samples)
        if self.caching:
            self.caching = False
            self.hook()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _child(folder: str, out: str, stage: str, barrier: Any) -> None:
    """A run in its own process (forked from a server that never ran torch) that caches ``blobs(16)``."""
    os.environ["VGGTRANSFER_CACHE_MEMORY_GB"] = "0"
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if stage == "before_publish":
            _die()
        real_replace(src, dst)
        if str(dst).endswith({"after_bin": ".bin", "after_targets": ".targets.pt"}.get(stage, "-")):
            _die()

    try:
        t = trainer(cache_dir=Path(folder))
        if stage == "pass":
            t.progress = _Hooked(t.progress, _die)
        elif stage == "together":  # both have written a batch to disk before either goes on
            t.progress = _Hooked(t.progress, lambda: barrier.wait(60))
        else:
            store.os.replace = replace  # type: ignore[assignment]
        _fit(t, blobs(16))
        _, features = _cached(t)
        np.save(Path(out) / f"{os.getpid()}.npy", features.features.numpy())
        np.save(Path(out) / f"{os.getpid()}.targets.npy", features.targets.numpy())
    except BaseException as exc:
        (Path(out) / f"{os.getpid()}.error").write_text(repr(exc))
        raise


def _processes(
    tmp_path: Path, stages: list[str]
) -> tuple[Path, Path, list[multiprocessing.process.BaseProcess]]:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the forkserver start method")
    context = multiprocessing.get_context("forkserver")
    # The server imports torch but never computes with it: its forks may (forked after torch
    # threads ran, a child can deadlock). Spawning a fresh interpreter each would take seconds.
    context.set_forkserver_preload([__name__])
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    barrier = context.Barrier(len(stages))
    processes = [context.Process(target=_child, args=(str(cache), str(out), s, barrier)) for s in stages]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    for process in processes:
        if process.is_alive():  # stuck: fail, but leave no process behind
            process.kill()
            process.join()
    return cache, out, processes


TEMPORARY = r"{key}\.{pid}\.[0-9a-f]{{8}}(\.targets|\.json)?\.tmp"


@pytest.mark.parametrize("stage", ["pass", "before_publish", "after_bin", "after_targets"])
def test_a_writer_killed_at_any_stage_leaves_nothing_used_and_its_leftovers_are_pruned(
    stage: str, tmp_path: Path, on_disk: None, reference: tuple[torch.Tensor, torch.Tensor]
) -> None:
    cache, out, (process,) = _processes(tmp_path, [stage])
    assert process.exitcode == -signal.SIGKILL, list(out.iterdir())
    left = sorted(p.name for p in cache.iterdir())
    key = left[0].split(".")[0]
    assert f"{key}.json" not in left  # never complete
    pattern = TEMPORARY.format(key=key, pid=process.pid)
    # what it had renamed into place, and the lock it held while renaming (killed holding it)
    published = {
        "pass": [],
        "before_publish": [".lock"],
        "after_bin": [".bin", ".lock"],
        "after_targets": [".bin", ".lock", ".targets.pt"],
    }[stage]
    temporaries = [name for name in left if re.fullmatch(pattern, name)]
    assert sorted(set(left) - set(temporaries)) == [key + suffix for suffix in published]
    assert len(temporaries) == {"pass": 1, "before_publish": 3, "after_bin": 2, "after_targets": 1}[stage]

    t = trainer(cache_dir=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing damaged: an unfinished entry
        _fit(t, blobs(16))
    assert t.cache_report == {"fit(train)": "on"}
    assert _same(_cached(t)[1], reference)
    # The dead writer's temporaries are kept a minute (a live writer may have just made one) ...
    assert {p.name for p in cache.iterdir()} == _entry(key) | set(temporaries)
    an_hour_ago = time.time() - 3600
    for name in temporaries:
        os.utime(cache / name, (an_hour_ago, an_hour_ago))
    # ... then pruned, as nobody holds them locked
    deleted = prune_caches(cache, keep=cache / ("0" * 32), limit_bytes=1 << 40)
    assert sorted(p.name for p in deleted) == temporaries
    assert {p.name for p in cache.iterdir()} == _entry(key)


def test_two_processes_writing_one_cache_at_once_both_get_correct_features(
    tmp_path: Path, reference: tuple[torch.Tensor, torch.Tensor]
) -> None:
    cache, out, processes = _processes(tmp_path, ["together", "together"])
    errors = {p.name: p.read_text() for p in out.glob("*.error")}
    assert [p.exitcode for p in processes] == [0, 0], errors
    for process in processes:
        assert np.array_equal(np.load(out / f"{process.pid}.npy"), reference[0].numpy())
        assert np.array_equal(np.load(out / f"{process.pid}.targets.npy"), reference[1].numpy())
    (key,) = {p.name.split(".")[0] for p in cache.iterdir()}
    assert {p.name for p in cache.iterdir()} == _entry(key)  # one entry, no temporaries, no lock


@pytest.mark.skipif(not POSIX, reason="file locks are fcntl's")
def test_pruning_removes_what_dead_writers_left_and_keeps_what_live_ones_use(tmp_path: Path) -> None:
    def make(name: str, size: int = 10, age: float = 3600) -> Path:
        path = tmp_path / name
        path.write_bytes(bytes(size))
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    def locked(path: Path, shared: bool = False) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        return fd

    a, b, c, d, e = (letter * 32 for letter in "abcde")
    live = make(f"{a}.11.0badcafe.tmp")  # a writer still computing
    fresh = make(f"{a}.12.00000000.tmp", age=0)  # just created, maybe not locked yet
    dead = [make(f"{a}.13.deadbeef{suffix}.tmp") for suffix in ("", ".targets", ".json")]
    torn = [make(f"{b}.bin"), make(f"{b}.targets.pt")]  # killed between the renames
    make(f"{c}.lock")  # lock file of a killed holder
    old = [make(f"{d}{suffix}", size=1000, age=7200) for suffix in (".bin", ".targets.pt", ".json")]
    used = [make(f"{e}{suffix}", size=1000, age=9000) for suffix in (".bin", ".targets.pt", ".json")]
    holds = [locked(live), locked(tmp_path / f"{e}.lock", shared=True)]  # e: a reader opening it
    try:
        deleted = prune_caches(tmp_path, keep=tmp_path / ("0" * 32), limit_bytes=1 << 40)
        assert sorted(deleted) == sorted(dead + torn)
        assert {p.name for p in tmp_path.iterdir()} == {p.name for p in [live, fresh, *old, *used]} | {
            f"{e}.lock"
        }
        # over the limit: the least recently used entry goes unless somebody holds it
        deleted = prune_caches(tmp_path, keep=tmp_path / ("0" * 32), limit_bytes=0)
        assert sorted(deleted) == sorted([old[2], old[0], old[1]])
        assert all(path.exists() for path in used)
    finally:
        for fd in holds:
            os.close(fd)


# ---------------------------------------------------------------- file names


def test_file_names_that_are_not_utf8_are_fingerprinted(tmp_path: Path) -> None:
    if sys.platform in ("darwin", "win32"):
        pytest.skip("file names are Unicode there")
    folder = tmp_path / "pets"
    names = {"cool": [b"\xff.jpg", b"a.jpg"], "warm": [b"caf\xe9.jpg", b"b.jpg"]}
    for kind, colour in (("cool", (0, 0, 255)), ("warm", (255, 0, 0))):
        (folder / kind).mkdir(parents=True)
        for name in names[kind]:  # str paths with surrogate escapes, as os.listdir returns them
            Image.new("RGB", (40, 40), colour).save(folder / kind / os.fsdecode(name), "JPEG")

    def dataset() -> DogsVsCats:
        return DogsVsCats(folder, transform=vt.imagenet_transform(size=32), progress=False)

    data = dataset()
    assert {os.fsencode(path.name) for path, _ in data.samples} == {*names["cool"], *names["warm"]}
    t = trainer(class_names=None)
    t.fit(data, epochs=1, batch_size=2, num_workers=0)
    assert t.cache_report == {"fit(train)": "on"}
    t.fit(dataset(), epochs=2, batch_size=2, num_workers=0)  # found again by its key
    assert t.cache_report == {"fit(train)": "on (reused)"}

    key = data_key(data)
    cool = os.fsencode(folder / "cool")
    os.rename(cool + b"/\xff.jpg", cool + b"/\xfe.jpg")  # another name, another key
    assert key is not None and data_key(dataset()) not in (key, None)


def test_a_fifo_in_place_of_an_entry_file_is_damage_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VGGTRANSFER_CACHE_MEMORY_GB", "0")
    cache = tmp_path / "cache"
    trainer(cache_dir=cache).fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    (description,) = cache.glob("*.json")
    description.unlink()
    os.mkfifo(description)  # reading it would wait forever for a writer
    with pytest.warns(RuntimeWarning, match=r"is not a regular file"):
        t = trainer(cache_dir=cache)
        t.fit(blobs(16), epochs=1, batch_size=8, num_workers=0)
    assert t.cache_report["fit(train)"] == "on"


def test_persist_cache_writes_features_that_fit_in_memory_for_a_later_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[torch.Tensor, torch.Tensor]
) -> None:
    monkeypatch.delenv("VGGTRANSFER_CACHE_MEMORY_GB", raising=False)  # the default budget: they fit
    cache = tmp_path / "cache"
    in_memory = trainer(cache_dir=cache)
    _fit(in_memory, blobs(16))
    assert not cache.exists()  # without persist_cache, features that fit are never written
    persisted = trainer(cache_dir=cache, persist_cache=True)
    _fit(persisted, blobs(16))
    key, features = _cached(persisted)
    assert persisted.cache_report == {"fit(train)": "on"} and set(_files(cache)) == _entry(key)
    assert _same(features, reference)
    later = trainer(cache_dir=cache)  # another run, persist_cache or not, reads them
    _fit(later, blobs(16))
    assert later.cache_report == {"fit(train)": "on (from disk)"} and _same(_cached(later)[1], reference)
    assert later.history[-1]["train_loss"] == persisted.history[-1]["train_loss"]


def test_persist_cache_must_be_a_bool() -> None:
    with pytest.raises(TypeError) as info:
        trainer(persist_cache="yes")
    assert str(info.value) == "Trainer: expected persist_cache to be True or False but got 'yes'"
