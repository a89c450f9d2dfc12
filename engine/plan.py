"""The conditioning plan: sample id -> (label, anchors, mix, seed), a pure function of (run seed, id).

Every new sample starts from real embeddings of one class:
  c = (1 - mix) * e[a] + mix * e[b] + lam * N(0, I)
  reuse:       mix = 0, lam = 0        (the embedding again, fresh diffusion noise)
  perturb:     mix = 0, lam = --lam    (c' = c + lambda * N(0, I))
  interpolate: mix ~ U(0, 1), b != a from the SAME class, plus --lam noise if given
The label is the anchors' class. With balance "class" sample ids cycle through the classes in a fixed
seeded order, so every shard is balanced to within one sample per class; with balance "bank" anchors
are drawn uniformly from the bank and classes follow the bank's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from synthgen.errors import UsageError
from synthgen.noise import STREAM_PLAN, sample_seeds, uniform
from synthgen.options import BALANCES, MODES



@dataclass(frozen=True)
class PlanConfig:
    mode: str = "reuse"
    lam: float = 0.0
    balance: str = "class"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.balance not in BALANCES:
            raise UsageError(f"--balance {self.balance!r} is not one of {', '.join(BALANCES)}")
        if not self.lam >= 0:
            raise UsageError(f"--lam must be >= 0, got {self.lam}")
        if self.mode == "perturb" and self.lam == 0:
            raise UsageError("--mode perturb needs --lam > 0 (the std of the noise added to the embedding)")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be in [0, 2^63), got {self.seed}")


@dataclass(frozen=True)
class SamplePlan:
    """One batch of planned samples; every array has length B."""

    sample_ids: np.ndarray  # int64
    seeds: np.ndarray  # int64, per-sample seed of all randomness (noise.py)
    labels: np.ndarray  # int64 class index
    anchor_a: np.ndarray  # int64 bank row
    anchor_b: np.ndarray  # int64 bank row (== anchor_a unless interpolating)
    mix: np.ndarray  # float32 weight of anchor_b


class Planner:
    """Holds the bank's class index once; `plan(ids)` is then a pure, vectorised function of the ids."""

    def __init__(self, labels: np.ndarray, class_names: list[str], config: PlanConfig):
        self.config = config
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) == 0:
            raise UsageError("the embedding bank is empty: embed at least one readable image per class")
        self.rows_by_class = [np.flatnonzero(labels == c) for c in range(len(class_names))]
        self.labels = labels
        need = 2 if config.mode == "interpolate" else 1
        if config.mode == "interpolate":
            lonely = [class_names[c] for c, rows in enumerate(self.rows_by_class) if len(rows) == 1]
            if lonely:
                raise UsageError(
                    f"--mode interpolate mixes two embeddings of the same class, but class(es) "
                    f"{', '.join(map(repr, lonely[:10]))} have a single image; add images or use --mode perturb"
                )
        present = np.array([c for c, rows in enumerate(self.rows_by_class) if len(rows) >= need], dtype=np.int64)
        self.class_order = np.random.default_rng(config.seed).permutation(present)
        # Flat, padded (C, max_rows) table so anchor lookup is one gather for the whole batch.
        width = max(len(r) for r in self.rows_by_class)
        self.table = np.zeros((len(class_names), width), dtype=np.int64)
        self.counts = np.zeros(len(class_names), dtype=np.int64)
        self.slot_of_row = np.zeros(len(labels), dtype=np.int64)  # position of a row within its class
        for c, rows in enumerate(self.rows_by_class):
            self.table[c, : len(rows)] = rows
            self.counts[c] = len(rows)
            self.slot_of_row[rows] = np.arange(len(rows))

    def plan(self, sample_ids: np.ndarray) -> SamplePlan:
        ids = np.asarray(sample_ids, dtype=np.int64)
        seeds = sample_seeds(self.config.seed, ids)
        u = uniform(torch.from_numpy(seeds), STREAM_PLAN, 3).numpy()  # (B, 3) in (0, 1)
        if self.config.balance == "class":
            labels = self.class_order[ids % len(self.class_order)]
            n = self.counts[labels]
            slot_a = np.minimum((u[:, 0] * n).astype(np.int64), n - 1)
            anchor_a = self.table[labels, slot_a]
        else:
            anchor_a = np.minimum((u[:, 0] * len(self.labels)).astype(np.int64), len(self.labels) - 1)
            labels = self.labels[anchor_a]
            n = self.counts[labels]
            slot_a = self.slot_of_row[anchor_a]
        if self.config.mode == "interpolate":
            # Draw among the other n - 1 rows of the class, skipping anchor a.
            slot_b = np.minimum((u[:, 1] * (n - 1)).astype(np.int64), n - 2)
            slot_b = slot_b + (slot_b >= slot_a)
            anchor_b = self.table[labels, slot_b]
            mix = u[:, 2].astype(np.float32)
        else:
            anchor_b = anchor_a
            mix = np.zeros(len(ids), dtype=np.float32)
        return SamplePlan(ids, seeds, labels, anchor_a, anchor_b, mix)
