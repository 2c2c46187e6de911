"""Image bytes in the formats the API answers with, one encoder for every side: the replica encodes with it (near
the GPUs, in its encoder pool) and the front door encodes with it when a result carries raw pixels, so an image
comes out byte for byte the same wherever it was encoded."""

from __future__ import annotations

import io
from dataclasses import dataclass

FORMATS = ("png", "jpeg", "webp")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class EncodedImage:
    """An image already encoded as ``format`` at ``compression`` (JPEG / WebP quality; None for PNG or the
    default 100)."""

    format: str
    compression: int | None
    data: bytes = b""

    def matches(self, output_format: str, compression: int | None) -> bool:
        return self.format == output_format and _quality(self.format, self.compression) == _quality(
            output_format, compression)

    def pixels(self):
        """The decoded pixels, uint8 [H, W, 3] (lossy formats give their decoded approximation)."""
        import numpy as np
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.data)).convert("RGB"))


def _quality(output_format: str, compression: int | None) -> int | None:
    return None if output_format == "png" else (100 if compression is None else compression)


def encode_image(image, output_format: str = "png", compression: int | None = None) -> bytes:
    """uint8 [H, W, 3] -> PNG (zlib level 1: several times faster than the default for a file a little larger, the
    trade a serving path wants), JPEG or WebP at quality ``compression`` (default 100). zlib, libjpeg and libwebp
    release the GIL, so several threads encode in parallel."""
    from PIL import Image

    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if output_format == "png":
        pil.save(buf, format="PNG", compress_level=1)
    elif output_format in ("jpeg", "webp"):
        pil.save(buf, format=output_format.upper(), quality=_quality(output_format, compression))
    else:
        raise ValueError(f"unknown output format {output_format!r}; one of {list(FORMATS)}")
    return buf.getvalue()


def image_bytes(image, output_format: str = "png", compression: int | None = None) -> bytes:
    """The bytes of ``image`` (raw pixels or an ``EncodedImage``) as ``output_format`` at ``compression``: an
    encoded image in that very format is forwarded as it is, anything else is encoded here."""
    if isinstance(image, EncodedImage):
        if image.matches(output_format, compression):
            return image.data
        image = image.pixels()
    return encode_image(image, output_format, compression)
