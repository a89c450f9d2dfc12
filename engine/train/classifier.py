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
SCHEDULES = ("fixed", "plateau")


@dataclass(frozen=True)
class ClassifierConfig:
    """How a classifier trains. Two budgets:

    fixed:   exactly `steps` steps, one-cycle learning rate (the same budget whatever the data size).
    plateau: train until a held-out validation split stops improving: it is scored every `eval_every`
             steps; after `patience` scores without a better one the learning rate drops 10x (`lr_drops`
             times), after `patience` more training stops, and the best-scoring weights are kept. `steps`
             caps the run. Data sets of any size each train to their own convergence.
    """

    arch: str = "resnet18"  # any timm model name (resnet10t, resnet18, resnet34, vit_tiny_patch16_224, ...)
    width: int = 16  # ResNets: channels (w, 2w, 4w, 8w); 64 is the standard width
    input_size: int = 32
    steps: int = 600  # fixed: the budget; plateau: the cap
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    aug: str = "standard"
    label_smoothing: float = 0.1
    seed: int = 0
    schedule: str = "fixed"
    eval_every: int = 100
    patience: int = 3
    lr_drops: int = 1

    def __post_init__(self):
        if self.aug not in AUGS:
            raise UsageError(f"--aug {self.aug!r} is not one of {', '.join(AUGS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        for name in ("width", "input_size", "steps", "batch", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr_drops < 0:
            raise UsageError(f"--lr-drops must be >= 0, got {self.lr_drops}")


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
    device: str = "cpu", holdout: ImageSet | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Train from scratch; returns the model (eval mode) and the history.

    `holdout`: the validation split the plateau schedule watches (required by it, unused by fixed).
    `val`: images only reported on after training (a test set: it never steers training). The last
    history record of a plateau run says why it stopped and which step's weights were kept.
    """
    from tqdm import tqdm

    if config.schedule == "plateau" and holdout is None:
        raise UsageError("the plateau schedule needs a validation split to watch (holdout)")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    num_classes = len(train.class_names)
    model = build_classifier(config.arch, num_classes, config.input_size, config.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "fixed":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.15)
        watch = None
    else:
        warmup = min(config.eval_every, config.steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        watch = Plateau(config.patience, config.lr_drops)
    x_all = _prepare(train.images, config.input_size)
    history, order, cursor, running = [], torch.randperm(len(train), generator=gen), 0, 0.0
    report_every = max(1, config.steps // 10) if watch is None else config.eval_every
    best_state, best_step, stopped = None, 0, "budget"
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
        if (step + 1) % report_every and step + 1 != config.steps:
            continue
        record = {"step": step + 1, "loss": running / report_every}
        running = 0.0
        if watch is not None:
            scored = evaluate(model, holdout, config.input_size, device)
            record |= {"holdout_top1": scored["top1"], "holdout_loss": scored["loss"], "lr": opt.param_groups[0]["lr"]}
            verdict = watch.update((scored["top1"], -scored["loss"]))
            if verdict == "better":
                best_state, best_step = _copy_state(model), step + 1
            elif verdict == "drop":
                sched.base_lrs = [b * 0.1 for b in sched.base_lrs]
            model.train()
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if watch is not None and verdict == "stop":
            stopped = "plateau"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if watch is not None:
        history.append({"step": step + 1, "stopped": stopped, "best_step": best_step,
                        "best_holdout_top1": watch.best[0]})
    if val is not None:
        history[-1]["val_top1"] = evaluate(model, val, config.input_size, device)["top1"]
    return model.eval(), history


class Plateau:
    """Early stopping with learning-rate drops on a validation score (higher is better, compared as tuples).

    `update(score)` -> "better" (a new best: keep these weights), "wait", "drop" (no better score for
    `patience` updates and drops are left: lower the learning rate) or "stop" (no better score for
    `patience` updates after the last drop).
    """

    def __init__(self, patience: int, drops: int):
        self.patience, self.drops_left, self.waited, self.best = patience, drops, 0, None

    def update(self, score: tuple) -> str:
        if self.best is None or score > self.best:
            self.best, self.waited = score, 0
            return "better"
        self.waited += 1
        if self.waited < self.patience:
            return "wait"
        self.waited = 0
        if self.drops_left > 0:
            self.drops_left -= 1
            return "drop"
        return "stop"


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageSet, input_size: int, device: str = "cpu", batch: int = 512) -> dict:
    """top-1, top-5, per-class accuracy (by class name) and mean cross-entropy on `data`."""
    model.eval()
    preds, top5_hits, losses = [], [], []
    for i in range(0, len(data), batch):
        x = _normalize(_prepare(data.images[i : i + batch], input_size)).to(device)
        logits = model(x).float().cpu()
        y = data.labels[i : i + batch]
        k = min(5, logits.shape[1])
        top5_hits.append((logits.topk(k, dim=1).indices == y[:, None]).any(dim=1))
        preds.append(logits.argmax(dim=1))
        losses.append(F.cross_entropy(logits, y, reduction="sum"))
    pred, top5 = torch.cat(preds), torch.cat(top5_hits)
    correct = pred == data.labels
    per_class = {
        name: float(correct[data.labels == c].float().mean()) if (data.labels == c).any() else None
        for c, name in enumerate(data.class_names)
    }
    return {"top1": float(correct.float().mean()), "top5": float(top5.float().mean()),
            "per_class": per_class, "n": len(data), "loss": float(sum(losses)) / len(data)}


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
