"""Files on local paths and object stores: one filesystem layer for every reader and writer.

Every function takes a plain local path or a URI (`s3://bucket/key`, `gs://bucket/key`,
`file:///abs/path`); URIs go through `pyarrow.fs`, plain paths through the local filesystem.
Object-store credentials, region and endpoint come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for S3-compatible servers; instance
roles / workload identity; GOOGLE_APPLICATION_CREDENTIALS for GCS). `resolve` hands the same
filesystem objects to Ray Data and Ray Train, so every reader and writer talks to the same server.

Atomic writes: a temp name in the same folder, then a rename, locally; a direct PUT on s3 / gs (an
upload is invisible until complete, and a move there is a server-side copy). The bottom of the
package: imports nothing from raysseg.
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

import pyarrow.fs as pafs

# Schemes whose writes only become visible when the upload completes: a direct write is already
# atomic there, and a temp-name-then-move would cost a full server-side copy.
_ATOMIC_PUT_SCHEMES = ("s3", "gs", "gcs")


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


def is_uri(uri: str) -> bool:
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
    if not is_uri(uri):
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
    if is_uri(uri):
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


def list_dirs(uri: str) -> list[str]:
    """Sorted names of the folders directly inside folder `uri` ([] when it does not exist)."""
    filesystem, path = resolve(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(
        posixpath.basename(info.path) for info in infos if info.type == pafs.FileType.Directory
    )


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
    return not is_uri(uri) or urlparse(uri).scheme == "file"


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
    return is_uri(uri) and urlparse(uri).scheme in _ATOMIC_PUT_SCHEMES


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


__all__ = [
    "copy_file",
    "delete_dir",
    "delete_file",
    "exists",
    "is_dir",
    "is_local",
    "is_temp_name",
    "is_uri",
    "join",
    "list_dirs",
    "list_files",
    "makedirs",
    "open_text",
    "read_bytes",
    "remove_temp_files",
    "replace_dir",
    "resolve",
    "seekable_source",
    "write_atomic",
    "write_bytes_atomic",
]
