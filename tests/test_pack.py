"""Model packs: every preset family loads and generates; broken packs fail with messages that say why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synthgen.bank import build_bank
from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.pack import load_pack, read_pack_config
from synthgen.pipeline import run_generate
from synthgen.presets import write_random_pack
from synthgen.verify import verify_run


@pytest.mark.parametrize("preset,sampler", [("tiny-unet", "dpmpp_2m"), ("tiny-flow", "euler")])
def test_preset_family_generates_end_to_end(preset, sampler, tmp_path):
    pack = tmp_path / preset
    write_random_pack(preset, pack)
    build_bank("builtin:digits:test", pack, tmp_path / "bank", progress=False)
    cfg = GenerateConfig(n=6, out=tmp_path / "run", pack=pack, bank=tmp_path / "bank", sampler=sampler, steps=2,
                         guidance=1.5, shard_size=4, batch=4, progress=False, min_score=-1.0)
    summary = run_generate(cfg)
    assert summary.complete and verify_run(cfg.out).ok


def test_load_pack_round_trips_weights(tiny_pack):
    from safetensors.torch import load_file

    pack = load_pack(tiny_pack)
    saved = load_file(str(tiny_pack / "denoiser.safetensors"))
    for name, value in pack.denoiser.net.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    assert not any(p.requires_grad for p in pack.denoiser.parameters())
    assert not pack.denoiser.training and not pack.encoder.training


def test_bf16_pack_runs(tiny_pack):
    pack = load_pack(tiny_pack, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    out = pack.denoiser(x, torch.tensor([10.0, 500.0]), torch.randn(2, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_a_bf16_load_of_a_diffusers_vae_is_quiet_and_in_bf16(tmp_path, capfd):
    write_random_pack("tiny-unet", tmp_path / "p", seed=0)  # AutoencoderKL: no fp32-only modules
    capfd.readouterr()
    pack = load_pack(tmp_path / "p", dtype=torch.bfloat16)
    assert "should be kept in float32" not in capfd.readouterr().err
    assert {p.dtype for p in pack.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pack.denoiser.parameters()} == {torch.bfloat16}


@pytest.fixture
def pack_copy(tiny_pack, tmp_path):
    import shutil

    dst = tmp_path / "pack"
    shutil.copytree(tiny_pack, dst)
    return dst


def _edit_json(pack, fn):
    doc = json.loads((pack / "pack.json").read_text())
    fn(doc)
    (pack / "pack.json").write_text(json.dumps(doc))


def test_missing_component_file(pack_copy):
    (pack_copy / "encoder.safetensors").unlink()
    with pytest.raises(UsageError, match="encoder weights file encoder.safetensors is missing"):
        load_pack(pack_copy)


def test_missing_pack_json(tmp_path):
    with pytest.raises(UsageError, match="pack.json is missing.*synthgen pack random"):
        load_pack(tmp_path)


def test_changed_weights_fail_hash_check(pack_copy):
    data = bytearray((pack_copy / "denoiser.safetensors").read_bytes())
    data[-1] ^= 1
    (pack_copy / "denoiser.safetensors").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="does not match the sha256"):
        load_pack(pack_copy)


def test_weights_that_do_not_fit_the_config(pack_copy):
    def widen(doc):
        doc["denoiser"]["config"]["hidden_size"] = 128

    _edit_json(pack_copy, widen)
    with pytest.raises(UsageError, match="denoiser weights do not fit the denoiser described in pack.json"):
        load_pack(pack_copy)


def test_mismatched_cond_dim_in_config(pack_copy):
    def shrink(doc):
        doc["denoiser"]["cond_dim"] = 32

    _edit_json(pack_copy, shrink)
    with pytest.raises(UsageError, match="conditioned on 32-d vectors but the encoder gives 64-d"):
        read_pack_config(pack_copy)


def test_malformed_pack_json(pack_copy):
    (pack_copy / "pack.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_pack_config(pack_copy)
    (pack_copy / "pack.json").write_text(json.dumps({"format": "synthgen-pack/1", "name": "x"}))
    with pytest.raises(UsageError, match="malformed"):
        read_pack_config(pack_copy)


def test_pickled_weights_are_refused_not_loaded(pack_copy):
    """A torch.save checkpoint is never unpickled: refusing it must not even open the file."""
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    torch.save({"x": Boom()}, pack_copy / "denoiser.bin")

    def point_at_pickle(doc):
        doc["weights"]["denoiser"] = {"file": "denoiser.bin"}

    _edit_json(pack_copy, point_at_pickle)
    with pytest.raises(UsageError, match="never unpickles"):
        load_pack(pack_copy)


def test_weights_path_escaping_the_pack_is_refused(pack_copy):
    def escape(doc):
        doc["weights"]["encoder"] = {"file": "../../etc/passwd.safetensors"}

    _edit_json(pack_copy, escape)
    with pytest.raises(UsageError, match="outside the pack folder"):
        load_pack(pack_copy)


def test_unknown_preset():
    with pytest.raises(UsageError, match="--preset 'huge' is not one of tiny"):
        write_random_pack("huge", "/nonexistent")


def test_random_pack_is_seeded(tmp_path):
    a = write_random_pack("tiny", tmp_path / "a", seed=3)
    b = write_random_pack("tiny", tmp_path / "b", seed=3)
    assert a.weights == b.weights and a.random_weights


def test_noise_is_batch_independent_and_normal():
    from synthgen.noise import gaussian, sample_seeds

    seeds = torch.from_numpy(sample_seeds(7, np.arange(16)))
    z = gaussian(seeds, 3, (4, 8, 8))
    torch.testing.assert_close(z[5:9], gaussian(seeds[5:9], 3, (4, 8, 8)), rtol=0, atol=0)
    assert not torch.equal(z, gaussian(seeds, 4, (4, 8, 8)))
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
