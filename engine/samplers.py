"""Few-step samplers as a frozen schedule of tensors plus a pure step function.

Once its schedule is fixed, every sampler here is linear in the current state, the model output, the previous
step's x0 prediction and the step noise. `make_plan` folds a diffusers scheduler's per-step arithmetic into
(K,) coefficient tensors, so `sampler_step` is one elementwise expression with no branches on data:

    x0     = clamp(x0_x[k] * x + x0_out[k] * model_output)        clamp only for ddpm/ddim with clip_sample
    x_next = next_x[k] * x + next_x0[k] * x0 + next_prev_x0[k] * prev_x0
             + next_out[k] * model_output + next_noise[k] * noise

State convention. Diffusion models (prediction_type "epsilon", "v_prediction" or "sample", i.e. x0) keep x in
variance-preserving
space, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, which is also what the model is fed. Flow models keep
x_t = (1 - sigma) x0 + sigma noise and predict v = noise - x0. Every sampler starts from x_T ~ N(0, I); the
final step lands on noise level 0, so its x_next is the sample itself (ddim with set_alpha_to_one=False, as
SD-1.x configs have it, lands on abar_0 instead, as diffusers does).

Timesteps follow the schedule's `timestep_spacing` and `steps_offset` exactly as the matching diffusers
scheduler picks them, so a scheduler config imported from a diffusers folder drives these samplers unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from synthgen.errors import UsageError
from synthgen.options import SAMPLERS

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
# "default": each sampler's diffusers default (leading for ddpm/ddim, linspace for dpmpp_2m/euler).
TIMESTEP_SPACINGS = ("default", "leading", "trailing", "linspace")
# Fields added after packs were first written: to_dict leaves them out at their defaults, so the canonical
# JSON, and with it the hash of every pack written before them, is unchanged.
_LATER_FIELDS = {"timestep_spacing": "default", "steps_offset": 0, "set_alpha_to_one": True}


# ----------------------------------------------------------------------------------------------------------------
# Noise schedule
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSchedule:
    """The training-time noise process of a model; field names and meanings follow diffusers' scheduler configs."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    clip_sample: bool = False  # clamp predicted x0 (ddpm/ddim only, as in diffusers)
    clip_sample_range: float = 1.0
    flow_shift: float = 1.0  # timestep shift of flow models
    timestep_spacing: str = "default"  # how inference timesteps are picked (diffusers' timestep_spacing)
    steps_offset: int = 0  # added to "leading" timesteps (SD-1.x scheduler configs use 1)
    set_alpha_to_one: bool = True  # ddim: the last step lands on abar = 1 (False: on abar_0, as SD-1.x's DDIM)

    def __post_init__(self) -> None:
        t = self.num_train_timesteps
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise UsageError(f"num_train_timesteps={t!r} must be an integer >= 1 (e.g. 1000); fix the noise schedule.")
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        off = self.steps_offset
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < t:
            raise UsageError(f"steps_offset={off!r} must be an integer in [0, num_train_timesteps); SD-1.x uses 1.")
        if not isinstance(self.set_alpha_to_one, bool):
            raise UsageError(f"set_alpha_to_one={self.set_alpha_to_one!r} must be true or false.")
        if self.prediction_type == "flow" and (self.timestep_spacing != "default" or off):
            raise UsageError("timestep_spacing and steps_offset do not apply to flow models; remove them.")
        for option in ("beta_start", "beta_end", "clip_sample_range", "flow_shift"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{option}={value!r} must be a number; fix the noise schedule.")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise UsageError(
                f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r} must satisfy 0 < beta_start <= beta_end"
                " < 1 (e.g. 0.00085 and 0.012); fix the noise schedule."
            )
        if not isinstance(self.clip_sample, bool):
            raise UsageError(f"clip_sample={self.clip_sample!r} must be true or false; fix the noise schedule.")
        if not self.clip_sample_range > 0.0:
            raise UsageError(f"clip_sample_range={self.clip_sample_range!r} must be > 0 (e.g. 1.0).")
        if not (self.flow_shift > 0.0 and math.isfinite(self.flow_shift)):
            raise UsageError(f"flow_shift={self.flow_shift!r} must be a finite number > 0 (e.g. 1.0 or 3.0).")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}

    def spacing(self, sampler: str) -> str:
        """The timestep spacing `sampler` uses under this schedule."""
        if self.timestep_spacing != "default":
            return self.timestep_spacing
        return "leading" if sampler in ("ddpm", "ddim") else "linspace"

    @classmethod
    def from_dict(cls, d: dict) -> NoiseSchedule:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise UsageError(
                f"unknown noise schedule key(s) {unknown}; allowed keys are {allowed}. Remove or rename them."
            )
        return cls(**d)

    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t for t = 0..T-1, float64 (T,).

        Betas and their cumulative product are computed in float32 exactly as diffusers does, because that is
        the schedule the models were trained with; later arithmetic is float64.
        """
        t = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, t, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, t, dtype=torch.float32) ** 2
        else:
            # Nichol & Dhariwal's cosine abar, discretized into betas capped at 0.999 so abar_T stays above 0.
            u = np.arange(t + 1, dtype=np.float64) / t
            abar = np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.from_numpy(np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)).to(torch.float32)
        return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def _check_choice(option: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{option}={value!r} is not supported; choose one of {', '.join(allowed)}.")


# ----------------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """A sampler unrolled over `steps` = K steps; every tensor lives on the sampling device.

    timesteps: (K,) float32, the time value fed to the model at step k (diffusers' `timesteps`).
    sigmas: (K+1,) float32, the noise level entering each step and after the last one (always 0): diffusers'
        sigma = sqrt((1 - abar) / abar) for diffusion models, the flow sigma for flow models.
    init_scale: the state entering step 0 is init_scale * x_T. It is 1 except for euler on diffusion models,
        where diffusers starts from init_noise_sigma * noise in unnormalized (x / sqrt(abar)) space.
    stochastic: whether some step consumes noise. The last step never does: it lands on noise level 0.
    x0_x ... next_noise: (K,) float32 coefficients of the step expression in the module docstring.
    """

    name: str
    steps: int
    prediction_type: str
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    init_scale: float
    stochastic: bool
    clip_sample: bool
    clip_sample_range: float
    x0_x: torch.Tensor
    x0_out: torch.Tensor
    next_x: torch.Tensor
    next_x0: torch.Tensor
    next_prev_x0: torch.Tensor
    next_out: torch.Tensor
    next_noise: torch.Tensor


def _vp_x0(prediction_type: str, a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # x0 = P x + Q m for x = a x0 + s eps, with a = sqrt(abar) and s = sqrt(1 - abar).
    if prediction_type == "epsilon":
        return 1.0 / a, -s / a
    if prediction_type == "sample":
        return torch.zeros_like(a), torch.ones_like(a)
    return a, -s  # v = a eps - s x0


def _vp_eps(prediction_type: str, a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # eps = R x + S m, taken from the raw model output so clipping x0 never changes it (as in diffusers' DDIM).
    if prediction_type == "epsilon":
        return torch.zeros_like(a), torch.ones_like(a)
    if prediction_type == "sample":
        return 1.0 / s, -a / s  # eps = (x - a x0) / s
    return s, a


def _vp_sigma(ab: torch.Tensor) -> torch.Tensor:
    return ((1 - ab) / ab).sqrt()


def _timesteps(sch: NoiseSchedule, sampler: str, k: int) -> np.ndarray:
    """(k,) descending train-step indices, as the matching diffusers scheduler's set_timesteps(k) picks them.

    dpmpp_2m spaces k + 1 points and drops the last (t = 0), as DPM-Solver++ does; euler keeps fractional
    linspace values (it interpolates sigmas between train steps); the others round to integers.
    """
    t, spacing, fractional = sch.num_train_timesteps, sch.spacing(sampler), sampler == "euler"
    points = k + 1 if sampler == "dpmpp_2m" else k
    if spacing == "linspace":
        ts = np.linspace(0, t - 1, points, dtype=np.float32 if fractional else np.float64)
        ts = ts if fractional else ts.round()
        ts = ts[::-1]
    elif spacing == "leading":
        ts = (np.arange(points) * (t // points)).round()[::-1] + sch.steps_offset
    else:  # trailing
        ts = np.arange(t, 0, -t / k).round() - 1
    return ts[:k].astype(np.float32 if fractional else np.int64).copy()


def _previous_abar(prev: np.ndarray, abar: torch.Tensor, final: float) -> torch.Tensor:
    # abar at each step's target timestep `prev`; below 0 the chain lands on `final`.
    return torch.where(torch.from_numpy(prev >= 0), abar[torch.from_numpy(prev.clip(min=0))], final)


def _ddpm(sch: NoiseSchedule, k: int, abar: torch.Tensor) -> dict:
    ts = _timesteps(sch, "ddpm", k)
    ab = abar[torch.from_numpy(ts)]
    # diffusers' DDPM steps to the next listed timestep (-1 after the last): past t = 0 the chain reaches abar = 1.
    ab_prev = _previous_abar(np.append(ts[1:], -1), abar, 1.0)
    alpha = ab / ab_prev
    # Posterior q(x_prev | x, x0) of Ho et al. (eqs. 6-7) with the "fixed_small" variance.
    var = ((1 - ab_prev) / (1 - ab) * (1 - alpha)).clamp(min=1e-20)
    p, q = _vp_x0(sch.prediction_type, ab.sqrt(), (1 - ab).sqrt())
    return dict(
        timesteps=ts, sigmas=_vp_sigma(torch.cat([ab, ab.new_ones(1)])), x0_x=p, x0_out=q,
        next_x=alpha.sqrt() * (1 - ab_prev) / (1 - ab), next_x0=ab_prev.sqrt() * (1 - alpha) / (1 - ab),
        # No noise into the last step (prev_t < 0 lands on abar = 1, where diffusers' variance is its 1e-20 floor).
        next_noise=torch.where(torch.from_numpy(ts > 0) & (ab_prev < 1), var.sqrt(), 0.0),
    )  # fmt: skip


def _ddim(sch: NoiseSchedule, k: int, abar: torch.Tensor) -> dict:
    ts = _timesteps(sch, "ddim", k)
    ab = abar[torch.from_numpy(ts)]
    # diffusers' DDIM steps from t to t - T // k, not to the next listed timestep (they differ under linspace
    # and trailing spacing); below 0 it lands on abar = 1, or abar_0 without set_alpha_to_one.
    prev = ts - sch.num_train_timesteps // k
    ab_prev = _previous_abar(prev, abar, 1.0 if sch.set_alpha_to_one else float(abar[0]))
    a, s = ab.sqrt(), (1 - ab).sqrt()
    p, q = _vp_x0(sch.prediction_type, a, s)
    r, e = _vp_eps(sch.prediction_type, a, s)
    # eta = 0: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with eps expanded into x and m.
    return dict(
        timesteps=ts, sigmas=_vp_sigma(torch.cat([ab, ab.new_ones(1)])), x0_x=p, x0_out=q,
        next_x=(1 - ab_prev).sqrt() * r, next_x0=ab_prev.sqrt(), next_out=(1 - ab_prev).sqrt() * e,
    )  # fmt: skip


def _sigma_table(abar: torch.Tensor) -> np.ndarray:
    # diffusers' per-train-step sigmas, computed in float32 like its Euler and DPM-Solver schedulers.
    ab32 = abar.to(torch.float32)
    return (((1 - ab32) / ab32) ** 0.5).numpy()


def _first_order(sig: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """DDIM-type step from sigma[k] to sigma[k+1] in x0 form; shared by euler and dpmpp_2m.

    With diffusers' sigma s = sigma_vp / alpha, exp(-h) = s_next / s, so the final step to s = 0 needs no log.
    Returns (alpha, sigma_vp) at every boundary (K+1,), next_x (K,) and next_x0 (K,).
    """
    alpha = 1.0 / (1.0 + sig**2).sqrt()
    sigma_vp = sig * alpha
    next_x = sigma_vp[1:] / sigma_vp[:-1]
    next_x0 = alpha[1:] * (1.0 - sig[1:] / sig[:-1])
    return alpha, sigma_vp, next_x, next_x0


def _dpmpp_2m(sch: NoiseSchedule, k: int, abar: torch.Tensor) -> dict:
    ts = _timesteps(sch, "dpmpp_2m", k)
    sig = torch.from_numpy(np.append(_sigma_table(abar)[ts], np.float32(0.0))).to(torch.float64)
    alpha, sigma_vp, next_x, b1 = _first_order(sig)
    p, q = _vp_x0(sch.prediction_type, alpha[:-1], sigma_vp[:-1])
    next_x0, next_prev_x0 = b1.clone(), torch.zeros_like(b1)
    # Steps 1..K-2 extrapolate x0 linearly in log-SNR from the previous prediction (midpoint rule); the first
    # step has no history and the last one is first order because it lands on sigma = 0.
    for j in range(1, k - 1):
        h, h_prev = math.log(sig[j] / sig[j + 1]), math.log(sig[j - 1] / sig[j])
        if h > 0.0 and h_prev > 0.0:  # steps == num_train_timesteps repeats timesteps: no slope, stay first order
            next_x0[j] = b1[j] * (1.0 + 0.5 * h / h_prev)
            next_prev_x0[j] = -b1[j] * 0.5 * h / h_prev
    return dict(
        timesteps=ts, sigmas=sig, x0_x=p, x0_out=q, next_x=next_x, next_x0=next_x0, next_prev_x0=next_prev_x0
    )


def _euler(sch: NoiseSchedule, k: int, abar: torch.Tensor) -> dict:
    ts = _timesteps(sch, "euler", k)
    interp = np.interp(ts, np.arange(sch.num_train_timesteps), _sigma_table(abar)).astype(np.float32)
    sig = torch.from_numpy(np.append(interp, np.float32(0.0))).to(torch.float64)
    # Euler in x / sqrt(abar) space is exactly a first-order (DDIM) step in x0 form.
    alpha, sigma_vp, next_x, next_x0 = _first_order(sig)
    p, q = _vp_x0(sch.prediction_type, alpha[:-1], sigma_vp[:-1])
    return dict(
        timesteps=ts, sigmas=sig, x0_x=p, x0_out=q, next_x=next_x, next_x0=next_x0,
        # diffusers' init_noise_sigma in VP space: sigma_max (linspace, trailing) or sqrt(sigma_max^2 + 1) (leading).
        init_scale=1.0 if sch.spacing("euler") == "leading" else float(sigma_vp[0]),
    )  # fmt: skip


def _flow_euler(sch: NoiseSchedule, k: int) -> dict:
    t, shift = sch.num_train_timesteps, sch.flow_shift
    # diffusers' sigma_min is the shifted sigma of train step 1 in float32; the inference grid is shifted again.
    smin = torch.tensor([1.0], dtype=torch.float32) / t
    smin = float(shift * smin / (1 + (shift - 1) * smin))
    u = np.linspace(t, smin * t, k) / t
    sig32 = torch.from_numpy(shift * u / (1 + (shift - 1) * u)).to(torch.float32)
    sig = torch.cat([sig32, sig32.new_zeros(1)]).to(torch.float64)
    ones = torch.ones(k, dtype=torch.float64)
    return dict(
        timesteps=(sig32 * t).numpy(), sigmas=sig, x0_x=ones, x0_out=-sig[:-1], next_x=ones,
        next_out=sig[1:] - sig[:-1],
    )  # fmt: skip


def make_plan(name: str, schedule: NoiseSchedule, steps: int, device: str | torch.device = "cpu") -> SamplerPlan:
    """Unroll sampler `name` over `steps` steps of `schedule`; all coefficients are computed here, in float64."""
    _check_choice("--sampler", name, SAMPLERS)
    t = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= t:
        raise UsageError(f"--steps {steps!r} is out of range; use an integer from 1 to {t} (num_train_timesteps).")
    flow = schedule.prediction_type == "flow"
    if flow and name != "euler":
        raise UsageError(
            f"--sampler {name} cannot sample a flow model (prediction_type='flow'); use --sampler euler."
        )
    if not flow:
        ts = _timesteps(schedule, name, steps)
        if ts.max() >= t or ts.min() < 0:
            raise UsageError(
                f"--steps {steps} with timestep_spacing={schedule.spacing(name)!r} and steps_offset="
                f"{schedule.steps_offset} reaches timestep {int(ts.max())}, past num_train_timesteps={t}; "
                "use fewer steps or a smaller steps_offset."
            )
    if flow:
        parts = _flow_euler(schedule, steps)
    else:
        parts = {"ddpm": _ddpm, "ddim": _ddim, "dpmpp_2m": _dpmpp_2m, "euler": _euler}[name](
            schedule, steps, schedule.alphas_cumprod()
        )
    init_scale = parts.pop("init_scale", 1.0)
    zeros = torch.zeros(steps, dtype=torch.float64)
    coef = {n: parts.get(n, zeros) for n in ("next_x", "next_x0", "next_prev_x0", "next_out", "next_noise")}
    assert float(coef["next_noise"][-1]) == 0.0 and float(coef["next_prev_x0"][0]) == 0.0

    def dev(v) -> torch.Tensor:
        return torch.as_tensor(v).to(device=device, dtype=torch.float32)

    return SamplerPlan(
        name=name,
        steps=steps,
        prediction_type=schedule.prediction_type,
        timesteps=dev(np.asarray(parts["timesteps"], dtype=np.float32)),
        sigmas=dev(parts["sigmas"]),
        init_scale=init_scale,
        stochastic=bool(coef["next_noise"].any()),
        clip_sample=schedule.clip_sample and name in ("ddpm", "ddim"),
        clip_sample_range=float(schedule.clip_sample_range),
        x0_x=dev(parts["x0_x"]),
        x0_out=dev(parts["x0_out"]),
        **{n: dev(v) for n, v in coef.items()},
    )


# ----------------------------------------------------------------------------------------------------------------
# Stepping
# ----------------------------------------------------------------------------------------------------------------


def sampler_step(
    plan: SamplerPlan,
    k: int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    prev_x0: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step k: (x_next, x0_pred), both shaped like x (B, C, H, W) and typed like x and model_output.

    Pure and sync-free, so it compiles with fullgraph=True. prev_x0 is step k-1's x0_pred (None at k = 0);
    noise is N(0, I) shaped like x, or None where plan.next_noise[k] is 0.
    """
    x0 = plan.x0_x[k] * x + plan.x0_out[k] * model_output
    if plan.clip_sample:
        x0 = x0.clamp(-plan.clip_sample_range, plan.clip_sample_range)
    x_next = plan.next_x[k] * x + plan.next_x0[k] * x0 + plan.next_out[k] * model_output
    if prev_x0 is not None:
        x_next = x_next + plan.next_prev_x0[k] * prev_x0
    if noise is not None:
        x_next = x_next + plan.next_noise[k] * noise
    return x_next, x0


def sample(
    plan: SamplerPlan,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    noise_fn: Callable[[int], torch.Tensor],
    step: Callable = None,
) -> torch.Tensor:
    """Run all steps from x_T ~ N(0, I) (B, ...) and return the sample, shaped and typed like x_T.

    model_fn(x, t) gets t as a (B,) tensor of plan.timesteps[k]; noise_fn(k) is called once per step that adds
    noise (stochastic plans, every step but the last), in step order. `step` replaces `sampler_step` with
    the same signature (e.g. a fused guidance + update kernel that takes model_fn's output as it is).
    """
    step = step or sampler_step
    x, x0 = x_T * plan.init_scale, None
    for k in range(plan.steps):
        t = plan.timesteps[k].expand(x.shape[0])
        noisy = plan.stochastic and k < plan.steps - 1
        model_output = model_fn(x, t)
        x, x0 = step(plan, k, x, model_output, x0, noise_fn(k) if noisy else None)
    return x
