"""The study's real images: the fixed splits, each regime's labelled images, and their banks.

    builtin:NAME:train ─┬─ holdout (stratified `fraction`): early stopping of every classifier, nothing else
                        └─ pool ── the regime's labelled images: all of the pool, or k per class (seeded)
    builtin:NAME:test ──── scored once per classifier; no model, bank, filter or choice ever sees it

The labelled images of a regime are written once as a class-folder source (`OUT/data/REGIME`), so the
class-conditioned baseline trains through the same `train denoiser` path a user would take, and the
folder shows exactly which images carried labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthgen.bank import load_bank, write_bank
from synthgen.errors import UsageError
from synthgen.study.protocol import Regime
from synthgen.train.data import ImageSet, load_images, per_class_subset, stratified_holdout


@dataclass
class StudySplits:
    pool: ImageSet  # the train split less the holdout: where labelled images come from
    holdout: ImageSet  # the validation split every classifier stops on
    test: ImageSet  # the held-out real test split


def load_splits(dataset: str, size: int, holdout: float, seed: int) -> StudySplits:
    """The splits of builtin:DATASET at `size` px (uint8, square, antialiased)."""
    pool, held = stratified_holdout(load_images(f"builtin:{dataset}:train", size), holdout, seed)
    return StudySplits(pool, held, load_images(f"builtin:{dataset}:test", size))


def labelled_images(splits: StudySplits, regime: Regime, seed: int) -> ImageSet:
    """The regime's labelled real images: the whole pool, or `shots` per class drawn with `seed`."""
    if regime.shots is None:
        return splits.pool
    return per_class_subset(splits.pool, regime.shots, seed)


def write_class_folder(data: ImageSet, root: Path) -> Path:
    """`data` as ROOT/CLASS/KEY.png (lossless), written once; returns ROOT."""
    from PIL import Image

    if (root / ".complete").is_file():
        return root
    for image, label, key in zip(data.images, data.labels.tolist(), data.keys):
        folder = root / data.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{key}.png")
    (root / ".complete").write_text(f"{len(data)}\n")
    return root


def bank_rows(source_bank: Path, keys: list[str], out: Path) -> Path:
    """A bank of the rows of `source_bank` named by `keys`, in that order (the regime's labelled images)."""
    if (out / "bank.json").is_file():
        return out
    bank = load_bank(source_bank)
    row = {k: i for i, k in enumerate(bank.keys)}
    missing = [k for k in keys if k not in row]
    if missing:
        raise UsageError(f"the bank {source_bank} lacks {len(missing)} of the study's images (e.g. {missing[0]}); "
                         "it must embed the whole train split: rebuild it with 'synthgen embed'")
    rows = [row[k] for k in keys]
    write_bank(out, bank.embeddings[rows].float(), [int(bank.labels[r]) for r in rows], keys, bank.class_names,
               bank.meta["encoder_id"], source=f"{source_bank} ({len(keys)} labelled rows of the study)")
    return out


def perturb_scale(bank_path: Path, fraction: float) -> float:
    """lambda for --mode perturb: the noise's expected norm (lambda * sqrt(D)) is `fraction` of the median
    distance from an embedding to its nearest neighbour in the bank, so a perturbed condition stays near
    the data whatever the encoder's scale (the bank of every train image: no labels involved)."""
    import torch

    e = load_bank(bank_path).embeddings.float()
    d = torch.cdist(e, e)
    d.fill_diagonal_(float("inf"))
    return float(fraction * d.min(dim=1).values.median() / np.sqrt(e.shape[1]))
