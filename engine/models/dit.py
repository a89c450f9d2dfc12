"""A compact DiT denoiser conditioned on an image representation (e.g. a DINOv2 CLS embedding).

The architecture follows "Scalable Diffusion Models with Transformers" (Peebles & Xie, 2023): patchify,
fixed 2-D sin-cos positions, a stack of adaLN-Zero transformer blocks and a modulated linear head. The one
change is the conditioning signal: instead of a class-label table, the representation vector goes through
its own small MLP and is added to the timestep embedding, so every block is modulated by
c = t_emb + cond_emb.

The model predicts whatever the training objective asked for (eps, v or flow velocity); it has no notion of
schedules. Weights load as safetensors onto the meta device (`dit_from_state_dict`); nothing is unpickled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synthgen.kernels import dispatch as kernels

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiTConfig",
    "dit_from_state_dict",
    "modulate",
    "reinit_zero_params_",
]

# Width of the sinusoidal timestep features fed to the timestep MLP (the DiT default). Part of the weight
# shapes, so changing it invalidates every saved pack.
TIMESTEP_FREQ_DIM = 256
_MAX_PERIOD = 10_000.0


# ------------------------------------------------------------------------------------------------------
# ---- Config ----
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a DiT. The single source of its defaults; packs store it via `to_dict`."""

    sample_size: int = 32  # spatial size of the input (pixels or latents), square
    in_channels: int = 3
    patch_size: int = 4
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    cond_dim: int = 384  # dimension of the conditioning representation (e.g. a DINOv2 CLS embedding)

    def __post_init__(self) -> None:
        for name in ("sample_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "cond_dim"):
            value = getattr(self, name)
            # bool is an int subclass; True as a depth is always a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be a positive finite number, got {ratio!r}")
        # JSON may hand us 4 instead of 4.0; normalise so equal configs compare and hash equal.
        object.__setattr__(self, "mlp_ratio", float(ratio))
        if self.mlp_hidden_size < 1:
            raise ValueError(
                f"DiTConfig.mlp_ratio={ratio} gives an empty MLP for hidden_size={self.hidden_size}; raise it"
            )
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.sample_size={self.sample_size} must be divisible by patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        # The 2-D sin-cos embedding gives each axis hidden/2 channels, split evenly into sin and cos.
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig.hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos positions)")

    @property
    def grid_size(self) -> int:
        return self.sample_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiTConfig:
        """Build from a dict such as `to_dict()` wrote. Missing keys take the defaults; unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DiTConfig.from_dict got unknown keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**d)


DIT_PRESETS: dict[str, DiTConfig] = {
    # For tests and smoke runs: pixel space, a few hundred thousand parameters.
    "tiny": DiTConfig(sample_size=32, in_channels=3, patch_size=4, hidden_size=64, depth=2, num_heads=2),
    # Latent space (SD-VAE 4-channel latents of 128 px images).
    "small": DiTConfig(sample_size=16, in_channels=4, patch_size=2, hidden_size=256, depth=6, num_heads=4),
    # DiT-B/2 widths on 256 px latents, conditioned on a 768-d representation (DINOv2 ViT-B CLS).
    "base": DiTConfig(
        sample_size=32, in_channels=4, patch_size=2, hidden_size=768, depth=12, num_heads=12, cond_dim=768
    ),
}


# ------------------------------------------------------------------------------------------------------
# ---- Helpers ----
# ------------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, T, D), shift/scale (B, D). `1 + scale` makes a zero-init modulation the identity."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) float positions -> (N, dim) [sin | cos] features with geometric frequencies."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / _MAX_PERIOD**omega
    angles = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, device: torch.device | str | None = None) -> Tensor:
    """(grid*grid, dim) float32 fixed positions, row-major like `flatten(2)` of the patch grid.

    Computed in float64 so the same numbers come out on every device, then rounded once.
    """
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows = coords.repeat_interleave(grid_size)  # token k sits at row k // grid
    cols = coords.repeat(grid_size)  # and column k % grid
    emb = torch.cat([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], dim=1)
    return emb.to(torch.float32)


def timestep_embedding(t: Tensor, dim: int = TIMESTEP_FREQ_DIM) -> Tensor:
    """(B,) float timesteps (fractional allowed) -> (B, dim) float32 [cos | sin] features."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp2(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


# ------------------------------------------------------------------------------------------------------
# ---- Embedders ----
# ------------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> (B, D) vector: fixed sinusoidal features, then a learned MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = _mlp2(TIMESTEP_FREQ_DIM, hidden_size, hidden_size)

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t).to(self.mlp[0].weight.dtype)  # (B, F)
        return self.mlp(freq)  # (B, D)


class CondEmbedder(nn.Module):
    """Representation vector -> (B, D), summed with the timestep embedding to form c.

    An MLP rather than a single projection so the model can reshape the (often anisotropic) feature space
    of a frozen encoder before it drives every block's modulation.

    `shift` / `scale` standardise the representation first, (cond - shift) / scale per dimension, with the
    training bank's statistics (`set_standardization`). Encoder features are far from zero-mean: in the
    digits pack the common offset is larger than the variation between images, so an unstandardised
    condition barely moves the modulation and the denoiser learns to ignore it.
    """

    def __init__(self, cond_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = _mlp2(cond_dim, hidden_size, hidden_size)
        self.register_buffer("shift", torch.zeros(cond_dim))
        self.register_buffer("scale", torch.ones(cond_dim))

    @torch.no_grad()
    def set_standardization(self, conditions: Tensor, eps: float = 1e-6) -> None:
        """Take shift/scale from a (N, cond_dim) set of conditions (the training bank)."""
        self.shift.copy_(conditions.mean(0))
        self.scale.copy_(conditions.std(0).clamp_min(eps))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved before standardisation existed carry no shift/scale: load them as the identity.
        weight = state_dict.get(prefix + "mlp.0.weight")
        if weight is not None:
            for name, fill in (("shift", 0.0), ("scale", 1.0)):
                state_dict.setdefault(prefix + name, torch.full(weight.shape[1:], fill, dtype=weight.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, cond: Tensor) -> Tensor:
        dtype = self.mlp[0].weight.dtype
        return self.mlp(((cond.to(self.shift.dtype) - self.shift) / self.scale).to(dtype))  # (B, D)


# ------------------------------------------------------------------------------------------------------
# ---- Transformer blocks ----
# ------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
        # Our fused Triton kernel on CUDA, else SDPA (a fused kernel per device); neither materialises T x T.
        y = kernels.attention(q, k, v)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        # tanh-GELU as in DiT; it also fuses into a single elementwise kernel under compile.
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms, and residual gates, are set by c (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        # No affine: the per-sample shift/scale from c replaces the learned LayerNorm parameters.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mod = self.adaLN_modulation(c)  # (B, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)  # 6 x (B, D)
        # x + gate * f(modulate(norm(x))), with norm + modulate and the gated add each one fused pass on CUDA.
        h = self.attn(kernels.layernorm_modulate(x, shift_a, scale_a, self.norm1.eps))  # (B, T, D)
        x = kernels.gated_residual(x, gate_a, h)  # (B, T, D)
        h = self.mlp(kernels.layernorm_modulate(x, shift_m, scale_m, self.norm2.eps))  # (B, T, D)
        x = kernels.gated_residual(x, gate_m, h)  # (B, T, D)
        return x


class FinalLayer(nn.Module):
    """Modulated norm, then a linear map from each token to its p*p*C patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(kernels.layernorm_modulate(x, shift, scale, self.norm.eps))  # (B, T, p*p*C)


# ------------------------------------------------------------------------------------------------------
# ---- DiT ----
# ------------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Representation-conditioned diffusion transformer: (x_t, t, cond) -> prediction of x's shape."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        cfg = config
        D = cfg.hidden_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.cond_embedder = CondEmbedder(cfg.cond_dim, D)
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_hidden_size) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels)
        # Non-persistent: a pure function of the config, so it stays out of checkpoints. Built on the meta
        # device it is a placeholder; `init_buffers` fills it after assign-loading.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.grid_size), persistent=False)
        self.initialize_weights()

    # ---- Initialisation ----

    def init_buffers(self) -> DiT:
        """Recompute the non-persistent buffers on the device and dtype of the weights.

        Needed after building on the meta device and `load_state_dict(..., assign=True)`: the state dict
        carries no pos_embed, so it would otherwise stay on meta.
        """
        w = self.x_embedder.weight
        pos = sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size, device=w.device)
        self.pos_embed = pos.to(w.dtype)
        return self

    def initialize_weights(self) -> None:
        """DiT's scheme: Xavier linears, N(0, 0.02) embedder MLPs, and zeros wherever adaLN-Zero needs them."""

        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic)
        # The patch conv is a linear map over flattened patches; init it like one.
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for mlp in (self.t_embedder.mlp, self.cond_embedder.mlp):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity (zero gates) and the head outputs zeros, which
        # keeps early training stable at any depth.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ---- Forward ----

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p*p*C) -> (B, C, H, W); token k is patch (k // G, k % G), values ordered (p_h, p_w, C)."""
        B = x.shape[0]
        p, G, C = self.config.patch_size, self.config.grid_size, self.config.in_channels
        x = x.reshape(B, G, G, p, p, C)  # (B, Gh, Gw, ph, pw, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, Gh, ph, Gw, pw)
        return x.reshape(B, C, G * p, G * p)  # (B, C, H, W)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x (B, C, H, W) noisy sample, t (B,) float timesteps in [0, 1000], cond (B, cond_dim) representation
        -> (B, C, H, W) prediction (eps, v or flow velocity; the model does not care)."""
        # A Python attribute, not a device read: no sync, no graph break. Meta inputs are shape/FLOP counting.
        if self.pos_embed.is_meta and not x.is_meta:
            raise RuntimeError("DiT.pos_embed is on the meta device; call model.init_buffers() after assign-loading")
        h = self.x_embedder(x)  # (B, D, G, G)
        h = h.flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.cond_embedder(cond)  # (B, D)
        for block in self.blocks:
            h = block(h, c)  # (B, T, D)
        h = self.final_layer(h, c)  # (B, T, p*p*C)
        return self.unpatchify(h)  # (B, C, H, W)

    # ---- Cost model ----

    def flops_per_forward(self) -> int:
        """Matmul FLOPs (2*m*n*k per product) of one sample's forward, in closed form.

        With T = (sample/patch)^2 tokens, width D, MLP width M, patch values P = patch^2 * C:
          patch embed     2*T*P*D
          timestep MLP    2*(256*D + D*D)
          cond MLP        2*(cond_dim*D + D*D)
          per block       2*D*6D                     adaLN modulation
                        + 2*T*D*3D + 2*T*D*D          qkv and output projections
                        + 2*2*T*T*D                   Q K^T and attention @ V
                        + 2*2*T*D*M                   MLP
          final layer     2*D*2D + 2*T*D*P
        Norms, softmax, activations and bias adds are elementwise and left out, as FLOP counters do.
        """
        cfg = self.config
        T, D, M = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden_size
        P = cfg.patch_size**2 * cfg.in_channels
        embed = 2 * T * P * D + 2 * (TIMESTEP_FREQ_DIM * D + D * D) + 2 * (cfg.cond_dim * D + D * D)
        block = 2 * D * 6 * D + 2 * T * D * 4 * D + 4 * T * T * D + 4 * T * D * M
        final = 2 * D * 2 * D + 2 * T * D * P
        return embed + cfg.depth * block + final


# ------------------------------------------------------------------------------------------------------
# ---- Loading and test weights ----
# ------------------------------------------------------------------------------------------------------


def dit_from_state_dict(
    config: DiTConfig, state_dict: Mapping[str, Tensor], device: torch.device | str | None = None
) -> DiT:
    """Build a DiT without allocating or initialising weights, then adopt `state_dict`'s tensors.

    Meant for `safetensors.torch.load_file(path, device=...)`: the model is built on the meta device,
    `assign=True` takes the loaded tensors as the parameters (no copy, no pickle), strict loading names
    any missing or unexpected key, and the non-persistent buffers are recomputed to match.
    """
    with torch.device("meta"):
        model = DiT(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if device is not None:
        model.to(device)
    return model.init_buffers().eval()


@torch.no_grad()
def reinit_zero_params_(model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Module:
    """Fill every parameter that is exactly all-zero with N(0, std), in place; returns `model`.

    A freshly initialised DiT outputs exactly zero (adaLN-Zero), which makes a "random weights" pack
    useless for checking that conditioning, guidance or batching reach the output. Draws happen on the
    generator's device (CPU when None) in parameter order, so a seeded generator gives the same weights
    on any target device.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    for p in model.parameters():
        if p.is_meta or p.numel() == 0 or bool(p.any()):
            continue
        noise = torch.randn(p.shape, generator=generator, device=gen_device, dtype=torch.float32) * std
        p.copy_(noise.to(device=p.device, dtype=p.dtype))
    return model
