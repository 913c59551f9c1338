"""Image bytes → 8-bit RGB, the one decoder of both sides (see the colour conventions in :mod:`pipeline.tars`).

The content is sniffed, not trusted to the extension (ImageNet holds a PNG and CMYK files named
.JPEG), but only raster formats that PIL decodes in-process are accepted (never EPS, which would
run Ghostscript).
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

# Formats PIL may decode: sniffed content, in-process decoders only.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# What PIL raises on damaged or hostile content: each becomes the sample's BadSampleError.
DECODE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, EOFError, IndexError, struct.error,
                 Image.DecompressionBombError)


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (content sniffed among ``IMAGE_FORMATS``) fully, as 8-bit RGB."""
    img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    img.load()  # decode now: a corrupt file fails here, in the sample it belongs to
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB ``[H, W, 3]``.

    - alpha (RGBA, LA, PA, or a palette/colour-key ``transparency``): composited over black,
      ``round(c * a / 255)``;
    - 16-bit greyscale (I;16*, and I as PIL opens 16-bit PNGs): ``round(v * 255 / 65535)``,
      values outside 0..65535 clipped;
    - L, P, 1, CMYK (multiplicative, no ICC), YCbCr: PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode == "I" or mode.startswith("I;16"):
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((v * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode in ("L", "P", "RGB") and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8))
    return img.convert("RGB")
