"""Filtering in conditioning space: keep a generated image when it re-encodes close to its condition.

score = cos(enc(x_hat), c). Two rules, usable together:
  --min-score TAU       keep when score >= TAU
  --keep-top FRACTION   within each group of `group` consecutive candidates of a shard, keep the best
                        FRACTION of them, per class as far as whole quotas allow (see _top_fraction)
Groups are fixed blocks of candidate ids, so decisions never depend on the batch size.
Scores stay on the device; the writer makes the one transfer per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from synthgen.errors import UsageError


@dataclass(frozen=True)
class FilterConfig:
    min_score: float | None = None
    keep_top: float | None = None
    group: int = 100

    def __post_init__(self):
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise UsageError(f"--min-score is a cosine similarity in [-1, 1], got {self.min_score}")
        if self.keep_top is not None and not 0.0 < self.keep_top <= 1.0:
            raise UsageError(f"--keep-top is a fraction in (0, 1], got {self.keep_top}")
        if self.group < 1:
            raise UsageError(f"--keep-top-group must be >= 1, got {self.group}")

    @property
    def active(self) -> bool:
        return self.min_score is not None or self.keep_top is not None

    @property
    def decision_group(self) -> int:
        """How many consecutive candidates one decision needs to see."""
        return self.group if self.keep_top is not None else 1


def cosine_scores(embeddings: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> (B,) float32 cosine similarity, computed in float32."""
    return F.cosine_similarity(embeddings.float(), conditions.float(), dim=1, eps=1e-8)


def accept_group(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, config: FilterConfig) -> np.ndarray:
    """Decide one group: scores (n,) float, labels (n,) int, valid (n,) bool (finite images) -> (n,) bool.

    Invalid candidates are never kept. Ties in keep-top go to the earlier candidate id.
    """
    keep = valid.copy()
    if config.min_score is not None:
        keep &= scores >= config.min_score
    if config.keep_top is not None:
        keep &= _top_fraction(scores, labels, valid, config.keep_top)
    return keep


def _top_fraction(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, fraction: float) -> np.ndarray:
    """Keep round(fraction * n_valid) candidates: each class its best floor(fraction * n_class), then the
    leftover slots to the best remaining candidates of any class. Per class where the group is large
    enough to have quotas, overall where it is not (a group smaller than the class count)."""
    keep = np.zeros(len(scores), dtype=bool)
    order = np.argsort(-scores, kind="stable")  # best first; ties to the earlier candidate
    order = order[valid[order]]
    for label in np.unique(labels[order]):
        members = order[labels[order] == label]
        keep[members[: math.floor(fraction * len(members))]] = True
    leftover = max(0, round(fraction * len(order)) - int(keep.sum()))
    rest = order[~keep[order]]
    keep[rest[:leftover]] = True
    return keep
