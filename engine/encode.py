"""The encode stage: decided images to JPEG / WebP / PNG bytes, in a thread pool, written in decision order.

Encoders: nvJPEG on the device (torchvision, one batched call per device batch), simplejpeg, or Pillow.
The same pixels, settings and encoder always give the same bytes, so a shard's sha256 is reproducible.
"""

from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from synthgen.errors import UsageError
from synthgen.options import IMAGE_ENCODERS
from synthgen.shards import IMAGE_EXTS, ShardWriter

try:  # optional: a faster JPEG encoder than Pillow (same libjpeg-turbo, less overhead per image)
    import simplejpeg

    HAS_SIMPLEJPEG = True
except ImportError:
    simplejpeg = None
    HAS_SIMPLEJPEG = False

ENCODE_DEPTH = 2  # decided groups being encoded while older ones are written


def resolve_image_encoder(name: str, fmt: str, device: torch.device | str = "cpu") -> str:
    """The JPEG encoder a run uses: "nvjpeg" | "simplejpeg" | "pillow" ("pillow" for WebP and PNG).

    auto: nvJPEG when the run is on a CUDA device and torchvision can encode there (checked with one
    tiny encode), else simplejpeg when installed (libjpeg-turbo without Pillow's per-image overhead,
    ~3x faster on small images), else Pillow. Asking for one that cannot run here is a UsageError.
    """
    if name not in IMAGE_ENCODERS:
        raise UsageError(f"--image-encoder {name!r} is not one of {', '.join(IMAGE_ENCODERS)}")
    if fmt != "jpg":
        return "pillow"
    device = torch.device(device)
    if name == "auto":
        return "nvjpeg" if nvjpeg_available(device) else "simplejpeg" if HAS_SIMPLEJPEG else "pillow"
    if name == "simplejpeg" and not HAS_SIMPLEJPEG:
        raise UsageError("--image-encoder simplejpeg: simplejpeg is not installed (pip install simplejpeg)")
    if name == "nvjpeg" and not nvjpeg_available(device):
        raise UsageError(
            f"--image-encoder nvjpeg needs a CUDA device and a torchvision built with nvJPEG (device is "
            f"{device}); use --image-encoder auto"
        )
    return name


def nvjpeg_available(device: torch.device) -> bool:
    """Capability check: can torchvision encode JPEG on this CUDA device? (one 8x8 encode, then cached)"""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    key = str(device)
    if key not in _NVJPEG_OK:
        try:
            blobs = encode_jpeg_cuda(torch.zeros(1, 8, 8, 3, dtype=torch.uint8, device=device), 90)
            _NVJPEG_OK[key] = len(blobs) == 1 and blobs[0][:2] == b"\xff\xd8"
        except (ImportError, RuntimeError, TypeError, ValueError):
            _NVJPEG_OK[key] = False  # an old torchvision, or one built without nvJPEG: fall back to the CPU
    return _NVJPEG_OK[key]


_NVJPEG_OK: dict[str, bool] = {}


def encode_jpeg_cuda(images: torch.Tensor, quality: int) -> list[bytes]:
    """(n, H, W, 3) uint8 CUDA tensor -> n JPEG files, encoded by nvJPEG in one batched call."""
    import warnings

    from torchvision.io import encode_jpeg

    chw = [img.permute(2, 0, 1).contiguous() for img in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 flags its codecs as deprecated in favour of torchcodec
        out = encode_jpeg(chw, quality=quality)
    return [bytes(t.cpu().numpy().tobytes()) for t in out]


def encode_image(pixels: np.ndarray, fmt: str, quality: int, encoder: str = "auto") -> bytes:
    """(H, W, 3) uint8 -> encoded bytes; the same pixels, settings and encoder always give the same bytes.

    jpg: baseline, 4:2:0 chroma, accurate DCT, no optimize pass, by simplejpeg or Pillow (`encoder`
    "auto" | "simplejpeg" | "pillow"; both are libjpeg-turbo with the same settings, but their bytes
    differ); webp: lossy at `quality`; png: lossless, `quality` ignored.
    """
    if fmt not in IMAGE_EXTS:
        raise ValueError(f"format must be one of {IMAGE_EXTS}, got {fmt!r}")
    if fmt != "png" and not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100] for {fmt}, got {quality}")
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be an (H, W, 3) uint8 array, got {pixels.dtype} {pixels.shape}")
    pixels = np.ascontiguousarray(pixels)
    if fmt == "jpg" and encoder in ("auto", "simplejpeg") and HAS_SIMPLEJPEG:
        # 4:2:0 and the accurate DCT: Pillow's defaults, so switching encoders keeps size and quality.
        return simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB", colorsubsampling="420",
                                      fastdct=False)
    if encoder == "simplejpeg":
        raise UsageError("simplejpeg is not installed (pip install simplejpeg)")
    img = Image.fromarray(pixels, mode="RGB")
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, lossless=False, method=4)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_workers(requested: int | None) -> int:
    """Image-encoding threads: `requested` (--encode-workers), else half the cores (the device stage and
    the writer need the rest), at least 2 and at most 8."""
    return requested or min(8, max(2, (os.cpu_count() or 2) // 2))


@dataclass
class Chosen:
    """A kept candidate with its final key, waiting for its encoded image: row `row` of a RenderedBatch."""

    key: str
    batch: object  # render.RenderedBatch
    row: int


def encode_rows(items: list[Chosen], fmt: str, quality: int, encoder: str) -> list[bytes]:
    """Encode the images of `items`, in order (runs in an encoder-pool thread)."""
    if encoder != "nvjpeg":
        return [encode_image(c.batch.images[c.row], fmt, quality, encoder) for c in items]
    out, i = [], 0
    while i < len(items):  # one batched nvJPEG call per run of rows from the same device batch
        j = i
        while j < len(items) and items[j].batch is items[i].batch:
            j += 1
        rows = torch.tensor([c.row for c in items[i:j]], device=items[i].batch.device_images.device)
        out += encode_jpeg_cuda(items[i].batch.device_images[rows], quality)
        i = j
    return out


class OrderedWriter:
    """Submits kept samples to the encoder pool and adds them to the shard in decision order.

    At most ENCODE_DEPTH decided groups are in the pool while older ones are written, so memory stays
    bounded and the tar's byte order is the decision order whatever the pool's timing. An encoder error
    is raised here, in the calling thread, and fails the shard (its temporary file is removed).
    `record(chosen, blob)` builds the SampleRecord (label, metadata, conditioning) of an encoded image.
    """

    def __init__(self, writer: ShardWriter, pool: ThreadPoolExecutor, workers: int, fmt: str, quality: int,
                 encoder: str, record) -> None:
        self.writer, self.pool, self.workers, self.record = writer, pool, workers, record
        self.fmt, self.quality, self.encoder = fmt, quality, encoder
        self.inflight: deque[tuple[list[Chosen], list[Future]]] = deque()

    def submit(self, items: list[Chosen]) -> None:
        # One slice per worker: a future per image would cost more than encoding a small JPEG.
        step = max(1, -(-len(items) // self.workers))
        futures = [self.pool.submit(encode_rows, items[i : i + step], self.fmt, self.quality, self.encoder)
                   for i in range(0, len(items), step)]
        self.inflight.append((items, futures))
        while len(self.inflight) > ENCODE_DEPTH:
            self._write_oldest()

    def drain(self) -> None:
        while self.inflight:
            self._write_oldest()

    def _write_oldest(self) -> None:
        items, futures = self.inflight.popleft()
        blobs = [blob for f in futures for blob in f.result()]
        for c, blob in zip(items, blobs):
            self.writer.add(self.record(c, blob))
