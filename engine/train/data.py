"""Image tensors for training: real sources (sources.open_source) and synthetic shards (webdataset).

Small data sets (the bundled digits, a few thousand images) are held in memory as one uint8 tensor;
shards are streamed through the `webdataset` loader.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from synthgen.errors import UsageError


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


def load_shards(pattern: str, size: int, limit: int | None = None) -> ImageSet:
    """Samples of synthgen (or any WebDataset with .cls) shards, resized, held in memory.

    `pattern` is a brace pattern, glob, single tar or a run folder (all its committed shards).
    """
    import glob
    import json
    from pathlib import Path

    import webdataset as wds
    from PIL import Image

    path = Path(pattern)
    class_names = None
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        doc = path / "dataset.json"
        if doc.is_file():
            class_names = json.loads(doc.read_text()).get("class_names")
    elif "*" in pattern or "?" in pattern:
        urls = sorted(glob.glob(pattern))
    else:
        urls = pattern
    if not urls:
        raise UsageError(f"no shards match {pattern!r}: pass a run folder, a glob or a brace pattern of .tar files")
    images, labels, keys = [], [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        blob = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
        if blob is None or "cls" not in sample:
            continue
        with Image.open(io.BytesIO(blob)) as im:
            images.append(resize_uint8(np.asarray(im.convert("RGB")), size))
        labels.append(int(sample["cls"]))
        keys.append(sample["__key__"])
        if limit is not None and len(labels) >= limit:
            break
    if not images:
        raise UsageError(f"the shards {pattern!r} hold no images with a .cls label")
    num_classes = max(labels) + 1
    names = class_names or [str(i) for i in range(num_classes)]
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), names, keys)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 in [0, 1]."""
    return images.float().div_(255.0)
