"""The records a run folder keeps: each shard's `NNNNNN.stats.json` and the run's `dataset.json`, typed.

One (de)serialiser each. `ShardStats.to_dict` writes the keys stats files have always had, so files written
before these types read back the same, and missing later keys (older synthgen) take their defaults.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field

# Failure and bookkeeping counters of a shard, each a counted key.
COUNTERS = ("count", "candidates", "rejected", "nonfinite", "retried", "surplus", "unused")
# The counters dataset.json totals (plus the samples, `count`).
RUN_FORMAT = "synthgen-run/1"
SUMMED = ("target", "candidates", "rejected", "nonfinite", "retried", "surplus", "oom_backoffs")


def json_bytes(obj) -> bytes:
    """JSON as every run-folder file is written: sorted keys, indent 1, no NaN, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=1, allow_nan=False) + "\n").encode("utf-8")


def _known_fields(cls, d: dict):
    """Tolerant of keys older or newer synthgen wrote: unknown keys are ignored, missing ones defaulted."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ShardStats:
    """What generating one shard did; written last, as the shard's done marker."""

    shard: int
    target: int  # images the shard holds when complete
    count: int = 0  # images written
    candidates: int = 0  # candidates judged
    rejected: int = 0  # by the filter (or non-finite)
    nonfinite: int = 0  # NaN/Inf images after the higher-precision retry
    retried: int = 0  # candidates retried in higher precision
    surplus: int = 0  # accepted past the shard's target in the last group
    unused: int = 0  # computed but never judged (the shard filled up first)
    exhausted: bool = False  # the candidate budget ran out before the target
    first_candidate_id: int = 0
    per_class: dict = field(default_factory=dict)  # str(label) -> images
    sha256: str = ""  # of the tar
    bytes: int = 0  # of the tar: the commit rule compares it with the tar's size
    seconds: float = 0.0
    image_encoder: str = ""
    oom_backoffs: int = 0
    batch_sizes: dict = field(default_factory=dict)  # stage -> working chunk size at the end
    configured_batch_sizes: dict = field(default_factory=dict)  # stage -> the size asked for
    device: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardStats:
        return _known_fields(cls, d)

    def to_bytes(self) -> bytes:
        return json_bytes(self.to_dict())


def parse_stats(data: bytes | None) -> ShardStats | None:
    """The stats a file holds, or None when it is missing or damaged (then the shard is not committed)."""
    if not isinstance(data, bytes):
        return None
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("shard"), int):
        return None
    try:
        return ShardStats.from_dict(raw)
    except TypeError:
        return None


@dataclass
class RunDoc:
    """dataset.json: the run's identity (what decides its images) and what its committed shards hold."""

    identity: dict
    config: dict = field(default_factory=dict)  # every option, for the record
    versions: dict = field(default_factory=dict)
    pack_hash: str = ""
    bank_hash: str = ""
    class_names: list = field(default_factory=list)
    random_weights: bool = False
    image_size: int = 0
    shards: dict = field(default_factory=dict)  # str(shard) -> ShardStats as a dict
    num_shards: int = 0
    per_class_counts: dict = field(default_factory=dict)
    totals: dict = field(default_factory=dict)
    complete: bool = False
    format: str = RUN_FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunDoc:
        return _known_fields(cls, d)

    def aggregate(self, committed: dict[int, ShardStats], num_shards: int, n: int) -> None:
        """Fill shards, per-class counts and totals from the committed shards' stats (the truth)."""
        per_class, totals = Counter(), Counter()
        self.shards = {str(k): s.to_dict() for k, s in sorted(committed.items())}
        for s in committed.values():
            for label, count in s.per_class.items():
                per_class[self.class_names[int(label)]] += count
            totals["count"] += s.count
            for key in SUMMED:
                totals[key] += getattr(s, key)
        self.num_shards = num_shards
        self.per_class_counts = {name: per_class.get(name, 0) for name in self.class_names}
        self.totals = {"samples": totals["count"], **{k: totals[k] for k in SUMMED}, "shards_done": len(committed)}
        self.complete = len(committed) == num_shards and totals["count"] == n
