"""Model packs: a folder with `pack.json` and one safetensors file per component.

```
PACK/
  pack.json                 components, shapes, schedule, conditioning dim, image size, weight hashes
  encoder.safetensors       timm ViT state dict
  denoiser.safetensors      diffusers UNet2DConditionModel or synthgen DiT state dict
  vae.safetensors           optional AutoencoderKL / AutoencoderTiny state dict
  extras.safetensors        optional: "null_condition" (D,) when the pack declares a learned one
```
Weights are only ever read with safetensors: a pickle is refused, never loaded. Networks are built on
the meta device and the weights assigned, so loading costs one read of the file and no random init.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from synthgen.errors import UsageError
from synthgen.models.denoiser import DENOISER_KINDS, Denoiser, build_denoiser_module
from synthgen.models.encoder import EncoderSpec, ImageEncoder, build_encoder_module
from synthgen.models.vae import VAE_KINDS, LatentDecoder, build_vae_module, vae_downsample_factor
from synthgen.samplers import NoiseSchedule

PACK_FORMAT = "synthgen-pack/1"
# The packs that ship inside the package (`make default-pack` rebuilds both): the digits pack trained from
# scratch (the teacher), and that pack distilled to one DDIM step, which generate uses when --pack is not
# given (as useful to the study classifier as 20 teacher steps, at ~17x their images/s: README).
DEFAULT_TEACHER = Path(__file__).resolve().parent / "default_pack"
DEFAULT_PACK = Path(__file__).resolve().parent / "default_pack_1step"
PACK_JSON = "pack.json"
COMPONENTS = ("encoder", "denoiser", "vae", "extras")
# What classifier-free guidance uses as the unconditional input: zeros, a learned vector (extras), the bank's
# mean embedding (resolved at generate), or "none": the checkpoint has no null (imported UNets), so guidance
# is refused unless generate names one (--null zeros|mean).
NULL_CONDITIONS = ("zeros", "learned", "mean", "none")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class DenoiserSpec:
    kind: str  # "unet2d" | "dit"
    config: dict  # constructor arguments of the network
    sample_shape: tuple[int, int, int]  # (C, H, W) the denoiser works on (latents or pixels)
    cond_dim: int
    null_condition: str = "zeros"  # what classifier-free guidance uses as the unconditional input

    def __post_init__(self):
        if self.kind not in DENOISER_KINDS:
            raise UsageError(f"pack denoiser kind {self.kind!r} is not one of {DENOISER_KINDS}")
        if self.null_condition not in NULL_CONDITIONS:
            raise UsageError(f"pack null_condition {self.null_condition!r} is not one of {NULL_CONDITIONS}")
        object.__setattr__(self, "sample_shape", tuple(int(s) for s in self.sample_shape))


@dataclass(frozen=True)
class VAESpec:
    kind: str  # "autoencoder_kl" | "autoencoder_tiny"
    config: dict
    scaling_factor: float  # latents are multiplied by this after encoding (SD-VAE: 0.18215)

    def __post_init__(self):
        if self.kind not in VAE_KINDS:
            raise UsageError(f"pack vae kind {self.kind!r} is not one of {VAE_KINDS}")

    @property
    def downsample(self) -> int:
        return vae_downsample_factor(self.kind, self.config)


@dataclass(frozen=True)
class PackConfig:
    name: str
    image_size: int  # generated images are (3, image_size, image_size)
    encoder: EncoderSpec
    denoiser: DenoiserSpec
    schedule: NoiseSchedule
    vae: VAESpec | None = None
    description: str = ""
    random_weights: bool = False  # True: the images are noise; for tests and throughput only
    weights: dict = field(default_factory=dict)  # component -> {"file": name, "sha256": hex}
    provenance: dict = field(default_factory=dict)  # component -> where it came from (pack import)
    license: str = ""  # the licence(s) of the weights, as their sources state them
    distilled: dict = field(default_factory=dict)  # train distill: teacher hash, steps, sampler, method

    def __post_init__(self):
        c, h, w = self.denoiser.sample_shape
        if self.denoiser.cond_dim != self.encoder.dim:
            raise UsageError(
                f"pack {self.name!r}: the denoiser is conditioned on {self.denoiser.cond_dim}-d vectors but the "
                f"encoder gives {self.encoder.dim}-d embeddings; rebuild the pack with matching components"
            )
        down = self.vae.downsample if self.vae else 1
        channels = self.vae.config.get("latent_channels", 4) if self.vae else 3
        if (h, w) != (self.image_size // down, self.image_size // down) or c != channels:
            where = f"latents of a VAE that downsamples {down}x" if self.vae else "pixels"
            raise UsageError(
                f"pack {self.name!r}: denoiser sample_shape {(c, h, w)} does not fit {self.image_size}px images "
                f"as {where} (expected {(channels, self.image_size // down, self.image_size // down)})"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        d["encoder"] = self.encoder.to_dict()
        for later in ("provenance", "license", "distilled"):  # added later: absent when empty, so older packs keep their hash
            if not d[later]:
                del d[later]
        return {"format": PACK_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "PackConfig":
        d = dict(d)
        if d.pop("format", None) != PACK_FORMAT:
            raise UsageError(f"pack.json 'format' must be {PACK_FORMAT!r}: this is not a synthgen pack")
        try:
            return cls(
                name=d["name"],
                image_size=int(d["image_size"]),
                encoder=EncoderSpec(**d["encoder"]),
                denoiser=DenoiserSpec(**d["denoiser"]),
                schedule=NoiseSchedule.from_dict(d["schedule"]),
                vae=VAESpec(**d["vae"]) if d.get("vae") else None,
                description=d.get("description", ""),
                random_weights=bool(d.get("random_weights", False)),
                weights=d.get("weights", {}),
                provenance=d.get("provenance", {}),
                license=d.get("license", ""),
                distilled=d.get("distilled", {}),
            )
        except UsageError:
            raise  # already says what is wrong
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"pack.json is malformed ({type(e).__name__}: {e}); see README 'Model packs'") from e


@dataclass
class Pack:
    """A loaded pack: eval-mode modules on one device, plus the config they came from."""

    root: Path
    config: PackConfig
    hash: str
    encoder: ImageEncoder | None
    denoiser: Denoiser | None
    vae: LatentDecoder | None
    null_condition: torch.Tensor | None  # (D,) float32; None when the pack's null is "mean" or "none"


# ---- Reading ------------------------------------------------------------------------------------


def read_pack_config(root: str | Path) -> PackConfig:
    root = Path(root)
    path = root / PACK_JSON
    if not path.is_file():
        raise UsageError(
            f"{root} is not a model pack: {PACK_JSON} is missing. Create one with "
            f"'synthgen pack random --preset tiny --out {root}' or point --pack at a pack folder"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise UsageError(f"{path} must hold a JSON object")
    return PackConfig.from_dict(raw)


def pack_hash(config: PackConfig) -> str:
    """Identity of a pack: its canonical config, weight hashes included (16 hex chars)."""
    blob = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_file(root: Path, config: PackConfig, component: str) -> Path:
    """The component's safetensors path, checked: inside the pack, present, not a pickle, hash intact."""
    entry = config.weights.get(component)
    if not entry or "file" not in entry:
        raise UsageError(f"pack {root}: pack.json lists no weights for the {component}; add weights.{component}.file")
    name = str(entry["file"])
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise UsageError(f"pack {root}: {component} weights path {name!r} points outside the pack folder")
    if path.suffix.lower() in PICKLE_SUFFIXES or path.suffix.lower() != ".safetensors":
        raise UsageError(
            f"pack {root}: {component} weights {name!r} are not safetensors; synthgen never unpickles weights. "
            "Convert them once in a trusted environment with safetensors.torch.save_file"
        )
    if not path.is_file():
        raise UsageError(f"pack {root}: the {component} weights file {name} is missing")
    expected = entry.get("sha256")
    if expected and file_sha256(path) != expected:
        raise UsageError(
            f"pack {root}: {name} does not match the sha256 in pack.json (file changed or corrupt); "
            "restore the file or rebuild the pack"
        )
    return path


def _load_state(path: Path, component: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"cannot read the {component} weights {path}: {e}") from e


def materialize(build, state: dict[str, torch.Tensor], component: str) -> nn.Module:
    """Build a network on the meta device and assign the weights; no random init, one copy in memory.

    Non-persistent buffers (position embeddings, rotary tables) are not in the file: networks that can
    recompute them (`init_buffers`) do so, the others are rebuilt on the CPU and loaded normally.
    """
    try:
        with torch.device("meta"):
            net = build()
    except (TypeError, ValueError) as e:
        raise UsageError(f"the {component} config in pack.json is invalid: {e}") from e
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UsageError(
            f"the {component} weights do not fit the {component} described in pack.json:\n{str(e)[:2000]}"
        ) from e
    if hasattr(net, "init_buffers"):
        net.init_buffers()
    if any(t.is_meta for t in net.buffers()):
        net = build()
        net.load_state_dict(state, strict=True)
    return net


def load_pack(
    root: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    components: tuple[str, ...] = ("encoder", "denoiser", "vae"),
) -> Pack:
    """Load the requested components in eval mode on `device` in `dtype`."""
    root = Path(root)
    config = read_pack_config(root)

    def load(component: str, build) -> nn.Module:
        state = _load_state(weights_file(root, config, component), component)
        module = materialize(build, state, component)
        # diffusers' ModelMixin.to() warns on every dtype cast, even for a class whose list of fp32-only
        # modules is empty (AutoencoderKL); nn.Module.to is the same cast. A non-empty list keeps the warning.
        cast = nn.Module.to if not getattr(module, "_keep_in_fp32_modules", None) else type(module).to
        return cast(module, device=device, dtype=dtype).eval().requires_grad_(False)

    encoder = denoiser = vae = None
    if "encoder" in components:
        net = load("encoder", lambda: build_encoder_module(config.encoder))
        encoder = ImageEncoder(config.encoder, net).to(device=device, dtype=dtype).eval()
    if "denoiser" in components:
        spec = config.denoiser
        denoiser = Denoiser(spec.kind, load("denoiser", lambda: build_denoiser_module(spec.kind, spec.config))).eval()
    if "vae" in components and config.vae is not None:
        v = config.vae
        vae = LatentDecoder(v.kind, load("vae", lambda: build_vae_module(v.kind, v.config)), v.scaling_factor).eval()
    # The null condition belongs to the denoiser: an encoder-only load (embed) does not need extras.
    null = _null_condition(root, config) if denoiser is not None else None
    return Pack(root, config, pack_hash(config), encoder, denoiser, vae, null)


def _null_condition(root: Path, config: PackConfig) -> torch.Tensor | None:
    if config.denoiser.null_condition == "zeros":
        return torch.zeros(config.denoiser.cond_dim)
    if config.denoiser.null_condition in ("mean", "none"):
        return None  # resolved against the bank by generate (models.denoiser.resolve_null)
    extras = _load_state(weights_file(root, config, "extras"), "extras")
    null = extras.get("null_condition")
    if null is None or tuple(null.shape) != (config.denoiser.cond_dim,):
        raise UsageError(
            f"pack {root}: null_condition is 'learned' but extras.safetensors has no "
            f"'null_condition' tensor of shape ({config.denoiser.cond_dim},)"
        )
    return null.float()


# ---- Writing ------------------------------------------------------------------------------------


def save_pack(
    root: str | Path,
    config: PackConfig,
    modules: dict[str, nn.Module | dict[str, torch.Tensor]],
    weight_dtype: torch.dtype | None = None,
) -> PackConfig:
    """Write weights (safetensors) and pack.json; returns the config with file names and hashes filled in.

    `modules` maps component -> the bare network (the encoder's timm net, the denoiser's UNet/DiT, the
    VAE) or a plain tensor dict (extras). `weight_dtype` casts floating tensors (fp16 halves a pack).
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    weights = {}
    for component, module in modules.items():
        if component not in COMPONENTS:
            raise ValueError(f"unknown pack component {component!r}")
        state = module if isinstance(module, dict) else module.state_dict()
        state = {
            k: (v.to(weight_dtype) if weight_dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in state.items()
        }
        path = root / f"{component}.safetensors"
        tmp = path.with_suffix(".safetensors.tmp")
        save_file(state, str(tmp))
        tmp.replace(path)
        weights[component] = {"file": path.name, "sha256": file_sha256(path)}
    config = PackConfig(**{**config.__dict__, "weights": weights})
    tmp = root / (PACK_JSON + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
    tmp.replace(root / PACK_JSON)
    return config
