"""WebDataset shard writer and the run folder's file protocol.

A run folder holds `NNNNNN.tar` shards, one `NNNNNN.stats.json` per shard and `dataset.json`. The
protocol (DESIGN.md, "Contracts"; STYLE.md 11) makes a crash at any point harmless:

1. the tar is written as `NNNNNN.tar.tmp`, flushed, fsynced and renamed to `NNNNNN.tar`;
2. the stats file is written last, atomically: it is the shard's "done" marker.

Resume trusts only stats files (`completed_shards`); a `.tmp` file, or a `.tar` without a stats file,
was never committed and `remove_stray_tmp` deletes it.

Tar headers carry no time, owner or mode of the writing machine, so the same samples always give a
byte-identical tar and its sha256 (kept in the stats file) doubles as a reproducibility check.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthgen.errors import UsageError

try:  # optional: a faster JPEG encoder than Pillow (same libjpeg-turbo, less overhead per image)
    import simplejpeg

    HAS_SIMPLEJPEG = True
except ImportError:
    simplejpeg = None
    HAS_SIMPLEJPEG = False

MAX_SHARD_SIZE = 100_000  # samples per shard: the key has five digits for the index
MAX_SHARDS = 1_000_000  # the key has six digits for the shard
IMAGE_EXTS = ("jpg", "webp", "png")
IMAGE_ENCODERS = ("auto", "simplejpeg", "pillow", "nvjpeg")

# Errors that mean "the disk (or quota, or file size limit) is full": the user can fix them and rerun.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_STATS_RE = re.compile(r"^(\d{6})\.stats\.json$")
_TAR_RE = re.compile(r"^(\d{6})\.tar$")


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


def shard_path(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / f"{shard:06d}.tar"


def stats_path(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / f"{shard:06d}.stats.json"


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


def resolve_image_encoder(name: str, fmt: str, device: torch.device | str = "cpu") -> str:
    """The JPEG encoder a run uses: "nvjpeg" | "simplejpeg" | "pillow" ("pillow" for WebP and PNG).

    auto: nvJPEG when the run is on a CUDA device and torchvision can encode there (checked with one
    tiny encode), else simplejpeg when installed (libjpeg-turbo without Pillow's per-image overhead,
    ~3x faster on small images), else Pillow. Asking for one that cannot run here is a UsageError.
    """
    if name not in IMAGE_ENCODERS:
        raise UsageError(f"--image-encoder {name!r} is not one of {', '.join(IMAGE_ENCODERS)}")
    if fmt != "jpg":
        return "pillow"
    device = torch.device(device)
    if name == "auto":
        return "nvjpeg" if nvjpeg_available(device) else "simplejpeg" if HAS_SIMPLEJPEG else "pillow"
    if name == "simplejpeg" and not HAS_SIMPLEJPEG:
        raise UsageError("--image-encoder simplejpeg: simplejpeg is not installed (pip install simplejpeg)")
    if name == "nvjpeg" and not nvjpeg_available(device):
        raise UsageError(
            f"--image-encoder nvjpeg needs a CUDA device and a torchvision built with nvJPEG (device is "
            f"{device}); use --image-encoder auto"
        )
    return name


def nvjpeg_available(device: torch.device) -> bool:
    """Capability check: can torchvision encode JPEG on this CUDA device? (one 8x8 encode, then cached)"""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    key = str(device)
    if key not in _NVJPEG_OK:
        try:
            blobs = encode_jpeg_cuda(torch.zeros(1, 8, 8, 3, dtype=torch.uint8, device=device), 90)
            _NVJPEG_OK[key] = len(blobs) == 1 and blobs[0][:2] == b"\xff\xd8"
        except (ImportError, RuntimeError, TypeError, ValueError):
            _NVJPEG_OK[key] = False  # an old torchvision, or one built without nvJPEG: fall back to the CPU
    return _NVJPEG_OK[key]


_NVJPEG_OK: dict[str, bool] = {}


def encode_jpeg_cuda(images: torch.Tensor, quality: int) -> list[bytes]:
    """(n, H, W, 3) uint8 CUDA tensor -> n JPEG files, encoded by nvJPEG in one batched call."""
    import warnings

    from torchvision.io import encode_jpeg

    chw = [img.permute(2, 0, 1).contiguous() for img in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 flags its codecs as deprecated in favour of torchcodec
        out = encode_jpeg(chw, quality=quality)
    return [bytes(t.cpu().numpy().tobytes()) for t in out]


def encode_image(pixels: np.ndarray, fmt: str, quality: int, encoder: str = "auto") -> bytes:
    """(H, W, 3) uint8 -> encoded bytes; the same pixels, settings and encoder always give the same bytes.

    jpg: baseline, 4:2:0 chroma, accurate DCT, no optimize pass, by simplejpeg or Pillow (`encoder`
    "auto" | "simplejpeg" | "pillow"; both are libjpeg-turbo with the same settings, but their bytes
    differ); webp: lossy at `quality`; png: lossless, `quality` ignored.
    """
    if fmt not in IMAGE_EXTS:
        raise ValueError(f"format must be one of {IMAGE_EXTS}, got {fmt!r}")
    if fmt != "png" and not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100] for {fmt}, got {quality}")
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be an (H, W, 3) uint8 array, got {pixels.dtype} {pixels.shape}")
    pixels = np.ascontiguousarray(pixels)
    if fmt == "jpg" and encoder in ("auto", "simplejpeg") and HAS_SIMPLEJPEG:
        # 4:2:0 and the accurate DCT: Pillow's defaults, so switching encoders keeps size and quality.
        return simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB", colorsubsampling="420",
                                      fastdct=False)
    if encoder == "simplejpeg":
        raise UsageError("simplejpeg is not installed (pip install simplejpeg)")
    img = Image.fromarray(pixels, mode="RGB")
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, lossless=False, method=4)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=6)
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


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardWriter:
    """Writes NNNNNN.tar.tmp, then commit(): flush, fsync, rename to NNNNNN.tar, fsync the directory.

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
        self._keys: set[str] = set()
        self._done = False
        self._guarded(self._open)

    def _open(self) -> None:
        self._raw = open(self.tmp_path, "wb")
        self._out = _HashingFile(self._raw)
        # USTAR: fixed 512-byte headers, no pax records with times or owners.
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.USTAR_FORMAT)

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
        for name, payload in members:
            self._tar.addfile(_tar_info(name, len(payload)), io.BytesIO(payload))

    def commit(self) -> dict:
        """Finish the tar and make it durable under its final name; returns sha256, bytes, count."""
        if self._done:
            raise RuntimeError(f"shard {self.shard} writer is already committed or aborted")
        self._guarded(self._finish)
        self._done = True
        return {"sha256": self._out.sha.hexdigest(), "bytes": self._out.nbytes, "count": self.count}

    def _finish(self) -> None:
        self._tar.close()  # end-of-archive blocks and record padding
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.tmp_path, self.path)
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
# Stats files and resume
# ---------------------------------------------------------------------------------------------------


def json_bytes(obj) -> bytes:
    """JSON as every run-folder file is written: sorted keys, indent 1, no NaN, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=1, allow_nan=False) + "\n").encode("utf-8")


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON (`json_bytes`) to a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        data = json_bytes(obj)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_stats(run_dir: Path, shard: int, stats: dict) -> None:
    """Write the shard's stats file: its "done" marker, so call it only after ShardWriter.commit()."""
    try:
        write_json_atomic(stats_path(run_dir, shard), stats)
    except OSError as exc:
        if _is_disk_full(exc):
            raise _disk_full_error(Path(run_dir), shard) from exc
        raise


def read_stats(run_dir: Path, shard: int) -> dict | None:
    """The shard's stats, or None when it has no stats file (not committed)."""
    path = stats_path(run_dir, shard)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _damaged_stats(path, shard, str(e)) from e
    if not isinstance(stats, dict):
        raise _damaged_stats(path, shard, "not a JSON object")
    return stats


def _damaged_stats(path: Path, shard: int, why: str) -> UsageError:
    # Deleting the done marker makes the shard uncommitted, and resume generates it again.
    return UsageError(f"{path} is damaged ({why}): delete it and rerun the same command to generate shard "
                      f"{shard} again")


def completed_shards(run_dir: Path) -> set[int]:
    """Shards whose stats file AND tar exist: the ones resume skips."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return set()
    done = set()
    for p in run_dir.iterdir():
        m = _STATS_RE.match(p.name)
        if m and shard_path(run_dir, int(m.group(1))).is_file():
            done.add(int(m.group(1)))
    return done


def remove_stray_tmp(run_dir: Path) -> list[Path]:
    """Delete what was never committed: `*.tmp` files and `NNNNNN.tar` files without a stats file.

    Call it before workers start: it would delete the temporary file of a shard being written now.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for p in sorted(run_dir.iterdir()):
        m = _TAR_RE.match(p.name)
        stray_tar = m is not None and not stats_path(run_dir, int(m.group(1))).exists()
        if p.is_file() and (p.name.endswith(".tmp") or stray_tar):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
