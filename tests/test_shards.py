"""Contracts of the shard writer and the run folder's file protocol."""

from __future__ import annotations

import errno
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from synthgen import shards
from synthgen.errors import UsageError
from synthgen.encode import encode_image
from synthgen.localfolder import LocalFolder
from synthgen.shards import SampleRecord, ShardWriter, sample_key, shard_path, stats_path, write_stats
from synthgen.stats import ShardStats, json_bytes, parse_stats


def _pixels(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _records(shard: int, n: int, fmt: str = "png", cond: bool = True) -> list[SampleRecord]:
    out = []
    for i in range(n):
        key = sample_key(shard, i)
        meta = {"sample_id": shard * 100 + i, "seed": 7 + i, "label": i % 3, "class_name": str(i % 3), "score": 0.5}
        c = np.linspace(-1, 1, 6, dtype=np.float32) * (i + 1) if cond else None
        out.append(SampleRecord(key, encode_image(_pixels(i), fmt, 90), fmt, i % 3, meta, c))
    return out


def _write(run_dir, shard: int, records) -> dict:
    with ShardWriter(run_dir, shard) as w:
        for r in records:
            w.add(r)
        return w.commit()


def _read(path) -> list[dict]:
    return list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))


# --- names -------------------------------------------------------------------------------------------


def test_sample_key_is_dot_free_fixed_width_and_ordered():
    assert sample_key(3, 42) == "00000300042"
    keys = [sample_key(s, i) for s in range(3) for i in (0, 1, 99_999)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all("." not in k and len(k) == 11 for k in keys)


@pytest.mark.parametrize("shard,index", [(-1, 0), (1_000_000, 0), (0, -1), (0, shards.MAX_SHARD_SIZE)])
def test_sample_key_rejects_out_of_range(shard, index):
    with pytest.raises(ValueError):
        sample_key(shard, index)


def test_paths(tmp_path):
    assert shard_path(tmp_path, 12) == tmp_path / "000012.tar"
    assert stats_path(tmp_path, 12) == tmp_path / "000012.stats.json"


def test_record_validates_key_and_ext():
    with pytest.raises(ValueError, match="key"):
        SampleRecord("a.b", b"", "png", 0, {})
    with pytest.raises(ValueError, match="ext"):
        SampleRecord("ab", b"", "gif", 0, {})


# --- image encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_encode_image_is_deterministic_and_decodes(fmt, pil):
    px = _pixels(0, 16)
    a, b = encode_image(px, fmt, 85), encode_image(px.copy(), fmt, 85)
    assert a == b
    img = Image.open(io.BytesIO(a))
    assert img.format == pil and img.size == (16, 16)
    if fmt == "png":
        assert np.array_equal(np.asarray(img.convert("RGB")), px)
        assert encode_image(px, "png", 10) == a  # png ignores quality


def test_encode_image_validates():
    with pytest.raises(ValueError, match="format"):
        encode_image(_pixels(0), "gif", 90)
    with pytest.raises(ValueError, match="quality"):
        encode_image(_pixels(0), "jpg", 0)
    with pytest.raises(ValueError, match="uint8"):
        encode_image(_pixels(0).astype(np.float32), "png", 90)


# --- writer round trip -----------------------------------------------------------------------------------


def test_round_trip_through_webdataset(tmp_path):
    records = _records(4, 5)
    info = _write(tmp_path, 4, records)
    path = shard_path(tmp_path, 4)
    assert info["count"] == 5 and info["bytes"] == path.stat().st_size
    samples = _read(path)
    assert [s["__key__"] for s in samples] == [sample_key(4, i) for i in range(5)]
    for s, r in zip(samples, records):
        assert s["png"] == r.image
        assert s["cls"] == str(r.label).encode("ascii")
        assert json.loads(s["json"]) == r.meta
        assert s["json"] == json.dumps(r.meta, sort_keys=True, separators=(",", ":")).encode()
        arr = np.load(io.BytesIO(s["npy"]), allow_pickle=False)
        assert arr.dtype == np.float16
        np.testing.assert_array_equal(arr, r.cond.astype(np.float16))


def test_members_adjacent_in_order_with_deterministic_headers(tmp_path):
    _write(tmp_path, 0, _records(0, 2) + [_records(0, 3, cond=False)[2]])
    with tarfile.open(shard_path(tmp_path, 0)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    k = [sample_key(0, i) for i in range(3)]
    assert names == [
        f"{k[0]}.png", f"{k[0]}.cls", f"{k[0]}.json", f"{k[0]}.npy",
        f"{k[1]}.png", f"{k[1]}.cls", f"{k[1]}.json", f"{k[1]}.npy",
        f"{k[2]}.png", f"{k[2]}.cls", f"{k[2]}.json",
    ]  # fmt: skip
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_same_records_give_byte_identical_tars(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    info_a, info_b = _write(a, 1, _records(1, 4, "jpg")), _write(b, 1, _records(1, 4, "jpg"))
    assert shard_path(a, 1).read_bytes() == shard_path(b, 1).read_bytes()
    assert info_a == info_b
    import hashlib

    assert info_a["sha256"] == hashlib.sha256(shard_path(a, 1).read_bytes()).hexdigest()


def test_empty_shard_commits(tmp_path):
    info = _write(tmp_path, 0, [])
    assert info["count"] == 0 and _read(shard_path(tmp_path, 0)) == []


def test_duplicate_key_is_rejected_and_cleans_up(tmp_path):
    r = _records(0, 1)[0]
    with pytest.raises(ValueError, match="duplicate"):
        with ShardWriter(tmp_path, 0) as w:
            w.add(r)
            w.add(r)
    assert list(tmp_path.iterdir()) == []


# --- failures leave nothing -----------------------------------------------------------------------------


def test_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path, 2)
    w.add(_records(2, 1)[0])
    assert w.tmp_path.exists()
    w.abort()
    w.abort()  # idempotent
    assert list(tmp_path.iterdir()) == []


def test_exception_in_with_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, 0) as w:
            w.add(_records(0, 1)[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_meta_cleans_up(tmp_path):
    bad = SampleRecord(sample_key(0, 0), b"x", "png", 0, {"score": float("nan")})
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path, 0) as w:
            w.add(bad)
    assert list(tmp_path.iterdir()) == []


def _fail_after(monkeypatch, limit: int, err: int):
    """Make the writer's file raise OSError(err) once more than `limit` bytes were written."""
    real = shards._HashingFile.write

    def write(self, data):
        if self.nbytes + len(data) > limit:
            raise OSError(err, "simulated")
        return real(self, data)

    monkeypatch.setattr(shards._HashingFile, "write", write)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
@pytest.mark.parametrize("limit", [0, 3000])  # in add() (first header / mid-shard) ...
def test_disk_full_in_add_is_a_usage_error_and_leaves_nothing(tmp_path, monkeypatch, err, limit):
    _fail_after(monkeypatch, limit, err)
    with pytest.raises(UsageError) as info:
        with ShardWriter(tmp_path, 5) as w:
            for r in _records(5, 8):
                w.add(r)
    msg = str(info.value)
    assert msg == (
        f"disk full while writing shard 5 to {tmp_path}: free space and rerun the same command; "
        "committed shards are kept and resume skips them"
    )
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == err
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_commit_leaves_nothing(tmp_path, monkeypatch):
    w = ShardWriter(tmp_path, 0)
    for r in _records(0, 2):
        w.add(r)
    _fail_after(monkeypatch, w._out.nbytes, errno.ENOSPC)  # end-of-archive blocks do not fit
    with pytest.raises(UsageError, match="disk full while writing shard 0"):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_other_oserror_is_reraised_and_cleans_up(tmp_path, monkeypatch):
    _fail_after(monkeypatch, 0, errno.EIO)
    with pytest.raises(OSError) as info:
        with ShardWriter(tmp_path, 0) as w:
            w.add(_records(0, 1)[0])
    assert not isinstance(info.value, UsageError) and info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_disk_full_writing_stats_is_a_usage_error(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "simulated")

    monkeypatch.setattr(shards.os, "fsync", fsync)
    with pytest.raises(UsageError, match="disk full while writing shard 3"):
        write_stats(tmp_path, ShardStats(shard=3, target=1, count=1))
    assert list(tmp_path.iterdir()) == []


# --- stats files and resume -------------------------------------------------------------------------------


def test_stats_files_round_trip_and_keep_their_layout(tmp_path):
    assert json_bytes({"b": 1, "a": [1, 2]}) == b'{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    stats = ShardStats(shard=0, target=3, count=3, sha256="ab", per_class={"1": 3})
    write_stats(tmp_path, stats)
    assert parse_stats(stats_path(tmp_path, 0).read_bytes()) == stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.stats.json"]
    # Older files lack later keys and newer ones carry unknown keys: both read back.
    assert parse_stats(b'{"shard": 4, "target": 2, "future": 1}') == ShardStats(shard=4, target=2)
    for damaged in (None, b"{", b"[1]", b'{"shard": "0"}', b"\xff"):
        assert parse_stats(damaged) is None


def _commit(run_dir, shard: int, size_delta: int = 0) -> None:
    info = _write(run_dir, shard, _records(shard, 1))
    write_stats(run_dir, ShardStats(shard=shard, target=1, count=1, sha256=info["sha256"],
                                    bytes=info["bytes"] + size_delta))


def test_the_commit_rule_needs_stats_naming_the_shard_and_a_tar_of_the_recorded_size(tmp_path):
    for k in (0, 2):
        _commit(tmp_path, k)
    _commit(tmp_path, 1, size_delta=512)  # the tar is not the one the stats describe
    _write(tmp_path, 3, _records(3, 1))  # a tar without stats
    write_stats(tmp_path, ShardStats(shard=7, target=1))  # stats without a tar
    (tmp_path / "000005.stats.json").write_bytes(stats_path(tmp_path, 0).read_bytes())  # names shard 0
    folder = LocalFolder(tmp_path)
    assert sorted(folder.committed()) == [0, 2]
    assert [k for k in range(8) if folder.is_committed(k)] == [0, 2]
    assert LocalFolder(tmp_path / "missing").committed() == {}


def test_remove_uncommitted_keeps_committed_shards_and_foreign_files(tmp_path):
    _commit(tmp_path, 0)
    _write(tmp_path, 1, _records(1, 1))
    (tmp_path / "000003.tar.tmp").write_bytes(b"partial")
    (tmp_path / "dataset.json.123.tmp").write_text("{")
    (tmp_path / "dataset.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    removed = LocalFolder(tmp_path).remove_uncommitted()
    assert sorted(p.name for p in removed) == ["000001.idx", "000001.tar", "000003.tar.tmp", "dataset.json.123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.idx", "000000.stats.json", "000000.tar",
                                                          "dataset.json", "notes.txt"]
    assert LocalFolder(tmp_path).remove_uncommitted() == []
    assert sorted(LocalFolder(tmp_path).committed()) == [0]


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 70_000])
def test_member_headers_are_the_ones_tarfile_writes(size):
    from synthgen.shards import ustar_header

    for name in ("00000000000.jpg", "k.cls", "x" * 100):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="does not fit"):
        ustar_header("y" * 101, size)


def test_a_shard_is_byte_equal_to_the_same_members_written_by_tarfile(tmp_path):
    records = _records(0, 5)
    _write(tmp_path, 0, records)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for r in records:
            for name, payload in r.members():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(payload))
    assert shard_path(tmp_path, 0).read_bytes() == buf.getvalue()
