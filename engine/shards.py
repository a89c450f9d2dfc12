"""The write stage: samples into a WebDataset shard, and the shard's stats file after it.

A shard is written in a local folder so that a crash at any point is harmless:

1. the tar is written as `NNNNNN.tar.tmp`, flushed, fsynced and renamed to `NNNNNN.tar`;
2. the stats file is written last, atomically: it is the shard's done marker (runfolder.py's commit
   rule; a URL run folder uploads both afterwards, urlfolder.py).

Tar headers carry no time, owner or mode of the writing machine, so the same samples always give a
byte-identical tar and its sha256 (kept in the stats file) doubles as a reproducibility check.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synthgen.errors import UsageError
from synthgen.indexes import dali_index
from synthgen.stats import ShardStats

MAX_SHARD_SIZE = 100_000  # samples per shard: the key has five digits for the index
MAX_SHARDS = 1_000_000  # the key has six digits for the shard
IMAGE_EXTS = ("jpg", "webp", "png")

# Errors that mean "the disk (or quota, or file size limit) is full": the user can fix them and rerun.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------


def sample_key(shard: int, index: int) -> str:
    """The dot-free WebDataset key of sample `index` of `shard`: unique across a run, sorts in order."""
    if not 0 <= shard < MAX_SHARDS:
        raise ValueError(f"shard must be in [0, {MAX_SHARDS}), got {shard}")
    if not 0 <= index < MAX_SHARD_SIZE:
        raise ValueError(f"index must be in [0, {MAX_SHARD_SIZE}), got {index}")
    return f"{shard:06d}{index:05d}"


def tar_name(shard: int) -> str:
    return f"{shard:06d}.tar"


def stats_name(shard: int) -> str:
    return f"{shard:06d}.stats.json"


def index_name(shard: int) -> str:
    """The shard's DALI index (indexes.py)."""
    return f"{shard:06d}.idx"


def shard_path(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / tar_name(shard)


def stats_path(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / stats_name(shard)


# ---------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: `cond` is an array, elementwise == has no truth value
class SampleRecord:
    """One sample as it goes into a shard: an encoded image plus its label, metadata and conditioning."""

    key: str
    image: bytes  # encoded image
    ext: str  # "jpg" | "webp" | "png"
    label: int
    meta: dict  # JSON-serialisable; written sorted and compact as `<key>.json`
    cond: np.ndarray | None = field(default=None)  # written as `<key>.npy`, float16

    def __post_init__(self) -> None:
        if not self.key or "." in self.key or "/" in self.key:
            raise ValueError(f"key must be non-empty and contain no '.' or '/', got {self.key!r}")
        if self.ext not in IMAGE_EXTS:
            raise ValueError(f"ext must be one of {IMAGE_EXTS}, got {self.ext!r}")
        if isinstance(self.label, bool) or not isinstance(self.label, (int, np.integer)) or self.label < 0:
            raise ValueError(f"label must be a non-negative int, got {self.label!r}")

    def members(self) -> list[tuple[str, bytes]]:
        """(member name, payload) in the on-disk order: image, .cls, .json, [.npy]."""
        out = [
            (f"{self.key}.{self.ext}", bytes(self.image)),
            (f"{self.key}.cls", str(int(self.label)).encode("ascii")),
            (f"{self.key}.json", _json_bytes(self.meta)),
        ]
        if self.cond is not None:
            out.append((f"{self.key}.npy", _npy_bytes(self.cond)))
        return out


def _json_bytes(meta: dict) -> bytes:
    # allow_nan=False: NaN is not JSON and breaks strict readers; a missing score is written as null.
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _npy_bytes(cond: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(np.asarray(cond), dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def _disk_full_error(run_dir: Path, shard: int) -> UsageError:
    return UsageError(
        f"disk full while writing shard {shard} to {run_dir}: free space and rerun the same command; "
        "committed shards are kept and resume skips them"
    )


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file object that feeds every byte to sha256 and counts them on the way to disk."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        n = self.raw.write(data)
        self.sha.update(data)
        self.nbytes += len(data)
        return n

    def tell(self) -> int:
        return self.nbytes


# The fixed fields of every member header: mode 0644, uid/gid 0, mtime 0, a regular file, no link, USTAR
# magic, empty owner names and device numbers, no prefix. Exactly what tarfile writes for these values.
_HEADER_MID = b"0000644\0" + b"0000000\0" * 2
_HEADER_TAIL = (b"00000000000\0" + b" " * 8 + tarfile.REGTYPE + b"\0" * 100 + tarfile.POSIX_MAGIC
                + b"\0" * (32 + 32 + 8 + 8 + 155))
_ZERO_BLOCK = b"\0" * tarfile.BLOCKSIZE


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file `name` of `size` bytes with the fixed fields above:
    byte-equal to tarfile's for the same TarInfo (tested), built without its per-field formatting, which
    cost a quarter of a small-image shard's time."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8**11:
        raise ValueError(f"member {name!r} of {size} bytes does not fit a plain USTAR header")
    head = (raw.ljust(100, b"\0") + _HEADER_MID + b"%011o\0" % size + _HEADER_TAIL).ljust(tarfile.BLOCKSIZE, b"\0")
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]  # the checksum counts its own field as spaces


class ShardWriter:
    """Writes NNNNNN.tar.tmp, then commit(): flush, fsync, rename to NNNNNN.tar, write its DALI index
    NNNNNN.idx the same way, fsync the directory.

    abort() (and __exit__ on an exception) removes the temporary file. Members of one sample are
    adjacent, in order: image, .cls (ASCII int), .json, [.npy]. Tar headers are deterministic
    (mtime 0, uid/gid 0, empty uname/gname, mode 0o644), so the same samples give byte-identical tars.
    sha256 and byte size of the tar are tracked while writing. A full disk (ENOSPC, EDQUOT, EFBIG)
    becomes a UsageError that says how to recover; any other error removes the tmp file and re-raises.
    """

    def __init__(self, run_dir: Path, shard: int) -> None:
        if not 0 <= shard < MAX_SHARDS:
            raise ValueError(f"shard must be in [0, {MAX_SHARDS}), got {shard}")
        self.run_dir = Path(run_dir)
        self.shard = shard
        self.path = shard_path(self.run_dir, shard)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.count = 0
        self._members: list[tuple[str, int, int]] = []  # (name, data offset, size): the DALI index
        self._keys: set[str] = set()
        self._done = False
        self._guarded(self._open)

    def _open(self) -> None:
        self._raw = open(self.tmp_path, "wb")
        self._out = _HashingFile(self._raw)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.commit()

    def _guarded(self, fn, *args):
        """Run one step of writing; on any failure remove the tmp file, translating a full disk."""
        try:
            return fn(*args)
        except OSError as exc:
            self.abort()
            if _is_disk_full(exc):
                raise _disk_full_error(self.run_dir, self.shard) from exc
            raise
        except BaseException:
            self.abort()
            raise

    def add(self, record: SampleRecord) -> None:
        if self._done:
            raise RuntimeError(f"shard {self.shard} writer is already committed or aborted")
        if record.key in self._keys:
            self.abort()
            raise ValueError(f"duplicate key {record.key!r} in shard {self.shard}")
        if self.count >= MAX_SHARD_SIZE:
            self.abort()
            raise ValueError(f"shard {self.shard} already holds MAX_SHARD_SIZE={MAX_SHARD_SIZE} samples")
        members = self._guarded(record.members)
        self._guarded(self._write_members, members)
        self._keys.add(record.key)
        self.count += 1

    def _write_members(self, members: list[tuple[str, bytes]]) -> None:
        # USTAR: a fixed 512-byte header per member (no pax records with times or owners), the data,
        # zeros to the next block; a sample's members go out in one write.
        parts, offset = [], self._out.nbytes
        for name, payload in members:
            parts += [ustar_header(name, len(payload)), payload, _ZERO_BLOCK[: -len(payload) % tarfile.BLOCKSIZE]]
            self._members.append((name, offset + tarfile.BLOCKSIZE, len(payload)))
            offset += tarfile.BLOCKSIZE + len(payload) + len(parts[-1])
        self._out.write(b"".join(parts))

    def commit(self) -> dict:
        """Finish the tar and its index and make them durable under their final names; returns sha256,
        bytes, count."""
        if self._done:
            raise RuntimeError(f"shard {self.shard} writer is already committed or aborted")
        self._guarded(self._finish)
        self._done = True
        return {"sha256": self._out.sha.hexdigest(), "bytes": self._out.nbytes, "count": self.count}

    def _finish(self) -> None:
        # The end of the archive: two zero blocks, then zeros to a whole record (what tar -b20 writes).
        self._out.write(_ZERO_BLOCK * 2)
        self._out.write(b"\0" * (-self._out.nbytes % tarfile.RECORDSIZE))
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.tmp_path, self.path)
        if self._members:  # an empty shard has no samples to index
            write_bytes_atomic(self.run_dir / index_name(self.shard), dali_index(self._members))
        _fsync_dir(self.run_dir)

    def abort(self) -> None:
        """Drop the shard: close and remove the temporary file. Safe to call more than once."""
        self._done = True
        raw = getattr(self, "_raw", None)
        if raw is not None and not raw.closed:
            try:
                raw.close()
            except OSError:
                pass  # closing flushes; on a full disk that fails too, and the file is deleted anyway
        self.tmp_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# The stats file: the shard's done marker
# ---------------------------------------------------------------------------------------------------


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_stats(run_dir: Path, stats: ShardStats) -> None:
    """Write the shard's stats file: its done marker, so call it only after ShardWriter.commit()."""
    try:
        write_bytes_atomic(stats_path(run_dir, stats.shard), stats.to_bytes())
    except OSError as exc:
        if _is_disk_full(exc):
            raise _disk_full_error(Path(run_dir), stats.shard) from exc
        raise
