"""Encoder recipes: the preprocessing and pooling a representation was computed with, by name.

A conditioned denoiser only understands embeddings computed exactly the way its training set's were, so
the recipe is stored in the pack (as `EncoderSpec` fields plus the recipe's name) and used by `embed` and by
the filter's re-encode alike. Named recipes:

| name             | resize                            | crop | mean/std | embedding                            | L2  |
|------------------|-----------------------------------|------|----------|--------------------------------------|-----|
| `rep-ldm-dinov2` | 256x256 square, bilinear          | 224  | ImageNet | CLS after the final norm             | yes |
| `rep-ldm-clip`   | shorter side 224, bicubic         | 224  | CLIP     | CLS before the post layer norm       | yes |
| `dinov2-hf`      | shorter side 256, bicubic         | 224  | ImageNet | CLS after the final norm (pooler)    | no  |
| `clip-hf`        | shorter side 224, bicubic         | 224  | CLIP     | pooler output (post-LN CLS)          | no  |
| `dinov3-hf`      | 224x224 square, bilinear          | 224  | ImageNet | CLS after the final norm (pooler)    | no  |

The two `rep-ldm-*` recipes are the published representation-conditioned LDM code's transforms (its DINOv2
path uses torchvision `Resize((256, 256))`, `CenterCrop(224)`; its CLIP path uses CLIP's own processor and
`last_hidden_state[:, 0]`). The `*-hf` recipes are the transformers image processors' conventions; when the
encoder folder holds a `preprocessor_config.json`, its size, crop, mean, std and resample are used instead of
the defaults above. A user recipe is a small TOML or JSON file with the same fields (see `Recipe`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from synthgen.errors import UsageError
from synthgen.models.encoder import (
    CLIP_MEAN, CLIP_STD, EMBEDDINGS, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, RESIZE_MODES, ROUNDINGS, EncoderSpec,
)

# PIL resample codes as transformers' preprocessor_config.json stores them.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class Recipe:
    """How images become embeddings. Every field maps onto an `EncoderSpec` field of the same meaning."""

    name: str
    resize_mode: str  # "shorter": shorter side to `resize`, aspect kept | "square": (resize, resize)
    resize: int
    crop: int  # centre crop, square
    interpolation: str  # "bilinear" | "bicubic", antialiased
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    token: str  # synthgen.models.encoder.EMBEDDINGS
    normalize: bool  # L2-normalise the embedding
    rounding: str = "floor"  # the long side after a shorter-side resize, floored as torchvision and transformers do

    def __post_init__(self):
        where = f"recipe {self.name!r}"
        if self.resize_mode not in RESIZE_MODES:
            raise UsageError(f"{where}: resize_mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"{where}: interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if self.rounding not in ROUNDINGS:
            raise UsageError(f"{where}: rounding {self.rounding!r} is not one of {', '.join(ROUNDINGS)}")
        if self.token not in EMBEDDINGS:
            raise UsageError(f"{where}: token {self.token!r} is not one of {', '.join(EMBEDDINGS)}")
        for option in ("resize", "crop"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{where}: {option} must be a positive integer, got {value!r}")
        if self.crop > self.resize:
            raise UsageError(f"{where}: crop {self.crop} is larger than resize {self.resize}")
        for option in ("mean", "std"):
            value = getattr(self, option)
            if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise UsageError(f"{where}: {option} must be three numbers (R, G, B), got {value!r}")
            object.__setattr__(self, option, tuple(float(v) for v in value))
        if not all(s > 0 for s in self.std):
            raise UsageError(f"{where}: std must be positive, got {self.std}")
        if not isinstance(self.normalize, bool):
            raise UsageError(f"{where}: normalize must be true or false, got {self.normalize!r}")

    def apply(self, spec: EncoderSpec) -> EncoderSpec:
        """`spec` with this recipe's preprocessing and pooling."""
        return dataclasses.replace(
            spec, resize=self.resize, crop=self.crop, mean=self.mean, std=self.std, embedding=self.token,
            resize_mode=self.resize_mode, interpolation=self.interpolation, rounding=self.rounding,
            normalize=self.normalize, recipe=self.name,
        )

    def with_projection(self) -> Recipe:
        """The recipe reading the network's projection head (CLIP's image_embeds) instead of its token."""
        if self.token != "cls":
            raise UsageError(
                f"recipe {self.name!r} reads the {self.token!r} token; a projection applies to the post-norm CLS "
                "token only (use --recipe clip-hf, or a denoiser conditioned on the encoder's hidden width)"
            )
        return dataclasses.replace(self, token="projected")


RECIPES = {
    "rep-ldm-dinov2": Recipe("rep-ldm-dinov2", "square", 256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD,
                             "cls", True),
    "rep-ldm-clip": Recipe("rep-ldm-clip", "shorter", 224, 224, "bicubic", CLIP_MEAN, CLIP_STD, "cls_prenorm", True),
    "dinov2-hf": Recipe("dinov2-hf", "shorter", 256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD, "cls", False),
    "clip-hf": Recipe("clip-hf", "shorter", 224, 224, "bicubic", CLIP_MEAN, CLIP_STD, "cls", False),
    "dinov3-hf": Recipe("dinov3-hf", "square", 224, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, "cls", False),
}
# --recipe auto: the method's recipe for each encoder family (the published code has none for DINOv3).
DEFAULT_RECIPE = {"dinov2": "rep-ldm-dinov2", "clip": "rep-ldm-clip", "dinov3": "dinov3-hf"}


def resolve_recipe(name: str, family: str, processor_config: dict | None = None) -> Recipe:
    """The recipe `name` names: "auto" (the family's default), a named recipe, or a TOML/JSON file path.

    processor_config: the encoder folder's preprocessor_config.json, which overrides the defaults of the
    `*-hf` recipes (it is what transformers' image processor would do with that folder).
    """
    if name == "auto":
        name = DEFAULT_RECIPE[family]
    if name in RECIPES:
        recipe = RECIPES[name]
        if name.endswith("-hf") and processor_config:
            recipe = _from_processor_config(recipe, processor_config)
        return recipe
    path = Path(name)
    if path.suffix.lower() in (".toml", ".json") and path.is_file():
        return read_recipe_file(path)
    raise UsageError(
        f"--recipe {name!r} is neither a recipe name ({', '.join(['auto', *RECIPES])}) nor a .toml/.json recipe "
        "file; see 'synthgen pack import --help'"
    )


def read_recipe_file(path: Path) -> Recipe:
    """A user recipe: every field of `Recipe` but `name` (default: the file's stem), as TOML or JSON."""
    try:
        text = path.read_text()
        fields = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read the recipe file {path}: {e}") from e
    if not isinstance(fields, dict):
        raise UsageError(f"the recipe file {path} must hold a table of fields")
    fields = {"name": path.stem, **fields}
    allowed = [f.name for f in dataclasses.fields(Recipe)]
    required = [f.name for f in dataclasses.fields(Recipe) if f.default is dataclasses.MISSING]
    unknown, missing = sorted(set(fields) - set(allowed)), [f for f in required if f not in fields]
    if unknown or missing:
        raise UsageError(
            f"the recipe file {path}: unknown fields {unknown}, missing fields {missing}; a recipe has "
            f"{', '.join(allowed)} (e.g. resize_mode = \"square\", resize = 256, crop = 224, interpolation = "
            "\"bilinear\", mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225], token = \"cls\", "
            "normalize = true)"
        )
    return Recipe(**fields)


def _from_processor_config(recipe: Recipe, cfg: dict) -> Recipe:
    """The transformers image processor's settings (preprocessor_config.json) in recipe form."""
    where = f"preprocessor_config.json ({cfg.get('image_processor_type', 'image processor')})"
    size, crop = cfg.get("size", {}), cfg.get("crop_size", {})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if "shortest_edge" in size:
        mode, resize = "shorter", int(size["shortest_edge"])
    elif size.get("height") is not None and size.get("height") == size.get("width"):
        mode, resize = "square", int(size["height"])
    else:
        raise UsageError(f"{where}: size {size!r} is not a shortest edge or a square; write a recipe file instead")
    if cfg.get("do_center_crop", bool(crop)):
        if crop.get("height") != crop.get("width"):
            raise UsageError(f"{where}: crop_size {crop!r} is not square; write a recipe file instead")
        crop_side = int(crop["height"])
    elif mode == "square":
        crop_side = resize
    else:
        raise UsageError(f"{where}: no centre crop after a shortest-edge resize gives non-square inputs; write a "
                         "recipe file instead")
    resample = cfg.get("resample", 3)
    if resample not in _PIL_RESAMPLE:
        raise UsageError(f"{where}: resample {resample!r} is not bilinear (2) or bicubic (3)")
    return dataclasses.replace(
        recipe, resize_mode=mode, resize=resize, crop=crop_side, interpolation=_PIL_RESAMPLE[resample],
        mean=tuple(cfg.get("image_mean", recipe.mean)), std=tuple(cfg.get("image_std", recipe.std)),
    )
