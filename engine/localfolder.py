"""A run folder on a local (or shared POSIX) file system: atomic renames and `flock` claims.

Several processes (or Ray actors, or SLURM jobs) may work on one folder at once. A shard is claimed
before it is written: `NNNNNN.lock` is held with an exclusive flock for as long as the shard is open, and
removed after its stats file is written (locks.py says why a dead holder's file is free again).
`.run.lock` serialises the short folder-wide steps (reopen, cleanup, aggregation). A shard is written in
place: the tar to `NNNNNN.tar.tmp`, fsync, rename; then its stats file the same way (shards.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from synthgen import locks
from synthgen.errors import UsageError
from synthgen.runfolder import SHARD_TMP_RE, RunFolder, owned_files
from synthgen.shards import write_bytes_atomic

RUN_LOCK = ".run.lock"


def lock_path(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / f"{shard:06d}.lock"


class LocalFolder(RunFolder):
    def __init__(self, path: Path) -> None:
        self.location = Path(path)

    def where(self, name: str) -> Path:
        return self.location / name

    def files(self) -> dict[str, int]:
        if not self.location.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in self.location.iterdir() if p.is_file()}

    def read(self, name: str) -> bytes | None:
        path = self.location / name
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def size(self, name: str) -> int | None:
        path = self.location / name
        return path.stat().st_size if path.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        write_bytes_atomic(self.location / name, data)

    def delete(self, names: list[str]) -> list[Path]:
        gone = []
        for name in names:
            path = self.location / name
            if path.is_file():
                path.unlink(missing_ok=True)
                gone.append(path)
        return gone

    def create(self) -> None:
        if self.location.exists() and not self.location.is_dir():
            raise UsageError(f"--out {self.location} is a file, not a folder: choose a folder path (it is created "
                             "when missing)")
        try:
            self.location.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise UsageError(f"--out {self.location}: a part of the path is a file ({exc.filename}); choose a "
                             "folder path") from exc

    @contextmanager
    def local_copies(self):
        yield lambda name: self.location / name

    # ---- concurrency ----
    def folder_lock(self):
        return locks.held(self.location / RUN_LOCK)

    def claim(self, shard: int, block: bool = False) -> locks.FileLock | None:
        return locks.acquire(lock_path(self.location, shard), block=block)

    def lock_holder(self, shard: int) -> str:
        return locks.holder(lock_path(self.location, shard))

    def held_shards(self) -> list[int]:
        """Shards whose lock a live process holds right now (stale lock files are removed on the way)."""
        held = []
        for name in sorted(self.files()):
            if name.endswith(".lock") and name[:6].isdigit() and len(name) == len("000000.lock"):
                claim = self.claim(int(name[:6]))
                if claim is None:
                    held.append(int(name[:6]))
                else:
                    claim.release()
        return held

    @contextmanager
    def staging(self):
        yield self.location  # written in place: ShardWriter's rename is the commit

    def publish(self, staged: Path, shard: int) -> bool:
        return True

    def remove_uncommitted(self, shard_range: tuple[int, int] | None = None) -> list[Path]:
        """Every shard, whatever `shard_range` (claims make that safe here). Per shard: temporaries, an
        uncommitted tar and a stale lock file -- only when the shard's claim can be taken, so the open shard
        of another live process is left alone. Other `*.tmp` files (dataset.json's) are written under the
        run lock, which the caller holds."""
        listing = self.files()
        removed = self.delete([n for n in listing if n.endswith(".tmp") and not SHARD_TMP_RE.match(n)])
        stray = self.uncommitted_shard_files(listing, None)
        for name in listing:
            if name.endswith(".lock") and name[:6].isdigit():
                stray.setdefault(int(name[:6]), [])
        for shard in sorted(stray):
            claim = self.claim(shard)
            if claim is None:
                continue  # another live process is writing this shard
            with claim:  # releasing removes the (possibly stale) lock file too
                again = self.uncommitted_shard_files(self.files(), (shard, shard + 1)).get(shard, [])
                removed += self.delete(again)
        return removed

    def clear(self) -> None:
        held = self.held_shards()
        if held:
            raise UsageError(
                f"--overwrite would delete shards another generate process is writing in {self.location} "
                f"(shard {held[0]} is held by {self.lock_holder(held[0])}); stop it first, or drop "
                "--overwrite to join it"
            )
        # Lock files stay: held_shards already removed the stale ones, and deleting a held one would let a
        # second writer in.
        self.delete(list(owned_files(self.files())))
