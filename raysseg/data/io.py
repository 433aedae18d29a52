"""Image codecs: decoding images, label maps and saliency maps, and encoding PNGs.

Bytes come from and go to `raysseg.storage` (local paths and object-store URIs). Decoding is
strict: an empty, truncated or non-image file raises `ImageReadError` naming the file, instead of
handing a half-decoded array to training.

Pixel conventions at this boundary: images are uint8 (H, W, 3) RGB, label maps uint8 (H, W) class
ids (palette indices for palette PNGs), saliency maps float32 (H, W) in [0, 1].
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

from raysseg.storage import read_bytes, write_bytes_atomic

# Largest image (width x height) decoded. The size is read from the file header BEFORE any pixel is
# decoded, so a decompression bomb (a small file declaring a huge canvas) never allocates: 40 MP is
# 120 MB as uint8 RGB, above every segmentation dataset (COCO/VOC < 0.5 MP, Cityscapes 2 MP) and
# under half of PIL's own warning threshold (89 MP), which therefore never fires.
MAX_IMAGE_PIXELS = 40_000_000


class ImageReadError(OSError):
    """A file could not be decoded as an image / label map / saliency map; the message names it."""


_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open_pil_header(uri: str) -> Image.Image:
    """Open with PIL reading only the header; refuse empty files and images over MAX_IMAGE_PIXELS."""
    data = read_bytes(uri)
    if not data:
        raise ImageReadError(f"cannot read image '{uri}': the file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except _PIL_ERRORS as error:
        raise ImageReadError(f"cannot read image '{uri}': {error}") from error
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageReadError(
            f"cannot read image '{uri}': {width} x {height} = {width * height} pixels is over "
            f"the limit of {MAX_IMAGE_PIXELS} (raysseg.data.io.MAX_IMAGE_PIXELS); downscale it"
        )
    return image


def _open_pil(uri: str) -> Image.Image:
    """Open and fully decode with PIL; any failure becomes ImageReadError naming the file."""
    image = _open_pil_header(uri)
    try:
        # load() decodes every pixel now and raises on truncated data (Image.open alone is lazy).
        image.load()
    except _PIL_ERRORS as error:
        raise ImageReadError(f"cannot read image '{uri}': {error}") from error
    return image


def read_image_size(uri: str) -> tuple[int, int]:
    """(H, W) of an image / label map from its header, without decoding the pixels."""
    width, height = _open_pil_header(uri).size
    return height, width


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Bring 16-bit / 32-bit / float pixel values to uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        peak = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        return np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # Integer images deeper than 8 bit (PNG 16-bit arrives as uint16 or int32): rescale 0..65535.
    return np.clip((array.astype(np.float32) / 257.0) + 0.5, 0, 255).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("RGB", "L", "P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX"):
        # Alpha is dropped (not composited): datasets store the visible pixels in RGB.
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    # 16-bit / 32-bit / float single-channel modes ("I;16", "I", "F" ...): rescale, then grey->RGB.
    grey = _to_uint8(np.asarray(image))
    if grey.ndim == 3:
        grey = grey[..., :3] if grey.shape[2] >= 3 else grey[..., 0]
    if grey.ndim == 2:
        grey = np.repeat(grey[..., None], 3, axis=2)
    return np.ascontiguousarray(grey)


def read_image(uri: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB; grey, palette, RGBA, CMYK and 16-bit inputs converted.

    EXIF orientation is NOT applied: masks and annotations are aligned with the stored pixels.
    """
    image = _open_pil(uri)
    rgb = _pil_to_rgb(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(f"cannot read image '{uri}': unexpected pixel shape {rgb.shape}")
    return rgb


@functools.lru_cache(maxsize=4)
def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, uint8 (num_colors, 3): class id i -> colour (bit-interleaved).

    Computed once per process (it is written with every label PNG) and returned read-only, since
    every caller shares the same array.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (red, green, blue)
    palette.flags.writeable = False
    return palette


def _rgb_to_voc_index(rgb: np.ndarray, uri: str) -> np.ndarray:
    """Map an RGB-coloured label image back to class ids through the VOC palette."""
    palette = voc_palette().astype(np.int32)
    codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    lookup = dict(zip(codes.tolist(), range(256), strict=True))
    channels = rgb.astype(np.int32)
    pixel_codes = (channels[..., 0] << 16) | (channels[..., 1] << 8) | channels[..., 2]
    unique, inverse = np.unique(pixel_codes, return_inverse=True)
    ids = np.empty(len(unique), dtype=np.uint8)
    for position, code in enumerate(unique.tolist()):
        if code not in lookup:
            colour = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
            raise ImageReadError(
                f"label map '{uri}' is RGB and has colour {colour}, which is not in the VOC palette"
            )
        ids[position] = lookup[code]
    return ids[inverse.reshape(pixel_codes.shape)]


def read_label(uri: str) -> np.ndarray:
    """uint8 (H, W) class ids: the palette INDEX of palette PNGs (not their colours).

    Grey PNGs are read as ids directly; RGB label images are mapped back through the VOC palette.
    """
    image = _open_pil(uri)
    if image.mode in ("P", "L"):
        return np.asarray(image, dtype=np.uint8).copy()
    if image.mode in ("RGB", "RGBA"):
        return _rgb_to_voc_index(np.asarray(image.convert("RGB")), uri)
    if image.mode.startswith("I"):
        values = np.asarray(image)
        if values.min(initial=0) < 0 or values.max(initial=0) > 255:
            raise ImageReadError(
                f"label map '{uri}' has values outside 0..255 (max {int(values.max())})"
            )
        return values.astype(np.uint8)
    raise ImageReadError(f"label map '{uri}' has unsupported mode '{image.mode}'")


def read_saliency(uri: str) -> np.ndarray:
    """float32 (H, W) in [0, 1] from a grey (or colour, averaged to grey) PNG/JPEG."""
    image = _open_pil(uri)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image)
        if values.ndim == 3:
            values = values.mean(axis=2)
        if np.issubdtype(values.dtype, np.floating):
            peak = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        else:
            peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        return np.clip(values.astype(np.float32) / peak, 0.0, 1.0)
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    return grey / np.float32(255.0)


def encode_png(array: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """PNG bytes of uint8 (H, W) (optionally with a palette) or (H, W, 3) RGB."""
    if array.dtype != np.uint8:
        raise ValueError(
            f"encode_png expects uint8, got {array.dtype} (convert saliency to 0..255)"
        )
    if palette is not None:
        if array.ndim != 2:
            raise ValueError(f"a palette PNG needs a (H, W) array, got shape {array.shape}")
        image = Image.fromarray(array, mode="P")
        image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    elif array.ndim == 2:
        image = Image.fromarray(array, mode="L")
    elif array.ndim == 3 and array.shape[2] == 3:
        image = Image.fromarray(array, mode="RGB")
    else:
        raise ValueError(f"encode_png expects (H, W) or (H, W, 3), got shape {array.shape}")
    buffer = io.BytesIO()
    # compress_level 1: label PNGs are written by the million; size barely changes for flat maps.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_png_atomic(uri: str, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write a PNG atomically. Label maps: pass `palette=voc_palette()` (ids stay the indices)."""
    write_bytes_atomic(uri, encode_png(array, palette))


def saliency_to_uint8(saliency: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 0..255 (rounded), for writing saliency maps as grey PNGs."""
    return np.clip(np.asarray(saliency, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)


__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageReadError",
    "encode_png",
    "read_image",
    "read_image_size",
    "read_label",
    "read_saliency",
    "saliency_to_uint8",
    "voc_palette",
    "write_png_atomic",
]
