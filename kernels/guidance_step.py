"""Classifier-free guidance and one sampler step in a single elementwise pass.

With m the guided model output, every sampler of `synthgen.samplers` is one linear expression per step:

    m      = out_uncond + cfg * (out_cond - out_uncond)        (m = out_cond when there is no uncond half)
    x0     = clamp(x0_x[k] * x + x0_out[k] * m)                 clamp only when plan.clip_sample
    x_next = next_x[k] * x + next_x0[k] * x0 + next_prev_x0[k] * prev_x0 + next_out[k] * m
             + next_noise[k] * noise

Unfused that is ~12 elementwise kernels and as many full-size temporaries; fused, each input is read once
and x_next, x0 written once. The per-step coefficients are read from the plan's (K,) device tensors inside
the kernel, so the step needs no host sync and no per-step tensor ops.

`plan` is duck-typed (this package never imports the engine): anything with `steps`, `clip_sample`,
`clip_sample_range` and the seven (K,) float32 tensors x0_x, x0_out, next_x, next_x0, next_prev_x0,
next_out, next_noise on the sampling device, i.e. `synthgen.samplers.SamplerPlan`.
"""

import torch

from synthgen.kernels._triton import check_device, require_triton, tl, triton

__all__ = ["COEFFICIENTS", "guided_step_ref", "guided_step_supported", "guided_step_triton"]

COEFFICIENTS = ("x0_x", "x0_out", "next_x", "next_x0", "next_prev_x0", "next_out", "next_noise")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- Reference ----


def guided_step_ref(
    plan,
    k: int,
    x: torch.Tensor,
    out_cond: torch.Tensor,
    out_uncond: torch.Tensor | None = None,
    cfg: float | torch.Tensor = 1.0,
    prev_x0: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, x0) as plain torch ops, typed like x. cfg is a float or a (B,) tensor."""
    m = out_cond if out_uncond is None else out_uncond + _per_sample(cfg, x) * (out_cond - out_uncond)
    x0 = plan.x0_x[k] * x + plan.x0_out[k] * m
    if plan.clip_sample:
        x0 = x0.clamp(-plan.clip_sample_range, plan.clip_sample_range)
    x_next = plan.next_x[k] * x + plan.next_x0[k] * x0 + plan.next_out[k] * m
    if prev_x0 is not None:
        x_next = x_next + plan.next_prev_x0[k] * prev_x0
    if noise is not None:
        x_next = x_next + plan.next_noise[k] * noise
    return x_next, x0


def _per_sample(cfg: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    if isinstance(cfg, torch.Tensor) and cfg.ndim == 1:
        return cfg.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
    return cfg


# ---- Kernel ----


@triton.jit(do_not_specialize=["k"])  # one compiled kernel for every step index
def _guided_step_kernel(
    X, COND, UNCOND, PREV, NOISE, CFG, X_NEXT, X0,  # contiguous tensors shaped like x; CFG is (B,) if per sample
    C_X0_X, C_X0_OUT, C_NEXT_X, C_NEXT_X0, C_NEXT_PREV, C_NEXT_OUT, C_NEXT_NOISE,  # the plan's (K,) tables
    k, n, per_sample,  # step index; numel; elements per sample (element i is sample i // per_sample)
    cfg_scalar, clip_range,
    HAS_UNCOND: tl.constexpr, CFG_PER_SAMPLE: tl.constexpr, HAS_PREV: tl.constexpr,
    HAS_NOISE: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n

    m = tl.load(COND + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        if CFG_PER_SAMPLE:
            cfg = tl.load(CFG + offs // per_sample, mask=ok, other=0.0).to(tl.float32)
        else:
            cfg = cfg_scalar
        u = tl.load(UNCOND + offs, mask=ok, other=0.0).to(tl.float32)
        m = u + cfg * (m - u)

    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    x0 = tl.load(C_X0_X + k) * x + tl.load(C_X0_OUT + k) * m
    if CLIP:
        # NaN must survive the clamp so a diverged sample still reads as NaN downstream.
        x0 = tl.clamp(x0, -clip_range, clip_range, propagate_nan=tl.PropagateNan.ALL)
    x_next = tl.load(C_NEXT_X + k) * x + tl.load(C_NEXT_X0 + k) * x0 + tl.load(C_NEXT_OUT + k) * m
    if HAS_PREV:
        x_next += tl.load(C_NEXT_PREV + k) * tl.load(PREV + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_NOISE:
        x_next += tl.load(C_NEXT_NOISE + k) * tl.load(NOISE + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(X_NEXT + offs, x_next.to(X_NEXT.dtype.element_ty), mask=ok)
    tl.store(X0 + offs, x0.to(X0.dtype.element_ty), mask=ok)


# ---- Launcher ----


def guided_step_supported(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    return x.dtype in DTYPES and x.numel() > 0 and all(
        o is None or (o.shape == x.shape and o.dtype in DTYPES) for o in others
    )


def _coefficients(plan, k: int, device: torch.device) -> list[torch.Tensor]:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < plan.steps:
        raise ValueError(f"guided_step: step index k={k!r} must be an int in [0, {plan.steps})")
    tables = [getattr(plan, name) for name in COEFFICIENTS]
    for name, t in zip(COEFFICIENTS, tables):
        if t.dtype != torch.float32 or t.device != device or t.shape != (plan.steps,):
            raise ValueError(
                f"guided_step: plan.{name} must be a ({plan.steps},) float32 tensor on {device}, got "
                f"{tuple(t.shape)} {t.dtype} on {t.device}; build the plan on the sampling device"
            )
    return [t.contiguous() for t in tables]


def guided_step_triton(
    plan,
    k: int,
    x: torch.Tensor,
    out_cond: torch.Tensor,
    out_uncond: torch.Tensor | None = None,
    cfg: float | torch.Tensor = 1.0,
    prev_x0: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused guidance + step k of `plan`: -> (x_next, x0), both shaped and typed like x (B, ...).

    Inputs may be float16/bfloat16/float32 (math is float32). cfg is a float or a (B,) tensor. `out` is an
    optional preallocated (x_next, x0) pair, contiguous and typed like x.
    """
    require_triton("guided_step")
    if not guided_step_supported(x, out_cond, out_uncond, prev_x0, noise):
        raise ValueError(
            f"guided_step: x, out_cond, out_uncond, prev_x0 and noise must share x's shape {tuple(x.shape)} and be "
            f"float16/bfloat16/float32 (x is {x.dtype})"
        )
    given = [t for t in (x, out_cond, out_uncond, prev_x0, noise) if t is not None]
    check_device("guided_step", *given)
    coef = _coefficients(plan, k, x.device)
    per_sample_cfg = isinstance(cfg, torch.Tensor) and cfg.ndim == 1
    if per_sample_cfg and (cfg.shape != (x.shape[0],) or cfg.device != x.device):
        raise ValueError(f"guided_step: a tensor cfg must be ({x.shape[0]},) on {x.device}, got {tuple(cfg.shape)}")
    if isinstance(cfg, torch.Tensor) and not per_sample_cfg:
        raise ValueError("guided_step: cfg must be a float or a (B,) tensor (a 0-d tensor would need a host sync)")

    x, cond = x.contiguous(), out_cond.contiguous()
    # Unused pointer slots get x: the constexpr flags compile their loads away.
    uncond, prev, noise_ = (t.contiguous() if t is not None else x for t in (out_uncond, prev_x0, noise))
    if out is None:
        out = (torch.empty_like(x), torch.empty_like(x))
    for o in out:
        if o.shape != x.shape or o.dtype != x.dtype or not o.is_contiguous() or o.device != x.device:
            raise ValueError(f"guided_step: out tensors must be contiguous {tuple(x.shape)} {x.dtype} on {x.device}")
    n = x.numel()
    _guided_step_kernel[(triton.cdiv(n, block),)](
        x, cond, uncond, prev, noise_, cfg if per_sample_cfg else x, out[0], out[1],
        *coef,
        k, n, n // x.shape[0],
        0.0 if per_sample_cfg else float(cfg), float(plan.clip_sample_range),
        HAS_UNCOND=out_uncond is not None, CFG_PER_SAMPLE=per_sample_cfg, HAS_PREV=prev_x0 is not None,
        HAS_NOISE=noise is not None, CLIP=bool(plan.clip_sample), BLOCK=block,
    )  # fmt: skip
    return out[0], out[1]
