"""`synthgen train distill`: a pack's denoiser distilled into a few-step student, as a normal pack.

Method: progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion
Models", ICLR 2022). Each round halves the step count: a student, initialised from its teacher, learns to
take in ONE deterministic DDIM step what the teacher does in TWO, on the student's grid of timesteps; the
student then teaches the next round (e.g. 8 -> 4 -> 2 -> 1). Chosen because it needs nothing but the
teacher and its own parameterisation (epsilon, v or sample prediction: the student keeps the pack's), and
its target is exact for DDIM, the sampler the student then runs with.

Data: samples of the teacher itself (its best sampler, conditioned on the pack's bank), noised to the
student's grid, so no training images are needed and any pack (the shipped one, a trained one, an imported
UNet) can be distilled. The loss is the paper's: x0-space error weighted by max(SNR, 1). The student is
trained without guidance (--cfg 1). Grids use "trailing" spacing with the last step landing on abar = 1, so
the K-step grid starts at pure noise and is every other point of the 2K-step grid; the student pack records
that schedule, and generate's defaults become DDIM at K steps.

Flow-matching packs are refused: their sampler is not DDIM.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from synthgen.errors import UsageError
from synthgen.pack import PACK_JSON, load_pack, pack_hash, read_pack_config
from synthgen.samplers import NoiseSchedule, make_plan, sample

METHOD = "progressive distillation (Salimans & Ho 2022), teacher samples as data"


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 2  # the student's DDIM steps: 1, 2 or 4
    teacher_steps: int = 8  # the first teacher's DDIM steps; each round halves it down to `steps`
    iterations: int = 600  # optimisation steps per round
    batch: int = 64
    lr: float = 1e-4
    pool: int = 2048  # teacher samples the rounds noise and learn from
    pool_steps: int = 20  # dpmpp_2m steps the pool is drawn with
    seed: int = 0

    def __post_init__(self):
        if self.steps not in (1, 2, 4) or self.teacher_steps <= self.steps:
            raise UsageError(f"--steps must be 1, 2 or 4 and below --teacher-steps ({self.teacher_steps}), "
                             f"got {self.steps}")
        rounds = math.log2(self.teacher_steps / self.steps)
        if rounds != int(rounds):
            raise UsageError(f"--teacher-steps {self.teacher_steps} must be --steps {self.steps} times a power of 2")
        for name in ("iterations", "batch", "pool", "pool_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")

    @property
    def rounds(self) -> list[tuple[int, int]]:
        """(teacher steps, student steps) of each halving."""
        out, k = [], self.teacher_steps
        while k > self.steps:
            out.append((k, k // 2))
            k //= 2
        return out


def student_schedule(schedule: NoiseSchedule) -> NoiseSchedule:
    return replace(schedule, timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, clip_sample=False)


def grid(schedule: NoiseSchedule, k: int) -> list[int]:
    """The k descending train timesteps DDIM visits with trailing spacing ([999, 499] for k=2, T=1000)."""
    t = schedule.num_train_timesteps
    if t % k:
        raise UsageError(f"num_train_timesteps={t} is not divisible by {k} steps: the grids would not nest")
    return [t - 1 - i * (t // k) for i in range(k)]


def split(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, prediction_type: str):
    """The model output `out` at x = a x0 + s eps as (x0, eps); a, s broadcast over x."""
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "sample":
        return out, (x - a * out) / s
    if prediction_type == "v_prediction":  # v = a eps - s x0
        return a * x - s * out, s * x + a * out
    raise UsageError(f"train distill cannot distil prediction_type={prediction_type!r} (flow models use euler, "
                     "not DDIM)")


class Coefficients:
    """sqrt(abar) and sqrt(1 - abar) per train timestep, with timestep -1 the clean end (abar = 1)."""

    def __init__(self, schedule: NoiseSchedule, device) -> None:
        abar = torch.cat([schedule.alphas_cumprod().float(), torch.ones(1, dtype=torch.float32)]).to(device)
        self.a, self.s = abar.sqrt(), (1 - abar).sqrt()  # index -1 -> the appended abar = 1

    def at(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1,) + (1,) * (ndim - 1)
        return self.a[t].view(shape), self.s[t].view(shape)


def ddim_step(model, x, t, s, cond, co: Coefficients, prediction_type: str):
    """One deterministic DDIM step from timesteps t to s ((B,) int64; s = -1: the clean end)."""
    a_t, s_t = co.at(t, x.ndim)
    x0, eps = split(model(x, t.float(), cond), x, a_t, s_t, prediction_type)
    a_s, s_s = co.at(s, x.ndim)
    return a_s * x0 + s_s * eps


def teacher_pool(denoiser, schedule, conds: torch.Tensor, shape, steps: int, batch: int, seed: int) -> torch.Tensor:
    """x0 samples of the teacher for each condition (N, D), with dpmpp_2m at `steps` steps."""
    plan = make_plan("dpmpp_2m", schedule, steps, device=conds.device)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        for i in range(0, len(conds), batch):
            c = conds[i : i + batch]
            x_T = torch.randn((len(c), *shape), generator=gen).to(conds.device)
            out.append(sample(plan, lambda x, t: denoiser(x, t, c), x_T, lambda k: None))
    return torch.cat(out)


def distill_round(teacher, student, x0_pool, conds, schedule, k_teacher: int, cfg: DistillConfig, gen, log):
    """Train `student` (in place) to do one DDIM step of the k_teacher // 2 grid where the teacher does two."""
    device, ptype = x0_pool.device, schedule.prediction_type
    co = Coefficients(schedule, device)
    fine = grid(schedule, k_teacher)
    coarse = fine[::2]
    t_of = torch.tensor(coarse, device=device)
    mid_of = torch.tensor(fine[1::2], device=device)
    s_of = torch.tensor(coarse[1:] + [-1], device=device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    student.train()
    for it in range(cfg.iterations):
        rows = torch.randint(0, len(x0_pool), (cfg.batch,), generator=gen).to(device)
        i = torch.randint(0, len(coarse), (cfg.batch,), generator=gen).to(device)
        t, mid, s = t_of[i], mid_of[i], s_of[i]
        x0, c = x0_pool[rows], conds[rows]
        a_t, s_t = co.at(t, x0.ndim)
        x_t = a_t * x0 + s_t * torch.randn(x0.shape, generator=gen).to(device)
        with torch.no_grad():
            x_mid = ddim_step(teacher, x_t, t, mid, c, co, ptype)
            x_s = ddim_step(teacher, x_mid, mid, s, c, co, ptype)
            a_s, s_s = co.at(s, x0.ndim)
            ratio = s_s / s_t
            target = (x_s - ratio * x_t) / (a_s - ratio * a_t)  # the x0 one DDIM step t -> s needs
        pred_x0, _ = split(student(x_t, t.float(), c), x_t, a_t, s_t, ptype)
        weight = (a_t**2 / s_t**2).clamp(min=1.0)  # truncated SNR weighting
        loss = (weight * (pred_x0 - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % max(1, cfg.iterations // 5) == 0 or it == cfg.iterations - 1:
            log(f"  {k_teacher} -> {k_teacher // 2} steps: iteration {it + 1}/{cfg.iterations}, loss {loss.item():.5f}")
    student.eval()
    return student


def ddim_sample(model, x_T, cond, schedule, k: int) -> torch.Tensor:
    """DDIM on the trailing k-step grid (what generate runs for the student pack)."""
    co = Coefficients(schedule, x_T.device)
    ts = grid(schedule, k) + [-1]
    x = x_T
    for t, s in zip(ts[:-1], ts[1:]):
        n = x.shape[0]
        x = ddim_step(model, x, torch.full((n,), t, device=x.device), torch.full((n,), s, device=x.device),
                      cond, co, schedule.prediction_type)
    return x


def distill_pack(pack_dir: Path, out: Path, cfg: DistillConfig, bank_dir: Path | None = None, device: str = "cpu",
                 log=print) -> dict:
    """Distil the pack at `pack_dir` into a `cfg.steps`-step student pack at `out`; returns a summary."""
    from synthgen.bank import load_bank

    pack_dir, out, log = Path(pack_dir), Path(out), log or (lambda line: None)
    config = read_pack_config(pack_dir)
    if config.schedule.prediction_type == "flow":
        raise UsageError(f"pack {pack_dir} is a flow-matching model: train distill distils DDIM samplers of "
                         "epsilon, v or sample prediction packs")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty: choose a new folder")
    bank_dir = bank_dir or pack_dir / "bank"
    if not (bank_dir / "bank.json").is_file():
        raise UsageError(f"pack {pack_dir} ships no bank/: pass --bank BANK (conditions to distil on)")
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pack = load_pack(pack_dir, device=device, components=("denoiser",))
    bank = load_bank(bank_dir)
    rows = torch.randint(0, len(bank.labels), (cfg.pool,), generator=gen)
    conds = bank.embeddings[rows].float().to(device)
    schedule = student_schedule(config.schedule)
    log(f"teacher pool: {cfg.pool} samples, dpmpp_2m {cfg.pool_steps} steps ...")
    x0_pool = teacher_pool(pack.denoiser, config.schedule, conds, config.denoiser.sample_shape, cfg.pool_steps,
                           cfg.batch, cfg.seed)
    teacher = pack.denoiser
    # The pool was made under inference_mode; plain copies of it can enter the autograd graph.
    x0_pool, conds = x0_pool.clone(), conds.clone()
    with torch.inference_mode(False):
        for k_teacher, _ in cfg.rounds:
            student = copy.deepcopy(teacher).requires_grad_(True)
            with torch.enable_grad():
                teacher = distill_round(teacher.requires_grad_(False), student, x0_pool, conds, schedule,
                                        k_teacher, cfg, gen, log)
    _write_student(pack_dir, out, config, schedule, teacher, cfg)
    return {"out": str(out), "steps": cfg.steps, "rounds": cfg.rounds, "seconds": time.perf_counter() - start}


def _write_student(pack_dir: Path, out: Path, config, schedule, student, cfg: DistillConfig) -> None:
    """The teacher's folder (encoder, VAE, extras, bank) with the student's denoiser and schedule."""
    from safetensors.torch import save_file

    from synthgen.pack import file_sha256

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pack_dir, tmp, ignore=shutil.ignore_patterns(".engines", "*.tmp"))
    weights = dict(config.weights)
    path = tmp / weights["denoiser"]["file"]
    save_file({k: v.detach().float().contiguous() for k, v in student.net.state_dict().items()}, str(path))
    weights["denoiser"] = {**weights["denoiser"], "sha256": file_sha256(path)}
    distilled = {"teacher": pack_hash(config), "teacher_steps": cfg.teacher_steps, "steps": cfg.steps,
                 "sampler": "ddim", "method": METHOD, "guidance": 1.0, "iterations": cfg.iterations,
                 "pool": cfg.pool, "seed": cfg.seed}
    student_config = replace(config, name=f"{config.name}-distilled-{cfg.steps}", schedule=schedule,
                             weights=weights, distilled=distilled,
                             description=f"{config.description} Distilled to {cfg.steps} DDIM step(s).".strip())
    (tmp / PACK_JSON).write_text(json.dumps(student_config.to_dict(), indent=1, sort_keys=True))
    tmp.rename(out)
