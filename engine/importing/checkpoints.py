"""Reading checkpoint files safely: safetensors always, pickles only when the user says they trust them.

A pickle (`.bin`, `.pt`, `.pth`, `.ckpt`) can run any code when it is loaded, so by default it is refused
with an error that names `--trust-pickle`. With that flag it is read once here, at import time, and what it
held is written to the pack as safetensors; the pack records that it came from a pickle, and nothing in
synthgen reads the pickle again. A plain state dict is read with `torch.load(weights_only=True)` (tensors
and containers only); only a whole pickled object, such as a diffusers UNet saved with `torch.save(unet)`,
needs the full unpickler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from synthgen.errors import UsageError
from synthgen.pack import PICKLE_SUFFIXES


@dataclass
class Loaded:
    """What a checkpoint file held: tensors (a state dict) or a whole module, and whether it was a pickle."""

    path: Path
    tensors: dict[str, torch.Tensor] | None
    module: nn.Module | None
    from_pickle: bool


def is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: Path, what: str) -> UsageError:
    return UsageError(
        f"the {what} checkpoint {path} is a pickle ({path.suffix}); loading a pickle runs whatever code the "
        "file holds, so synthgen refuses it by default. If you trust its origin, rerun with --trust-pickle: it "
        "is loaded once, converted to safetensors inside the pack (the pack records the conversion) and never "
        "read again. Or convert it yourself in a trusted environment with safetensors.torch.save_file"
    )


def load_checkpoint(path: Path, what: str, trust_pickle: bool) -> Loaded:
    """Read `path` (safetensors, sharded safetensors index, or a trusted pickle). UsageError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"the {what} checkpoint {path} does not exist")
    if path.name.endswith(".safetensors.index.json"):
        return Loaded(path, _read_sharded(path, what), None, False)
    if path.suffix == ".safetensors":
        return Loaded(path, read_safetensors(path, what), None, False)
    if not is_pickle(path):
        raise UsageError(
            f"the {what} checkpoint {path} is neither safetensors nor a known pickle suffix "
            f"({', '.join(PICKLE_SUFFIXES)}); give a .safetensors file"
        )
    if not trust_pickle:
        raise refuse_pickle(path, what)
    return _unpickle(path, what)


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"cannot read the {what} weights {path} ({e}); the file is damaged or not safetensors") from e


def _read_sharded(index: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read the {what} shard index {index}: {e}") from e
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        state.update(read_safetensors(index.parent / name, what))
    return state


def _unpickle(path: Path, what: str) -> Loaded:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only
    except (pickle.UnpicklingError, RuntimeError, AttributeError):
        obj = None  # a whole object (e.g. torch.save(unet)): needs the full unpickler, trusted by the user
    if obj is None:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ModuleNotFoundError) as e:
            raise UsageError(f"cannot unpickle the {what} checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, nn.Module):
        return Loaded(path, None, obj, True)
    tensors = _find_state_dict(obj)
    if tensors is None:
        raise UsageError(
            f"the {what} checkpoint {path} holds a {type(obj).__name__}, not a module or a state dict of tensors"
        )
    return Loaded(path, tensors, None, True)


def _find_state_dict(obj) -> dict[str, torch.Tensor] | None:
    """A {name: tensor} dict, directly or under a usual wrapper key (training checkpoints nest it)."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module", "ema", "teacher"):
            found = _find_state_dict(obj.get(key))
            if found is not None:
                return found
    return None


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"the {what} config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read the {what} config {path}: {e}") from e
    if not isinstance(data, dict):
        raise UsageError(f"the {what} config {path} must hold a JSON object")
    return data


def license_of(folder: Path) -> str:
    """The `license:` of a Hugging Face model card's YAML header (README.md), or ""."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return ""
    lines = card.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return ""
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, _, value = line.partition(":")
        if key.strip() == "license":
            return value.strip().strip("'\"")
    return ""


def weights_in(folder: Path, stems: tuple[str, ...], what: str) -> Path:
    """The weights file of a transformers/diffusers/timm folder: safetensors first, then a pickle."""
    for stem in stems:
        for suffix in (".safetensors", ".safetensors.index.json", ".fp16.safetensors"):
            path = folder / f"{stem}{suffix}"
            if path.is_file():
                return path
    for stem in stems:
        for suffix in (".bin", ".pt", ".pth"):
            path = folder / f"{stem}{suffix}"
            if path.is_file():
                return path
    names = ", ".join(f"{s}.safetensors" for s in stems)
    raise UsageError(f"the {what} folder {folder} holds no weights file ({names} or a .bin)")
