"""`verify_run` finds every kind of damage as a report line; `make_preview` draws the contact sheet."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthgen.errors import UsageError
from synthgen.preview import CAPTION_HEIGHT, make_preview
from synthgen.encode import encode_image
from synthgen.indexes import WIDS_INDEX, wids_index
from synthgen.shards import SampleRecord, ShardWriter, sample_key, shard_path, stats_path, write_bytes_atomic
from synthgen.stats import json_bytes
from synthgen.verify import verify_run


def put_stats(run_dir, shard: int, stats: dict) -> None:
    """A stats file as given, consistent or not (verify must judge what it finds)."""
    write_bytes_atomic(stats_path(run_dir, shard), json_bytes(stats))

CLASS_NAMES = ["cat", "dog", "eel"]
SIZE = 8


def build_run(run_dir: Path, counts=(4, 4, 3), fmt: str = "png", size: int = SIZE, key=sample_key, edit=None) -> Path:
    """A small valid run folder written the way the pipeline does: shards, stats files, dataset.json.

    `key(shard, i)` names the samples and `edit(meta)` may spoil their metadata, to build bad runs.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_class: Counter[int] = Counter()
    shards = {}
    sample_id = 0
    for shard, n in enumerate(counts):
        shard_counts: Counter[int] = Counter()
        with ShardWriter(run_dir, shard) as w:
            for i in range(n):
                label = sample_id % len(CLASS_NAMES)
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                meta = {
                    "sample_id": sample_id,
                    "seed": 1000 + sample_id,
                    "label": label,
                    "class_name": CLASS_NAMES[label],
                    "score": None if i == 0 else round(0.5 + 0.01 * i, 3),
                }
                if edit is not None:
                    edit(meta)
                cond = rng.standard_normal(4).astype(np.float32)
                w.add(SampleRecord(key(shard, i), encode_image(pixels, fmt, 90), fmt, label, meta, cond))
                shard_counts[label] += 1
                sample_id += 1
            info = w.commit()
        stats = {"shard": shard, "target": n, "candidates": n, "rejected": 0, **info}
        stats["per_class"] = {str(k): v for k, v in sorted(shard_counts.items())}
        put_stats(run_dir, shard, stats)
        shards[str(shard)] = {"count": info["count"], "sha256": info["sha256"]}
        per_class += shard_counts
    dataset = {
        "format": "synthgen-run/1",
        "config": {"n": sum(counts), "shard_size": max(counts), "format": fmt, "image_size": size},
        "class_names": CLASS_NAMES,
        "num_shards": len(counts),
        "shards": shards,
        "per_class_counts": {CLASS_NAMES[k]: v for k, v in per_class.items()},
        "totals": {"samples": sum(counts)},
        "complete": True,
    }
    write_bytes_atomic(run_dir / "dataset.json", json_bytes(dataset))
    wids = wids_index([(f"{k:06d}.tar", n, shard_path(run_dir, k).stat().st_size) for k, n in enumerate(counts)], "t")
    write_bytes_atomic(run_dir / WIDS_INDEX, json_bytes(wids))
    return run_dir


@pytest.fixture
def run(tmp_path) -> Path:
    return build_run(tmp_path / "run")


def _edit_dataset(run_dir: Path, fn) -> None:
    path = run_dir / "dataset.json"
    dataset = json.loads(path.read_text())
    fn(dataset)
    path.write_text(json.dumps(dataset))


def _only(report, *needles: str) -> None:
    assert not report.ok
    joined = "\n".join(report.problems)
    for needle in needles:
        assert needle in joined, joined


# --- a good run --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_good_run_passes(tmp_path, fmt):
    report = verify_run(build_run(tmp_path / fmt, fmt=fmt))
    assert report.problems == []
    assert report.ok and report.shards_checked == 3 and report.samples == 11


def test_good_run_without_decoding(run):
    assert verify_run(run, decode_images=False).ok


# --- each tampering is reported, never raised ------------------------------------------------------------


def test_missing_dataset_json(run):
    (run / "dataset.json").unlink()
    report = verify_run(run)
    assert len(report.problems) == 1 and "not a synthgen run folder" in report.problems[0]


def test_flipped_byte_is_a_sha_mismatch(run):
    path = shard_path(run, 1)
    data = bytearray(path.read_bytes())
    data[600] ^= 0x01  # inside the first image payload: the tar still parses
    path.write_bytes(bytes(data))
    report = verify_run(run, decode_images=False)
    _only(report, "000001.tar: sha256")
    assert all("000001.tar" in p for p in report.problems)


def test_flipped_header_byte_is_reported_not_raised(run):
    path = shard_path(run, 0)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # inside the first header: tarfile says "bad checksum"
    path.write_bytes(bytes(data))
    _only(verify_run(run), "000000.tar: sha256", "000000.tar: unreadable", "holds 0 samples, stats count is 4")


@pytest.mark.parametrize("keep", [0, 700, 3000])
def test_truncated_tar(run, keep):
    path = shard_path(run, 2)
    path.write_bytes(path.read_bytes()[:keep])
    _only(verify_run(run), "000002.tar: sha256", "stats count is 3")


def test_garbage_tar(run):
    shard_path(run, 0).write_bytes(b"not a tar at all" * 100)
    _only(verify_run(run), "000000.tar: unreadable", "holds 0 samples")


def test_deleted_stats_file(run):
    stats_path(run, 1).unlink()
    _only(verify_run(run), "000001.tar: listed as done in dataset.json but has no stats file", "without a stats file")


def test_stats_without_dataset_entry(run):
    _edit_dataset(run, lambda d: d["shards"].pop("2"))
    _only(verify_run(run), "000002.stats.json: stats file for a shard dataset.json does not list")


def test_stray_tmp(run):
    (run / "000003.tar.tmp").write_bytes(b"partial")
    report = verify_run(run)
    _only(report, "000003.tar.tmp: stray temporary file")
    assert len(report.problems) == 1


def test_wrong_cls(run):
    path = shard_path(run, 0)
    data = path.read_bytes()
    key = sample_key(0, 1).encode()
    # .cls payloads are one ASCII digit; rewrite sample 1's label from 1 to 2 (tar checksums cover headers only)
    header = data.index(key + b".cls")
    payload = header + 512
    assert data[payload : payload + 1] == b"1"
    path.write_bytes(data[:payload] + b"2" + data[payload + 1 :])
    report = verify_run(run)
    _only(report, f"key {sample_key(0, 1)}: .json label 1 != .cls 2", "per-class counts", "sha256")


def test_cls_out_of_range(run):
    path = shard_path(run, 0)
    data = path.read_bytes()
    payload = data.index(sample_key(0, 0).encode() + b".cls") + 512
    path.write_bytes(data[:payload] + b"9" + data[payload + 1 :])
    _only(verify_run(run), ".cls 9 is outside [0, 3)")


def test_per_class_count_mismatch(run):
    def bump(d):
        d["per_class_counts"]["cat"] += 1

    _edit_dataset(run, bump)
    report = verify_run(run)
    _only(report, "class 'cat'", "per_class_counts says")
    assert len(report.problems) == 1


def test_stats_count_mismatch(run):
    stats = json.loads(stats_path(run, 0).read_text())
    stats["count"] = 5
    put_stats(run, 0, stats)
    _only(verify_run(run), "000000.tar: holds 4 samples, stats count is 5", "dataset.json count 4 != stats 5")


def test_totals_and_complete_mismatch(run):
    def edit(d):
        d["totals"]["samples"] = 12
        d["config"]["n"] = 12

    _edit_dataset(run, edit)
    _only(verify_run(run), "totals samples 12 != 11", "config n is 12")


def test_incomplete_listing(run):
    _edit_dataset(run, lambda d: d.update(num_shards=4))
    _only(verify_run(run), "marked complete but shards [3]")


def test_wrong_format_and_size(tmp_path):
    run = build_run(tmp_path / "r", fmt="png")
    _edit_dataset(run, lambda d: d["config"].update(format="jpg", image_size=16))
    _only(verify_run(run), "image is .png, the run's format is jpg", "image is 8x8, the run's image size is 16x16")


def test_stats_per_class_mismatch(run):
    stats = json.loads(stats_path(run, 2).read_text())
    stats["per_class"] = {"0": 3}
    put_stats(run, 2, stats)
    _only(verify_run(run), "000002.tar: per-class counts {'0': 1, '1': 1, '2': 1} != stats per_class {'0': 3}")


def test_wrong_keys(tmp_path):
    run = build_run(tmp_path / "r", key=lambda shard, i: sample_key(shard, i + 1))
    _only(verify_run(run), f"key {sample_key(0, 1)}: sample 0 should have key {sample_key(0, 0)}")


def test_duplicate_keys_across_shards(tmp_path):
    run = build_run(tmp_path / "r", key=lambda shard, i: sample_key(0, i))
    _only(verify_run(run), f"key {sample_key(0, 0)}: duplicate key in the run")


def test_bad_metadata(tmp_path):
    def spoil(meta):
        del meta["seed"]
        meta["sample_id"] = 0
        meta["class_name"] = "owl"

    _only(verify_run(build_run(tmp_path / "r", edit=spoil)), ".json lacks 'seed'", "sample_id 0 appears twice", "owl")


# --- preview ------------------------------------------------------------------------------------------------


def test_preview_writes_png_of_expected_size(run, tmp_path):
    out = make_preview(run, tmp_path / "out" / "grid.png", per_class=2, cell=32)
    img = Image.open(out)
    assert img.format == "PNG"
    assert img.size == (32 * 3, 3 * (32 + CAPTION_HEIGHT))  # label column + 2 cells; 3 classes


def test_preview_limits_classes(run, tmp_path):
    img = Image.open(make_preview(run, tmp_path / "g.png", per_class=5, max_classes=2, cell=20))
    assert img.size == (20 * 6, 2 * (20 + CAPTION_HEIGHT))


def test_preview_without_shards(tmp_path):
    with pytest.raises(UsageError, match="no committed shards"):
        make_preview(tmp_path, tmp_path / "g.png")


def test_preview_cells_hold_the_images_scaled_nearest(run, tmp_path):
    import io

    import webdataset as wds

    first = next(iter(wds.WebDataset(str(shard_path(run, 0)), shardshuffle=False)))  # sample 0: class 0
    source = Image.open(io.BytesIO(first["png"])).convert("RGB")
    grid = Image.open(make_preview(run, tmp_path / "g.png", per_class=2, cell=32)).convert("RGB")
    cell = grid.crop((32, 0, 64, 32))
    assert np.array_equal(np.asarray(cell), np.asarray(source.resize((32, 32), Image.Resampling.NEAREST)))
    caption = np.asarray(grid.crop((32, 32, 64, 32 + CAPTION_HEIGHT)))
    assert (caption < 128).any()  # the "-" of a null score is drawn


def test_preview_without_dataset_json_uses_sample_class_names(run, tmp_path):
    (run / "dataset.json").unlink()
    img = Image.open(make_preview(run, tmp_path / "g.png", per_class=1, cell=16))
    assert img.size == (16 * 2, 3 * (16 + CAPTION_HEIGHT))
