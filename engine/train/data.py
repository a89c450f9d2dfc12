"""Image tensors for training: real sources (sources.open_source) and synthetic shards (readers.py).

Small data sets (the bundled digits, a few thousand images) are held in memory as one uint8 tensor;
shards are read through webdataset, wids or DALI.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from synthgen.errors import UsageError
from synthgen.labels import class_names_for


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def resize_uint8(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) uint8, antialiased bilinear (square, no crop)."""
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def load_images(spec: str, size: int) -> ImageSet:
    """Every readable image of a source (see sources.open_source), resized to size x size."""
    from synthgen.sources import open_source

    source = open_source(spec)
    images, labels, keys = [], [], []
    for item in source:
        if item.image is None:
            continue
        images.append(resize_uint8(item.image, size))
        labels.append(item.label)
        keys.append(item.key)
    if not images:
        raise UsageError(f"no readable images in {spec!r}")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), source.class_names, keys)


def load_shards(source: str, size: int, limit: int | None = None, loader: str = "webdataset") -> ImageSet:
    """Samples of synthgen (or any WebDataset with .cls) shards, resized, held in memory.

    `source`: a run folder (its committed shards), a glob, a brace pattern or one tar; `loader`:
    webdataset | wids | dali (readers.py), which all yield the same samples in the same order.
    """
    import json
    from pathlib import Path

    from PIL import Image

    from synthgen.readers import read_samples

    class_names = None
    doc = Path(source) / "dataset.json"
    if doc.is_file():
        class_names = json.loads(doc.read_text()).get("class_names")
    images, labels, keys = [], [], []
    for sample in read_samples(source, loader):
        with Image.open(io.BytesIO(sample.image)) as im:
            images.append(resize_uint8(np.asarray(im.convert("RGB")), size))
        labels.append(sample.label)
        keys.append(sample.key)
        if limit is not None and len(labels) >= limit:
            break
    if not images:
        raise UsageError(f"the shards {source!r} hold no images with a .cls label")
    if class_names is None:
        class_names, labels = class_names_for(labels)
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), class_names, keys)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def subset(data: ImageSet, indices: torch.Tensor | np.ndarray | list[int]) -> ImageSet:
    """The images at `indices`, in that order (class names kept)."""
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    return ImageSet(data.images[idx], data.labels[idx], data.class_names, [data.keys[i] for i in idx.tolist()])


def stratified_holdout(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(rest, holdout): `fraction` of every class held out (at least one image of a class that has two).

    A pure function of (labels, fraction, seed); both halves keep the source's order.
    """
    if not 0 < fraction < 1:
        raise UsageError(f"the holdout fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        count = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held.extend(rng.permutation(rows)[:count].tolist())
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    if not mask.any():
        raise UsageError(f"no class has two images: nothing can be held out of {len(labels)} images")
    return subset(data, np.flatnonzero(~mask)), subset(data, np.flatnonzero(mask))


def per_class_subset(data: ImageSet, shots: int, seed: int) -> ImageSet:
    """`shots` images of every class (all of a class that has fewer), drawn without replacement, seeded."""
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    rows = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(len(data.class_names))]
    return subset(data, np.sort(np.concatenate(rows)))


def concat_sets(sets: list[ImageSet]) -> ImageSet:
    """One set of all images, in order; class names from the set that names the most classes."""
    names = max((s.class_names for s in sets), key=len)
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]), names,
                    [k for s in sets for k in s.keys])
