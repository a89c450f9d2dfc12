"""Contracts of `synthgen.sources`: every spec form, bad files as data, bad specs as UsageError."""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFile

from synthgen import sources
from synthgen.errors import UsageError
from synthgen.sources import SourceItem, digits_split, image_to_uint8_rgb, open_source

webdataset = pytest.importorskip("webdataset")

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (10, 9), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (7, 11, 4), dtype=np.uint8)
PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
PAL_INDEX = (np.arange(6 * 5).reshape(6, 5) % 3).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _palette_image() -> Image.Image:
    img = Image.fromarray(PAL_INDEX).convert("P")
    img.putpalette(PALETTE)
    return img


def _noise_jpeg() -> bytes:
    return _encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=95)


# ---------------------------------------------------------------------------------------------------
# Fixtures: tiny hermetic datasets written with PIL and webdataset.TarWriter
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    for name in ("cat", "dog", "eel", ".git"):
        (root / name).mkdir(parents=True)
    cat, dog = root / "cat", root / "dog"
    Image.fromarray(RGB).save(cat / "a.png")
    Image.fromarray(GRAY).save(cat / "b.JPG", quality=95)
    (cat / "c.jpg").write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes())  # corrupt
    jpeg = _noise_jpeg()
    (cat / "d.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    (cat / "img.001.png").write_bytes(_encode(Image.fromarray(RGB), "PNG"))  # dots in the name
    (cat / "notes.txt").write_text("not an image")
    (cat / ".hidden.png").write_bytes(_encode(Image.fromarray(RGB), "PNG"))
    Image.fromarray(RGBA, "RGBA").save(dog / "e.png")
    _palette_image().save(dog / "f.gif")
    (dog / "g.png").write_bytes(b"")  # empty
    (dog / "h.png").write_bytes(_encode(Image.fromarray(RGB), "PNG"))
    (dog / "h.webp").write_bytes(_encode(Image.fromarray(RGB), "WEBP", lossless=True))  # same stem
    (root / ".git" / "x.png").write_bytes(_encode(Image.fromarray(RGB), "PNG"))
    (root / "README.txt").write_text("top-level files are ignored")
    return root


def _write_shard(path, samples):
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture
def shard_folder(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    png = _encode(Image.fromarray(RGB), "PNG")
    _write_shard(
        root / "shard-000000.tar",
        [
            {"__key__": "000000", "png": png, "cls": b"0"},
            {"__key__": "000001", "jpg": _encode(Image.fromarray(GRAY), "JPEG"), "cls": b"2"},
            {"__key__": "000002", "jpg": b"\xff\xd8 definitely not a jpeg", "cls": b"1"},
        ],
    )
    _write_shard(
        root / "shard-000001.tar",
        [
            {"__key__": "000003", "png": png},  # no .cls
            {"__key__": "000004", "png": png, "cls": b"cat"},  # non-int .cls
            {"__key__": "000005", "json": b"{}", "cls": b"1"},  # no image member
            {"__key__": "000000", "webp": _encode(Image.fromarray(RGB), "WEBP", lossless=True), "cls": b"1"},
        ],
    )
    (root / "000000.stats.json").write_text("{}")  # a run folder's other files are ignored
    return root


# ---------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------


def test_image_to_uint8_rgb_converts_every_mode():
    out = image_to_uint8_rgb(Image.fromarray(RGB))
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, RGB)

    gray = image_to_uint8_rgb(Image.fromarray(GRAY))
    assert gray.shape == (10, 9, 3)
    for c in range(3):
        np.testing.assert_array_equal(gray[..., c], GRAY)

    np.testing.assert_array_equal(image_to_uint8_rgb(Image.fromarray(RGBA, "RGBA")), RGBA[..., :3])

    pal = image_to_uint8_rgb(_palette_image())
    colours = np.array(PALETTE[:9], dtype=np.uint8).reshape(3, 3)
    np.testing.assert_array_equal(pal, colours[PAL_INDEX])

    transparent = _palette_image()
    transparent.info["transparency"] = 0
    np.testing.assert_array_equal(image_to_uint8_rgb(transparent), colours[PAL_INDEX])

    deep = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(image_to_uint8_rgb(Image.fromarray(deep))[0, :, 0], [0, 128, 255])

    cmyk = image_to_uint8_rgb(Image.fromarray(RGB).convert("CMYK"))
    assert cmyk.shape == (12, 16, 3) and cmyk.dtype == np.uint8


def test_truncated_images_are_not_padded():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------------------------------
# 1. ImageNet-style folder
# ---------------------------------------------------------------------------------------------------


def test_image_folder_lists_classes_and_files(image_folder):
    src = open_source(str(image_folder))
    assert src.class_names == ["cat", "dog", "eel"]  # the empty class keeps its label; .git is hidden
    items = list(src)
    assert len(src) == len(items) == 10
    keys = [it.key for it in items]
    assert keys == [
        "cat/a",
        "cat/b",
        "cat/c",
        "cat/d",
        "cat/img_001",
        "dog/e",
        "dog/f",
        "dog/g",
        "dog/h",
        "dog/h_2",
    ]
    assert all("." not in k for k in keys) and len(set(keys)) == len(keys)
    assert [it.label for it in items] == [0] * 5 + [1] * 5


def test_image_folder_reports_bad_files_as_data(image_folder):
    items = {it.key: it for it in open_source(str(image_folder))}
    bad = {k for k, it in items.items() if it.image is None}
    assert bad == {"cat/c", "cat/d", "dog/g"}
    for key, item in items.items():
        assert isinstance(item, SourceItem)
        if key in bad:
            assert isinstance(item.error, str) and 0 < len(item.error) <= sources.MAX_ERROR_CHARS
        else:
            assert item.error is None
            assert item.image.dtype == np.uint8 and item.image.ndim == 3 and item.image.shape[2] == 3
    assert "truncated" in items["cat/d"].error
    np.testing.assert_array_equal(items["cat/a"].image, RGB)
    np.testing.assert_array_equal(items["dog/e"].image, RGBA[..., :3])
    np.testing.assert_array_equal(items["dog/h_2"].image, RGB)
    assert items["cat/b"].image.shape == (10, 9, 3)
    assert np.array_equal(items["cat/b"].image[..., 0], items["cat/b"].image[..., 2])


def test_image_folder_is_deterministic_and_picklable(image_folder):
    src = open_source(str(image_folder))
    first = [(it.key, it.label, it.error) for it in src]
    again = [(it.key, it.label, it.error) for it in pickle.loads(pickle.dumps(src))]
    assert first == again == [(it.key, it.label, it.error) for it in open_source(str(image_folder))]


# ---------------------------------------------------------------------------------------------------
# 2. WebDataset shards
# ---------------------------------------------------------------------------------------------------


def _shard_specs(root):
    return [
        str(root / "shard-{000000..000001}.tar"),
        str(root / "*.tar"),
        str(root / "shard-00000[01].tar"),
        str(root),
    ]


def test_shards_every_spec_form_reads_the_same_items(shard_folder):
    results = []
    for spec in _shard_specs(shard_folder):
        src = open_source(spec)
        assert src.spec == spec
        results.append([(it.key, it.label, it.error is None) for it in src])
        assert len(src) == 7
    assert all(r == results[0] for r in results)


def test_shards_labels_keys_and_errors(shard_folder):
    src = open_source(str(shard_folder))
    assert src.class_names == ["0", "1", "2"]
    items = list(src)
    keys = [it.key for it in items]
    assert keys == ["000000", "000001", "000002", "000003", "000004", "000005", "000000_2"]
    assert [it.label for it in items] == [0, 2, 1, -1, -1, 1, 1]
    good = [it for it in items if it.image is not None]
    assert [it.key for it in good] == ["000000", "000001", "000000_2"]
    np.testing.assert_array_equal(good[0].image, RGB)
    np.testing.assert_array_equal(good[2].image, RGB)
    assert good[1].image.shape == (10, 9, 3)
    errors = {it.key: it.error for it in items if it.image is None}
    assert "cls" in errors["000003"] and "cls" in errors["000004"]
    assert "image" in errors["000005"]
    assert errors["000002"]
    assert all(it.error is None for it in good)


def test_single_tar_and_class_files(shard_folder):
    single = open_source(str(shard_folder / "shard-000000.tar"))
    assert len(single) == 3 and single.class_names == ["0", "1", "2"]

    (shard_folder / "classes.txt").write_text("zero\none\ntwo\n")
    assert open_source(str(shard_folder)).class_names == ["zero", "one", "two"]

    (shard_folder / "classes.json").write_text(json.dumps(["a", "b"]))  # json wins; label 2 is now out of range
    src = open_source(str(shard_folder))
    assert src.class_names == ["a", "b"]
    item = next(it for it in src if it.key == "000001")
    assert item.label == -1 and item.image is None and "2" in item.error


# ---------------------------------------------------------------------------------------------------
# 3. builtin:digits
# ---------------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    train, test = digits_split()
    assert len(train) == 1347 and len(test) == 450
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert not set(train.tolist()) & set(test.tolist())
    assert set(train.tolist()) | set(test.tolist()) == set(range(1797))
    target = load_digits().target
    totals = Counter(target.tolist())
    for cls, n in Counter(target[test].tolist()).items():
        assert abs(n - 0.25 * totals[cls]) <= 1
    again = digits_split()
    np.testing.assert_array_equal(again[0], train)
    train[:] = 0  # callers get copies
    np.testing.assert_array_equal(digits_split()[0], again[0])


def test_builtin_digits_sources():
    from sklearn.datasets import load_digits

    digits = load_digits()
    full = open_source("builtin:digits")
    assert len(full) == 1797 and full.class_names == [str(d) for d in range(10)]
    items = list(full)
    assert [it.key for it in items[:2]] == ["digits_0000", "digits_0001"]
    assert [it.label for it in items] == digits.target.tolist()
    first = items[0].image
    assert first.shape == (8, 8, 3) and first.dtype == np.uint8 and items[0].error is None
    np.testing.assert_array_equal(first[..., 1], np.rint(digits.images[0] * 255 / 16).astype(np.uint8))
    assert max(int(it.image.max()) for it in items) == 255

    train, test = open_source("builtin:digits:train"), open_source("builtin:digits:test")
    assert (len(train), len(test)) == (1347, 450)
    train_keys, test_keys = {it.key for it in train}, {it.key for it in test}
    assert len(train_keys) == 1347 and not train_keys & test_keys
    assert train_keys | test_keys == {it.key for it in items}


# ---------------------------------------------------------------------------------------------------
# Bad specs: UsageError naming the spec and the fix
# ---------------------------------------------------------------------------------------------------


def _bad_specs(tmp_path, shard_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(RGB).save(flat / "a.png")
    classless = tmp_path / "classless"
    (classless / "cat").mkdir(parents=True)
    (classless / "cat" / "notes.txt").write_text("x")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    image_file = tmp_path / "one.png"
    Image.fromarray(RGB).save(image_file)
    return [
        (str(tmp_path / "missing"), "does not exist"),
        (str(empty), "empty folder"),
        (str(flat), "without class subfolders"),
        (str(classless), "no image files"),
        (str(tmp_path / "nothing-*.tar"), "matched no .tar"),
        (str(shard_folder / "shard-{000000..000003}.tar"), "2 of 4 shards"),
        (str(broken), "not a readable tar"),
        (str(image_file), "not a .tar shard"),
        ("builtin:mnist", "unknown builtin"),
        ("builtin:digits:val", "unknown builtin"),
        ("", "empty"),
    ]


def test_bad_specs_raise_usage_error_with_the_fix(tmp_path, shard_folder):
    for spec, fragment in _bad_specs(tmp_path, shard_folder):
        with pytest.raises(UsageError) as info:
            open_source(spec)
        message = str(info.value)
        assert fragment in message, (spec, message)
        assert repr(spec) in message, (spec, message)
        if not spec.startswith("builtin:") and "readable tar" not in message:
            assert "accepted forms" in message


def test_bad_class_file_is_a_usage_error(shard_folder):
    (shard_folder / "classes.txt").write_text("a\na\n")
    with pytest.raises(UsageError, match="unique, non-empty class names"):
        open_source(str(shard_folder))
