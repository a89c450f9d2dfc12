"""Hermetic fixtures: tiny random packs and a bank of scikit-learn's bundled digits, built once per session."""

from __future__ import annotations

import os
import shutil
import sys

# The repository root holds kernels/ and export/, mapped to synthgen.kernels and synthgen.export. On sys.path
# (python -m pytest puts the working directory there) they shadow installed packages of the same names:
# transformers, which diffusers imports, imports Hugging Face's `kernels`. Keep the root off sys.path here and
# in subprocesses (PYTHONSAFEPATH), so the tests import what users import.
os.environ.setdefault("PYTHONSAFEPATH", "1")
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]

# No GPU here: run the Triton kernels in Triton's CPU interpreter. It must be set before any @triton.jit
# decorator runs, i.e. before anything imports synthgen.kernels. Checked without importing torch.
if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: one intra-op thread per process keeps OpenMP from spinning against pytest's own work.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from synthgen.bank import build_bank  # noqa: E402
from synthgen.presets import write_random_pack  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory):
    path = tmp_path_factory.mktemp("packs") / "tiny"
    write_random_pack("tiny", path, seed=0)
    return path


@pytest.fixture(scope="session")
def digits_bank(tiny_pack, tmp_path_factory):
    """The digits test split (450 images) embedded with the tiny pack's encoder."""
    path = tmp_path_factory.mktemp("banks") / "digits"
    build_bank("builtin:digits:test", tiny_pack, path, batch_size=128, progress=False)
    return path


@pytest.fixture
def gen_kwargs(tiny_pack, digits_bank, tmp_path):
    """Small, fast generate options; tests override what they exercise. CPU even where a GPU is visible:
    byte-exact comparisons and the ORT engines are CPU contracts (GPU tests ask for cuda themselves); fp32,
    since --dtype auto picks bf16 on CPUs that have it, and byte-identity across batch sizes is an fp32 contract."""
    return dict(n=24, out=tmp_path / "run", pack=tiny_pack, bank=digits_bank, sampler="ddim", steps=2,
                shard_size=10, batch=8, device="cpu", dtype="fp32", progress=False)


# ---- Imported packs: tiny real transformers / diffusers checkpoints, saved as users have them -----------------


def perturb_norms(model):
    """Random layer norms have weight 1 and bias 0, which can hide a wrong-token bug: perturb them (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "lambda1" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_unet(cross_attention_dim: int, sample_size: int = 8, in_channels: int = 4, seed: int = 0):
    """A real diffusers UNet2DConditionModel, the published recipe's layout at toy width."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=16,
    ).eval()


def tiny_vae(latent_channels: int = 4):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def import_tiny_pack(out, encoder, parts_root, recipe="auto", **overrides):
    """`pack import` of `encoder` with the UNet, VAE and scheduler folders under `parts_root`."""
    from synthgen.importing.pack_import import ImportOptions, import_pack

    opts = dict(encoder=encoder, denoiser=parts_root / "unet", vae=parts_root / "vae",
                scheduler=str(parts_root / "scheduler"), recipe=recipe, out=out)
    return import_pack(ImportOptions(**{**opts, **overrides}))


@pytest.fixture(scope="session")
def diffusers_parts(tmp_path_factory):
    """A UNet cross-attending to 32-d, its VAE and an SD-1.x-style DDIM scheduler, as diffusers folders, plus the
    same UNet pickled whole with torch.save (the published training code's format)."""
    import torch
    from diffusers import DDIMScheduler

    root = tmp_path_factory.mktemp("diffusers")
    unet, vae = tiny_unet(32), tiny_vae()
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    torch.save(unet, root / "unet.pt")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  set_alpha_to_one=False, clip_sample=False).save_pretrained(root / "scheduler")
    return {"root": root, "unet": unet, "vae": vae}


@pytest.fixture(scope="session")
def hf_dinov2(tmp_path_factory):
    """(folder, model): a tiny transformers Dinov2Model at the released models' 518 px, saved with save_pretrained."""
    import torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = perturb_norms(transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   initializer_range=0.25, image_size=518, patch_size=14)))
    folder = tmp_path_factory.mktemp("hf") / "dinov2"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="session")
def imported_pack(hf_dinov2, diffusers_parts, tmp_path_factory):
    """(pack, bank): the DINOv2 folder + diffusers UNet/VAE/scheduler imported (rep-ldm-dinov2), digits embedded."""
    root = tmp_path_factory.mktemp("imported")
    import_tiny_pack(root / "pack", hf_dinov2[0], diffusers_parts["root"], recipe="rep-ldm-dinov2")
    build_bank("builtin:digits:test", root / "pack", root / "bank", progress=False)
    return root / "pack", root / "bank"
