"""Reading a run folder's samples back through the readers users train with: webdataset, wids, DALI.

Each reader opens a finished run folder as it is, with the files the run wrote for it (`wids-index.json`,
the `NNNNNN.idx` DALI indexes), and yields the same committed samples in the same order: shard by shard,
in key order within a shard. A run folder is read through its `dataset.json`, so a shard that was never
committed is never read, whatever else lies in the folder.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from synthgen.errors import UsageError
from synthgen.indexes import WIDS_INDEX
from synthgen.labels import parse_cls
from synthgen.options import LOADERS
from synthgen.shards import IMAGE_EXTS, index_name, tar_name

DALI_BATCH = 64  # samples per DALI reader batch; the last one is padded and trimmed here


@dataclass(frozen=True)
class ShardSample:
    key: str
    image: bytes  # encoded (jpg, png or webp)
    label: int


def committed_tars(run_dir: Path) -> list[Path]:
    """The tars dataset.json lists as committed and holding samples, in shard order."""
    doc_path = Path(run_dir) / "dataset.json"
    try:
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{run_dir} is not a readable synthgen run folder ({doc_path}: {exc})") from exc
    shards = doc.get("shards") or {}
    return [Path(run_dir) / tar_name(int(k)) for k in sorted(shards, key=int) if (shards[k] or {}).get("count")]


def shard_urls(source: str | Path) -> list[str]:
    """A run folder's committed tars, or the tars of a glob, a brace pattern or one file."""
    path = Path(source)
    if path.is_dir():
        return [str(p) for p in committed_tars(path)]
    text = str(source)
    if any(c in text for c in "*?["):
        return sorted(glob.glob(text))
    if "{" in text:
        import braceexpand

        return list(braceexpand.braceexpand(text))
    return [text]


def read_samples(source: str | Path, loader: str = "webdataset") -> Iterator[ShardSample]:
    """Every sample with an image and a valid .cls label (labels.py) of `source` (see shard_urls), read by
    `loader`."""
    if loader not in LOADERS:
        raise UsageError(f"--loader {loader!r} is not one of {', '.join(LOADERS)}")
    if loader == "wids":
        return _read_wids(source)
    urls = shard_urls(source)
    if not urls:
        raise UsageError(f"no shards in {source!r}: pass a run folder, a glob or a brace pattern of .tar files")
    return _read_dali(urls) if loader == "dali" else _read_webdataset(urls)


def _bytes(value) -> bytes:
    """A member's payload: bytes from webdataset, a file-like object from wids."""
    if hasattr(value, "getvalue"):
        return value.getvalue()
    if hasattr(value, "read"):
        value.seek(0)
        return value.read()
    return bytes(value)


def _image(sample: dict, prefix: str = "") -> bytes | None:
    return next((_bytes(sample[prefix + k]) for k in (*IMAGE_EXTS, "jpeg") if prefix + k in sample), None)


def _read_webdataset(urls: list[str]) -> Iterator[ShardSample]:
    import webdataset as wds

    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        image = _image(sample)
        label = parse_cls(sample["cls"])[0] if "cls" in sample else None
        if image is not None and label is not None:
            yield ShardSample(sample["__key__"], image, label)


def _read_wids(source: str | Path) -> Iterator[ShardSample]:
    try:
        import wids
    except ImportError as exc:
        raise UsageError("--loader wids needs wids: pip install 'synthgen[readers]'") from exc
    index = Path(source) / WIDS_INDEX if Path(source).is_dir() else Path(source)
    if not index.is_file():
        raise UsageError(f"{index} does not exist: --loader wids reads a run folder's {WIDS_INDEX} (written at the "
                         "end of every generate run; rerun the same generate command to write it) or a wids index")
    # transformations=[]: raw member bytes, decoded here as for the other readers.
    dataset = wids.ShardListDataset(str(index), transformations=[], localname=lambda url: url)
    for i in range(len(dataset)):
        sample = dataset[i]
        image = _image(sample, ".")
        label = parse_cls(_bytes(sample[".cls"]))[0] if ".cls" in sample else None
        if image is not None and label is not None:
            yield ShardSample(sample["__key__"], image, label)


def _read_dali(urls: list[str]) -> Iterator[ShardSample]:
    try:
        import numpy as np
        from nvidia.dali import fn, pipeline_def
    except ImportError as exc:
        raise UsageError("--loader dali needs NVIDIA DALI: pip install 'synthgen[dali]'") from exc
    indexes = [str(Path(u).with_name(index_name(int(Path(u).stem)))) if Path(u).stem.isdigit() else "" for u in urls]
    have_indexes = all(i and Path(i).is_file() for i in indexes)

    @pipeline_def(batch_size=DALI_BATCH, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        return tuple(fn.readers.webdataset(
            paths=urls, index_paths=indexes if have_indexes else None, ext=["jpg;png;webp;jpeg", "cls", "json"],
            missing_component_behavior="skip", random_shuffle=False, pad_last_batch=True, name="shards",
        ))

    pipe = pipeline()
    pipe.build()
    left = pipe.epoch_size("shards")
    while left > 0:
        images, labels, metas = pipe.run()
        for i in range(min(left, len(images))):
            meta = json.loads(bytes(np.asarray(metas.at(i))) or b"{}")
            label = parse_cls(bytes(np.asarray(labels.at(i))))[0]
            if label is not None:
                yield ShardSample(str(meta.get("key", "")), bytes(np.asarray(images.at(i))), label)
        left -= len(images)
