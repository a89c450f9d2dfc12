"""The run folder, as one interface over its two kinds: a local folder (localfolder.py) and an fsspec URL
(urlfolder.py). Which one is chosen once, by `runstate.open_run_folder`; nothing else branches on it.

A run folder holds `dataset.json`, each shard's `NNNNNN.tar` and its `NNNNNN.stats.json`. One commit rule
holds for both kinds: a shard is committed iff its stats file parses and its tar has the size the stats
record (`bytes`). The stats file is written last, so a crash at any point leaves a shard that is either
committed whole or redone by the next run (`synthgen verify` also checks the sha256).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from synthgen.errors import UsageError
from synthgen.indexes import WIDS_INDEX
from synthgen.shards import stats_name, tar_name
from synthgen.stats import ShardStats, parse_stats

DATASET_JSON = "dataset.json"
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # two letters at least: "C://" is a Windows drive
SHARD_NAME_RE = re.compile(r"^(\d{6})\.(tar|idx|stats\.json)$")
# Written at run end from the committed shards (runstate.py, card.py): rebuilt by every run.
CARD, PREVIEW = "README.md", "preview.png"  # card.py
RUN_FILES = (DATASET_JSON, WIDS_INDEX, CARD, PREVIEW)
SHARD_TMP_RE = re.compile(r"^(\d{6})\..*\.tmp$")
ALL_SHARDS = (0, 2**63)


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
        raise UsageError(f"{url}: {protocol}:// run folders need the {package} package: pip install {package}") from exc
    except ValueError as exc:
        raise UsageError(f"{url}: fsspec knows no {protocol}:// file system; use a local path or a URL "
                         "such as s3://bucket/prefix") from exc


class NoClaim:
    """The claim of a folder kind without claims (a URL): always granted, nothing to release."""

    def release(self) -> None:
        pass

    def __enter__(self) -> NoClaim:
        return self

    def __exit__(self, *exc) -> None:
        pass


class RunFolder(ABC):
    """What the run needs of a folder. Subclasses provide the file primitives and the concurrency story
    (claims, the folder lock, staging and publishing a shard); the commit rule lives here, once."""

    location: Path | str

    # ---- file primitives ----
    @abstractmethod
    def where(self, name: str) -> Path | str:
        """The location of `name`, for messages."""
        ...

    @abstractmethod
    def files(self) -> dict[str, int]:
        """name -> size of the files directly in the folder ({} when it does not exist)."""
        ...

    @abstractmethod
    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        ...

    def read_many(self, names: list[str]) -> dict[str, bytes | None]:
        return {name: self.read(name) for name in names}

    @abstractmethod
    def size(self, name: str) -> int | None:
        ...

    @abstractmethod
    def write(self, name: str, data: bytes) -> None:
        """Write one file whole; readers never see a part of it under its name."""
        ...

    @abstractmethod
    def delete(self, names: list[str]) -> list:
        """Delete these files (missing ones skipped); returns the locations removed."""
        ...

    @abstractmethod
    def create(self) -> None:
        ...

    @abstractmethod
    def local_copies(self) -> AbstractContextManager[Callable[[str], Path]]:
        """A function name -> local path of that file, valid until the next call (shards can be large)."""
        ...

    # ---- concurrency ----
    def folder_lock(self) -> AbstractContextManager:
        """Serialises folder-wide steps (reopen, cleanup, aggregation) between processes."""
        return nullcontext()

    def claim(self, shard: int, block: bool = False):
        """An exclusive claim on writing `shard` (a context manager), or None when another live process
        holds it (block=True waits instead)."""
        return NoClaim()

    def held_shards(self) -> list[int]:
        return []

    @abstractmethod
    def staging(self) -> AbstractContextManager[Path]:
        """The local folder a shard is written in before `publish`."""
        ...

    @abstractmethod
    def publish(self, staged: Path, shard: int) -> bool:
        """Make a staged, committed shard visible; False (nothing changed) when it is committed already."""
        ...

    @abstractmethod
    def remove_uncommitted(self, shard_range: tuple[int, int] | None) -> list:
        """Delete what was never committed and nobody is writing; returns the locations removed."""
        ...

    @abstractmethod
    def clear(self) -> None:
        """--overwrite: delete synthgen's own files (shards, stats, temporaries, dataset.json)."""
        ...

    # ---- the commit rule ----
    def committed(self, shard_range: tuple[int, int] | None = None,
                  listing: dict[str, int] | None = None) -> dict[int, ShardStats]:
        """shard -> stats of every committed shard (in [start, stop) when given): one listing, one batched
        read of the stats files."""
        listing = self.files() if listing is None else listing
        start, stop = shard_range or ALL_SHARDS
        names = {}
        for name in listing:
            m = SHARD_NAME_RE.match(name)
            if m and m.group(2) == "stats.json" and start <= int(m.group(1)) < stop:
                names[int(m.group(1))] = name
        raw = self.read_many(list(names.values())) if names else {}
        done = {}
        for shard, name in sorted(names.items()):
            stats = parse_stats(raw.get(name))
            if stats is not None and stats.shard == shard and listing.get(tar_name(shard)) == stats.bytes:
                done[shard] = stats
        return done

    def is_committed(self, shard: int) -> bool:
        """The commit rule for one shard, from its two files (no listing)."""
        stats = parse_stats(self.read(stats_name(shard)))
        return stats is not None and stats.shard == shard and self.size(tar_name(shard)) == stats.bytes

    def uncommitted_shard_files(self, listing: dict[str, int], shard_range: tuple[int, int] | None,
                                ) -> dict[int, list[str]]:
        """shard -> its files that no commit covers: temporaries, and the tar and DALI index of a shard that
        is not committed."""
        start, stop = shard_range or ALL_SHARDS
        done = self.committed(shard_range, listing)
        stray: dict[int, list[str]] = {}
        for name in sorted(listing):
            m = SHARD_NAME_RE.match(name) or SHARD_TMP_RE.match(name)
            if m is None or not start <= int(m.group(1)) < stop:
                continue
            shard = int(m.group(1))
            if name.endswith(".tmp") or (name.endswith((".tar", ".idx")) and shard not in done):
                stray.setdefault(shard, []).append(name)
        return stray


def owned_files(names) -> Iterator[str]:
    """The names synthgen owns among `names`: shards, their indexes and stats, temporaries, the run files."""
    return (n for n in names if SHARD_NAME_RE.match(n) or n.endswith(".tmp") or n in RUN_FILES)
