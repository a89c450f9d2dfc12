"""Fused CFG + sampler step vs synthgen.samplers.sampler_step on real plans of every sampler."""

from __future__ import annotations

import pytest
import torch

from synthgen.kernels.guidance_step import guided_step_ref, guided_step_triton
from synthgen.samplers import SAMPLERS, NoiseSchedule, make_plan, sampler_step

STEPS = 4
SCHEDULES = {
    "eps": NoiseSchedule(),
    "v-clip": NoiseSchedule(prediction_type="v_prediction", clip_sample=True, clip_sample_range=0.5),
}
PLANS = [(name, key) for name in SAMPLERS for key in SCHEDULES] + [("euler", "flow")]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _plan(name, key):
    sch = NoiseSchedule(prediction_type="flow", flow_shift=3.0) if key == "flow" else SCHEDULES[key]
    return make_plan(name, sch, STEPS)


def _tensors(shape=(3, 4, 5, 7), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 2).to(dtype) for _ in range(5)]  # x, cond, uncond, prev, noise


def _poisoned(x):
    return torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))


@pytest.mark.parametrize("name, key", PLANS)
def test_kernel_equals_sampler_step_on_real_plans(name, key) -> None:
    plan = _plan(name, key)
    x, cond, uncond, prev, noise = _tensors(seed=len(name))
    cfg = 3.5
    for k in range(plan.steps):
        prev_k = prev if k > 0 else None
        noise_k = noise if float(plan.next_noise[k]) != 0.0 else None
        got = guided_step_triton(plan, k, x, cond, uncond, cfg, prev_k, noise_k, out=_poisoned(x), block=64)
        m = uncond + cfg * (cond - uncond)  # what denoiser.guided hands the sampler
        want = sampler_step(plan, k, x, m, prev_k, noise_k)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)
        # The in-package reference is the same expression, so it agrees with the engine exactly on CPU.
        for r_, w_ in zip(guided_step_ref(plan, k, x, cond, uncond, cfg, prev_k, noise_k), want):
            assert torch.equal(r_, w_)


def test_no_uncond_and_per_sample_cfg() -> None:
    plan = _plan("dpmpp_2m", "eps")
    x, cond, uncond, prev, _ = _tensors(shape=(5, 3, 6, 6), seed=1)
    got = guided_step_triton(plan, 1, x, cond, None, 7.0, prev, out=_poisoned(x), block=128)
    for g_, w_ in zip(got, sampler_step(plan, 1, x, cond, prev, None)):
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)
    cfg = torch.tensor([1.0, 2.0, 3.0, 4.5, 0.0])
    got = guided_step_triton(plan, 2, x, cond, uncond, cfg, prev, out=_poisoned(x), block=128)
    m = uncond + cfg.view(-1, 1, 1, 1) * (cond - uncond)
    for g_, w_ in zip(got, sampler_step(plan, 2, x, m, prev, None)):
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype) -> None:
    plan = _plan("ddim", "v-clip")
    x, cond, uncond, _, _ = _tensors(shape=(2, 4, 9, 9), seed=2, dtype=dtype)
    got = guided_step_triton(plan, 0, x, cond, uncond, 2.0, out=_poisoned(x), block=128)
    assert all(t.dtype == dtype for t in got)
    want = guided_step_ref(plan, 0, x.float(), cond.float(), uncond.float(), 2.0)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.float(), w_, atol=TOL[dtype], rtol=TOL[dtype])


def test_nan_survives_clamp() -> None:
    # A diverged sample must still read as NaN downstream (the pipeline counts NaN batches).
    plan = _plan("ddim", "v-clip")
    x, cond, uncond, _, _ = _tensors(shape=(2, 3, 4, 4), seed=3)
    cond[1, 0, 0, 0] = float("nan")
    x_next, x0 = guided_step_triton(plan, 0, x, cond, uncond, 2.0)
    assert x0[1, 0, 0, 0].isnan() and x_next[1, 0, 0, 0].isnan()
    assert torch.isfinite(x0[0]).all() and torch.isfinite(x_next[0]).all()


def test_bad_step_and_shape_raise() -> None:
    plan = _plan("ddim", "eps")
    x, cond, *_ = _tensors(seed=4)
    with pytest.raises(ValueError, match="step index"):
        guided_step_triton(plan, STEPS, x, cond)
    with pytest.raises(ValueError, match="shape"):
        guided_step_triton(plan, 0, x, cond[:1])
