"""Image encoders from the folders users hold, converted to the timm ViTs synthgen runs.

Sources (`read_encoder`):
- a transformers folder (config.json + model.safetensors) of `Dinov2Model`, `Dinov2WithRegistersModel`,
  `DINOv3ViTModel`, `CLIPVisionModel`, `CLIPVisionModelWithProjection` or a whole `CLIPModel` (the vision
  tower and its projection are taken);
- a timm folder (config.json with "architecture" + model.safetensors), or one timm safetensors file with
  `--encoder-arch NAME`;
- a torch-hub DINOv2 state dict (`.pth`, with --trust-pickle): facebookresearch/dinov2's key names.

The conversion is exact: every tensor is copied, q/k/v projections are concatenated into timm's fused qkv,
and learned position embeddings are resampled once to the recipe's crop with the rule the source model
applies at run time (transformers: bicubic to the target grid; the DINOv2 hub: bicubic by a scale factor
with its 0.1 offset; timm: timm's own resample), so the pack's fixed-size network sees what the source
model would compute at that size. Register tokens of DINOv2 carry no position in the source; their CLS
position embedding is folded into the CLS token (a constant), which is timm's layout for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from synthgen.errors import UsageError
from synthgen.importing.checkpoints import license_of, load_checkpoint, read_json, weights_in

# transformers classes by the model_type of their config.json.
HF_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "dinov3_vit": "dinov3",
            "clip_vision_model": "clip", "clip": "clip"}
SUPPORTED = ("transformers Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel, CLIPVisionModel, "
             "CLIPVisionModelWithProjection or CLIPModel folders; timm ViT folders (config.json 'architecture') "
             "or safetensors files with --encoder-arch; torch-hub DINOv2 state dicts (.pth, --trust-pickle)")


@dataclass
class SourceEncoder:
    """An encoder read from its source, before the recipe fixes its input size.

    `convert(crop)` -> (timm model name, timm kwargs, state dict in timm key names) at that input size.
    """

    family: str  # "dinov2" | "dinov3" | "clip"
    source_class: str  # e.g. "Dinov2Model", "timm:vit_base_patch14_dinov2", "torch.hub:dinov2"
    path: Path
    hidden: int
    patch: int
    projection_dim: int | None  # CLIP's visual projection, when the checkpoint has one
    from_pickle: bool
    license: str
    processor_config: dict | None  # transformers preprocessor_config.json beside the weights
    _convert: object = field(repr=False)

    def convert(self, crop: int) -> tuple[str, dict, dict[str, torch.Tensor]]:
        if crop % self.patch:
            raise UsageError(f"the recipe's crop {crop} is not a multiple of the encoder's patch size {self.patch} "
                             f"({self.path}); use a recipe whose crop is")
        return self._convert(crop)


def read_encoder(src: str | Path, trust_pickle: bool = False, arch: str | None = None) -> SourceEncoder:
    """The encoder at `src` (see the module docstring). UsageError naming what is supported otherwise."""
    src = Path(src)
    if src.is_dir():
        config_path = src / "config.json"
        if not config_path.is_file():
            raise UsageError(f"the encoder folder {src} has no config.json; supported: {SUPPORTED}")
        config = read_json(config_path, "encoder")
        if "architecture" in config or "pretrained_cfg" in config:
            return _timm_encoder(weights_in(src, ("model", "pytorch_model"), "encoder"), config.get("architecture"),
                                 trust_pickle, license_of(src))
        model_type = config.get("model_type")
        if model_type not in HF_TYPES:
            classes = config.get("architectures") or [model_type]
            raise UsageError(f"the encoder {src} is a {classes[0]!r}, which synthgen cannot import; supported: "
                             f"{SUPPORTED}")
        return _hf_encoder(src, config, trust_pickle)
    if not src.exists():
        raise UsageError(f"the encoder source {src} does not exist")
    loaded = load_checkpoint(src, "encoder", trust_pickle)
    state = loaded.tensors if loaded.tensors is not None else loaded.module.state_dict()
    if arch is None and "mask_token" in state and "blocks.0.ls1.gamma" in state:
        return _hub_dinov2(src, state, loaded.from_pickle)
    return _timm_encoder(src, arch, trust_pickle, "", state=state, from_pickle=loaded.from_pickle)


# ---- transformers -------------------------------------------------------------------------------------


def _hf_encoder(folder: Path, config: dict, trust_pickle: bool) -> SourceEncoder:
    loaded = load_checkpoint(weights_in(folder, ("model", "pytorch_model"), "encoder"), "encoder", trust_pickle)
    state = loaded.tensors if loaded.tensors is not None else loaded.module.state_dict()
    family = HF_TYPES[config["model_type"]]
    source_class = (config.get("architectures") or [config["model_type"]])[0]
    state = _canonical_hf_keys(family, state)
    projection = None
    if family == "clip":
        if config["model_type"] == "clip":  # a whole CLIPModel: keep the vision tower and its projection
            config = {**config.get("vision_config", {}), "projection_dim": config.get("projection_dim")}
        state = {k: v for k, v in state.items() if not k.startswith("text_")}
        if "visual_projection.weight" in state:
            projection = int(state["visual_projection.weight"].shape[0])
        convert = _clip_converter(config, state)
    elif family == "dinov2":
        convert = _dinov2_converter(config, state, source_class)
    else:
        convert = _dinov3_converter(config, state)
    processor = folder / "preprocessor_config.json"
    return SourceEncoder(
        family, source_class, folder, int(config["hidden_size"]), int(config["patch_size"]), projection,
        loaded.from_pickle, license_of(folder), read_json(processor, "image processor") if processor.is_file() else None,
        convert,
    )


# The same weights go by two sets of names: the checkpoint files on the hub (and save_pretrained) use the
# original layout; transformers 5 renames some modules in memory. Both are read, as the in-memory names.
_HF_RENAMES = {
    "dinov2": ((".attention.attention.query.", ".attention.q_proj."), (".attention.attention.key.", ".attention.k_proj."),
               (".attention.attention.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj.")),
    "dinov3": (),
    "clip": (),
}
_HF_PREFIXES = {"dinov2": "", "dinov3": "model.", "clip": "vision_model."}


def _canonical_hf_keys(family: str, state: dict) -> dict:
    prefix, out = _HF_PREFIXES[family], {}
    for key, value in state.items():
        key = key.removeprefix(prefix)
        for old, new in _HF_RENAMES[family]:
            key = key.replace(old, new)
        out[key] = value
    return out


def _require(config: dict, checks: dict, where: str) -> None:
    """Refuse config values the timm layout cannot express: {key: (expected, default)}."""
    for key, (expected, default) in checks.items():
        value = config.get(key, default)
        if value != expected:
            raise UsageError(f"{where}: {key}={value!r} is not supported (synthgen's timm layout needs {expected!r})")


def _fused_qkv(state: dict, prefix: str, names: tuple[str, str, str], bias: bool) -> dict[str, torch.Tensor]:
    """timm's fused qkv from separate q, k, v projections; a projection without bias contributes zeros."""
    out = {"weight": torch.cat([state[f"{prefix}{n}.weight"] for n in names])}
    if bias:
        q = state[f"{prefix}{names[0]}.bias"]
        out["bias"] = torch.cat([state.get(f"{prefix}{n}.bias", torch.zeros_like(q)) for n in names])
    return out


def _copy(out: dict, state: dict, pairs: list[tuple[str, str]], bias: bool = True) -> None:
    for src, dst in pairs:
        out[f"{dst}.weight"] = state[f"{src}.weight"]
        if bias:
            out[f"{dst}.bias"] = state[f"{src}.bias"]


def resample_grid(pos: torch.Tensor, grid: int, rule: str = "size") -> torch.Tensor:
    """(1, N, D) patch position embeddings on a square grid -> (1, grid * grid, D), in the source's dtype.

    rule "size": bicubic to the target grid (transformers); "hub": bicubic by the scale factor
    (grid + 0.1) / side, the DINOv2 repository's interpolate_offset; both without antialias, in float32.
    """
    n, dim = pos.shape[1], pos.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise UsageError(f"position embeddings for {n} patches are not a square grid; cannot resample them")
    if side == grid:
        return pos
    p = pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    if rule == "hub":
        scale = (grid + 0.1) / side
        p = F.interpolate(p, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    else:
        p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False)
    return p.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)


def _dinov2_converter(config: dict, state: dict, source_class: str):
    where = f"DINOv2 config ({source_class})"
    _require(config, {"use_swiglu_ffn": (False, False), "hidden_act": ("gelu", "gelu"),
                      "layer_norm_eps": (1e-6, 1e-6), "num_channels": (3, 3)}, where)
    hidden, depth, patch = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["patch_size"])
    regs = int(config.get("num_register_tokens", 0))
    qkv_bias = bool(config.get("qkv_bias", True))
    pos = state["embeddings.position_embeddings"]  # (1, 1 + N, D): CLS position first

    def convert(crop: int):
        grid = crop // patch
        out = {"patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
               "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
               "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
        patches = resample_grid(pos[:, 1:], grid)
        if regs:  # timm: registers and CLS carry no position; the CLS position is a constant added to it
            out["cls_token"] = state["embeddings.cls_token"] + pos[:, :1]
            out["reg_token"] = state["embeddings.register_tokens"]
            out["pos_embed"] = patches
        else:
            out["cls_token"] = state["embeddings.cls_token"]
            out["pos_embed"] = torch.cat([pos[:, :1], patches], dim=1)
        for i in range(depth):
            p, b = f"encoder.layer.{i}.", f"blocks.{i}."
            qkv = _fused_qkv(state, p + "attention.", ("q_proj", "k_proj", "v_proj"), qkv_bias)
            out.update({f"{b}attn.qkv.{k}": v for k, v in qkv.items()})
            _copy(out, state, [(p + "attention.o_proj", b + "attn.proj"), (p + "norm1", b + "norm1"),
                               (p + "norm2", b + "norm2"), (p + "mlp.fc1", b + "mlp.fc1"), (p + "mlp.fc2", b + "mlp.fc2")])
            out[b + "ls1.gamma"] = state[p + "layer_scale1.lambda1"]
            out[b + "ls2.gamma"] = state[p + "layer_scale2.lambda1"]
        kwargs = dict(patch_size=patch, embed_dim=hidden, depth=depth, num_heads=int(config["num_attention_heads"]),
                      mlp_ratio=float(config.get("mlp_ratio", 4)), qkv_bias=qkv_bias, init_values=1.0)
        name = "vit_small_patch14_dinov2"
        if regs:
            name = "vit_small_patch14_reg4_dinov2"
            kwargs.update(reg_tokens=regs, no_embed_class=True)
        return name, kwargs, out

    return convert


def _clip_converter(config: dict, state: dict):
    where = "CLIP vision config"
    _require(config, {"layer_norm_eps": (1e-5, 1e-5), "num_channels": (3, 3)}, where)
    act = config.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise UsageError(f"{where}: hidden_act={act!r} is not supported (quick_gelu or gelu)")
    hidden, depth, patch = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["patch_size"])
    pos = state["embeddings.position_embedding.weight"][None]  # (1, 1 + N, D)
    has_proj = "visual_projection.weight" in state

    def convert(crop: int):
        out = {"cls_token": state["embeddings.class_embedding"].reshape(1, 1, -1),
               "patch_embed.proj.weight": state["embeddings.patch_embedding.weight"],
               "pos_embed": torch.cat([pos[:, :1], resample_grid(pos[:, 1:], crop // patch)], dim=1)}
        _copy(out, state, [("pre_layrnorm", "norm_pre"), ("post_layernorm", "norm")])
        for i in range(depth):
            p, b = f"encoder.layers.{i}.", f"blocks.{i}."
            qkv = _fused_qkv(state, p + "self_attn.", ("q_proj", "k_proj", "v_proj"), True)
            out.update({f"{b}attn.qkv.{k}": v for k, v in qkv.items()})
            _copy(out, state, [(p + "self_attn.out_proj", b + "attn.proj"), (p + "layer_norm1", b + "norm1"),
                               (p + "layer_norm2", b + "norm2"), (p + "mlp.fc1", b + "mlp.fc1"),
                               (p + "mlp.fc2", b + "mlp.fc2")])
        kwargs = dict(patch_size=patch, embed_dim=hidden, depth=depth, num_heads=int(config["num_attention_heads"]),
                      mlp_ratio=int(config["intermediate_size"]) / hidden, act_layer=act)
        if has_proj:  # the projection as timm's head (bias zero): forward_head(normed tokens) = image_embeds
            proj = state["visual_projection.weight"]
            out["head.weight"], out["head.bias"] = proj, torch.zeros(proj.shape[0], dtype=proj.dtype)
            kwargs["num_classes"] = int(proj.shape[0])
        return "vit_base_patch32_clip_224", kwargs, out

    return convert


def _dinov3_converter(config: dict, state: dict):
    where = "DINOv3 config (DINOv3ViTModel)"
    _require(config, {"key_bias": (False, False), "proj_bias": (True, True), "mlp_bias": (True, True),
                      "use_gated_mlp": (False, False), "hidden_act": ("gelu", "gelu"),
                      "layer_norm_eps": (1e-5, 1e-5), "num_channels": (3, 3)}, where)
    if bool(config.get("query_bias", True)) != bool(config.get("value_bias", True)):
        raise UsageError(f"{where}: query_bias and value_bias differ; timm's DINOv3 layout has both or neither")
    qkv_bias = bool(config.get("query_bias", True))
    hidden, depth, patch = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["patch_size"])

    def convert(crop: int):
        out = {"cls_token": state["embeddings.cls_token"], "reg_token": state["embeddings.register_tokens"],
               "patch_embed.proj.weight": state["embeddings.patch_embeddings.weight"],
               "patch_embed.proj.bias": state["embeddings.patch_embeddings.bias"],
               "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"]}
        for i in range(depth):
            p, b = f"layer.{i}.", f"blocks.{i}."
            a = p + "attention."
            out[b + "attn.qkv.weight"] = torch.cat([state[f"{a}{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
            if qkv_bias:  # timm keeps the (absent) key bias as a zero buffer
                out[b + "attn.q_bias"], out[b + "attn.v_bias"] = state[a + "q_proj.bias"], state[a + "v_proj.bias"]
            _copy(out, state, [(a + "o_proj", b + "attn.proj"), (p + "norm1", b + "norm1"), (p + "norm2", b + "norm2"),
                               (p + "mlp.up_proj", b + "mlp.fc1"), (p + "mlp.down_proj", b + "mlp.fc2")])
            out[b + "gamma_1"] = state[p + "layer_scale1.lambda1"]
            out[b + "gamma_2"] = state[p + "layer_scale2.lambda1"]
        kwargs = dict(patch_size=patch, embed_dim=hidden, depth=depth, num_heads=int(config["num_attention_heads"]),
                      mlp_ratio=int(config["intermediate_size"]) / hidden, init_values=1.0,
                      num_reg_tokens=int(config.get("num_register_tokens", 0)),
                      rope_temperature=float(config.get("rope_theta", 100.0)))
        return ("vit_small_patch16_dinov3_qkvb" if qkv_bias else "vit_small_patch16_dinov3"), kwargs, out

    return convert


# ---- timm and torch hub ---------------------------------------------------------------------------------


def _timm_family(arch: str) -> str:
    for family, tag in (("dinov2", "_dinov2"), ("dinov3", "_dinov3"), ("clip", "_clip_")):
        if tag in arch and arch.startswith("vit_"):
            return family
    raise UsageError(f"timm architecture {arch!r} is not a DINOv2, DINOv3 or CLIP ViT; supported: {SUPPORTED}")


def _timm_encoder(path: Path, arch: str | None, trust_pickle: bool, license: str, state: dict | None = None,
                  from_pickle: bool = False) -> SourceEncoder:
    if not arch:
        raise UsageError(f"{path}: a timm checkpoint does not name its architecture; add --encoder-arch NAME "
                         "(e.g. vit_base_patch14_dinov2) or use a timm folder with config.json")
    family = _timm_family(arch)
    if state is None:
        loaded = load_checkpoint(path, "encoder", trust_pickle)
        state, from_pickle = (loaded.tensors if loaded.tensors is not None else loaded.module.state_dict(),
                              loaded.from_pickle)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a classifier head is not an encoder
    hidden = int(state["patch_embed.proj.weight"].shape[0])
    patch = int(state["patch_embed.proj.weight"].shape[-1])

    def convert(crop: int):
        from timm.layers import resample_abs_pos_embed

        out = dict(state)
        if "pos_embed" in out:
            net = _timm_net(arch, crop)
            prefix = 0 if getattr(net, "no_embed_class", False) else net.num_prefix_tokens
            out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], (crop // patch, crop // patch),
                                                      num_prefix_tokens=prefix)
        return arch, {}, out

    return SourceEncoder(family, f"timm:{arch}", path, hidden, patch, None, from_pickle, license, None, convert)


def _timm_net(arch: str, crop: int):
    import timm

    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=0, img_size=crop)


def _hub_dinov2(path: Path, state: dict, from_pickle: bool) -> SourceEncoder:
    hidden = int(state["patch_embed.proj.weight"].shape[0])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if "blocks.0.mlp.w12.weight" in state:
        raise UsageError(f"{path}: DINOv2 giant's SwiGLU blocks are not supported; use a ViT-S/B/L checkpoint")
    regs = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    # The file names no head count; every released DINOv2 (S/B/L/g: 384/768/1024/1536 wide) has 64-wide heads.
    if hidden % 64:
        raise UsageError(f"{path}: a {hidden}-wide DINOv2 does not have the released models' 64-wide heads; its "
                         "head count is unknown. Export it as a transformers or timm folder instead")
    heads = hidden // 64
    pos = state["pos_embed"]

    def convert(crop: int):
        patches = resample_grid(pos[:, 1:], crop // patch, rule="hub")
        out = {k: v for k, v in state.items() if k not in ("mask_token", "register_tokens", "pos_embed")}
        if regs:
            out["cls_token"] = state["cls_token"] + pos[:, :1]
            out["reg_token"], out["pos_embed"] = state["register_tokens"], patches
        else:
            out["pos_embed"] = torch.cat([pos[:, :1], patches], dim=1)
        mlp = int(state["blocks.0.mlp.fc1.weight"].shape[0]) / hidden
        kwargs = dict(patch_size=patch, embed_dim=hidden, depth=depth, num_heads=heads, mlp_ratio=mlp, init_values=1.0)
        name = "vit_small_patch14_dinov2"
        if regs:
            name = "vit_small_patch14_reg4_dinov2"
            kwargs.update(reg_tokens=regs, no_embed_class=True)
        return name, kwargs, out

    return SourceEncoder("dinov2", "torch.hub:dinov2", path, hidden, patch, None, from_pickle, "", None, convert)
