"""Image folders as datasets: scanning for broken files, the Dogs vs Cats layouts, splits.

Real image collections are dirty. Microsoft's PetImages archive has empty files, truncated JPEGs,
text saved as ``.jpg`` and ``Thumbs.db``; Oxford-IIIT Pet has PNG and RGBA data named ``.jpg``.
Training loops that meet such a file mid-epoch crash, or quietly serve a neighbouring sample
instead. vggtransfer decodes every file once, up front, and turns the broken ones into a report:

    >>> from vggtransfer.data import DogsVsCats
    >>> data = DogsVsCats("PetImages")            # doctest: +SKIP
    >>> data.classes, len(data), data.bad_files[:1]  # doctest: +SKIP
    (['cat', 'dog'], 24998, [BadFile(path=PosixPath('PetImages/Cat/666.jpg'), reason='empty file (0 bytes)')])

Files are only ever read: nothing is modified, moved or deleted.
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from ._images import to_rgb

__all__ = [
    "BadFile",
    "DogsVsCats",
    "ImageList",
    "ScanReport",
    "Split",
    "check_image",
    "oxford_pets",
    "scan_images",
    "stratified_split",
]

_KAGGLE_NAME = re.compile(r"^(cat|dog)\.", re.IGNORECASE)


class BadFile(NamedTuple):
    """A file that cannot be used as an image, and why."""

    path: Path
    reason: str


@dataclass
class ScanReport:
    """The result of :func:`scan_images`: usable images and broken files, both sorted by path."""

    good: list[Path] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.good)} good images, {len(self.bad)} bad files"]
        lines += [f"  {bad.path}: {bad.reason}" for bad in self.bad]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible summary (paths as strings)."""
        return {"good": len(self.good), "bad": [{"path": str(b.path), "reason": b.reason} for b in self.bad]}


def check_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> str | None:
    """Decode ``path`` and return why it is unusable, or None if it is a good image.

    ``Image.open`` reads only the header and ``Image.verify`` only checks some formats'
    structure: a truncated JPEG passes both. Decoding all the data is the only reliable test
    (JPEGs are decoded at an eighth of their size, which still reads every byte).

    This is the test :func:`scan_images` runs on every file; call it yourself for a single
    file, such as one uploaded to a service, before handing it to a model. It never modifies
    the file.

    Args:
        path: The file.
        max_pixels: Larger images are refused as decompression bombs; defaults to Pillow's
            ``Image.MAX_IMAGE_PIXELS`` (about 89 megapixels).

    Returns:
        None for a usable image, else the reason, one of those in docs/data.md: ``"empty file
        (0 bytes)"``, ``"truncated image data (...)"``, ``"not an image (Pillow cannot
        identify the format)"``, ``"decompression bomb: ..."``, ``"corrupt image data (...)"``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> from vggtransfer.data import check_image
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     good, text = Path(folder, "good.png"), Path(folder, "notes.jpg")
        ...     Image.new("RGB", (8, 8)).save(good)
        ...     _ = text.write_text("not a picture")
        ...     check_image(good), check_image(text)
        (None, 'not an image (Pillow cannot identify the format)')
    """
    path = Path(path)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            width, height = image.size
            if limit and width * height > limit:
                return f"decompression bomb: {width}x{height} = {width * height} pixels, more than the limit of {limit}"
            # JPEG only: let libjpeg scale the output down 8x while decoding. Every byte of the
            # compressed data is still entropy-decoded, which is where truncation and corruption
            # show, but the inverse DCT and colour conversion shrink: about 2x faster scans.
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
            to_rgb(image)  # the conversion the dataset will do, so odd modes fail here, not mid-epoch
    except Image.DecompressionBombError as exc:
        return f"decompression bomb: {exc}"
    except UnidentifiedImageError:
        return "not an image (Pillow cannot identify the format)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc)
        if "truncated" in message:
            return f"truncated image data ({message})"
        return f"corrupt image data ({type(exc).__name__}: {message})"
    return None


def scan_images(
    files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    workers: int | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> ScanReport:
    """Decode every file under a folder (or in a list) and sort them into good and bad.

    0-byte, truncated, non-image and decompression-bomb files are bad, each with a reason.
    Valid images in any mode Pillow reads (L, P, RGBA, CMYK, I;16, EXIF-rotated, PNG or GIF data
    named ``.jpg``) are good; datasets convert them to RGB when loading. Files are decoded on
    ``workers`` threads (Pillow decodes outside the GIL), default one per core. Nothing is
    modified, and Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left as it is.

    Args:
        files: A folder (scanned recursively; hidden files and folders are skipped), or paths.
        workers: Decoding threads; default ``os.cpu_count()``.
        max_pixels: Refuse larger images as decompression bombs; default Pillow's limit.
        progress: Show a progress bar (tqdm, on a terminal) for more than 1000 files.

    Returns:
        A :class:`ScanReport`.

    Raises:
        FileNotFoundError: ``files`` is a folder that does not exist.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> from vggtransfer.data import scan_images
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 8)).save(folder / "ok.jpg")
        >>> (folder / "empty.jpg").touch()
        >>> report = scan_images(folder)
        >>> [p.name for p in report.good], [(b.path.name, b.reason) for b in report.bad]
        (['ok.jpg'], [('empty.jpg', 'empty file (0 bytes)')])
    """
    paths = _list_files(files)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn(
            "scan_images: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process (set by other "
            "code), so Pillow pads truncated images instead of failing and they cannot be detected. "
            "HINT: do not set it, or scan in a separate process",
            UserWarning,
            stacklevel=2,
        )
    bar = _progress_bar(len(paths), progress)
    report = ScanReport()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for path, reason in zip(
            paths, pool.map(lambda p: check_image(p, max_pixels=max_pixels), paths), strict=True
        ):
            if reason is None:
                report.good.append(path)
            else:
                report.bad.append(BadFile(path, reason))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return report


def _list_files(
    files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, recursive: bool = True
) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        root = Path(files)
        if not root.is_dir():
            raise FileNotFoundError(f"scan_images: folder {str(root)!r} does not exist or is not a folder")
        found: list[Path] = []
        for folder, subfolders, names in os.walk(root, onerror=_unreadable, followlinks=False):
            subfolders[:] = [] if not recursive else sorted(d for d in subfolders if not d.startswith("."))
            found += [Path(folder, name) for name in names if not name.startswith(".")]
        return sorted(path for path in found if path.is_file())
    return sorted(Path(p) for p in files)


def _unreadable(error: OSError) -> None:
    # os.walk skips folders it cannot list; their images would silently be missing from the data.
    raise type(error)(
        error.errno,
        f"cannot list folder {error.filename!r} ({error.strerror}); its images would be left out. "
        f"Make it readable (chmod +rx) or move it out of the data folder",
    ) from None


def _progress_bar(total: int, progress: bool) -> Any:
    if not progress or total <= 1000 or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm(total=total, desc="scanning images", unit="file")


class ImageList(Dataset[tuple[Any, Any]]):
    """A dataset over a fixed list of image files with integer labels (or ids, unlabelled).

    Items are ``(image, label)``: the image opened with Pillow, converted to RGB (EXIF
    orientation applied) and passed through ``transform``; the label an int, or for an
    unlabelled list the file's id (its name without extension).

    Attributes:
        samples: ``(path, label)`` pairs; the label is -1 in an unlabelled list.
        classes: Class names, index = label; empty for an unlabelled list.
        bad_files: Files left out because they are unusable, with the reason.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        *,
        transform: Callable[[Image.Image], Any] | None = None,
        bad_files: Sequence[BadFile] = (),
    ) -> None:
        self.samples = [(Path(path), int(label)) for path, label in samples]
        self.classes = list(classes)
        self.transform = transform
        self.bad_files = list(bad_files)

    @property
    def labelled(self) -> bool:
        """Whether items carry class labels (False for a Kaggle ``test1/`` folder)."""
        return bool(self.classes)

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [label for _, label in self.samples]

    @property
    def ids(self) -> list[str]:
        """The id of every sample: its file name without extension (``1`` for ``test1/1.jpg``)."""
        return [path.stem for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = to_rgb(image)
                rgb.load()
        except (OSError, SyntaxError, ValueError) as exc:
            # The file was fine when scanned, so it changed since: say which one, never substitute.
            raise RuntimeError(
                f"image {str(path)!r} could not be read although it passed the scan ({exc}); it was "
                f"changed or removed after the dataset was built. Rebuild the dataset to rescan"
            ) from None
        image_out = self.transform(rgb) if self.transform is not None else rgb
        return image_out, (label if self.labelled else path.stem)

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> ImageList:
        """The same files with another transform (e.g. augmentation for training only)."""
        return ImageList(self.samples, self.classes, transform=transform, bad_files=self.bad_files)


class DogsVsCats(ImageList):
    """Dogs vs Cats (or any classes) from whichever layout the folder has.

    Layouts, detected from the folder's content:

    * **Kaggle flat** (``train/cat.0.jpg``, ``train/dog.0.jpg``): labels from the ``cat.`` /
      ``dog.`` prefix; classes ``["cat", "dog"]``. Files without either prefix are reported
      as bad.
    * **PetImages** (``Cat/``, ``Dog/``, Microsoft's archive): classes ``["cat", "dog"]``.
    * **One folder per class**, any names (``cats/``, ``dogs/``, ``birds/``): classes are the
      folder names, sorted.
    * **Unlabelled** (Kaggle ``test1/1.jpg``): no classes; items are ``(image, id)`` for a
      submission.

    Every file is decoded once when the dataset is built (see :func:`scan_images`); unusable
    files are left out and listed in ``bad_files``. ``len(dataset)`` is the number of good
    files, and every good file is served exactly once per pass: nothing is substituted.

    Args:
        root: The folder.
        transform: Applied to each RGB PIL image, e.g. :func:`vggtransfer.imagenet_transform`.
        workers: Threads for the scan.
        progress: Show scan progress for large folders.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` holds no usable image, or is the parent of Kaggle's ``train/`` and
            ``test1/`` folders (pass one of them).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        transform: Callable[[Image.Image], Any] | None = None,
        workers: int | None = None,
        progress: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"DogsVsCats: folder {str(self.root)!r} does not exist or is not a folder"
            )
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in folders:
            _refuse_loop(self.root, folder)
        names = {p.name for p in folders}
        if {"train", "test1"} <= names:
            raise ValueError(
                f"DogsVsCats: {str(self.root)!r} looks like the extracted Kaggle archive (it holds train/ "
                f"and test1/); pass {str(self.root / 'train')!r} for the labelled images and "
                f"{str(self.root / 'test1')!r} for the unlabelled ones"
            )
        # Files beside class folders (a README, a CSV) belong to no class and are not scanned.
        candidates = (
            [f for folder in folders for f in _list_files(folder)]
            if folders
            else _list_files(self.root, recursive=False)
        )
        report = scan_images(candidates, workers=workers, progress=progress)
        bad = list(report.bad)
        if folders:
            samples, classes = self._class_folders(folders, report.good)
        else:
            samples, classes, unlabelled_bad = self._flat(report.good)
            bad += unlabelled_bad
        if not samples:
            raise ValueError(
                f"DogsVsCats: no usable image in {str(self.root)!r} ({len(bad)} bad files); expected "
                f"cat.N.jpg/dog.N.jpg files, Cat/ and Dog/ folders, or one folder per class"
            )
        super().__init__(samples, classes, transform=transform, bad_files=sorted(bad))
        self.layout = "folders" if folders else ("kaggle" if classes else "unlabelled")

    def _class_folders(
        self, folders: list[Path], good: list[Path]
    ) -> tuple[list[tuple[Path, int]], list[str]]:
        # PetImages' Cat/ and Dog/ become the conventional lower-case names.
        petimages = {p.name for p in folders} == {"Cat", "Dog"}
        folder_class = {p.name: (p.name.lower() if petimages else p.name) for p in folders}
        classes = sorted(set(folder_class.values()))
        index = {name: i for i, name in enumerate(classes)}
        samples = [(path, index[folder_class[path.relative_to(self.root).parts[0]]]) for path in good]
        return samples, classes

    def _flat(self, good: list[Path]) -> tuple[list[tuple[Path, int]], list[str], list[BadFile]]:
        labelled = [p for p in good if _KAGGLE_NAME.match(p.name)]
        if not labelled:
            return [(p, -1) for p in good], [], []
        classes = ["cat", "dog"]
        samples = [(p, classes.index(p.name.split(".", 1)[0].lower())) for p in labelled]
        unlabelled = [
            BadFile(p, "name has no cat. or dog. prefix, so it has no label in the Kaggle layout")
            for p in good
            if not _KAGGLE_NAME.match(p.name)
        ]
        return samples, classes, unlabelled


def _refuse_loop(root: Path, folder: Path) -> None:
    """A class folder that links back to the data folder (or above) would repeat every image."""
    if not folder.is_symlink():
        return
    target, top = folder.resolve(), root.resolve()
    if target == top or target in top.parents:
        raise ValueError(
            f"DogsVsCats: {folder.name!r} in {str(root)!r} is a symbolic link to {str(target)!r}, which "
            f"contains the data folder itself; as a class it would repeat every image. Remove the link"
        )


@dataclass(frozen=True)
class Split:
    """Which samples are for training and which for validation, reproducibly.

    Membership is stored as sample positions *and* file paths, so it can be saved (e.g. in a
    checkpoint's ``extra`` data or ``metrics.json``) and checked against the dataset later.
    """

    train: tuple[int, ...]
    val: tuple[int, ...]
    seed: int
    val_fraction: float
    files: tuple[str, ...] = ()

    def subsets(
        self, train_data: Dataset[Any], val_data: Dataset[Any] | None = None
    ) -> tuple[Subset[Any], Subset[Any]]:
        """Training and validation subsets (the second from ``val_data``, e.g. without augmentation)."""
        return Subset(train_data, list(self.train)), Subset(
            val_data if val_data is not None else train_data, list(self.val)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible data; :meth:`from_dict` reads it back."""
        return {
            "train": list(self.train),
            "val": list(self.val),
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "files": list(self.files),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Split:
        """Rebuild a split from :meth:`to_dict` output."""
        return cls(
            tuple(data["train"]),
            tuple(data["val"]),
            int(data["seed"]),
            float(data["val_fraction"]),
            tuple(data.get("files", ())),
        )

    def check(self, dataset: ImageList) -> None:
        """Raise ValueError if ``dataset`` no longer has the files this split was made for."""
        current = tuple(str(path) for path, _ in dataset.samples)
        if self.files and current != self.files:
            raise ValueError(
                f"Split.check: the dataset's files differ from the ones this split was made for "
                f"({len(current)} files now, {len(self.files)} then); make a new split"
            )


def stratified_split(
    dataset: ImageList | Sequence[int], val_fraction: float = 0.2, *, seed: int = 0
) -> Split:
    """Split samples into training and validation, keeping each class's share, from a seed.

    The same dataset, fraction and seed always give the same split; each class contributes
    ``val_fraction * class size`` samples, rounded half up, (at least one when it has two or more) to
    validation.

    Args:
        dataset: An :class:`ImageList` (or :class:`DogsVsCats`), or the list of labels.
        val_fraction: Share of each class held out for validation, in (0, 1).
        seed: Seeds the shuffling within each class.

    Example:
        >>> from vggtransfer.data import stratified_split
        >>> split = stratified_split([0] * 8 + [1] * 4, val_fraction=0.25, seed=0)
        >>> len(split.train), len(split.val), sorted(i >= 8 for i in split.val)
        (9, 3, [False, False, True])
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"stratified_split: expected val_fraction in (0, 1) but got {val_fraction!r}")
    labels = dataset.targets if isinstance(dataset, ImageList) else list(dataset)
    files = tuple(str(path) for path, _ in dataset.samples) if isinstance(dataset, ImageList) else ()
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(set(labels)):
        members = [i for i, value in enumerate(labels) if value == label]
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        # At least one sample of each class on both sides, whenever the class has two.
        held = (
            min(max(math.floor(val_fraction * len(members) + 0.5), 1), len(members) - 1)
            if len(members) > 1
            else 0
        )
        val += order[:held]
        train += order[held:]
    return Split(tuple(sorted(train)), tuple(sorted(val)), seed, val_fraction, files)


def oxford_pets(
    root: str | os.PathLike[str],
    *,
    split: str = "trainval",
    download: bool = True,
    transform: Callable[[Image.Image], Any] | None = None,
    progress: bool = True,
) -> ImageList:
    """The Oxford-IIIT Pet dataset as cat versus dog, through torchvision's downloader.

    ``torchvision.datasets.OxfordIIITPet`` downloads and unpacks the dataset (about 800 MB)
    into ``root/oxford-iiit-pet``; its ``binary-category`` target (the species) gives the
    label. The files are scanned like any other folder, so the PNG and RGBA data some of them
    hold is converted and broken files are reported.

    Args:
        root: Folder for the data; the download is cached there.
        split: ``"trainval"`` or ``"test"``.
        download: Download when missing (needs internet).
        transform: Applied to each RGB PIL image.
        progress: Show scan progress for large folders.

    Returns:
        An :class:`ImageList` with classes ``["cat", "dog"]``.

    Raises:
        RuntimeError: the data is missing and could not be downloaded.
    """
    from torchvision.datasets import OxfordIIITPet

    pets = OxfordIIITPet(root, split=split, target_types="binary-category", download=download)
    base = Path(root) / "oxford-iiit-pet"
    samples = []
    with open(base / "annotations" / f"{split}.txt", encoding="utf-8") as listing:
        for line in listing:
            fields = line.split()
            if len(fields) >= 3 and not line.startswith("#"):
                samples.append((base / "images" / f"{fields[0]}.jpg", int(fields[2]) - 1))
    del pets  # its job was the download and the layout check
    report = scan_images([path for path, _ in samples if path.exists()], progress=progress)
    good = set(report.good)
    missing = [
        BadFile(path, "listed in the annotations but missing") for path, _ in samples if not path.exists()
    ]
    kept = [(path, label) for path, label in samples if path in good]
    return ImageList(kept, ["cat", "dog"], transform=transform, bad_files=sorted(report.bad + missing))
