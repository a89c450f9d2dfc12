"""The embedding bank: real images encoded once by the pack's encoder.

```
BANK/
  embeddings.safetensors   "embeddings" (N, D) float16, "labels" (N,) int64
  bank.json                class names, keys, encoder identity, source, per-class counts, skipped inputs
```
An unreadable input never stops `embed`: it is skipped, counted and listed in bank.json.
Images are decoded and resized (the first step of the encoder's recipe) by a `synthgen.decode` decoder:
DALI when importable, else PIL; bank.json records which.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthgen.errors import UsageError
from synthgen.pack import PackConfig, file_sha256, load_pack, read_pack_config

BANK_FORMAT = "synthgen-bank/1"


@dataclass
class Bank:
    root: Path
    embeddings: torch.Tensor  # (N, D) float16
    labels: np.ndarray  # (N,) int64
    keys: list[str]
    class_names: list[str]
    meta: dict  # bank.json
    hash: str  # sha256 of embeddings.safetensors, 16 hex chars

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]


def encoder_id(config: PackConfig) -> str:
    """What an embedding's meaning depends on: the encoder's spec and its weights."""
    weights = config.weights.get("encoder", {}).get("sha256", "")
    blob = json.dumps({"spec": config.encoder.to_dict(), "weights": weights}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_bank(root: str | Path) -> Bank:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(root)
    meta_path, tensors_path = root / "bank.json", root / "embeddings.safetensors"
    if not meta_path.is_file() or not tensors_path.is_file():
        raise UsageError(
            f"{root} is not an embedding bank (bank.json and embeddings.safetensors expected); "
            f"build one with 'synthgen embed --images DIR --pack PACK --out {root}'"
        )
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensors_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise UsageError(f"cannot read the embedding bank {root}: {e}; rebuild it with 'synthgen embed'") from e
    emb, labels = tensors.get("embeddings"), tensors.get("labels")
    n = 0 if emb is None else emb.shape[0]
    if emb is None or labels is None or emb.ndim != 2 or labels.shape != (n,) or len(meta.get("keys", [])) != n:
        raise UsageError(f"the embedding bank {root} is inconsistent (shapes or key count); rebuild it")
    if n == 0:
        raise UsageError(f"the embedding bank {root} is empty: embed at least one readable image")
    check_finite_rows(emb, meta["keys"], f"rows of the embedding bank {root}")
    labels = labels.numpy().astype(np.int64)
    names = meta["class_names"]
    if labels.min() < 0 or labels.max() >= len(names):
        raise UsageError(f"the embedding bank {root} has labels outside its {len(names)} classes; rebuild it")
    return Bank(root, emb, labels, meta["keys"], names, meta, file_sha256(tensors_path)[:16])


def check_bank_fits_pack(bank: Bank, config: PackConfig, pack_root: Path) -> None:
    """A bank is only meaningful to the denoiser (and the filter) of the encoder that made it."""
    if bank.dim != config.denoiser.cond_dim:
        raise UsageError(
            f"bank {bank.root} holds {bank.dim}-d embeddings but the denoiser of pack {pack_root} is conditioned "
            f"on {config.denoiser.cond_dim}-d vectors; embed the images with this pack: "
            f"'synthgen embed --images ... --pack {pack_root} --out NEW_BANK'"
        )
    if bank.meta.get("encoder_id") != encoder_id(config):
        raise UsageError(
            f"bank {bank.root} was embedded with a different encoder than pack {pack_root}'s; its embeddings "
            f"would not mean what the denoiser expects. Re-embed with 'synthgen embed --pack {pack_root}'"
        )


def to_float_chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float().div_(255.0)


def check_finite_rows(embeddings: torch.Tensor, keys: list[str], what: str) -> None:
    """A UsageError naming how many rows of (N, D) `embeddings` hold NaN/Inf, and their keys: such a row
    would condition only rejected candidates and skew the class balance, one sample at a time."""
    bad = torch.nonzero(~torch.isfinite(embeddings.float()).all(dim=1)).flatten().tolist()
    if bad:
        listed = ", ".join(repr(keys[i]) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise UsageError(
            f"{len(bad)} of {len(keys)} {what} hold NaN or Inf values (keys {listed}); re-embed without those "
            "images (or fix the encoder), e.g. 'synthgen embed ... --out NEW_BANK'. Values beyond +-65504 "
            "overflow float16, the bank's storage type"
        )


def write_bank(
    out: str | Path, embeddings: torch.Tensor, labels: list[int], keys: list[str], class_names: list[str],
    encoder: str, source: str, extra: dict | None = None,
) -> dict:
    """Write BANK/embeddings.safetensors and BANK/bank.json (each atomically); returns bank.json's content.

    embeddings (N, D) float (stored float16), labels (N,) ints into class_names, keys (N,) unique ids.
    """
    from safetensors.torch import save_file

    stored = embeddings.detach().half().contiguous()
    check_finite_rows(stored, keys, "embeddings to write (as float16)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "embeddings.safetensors.tmp"
    save_file({"embeddings": stored,
               "labels": torch.tensor(labels, dtype=torch.int64)}, str(tmp))
    tmp.replace(out / "embeddings.safetensors")
    counts = Counter(labels)
    meta = {
        "format": BANK_FORMAT, "source": source, "encoder_id": encoder, "dim": embeddings.shape[1],
        "class_names": class_names,
        "per_class_counts": {name: counts.get(i, 0) for i, name in enumerate(class_names)},
        "keys": keys, "num_embedded": len(keys), **(extra or {}),
    }
    tmp = out / "bank.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / "bank.json")
    return meta


def build_bank(
    images: str,
    pack: str | Path,
    out: str | Path,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    decoder: str = "auto",
) -> dict:
    """Encode every readable image of `images` (see sources.open_source) and write a bank; returns a summary.

    decoder: "auto" (DALI when importable, else PIL), "dali" or "pil" (see synthgen.decode). Decoding
    does the encoder's resize (its recipe's mode and interpolation), so the encoder's own resize is then a no-op and
    batches of large photos stay small in memory.
    """
    from tqdm import tqdm

    from synthgen.decode import make_decoder
    from synthgen.sources import open_source

    if batch_size < 1:
        raise UsageError(f"--batch must be >= 1, got {batch_size}")
    source = open_source(images)
    config = read_pack_config(pack)
    # In-memory pixels need no decoder: building a DALI pipeline for them would only mislabel the bank.
    image_decoder = make_decoder(decoder if source.encoded else "pil", resize=config.encoder.resize_rule,
                                 batch_size=batch_size, device=device)
    decoder_name = image_decoder.name if source.encoded else "in memory"
    decoder_description = image_decoder.description if source.encoded else "none (pixels held in memory)"
    encoder = load_pack(pack, device=device, dtype=dtype, components=("encoder",)).encoder
    out = Path(out)
    start = time.perf_counter()
    chunks, labels, keys, skipped, pending = [], [], [], [], []

    def flush():
        if pending:
            pixels = torch.cat([encoder.preprocess(to_float_chw(img).to(device, dtype)) for img in pending])
            with torch.inference_mode():
                chunks.append(encoder.embed(pixels).float().cpu())
            pending.clear()

    items = source.items(image_decoder)
    for item in tqdm(items, total=len(source), desc=f"embed ({decoder_name})", unit="img", disable=not progress):
        if item.image is None:
            skipped.append({"key": item.key, "error": item.error})
            continue
        pending.append(item.image)
        labels.append(item.label)
        keys.append(item.key)
        if len(pending) == batch_size:
            flush()
    flush()
    if not keys:
        raise UsageError(f"no readable images in {images!r} ({len(skipped)} unreadable): the bank would be empty")
    embeddings = torch.cat(chunks)
    if not torch.isfinite(embeddings).all():
        raise UsageError("the encoder produced non-finite embeddings; check the pack's encoder weights")
    meta = write_bank(out, embeddings, labels, keys, source.class_names, encoder_id(config), source=images,
                      extra={"pack": str(pack), "decoder": decoder_description,
                             "num_skipped": len(skipped), "skipped": skipped})
    seconds = time.perf_counter() - start
    return {"embedded": len(keys), "skipped": skipped, "seconds": seconds, "out": str(out), "dim": meta["dim"],
            "decoder": decoder_description}


# ---- A bank from representations extracted elsewhere ------------------------------------------------------

REP_DTYPES = ("float16", "float32", "float64")
MAX_LISTED = 1000  # missing / extra / bad files listed in bank.json (all are counted)


def build_bank_from_reps(
    reps: str | Path, images: str | Path, pack: str | Path, out: str | Path, check: int = 8,
    device: str = "cpu", progress: bool = True,
) -> dict:
    """A bank from one `.npy` per image (REPS/<class>/<name>.npy beside IMAGES/<class>/<name>.<ext>).

    Files are matched by relative path stem; classes are IMAGES' folders. Every file is checked: a 1-D (D,)
    or (1, D) floating array, D the pack's conditioning width, all finite. Bad files and images without a
    file are skipped, extra files ignored; all three are counted and listed in bank.json. The pack's recipe
    L2-normalisation is applied, as `embed --images` would. `check` images (evenly spaced) are re-embedded
    with the pack's encoder and compared: a low cosine means the files were made with another recipe.
    """
    from tqdm import tqdm

    from synthgen.sources import folder_entries

    reps, images, out = Path(reps), Path(images), Path(out)
    if not reps.is_dir():
        raise UsageError(f"--reps {reps} is not a folder of .npy files")
    if not images.is_dir():
        raise UsageError(f"--images {images} must be the class-folder tree the .npy files were extracted from")
    config = read_pack_config(pack)
    dim = config.denoiser.cond_dim
    class_names, entries = folder_entries(str(images), images)
    rows, labels, keys, missing, bad, matched = [], [], [], [], [], set()
    for key, label, rel in tqdm(entries, desc="embed (--reps)", unit="file", disable=not progress):
        path = reps / rel.with_suffix(".npy")
        if not path.is_file():
            missing.append(rel.as_posix())
            continue
        matched.add(path.relative_to(reps).as_posix())
        vector, error = _read_rep(path, dim)
        if error is not None:
            bad.append({"file": path.relative_to(reps).as_posix(), "error": error})
            continue
        rows.append(vector)
        labels.append(label)
        keys.append(key)
    extra = sorted(p.relative_to(reps).as_posix() for p in reps.rglob("*.npy") if p.relative_to(reps).as_posix()
                   not in matched)
    if not rows:
        raise UsageError(f"no usable .npy file under {reps} for the images of {images} ({len(missing)} missing, "
                         f"{len(bad)} bad{': ' + bad[0]['error'] if bad else ''}); check both paths")
    embeddings = torch.from_numpy(np.stack(rows))
    if config.encoder.normalize:
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    agreement = _spot_check(embeddings, keys, entries, images, pack, check, device)
    meta = write_bank(out, embeddings, labels, keys, class_names, encoder_id(config), source=str(images), extra={
        "pack": str(pack), "reps": str(reps), "decoder": "none (precomputed representations)",
        "num_skipped": len(missing) + len(bad), "num_missing": len(missing), "num_bad": len(bad),
        "num_extra": len(extra), "missing": missing[:MAX_LISTED], "bad": bad[:MAX_LISTED],
        "extra": extra[:MAX_LISTED], "spot_check": agreement,
    })
    return {"embedded": len(keys), "dim": meta["dim"], "out": str(out), "missing": missing, "bad": bad,
            "extra": extra, "spot_check": agreement}


def _read_rep(path: Path, dim: int) -> tuple[np.ndarray | None, str | None]:
    """(vector (dim,) float32, None) or (None, why the file is not usable). Never unpickles."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        return None, f"unreadable .npy ({type(e).__name__}: {str(e)[:120]})"
    if array.dtype.name not in REP_DTYPES:
        return None, f"dtype {array.dtype} (expected one of {', '.join(REP_DTYPES)})"
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.shape != (dim,):
        return None, f"shape {tuple(array.shape)} (expected ({dim},), the pack's conditioning width)"
    if not np.isfinite(array).all():
        return None, f"{int((~np.isfinite(array)).sum())} non-finite value(s)"
    return array.astype(np.float32), None


def _spot_check(embeddings: torch.Tensor, keys: list[str], entries, images: Path, pack, check: int,
                device: str) -> dict | None:
    """Cosine between `check` given representations and the pack's own encoding of their images."""
    if check <= 0:
        return None
    from synthgen.decode import decode_pil

    paths = {key: rel for key, _, rel in entries}
    picks = np.unique(np.linspace(0, len(keys) - 1, min(check, len(keys))).round().astype(int))
    encoder = load_pack(pack, device=device, components=("encoder",)).encoder
    cosines = []
    for i in picks:
        image, error = decode_pil((images / paths[keys[i]]).read_bytes())
        if image is None:
            continue
        with torch.inference_mode():
            mine = encoder(to_float_chw(image).to(device))[0].float().cpu()
        cosines.append(float(torch.nn.functional.cosine_similarity(mine, embeddings[i], dim=0)))
    if not cosines:
        return None
    return {"images": len(cosines), "min_cosine": round(min(cosines), 6), "mean_cosine": round(float(np.mean(cosines)), 6)}
