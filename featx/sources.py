"""Image sources: where images come from (folder, list, files, torchvision data set).

A source is a list of items with an id, a label (-1 when unlabeled), the class names and a
way to open the item as a PIL image; turning that into pixels is :mod:`featx.decode`'s job.
:func:`open_splits` finds training and validation images for ``sweep`` and ``finetune``;
:func:`source_fingerprint` identifies the items (ids and labels) of a run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featx.errors import FeatxError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class Source:
    """Base class: ``ids``, ``labels`` (int64, -1 = unlabeled), ``classes``, ``open(i)``."""

    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    note: str = ""  # one sentence for the user about how DATA was read (e.g. which split)

    def __len__(self) -> int:
        return len(self.ids)

    def open(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_bytes(self, i: int) -> bytes | None:
        """Item ``i``'s encoded bytes where it is a file (faster decoders take them), else None."""
        return None

    def content_key(self, i: int) -> str | None:  # pragma: no cover - abstract
        """sha256 of item ``i``'s content (the feature cache's key), or None if unreadable."""
        raise NotImplementedError

    def describe(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class FileSource(Source):
    """Items that are image files on disk."""

    def __init__(self, root: Path, paths: list[str], labels: list[int], classes: list[str], kind: dict):
        self.root, self.ids, self.classes = root, paths, classes
        self.labels = np.asarray(labels, dtype=np.int64)
        self._kind = kind

    def open(self, i: int) -> Image.Image:
        return Image.open(self.root / self.ids[i])

    def read_bytes(self, i: int) -> bytes | None:
        return (self.root / self.ids[i]).read_bytes()

    def content_key(self, i: int) -> str | None:
        """sha256 of the file's bytes: a renamed or moved file keeps its key."""
        h = hashlib.sha256()
        try:
            with open(self.root / self.ids[i], "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            return None
        return h.hexdigest()

    def describe(self) -> dict:
        return {**self._kind, "n_items": len(self)}


SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def split_folders(root: str | os.PathLike) -> list[str]:
    """The split folders of a data folder, or [] when its subfolders are classes.

    A folder is split into ``train/``, ``val/``, ``test/``... when at least one subfolder
    with such a name holds folders (the classes); then every subfolder with such a name is
    a split (an unlabeled ``test/`` of bare images included).  The one rule every command
    applies to DATA.
    """
    root = Path(root)
    try:
        named = [p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_NAMES]
        if not any(any(q.is_dir() for q in p.iterdir()) for p in named):
            return []
    except OSError:
        return []
    return sorted(p.name for p in named)


def default_split(root: str | os.PathLike) -> str | None:
    """The split a command reads from DATA when none is named: ``train`` in a folder of split
    folders, None (all of it) in a folder of class folders."""
    splits = split_folders(root)
    if not splits:
        return None
    if "train" not in splits:
        raise FeatxError(f"{root} holds split folders ({', '.join(splits)}) and no train/; choose one with --split.")
    return "train"


def folder_source(root: str | os.PathLike, split: str | None = None) -> FileSource:
    """An image folder: one subfolder per class, or images directly inside (label -1).

    Args:
        root: the data folder given on the command line; ids are relative to it.
        split: a subfolder of ``root`` (train, val, test...) to read instead of ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FeatxError(f"data folder {root} does not exist.")
    base = root / split if split else root
    if not base.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FeatxError(f"split {split!r} not found in {root}; its subfolders are: {', '.join(have) or 'none'}.")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    if classes:
        for c, name in enumerate(classes):
            for dirpath, dirnames, files in os.walk(base / name):
                dirnames.sort()
                for f in sorted(files):
                    if _is_image(f):
                        paths.append((Path(dirpath) / f).relative_to(root).as_posix())
                        labels.append(c)
    else:
        for f in sorted(os.listdir(base)):
            if _is_image(f) and (base / f).is_file():
                paths.append((base / f).relative_to(root).as_posix())
                labels.append(-1)
    if not paths:
        raise FeatxError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {base}.")
    kind = {"type": "folder", "root": str(root.resolve()), "split": split}
    return FileSource(root, paths, labels, classes, kind)


def list_source(path: str | os.PathLike) -> FileSource:
    """A CSV/TSV list ``path[,label]``, paths relative to the list file; a header row is optional."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") or ("\t" in text.split("\n", 1)[0]) else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delim) if r and r[0].strip()]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    if not rows:
        raise FeatxError(f"list {path} names no images.")
    names = [r[1].strip() if len(r) > 1 and r[1].strip() != "" else None for r in rows]
    classes = sorted({n for n in names if n is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[n] if n is not None else -1 for n in names]
    kind = {"type": "list", "path": str(path.resolve())}
    return FileSource(path.parent, [r[0].strip() for r in rows], labels, classes, kind)


def files_source(paths: list[str]) -> FileSource:
    """Single files named on the command line (no labels)."""
    return FileSource(Path("."), list(paths), [-1] * len(paths), [], {"type": "files"})


class TorchvisionSource(Source):
    """A torchvision data set such as CIFAR10 or FashionMNIST, by name."""

    def __init__(self, name: str, root: str, split: str = "train", download: bool = True):
        import torchvision.datasets as tvd

        cls = getattr(tvd, name, None)
        if cls is None or not isinstance(cls, type):
            raise FeatxError(f"torchvision has no data set {name!r} (try CIFAR10, FashionMNIST, SVHN...).")
        import inspect

        params = inspect.signature(cls.__init__).parameters
        kwargs = {}
        if "train" in params:
            if split not in ("train", "test"):
                raise FeatxError(f"{name} has splits 'train' and 'test', not {split!r}.")
            kwargs["train"] = split == "train"
        elif "split" in params:
            kwargs["split"] = split
        try:
            # download=True only downloads what is missing: offline, files already under
            # root are used as they are.
            self.ds = cls(root, download=download, **kwargs)
        except Exception as e:
            raise FeatxError(
                f"could not load torchvision:{name} from {root} and could not download it ({str(e).splitlines()[0]})."
            ) from None
        targets = getattr(self.ds, "targets", None)
        if targets is None:
            targets = getattr(self.ds, "labels", None)
        if targets is None:
            targets = [self.ds[i][1] for i in range(len(self.ds))]
        self.labels = np.asarray(targets, dtype=np.int64)
        self.classes = [str(c) for c in getattr(self.ds, "classes", sorted(set(self.labels.tolist())))]
        self.ids = [f"{split}/{i}" for i in range(len(self.ds))]
        self._desc = {"type": "torchvision", "name": name, "root": str(Path(root).resolve()), "split": split}

    def open(self, i: int) -> Image.Image:
        img = self.ds[i][0]
        return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))

    def content_key(self, i: int) -> str | None:
        """sha256 of the decoded pixels (with their shape and mode): the data set has no files."""
        try:
            img = self.open(i)
            a = np.asarray(img)
        except Exception:  # noqa: BLE001 - an unreadable item is a miss; decoding reports it
            return None
        return hashlib.sha256(f"{img.mode}{a.shape}{a.dtype}".encode() + a.tobytes()).hexdigest()

    def describe(self) -> dict:
        return {**self._desc, "n_items": len(self)}


class Subset(Source):
    """Some items of a source (a hold-out split, a per-class sample), in the source's order."""

    def __init__(self, source: Source, indices):
        self._source, self._idx = source, np.asarray(indices, dtype=np.int64)
        self.ids = [source.ids[i] for i in self._idx]
        self.labels = source.labels[self._idx]
        self.classes = source.classes

    def open(self, i: int) -> Image.Image:
        return self._source.open(int(self._idx[i]))

    def read_bytes(self, i: int) -> bytes | None:
        return self._source.read_bytes(int(self._idx[i]))

    def content_key(self, i: int) -> str | None:
        return self._source.content_key(int(self._idx[i]))

    def describe(self) -> dict:
        return {**self._source.describe(), "subset": len(self._idx), "n_items": len(self._idx)}


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices into (train, held out): ``fraction`` of every class, seeded, sorted.

    Every class with at least two items keeps one in each part, so a tiny data set still
    gets a validation item per class; a class of one item stays in training.
    """
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


@dataclass
class Splits:
    """Training and validation sources, and how the validation split came about."""

    train: Source
    val: Source | None
    note: str  # one sentence for the user: where validation comes from


def open_splits(data: str, split: str | None = None, val_split: str | None = None, root: str | None = None,
                val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Training and validation images for ``sweep`` and ``finetune``.

    Args:
        data: a folder (with ``train/``, ``val/``... split folders, or just class folders),
            a list file, or ``torchvision:NAME``.
        split: the training split; None: ``train`` when DATA has one, else all of DATA.
        val_split: the validation split; None: ``val`` when DATA has one, else a stratified,
            seeded hold-out of ``val_fraction`` of the training images (none if 0).
        val_fraction: the held-out share when there is no validation split.
        seed: seed of the hold-out.
    """
    is_tv = data.startswith("torchvision:")
    is_folder = not is_tv and Path(data).is_dir()
    if split is None:
        split = "train" if is_tv else default_split(data) if is_folder else None
    train = open_source(data, split=split, root=root)
    where = f"{data}/{split}" if is_folder and split else data
    if val_split is not None:
        return Splits(train, open_source(data, split=val_split, root=root), f"validation: split {val_split!r}.")
    if is_folder and split and (Path(data) / "val").is_dir():
        return Splits(train, open_source(data, split="val", root=root), "validation: split 'val'.")
    if not val_fraction:
        return Splits(train, None, f"no validation split in {data} and --val-fraction 0: no validation.")
    if (train.labels < 0).all():
        return Splits(train, None, f"{where} has no labels, so no validation split can be held out.")
    keep, held = stratified_holdout(train.labels, val_fraction, seed)
    if len(held) == 0:
        return Splits(train, None, f"{where} has too few images per class to hold any out: no validation.")
    note = (f"no validation split in {data}: holding out {len(held)} of the {len(train)} training images "
            f"({val_fraction:.0%} of each class, seed {seed}) for validation.")
    return Splits(Subset(train, keep), Subset(train, held), note)


def open_source(data: str, split: str | None = None, root: str | None = None) -> Source:
    """Pick the source type from the DATA argument: ``torchvision:NAME``, a list file or a folder."""
    if data.startswith("torchvision:"):
        return TorchvisionSource(data.split(":", 1)[1], root or "data", split or "train")
    p = Path(data)
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".txt", ".tab"):
        if split:
            raise FeatxError("--split applies to folders and torchvision data sets, not to lists.")
        return list_source(p)
    if p.is_file() and _is_image(p.name):
        return files_source([data])
    if split is None and p.is_dir() and (split := default_split(p)) is not None:
        source = folder_source(p, split)
        source.note = (f"{data} holds split folders ({', '.join(split_folders(p))}): reading {split}/ "
                       "(--split chooses another).")
        return source
    return folder_source(p, split)


def source_fingerprint(source: Source) -> dict:
    """What identifies the items: description plus a digest of ids and labels."""
    h = hashlib.sha256()
    for i in source.ids:
        h.update(i.encode() + b"\0")
    h.update(np.asarray(source.labels, dtype=np.int64).tobytes())
    return {**source.describe(), "items_sha256": h.hexdigest()[:16], "classes": json.dumps(source.classes)}
