"""Contracts of `synthgen.decode`: DALI (CPU) and PIL decode the same pixels, resize alike within a stated
tolerance, skip and count the same corrupt files, and `embed --decoder` picks, logs and refuses clearly.

Tolerance: decoding alone is bitwise equal on CPU; after resizing, DALI's `fn.resize` and the PIL path's
torch resize differ by a mean absolute difference below RESIZE_MEAN_TOL uint8 units per image (measured
<= 0.25 at a 27x downscale of a photo). The GPU (`mixed`) path cannot run here and is not tested.
"""

from __future__ import annotations

import functools
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from synthgen import decode
from synthgen.bank import build_bank, load_bank
from synthgen.cli import app
from synthgen.decode import DaliDecoder, PilDecoder, make_decoder, output_size
from synthgen.models.encoder import ResizeRule
from synthgen.errors import UsageError
from synthgen.sources import open_source

RESIZE_MEAN_TOL = 0.5  # uint8 units, mean over one image's pixels and channels
runner = CliRunner()


@pytest.fixture
def dali():
    return pytest.importorskip("nvidia.dali")


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.cache
def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # two (427, 640, 3) uint8 photos


@functools.cache
def _good_blobs() -> dict[str, bytes]:
    """Real photos and small images in every format and mode a source may hold, by file name."""
    china, flower = _photos()
    crop = Image.fromarray(china[100:260, 200:420])  # (160, 220)
    rotated = Image.fromarray(flower[:150, :100])
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored sideways: both decoders must turn it upright
    deep = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 53).astype(np.uint16)
    return {
        "china.jpg": _encode(Image.fromarray(china), "JPEG", quality=90),
        "flower_portrait.jpg": _encode(Image.fromarray(flower[:400, 250:450]), "JPEG", quality=85),
        "crop.png": _encode(crop, "PNG"),
        "crop_gray.jpg": _encode(crop.convert("L"), "JPEG", quality=90),
        "crop_rgba.png": _encode(crop.convert("RGBA"), "PNG"),
        "crop_palette.png": _encode(crop.convert("P"), "PNG"),
        "crop_cmyk.jpg": _encode(crop.convert("CMYK"), "JPEG", quality=90),
        "crop.webp": _encode(crop, "WEBP", quality=80),
        "crop.bmp": _encode(crop, "BMP"),
        "crop.tif": _encode(crop, "TIFF"),
        "rotated.jpg": _encode(rotated, "JPEG", quality=90, exif=exif.tobytes()),
        "tiny.png": _encode(Image.fromarray(china[:12, :16]), "PNG"),  # upscaled by the resize
        "crop.gif": _encode(crop.convert("P"), "GIF"),  # DALI has no GIF decoder: routed to PIL
        "deep16.png": _encode(Image.fromarray(deep), "PNG"),  # 16-bit: routed to PIL
    }


@functools.cache
def _bad_blobs() -> dict[str, bytes]:
    jpeg = _encode(Image.fromarray(_photos()[0][100:228, 200:328]), "JPEG", quality=90)  # ~10 kB: the cut
    png = _encode(Image.fromarray(_photos()[1][100:164, 200:264]), "PNG")  # keeps the headers
    return {
        "garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2,
        "empty.png": b"",
        "text.png": b"hello, I am not an image\n",
        "truncated.jpg": jpeg[: len(jpeg) // 2],  # a valid header: only decoding finds it
        "truncated.png": png[: len(png) // 2],
    }


def _stem(name: str) -> str:
    return name.replace(".", "_")  # "crop.png" -> "crop_png": one key per file, in folders and shards


def _write_folder(root, blobs: dict[str, bytes]):
    for i, (name, data) in enumerate(sorted(blobs.items())):
        path = root / ("a" if i % 2 else "b") / f"{_stem(name)}.{name.rsplit('.', 1)[1]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _write_shard(path, blobs: dict[str, bytes]):
    import webdataset

    path.parent.mkdir(parents=True, exist_ok=True)
    with webdataset.TarWriter(str(path)) as sink:
        for i, (name, data) in enumerate(sorted(blobs.items())):
            ext = name.rsplit(".", 1)[1]
            ext = {"tif": "png", "bmp": "png", "gif": "png"}.get(ext, ext)  # decoders sniff the bytes, not the name
            sink.write({"__key__": _stem(name), ext: data, "cls": str(i % 2).encode()})
    return path


def _decode_source(spec: str, decoder) -> dict[str, tuple[np.ndarray | None, str | None]]:
    return {it.key: (it.image, it.error) for it in open_source(spec).items(decoder)}


def _assert_same_decoding(got: dict, want: dict, resized: bool):
    assert got.keys() == want.keys()
    for key, (image, error) in want.items():
        other, other_error = got[key]
        assert other_error == error, key
        if image is None:
            assert other is None, key
            continue
        assert other.dtype == np.uint8 and other.shape == image.shape, key
        if resized:
            diff = np.abs(other.astype(np.int16) - image.astype(np.int16))
            assert diff.mean() < RESIZE_MEAN_TOL, (key, diff.mean())
        else:
            np.testing.assert_array_equal(other, image, err_msg=key)


# ---------------------------------------------------------------------------------------------------
# The size rule and the resize
# ---------------------------------------------------------------------------------------------------


def test_output_size_rule():
    assert output_size(427, 640, 256) == (256, 384)
    assert output_size(640, 427, 256) == (384, 256)
    assert output_size(32, 45, 16) == (16, 23)  # an exact half rounds up
    assert output_size(12, 16, 16) == (16, 21)
    assert output_size(20, 20, 7) == (7, 7)


def test_pil_resize_is_the_encoders_resize():
    from synthgen.models.encoder import resize

    image = _photos()[0][:200, :300]
    got = decode.resize_uint8(image, 64)
    want = resize(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float(), 64)[0]
    assert got.shape == (64, 96, 3)
    np.testing.assert_array_equal(got, want.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def test_dali_resize_follows_the_size_rule(dali):
    shapes = [(32, 45), (32, 47), (96, 135), (12, 16), (45, 32), (33, 47), (7, 7), (100, 37), (17, 250)]
    blobs = [_encode(Image.new("RGB", (w, h), (10, 20, 30)), "PNG") for h, w in shapes]
    for rule in (ResizeRule(16), ResizeRule(24), ResizeRule(24, rounding="floor"), ResizeRule(20, "square")):
        decoded = DaliDecoder(resize=rule, batch_size=4).decode(blobs)
        assert [img.shape[:2] for img, _ in decoded] == [rule.output(h, w) for h, w in shapes]


def test_size_rule_roundings():
    assert ResizeRule(256, rounding="floor").output(427, 640) == (256, 383)  # torchvision / transformers
    assert ResizeRule(256).output(427, 640) == (256, 384)
    assert ResizeRule(16, rounding="floor").output(32, 45) == (16, 22)
    assert ResizeRule(256, "square").output(427, 640) == (256, 256)


# ---------------------------------------------------------------------------------------------------
# DALI (CPU) vs PIL on the same images
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resize", [
    None, 48, 224,
    # encoder recipes: the published DINOv2 transform's square, CLIP's bicubic with torchvision's floor
    ResizeRule(48, "square"), ResizeRule(48, "shorter", "bicubic", "floor"),
], ids=str)
def test_dali_matches_pil_on_an_image_folder(dali, tmp_path, resize):
    root = _write_folder(tmp_path / "imgs", {**_good_blobs(), **_bad_blobs()})
    want = _decode_source(str(root), PilDecoder(resize=resize))
    got = _decode_source(str(root), DaliDecoder(resize=resize, batch_size=4))
    assert sum(image is None for image, _ in got.values()) == len(_bad_blobs())
    _assert_same_decoding(got, want, resized=resize is not None)
    if resize:
        size = resize.size if isinstance(resize, ResizeRule) else resize
        assert all(min(img.shape[:2]) == size for img, _ in got.values() if img is not None)
    else:
        rotated = next(image for key, (image, _) in got.items() if key.endswith("/rotated_jpg"))
        assert rotated.shape == (100, 150, 3)  # stored (150, 100) with EXIF orientation 6: turned upright


def test_dali_matches_pil_on_a_webdataset_shard(dali, tmp_path):
    shard = _write_shard(tmp_path / "shards" / "000000.tar", {**_good_blobs(), **_bad_blobs()})
    for resize in (None, 64):
        want = _decode_source(str(shard), PilDecoder(resize=resize))
        got = _decode_source(str(shard), DaliDecoder(resize=resize, batch_size=5))
        assert sum(image is None for image, _ in got.values()) == len(_bad_blobs())
        _assert_same_decoding(got, want, resized=resize is not None)


def test_a_failed_dali_batch_falls_back_to_pil_and_the_pipeline_recovers(dali):
    good, bad = list(_good_blobs().values())[:3], _bad_blobs()["truncated.jpg"]
    decoder = DaliDecoder(batch_size=4)  # no resize: decoded pixels are bitwise equal in both paths
    first = decoder.decode([good[0], bad, good[1], good[2]])
    assert decoder.failed_batches == 1
    assert first[1][0] is None and "truncated" in first[1][1]
    second = decoder.decode(good)  # a fresh pipeline after the failure
    assert decoder.failed_batches == 1
    for (a, _), (b, _) in zip([first[0], first[2], first[3]], second):
        np.testing.assert_array_equal(a, b)


def test_dali_decodes_the_default_iteration_images_the_same(dali, tmp_path):
    root = _write_folder(tmp_path / "imgs", _good_blobs())
    default = {it.key: it.image for it in open_source(str(root))}  # `for item in source`: PIL, own size
    via_dali = _decode_source(str(root), DaliDecoder(batch_size=64))
    for key, image in default.items():
        np.testing.assert_array_equal(via_dali[key][0], image, err_msg=key)


# ---------------------------------------------------------------------------------------------------
# embed: choosing, logging, corrupt files counted in both paths
# ---------------------------------------------------------------------------------------------------


def test_make_decoder_choices_and_log_line(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="synthgen.decode"):
        assert isinstance(make_decoder("pil"), PilDecoder)
    assert [r.getMessage() for r in caplog.records] == ["image decoder: pil (--decoder pil)"]
    with pytest.raises(UsageError, match="--decoder 'nvjpeg' is not one of auto, dali, pil"):
        make_decoder("nvjpeg")
    monkeypatch.setattr(decode, "dali_available", lambda: False)
    auto = make_decoder("auto")
    assert isinstance(auto, PilDecoder) and "DALI is not importable" in auto.description
    with pytest.raises(UsageError, match=r"--decoder dali needs NVIDIA DALI.*pip install nvidia-dali-cuda130"):
        make_decoder("dali")


def test_auto_picks_dali_on_cpu_when_installed(dali):
    decoder = make_decoder("auto", resize=16)
    assert isinstance(decoder, DaliDecoder) and decoder.device_id is None
    assert decoder.description == "dali (device='cpu', device_id=None)"


def test_cuda_device_without_cuda_uses_the_cpu_pipeline(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert decode.cuda_device_id("cuda") is None and decode.cuda_device_id("cpu") is None


def test_embed_skips_and_counts_corrupt_files_in_both_paths(dali, tiny_pack, tmp_path):
    root = _write_folder(tmp_path / "imgs", {**_good_blobs(), **_bad_blobs()})
    banks = {}
    for name in ("pil", "dali"):
        summary = build_bank(str(root), tiny_pack, tmp_path / name, batch_size=4, progress=False, decoder=name)
        assert summary["embedded"] == len(_good_blobs()) and summary["decoder"].startswith(name)
        banks[name] = load_bank(tmp_path / name)
        assert banks[name].meta["num_skipped"] == len(_bad_blobs())
    skipped = {name: bank.meta["skipped"] for name, bank in banks.items()}
    assert skipped["pil"] == skipped["dali"]  # the same keys and the same (PIL's) reasons
    assert sorted(s["key"].split("/")[1] for s in skipped["dali"]) == sorted(map(_stem, _bad_blobs()))
    assert banks["pil"].keys == banks["dali"].keys
    # Same images up to the resize tolerance: the embeddings agree closely (float16 storage).
    diff = (banks["pil"].embeddings.float() - banks["dali"].embeddings.float()).abs().max().item()
    assert diff < 0.05, diff


def _cli_embed(root, pack, out, *extra):
    return runner.invoke(app, ["embed", "--images", str(root), "--pack", str(pack), "--out", str(out),
                               "--batch", "4", "--no-progress", *extra])


def test_cli_embed_decoder_pil(tiny_pack, tmp_path):
    root = _write_folder(tmp_path / "imgs", {**_good_blobs(), **_bad_blobs()})
    result = _cli_embed(root, tiny_pack, tmp_path / "bank", "--decoder", "pil")
    assert result.exit_code == 0, result.output
    assert "(decoder: pil (--decoder pil))" in result.output
    assert f"skipped {len(_bad_blobs())} unreadable input(s)" in result.output
    assert json.loads((tmp_path / "bank" / "bank.json").read_text())["decoder"] == "pil (--decoder pil)"


def test_cli_embed_decoder_dali_end_to_end(dali, tiny_pack, tmp_path):
    root = _write_folder(tmp_path / "imgs", {**_good_blobs(), **_bad_blobs()})
    result = _cli_embed(root, tiny_pack, tmp_path / "bank", "--decoder", "dali")
    assert result.exit_code == 0, result.output
    assert f"embedded {len(_good_blobs())} images" in result.output
    assert "(decoder: dali (device='cpu', device_id=None))" in result.output
    assert f"skipped {len(_bad_blobs())} unreadable input(s)" in result.output
    bank = load_bank(tmp_path / "bank")
    assert len(bank.keys) == len(_good_blobs()) and bank.meta["decoder"].startswith("dali")


def test_cli_embed_decoder_dali_without_dali_is_a_usage_error(monkeypatch, tiny_pack, tmp_path):
    monkeypatch.setattr(decode, "dali_available", lambda: False)
    root = _write_folder(tmp_path / "imgs", _good_blobs())
    result = _cli_embed(root, tiny_pack, tmp_path / "bank", "--decoder", "dali")
    assert isinstance(result.exception, UsageError)
    assert "--decoder dali needs NVIDIA DALI" in str(result.exception) and "--decoder pil" in str(result.exception)
    assert not (tmp_path / "bank").exists()
