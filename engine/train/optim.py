"""The learning-rate schedule every trainer here uses."""

from __future__ import annotations

import math

import torch


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int, start: int = 0):
    """Linear warm-up then cosine decay to zero over `total` steps; `start` resumes mid-schedule."""

    def factor(step: int) -> float:
        s = step + start
        return min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
