"""The manifest format: Records as a folder of Parquet part files, written and read as streams.

`path/part-00000.parquet ...`: files of at most DEFAULT_ROWS_PER_FILE rows, row groups of
ROWS_PER_GROUP rows, each file written atomically; read back as a stream (`read_manifest`), by row
count from the footers alone (`manifest_row_count`) or by random access per row group
(`ManifestRows`).
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysseg import storage
from raysseg.data.records import DataError, Record

DEFAULT_ROWS_PER_FILE = 100_000
# Row groups bound what a random-access reader (ManifestRows) holds: one group, ~2-4 MB of URIs.
ROWS_PER_GROUP = 16_384
_PART_PREFIX = "part-"


MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_uri", pa.string()),
        ("labels", pa.list_(pa.int16())),
        ("mask_uri", pa.string()),
        ("saliency_uri", pa.string()),
        ("seg_label_uri", pa.string()),
        ("sal_label_uri", pa.string()),
    ]
)
_RECORD_FIELDS = tuple(f.name for f in fields(Record))


def record_to_row(record: Record) -> dict:
    """Plain dict (labels as a list), e.g. for a Ray Data row."""
    row = asdict(record)
    row["labels"] = list(record.labels)
    return row


def record_from_row(row: dict) -> Record:
    """Inverse of `record_to_row`; extra keys (label statistics ...) are ignored."""
    values = {name: row.get(name) for name in _RECORD_FIELDS}
    values["labels"] = tuple(int(c) for c in (values["labels"] or ()))
    for name in _RECORD_FIELDS:
        if name not in ("labels",) and values[name] is None:
            values[name] = ""
    return Record(**values)


class PartWriter:
    """Streams Arrow tables into a folder as part-00000.parquet, part-00001.parquet, ...

    Row groups of ROWS_PER_GROUP rows (what ManifestRows indexes), however small the tables that
    come in; files of at most `rows_per_file` rows, each written atomically once full (at most one
    file is held in memory). No row at all still writes one empty part that carries the schema.
    """

    def __init__(
        self, path: str, schema: pa.Schema, rows_per_file: int = DEFAULT_ROWS_PER_FILE
    ) -> None:
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
        self.path, self.schema, self.rows_per_file = path, schema, rows_per_file
        self.rows = 0
        self._parts = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file_rows = 0
        self._sink: pa.BufferOutputStream | None = None
        self._writer: pq.ParquetWriter | None = None
        storage.makedirs(path)

    def write(self, table: pa.Table) -> None:
        """Append `table` (its columns in `schema`'s order, castable to it)."""
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._group_rows():
            self._write_group(self._group_rows())

    def close(self) -> int:
        """Write what is pending; returns the number of rows written."""
        if self._pending_rows:
            self._write_group(self._pending_rows)
        if self._writer is None and self._parts == 0:
            self._open_part()
        self._close_part()
        return self.rows

    def _group_rows(self) -> int:
        return min(ROWS_PER_GROUP, self.rows_per_file - self._file_rows)

    def _write_group(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        if self._writer is None:
            self._open_part()
        self._writer.write_table(pending.slice(0, rows), row_group_size=rows)
        rest = pending.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self._file_rows += rows
        self.rows += rows
        if self._file_rows == self.rows_per_file:
            self._close_part()

    def _open_part(self) -> None:
        self._sink = pa.BufferOutputStream()
        self._writer = pq.ParquetWriter(self._sink, self.schema)

    def _close_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        uri = storage.join(self.path, f"{_PART_PREFIX}{self._parts:05d}.parquet")
        storage.write_bytes_atomic(uri, self._sink.getvalue().to_pybytes())
        self._parts += 1
        self._writer, self._sink, self._file_rows = None, None, 0


def _records_table(records: list[Record]) -> pa.Table:
    columns = {name: [getattr(r, name) for r in records] for name in _RECORD_FIELDS}
    columns["labels"] = [list(r.labels) for r in records]
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def write_manifest(
    records: Iterable[Record], path: str, rows_per_file: int = DEFAULT_ROWS_PER_FILE
) -> int:
    """Write records to folder `path` as part-00000.parquet, part-00001.parquet, ...

    Streams: at most one file of records is held at once. Part files of an earlier manifest
    at the same path are removed first, so the folder always holds exactly this manifest.
    Returns the number of records written.
    """
    if storage.exists(path):
        if not storage.is_dir(path):
            raise DataError(f"manifest path '{path}' exists and is not a folder")
        for stale in storage.list_files(path, suffix=".parquet"):
            if posixpath.basename(stale).startswith(_PART_PREFIX):
                storage.delete_file(stale)
    writer = PartWriter(path, MANIFEST_SCHEMA, rows_per_file)
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == 4096:  # Record objects -> Arrow a few thousand at a time
            writer.write(_records_table(chunk))
            chunk = []
    writer.write(_records_table(chunk))
    return writer.close()


def manifest_files(path: str) -> list[str]:
    """The Parquet files of a manifest folder (or the single file `path`), in written order."""
    if not storage.exists(path):
        raise DataError(f"manifest not found: '{path}'")
    return storage.list_files(path, suffix=".parquet") if storage.is_dir(path) else [path]


@contextlib.contextmanager
def parquet_file(uri: str) -> Iterator[pq.ParquetFile]:
    filesystem, file_path = storage.resolve(uri)
    try:
        parquet = pq.ParquetFile(file_path, filesystem=filesystem)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"cannot read Parquet file '{uri}': {error}") from error
    with parquet:
        yield parquet


def iter_parquet_batches(
    path: str, batch_size: int = 4096, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    for uri in manifest_files(path):
        try:
            with parquet_file(uri) as parquet:
                yield from parquet.iter_batches(batch_size=batch_size, columns=columns)
        except pa.ArrowInvalid as error:
            raise DataError(f"cannot read Parquet file '{uri}': {error}") from error


def read_manifest(path: str, batch_size: int = 4096) -> Iterator[Record]:
    """Stream the records of a manifest folder (or a single Parquet file), in written order."""
    for batch in iter_parquet_batches(path, batch_size=batch_size):
        for row in batch.to_pylist():
            yield record_from_row(row)


def manifest_row_count(path: str) -> int:
    """Rows of a manifest from the Parquet footers alone: no row is read."""
    total = 0
    for uri in manifest_files(path):
        with parquet_file(uri) as parquet:
            total += parquet.metadata.num_rows
    return total


class ManifestRows(Sequence[Record]):
    """Random access to a manifest's records without holding them: the index keeps one entry per
    Parquet row group (file, group, first row), and each process caches the one group it read last.

    Readers that walk a group at a time (`BlockShuffleSampler` in raysseg.data.dataset) read every
    group once per epoch; memory stays one row group, whatever the dataset size.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.group_files: list[str] = []
        self.group_indices: list[int] = []
        starts = [0]
        for uri in manifest_files(path):
            with parquet_file(uri) as parquet:
                metadata = parquet.metadata
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                if rows:
                    self.group_files.append(uri)
                    self.group_indices.append(group)
                    starts.append(starts[-1] + rows)
        self.group_starts = np.asarray(starts, dtype=np.int64)  # (groups + 1,)
        self._cached_group = -1
        self._cached_table: pa.Table | None = None

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def group_sizes(self) -> np.ndarray:
        return np.diff(self.group_starts)

    def __getitem__(self, index):  # int -> Record (slices are not needed by any reader)
        if not -len(self) <= index < len(self):
            raise IndexError(f"manifest '{self.path}' has {len(self)} rows, asked for {index}")
        index %= len(self)
        group = int(np.searchsorted(self.group_starts, index, side="right")) - 1
        if group != self._cached_group:
            with parquet_file(self.group_files[group]) as parquet:
                self._cached_table = parquet.read_row_group(self.group_indices[group])
            self._cached_group = group
        offset = index - int(self.group_starts[group])
        return record_from_row(self._cached_table.slice(offset, 1).to_pylist()[0])

    def __getstate__(self) -> dict:
        # DataLoader workers get the index only, never another process's cached group.
        return {**self.__dict__, "_cached_group": -1, "_cached_table": None}


__all__ = [
    "DEFAULT_ROWS_PER_FILE",
    "MANIFEST_SCHEMA",
    "ROWS_PER_GROUP",
    "ManifestRows",
    "PartWriter",
    "iter_parquet_batches",
    "manifest_files",
    "manifest_row_count",
    "parquet_file",
    "read_manifest",
    "record_from_row",
    "record_to_row",
    "write_manifest",
]
