"""A run folder on an fsspec URL (s3://, gs://, memory://, file://...).

An object store has neither rename nor locks, so a shard is committed so:

1. the shard is written to a LOCAL staging folder (a temporary folder, or under --staging DIR) by the
   same ShardWriter, with its stats file;
2. the tar is uploaded to its final key `NNNNNN.tar` (see `_upload` for why that is atomic enough);
3. the stats file is uploaded LAST as `NNNNNN.stats.json`: the done marker (runfolder.py's commit rule).

Resume lists the folder once and reads the stats objects in one batched read, so a crash between steps 2
and 3 leaves a shard that resume regenerates.

Concurrency, honestly: there are no claims on a URL. Several processes or machines may write one URL
folder when each owns a disjoint `--shards A:B` range (a SLURM array, one job per machine); each job
cleans up only its own range. Two writers of the SAME shard are not supported. Should it happen anyway,
a committed shard is never rewritten (`publish` re-checks just before uploading), and in the remaining
race both upload identical bytes (a shard is a pure function of the run identity with the same JPEG
encoder), so the last upload leaves the same object. dataset.json is rebuilt from the stats objects by
every run: after all jobs finish, rerun the command once without --shards to aggregate the whole run.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from synthgen.runfolder import SHARD_NAME_RE, SHARD_TMP_RE, RunFolder, check_backend, owned_files
from synthgen.shards import index_name, stats_name, tar_name

# Protocols whose single-object PUT is atomic: readers see the old object or the new one, never a part.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})


def filesystem(url: str):
    """(fsspec file system, root path without the protocol) of a URL run folder."""
    import fsspec

    check_backend(url)
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


class UrlFolder(RunFolder):
    def __init__(self, url: str, staging: Path | None = None) -> None:
        self.location, self.staging_parent = url, staging
        self.fs, self.root = filesystem(url)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.atomic_put = bool(protocols & ATOMIC_PUT_PROTOCOLS)

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def where(self, name: str) -> str:
        return f"{self.location}/{name}"

    def files(self) -> dict[str, int]:
        self.fs.invalidate_cache(self.root)  # other jobs write here too: a cached listing would hide their shards
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
                if e.get("type") == "file"}

    def read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._key(name))
        except FileNotFoundError:
            return None

    def read_many(self, names: list[str]) -> dict[str, bytes | None]:
        # One batched call (concurrent on S3/GCS); a failed read comes back as its exception: not committed.
        raw = self.fs.cat([self._key(n) for n in names], on_error="return")
        return {n: raw.get(self._key(n)) for n in names}

    def size(self, name: str) -> int | None:
        key = self._key(name)
        self.fs.invalidate_cache(key)
        try:
            return self.fs.info(key)["size"]
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        if self.atomic_put:
            self.fs.pipe_file(self._key(name), data)
            return
        tmp = self._key(f"{name}.{uuid.uuid4().hex[:12]}.tmp")
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self._key(name))

    def _upload(self, local: Path, name: str) -> None:
        """Upload one file; readers never see a part of it under its name.

        On S3/GCS/Azure (and memory://) one PUT is atomic: the object appears whole or not at all, and
        re-uploading the same bytes over a committed object changes nothing a reader can see. Elsewhere
        (file://, sftp, hdfs...) the file goes to a unique temporary name first and is renamed.
        """
        if self.atomic_put:
            self.fs.put_file(str(local), self._key(name))
            return
        tmp = self._key(f"{name}.{uuid.uuid4().hex[:12]}.tmp")
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, self._key(name))

    def delete(self, names: list[str]) -> list[str]:
        gone = []
        for name in names:
            try:
                self.fs.rm_file(self._key(name))
            except FileNotFoundError:
                continue
            gone.append(self.where(name))
        return gone

    def create(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    @contextmanager
    def local_copies(self):
        with tempfile.TemporaryDirectory(prefix="synthgen-fetch-") as tmp:

            def fetch(name: str) -> Path:
                dest = Path(tmp) / name
                if dest.is_file():
                    return dest  # asked again for the file just fetched: no second download
                for old in Path(tmp).iterdir():
                    old.unlink()
                self.fs.get_file(self._key(name), str(dest))
                return dest

            yield fetch

    # ---- committing without claims ----
    @contextmanager
    def staging(self):
        """A fresh local folder (under --staging when given), deleted afterwards whatever happened."""
        if self.staging_parent is not None:
            Path(self.staging_parent).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="synthgen-shard-", dir=self.staging_parent))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, staged: Path, shard: int) -> bool:
        """Upload the staged shard: the tar, its DALI index, then its stats object last (the done marker)."""
        if self.is_committed(shard):
            return False
        # A stats object left beside a tar of another size no longer holds: drop it before replacing the tar,
        # so no reader ever pairs an old marker with a new tar.
        self.delete([stats_name(shard)])
        self._upload(staged / tar_name(shard), tar_name(shard))
        if (staged / index_name(shard)).is_file():
            self._upload(staged / index_name(shard), index_name(shard))
        self._upload(staged / stats_name(shard), stats_name(shard))
        return True

    def remove_uncommitted(self, shard_range: tuple[int, int] | None) -> list[str]:
        """Temporaries, and tars without a valid stats object, of the shards in `shard_range` only (a job's
        own --shards range: a job on another range may be uploading right now, and there are no claims to
        ask). Temporaries of other files (dataset.json's) only when the range is None, a run over every shard.
        """
        listing = self.files()
        stray = [n for n in sorted(listing) if shard_range is None and n.endswith(".tmp")
                 and not (SHARD_NAME_RE.match(n) or SHARD_TMP_RE.match(n))]
        for names in self.uncommitted_shard_files(listing, shard_range).values():
            stray += names
        return self.delete(sorted(stray))

    def clear(self) -> None:
        self.delete(list(owned_files(self.files())))
