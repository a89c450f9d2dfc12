"""`synthgen verify DIR`: re-read a run folder and check it against its own records.

Every shard is read back with the `webdataset` library (the reader a classifier will use) and checked
against its stats file and `dataset.json`: counts, sha256 (tamper and truncation detection), keys,
members, labels, metadata, decodable images of the right size, per-class counts and totals. Problems
are data: a truncated or garbage tar becomes a line in the report, never an exception.
A URL run folder (s3://, memory://...) is listed and read through fsspec; each shard is downloaded to a
temporary file, one at a time, and checked there like a local one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from synthgen.indexes import WIDS_INDEX, WIDS_KIND, dali_index, parse_dali_index, tar_members
from synthgen.runfolder import DATASET_JSON, RunFolder
from synthgen.runstate import open_run_folder
from synthgen.shards import IMAGE_EXTS, MAX_SHARD_SIZE, index_name, sample_key, stats_name, tar_name
from synthgen.stats import RUN_FORMAT
REQUIRED_META = ("sample_id", "seed", "label", "class_name", "score")
MAX_PROBLEMS_PER_SHARD = 20  # a garbage shard would otherwise bury the report in per-sample lines

_PIL_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
_KNOWN_MEMBERS = frozenset(IMAGE_EXTS) | {"cls", "json", "npy"}
# What reading a damaged tar raises: tarfile.ReadError (bad header / checksum / empty file), OSError
# (unreadable file), ValueError (webdataset: duplicate member in one sample), EOFError (short read).
_READ_ERRORS = (tarfile.TarError, OSError, ValueError, EOFError)


@dataclass
class VerifyReport:
    run_dir: Path | str
    shards_checked: int
    samples: int
    problems: list[str] = field(default_factory=list)
    damaged: set[int] = field(default_factory=set)  # shards a problem names: `verify --repair` redoes them
    num_shards: int | None = None  # the run's shards, and how many dataset.json lists as committed
    committed: int = 0
    complete: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def incomplete_line(self) -> str:
        return (f"incomplete: {self.committed} of {self.num_shards} shards committed; rerun the same generate "
                "command to finish")


@dataclass
class _RunInfo:
    """What dataset.json says the shards must look like."""

    fmt: str | None
    image_size: tuple[int, int] | None  # (width, height)
    class_names: list[str]
    keys: set[str] = field(default_factory=set)
    sample_ids: set = field(default_factory=set)


def verify_run(run_dir: Path | str, decode_images: bool = True) -> VerifyReport:
    """Check every shard of a run folder (a path or a URL); returns a report whose `problems` name shard,
    key and fault."""
    folder = open_run_folder(run_dir)
    report = VerifyReport(run_dir=folder.location, shards_checked=0, samples=0, problems=[])
    dataset = _load_dataset(folder, report.problems)
    if dataset is None:
        return report
    with folder.local_copies() as local:
        _verify_shards(folder, dataset, report, decode_images, local)
    return report


def _verify_shards(folder: RunFolder, dataset: dict, report: VerifyReport, decode_images: bool, local) -> None:
    info = _run_info(dataset, report.problems)
    names = folder.files()
    report.problems += _stray_files(names)
    listed = _listed_shards(dataset, report.problems)
    on_disk = _shards_on_disk(names)
    report.problems += _shard_set_problems(dataset, listed, on_disk)
    report.num_shards, report.committed = dataset.get("num_shards"), len(listed)
    report.complete = bool(dataset.get("complete"))
    report.damaged |= (listed - on_disk["stats"]) | (on_disk["stats"] - on_disk["tars"])

    # dataset.json aggregates the stats files, and each stats file is checked against its tar: so the
    # run totals are compared with the stats, and a damaged shard is reported once, at the shard.
    per_class: Counter[int] = Counter()
    recorded_samples = 0
    for shard in sorted(listed | on_disk["stats"]):
        stats = _load_stats(folder, shard, report.problems)
        if stats is None or shard not in on_disk["tars"]:
            report.damaged.add(shard)
            continue
        entry = (dataset.get("shards") or {}).get(str(shard))
        entry = entry if isinstance(entry, dict) else None
        problems, labels, count = _check_shard(local, shard, stats, entry, info, decode_images)
        if count:  # an empty shard has no index: there is nothing to read
            problems += _index_problems(folder, local, shard, index_name(shard) in names)
        report.problems += _capped(shard, problems)
        if problems:
            report.damaged.add(shard)
        report.shards_checked += 1
        report.samples += count
        per_class += _recorded_per_class(stats, labels)
        recorded_samples += stats["count"] if isinstance(stats.get("count"), int) else count
    report.problems += _totals_problems(dataset, info, per_class, recorded_samples)
    report.problems += _wids_problems(folder, dataset)


# ---------------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------------


def _load_dataset(folder: RunFolder, problems: list[str]) -> dict | None:
    path = folder.where(DATASET_JSON)
    try:
        raw = folder.read(DATASET_JSON)
        if raw is None:
            problems.append(f"{folder.location}: no dataset.json, not a synthgen run folder")
            return None
        dataset = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({exc}), not a synthgen run folder")
        return None
    if not isinstance(dataset, dict) or dataset.get("format") != RUN_FORMAT:
        got = dataset.get("format") if isinstance(dataset, dict) else type(dataset).__name__
        problems.append(f"{path}: format is {got!r}, expected {RUN_FORMAT!r}; not a synthgen run folder")
        return None
    return dataset


def _run_info(dataset: dict, problems: list[str]) -> _RunInfo:
    config = dataset.get("config") or {}
    fmt = config.get("format")
    if fmt is not None and fmt not in IMAGE_EXTS:
        problems.append(f"dataset.json: config format {fmt!r} is not one of {IMAGE_EXTS}")
        fmt = None
    size = config.get("image_size")
    if isinstance(size, int):
        size = (size, size)
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = (int(size[1]), int(size[0]))  # stored as (height, width); PIL sizes are (width, height)
    else:
        size = None
    class_names = [str(c) for c in dataset.get("class_names") or []]
    if not class_names:
        problems.append("dataset.json: no class_names")
    return _RunInfo(fmt=fmt, image_size=size, class_names=class_names)


def _stray_files(names) -> list[str]:
    return [
        f"{name}: stray temporary file from an interrupted write (resume removes it)"
        for name in sorted(names) if name.endswith(".tmp") and not name.startswith(".")
    ]


def _listed_shards(dataset: dict, problems: list[str]) -> set[int]:
    listed = set()
    for name in dataset.get("shards") or {}:
        try:
            listed.add(int(name))
        except ValueError:
            problems.append(f"dataset.json: shard name {name!r} is not an integer")
    return listed


def _shards_on_disk(names) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {"tars": set(), "stats": set()}
    for name in names:
        m = re.match(r"^(\d{6})\.(tar|stats\.json)$", name)
        if m:
            found["tars" if m.group(2) == "tar" else "stats"].add(int(m.group(1)))
    return found


def _shard_set_problems(dataset: dict, listed: set[int], on_disk: dict) -> list[str]:
    tars, stats = on_disk["tars"], on_disk["stats"]
    tar, st = tar_name, stats_name
    out = [f"{tar(k)}: listed as done in dataset.json but has no stats file" for k in sorted(listed - stats)]
    out += [f"{st(k)}: stats file for a shard dataset.json does not list as done" for k in sorted(stats - listed)]
    out += [f"{st(k)}: stats file but no tar {tar(k)}" for k in sorted(stats - tars)]
    out += [f"{tar(k)}: tar without a stats file (never committed)" for k in sorted(tars - stats)]
    num_shards = dataset.get("num_shards")
    if isinstance(num_shards, int):
        out += [f"shard {k}: outside the run's {num_shards} shards" for k in sorted(listed | tars) if k >= num_shards]
        if dataset.get("complete") and listed != set(range(num_shards)):
            missing = sorted(set(range(num_shards)) - listed)
            out.append(f"dataset.json: marked complete but shards {missing[:10]} are not listed as done")
    return out


def _load_stats(folder: RunFolder, shard: int, problems: list[str]) -> dict | None:
    """The stats file as a plain dict (verify reports each bad field; runs trust only stats.parse_stats)."""
    try:
        raw = folder.read(stats_name(shard))
        stats = None if raw is None else json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{stats_name(shard)}: unreadable ({exc})")
        return None
    if stats is not None and not isinstance(stats, dict):
        problems.append(f"{stats_name(shard)}: not a JSON object")
        return None
    return stats


def _capped(shard: int, problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS_PER_SHARD:
        return problems
    more = len(problems) - MAX_PROBLEMS_PER_SHARD
    return problems[:MAX_PROBLEMS_PER_SHARD] + [f"shard {shard}: ... and {more} more problems"]


# ---------------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _check_shard(
    local, shard: int, stats: dict, entry: dict | None, info: _RunInfo, decode_images: bool
) -> tuple[list[str], Counter[int], int]:
    """Problems of one shard, its observed per-label counts and its number of samples.

    `local(name)`: a local path of the run folder's file (RunFolder.local_copies)."""
    name = tar_name(shard)
    try:
        path = local(name)
    except OSError as exc:
        return [f"{name}: cannot read ({exc})"], Counter(), 0
    problems = _record_problems(path, shard, stats, entry)
    labels: Counter[int] = Counter()
    index = 0
    try:
        dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=None)
        for sample in dataset:
            key = sample["__key__"]
            problems += _key_problems(name, shard, index, key, info)
            sample_problems, label = _sample_problems(sample, info, decode_images)
            problems += [f"{name} key {key}: {p}" for p in sample_problems]
            if label is not None:
                labels[label] += 1
            index += 1
    except _READ_ERRORS as exc:
        problems.append(f"{name}: unreadable after {index} samples: {type(exc).__name__}: {_reason(exc)}")
    if index != stats.get("count"):
        problems.append(f"{name}: holds {index} samples, stats count is {stats.get('count')}")
    problems += _per_class_problems(name, stats, labels)
    return problems, labels, index


def _index_problems(folder: RunFolder, local, shard: int, present: bool) -> list[str]:
    """The shard's DALI index against its tar: every entry inside the tar, and equal to the index the tar's
    own headers give. The index is read as bytes (it is small); the tar is the local copy _check_shard made."""
    name, tar = index_name(shard), tar_name(shard)
    if not present:
        return [f"{name}: missing (DALI would scan {tar}); rerun the same generate command to write it"]
    try:
        raw = folder.read(name) or b""
        samples = parse_dali_index(raw)
    except (OSError, ValueError) as exc:
        return [f"{name}: unreadable ({exc})"]
    path = local(tar)
    size = path.stat().st_size
    past = [s[0][3].split(".")[0] for s in samples if any(offset + length > size for _, offset, length, _ in s)]
    if past:
        return [f"{name}: {len(past)} sample(s) from key {past[0]} on point past the end of {tar} ({size} bytes): "
                "the tar is truncated"]
    try:
        expected = dali_index(tar_members(path))
    except (*_READ_ERRORS, ValueError) as exc:
        return [f"{name}: cannot be checked, {tar} is unreadable ({exc})"]
    if raw != expected:
        return [f"{name}: does not match the members of {tar} (written for another tar?)"]
    return []


def _wids_problems(folder: RunFolder, dataset: dict) -> list[str]:
    """wids-index.json lists exactly the shards dataset.json does, with their sample counts."""
    shards = dataset.get("shards") or {}
    if not any((v or {}).get("count") for v in shards.values()):
        return []
    raw = folder.read(WIDS_INDEX)
    if raw is None:
        return [f"{WIDS_INDEX}: missing (wids cannot open the folder); rerun the same generate command"]
    try:
        doc = json.loads(raw)
        listed = [(s["url"], s["nsamples"]) for s in doc["shardlist"]]
        kind = doc.get("__kind__")
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{WIDS_INDEX}: unreadable ({exc})"]
    expected = [(tar_name(int(k)), (shards[k] or {}).get("count")) for k in sorted(shards, key=int)
                if (shards[k] or {}).get("count")]
    out = [] if kind == WIDS_KIND else [f"{WIDS_INDEX}: __kind__ is {kind!r}, expected {WIDS_KIND!r}"]
    if listed != expected:
        out.append(f"{WIDS_INDEX}: lists {len(listed)} shard(s) {listed[:3]}..., dataset.json has "
                   f"{len(expected)} {expected[:3]}...")
    return out


def _reason(exc: BaseException) -> str:
    # webdataset appends " @ <stream repr>" and the url to the message; the shard is named already.
    return str(exc.args[0]).split(" @ ")[0] if exc.args else str(exc)


def _record_problems(path: Path, shard: int, stats: dict, entry: dict | None) -> list[str]:
    """Compare the tar's bytes with its stats file, and the stats file with dataset.json."""
    name = path.name
    out = []
    try:
        digest, size = _sha256(path)
    except OSError as exc:
        return [f"{name}: cannot read ({exc})"]
    if digest != stats.get("sha256"):
        recorded = str(stats.get("sha256"))[:16]
        out.append(f"{name}: sha256 {digest[:16]}... differs from stats {recorded}... (modified or truncated)")
    if "bytes" in stats and size != stats["bytes"]:
        out.append(f"{name}: {size} bytes, stats say {stats['bytes']}")
    if "shard" in stats and stats["shard"] != shard:
        out.append(f"{stats_name(shard)}: says shard {stats['shard']}")
    for field_name in ("count", "sha256"):
        if entry is not None and field_name in entry and entry[field_name] != stats.get(field_name):
            out.append(f"{name}: dataset.json {field_name} {entry[field_name]!r} != stats {stats.get(field_name)!r}")
    return out


def _key_problems(name: str, shard: int, index: int, key: str, info: _RunInfo) -> list[str]:
    out = []
    expected = sample_key(shard, index) if index < MAX_SHARD_SIZE else None
    if "." in key:
        out.append(f"{name} key {key}: contains a '.'")
    if key != expected:
        out.append(f"{name} key {key}: sample {index} should have key {expected}")
    if key in info.keys:
        out.append(f"{name} key {key}: duplicate key in the run (members of one sample not adjacent?)")
    info.keys.add(key)
    return out


def _recorded_per_class(stats: dict, observed: Counter[int]) -> Counter[int]:
    """The stats file's per-label counts (observed counts where it has none or they are malformed)."""
    try:
        return Counter({int(k): int(v) for k, v in stats["per_class"].items()})
    except (KeyError, AttributeError, TypeError, ValueError):
        return observed


def _per_class_problems(name: str, stats: dict, labels: Counter[int]) -> list[str]:
    if not isinstance(stats.get("per_class"), dict):
        return [] if "per_class" not in stats else [f"{name}: stats per_class is not an object"]
    recorded = {str(k): v for k, v in stats["per_class"].items() if v}
    observed = {str(k): v for k, v in labels.items()}
    if recorded == observed:
        return []
    observed, recorded = dict(sorted(observed.items())), dict(sorted(recorded.items()))
    return [f"{name}: per-class counts {observed} != stats per_class {recorded}"]


# ---------------------------------------------------------------------------------------------------
# One sample
# ---------------------------------------------------------------------------------------------------


def _sample_problems(sample: dict, info: _RunInfo, decode_images: bool) -> tuple[list[str], int | None]:
    """Problems of one sample and its label (None when .cls is unusable)."""
    members = [k for k in sample if not k.startswith("__")]
    images = [k for k in members if k in IMAGE_EXTS]
    out = [f"unexpected member .{k}" for k in members if k not in _KNOWN_MEMBERS]
    if len(images) != 1:
        out.append(f"has {len(images)} image members {images}, expected exactly one")
    elif info.fmt is not None and images[0] != info.fmt:
        out.append(f"image is .{images[0]}, the run's format is {info.fmt}")
    expected_order = images[:1] + ["cls", "json"] + (["npy"] if "npy" in sample else [])
    known = [k for k in members if k in _KNOWN_MEMBERS]
    if known != expected_order and len(images) == 1 and "cls" in sample and "json" in sample:
        out.append(f"members in order {known}, expected {expected_order}")
    label, cls_problems = _parse_cls(sample.get("cls"), len(info.class_names))
    out += cls_problems
    out += _meta_problems(sample.get("json"), sample["__key__"], label, info)
    if "npy" in sample:
        out += _npy_problems(sample["npy"])
    if decode_images and len(images) == 1:
        out += _image_problems(sample[images[0]], images[0], info.image_size)
    return out, label


def _parse_cls(raw: bytes | None, num_classes: int) -> tuple[int | None, list[str]]:
    if raw is None:
        return None, ["no .cls member"]
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None, [f".cls {raw[:20]!r} is not an ASCII integer"]
    if not 0 <= label < num_classes:
        return None, [f".cls {label} is outside [0, {num_classes})"]
    return label, []


def _meta_problems(raw: bytes | None, key: str, label: int | None, info: _RunInfo) -> list[str]:
    if raw is None:
        return ["no .json member"]
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return [f".json does not parse ({exc})"]
    if not isinstance(meta, dict):
        return [".json is not an object"]
    out = [f".json lacks {k!r}" for k in REQUIRED_META if k not in meta]
    if label is not None and "label" in meta and meta["label"] != label:
        out.append(f".json label {meta['label']!r} != .cls {label}")
    if label is not None and "class_name" in meta and str(meta["class_name"]) != info.class_names[label]:
        out.append(f".json class_name {meta['class_name']!r} != class_names[{label}] {info.class_names[label]!r}")
    if "key" in meta and meta["key"] != key:
        out.append(f".json key {meta['key']!r} != sample key")
    score = meta.get("score")
    if score is not None and not (isinstance(score, (int, float)) and math.isfinite(score)):
        out.append(f".json score {score!r} is neither a finite number nor null")
    sample_id = meta.get("sample_id")
    if isinstance(sample_id, (int, str)):
        if sample_id in info.sample_ids:
            out.append(f".json sample_id {sample_id!r} appears twice in the run")
        info.sample_ids.add(sample_id)
    return out


def _npy_problems(raw: bytes) -> list[str]:
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        return [f".npy does not load ({exc})"]
    return [] if arr.dtype == np.float16 else [f".npy dtype {arr.dtype}, expected float16"]


def _image_problems(raw: bytes, ext: str, size: tuple[int, int] | None) -> list[str]:
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            fmt, got = img.format, img.size
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        return [f".{ext} does not decode ({exc})"]
    out = []
    if fmt != _PIL_FORMATS[ext]:
        out.append(f".{ext} holds a {fmt} image")
    if size is not None and got != size:
        out.append(f"image is {got[0]}x{got[1]}, the run's image size is {size[0]}x{size[1]}")
    return out


# ---------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------


def _totals_problems(dataset: dict, info: _RunInfo, per_class: Counter[int], samples: int) -> list[str]:
    """Compare dataset.json's per-class counts and totals with the sums over the stats files."""
    names = info.class_names
    out = [
        f"stats files count {v} samples of label {k}, outside the run's {len(names)} classes"
        for k, v in sorted(per_class.items())
        if v and not 0 <= k < len(names)
    ]
    summed = {names[k]: v for k, v in per_class.items() if 0 <= k < len(names) and v}
    recorded = dataset.get("per_class_counts")
    recorded = {str(k): v for k, v in recorded.items() if v} if isinstance(recorded, dict) else {}
    for name in sorted(set(summed) | set(recorded)):
        if summed.get(name, 0) != recorded.get(name, 0):
            out.append(
                f"class {name!r}: {summed.get(name, 0)} samples in the stats files, "
                f"dataset.json per_class_counts says {recorded.get(name, 0)}"
            )
    total = (dataset.get("totals") or {}).get("samples")
    if total is not None and total != samples:
        out.append(f"dataset.json totals samples {total} != {samples} samples in the stats files")
    n = (dataset.get("config") or {}).get("n")
    if dataset.get("complete") and isinstance(n, int) and samples != n:
        out.append(f"dataset.json is marked complete but the stats files count {samples} samples, config n is {n}")
    return out
