"""Contracts of engine/samplers.py, and agreement with the diffusers schedulers each sampler reimplements."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)

from synthgen.errors import UsageError
from synthgen.samplers import SAMPLERS, NoiseSchedule, SamplerPlan, make_plan, sample, sampler_step

# diffusers' Euler and DPM-Solver call np.array(tensor) in a way numpy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 4, 8, 8)
ATOL = 3e-5  # float32 rounding of the schedule, amplified up to ~15x by 1 / sqrt(abar) at high t


@pytest.fixture(scope="module")
def model_fn():
    """A real, tiny, seeded UNet conditioned on one fixed random token; returns f(x, t) -> (B, 4, 8, 8)."""
    # One thread: the UNet is too small to gain from more, and on a shared CI box extra threads stall.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        layers_per_block=1,
        norm_num_groups=8,
    ).eval()
    context = torch.randn(SHAPE[0], 1, 16, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=context).sample

    yield fn
    torch.set_num_threads(threads)


def _x_T(seed: int = 2) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _diffusers_scheduler(name: str, sch: NoiseSchedule):
    common = dict(
        num_train_timesteps=sch.num_train_timesteps,
        beta_schedule=sch.beta_schedule,
        beta_start=sch.beta_start,
        beta_end=sch.beta_end,
    )
    if sch.prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=sch.num_train_timesteps, shift=sch.flow_shift)
    clip = dict(clip_sample=sch.clip_sample, clip_sample_range=sch.clip_sample_range)
    common.update(timestep_spacing=sch.spacing(name), steps_offset=sch.steps_offset)
    if name == "ddpm":
        return DDPMScheduler(**common, **clip, prediction_type=sch.prediction_type, variance_type="fixed_small")
    if name == "ddim":
        return DDIMScheduler(**common, **clip, prediction_type=sch.prediction_type,
                             set_alpha_to_one=sch.set_alpha_to_one)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(
            **common, prediction_type=sch.prediction_type, solver_order=2, algorithm_type="dpmsolver++",
            final_sigmas_type="zero", lower_order_final=True,
        )  # fmt: skip
    return EulerDiscreteScheduler(
        **common, prediction_type=sch.prediction_type, interpolation_type="linear", final_sigmas_type="zero",
    )  # fmt: skip


def _diffusers_sample(name: str, sch: NoiseSchedule, steps: int, model_fn, x_T: torch.Tensor, seed: int):
    """The standard diffusers pipeline loop; per-step noise comes from `seed` through `generator`."""
    scheduler = _diffusers_scheduler(name, sch)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    flow = sch.prediction_type == "flow"  # FlowMatchEuler neither scales its start nor its model input
    x = x_T if flow else x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        m = model_fn(x if flow else scheduler.scale_model_input(x, t), t)
        kwargs = {"generator": gen} if name == "ddpm" else {}
        x = scheduler.step(m, t, x, **kwargs).prev_sample
    return x


def _noise_fn(seed: int):
    gen = torch.Generator().manual_seed(seed)
    calls = []

    def fn(k: int) -> torch.Tensor:
        calls.append(k)
        return torch.randn(SHAPE, generator=gen)

    fn.calls = calls
    return fn


LINEAR = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # DDPM-paper schedule
# (sampler, schedule, steps): every valid (sampler, prediction_type) pair, clip on/off for ddpm/ddim.
REFERENCE_CASES = [
    (name, NoiseSchedule(prediction_type=pred, clip_sample=clip), steps)
    for name in ("ddpm", "ddim")
    for pred in ("epsilon", "v_prediction")
    for clip in (False, True)
    for steps in (1, 4, 10)
]
REFERENCE_CASES += [
    (name, NoiseSchedule(prediction_type=pred), steps)
    for name in ("dpmpp_2m", "euler")
    for pred in ("epsilon", "v_prediction")
    for steps in (1, 4, 10)
]
REFERENCE_CASES += [
    ("euler", NoiseSchedule(prediction_type="flow", flow_shift=shift), steps)
    for shift in (1.0, 3.0)
    for steps in (1, 4, 10)
]
REFERENCE_CASES += [
    ("ddim", NoiseSchedule(clip_sample=True, clip_sample_range=0.5), 4),
    ("dpmpp_2m", NoiseSchedule(prediction_type="epsilon"), 25),
    ("ddpm", dataclasses.replace(LINEAR, clip_sample=True), 25),
    ("ddim", NoiseSchedule(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=True), 10),
    ("euler", dataclasses.replace(LINEAR, prediction_type="v_prediction"), 10),
]
# Imported scheduler configs: every spacing, SD-1.x's steps_offset=1 / set_alpha_to_one=False, and x0 ("sample")
# prediction, so a diffusers scheduler_config.json drives these samplers exactly.
REFERENCE_CASES += [
    (name, NoiseSchedule(timestep_spacing=spacing, steps_offset=offset), steps)
    for name in SAMPLERS
    for spacing in ("leading", "trailing", "linspace")
    for offset in ((0, 1) if spacing == "leading" else (0,))
    for steps in (3, 10)
]
REFERENCE_CASES += [
    ("ddim", NoiseSchedule(steps_offset=1, set_alpha_to_one=False), 10),
    ("ddim", NoiseSchedule(timestep_spacing="trailing", set_alpha_to_one=False), 4),
]
REFERENCE_CASES += [
    (name, NoiseSchedule(prediction_type="sample", clip_sample=name in ("ddpm", "ddim")), steps)
    for name in SAMPLERS
    for steps in (1, 4)
]


def _case_id(case) -> str:
    name, sch, steps = case
    clip = "-clip" if sch.clip_sample else ""
    spacing = f"-{sch.timestep_spacing}+{sch.steps_offset}" + ("" if sch.set_alpha_to_one else "-abar0")
    return f"{name}-{sch.prediction_type}-{sch.beta_schedule}{clip}-shift{sch.flow_shift:g}{spacing}-{steps}"


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=_case_id)
def test_matches_diffusers(case, model_fn):
    name, sch, steps = case
    x_T = _x_T()
    noise_fn = _noise_fn(seed=3)
    ours = sample(make_plan(name, sch, steps), model_fn, x_T, noise_fn)
    ref = _diffusers_sample(name, sch, steps, model_fn, x_T, seed=3)
    err = (ours - ref).abs().max().item()
    assert err <= ATOL * max(1.0, ref.abs().max().item()), f"max |ours - diffusers| = {err:.3g}"
    assert noise_fn.calls == (list(range(steps - 1)) if name == "ddpm" else [])


# ----------------------------------------------------------------------------------------------------------------
# Contracts, one parametrized suite over every sampler
# ----------------------------------------------------------------------------------------------------------------


def _linear_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Cheap stand-in that still depends on both inputs, so shape/determinism checks run in milliseconds.
    return 0.5 * x + 1e-3 * t.to(x.dtype).view(-1, *[1] * (x.dim() - 1))


@pytest.mark.parametrize("name", SAMPLERS)
def test_plan_shapes_and_dtypes(name):
    plan = make_plan(name, NoiseSchedule(), 7)
    assert isinstance(plan, SamplerPlan) and plan.steps == 7
    assert plan.timesteps.shape == (7,) and plan.timesteps.dtype == torch.float32
    assert plan.sigmas.shape == (8,) and plan.sigmas[-1] == 0
    for f in ("x0_x", "x0_out", "next_x", "next_x0", "next_prev_x0", "next_out", "next_noise"):
        coef = getattr(plan, f)
        assert coef.shape == (7,) and coef.dtype == torch.float32 and torch.isfinite(coef).all(), f
    assert plan.stochastic == (name == "ddpm")
    assert torch.all(plan.timesteps[:-1] > plan.timesteps[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SAMPLERS)
def test_sample_shape_dtype_and_determinism(name, dtype):
    plan = make_plan(name, NoiseSchedule(clip_sample=True), 5)
    x_T = _x_T().to(dtype)
    outs = [sample(plan, _linear_model, x_T, lambda k: _x_T(10 + k).to(dtype)) for _ in range(2)]
    assert outs[0].shape == SHAPE and outs[0].dtype == dtype
    assert torch.isfinite(outs[0].float()).all()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", SAMPLERS)
def test_step_returns_x0_and_final_step_is_clean(name):
    """At the last step the state reaches noise level 0, so x_next equals the x0 prediction."""
    plan = make_plan(name, NoiseSchedule(), 3)
    x, m, prev = _x_T(4), _x_T(5), _x_T(6)
    x_next, x0 = sampler_step(plan, 2, x, m, prev, None)
    assert x_next.shape == x0.shape == SHAPE
    torch.testing.assert_close(x_next, x0, atol=1e-5, rtol=1e-5)


def test_flow_plan_follows_flow_convention():
    plan = make_plan("euler", NoiseSchedule(prediction_type="flow", flow_shift=3.0), 4)
    assert plan.init_scale == 1.0 and plan.sigmas[0] == 1.0
    torch.testing.assert_close(plan.timesteps, plan.sigmas[:-1] * 1000)
    # With a perfect velocity the first step recovers x0 exactly: x0 = x_T - v, v = x_T - x0.
    x_T, x0 = _x_T(7), _x_T(8)
    _, x0_pred = sampler_step(plan, 0, x_T, x_T - x0, None, None)
    torch.testing.assert_close(x0_pred, x0)


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m"])
def test_sampler_step_compiles_fullgraph(name):
    """A graph break or host sync fails here; ddpm covers the clamp and noise terms, dpmpp_2m the x0 history."""
    plan = make_plan(name, NoiseSchedule(clip_sample=True), 4)
    k = 1
    x, m, prev, noise = _x_T(4), _x_T(5), _x_T(6), _x_T(7)

    def step(x, m, prev, noise):
        return sampler_step(plan, k, x, m, prev, noise)

    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(x, m, prev, noise), step(x, m, prev, noise)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Validation: every bad input is a UsageError naming the option
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: make_plan("heun", NoiseSchedule(), 4), "--sampler"),
        (lambda: make_plan("ddim", NoiseSchedule(), 0), "--steps"),
        (lambda: make_plan("ddim", NoiseSchedule(), 1001), "--steps"),
        (lambda: make_plan("ddim", NoiseSchedule(), 2.0), "--steps"),
        (lambda: NoiseSchedule(beta_schedule="cosine"), "beta_schedule"),
        (lambda: NoiseSchedule(prediction_type="x0"), "prediction_type"),
        (lambda: NoiseSchedule(timestep_spacing="karras"), "timestep_spacing"),
        (lambda: NoiseSchedule(steps_offset=-1), "steps_offset"),
        (lambda: NoiseSchedule(prediction_type="flow", timestep_spacing="trailing"), "flow"),
        (lambda: make_plan("ddim", NoiseSchedule(steps_offset=999), 10), "steps_offset"),
        (lambda: NoiseSchedule(beta_start=0.02, beta_end=0.01), "beta_start"),
        (lambda: NoiseSchedule(num_train_timesteps=0), "num_train_timesteps"),
        (lambda: NoiseSchedule(clip_sample_range=0.0), "clip_sample_range"),
        (lambda: NoiseSchedule(flow_shift=-1.0), "flow_shift"),
        (lambda: NoiseSchedule(beta_end="0.012"), "beta_end"),
        (lambda: NoiseSchedule.from_dict({"beta_shedule": "linear"}), "beta_shedule"),
    ],
)
def test_bad_input_raises_usage_error(call, needle):
    with pytest.raises(UsageError, match=needle):
        call()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_flow_model_needs_euler(name):
    with pytest.raises(UsageError, match="--sampler euler"):
        make_plan(name, NoiseSchedule(prediction_type="flow"), 4)


def test_schedule_round_trips_through_dict():
    sch = NoiseSchedule(beta_schedule="linear", prediction_type="v_prediction", clip_sample=True, flow_shift=2.0)
    assert NoiseSchedule.from_dict(sch.to_dict()) == sch
    sd = NoiseSchedule(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    assert NoiseSchedule.from_dict(sd.to_dict()) == sd


def test_later_fields_leave_old_schedules_canonical_json_unchanged():
    """Packs written before timestep_spacing existed keep their hash: default values are not serialised."""
    assert set(NoiseSchedule().to_dict()) == {
        "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "clip_sample",
        "clip_sample_range", "flow_shift"}
    assert NoiseSchedule(steps_offset=1).to_dict()["steps_offset"] == 1


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_matches_diffusers(beta_schedule):
    sch = NoiseSchedule(beta_schedule=beta_schedule)
    ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=sch.beta_start, beta_end=sch.beta_end).alphas_cumprod
    ours = sch.alphas_cumprod()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours, ref.to(torch.float64), atol=1e-7, rtol=1e-6)
