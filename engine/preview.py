"""`synthgen preview DIR --out grid.png`: a contact sheet of a run, one row per class.

Reads the committed shards in order with `webdataset` and stops as soon as every shown class has
`per_class` images, so a preview of a million-sample run costs a few shards. Each cell shows the image
(nearest-neighbour when enlarged, so tiny images stay crisp) and its filter score underneath.

Layout: a label column `cell` px wide with the class name, then `per_class` cells; each row is
`cell + CAPTION_HEIGHT` px tall. The image is `cell * (per_class + 1)` x `rows * (cell + CAPTION_HEIGHT)`,
where rows = classes with at least one image, at most `max_classes`, lowest labels first.
A URL run folder (s3://, memory://...) is read through fsspec, one downloaded shard at a time.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

from synthgen.errors import UsageError
from synthgen.runfolder import DATASET_JSON, RunFolder
from synthgen.runstate import open_run_folder
from synthgen.shards import IMAGE_EXTS, tar_name

CAPTION_HEIGHT = 14  # one line of PIL's default bitmap font plus a little air
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_READ_ERRORS = (tarfile.TarError, OSError, ValueError, EOFError)


def make_preview(run_dir: Path | str, out: Path, per_class: int = 8, max_classes: int = 20, cell: int = 96) -> Path:
    """Draw up to `per_class` images for each of up to `max_classes` classes into a PNG at `out`."""
    for name, value in (("per_class", per_class), ("max_classes", max_classes), ("cell", cell)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    folder = open_run_folder(run_dir)
    shards = sorted(folder.committed())
    if not shards:
        raise UsageError(f"no committed shards in {folder.location}: run `synthgen generate` into it first")
    class_names = _class_names(folder)
    with folder.local_copies() as local:
        picked = _collect(local, shards, per_class, max_classes, class_names)
    grid = _draw(picked, class_names, per_class, cell)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return out


def _class_names(folder: RunFolder) -> dict[int, str]:
    try:
        raw = folder.read(DATASET_JSON)
        if raw is None:
            return {}
        names = json.loads(raw.decode("utf-8")).get("class_names") or []
    except (OSError, ValueError, AttributeError):
        return {}  # no dataset.json: fall back to the names in the samples
    return {i: str(n) for i, n in enumerate(names)}


def _collect(
    local, shards: list[int], per_class: int, max_classes: int, class_names: dict[int, str]
) -> dict[int, list[tuple[Image.Image, float | None]]]:
    """label -> [(image, score)], reading shards until the wanted classes are full; `local(name)` is a
    local path of the run folder's file (RunFolder.local_copies)."""
    wanted = set(sorted(class_names)[:max_classes]) if class_names else None
    picked: dict[int, list[tuple[Image.Image, float | None]]] = {}
    for shard in shards:
        try:
            url = str(local(tar_name(shard)))
            reader = wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None)
            for sample in reader:
                _take(sample, picked, per_class, wanted, class_names)
                if wanted is not None and all(len(picked.get(c, ())) >= per_class for c in wanted):
                    return picked
        except _READ_ERRORS:
            continue  # a damaged shard is verify's business; preview shows what it can read
    return {c: picked[c] for c in sorted(picked)[:max_classes]}


def _take(sample: dict, picked: dict, per_class: int, wanted: set[int] | None, class_names: dict[int, str]) -> None:
    try:
        label = int(sample["cls"].decode("ascii"))
        meta = json.loads(sample["json"])
        ext = next(e for e in IMAGE_EXTS if e in sample)
    except (KeyError, ValueError, UnicodeDecodeError, StopIteration):
        return
    if (wanted is not None and label not in wanted) or len(picked.get(label, ())) >= per_class:
        return
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            image = img.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return
    class_names.setdefault(label, str(meta.get("class_name", label)))
    score = meta.get("score")
    picked.setdefault(label, []).append((image, score if isinstance(score, (int, float)) else None))


def _fit(image: Image.Image, cell: int) -> Image.Image:
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
    return image.resize(size, resample)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def _draw(picked: dict, class_names: dict[int, str], per_class: int, cell: int) -> Image.Image:
    rows = sorted(picked)
    row_h = cell + CAPTION_HEIGHT
    grid = Image.new("RGB", (cell * (per_class + 1), max(1, len(rows)) * row_h), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, label in enumerate(rows):
        y = r * row_h
        name = _fit_text(draw, class_names.get(label, str(label)), font, cell - 4)
        draw.text((2, y + cell // 2), name, fill=_INK, font=font)
        for c, (image, score) in enumerate(picked[label]):
            x = (c + 1) * cell
            thumb = _fit(image, cell)
            grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
            caption = "-" if score is None else f"{score:.2f}"
            draw.text((x + 2, y + cell + 1), caption, fill=_INK, font=font)
    return grid
