"""Contracts of the DiT denoiser: shapes, cost model, conditioning, batching, meta loading, compile, config."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from synthgen.models.dit import (
    DIT_PRESETS,
    DiT,
    DiTConfig,
    dit_from_state_dict,
    reinit_zero_params_,
)


def _random_model(name: str, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(DIT_PRESETS[name]).eval()
    return reinit_zero_params_(model, generator=torch.Generator().manual_seed(seed + 1))


def _inputs(cfg: DiTConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    cond = torch.randn(batch, cfg.cond_dim, generator=g)
    return x, t, cond


@pytest.fixture(scope="module")
def tiny() -> DiT:
    return _random_model("tiny")


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shape_dtype_and_flops(name: str) -> None:
    model = _random_model(name)
    cfg = model.config
    x, t, cond = _inputs(cfg, 3)
    with torch.no_grad():
        out = model(x, t, cond)
    assert out.shape == x.shape == (3, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()

    # The math backend decomposes attention into bmm, which the counter sees; the fused CPU kernel
    # has no FLOP formula registered and would be counted as zero.
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x[:1], t[:1], cond[:1])
    measured = counter.get_total_flops()
    assert measured > 0
    assert abs(model.flops_per_forward() - measured) <= 0.10 * measured


def test_zero_init_outputs_zero_and_conditioning_matters() -> None:
    cfg = DIT_PRESETS["tiny"]
    x, t, cond = _inputs(cfg, 2)
    fresh = DiT(cfg).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, cond), torch.zeros_like(x))

    model = reinit_zero_params_(fresh, generator=torch.Generator().manual_seed(3))
    assert all(p.any() for p in model.parameters())
    with torch.no_grad():
        a = model(x, t, cond)
        b = model(x, t, torch.randn_like(cond))
        c = model(x, t + 100.0, cond)
    assert (a - b).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-3


def test_reinit_zero_params_leaves_nonzero_params_alone() -> None:
    model = DiT(DIT_PRESETS["tiny"])
    before = {k: v.clone() for k, v in model.named_parameters()}
    reinit_zero_params_(model, std=0.5, generator=torch.Generator().manual_seed(0))
    for k, v in model.named_parameters():
        if before[k].any():
            assert torch.equal(v, before[k]), k
        else:
            assert v.std() > 0.1, k
    # Seeded: the same generator seed gives the same weights.
    again = reinit_zero_params_(DiT(DIT_PRESETS["tiny"]), std=0.5, generator=torch.Generator().manual_seed(0))
    zero_keys = [k for k, v in before.items() if not v.any()]
    for k in zero_keys:
        assert torch.equal(again.state_dict()[k], model.state_dict()[k]), k
    assert torch.equal(model.cond_embedder.shift, torch.zeros_like(model.cond_embedder.shift))  # buffers untouched


def test_batch_independence(tiny: DiT) -> None:
    x, t, cond = _inputs(tiny.config, 5, seed=7)
    with torch.no_grad():
        full = tiny(x, t, cond)
        for i in range(5):
            one = tiny(x[i : i + 1], t[i : i + 1], cond[i : i + 1])
            torch.testing.assert_close(full[i : i + 1], one, atol=1e-5, rtol=0)


def test_guidance_halves_are_one_batched_forward(tiny: DiT) -> None:
    from synthgen.condition import cond_uncond

    x, t, cond = _inputs(tiny.config, 3, seed=2)
    null = torch.zeros(tiny.config.cond_dim)
    with torch.no_grad():
        c, u = cond_uncond(tiny, x, t, cond, null, guidance=4.0)
        torch.testing.assert_close(c, tiny(x, t, cond), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u, tiny(x, t, null.expand(3, -1)), atol=1e-5, rtol=1e-5)
        plain, none = cond_uncond(tiny, x, t, cond, null, guidance=1.0)  # no guidance: no unconditional half
    assert none is None
    torch.testing.assert_close(plain, c, atol=1e-5, rtol=1e-5)


def test_meta_build_and_assign_load_matches(tiny: DiT, tmp_path) -> None:
    path = tmp_path / "dit.safetensors"
    save_file(tiny.state_dict(), str(path))
    state = load_file(str(path))
    assert "pos_embed" not in state  # derived from the config, never stored

    with torch.device("meta"):
        meta_model = DiT(tiny.config)
    assert meta_model.pos_embed.is_meta
    meta_model.load_state_dict(state, assign=True)
    with pytest.raises(RuntimeError, match="init_buffers"):
        meta_model(*_inputs(tiny.config, 1))
    meta_model.init_buffers().eval()
    assert not any(t.is_meta for t in list(meta_model.parameters()) + list(meta_model.buffers()))

    loaded = dit_from_state_dict(tiny.config, load_file(str(path)))
    x, t, cond = _inputs(tiny.config, 4, seed=5)
    with torch.no_grad():
        ref = tiny(x, t, cond)
        assert torch.equal(meta_model(x, t, cond), ref)
        assert torch.equal(loaded(x, t, cond), ref)


def test_strict_load_names_bad_keys(tiny: DiT) -> None:
    state = dict(tiny.state_dict())
    state.pop("final_layer.linear.bias")
    with pytest.raises(RuntimeError, match="final_layer.linear.bias"):
        dit_from_state_dict(tiny.config, state)


def test_compile_fullgraph_matches_eager(tiny: DiT) -> None:
    x, t, cond = _inputs(tiny.config, 2, seed=11)
    compiled = torch.compile(tiny, fullgraph=True)
    with torch.no_grad():
        eager = tiny(x, t, cond)
        out = compiled(x, t, cond)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


def test_config_round_trip_and_presets() -> None:
    for cfg in DIT_PRESETS.values():
        assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    assert DiTConfig.from_dict({"mlp_ratio": 4}) == DiTConfig()
    with pytest.raises(ValueError, match="hidden"):
        DiTConfig.from_dict({"hidden": 64})
    base = DIT_PRESETS["base"]
    assert (base.hidden_size, base.depth, base.num_heads, base.patch_size, base.cond_dim) == (768, 12, 12, 2, 768)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sample_size": 30, "patch_size": 4}, "sample_size"),
        ({"hidden_size": 96, "num_heads": 5}, "hidden_size"),
        ({"hidden_size": 66, "num_heads": 2}, "hidden_size"),
        ({"depth": 0}, "depth"),
        ({"num_heads": -1}, "num_heads"),
        ({"patch_size": 2.0}, "patch_size"),
        ({"in_channels": True}, "in_channels"),
        ({"cond_dim": 0}, "cond_dim"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio"),
    ],
)
def test_bad_config_raises_naming_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DiTConfig(**kwargs)


def test_condition_standardization_and_loading_older_weights(tiny: DiT) -> None:
    cfg = tiny.config
    bank = torch.randn(64, cfg.cond_dim) * 0.2 + 3.0  # an offset larger than the spread, like real features
    model = _random_model("tiny")
    model.cond_embedder.set_standardization(bank)
    standardized = (bank - model.cond_embedder.shift) / model.cond_embedder.scale
    assert standardized.mean(0).abs().max() < 1e-5 and (standardized.std(0) - 1).abs().max() < 1e-5
    x, t, _ = _inputs(cfg, 4, seed=3)
    with torch.no_grad():
        # The same weights with identity statistics see the standardized condition as given.
        plain = _random_model("tiny")
        assert torch.allclose(model(x, t, bank[:4]), plain(x, t, standardized[:4]), atol=1e-5)

    # Weights from before standardization existed have no shift/scale: they load as the identity.
    old = {k: v for k, v in tiny.state_dict().items() if not k.startswith("cond_embedder.s")}
    loaded = dit_from_state_dict(cfg, old)
    assert torch.equal(loaded.cond_embedder.shift, torch.zeros(cfg.cond_dim))
    assert torch.equal(loaded.cond_embedder.scale, torch.ones(cfg.cond_dim))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, bank[:4]), tiny(x, t, bank[:4]))
