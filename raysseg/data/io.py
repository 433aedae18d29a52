"""Reading and writing images, label maps and saliency maps on local paths and object stores.

Every function takes a plain local path or a URI (`s3://bucket/key`, `gs://bucket/key`,
`file:///abs/path`); URIs go through `pyarrow.fs`, plain paths through the local filesystem.
Object-store credentials, region and endpoint come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for S3-compatible servers; instance
roles / workload identity; GOOGLE_APPLICATION_CREDENTIALS for GCS). `resolve` hands the same
filesystem objects to Ray Data and Ray Train, so every reader and writer talks to the same server.
Decoding is strict: an empty, truncated or non-image file raises `ImageReadError` naming the file,
instead of handing a half-decoded array to training.

Pixel conventions at this boundary: images are uint8 (H, W, 3) RGB, label maps uint8 (H, W) class
ids (palette indices for palette PNGs), saliency maps float32 (H, W) in [0, 1].
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO
from urllib.parse import urlparse

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

# Largest image (width x height) decoded. The size is read from the file header BEFORE any pixel is
# decoded, so a decompression bomb (a small file declaring a huge canvas) never allocates: 40 MP is
# 120 MB as uint8 RGB, above every segmentation dataset (COCO/VOC < 0.5 MP, Cityscapes 2 MP) and
# under half of PIL's own warning threshold (89 MP), which therefore never fires.
MAX_IMAGE_PIXELS = 40_000_000

# Schemes whose writes only become visible when the upload completes: a direct write is already
# atomic there, and a temp-name-then-move would cost a full server-side copy.
_ATOMIC_PUT_SCHEMES = ("s3", "gs", "gcs")


class ImageReadError(OSError):
    """A file could not be decoded as an image / label map / saliency map; the message names it."""


# Names the atomic writers give unfinished files and folders: ".name.tmp-<hex>" (_write_via_temp),
# "dir.old-<hex>" (replace_dir), "manifest.tmp-<ns>/" (the label update), ".name.<pid>.<hex>.tmp"
# (checkpoints). SIGKILL skips every cleanup, so an interrupted run can leave them behind.
_TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]+$|\.old-[0-9a-f]{32}$|^\..+\.tmp$")


def is_temp_name(name: str) -> bool:
    """Whether a file or folder name is one of the temp names of an interrupted atomic write."""
    return bool(_TEMP_NAME.search(name))


def remove_temp_files(
    folder: str, max_depth: int | None = None, skip_dirs: tuple[str, ...] = ()
) -> int:
    """Delete every temp file / folder of interrupted writes under `folder`; returns how many.

    `max_depth` limits the walk (1 = `folder`'s own entries) and folders named in `skip_dirs` are
    not entered: a run directory's per-image shard folders hold millions of files, and listing them
    on every rerun would cost more than the step.
    Object stores are skipped: their writes are single PUTs that leave no temp names behind.
    Only for a folder no one else is writing to (a rerun, before it starts any work).
    """
    if _writes_are_atomic(folder):
        return 0
    filesystem, root = resolve(folder)
    removed = 0
    for info in _walk(filesystem, root, max_depth, skip_dirs):
        if not is_temp_name(posixpath.basename(info.path)):
            continue
        if filesystem.get_file_info(info.path).type == pafs.FileType.NotFound:
            continue  # inside a temp folder removed a moment ago
        if info.type == pafs.FileType.Directory:
            filesystem.delete_dir(info.path)
        else:
            filesystem.delete_file(info.path)
        removed += 1
    return removed


def _walk(
    filesystem: pafs.FileSystem, root: str, max_depth: int | None, skip_dirs: tuple[str, ...]
) -> list[pafs.FileInfo]:
    if max_depth is None and not skip_dirs:
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        return filesystem.get_file_info(selector)
    found: list[pafs.FileInfo] = []
    level = [root]
    for _ in range(max_depth if max_depth is not None else 1_000):
        entries = [
            info
            for folder in level
            for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        ]
        found.extend(entries)
        level = [
            e.path
            for e in entries
            if e.type == pafs.FileType.Directory and posixpath.basename(e.path) not in skip_dirs
        ]
        if not level:
            break
    return found


def _is_uri(uri: str) -> bool:
    return "://" in uri


# Environment variables that select the S3 server; part of the client cache key, so a process that
# points them elsewhere (a test's local server) gets a new client instead of a stale one.
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@functools.lru_cache(maxsize=16)
def _filesystem_for(scheme: str, netloc: str, endpoint: tuple[str, ...]) -> pafs.FileSystem:
    # One filesystem object per bucket: creating an S3/GCS client per file is slow. Credentials,
    # region and endpoint come from the environment (pyarrow reads AWS_ACCESS_KEY_ID,
    # AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, instance roles; GCS uses
    # GOOGLE_APPLICATION_CREDENTIALS or the metadata server), never from the config.
    filesystem, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
    return filesystem


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI; a non-UTF-8 path is an error naming it."""
    uri = os.fspath(uri)
    _check_utf8(uri)
    if not _is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), parsed.path
    if parsed.scheme in _ATOMIC_PUT_SCHEMES:
        endpoint = tuple(os.environ.get(name, "") for name in _ENDPOINT_VARIABLES)
        return _filesystem_for(parsed.scheme, parsed.netloc, endpoint), parsed.netloc + parsed.path
    return pafs.FileSystem.from_uri(uri)


def _check_utf8(uri: str) -> None:
    # Undecodable bytes of a file name reach Python as lone surrogates ("caf\udce9.jpg"); pyarrow
    # only takes UTF-8 paths and would fail later with an error that does not name the file.
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"path {uri!r} is not valid UTF-8 (byte {error.object[error.start]!r} at position "
            f"{error.start}); rename the file"
        ) from error


def join(uri: str, *parts: str) -> str:
    """Join path components; URIs always use '/' whatever the local OS."""
    uri = os.fspath(uri)
    if _is_uri(uri):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    filesystem, path = resolve(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    filesystem, path = resolve(uri)
    return filesystem.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    filesystem, path = resolve(uri)
    filesystem.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the files directly inside folder `uri` whose names end with `suffix`."""
    filesystem, path = resolve(uri)
    try:  # FileInfo decodes its path lazily: the error surfaces while reading the names
        names = sorted(
            posixpath.basename(info.path)
            for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
            if info.type == pafs.FileType.File and info.path.endswith(suffix)
        )
    except UnicodeDecodeError as error:
        raise ValueError(
            f"folder '{uri}' holds a file whose name is not valid UTF-8 ({error}); rename it"
        ) from error
    return [join(uri, name) for name in names]


def delete_file(uri: str) -> None:
    filesystem, path = resolve(uri)
    filesystem.delete_file(path)


def delete_dir(uri: str) -> None:
    """Delete a folder and everything in it (a missing folder is not an error)."""
    filesystem, path = resolve(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        filesystem.delete_dir(path)


def read_bytes(uri: str) -> bytes:
    """The whole file; FileNotFoundError names the URI."""
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_file(path) as stream:
            return stream.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"file not found: '{uri}'") from error


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs (no network between this process and the file)."""
    uri = os.fspath(uri)
    return not _is_uri(uri) or urlparse(uri).scheme == "file"


def seekable_source(uri: str) -> str | io.BytesIO:
    """Something `torch.load` / zip readers can open: the local path itself, or a remote file
    fetched whole into memory (one GET; a zip reader's many small seeks would each be a request).
    FileNotFoundError names the URI.
    """
    if is_local(uri):
        path = resolve(uri)[1]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"file not found: '{uri}'")
        return path
    return io.BytesIO(read_bytes(uri))


def open_text(uri: str, encoding: str = "utf-8", errors: str = "strict") -> io.TextIOWrapper:
    """A streaming text reader (for CSV files of any size); `errors` as in `open`."""
    filesystem, path = resolve(uri)
    try:
        stream = filesystem.open_input_stream(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"file not found: '{uri}'") from error
    return io.TextIOWrapper(stream, encoding=encoding, errors=errors, newline="")


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write so readers never see a half-written file (temp name in the same folder, then move)."""
    write_atomic(uri, lambda stream: stream.write(data))


def write_atomic(uri: str, write: Callable[[BinaryIO], Any], durable: bool = False) -> None:
    """`write(stream)` into `uri` so that readers see the old file or the whole new one.

    Streams, so a large file (a checkpoint) is never held twice in memory. `durable`: on local
    disks, fsync before the rename, so a crash cannot leave a renamed but empty file (object
    stores acknowledge an upload only once it is stored).
    """
    filesystem, path = resolve(uri)
    if _writes_are_atomic(uri):
        with filesystem.open_output_stream(path) as stream:
            write(stream)
        return

    def write_temp(temp_path: str) -> None:
        with filesystem.open_output_stream(temp_path) as stream:
            write(stream)
        if durable and isinstance(filesystem, pafs.LocalFileSystem):
            descriptor = os.open(temp_path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    _write_via_temp(filesystem, path, write_temp)


def _write_via_temp(filesystem: pafs.FileSystem, path: str, write: Callable[[str], None]) -> None:
    """`write(temp_path)`, then move the temp file onto `path`; the temp file never survives."""
    folder, name = posixpath.split(path)
    if folder:
        filesystem.create_dir(folder, recursive=True)
    # A hidden, unique temp name: concurrent writers of the same file never share a temp file.
    temp_path = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        write(temp_path)
        if isinstance(filesystem, pafs.LocalFileSystem):
            os.replace(temp_path, path)  # atomic on POSIX, overwrites an existing file
        else:
            filesystem.move(temp_path, path)
    except BaseException:
        if filesystem.get_file_info(temp_path).type != pafs.FileType.NotFound:
            filesystem.delete_file(temp_path)
        raise


def _writes_are_atomic(uri: str) -> bool:
    return _is_uri(uri) and urlparse(uri).scheme in _ATOMIC_PUT_SCHEMES


def copy_file(source: str, destination: str) -> None:
    """Stream-copy a file (any filesystem to any); the destination appears whole or not at all."""
    source_fs, source_path = resolve(source)
    destination_fs, destination_path = resolve(destination)
    if source_fs.get_file_info(source_path).type != pafs.FileType.File:
        raise FileNotFoundError(f"file not found: '{source}'")
    if _writes_are_atomic(destination):
        pafs.copy_files(source_path, destination_path, source_fs, destination_fs)
        return
    _write_via_temp(
        destination_fs,
        destination_path,
        lambda temp_path: pafs.copy_files(source_path, temp_path, source_fs, destination_fs),
    )


def replace_dir(source_dir: str, destination_dir: str) -> None:
    """Move folder `source_dir` to `destination_dir`, replacing whatever was there.

    Local: the old folder is renamed aside, the new one renamed in, then the old one deleted, so
    the destination is missing only between two renames. Object stores have no folder rename:
    the old files are deleted and each new file moved (copy + delete) into place.
    """
    source_fs, source_path = resolve(source_dir)
    destination_fs, destination_path = resolve(destination_dir)
    if source_fs.get_file_info(source_path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"folder not found: '{source_dir}'")
    old_exists = destination_fs.get_file_info(destination_path).type != pafs.FileType.NotFound
    if isinstance(destination_fs, pafs.LocalFileSystem) and isinstance(
        source_fs, pafs.LocalFileSystem
    ):
        aside = f"{destination_path}.old-{uuid.uuid4().hex}"
        if old_exists:
            os.replace(destination_path, aside)
        os.makedirs(os.path.dirname(destination_path) or ".", exist_ok=True)
        os.replace(source_path, destination_path)
        if old_exists:
            destination_fs.delete_dir(aside)
        return
    if old_exists:
        destination_fs.delete_dir(destination_path)
    pafs.copy_files(source_path, destination_path, source_fs, destination_fs)
    source_fs.delete_dir(source_path)


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
    "copy_file",
    "delete_dir",
    "delete_file",
    "encode_png",
    "exists",
    "is_dir",
    "is_local",
    "is_temp_name",
    "join",
    "list_files",
    "makedirs",
    "open_text",
    "read_bytes",
    "read_image",
    "read_image_size",
    "read_label",
    "read_saliency",
    "remove_temp_files",
    "replace_dir",
    "resolve",
    "saliency_to_uint8",
    "seekable_source",
    "voc_palette",
    "write_atomic",
    "write_bytes_atomic",
    "write_png_atomic",
]
