"""Run folders on fsspec URLs (s3://, gs://, memory://, file://...) besides local paths.

A local path keeps the protocol of shards.py and runfolder.py: tmp file, fsync, rename, per-shard
`flock` claims. An object store has neither rename nor locks, so a URL run folder commits a shard so:

1. the shard is written to a LOCAL staging folder (a temporary folder, or under --staging DIR) by the
   same ShardWriter, with its stats file;
2. the tar is uploaded to its final key `NNNNNN.tar` (see `_upload` for why that is atomic enough);
3. the stats file is uploaded LAST as `NNNNNN.stats.json`: the done marker.

A shard is committed iff its stats object exists, parses, and its tar object has the size the stats
record (`bytes`); `synthgen verify` also checks the sha256. Resume lists the folder once and reads the
stats objects, so a crash between steps 2 and 3 leaves a shard that resume regenerates.

Concurrency, honestly: there are no claims on a URL. Several processes or machines may write one URL
folder when each owns a disjoint `--shards A:B` range (a SLURM array, one job per machine); each job
cleans up only its own range. Two writers of the SAME shard are not supported. Should it happen anyway,
a committed shard is never rewritten (`publish_shard` re-checks just before uploading), and in the
remaining race both upload identical bytes (a shard is a pure function of the run identity with the same
JPEG encoder), so the last upload leaves the same object. dataset.json is rebuilt from the stats objects
by every run: after all jobs finish, rerun the command once without --shards to aggregate the whole run.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from synthgen.errors import UsageError
from synthgen.shards import completed_shards as local_completed_shards, shard_path, stats_path

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # two letters at least: "C://" is a Windows drive
_SHARD_NAME_RE = re.compile(r"^(\d{6})\.(tar|stats\.json)$")
_SHARD_TMP_RE = re.compile(r"^(\d{6})\..*\.tmp$")
# Protocols whose single-object PUT is atomic: readers see the old object or the new one, never a part.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})


# ---- Where the run folder is -------------------------------------------------------------------------


def is_remote(out) -> bool:
    """True for a URL run folder (any `scheme://`, file:// included); False for a plain local path."""
    return isinstance(out, str) and _URL_RE.match(out) is not None


def normalize_out(out) -> Path | str:
    """A local path as a Path; a URL as a string without trailing '/', its fsspec backend checked."""
    if isinstance(out, Path) or not is_remote(str(out)):
        return Path(out)
    url = str(out).rstrip("/")
    check_backend(url)
    return url


def check_backend(url: str) -> None:
    """A UsageError naming the package to install when the URL's fsspec backend is missing."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        raise UsageError(
            f"{url}: {protocol}:// run folders need the {package} package: pip install {package}"
        ) from exc
    except ValueError as exc:
        raise UsageError(f"{url}: fsspec knows no {protocol}:// file system; use a local path or a URL "
                         "such as s3://bucket/prefix") from exc


def filesystem(url: str):
    """(fsspec file system, root path without the protocol) of a URL run folder."""
    import fsspec

    check_backend(url)
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def join(out, name: str) -> Path | str:
    """The location of `name` in the run folder, for messages and readers."""
    return f"{out}/{name}" if is_remote(out) else Path(out) / name


def _tar_name(shard: int) -> str:
    return shard_path(Path(), shard).name


def _stats_name(shard: int) -> str:
    return stats_path(Path(), shard).name


def _atomic_put(fs) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & ATOMIC_PUT_PROTOCOLS)


# ---- Reading and writing objects ---------------------------------------------------------------------


def list_files(out) -> dict[str, int]:
    """name -> size of the files directly in the run folder ({} when it does not exist)."""
    if not is_remote(out):
        out = Path(out)
        return {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()} if out.is_dir() else {}
    fs, root = filesystem(out)
    fs.invalidate_cache(root)  # other jobs write here too: a cached listing would hide their shards
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
            if e.get("type") == "file"}


def read_bytes(out, name: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    if not is_remote(out):
        path = Path(out) / name
        return path.read_bytes() if path.is_file() else None
    fs, root = filesystem(out)
    try:
        return fs.cat_file(f"{root}/{name}")
    except FileNotFoundError:
        return None


def write_bytes(out: str, name: str, data: bytes) -> None:
    """Write one object of a URL run folder, never leaving a partial one under its name."""
    fs, root = filesystem(out)
    if _atomic_put(fs):
        fs.pipe_file(f"{root}/{name}", data)
        return
    tmp = f"{root}/{name}.{uuid.uuid4().hex[:12]}.tmp"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, f"{root}/{name}")


def _upload(fs, local: Path, key: str) -> None:
    """Upload one file to `key`; readers never see a part of it under that name.

    On S3/GCS/Azure (and memory://) one PUT is atomic: the object appears whole or not at all, and
    re-uploading the same bytes over a committed object changes nothing a reader can see. Elsewhere
    (file://, sftp, hdfs...) the file goes to a unique temporary name first and is renamed.
    """
    if _atomic_put(fs):
        fs.put_file(str(local), key)
        return
    tmp = f"{key}.{uuid.uuid4().hex[:12]}.tmp"
    fs.put_file(str(local), tmp)
    fs.mv(tmp, key)


def remove(out: str, names: list[str]) -> list[str]:
    """Delete these objects of a URL run folder (missing ones are skipped); returns their URLs."""
    fs, root = filesystem(out)
    gone = []
    for name in names:
        try:
            fs.rm_file(f"{root}/{name}")
        except FileNotFoundError:
            continue
        gone.append(f"{out}/{name}")
    return gone


def makedirs(out: str) -> None:
    fs, root = filesystem(out)
    fs.makedirs(root, exist_ok=True)


# ---- Committed shards ----------------------------------------------------------------------------------


def committed_stats(out: str, shard_range: tuple[int, int] | None = None,
                    listing: dict[str, int] | None = None) -> dict[int, dict]:
    """shard -> stats of every committed shard of a URL run folder (in [start, stop) when given).

    One listing, then the stats objects in one batched read (concurrent on S3/GCS). Committed: the stats
    object parses as a JSON object and the tar object's size equals its `bytes`.
    """
    listing = list_files(out) if listing is None else listing
    start, stop = shard_range or (0, 2**63)
    names = {}
    for name in listing:
        m = _SHARD_NAME_RE.match(name)
        if m and m.group(2) == "stats.json" and start <= int(m.group(1)) < stop:
            names[int(m.group(1))] = name
    if not names:
        return {}
    fs, root = filesystem(out)
    raw = fs.cat([f"{root}/{n}" for n in names.values()], on_error="return")
    done = {}
    for shard, name in names.items():
        stats = _parse_stats(raw.get(f"{root}/{name}"))
        if stats is not None and listing.get(_tar_name(shard)) == stats.get("bytes"):
            done[shard] = stats
    return done


def _parse_stats(data) -> dict | None:
    if not isinstance(data, bytes):
        return None  # the read failed (the exception is the value): not committed
    try:
        stats = json.loads(data)
    except ValueError:
        return None
    return stats if isinstance(stats, dict) else None


def completed_shards(out) -> set[int]:
    """Committed shards: stats files and tars present (local), or `committed_stats` (URL)."""
    if not is_remote(out):
        return local_completed_shards(Path(out))
    return set(committed_stats(out))


def is_committed(out: str, shard: int) -> bool:
    """The commit rule of `committed_stats` for one shard, from its two objects (no listing)."""
    stats = _parse_stats(read_bytes(out, _stats_name(shard)))
    if stats is None:
        return False
    fs, root = filesystem(out)
    tar = f"{root}/{_tar_name(shard)}"
    fs.invalidate_cache(tar)
    try:
        return fs.info(tar)["size"] == stats.get("bytes")
    except FileNotFoundError:
        return False


def remove_uncommitted(out: str, shard_range: tuple[int, int] | None) -> list[str]:
    """Delete what was never committed in a URL run folder; returns the URLs removed.

    Temporary objects, and tars without a valid stats object, of the shards in `shard_range` only (a
    job's own --shards range: a job on another range may be uploading right now, and there are no
    claims to ask). Temporary objects of other files (dataset.json's) only when the range is None, a
    run over every shard.
    """
    start, stop = shard_range or (0, 2**63)
    listing = list_files(out)
    done = committed_stats(out, shard_range, listing)
    stray = []
    for name in sorted(listing):
        m = _SHARD_NAME_RE.match(name) or _SHARD_TMP_RE.match(name)
        if m is None:
            if name.endswith(".tmp") and shard_range is None:
                stray.append(name)
        elif start <= int(m.group(1)) < stop and (name.endswith(".tmp") or
                                                  (name.endswith(".tar") and int(m.group(1)) not in done)):
            stray.append(name)
    return remove(out, stray)


def clear_run(out: str, dataset_json: str) -> None:
    """--overwrite on a URL run folder: delete synthgen's own objects (shards, stats, temporaries)."""
    names = [n for n in list_files(out)
             if _SHARD_NAME_RE.match(n) or n.endswith(".tmp") or n == dataset_json]
    remove(out, names)


# ---- Staging and publishing one shard --------------------------------------------------------------


@contextmanager
def shard_staging(out, staging: Path | None):
    """The local folder a shard is written in: the run folder itself when local, else a fresh temporary
    folder (under `staging` when given) that is deleted afterwards, whatever happened."""
    if not is_remote(out):
        yield Path(out)
        return
    if staging is not None:
        Path(staging).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="synthgen-shard-", dir=staging))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_shard(out: str, staged: Path, shard: int) -> bool:
    """Upload a staged, committed shard: the tar, then its stats object last (the done marker).

    False (nothing uploaded) when the shard is committed already: another writer got there first, and a
    committed shard is never rewritten.
    """
    tar, stats = _tar_name(shard), _stats_name(shard)
    if is_committed(out, shard):
        return False
    fs, root = filesystem(out)
    # A stats object left beside a tar of another size no longer holds: drop it before replacing the tar,
    # so no reader ever pairs an old marker with a new tar.
    remove(out, [stats])
    _upload(fs, staged / tar, f"{root}/{tar}")
    _upload(fs, staged / stats, f"{root}/{stats}")
    return True


@contextmanager
def local_copies(out):
    """A function name -> local Path of that run-folder file: the file itself for a local folder; for a
    URL, a download into a temporary folder that holds one file at a time (shards can be large)."""
    if not is_remote(out):
        yield lambda name: Path(out) / name
        return
    fs, root = filesystem(out)
    with tempfile.TemporaryDirectory(prefix="synthgen-fetch-") as tmp:

        def fetch(name: str) -> Path:
            for old in Path(tmp).iterdir():
                old.unlink()
            dest = Path(tmp) / name
            fs.get_file(f"{root}/{name}", str(dest))
            return dest

        yield fetch
