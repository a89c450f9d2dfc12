"""Training a pack's DiT denoiser on (image, condition) pairs, with condition dropout and EMA.

`cond="rep"`: conditions are the bank's embeddings of the training images (the method).
`cond="class"`: a learned class table of the same width replaces them (the class-conditioned baseline,
same architecture and budget). Both learn a null condition (dropout p) so guidance works at sampling.

Checkpoints are safetensors (model, EMA, optimiser moments) plus a JSON of the step and config: resume
never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthgen.errors import UsageError
from synthgen.models.dit import DiT, DiTConfig
from synthgen.samplers import NoiseSchedule
from synthgen.train.data import ImageSet, to_unit
from synthgen.train.optim import warmup_cosine

CONDS = ("rep", "class")


@dataclass(frozen=True)
class DenoiserTrainConfig:
    cond: str = "rep"
    hidden: int = 128
    depth: int = 3
    heads: int = 4
    patch: int = 2
    steps: int = 2000
    batch: int = 96
    lr: float = 1e-3
    weight_decay: float = 0.0
    cond_dropout: float = 0.1
    ema: float = 0.999
    seed: int = 0
    checkpoint_every: int = 1000
    standardize: bool = True  # rep mode: standardise conditions with the bank's per-dimension mean/std

    def __post_init__(self):
        if self.cond not in CONDS:
            raise UsageError(f"--cond {self.cond!r} is not one of {', '.join(CONDS)}")
        if not 0 <= self.cond_dropout < 1:
            raise UsageError(f"--cond-dropout must be in [0, 1), got {self.cond_dropout}")

    def dit_config(self, image_size: int, cond_dim: int) -> DiTConfig:
        return DiTConfig(sample_size=image_size, in_channels=3, patch_size=self.patch, hidden_size=self.hidden,
                         depth=self.depth, num_heads=self.heads, cond_dim=cond_dim)


class ConditionedTrainer(nn.Module):
    """The DiT plus what training learns beside it: the null condition and (class mode) the class table."""

    def __init__(self, dit: DiT, cond_dim: int, num_classes: int | None):
        super().__init__()
        self.dit = dit
        self.null = nn.Parameter(torch.zeros(cond_dim))
        self.table = nn.Embedding(num_classes, cond_dim) if num_classes else None
        if self.table is not None:
            nn.init.normal_(self.table.weight, std=1.0)


def _moments(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in zip(names, opt.param_groups[0]["params"]):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                out[f"opt.{name}.{key}"] = torch.as_tensor(state[key]).clone()
    return out


def save_checkpoint(path: Path, step: int, model: ConditionedTrainer, ema: ConditionedTrainer,
                    opt: torch.optim.Optimizer, config: DenoiserTrainConfig) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in model.named_parameters()]
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors |= _moments(opt, names)
    tmp = path / "checkpoint.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path / "checkpoint.safetensors")
    (path / "checkpoint.json").write_text(json.dumps({"step": step, "config": asdict(config)}, indent=1))


def load_checkpoint(path: Path, model: ConditionedTrainer, ema: ConditionedTrainer,
                    opt: torch.optim.Optimizer, config: DenoiserTrainConfig) -> int:
    """Restore in place; returns the step to continue from (0 when there is no checkpoint)."""
    from safetensors.torch import load_file

    if not (path / "checkpoint.json").is_file():
        return 0
    meta = json.loads((path / "checkpoint.json").read_text())
    if meta["config"] != asdict(config):
        raise UsageError(f"the checkpoint in {path} was trained with another config; use a new --out or delete it")
    tensors = load_file(str(path / "checkpoint.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    for name, p in model.named_parameters():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {key: tensors[f"opt.{name}.{key}"] for key in ("exp_avg", "exp_avg_sq", "step")}
    return int(meta["step"])


def train_denoiser(
    data: ImageSet, conditions: torch.Tensor | None, schedule: NoiseSchedule, config: DenoiserTrainConfig,
    checkpoint_dir: Path | None = None, progress: bool = True, cond_dim: int | None = None,
) -> tuple[ConditionedTrainer, list[dict]]:
    """Train on images (N, 3, S, S) uint8 with conditions (N, D) (rep mode) or labels (class mode).

    Returns the EMA model (eval mode) and the loss history.
    """
    from tqdm import tqdm

    if config.cond == "rep" and (conditions is None or len(conditions) != len(data)):
        raise UsageError("rep conditioning needs one embedding per training image (the bank's)")
    cond_dim = conditions.shape[1] if conditions is not None else cond_dim
    if cond_dim is None:
        raise UsageError("class conditioning needs cond_dim (the pack encoder's embedding width)")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    image_size = data.images.shape[-1]
    num_classes = len(data.class_names) if config.cond == "class" else None
    model = ConditionedTrainer(DiT(config.dit_config(image_size, cond_dim)), cond_dim, num_classes)
    if config.cond == "rep" and config.standardize:
        model.dit.cond_embedder.set_standardization(conditions.float())
    ema = ConditionedTrainer(DiT(config.dit_config(image_size, cond_dim)), cond_dim, num_classes)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = load_checkpoint(checkpoint_dir, model, ema, opt, config) if checkpoint_dir else 0
    sched = warmup_cosine(opt, warmup=200, total=config.steps, start=start)
    alphas = schedule.alphas_cumprod().float()
    x_all = to_unit(data.images) * 2 - 1  # (N, 3, S, S) in [-1, 1]
    history, model_params = [], list(model.parameters())
    bar = tqdm(range(start, config.steps), desc=f"train denoiser ({config.cond})", unit="step",
               initial=start, total=config.steps, disable=not progress)
    model.train()
    for step in bar:
        idx = torch.randint(0, len(data), (config.batch,), generator=gen)
        x0 = x_all[idx]
        c = conditions[idx].float() if config.cond == "rep" else model.table(data.labels[idx])
        drop = torch.rand(config.batch, generator=gen) < config.cond_dropout
        c = torch.where(drop[:, None], model.null.expand_as(c), c)
        t = torch.randint(0, schedule.num_train_timesteps, (config.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if schedule.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = F.mse_loss(model.dit(xt, t.float(), c), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            # EMA warm-up: a fixed 0.999 from step 0 would keep ~14% of the random init after 2000 steps.
            decay = min(config.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model_params):
                pe.lerp_(pm, 1 - decay)
        if step % 100 == 0 or step == config.steps - 1:
            history.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint_dir and (step + 1) % config.checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, step + 1, model, ema, opt, config)
    if checkpoint_dir:
        save_checkpoint(checkpoint_dir, config.steps, model, ema, opt, config)
    return ema.eval(), history
