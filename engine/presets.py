"""Named pack presets with random weights at real architecture sizes.

Random packs exist for tests and throughput benchmarks: their images are noise. The small presets
embed with the patch-token mean: a randomly initialised ViT's CLS output barely depends on its input
(all digits embed to cos ~1.0 in float16), which would make filtering untestable. `paper` is the
published recipe's shape: an SD-1.x UNet on 32x32x4 SD-VAE latents of 256 px images, conditioned on a
DINOv2 ViT-B/14 CLS token through one cross-attention token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synthgen.errors import UsageError
from synthgen.options import PRESETS as PRESET_NAMES
from synthgen.models.denoiser import build_denoiser_module
from synthgen.models.dit import reinit_zero_params_
from synthgen.models.encoder import EncoderSpec, build_encoder_module
from synthgen.models.vae import build_vae_module
from synthgen.pack import DenoiserSpec, PackConfig, VAESpec, save_pack
from synthgen.samplers import NoiseSchedule

SD_SCHEDULE = NoiseSchedule(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="epsilon", clip_sample=False,
)
PIXEL_SCHEDULE = NoiseSchedule(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
    prediction_type="epsilon", clip_sample=True,
)

SD_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def _tiny() -> PackConfig:
    enc = EncoderSpec(
        model="vit_small_patch14_dinov2", dim=64, resize=32, crop=28, embedding="mean",
        kwargs=dict(embed_dim=64, depth=2, num_heads=2),
    )
    dit = dict(sample_size=32, in_channels=3, patch_size=4, hidden_size=64, depth=2, num_heads=2, cond_dim=64)
    return PackConfig(
        name="tiny", image_size=32, encoder=enc, schedule=PIXEL_SCHEDULE,
        denoiser=DenoiserSpec(kind="dit", config=dit, sample_shape=(3, 32, 32), cond_dim=64),
        description="pixel-space DiT on 32 px images with a 2-block DINOv2-layout encoder",
    )


def _tiny_unet() -> PackConfig:
    enc = EncoderSpec(
        model="vit_base_patch32_clip_224", dim=48, resize=32, crop=32, embedding="mean",
        mean=(0.4815, 0.4578, 0.4082), std=(0.2686, 0.2613, 0.2758),
        kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=2),
    )
    unet = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, attention_head_dim=8, norm_num_groups=16,
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    schedule = NoiseSchedule(**{**SD_SCHEDULE.to_dict(), "prediction_type": "v_prediction"})
    return PackConfig(
        name="tiny-unet", image_size=32, encoder=enc, schedule=schedule,
        denoiser=DenoiserSpec(kind="unet2d", config=unet, sample_shape=(4, 16, 16), cond_dim=48),
        vae=VAESpec(kind="autoencoder_kl", config=vae, scaling_factor=0.18215),
        description="latent UNet2DConditionModel (one cross-attention token, v-prediction) + small AutoencoderKL "
        "+ 2-block CLIP-layout encoder",
    )


def _tiny_flow() -> PackConfig:
    enc = EncoderSpec(
        model="vit_small_patch16_dinov3", dim=64, resize=32, crop=32, embedding="mean",
        kwargs=dict(embed_dim=64, depth=2, num_heads=2),
    )
    dit = dict(sample_size=4, in_channels=4, patch_size=1, hidden_size=64, depth=2, num_heads=2, cond_dim=64)
    vae = dict(
        encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
    )
    schedule = NoiseSchedule(num_train_timesteps=1000, prediction_type="flow", flow_shift=1.0)
    return PackConfig(
        name="tiny-flow", image_size=32, encoder=enc, schedule=schedule,
        denoiser=DenoiserSpec(kind="dit", config=dit, sample_shape=(4, 4, 4), cond_dim=64),
        vae=VAESpec(kind="autoencoder_tiny", config=vae, scaling_factor=1.0),
        description="latent flow-matching DiT + AutoencoderTiny + 2-block DINOv3-layout encoder",
    )


def _small() -> PackConfig:
    enc = EncoderSpec(
        model="vit_small_patch14_dinov2", dim=192, resize=64, crop=56, embedding="mean",
        kwargs=dict(embed_dim=192, depth=6, num_heads=3),
    )
    dit = dict(sample_size=16, in_channels=4, patch_size=2, hidden_size=384, depth=6, num_heads=6, cond_dim=192)
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    return PackConfig(
        name="small", image_size=64, encoder=enc, schedule=SD_SCHEDULE,
        denoiser=DenoiserSpec(kind="dit", config=dit, sample_shape=(4, 16, 16), cond_dim=192),
        vae=VAESpec(kind="autoencoder_kl", config=vae, scaling_factor=0.18215),
        description="latent DiT-S/2 on 16x16x4 latents of 64 px images + 6-block DINOv2-layout encoder",
    )


def _paper() -> PackConfig:
    enc = EncoderSpec(model="vit_base_patch14_dinov2", dim=768, resize=256, crop=224)
    return PackConfig(
        name="paper", image_size=256, encoder=enc, schedule=SD_SCHEDULE,
        denoiser=DenoiserSpec(kind="unet2d", config=SD_UNET, sample_shape=(4, 32, 32), cond_dim=768),
        vae=VAESpec(kind="autoencoder_kl", config=SD_VAE, scaling_factor=0.18215),
        description="SD-1.x UNet2DConditionModel on 32x32x4 SD-VAE latents, DINOv2 ViT-B/14 CLS as one "
        "cross-attention token (the published recipe's shapes)",
    )


PRESETS = {"tiny": _tiny, "tiny-unet": _tiny_unet, "tiny-flow": _tiny_flow, "small": _small, "paper": _paper}
assert tuple(PRESETS) == PRESET_NAMES, "options.PRESETS names the presets built here"


def preset_config(name: str) -> PackConfig:
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def write_random_pack(preset: str, out: str | Path, seed: int = 0) -> PackConfig:
    """Write a pack with random weights (images are noise) and return its config."""
    config = preset_config(preset)
    config = PackConfig(**{**config.__dict__, "random_weights": True,
                           "description": config.description + " -- RANDOM WEIGHTS: images are noise"})
    torch.manual_seed(seed)
    modules = {
        "encoder": build_encoder_module(config.encoder),
        "denoiser": reinit_zero_params_(build_denoiser_module(config.denoiser.kind, config.denoiser.config)),
    }
    if config.vae is not None:
        modules["vae"] = build_vae_module(config.vae.kind, config.vae.config)
    # The paper preset is ~1.2 B parameters: fp16 on disk halves it; compute dtype is chosen at load.
    return save_pack(out, config, modules, weight_dtype=torch.float16 if preset == "paper" else None)
