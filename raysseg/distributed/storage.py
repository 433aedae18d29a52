"""Ray Data and Ray Train on the run directory's storage (a local path or an s3:// / gs:// URI).

Both get the pyarrow filesystem that `raysseg.storage.resolve` builds, instead of resolving URIs
themselves: one client configuration (credentials, region, endpoint from the environment) for every
reader and writer of a run.
"""

from __future__ import annotations

from typing import Any

import ray.data

from raysseg import storage


def read_parquet(uri: str, **options: Any) -> ray.data.Dataset:
    """`ray.data.read_parquet` of a manifest folder or file at a local path or URI.

    Through Ray Data's V1 Parquet reader: the V2 reader, Ray 2.60's default, starts a pool of 32
    footer-reading actors for every read, which took 0.9-1.0 s per read of a one-file manifest on an
    idle 2-core machine (V1: 0.1 s) and about 6 s on one busy core, a large part of a small label
    update's fixed cost. A manifest has a few files whose footers V1 reads directly.
    """
    filesystem, path = storage.resolve(uri)
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(path, filesystem=filesystem, **options)
    finally:
        context.use_datasource_v2 = previous


def train_storage(uri: str) -> dict[str, Any]:
    """RunConfig keywords that put Ray Train's checkpoints at `uri` (path inside the filesystem)."""
    filesystem, path = storage.resolve(uri)
    return {"storage_path": path, "storage_filesystem": filesystem}


def uri_in_storage(storage_uri: str, path: str) -> str:
    """The URI of `path`, a path Ray Train reports inside the filesystem of `storage_uri`."""
    if storage.is_local(storage_uri):
        return path
    scheme = storage_uri.split("://", 1)[0]
    return f"{scheme}://{path}"


__all__ = [
    "read_parquet",
    "train_storage",
    "uri_in_storage",
]
