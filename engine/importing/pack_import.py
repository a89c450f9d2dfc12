"""`synthgen pack import`: an encoder, a conditioned UNet, a VAE and a schedule from their own folders -> a pack.

Everything is read and checked before anything is written: the encoder's embedding width against the UNet's
cross_attention_dim (a CLIP projection is used when that is what fits), the UNet's channels against the VAE's
latents, the image size the UNet and VAE give against --image-size, and every converted state dict against
the network the pack will build (strict, on the meta device). The pack is then written to a temporary folder
beside --out and renamed, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from synthgen.errors import UsageError
from synthgen.importing.diffusion import (
    Component, cross_attention_dim, is_pipeline, pipeline_parts, read_scheduler, read_unet, read_vae,
)
from synthgen.importing.encoders import SourceEncoder, read_encoder
from synthgen.models.denoiser import build_denoiser_module
from synthgen.models.encoder import EncoderSpec, build_encoder_module
from synthgen.models.vae import build_vae_module, vae_downsample_factor
from synthgen.pack import DenoiserSpec, PackConfig, VAESpec, materialize, save_pack
from synthgen.recipes import Recipe, resolve_recipe

IMPORT_NULLS = ("none", "zeros", "mean")  # an imported UNet has no learned null: "none" refuses guidance


@dataclass(frozen=True)
class ImportOptions:
    encoder: Path
    denoiser: Path
    out: Path
    vae: Path | None = None  # default: the pipeline folder's vae/ when --denoiser is one
    scheduler: str | None = None  # a scheduler config, a pipeline folder, or "sd"; default: the pipeline's
    recipe: str = "auto"  # a synthgen.recipes name, a .toml/.json recipe file, or auto (the family's default)
    trust_pickle: bool = False
    null: str = "none"
    license: str = ""  # overrides what the sources' model cards say
    encoder_arch: str | None = None  # a timm architecture, for a bare timm safetensors file
    image_size: int | None = None  # checked against what the UNet and VAE give
    name: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.null not in IMPORT_NULLS:
            raise UsageError(f"--null {self.null!r} is not one of {', '.join(IMPORT_NULLS)}")
        for option in ("encoder", "denoiser", "out", "vae"):
            value = getattr(self, option)
            if value is not None:
                object.__setattr__(self, option, Path(value))


@dataclass
class ImportReport:
    config: PackConfig
    recipe: Recipe
    sampler: str  # the synthgen sampler closest to the source scheduler
    notes: list[str]


def import_pack(opts: ImportOptions) -> ImportReport:
    """Read, validate and convert the sources of `opts`, then write the pack to `opts.out`."""
    _check_out(opts)
    parts = pipeline_parts(opts.denoiser) if is_pipeline(opts.denoiser) else {}
    encoder = read_encoder(opts.encoder, opts.trust_pickle, opts.encoder_arch)
    unet = read_unet(opts.denoiser, opts.trust_pickle)
    vae_src = opts.vae or parts.get("vae")
    vae = read_vae(vae_src, opts.trust_pickle) if vae_src is not None else None
    scheduler_src = opts.scheduler or parts.get("scheduler")
    if scheduler_src is None:
        raise UsageError(
            f"--scheduler is needed: {opts.denoiser} is not a pipeline folder with a scheduler/, and sampling with "
            "another noise schedule than the model was trained with gives noise. Give the model's "
            "scheduler_config.json, or --scheduler sd for the SD-1.x schedule the published recipe trains with "
            "(scaled_linear 0.00085-0.012, 1000 steps, epsilon)"
        )
    schedule = read_scheduler(scheduler_src)
    recipe = resolve_recipe(opts.recipe, encoder.family, encoder.processor_config)
    notes = [f"recipe {recipe.name}" + (" (auto: the encoder family's default)" if opts.recipe == "auto" else "")]

    recipe, cond_dim = _fit_width(encoder, unet, recipe, notes)
    image_size, sample_shape = _fit_shapes(unet, vae, opts)
    model, kwargs, enc_state = encoder.convert(recipe.crop)
    spec = recipe.apply(EncoderSpec(model=model, dim=cond_dim, kwargs=kwargs))
    denoiser = DenoiserSpec(kind="unet2d", config=unet.config, sample_shape=sample_shape, cond_dim=cond_dim,
                            null_condition=opts.null)
    vae_spec = None if vae is None else VAESpec(kind=vae.kind, config=vae.config,
                                                scaling_factor=float(vae.config.get("scaling_factor", 1.0)))
    _check_weights(spec, enc_state, unet, vae)
    if opts.null == "none":
        notes.append("no learned null condition: guidance (--cfg > 1) needs generate --null zeros|mean")
    if any(c.from_pickle for c in (unet, vae) if c is not None) or encoder.from_pickle:
        notes.append("converted from a pickle (--trust-pickle) to safetensors; the pickle is not needed any more")
    config = PackConfig(
        name=opts.name or opts.out.name, image_size=image_size, encoder=spec, denoiser=denoiser,
        schedule=schedule.schedule, vae=vae_spec,
        description=f"imported: {encoder.source_class} encoder ({recipe.name}), {unet.source_class}"
        + (f", {vae.source_class}" if vae else "") + f", {schedule.source_class} schedule",
        provenance=_provenance(encoder, unet, vae, schedule),
        license=opts.license or _licenses(encoder, unet, vae),
    )
    modules = {"encoder": enc_state, "denoiser": unet.state}
    if vae is not None:
        modules["vae"] = vae.state
    written = _write_atomically(opts, config, modules)
    return ImportReport(written, recipe, schedule.sampler, notes)


def _check_out(opts: ImportOptions) -> None:
    out = opts.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the pack")
    if out.is_dir() and any(out.iterdir()) and not opts.overwrite:
        raise UsageError(f"--out {out} is not empty; choose another folder or pass --overwrite to replace it")


def _fit_width(encoder: SourceEncoder, unet: Component, recipe: Recipe, notes: list[str]) -> tuple[Recipe, int]:
    """The recipe and embedding width that feed the UNet's cross-attention; UsageError naming both sides."""
    want = cross_attention_dim(unet)
    if recipe.token == "projected":
        have = encoder.projection_dim
        if have is None:
            raise UsageError(f"the recipe reads a projection, but the encoder {encoder.path} has none")
    else:
        have = encoder.hidden
    if have == want:
        return recipe, want
    if recipe.token != "projected" and encoder.projection_dim == want:
        notes.append(f"the encoder's {encoder.hidden}-d token is projected to the UNet's {want}-d "
                     "(the checkpoint's visual projection)")
        return recipe.with_projection(), want
    proj = f" (its projection gives {encoder.projection_dim}-d)" if encoder.projection_dim else ""
    raise UsageError(
        f"the encoder {encoder.path} gives {have}-d embeddings{proj} but the denoiser {unet.path} cross-attends "
        f"to {want}-d (cross_attention_dim); they were not trained together: import the encoder the UNet was "
        "conditioned on"
    )


def _fit_shapes(unet: Component, vae: Component | None, opts: ImportOptions) -> tuple[int, tuple[int, int, int]]:
    """(image size, denoiser sample shape (C, H, W)) with the UNet's channels checked against the VAE's latents."""
    channels, side = int(unet.config["in_channels"]), unet.config.get("sample_size")
    if isinstance(side, (list, tuple)):
        if len(set(side)) != 1:
            raise UsageError(f"the denoiser {unet.path} has a non-square sample_size {side}; synthgen makes square "
                             "images")
        side = side[0]
    side = int(side)
    if vae is not None:
        latent = int(vae.config.get("latent_channels", 4))
        if latent != channels:
            raise UsageError(f"the denoiser {unet.path} takes {channels} input channels but the VAE {vae.path} has "
                             f"{latent} latent channels; use the VAE the UNet was trained on")
        image_size = side * vae_downsample_factor(vae.kind, vae.config)
    else:
        if channels != 3:
            raise UsageError(f"the denoiser {unet.path} takes {channels} channels: it works on latents and needs "
                             "the VAE they came from (--vae)")
        image_size = side
    if opts.image_size is not None and opts.image_size != image_size:
        where = f"sample_size {side} x the VAE's downsampling" if vae is not None else f"sample_size {side}"
        raise UsageError(f"--image-size {opts.image_size} does not match the {image_size} px that the denoiser "
                         f"{unet.path} makes ({where})")
    return image_size, (channels, side, side)


def _check_weights(spec: EncoderSpec, enc_state: dict, unet: Component, vae: Component | None) -> None:
    """Every state dict against the network the pack will build: strict, on the meta device (no copies)."""
    materialize(lambda: build_encoder_module(spec), enc_state, "encoder")
    materialize(lambda: build_denoiser_module("unet2d", unet.config), unet.state, "denoiser")
    if vae is not None:
        materialize(lambda: build_vae_module(vae.kind, vae.config), vae.state, "vae")


def _provenance(encoder: SourceEncoder, unet: Component, vae: Component | None, schedule) -> dict:
    def entry(path, source_class, from_pickle, license):
        return {"source": str(path), "class": source_class, "converted_from_pickle": bool(from_pickle),
                **({"license": license} if license else {})}

    out = {"encoder": entry(encoder.path, encoder.source_class, encoder.from_pickle, encoder.license),
           "denoiser": entry(unet.path, unet.source_class, unet.from_pickle, unet.license),
           "scheduler": {"source": schedule.path, "class": schedule.source_class}}
    if vae is not None:
        out["vae"] = entry(vae.path, vae.source_class, vae.from_pickle, vae.license)
    return out


def _licenses(encoder: SourceEncoder, unet: Component, vae: Component | None) -> str:
    named = [(n, c.license) for n, c in (("encoder", encoder), ("denoiser", unet), ("vae", vae)) if c and c.license]
    return "; ".join(f"{n}: {lic}" for n, lic in named)


def _write_atomically(opts: ImportOptions, config: PackConfig, modules: dict) -> PackConfig:
    out = opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"  # same filesystem as --out: the rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = save_pack(tmp, config, modules)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written
