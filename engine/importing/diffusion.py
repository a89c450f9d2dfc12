"""Denoisers, VAEs and noise schedules from diffusers folders (or a trusted whole-object pickle).

- UNet: a `UNet2DConditionModel` folder (config.json + diffusion_pytorch_model.safetensors), the `unet/` of a
  pipeline folder, or a pickle of the whole module (`torch.save(unet)`, the published training code's
  format; --trust-pickle) or of its state dict with config.json beside it.
- VAE: an `AutoencoderKL` or `AutoencoderTiny` folder; its `scaling_factor` comes from its config.
- Scheduler: a diffusers scheduler config (scheduler_config.json, or a scheduler/ folder): beta schedule,
  prediction type (epsilon, v_prediction, sample), timestep spacing and offset become the pack's
  `NoiseSchedule`, which drives synthgen's own samplers exactly as that scheduler would.

The config stored in the pack is diffusers' own init dict (`extract_init_dict`), and the weights keep
diffusers' key names, so the pack's network is built by the same class from the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from synthgen.errors import UsageError
from synthgen.importing.checkpoints import license_of, load_checkpoint, read_json, weights_in
from synthgen.samplers import NoiseSchedule

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
# UNet config keys whose features need inputs synthgen's one-token conditioning does not give.
_UNSUPPORTED_UNET = ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim",
                     "num_class_embeds")
VAE_CLASSES = {"AutoencoderKL": "autoencoder_kl", "AutoencoderTiny": "autoencoder_tiny"}
# Scheduler classes whose config describes a VP diffusion process, and the sampler closest to each.
SCHEDULER_SAMPLERS = {
    "DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "PNDMScheduler": "ddim", "DPMSolverMultistepScheduler":
    "dpmpp_2m", "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler",
    "LMSDiscreteScheduler": "euler", "UniPCMultistepScheduler": "dpmpp_2m", "FlowMatchEulerDiscreteScheduler": "euler",
}
# The published recipe's schedule (SD-1.x), selectable as --scheduler sd.
SD_SCHEDULER_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False}


@dataclass
class Component:
    """A diffusers network read from its source: class, init dict, weights, provenance."""

    kind: str  # synthgen's kind: "unet2d" | "autoencoder_kl" | "autoencoder_tiny"
    source_class: str
    path: Path
    config: dict
    state: dict[str, torch.Tensor]
    from_pickle: bool
    license: str = ""


@dataclass
class Schedule:
    schedule: NoiseSchedule
    source_class: str
    path: str
    sampler: str  # the synthgen sampler closest to the source scheduler


def pipeline_parts(folder: Path) -> dict[str, Path]:
    """{"unet": ..., "vae": ..., "scheduler": ...} of a diffusers pipeline folder (model_index.json)."""
    folder = Path(folder)
    parts = {}
    for name in ("unet", "vae", "scheduler"):
        if (folder / name).is_dir():
            parts[name] = folder / name
    return parts


def is_pipeline(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def _init_dict(cls, config: dict) -> dict:
    init, _unused = cls.extract_init_dict(dict(config))[:2]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in init.items()}


def read_unet(src: Path, trust_pickle: bool = False) -> Component:
    from diffusers import UNet2DConditionModel

    src = Path(src)
    if is_pipeline(src):
        if "unet" not in pipeline_parts(src):
            raise UsageError(f"the pipeline folder {src} has no unet/ folder")
        src = src / "unet"
    if src.is_dir():
        config = read_json(src / "config.json", "denoiser")
        loaded = load_checkpoint(weights_in(src, DIFFUSERS_WEIGHTS, "denoiser"), "denoiser", trust_pickle)
        license = license_of(src)
    elif src.is_file():
        loaded = load_checkpoint(src, "denoiser", trust_pickle)
        if loaded.module is not None:  # torch.save(unet): the object carries its own config
            if not isinstance(loaded.module, UNet2DConditionModel):
                raise UsageError(f"the denoiser pickle {src} holds a {type(loaded.module).__name__}; synthgen "
                                 "imports diffusers UNet2DConditionModel objects")
            config = dict(loaded.module.config)
        else:
            config = read_json(src.parent / "config.json", "denoiser (config.json beside a bare state dict)")
        license = ""
    else:
        raise UsageError(f"the denoiser source {src} does not exist")
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise UsageError(f"the denoiser {src} is a {class_name}; synthgen imports UNet2DConditionModel (the "
                         "published recipe's denoiser), or use a synthgen DiT pack")
    init = _init_dict(UNet2DConditionModel, config)
    used = [k for k in _UNSUPPORTED_UNET if init.get(k) is not None]
    if used:
        raise UsageError(f"the denoiser {src} sets {', '.join(f'{k}={init[k]!r}' for k in used)}: it needs inputs "
                         "beyond the representation token, which synthgen does not give")
    if init.get("out_channels") != init.get("in_channels"):
        raise UsageError(f"the denoiser {src} has in_channels={init.get('in_channels')} but out_channels="
                         f"{init.get('out_channels')} (a learned variance?); synthgen samples fixed-variance models")
    state = loaded.tensors if loaded.tensors is not None else loaded.module.state_dict()
    return Component("unet2d", class_name, src, init, state, loaded.from_pickle, license)


def read_vae(src: Path, trust_pickle: bool = False) -> Component:
    import diffusers

    src = Path(src)
    if is_pipeline(src):
        if "vae" not in pipeline_parts(src):
            raise UsageError(f"the pipeline folder {src} has no vae/ folder")
        src = src / "vae"
    if not src.is_dir():
        raise UsageError(f"the VAE source {src} must be a diffusers folder (config.json + weights)")
    config = read_json(src / "config.json", "VAE")
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name not in VAE_CLASSES:
        raise UsageError(f"the VAE {src} is a {class_name}; supported: {', '.join(VAE_CLASSES)}")
    init = _init_dict(getattr(diffusers, class_name), config)
    if init.get("shift_factor") not in (None, 0, 0.0) or init.get("latents_mean") is not None:
        raise UsageError(f"the VAE {src} shifts or standardises its latents (shift_factor / latents_mean); only a "
                         "scaling_factor is supported")
    loaded = load_checkpoint(weights_in(src, DIFFUSERS_WEIGHTS, "VAE"), "VAE", trust_pickle)
    return Component(VAE_CLASSES[class_name], class_name, src, init, loaded.tensors, loaded.from_pickle,
                     license_of(src))


def read_scheduler(src: str | Path) -> Schedule:
    """A diffusers scheduler config as a NoiseSchedule; "sd" names the SD-1.x schedule of the published recipe."""
    if str(src) == "sd":
        config, where = SD_SCHEDULER_CONFIG, "sd"
    else:
        path = Path(src)
        if is_pipeline(path):
            path = path / "scheduler"
        if path.is_dir():
            path = path / "scheduler_config.json"
        config, where = read_json(path, "scheduler"), str(path)
    class_name = config.get("_class_name", "DDPMScheduler")
    if class_name not in SCHEDULER_SAMPLERS:
        raise UsageError(f"the scheduler {where} is a {class_name}; supported: {', '.join(SCHEDULER_SAMPLERS)}")
    for key, ok in (("trained_betas", None), ("thresholding", False), ("rescale_betas_zero_snr", False),
                    ("use_karras_sigmas", False)):
        if config.get(key, ok) not in (ok, []):
            raise UsageError(f"the scheduler {where} sets {key}={config[key]!r}, which synthgen's samplers do not "
                             "reproduce; remove it from the config if the model was trained without it")
    if config.get("variance_type", "fixed_small") not in ("fixed_small", "fixed_small_log"):
        raise UsageError(f"the scheduler {where} has variance_type={config['variance_type']!r}; synthgen samples "
                         "fixed-variance models")
    if class_name == "FlowMatchEulerDiscreteScheduler":
        schedule = NoiseSchedule(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                                 prediction_type="flow", flow_shift=float(config.get("shift", 1.0)))
    else:
        spacing = config.get("timestep_spacing", "leading" if class_name in ("DDPMScheduler", "DDIMScheduler",
                                                                           "PNDMScheduler") else "linspace")
        schedule = NoiseSchedule(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_schedule=config.get("beta_schedule", "linear"),
            beta_start=float(config.get("beta_start", 0.0001)), beta_end=float(config.get("beta_end", 0.02)),
            prediction_type=config.get("prediction_type", "epsilon"),
            clip_sample=bool(config.get("clip_sample", class_name in ("DDPMScheduler", "DDIMScheduler"))),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            timestep_spacing=spacing, steps_offset=int(config.get("steps_offset", 0)),
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        )
    return Schedule(schedule, class_name, where, SCHEDULER_SAMPLERS[class_name])


def cross_attention_dim(unet: Component) -> int:
    """The representation width the UNet's cross-attention takes (one value, even if given per block)."""
    dim = unet.config.get("cross_attention_dim", 1280)
    dims = set(dim) if isinstance(dim, (list, tuple)) else {dim}
    if len(dims) != 1:
        raise UsageError(f"the denoiser {unet.path} has a different cross_attention_dim per block ({sorted(dims)}); "
                         "synthgen feeds one representation token to every block")
    return int(dims.pop())
