"""Reader indexes of a run folder, so every reader opens it without a preparation step:

- `NNNNNN.idx` beside each tar: the index DALI's `fn.readers.webdataset(index_paths=...)` takes (the
  format of DALI's `wds2idx`, v1.2): a header `v1.2 <samples>`, then one line per sample with
  `<ext> <data offset> <size> <member name>` for each of its members, in tar order. Without it DALI scans
  every tar at start-up.
- `wids-index.json` for the folder (`wids-shard-index-v1`): each committed shard's URL, relative to the
  index, with its sample count, for `wids.ShardListDataset`'s random access.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

DALI_INDEX_VERSION = "v1.2"
WIDS_INDEX = "wids-index.json"
WIDS_KIND = "wids-shard-index-v1"


def _split(name: str) -> tuple[str, str]:
    """(sample key, extension): the key is everything before the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def dali_index(members: list[tuple[str, int, int]]) -> bytes:
    """members: (member name, offset of its data in the tar, size) in tar order -> the .idx file's bytes."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    for name, offset, size in members:
        key, ext = _split(name)
        if not key or key.endswith("/"):
            continue  # hidden files and folder entries are not samples
        if key != last:
            samples.append([])
            last = key
        samples[-1].append((ext, offset, size, name))
    if not samples:
        raise ValueError("a DALI index needs at least one sample")
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in s) for s in samples]
    return ("\n".join(lines) + "\n").encode("utf-8")


def tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of a tar, from its headers. Raises tarfile.TarError
    or OSError on a damaged or unreadable tar."""
    with tarfile.open(path, mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]


def parse_dali_index(data: bytes) -> list[list[tuple[str, int, int, str]]]:
    """The samples of an .idx file: per sample [(ext, offset, size, name)]. Raises ValueError when it is
    not a v1.2 index or its header's count does not match its lines."""
    lines = data.decode("utf-8").splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"not a {DALI_INDEX_VERSION} DALI index (header {lines[0][:40] if lines else ''!r})")
    samples = []
    for line in lines[1:]:
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"malformed index line {line[:60]!r}")
        samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                        for i in range(0, len(fields), 4)])
    if len(samples) != int(head[1]):
        raise ValueError(f"the header says {head[1]} samples, the index lists {len(samples)}")
    return samples


def wids_index(shards: list[tuple[str, int, int]], name: str) -> dict:
    """shards: (URL relative to the index, samples, bytes) in order -> the wids shard index document."""
    return {
        "__kind__": WIDS_KIND, "wids_version": 1, "name": name,
        "shardlist": [{"url": url, "nsamples": n, "filesize": size} for url, n, size in shards],
    }
