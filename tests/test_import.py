"""`synthgen pack import`: real transformers / diffusers checkpoints (tiny, random, saved with save_pretrained)
imported and checked against the libraries that made them.

Encoders are compared on scikit-learn's two real photos (427x640) and their portrait transposes: every recipe
must give cosine >= 0.999 per image against the reference pipeline (transformers' own image processors and
models, or the published code's torchvision transform), and the neighbouring wrong recipe (shorter-side
instead of square resize, the CLS after instead of before CLIP's post layer norm) must NOT, so these tests
can tell recipes apart. Random layer norms (weight 1, bias 0) would hide a wrong-token bug: they are perturbed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")

from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from synthgen.bank import build_bank, build_bank_from_reps, load_bank  # noqa: E402
from synthgen.errors import UsageError  # noqa: E402
from synthgen.importing.diffusion import read_scheduler  # noqa: E402
from synthgen.models.encoder import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from synthgen.pack import load_pack, read_pack_config  # noqa: E402
from synthgen.samplers import make_plan  # noqa: E402
from conftest import import_tiny_pack, perturb_norms, tiny_unet, tiny_vae  # noqa: E402

COSINE = 0.999
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.25)


# ---- Fixtures: real photos, tiny real checkpoints ----------------------------------------------------------


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    images = [Image.fromarray(a) for a in load_sample_images().images]  # 427x640 landscape
    return images + [im.transpose(Image.Transpose.TRANSPOSE) for im in images]  # and 640x427 portrait


@pytest.fixture(scope="module")
def photo_folder(photos, tmp_path_factory):
    """The photos as lossless PNGs in two class folders, as `embed --images` reads them."""
    root = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(photos):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        image.save(root / f"c{i % 2}" / f"p{i}.png")
    return root


def _save(model, path):
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """name -> (folder, model) for every transformers encoder class the importer reads."""
    t = transformers
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {
        # image_size 518 as the released DINOv2: the pack resamples its position embeddings to the 224 crop.
        "dinov2": t.Dinov2Model(t.Dinov2Config(**SMALL, image_size=518, patch_size=14)),
        "dinov2-reg": t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(
            **SMALL, image_size=518, patch_size=14, num_register_tokens=4)),
        "dinov3": t.DINOv3ViTModel(t.DINOv3ViTConfig(**SMALL, intermediate_size=128, image_size=224, patch_size=16,
                                                      num_register_tokens=4)),
        "clip": t.CLIPVisionModel(t.CLIPVisionConfig(**SMALL, intermediate_size=64, image_size=224, patch_size=32)),
        "clip-proj": t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(
            **SMALL, intermediate_size=64, image_size=224, patch_size=32, projection_dim=24)),
        "clip-full": t.CLIPModel(t.CLIPConfig(
            vision_config=dict(**SMALL, intermediate_size=64, image_size=224, patch_size=32),
            text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
            projection_dim=24)),
    }
    return {name: (_save(perturb_norms(m), root / name), m) for name, m in models.items()}


def _import(tmp_path, encoder, parts, recipe="auto", out=None, **overrides):
    return import_tiny_pack(out or tmp_path / "pack", encoder, parts["root"], recipe=recipe, **overrides)


# ---- Reference embeddings, computed by the libraries the recipes come from -----------------------------------


def _torchvision_rep_ldm_dinov2(images):
    from torchvision import transforms as T

    tf = T.Compose([T.Resize((256, 256)), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.stack([tf(im) for im in images])


def _hf_pixels(processor, images):
    return processor(images=images, return_tensors="pt")["pixel_values"]


def _reference(name: str, model, images) -> torch.Tensor:
    t = transformers
    with torch.no_grad():
        if name == "rep-ldm-dinov2":
            return F.normalize(model(pixel_values=_torchvision_rep_ldm_dinov2(images)).pooler_output, dim=-1)
        if name == "dinov2-hf":
            proc = t.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                       image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
            return model(pixel_values=_hf_pixels(proc, images)).pooler_output
        if name == "dinov3-hf":
            return model(pixel_values=_hf_pixels(t.DINOv3ViTImageProcessor(), images)).pooler_output
        pixels = _hf_pixels(t.CLIPImageProcessor(), images)
        if name == "rep-ldm-clip":
            return F.normalize(model(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)
        if name == "clip-hf-projected":
            return model(pixel_values=pixels).image_embeds
        if name == "clip-full-projected":
            return model.get_image_features(pixel_values=pixels).pooler_output  # the projected CLS
        return model(pixel_values=pixels).pooler_output  # clip-hf


def _pack_embeddings(pack_dir, images) -> torch.Tensor:
    encoder = load_pack(pack_dir, components=("encoder",)).encoder
    with torch.no_grad():
        return torch.cat([encoder(torch.from_numpy(np.asarray(im)).permute(2, 0, 1)[None].float() / 255)
                          for im in images])


def _cosines(a, b) -> list[float]:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).tolist()


# (hf model, recipe, reference, a wrong recipe the test must be able to tell apart, UNet width)
ENCODER_CASES = [
    ("dinov2", "rep-ldm-dinov2", "rep-ldm-dinov2", "dinov2-hf", 32),
    ("dinov2", "dinov2-hf", "dinov2-hf", "rep-ldm-dinov2", 32),
    ("dinov2-reg", "rep-ldm-dinov2", "rep-ldm-dinov2", "dinov2-hf", 32),
    ("dinov3", "dinov3-hf", "dinov3-hf", "dinov2-hf", 32),
    ("clip", "rep-ldm-clip", "rep-ldm-clip", "clip-hf", 32),
    ("clip", "clip-hf", "clip-hf", "rep-ldm-clip", 32),
    ("clip-proj", "clip-hf", "clip-hf-projected", None, 24),  # the UNet wants 24-d: the projection is used
    ("clip-full", "clip-hf", "clip-full-projected", None, 24),
]


@pytest.mark.parametrize("case", ENCODER_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_imported_encoder_matches_transformers(case, hf, photos, tmp_path):
    model_name, recipe, reference, wrong, width = case
    folder, model = hf[model_name]
    parts_root = tmp_path / "parts"
    tiny_unet(width).save_pretrained(parts_root / "unet")
    tiny_vae().save_pretrained(parts_root / "vae")
    DDPMScheduler().save_pretrained(parts_root / "scheduler")
    parts = {"root": parts_root}
    report = _import(tmp_path, folder, parts, recipe=recipe)
    assert report.config.encoder.dim == width and report.config.encoder.recipe == recipe
    want = _reference(reference, model, photos)
    got = _pack_embeddings(tmp_path / "pack", photos)
    assert got.shape == want.shape
    assert min(_cosines(got, want)) >= COSINE, _cosines(got, want)
    if recipe.startswith("rep-ldm"):
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(photos)), atol=1e-5, rtol=0)
    if wrong is not None:  # the test can fail: the neighbouring recipe is measurably off on these photos
        _import(tmp_path, folder, parts, recipe=wrong, out=tmp_path / "wrong")
        off = _pack_embeddings(tmp_path / "wrong", photos)
        assert min(_cosines(off, want)) < COSINE, f"{wrong} is indistinguishable from {reference}"


def test_embed_through_the_decoder_matches_the_reference(hf, diffusers_parts, photos, photo_folder, tmp_path):
    """The user's path: PNG files -> decode (with the recipe's square resize) -> pack encoder -> float16 bank."""
    folder, model = hf["dinov2"]
    _import(tmp_path, folder, diffusers_parts, recipe="rep-ldm-dinov2")
    for decoder in ("pil", "dali"):
        if decoder == "dali":
            pytest.importorskip("nvidia.dali")
        build_bank(str(photo_folder), tmp_path / "pack", tmp_path / f"bank-{decoder}", progress=False, decoder=decoder)
        bank = load_bank(tmp_path / f"bank-{decoder}")
        order = [int(k.rsplit("p", 1)[1]) for k in bank.keys]  # keys c{label}/p{i}
        want = _reference("rep-ldm-dinov2", model, [photos[i] for i in order])
        assert min(_cosines(bank.embeddings, want)) >= COSINE, (decoder, _cosines(bank.embeddings, want))


def test_processor_config_in_the_folder_drives_the_hf_recipe(hf, diffusers_parts, photos, tmp_path):
    """A preprocessor_config.json beside the weights is what transformers would use: so does dinov2-hf."""
    folder, model = hf["dinov2"]
    custom = tmp_path / "dinov2-custom"
    custom.mkdir()
    for f in folder.iterdir():
        (custom / f.name).write_bytes(f.read_bytes())
    proc = transformers.BitImageProcessor(size={"shortest_edge": 240}, crop_size={"height": 196, "width": 196},
                                          image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], resample=2)
    proc.save_pretrained(custom)
    report = _import(tmp_path, custom, diffusers_parts, recipe="dinov2-hf")
    spec = report.config.encoder
    assert (spec.resize, spec.crop, spec.interpolation, spec.mean) == (240, 196, "bilinear", (0.5, 0.5, 0.5))
    with torch.no_grad():
        want = model(pixel_values=_hf_pixels(proc, photos)).pooler_output
    assert min(_cosines(_pack_embeddings(tmp_path / "pack", photos), want)) >= COSINE


def test_user_recipe_file(hf, diffusers_parts, photos, tmp_path):
    folder, model = hf["dinov2"]
    recipe = tmp_path / "mine.toml"
    recipe.write_text('resize_mode = "square"\nresize = 256\ncrop = 224\ninterpolation = "bilinear"\n'
                      "mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n"
                      'token = "cls"\nnormalize = true\n')
    report = _import(tmp_path, folder, diffusers_parts, recipe=str(recipe))
    assert report.config.encoder.recipe == "mine"
    want = _reference("rep-ldm-dinov2", model, photos)
    assert min(_cosines(_pack_embeddings(tmp_path / "pack", photos), want)) >= COSINE
    recipe.write_text('resize = 256\ncrop = 224\n')
    with pytest.raises(UsageError, match="missing fields"):
        _import(tmp_path, folder, diffusers_parts, recipe=str(recipe), out=tmp_path / "bad")


def test_torch_hub_dinov2_state_dict(photos, tmp_path):
    """facebookresearch/dinov2's layout (fused qkv, ls1.gamma, pos_embed, mask_token) as a .pth pickle.

    The hub file names no head count: every released DINOv2 has 64-wide heads, so the model here does too."""
    from synthgen.importing.encoders import read_encoder

    torch.manual_seed(3)
    model = perturb_norms(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=518, patch_size=14,
        initializer_range=0.25)))
    _, _, hub = read_encoder(_save(model, tmp_path / "hf")).convert(518)  # timm keys = hub keys, 37x37 grid
    hub["mask_token"] = torch.zeros(1, 128)
    torch.save(hub, tmp_path / "dinov2_hub.pth")
    tiny_unet(128).save_pretrained(tmp_path / "parts" / "unet")
    tiny_vae().save_pretrained(tmp_path / "parts" / "vae")
    DDPMScheduler().save_pretrained(tmp_path / "parts" / "scheduler")
    parts = {"root": tmp_path / "parts"}
    with pytest.raises(UsageError, match="--trust-pickle"):
        _import(tmp_path, tmp_path / "dinov2_hub.pth", parts)
    report = _import(tmp_path, tmp_path / "dinov2_hub.pth", parts, trust_pickle=True)
    assert report.config.provenance["encoder"]["class"] == "torch.hub:dinov2"
    assert report.config.provenance["encoder"]["converted_from_pickle"] is True
    # The hub resamples position embeddings by a scale factor (offset 0.1): close to, not equal to, transformers'.
    got = _pack_embeddings(tmp_path / "pack", photos)
    assert min(_cosines(got, _reference("rep-ldm-dinov2", model, photos))) >= 0.99


# ---- Denoiser, VAE, scheduler --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["folder", "pickle", "pipeline"])
def test_imported_unet_and_vae_equal_diffusers(source, hf, diffusers_parts, tmp_path):
    root = diffusers_parts["root"]
    kwargs = {}
    if source == "pickle":
        kwargs = dict(denoiser=root / "unet.pt", trust_pickle=True)
    elif source == "pipeline":  # a whole pipeline folder: unet/, vae/ and scheduler/ are taken from it
        pipe = tmp_path / "pipe"
        pipe.mkdir()
        (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline"}))
        for part in ("unet", "vae", "scheduler"):
            (pipe / part).symlink_to(root / part)
        kwargs = dict(denoiser=pipe, vae=None, scheduler=None)
    report = _import(tmp_path, hf["dinov2"][0], diffusers_parts, **kwargs)
    assert report.config.provenance["denoiser"]["converted_from_pickle"] is (source == "pickle")
    pack = load_pack(tmp_path / "pack")
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 32, generator=gen)
    t = torch.tensor([999.0, 500.0, 1.0])
    with torch.no_grad():
        ours = pack.denoiser(x, t, cond)
        ref = diffusers_parts["unet"](x, t, encoder_hidden_states=cond[:, None, :]).sample
        assert (ours - ref).abs().max().item() <= 1e-4
        latents = torch.randn(2, 4, 8, 8, generator=gen)
        ref_img = diffusers_parts["vae"].decode(latents / 0.18215).sample
        assert (pack.vae(latents) - ref_img).abs().max().item() <= 1e-4
    assert pack.config.vae.scaling_factor == 0.18215 and pack.config.image_size == 16


def test_scheduler_config_drives_the_samplers_as_diffusers(diffusers_parts):
    """steps_offset=1 / set_alpha_to_one=False (SD-1.x's DDIM config) reach the plan: same timesteps as diffusers."""
    folder = diffusers_parts["root"] / "scheduler"
    imported = read_scheduler(folder)
    assert imported.sampler == "ddim" and imported.schedule.steps_offset == 1
    ref = DDIMScheduler.from_pretrained(folder)
    ref.set_timesteps(10)
    plan = make_plan(imported.sampler, imported.schedule, 10)
    assert plan.timesteps.tolist() == ref.timesteps.float().tolist()
    assert read_scheduler("sd").schedule.beta_schedule == "scaled_linear"


# ---- Safety and validation: each error names what is wrong, and nothing is written ---------------------------


def test_pickle_is_refused_without_the_flag_and_never_read_again(hf, diffusers_parts, tmp_path, monkeypatch):
    root = diffusers_parts["root"]
    with pytest.raises(UsageError, match="--trust-pickle"):
        _import(tmp_path, hf["dinov2"][0], diffusers_parts, denoiser=root / "unet.pt")
    assert not (tmp_path / "pack").exists()
    _import(tmp_path, hf["dinov2"][0], diffusers_parts, denoiser=root / "unet.pt", trust_pickle=True)
    assert sorted(p.suffix for p in (tmp_path / "pack").iterdir()) == [".json", ".safetensors", ".safetensors",
                                                                      ".safetensors"]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    load_pack(tmp_path / "pack")  # the pack is safetensors only


@pytest.mark.parametrize(("change", "needles"), [
    ("width", ["32-d", "48-d", "cross_attention_dim"]),
    ("channels", ["3 input channels", "4 latent channels"]),
    ("image_size", ["--image-size 64", "16 px"]),
    ("class", ["ViTModel", "Dinov2Model"]),
    ("out_file", ["is a file"]),
])
def test_mismatches_are_clear_errors_and_write_nothing(change, needles, hf, diffusers_parts, tmp_path):
    kwargs = {}
    if change == "width":
        tiny_unet(48).save_pretrained(tmp_path / "unet48")
        kwargs = dict(denoiser=tmp_path / "unet48")
    elif change == "channels":
        tiny_unet(32, in_channels=3).save_pretrained(tmp_path / "unet3")
        kwargs = dict(denoiser=tmp_path / "unet3")
    elif change == "image_size":
        kwargs = dict(image_size=64)
    elif change == "class":
        vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=64, image_size=32, patch_size=8))
        kwargs = dict(encoder=_save(vit, tmp_path / "vit"))
    else:
        (tmp_path / "file").write_text("x")
        kwargs = dict(out=tmp_path / "file")
    with pytest.raises(UsageError) as info:
        _import(tmp_path, kwargs.pop("encoder", hf["dinov2"][0]), diffusers_parts, **kwargs)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    if change == "width":  # both files are named
        assert "unet48" in str(info.value) and str(hf["dinov2"][0]) in str(info.value)
    assert not (tmp_path / "pack").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_inspect_shows_sources_recipe_and_license(hf, diffusers_parts, tmp_path):
    from synthgen.cli import _inspect_lines

    (diffusers_parts["root"] / "unet" / "README.md").write_text("---\nlicense: mit\n---\n# a UNet\n")
    _import(tmp_path, hf["clip"][0], diffusers_parts, recipe="rep-ldm-clip")
    text = "\n".join(_inspect_lines(tmp_path / "pack"))
    for needle in ("rep-ldm-clip", "cls_prenorm", "L2-normalised", "CLIPVisionModel", "UNet2DConditionModel",
                   "DDIMScheduler", "license     denoiser: mit", "null condition: none"):
        assert needle in text, text
    assert read_pack_config(tmp_path / "pack").provenance["denoiser"]["license"] == "mit"


# ---- Downstream: generate with and without guidance, embed --reps ------------------------------------------------


def test_generate_on_an_imported_pack_needs_a_null_for_guidance(imported_pack, tmp_path):
    from synthgen.config import GenerateConfig
    from synthgen.pipeline import run_generate
    from synthgen.verify import verify_run

    pack, bank = imported_pack
    base = dict(n=12, pack=pack, bank=bank, sampler="ddim", steps=2, shard_size=6, batch=4, device="cpu",
                progress=False)
    with pytest.raises(UsageError, match="--null zeros or --null mean"):
        run_generate(GenerateConfig(out=tmp_path / "a", guidance=2.0, **base))
    assert not (tmp_path / "a").exists()  # refused before the run folder or any model
    for null, sampler in (("zeros", "dpmpp_2m"), ("mean", "ddpm")):  # and the filter, on the imported encoder
        summary = run_generate(GenerateConfig(out=tmp_path / null, guidance=2.0, null=null, min_score=-0.5,
                                              **{**base, "sampler": sampler}))
        assert summary.complete and verify_run(tmp_path / null).ok
    plain = run_generate(GenerateConfig(out=tmp_path / "plain", **base))
    assert plain.complete and verify_run(tmp_path / "plain").ok


def _write_reps(reps_root, pack, photo_folder, recipe_pack=None):
    """One .npy per image, computed by `recipe_pack`'s encoder (default: `pack`'s own)."""
    encoder = load_pack(recipe_pack or pack, components=("encoder",)).encoder
    for image_path in sorted(photo_folder.rglob("*.png")):
        rel = image_path.relative_to(photo_folder).with_suffix(".npy")
        (reps_root / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.from_numpy(np.asarray(Image.open(image_path))).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            np.save(reps_root / rel, encoder(pixels)[0].numpy())


def test_embed_from_npy_reps(imported_pack, photo_folder, tmp_path):
    pack, _ = imported_pack
    reps = tmp_path / "reps"
    _write_reps(reps, pack, photo_folder)
    summary = build_bank_from_reps(reps, photo_folder, pack, tmp_path / "bank", progress=False)
    assert summary["embedded"] == 4 and not (summary["missing"] or summary["bad"] or summary["extra"])
    assert summary["spot_check"]["min_cosine"] > 0.999
    direct = load_bank(tmp_path / "bank")
    build_bank(str(photo_folder), pack, tmp_path / "direct", progress=False, decoder="pil")
    assert direct.keys == load_bank(tmp_path / "direct").keys
    assert min(_cosines(direct.embeddings, load_bank(tmp_path / "direct").embeddings)) > 0.999

    # Damage: a missing file, an extra one, a wrong dtype, a wrong width, a NaN, a pickle in disguise.
    (reps / "c0" / "p0.npy").unlink()
    np.save(reps / "c0" / "stray.npy", np.zeros(32, np.float32))
    np.save(reps / "c1" / "p1.npy", np.zeros(32, np.int32))
    np.save(reps / "c0" / "p2.npy", np.zeros(31, np.float32))
    np.save(reps / "c1" / "p3.npy", np.full(32, np.nan, np.float32))
    with pytest.raises(UsageError, match="no usable .npy"):
        build_bank_from_reps(reps, photo_folder, pack, tmp_path / "bank2", progress=False)
    _write_reps(reps, pack, photo_folder)
    np.save(reps / "c1" / "p3.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    (reps / "c0" / "p0.npy").unlink()
    summary = build_bank_from_reps(reps, photo_folder, pack, tmp_path / "bank2", progress=False)
    meta = json.loads((tmp_path / "bank2" / "bank.json").read_text())
    assert summary["embedded"] == 2 and meta["num_missing"] == 1 and meta["num_bad"] == 1 and meta["num_extra"] == 1
    assert meta["missing"] == ["c0/p0.png"] and meta["extra"] == ["c0/stray.npy"]
    assert meta["bad"][0]["file"] == "c1/p3.npy" and "allow_pickle" in meta["bad"][0]["error"]  # never unpickled


def test_reps_from_another_recipe_fail_the_spot_check(imported_pack, hf, diffusers_parts, photo_folder, tmp_path):
    pack, _ = imported_pack
    _import(tmp_path, hf["dinov2"][0], diffusers_parts, recipe="dinov2-hf", out=tmp_path / "other")
    _write_reps(tmp_path / "reps", pack, photo_folder, recipe_pack=tmp_path / "other")
    summary = build_bank_from_reps(tmp_path / "reps", photo_folder, pack, tmp_path / "bank", progress=False)
    assert summary["spot_check"]["min_cosine"] < 0.99


def test_ort_engine_of_an_imported_pack_matches_eager(imported_pack, tmp_path):
    """ONNX export of the imported UNet, VAE and encoder (recipe and L2 norm inside the graph) under ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    from synthgen.config import GenerateConfig
    from synthgen.engines import TOLERANCE, build_engine
    from synthgen.pipeline import run_generate
    from synthgen.verify import verify_run

    pack, bank = imported_pack
    manifest = build_engine(pack, tmp_path / "engine", "ort", "fp32", batch=4)
    assert set(manifest.components) == {"denoiser", "vae", "encoder"}
    for name, entry in manifest.components.items():
        assert entry.error["max_rel"] < TOLERANCE["fp32"], (name, entry.error)
    summary = run_generate(GenerateConfig(n=8, out=tmp_path / "run", pack=pack, bank=bank, sampler="euler", steps=2,
                                          shard_size=8, batch=4, device="cpu", progress=False,
                                          engine=tmp_path / "engine"))
    assert summary.complete and verify_run(tmp_path / "run").ok
