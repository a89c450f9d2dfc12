"""train distill: the student's grid and step are exactly what generate's DDIM runs, distillation moves the
student's few-step output towards the teacher's many-step output, and the student is a normal pack."""

from __future__ import annotations

import pytest
import torch

from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.pack import load_pack, read_pack_config
from synthgen.pipeline import run_generate
from synthgen.presets import write_random_pack
from synthgen.samplers import make_plan, sample
from synthgen.train.distill import DistillConfig, ddim_sample, distill_pack, student_schedule
from synthgen.verify import verify_run


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_training_grid_and_step_are_generates_ddim(tiny_pack, k):
    config = read_pack_config(tiny_pack)
    schedule = student_schedule(config.schedule)
    den = load_pack(tiny_pack, components=("denoiser",)).denoiser
    g = torch.Generator().manual_seed(k)
    x = torch.randn((3, *config.denoiser.sample_shape), generator=g)
    cond = torch.randn((3, config.denoiser.cond_dim), generator=g)
    with torch.no_grad():
        ours = ddim_sample(den, x, cond, schedule, k)
        theirs = sample(make_plan("ddim", schedule, k), lambda x, t: den(x, t, cond), x, lambda i: None)
    assert make_plan("ddim", schedule, k).timesteps[0] == schedule.num_train_timesteps - 1  # starts at noise
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_distillation_brings_two_steps_towards_the_teachers_four(tiny_pack, digits_bank, tmp_path):
    out = tmp_path / "student"
    cfg = DistillConfig(steps=2, teacher_steps=4, iterations=60, batch=16, lr=1e-3, pool=64, pool_steps=4)
    distill_pack(tiny_pack, out, cfg, bank_dir=digits_bank, log=None)
    teacher = load_pack(tiny_pack, components=("denoiser",)).denoiser
    student = load_pack(out, components=("denoiser",)).denoiser
    schedule = read_pack_config(out).schedule
    g = torch.Generator().manual_seed(123)  # held-out noise and conditions
    x = torch.randn((32, *read_pack_config(out).denoiser.sample_shape), generator=g)
    cond = torch.randn((32, read_pack_config(out).denoiser.cond_dim), generator=g)
    with torch.no_grad():
        target = ddim_sample(teacher, x, cond, schedule, 4)
        undistilled = (ddim_sample(teacher, x, cond, schedule, 2) - target).pow(2).mean()
        distilled = (ddim_sample(student, x, cond, schedule, 2) - target).pow(2).mean()
    assert distilled < 0.7 * undistilled, (float(distilled), float(undistilled))


def test_the_student_is_a_normal_pack_with_its_own_defaults(tiny_pack, digits_bank, tmp_path):
    from synthgen.cli import _inspect_lines

    out = tmp_path / "student"
    distill_pack(tiny_pack, out, DistillConfig(steps=1, teacher_steps=2, iterations=2, batch=4, pool=8,
                                               pool_steps=2), bank_dir=digits_bank, log=None)
    config = read_pack_config(out)
    assert config.distilled["steps"] == 1 and config.distilled["teacher"] == load_pack(tiny_pack).hash
    assert any(line.startswith("distilled   from pack") for line in _inspect_lines(out))
    gen = GenerateConfig(n=6, out=tmp_path / "run", pack=out, bank=digits_bank, device="cpu", dtype="fp32",
                         progress=False)
    assert (gen.sampler, gen.steps) == ("ddim", 1)
    assert run_generate(gen).complete and verify_run(tmp_path / "run").ok
    with pytest.raises(UsageError, match="not empty"):
        distill_pack(tiny_pack, out, DistillConfig(steps=1, teacher_steps=2), bank_dir=digits_bank, log=None)


def test_bad_distillations_are_refused(tmp_path, digits_bank):
    with pytest.raises(UsageError, match="1, 2 or 4"):
        DistillConfig(steps=3)
    with pytest.raises(UsageError, match="power of 2"):
        DistillConfig(steps=2, teacher_steps=6)
    write_random_pack("tiny-flow", tmp_path / "flow", seed=0)
    with pytest.raises(UsageError, match="flow-matching"):
        distill_pack(tmp_path / "flow", tmp_path / "s", DistillConfig(), bank_dir=digits_bank, log=None)
