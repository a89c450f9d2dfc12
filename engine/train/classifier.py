"""Classifiers trained on shards (real or synthetic) and evaluated on real held-out images.

`synthgen train classifier` and `synthgen eval` wrap these. A checkpoint is a folder: `model.safetensors`
plus `classifier.json` (arch, input size, class names, training config and history).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthgen.errors import UsageError
from synthgen.train.augment import classifier_view
from synthgen.train.data import ImageSet, to_unit

AUGS = ("none", "standard")


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str = "resnet18"  # any timm model name (resnet10t, resnet18, resnet34, vit_tiny_patch16_224, ...)
    width: int = 16  # ResNets: channels (w, 2w, 4w, 8w); 64 is the standard width
    input_size: int = 32
    steps: int = 600  # a fixed optimisation budget, so data sets of different sizes compare fairly
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    aug: str = "standard"
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.aug not in AUGS:
            raise UsageError(f"--aug {self.aug!r} is not one of {', '.join(AUGS)}")
        for name in ("width", "input_size", "steps", "batch"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def build_classifier(arch: str, num_classes: int, input_size: int, width: int = 64) -> nn.Module:
    import timm

    kwargs = {"img_size": input_size} if arch.startswith(("vit_", "deit_")) else {}
    if arch.startswith("resnet") and width != 64:
        kwargs.update(channels=(width, 2 * width, 4 * width, 8 * width), stem_width=width)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model"
        raise UsageError(f"--arch {arch!r} is not a timm model name ({e}); try resnet18 or resnet10t") from e


def _prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float (B, 3, size, size), normalised to zero mean / unit range."""
    x = to_unit(images)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


def train_classifier(
    train: ImageSet, config: ClassifierConfig, val: ImageSet | None = None, progress: bool = True,
    device: str = "cpu",
) -> tuple[nn.Module, list[dict]]:
    """Train from scratch for `config.steps` steps; returns the model (eval mode) and the loss history."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    num_classes = len(train.class_names)
    model = build_classifier(config.arch, num_classes, config.input_size, config.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.15)
    x_all = _prepare(train.images, config.input_size)
    history, order, cursor, running = [], torch.randperm(len(train), generator=gen), 0, 0.0
    report_every = max(1, config.steps // 10)
    model.train()
    bar = tqdm(range(config.steps), desc="train classifier", unit="step", disable=not progress)
    for step in bar:
        if cursor + config.batch > len(order):  # a new pass over the data
            order, cursor = torch.randperm(len(train), generator=gen), 0
        idx = order[cursor : cursor + config.batch]
        cursor += config.batch
        x = x_all[idx]
        if config.aug == "standard":
            x = classifier_view(x, gen)
        logits = model(_normalize(x).to(device))
        loss = F.cross_entropy(logits, train.labels[idx].to(device), label_smoothing=config.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % report_every == 0 or step + 1 == config.steps:
            record = {"step": step + 1, "loss": running / report_every}
            running = 0.0
            if val is not None and step + 1 == config.steps:
                record["val_top1"] = evaluate(model, val, config.input_size, device)["top1"]
                model.train()
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
    return model.eval(), history


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageSet, input_size: int, device: str = "cpu", batch: int = 512) -> dict:
    """top-1, top-5 and per-class accuracy (by class name) on `data`."""
    model.eval()
    preds, top5_hits = [], []
    for i in range(0, len(data), batch):
        x = _normalize(_prepare(data.images[i : i + batch], input_size)).to(device)
        logits = model(x).float().cpu()
        y = data.labels[i : i + batch]
        k = min(5, logits.shape[1])
        top5_hits.append((logits.topk(k, dim=1).indices == y[:, None]).any(dim=1))
        preds.append(logits.argmax(dim=1))
    pred, top5 = torch.cat(preds), torch.cat(top5_hits)
    correct = pred == data.labels
    per_class = {
        name: float(correct[data.labels == c].float().mean()) if (data.labels == c).any() else None
        for c, name in enumerate(data.class_names)
    }
    return {"top1": float(correct.float().mean()), "top5": float(top5.float().mean()),
            "per_class": per_class, "n": len(data)}


def save_classifier(model: nn.Module, config: ClassifierConfig, class_names: list[str], out: Path,
                    history: list[dict] | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    meta = {"config": asdict(config), "class_names": class_names, "history": history or []}
    (out / "classifier.json").write_text(json.dumps(meta, indent=1))


def load_classifier(path: Path) -> tuple[nn.Module, ClassifierConfig, list[str]]:
    from safetensors.torch import load_file

    meta_path, weights = path / "classifier.json", path / "model.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise UsageError(f"{path} is not a classifier checkpoint (classifier.json + model.safetensors expected)")
    meta = json.loads(meta_path.read_text())
    config = ClassifierConfig(**meta["config"])
    model = build_classifier(config.arch, len(meta["class_names"]), config.input_size, config.width)
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), config, meta["class_names"]
