"""Bounded-memory building blocks of large runs: manifest random access, the block-shuffle sampler,
shard folders, progress lines. No Ray here."""

from __future__ import annotations

import itertools
import pickle
from collections import Counter

import numpy as np
import pytest

from raysseg.data.dataset import BlockShuffleSampler
from raysseg.data.manifest import ManifestRows, manifest_row_count, read_manifest, write_manifest
from raysseg.data.records import Record
from raysseg.progress import ProgressMeter, format_duration
from raysseg.rundir import layout


def _records(n: int) -> list[Record]:
    return [Record(f"img_{k:05d}", f"/data/{k}.jpg", (1 + k % 3,)) for k in range(n)]


def test_manifest_rows_random_access_matches_the_stream(tmp_path) -> None:
    write_manifest(_records(2500), str(tmp_path / "m"), rows_per_file=1000)
    rows = ManifestRows(str(tmp_path / "m"))
    streamed = list(read_manifest(str(tmp_path / "m")))
    assert len(rows) == 2500 == manifest_row_count(str(tmp_path / "m"))
    assert rows.group_sizes().tolist() == [1000, 1000, 500]
    for index in (0, 999, 1000, 1999, 2000, 2499, 17, 1503):
        assert rows[index] == streamed[index]
    assert rows[-1] == streamed[-1]
    with pytest.raises(IndexError, match="has 2500 rows"):
        rows[2500]


def test_manifest_rows_pickle_without_the_cached_group(tmp_path) -> None:
    write_manifest(_records(50), str(tmp_path / "m"))
    rows = ManifestRows(str(tmp_path / "m"))
    rows[3]
    assert rows._cached_table is not None
    copy = pickle.loads(pickle.dumps(rows))  # what a DataLoader worker receives
    assert copy._cached_table is None and copy[3] == rows[3]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_block_shuffle_sampler_covers_every_row_once_across_ranks(world_size: int) -> None:
    sizes = [7, 5, 9]  # 21 rows in three groups
    orders = [
        list(BlockShuffleSampler(sizes, rank=r, world_size=world_size, seed=1))
        for r in range(world_size)
    ]
    lengths = {len(order) for order in orders}
    assert lengths == {-(-21 // world_size)}  # equal steps on every rank (DDP)
    length = lengths.pop()
    seen = Counter(i for order in orders for i in order)
    assert set(seen) == set(range(21))
    # Only padding repeats: the sequence the ranks share (position p goes to rank p % world_size)
    # holds every row once, then the padding up to world_size x length, each padded row once.
    shared = [orders[p % world_size][p // world_size] for p in range(world_size * length)]
    rows, padding = shared[:21], shared[21:]
    assert sorted(rows) == list(range(21))
    assert len(padding) == world_size * length - 21 and len(set(padding)) == len(padding)
    assert {i for i, count in seen.items() if count > 1} == set(padding)
    assert max(seen.values()) <= 2


def test_block_shuffle_sampler_reads_groups_whole_and_reshuffles_per_epoch() -> None:
    sizes = [100, 100, 100, 100]
    sampler = BlockShuffleSampler(sizes, seed=3)
    first = list(sampler)
    groups = [i // 100 for i in first]
    switches = sum(1 for a, b in itertools.pairwise(groups) if a != b)
    assert switches == 3  # each group read once, as a block
    assert sorted(first) == list(range(400)) and first != list(range(400))
    assert list(sampler) == first  # same epoch, same order (a resumed epoch replays)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_block_shuffle_sampler_drop_last_and_empty() -> None:
    sampler = BlockShuffleSampler([5], rank=1, world_size=2, drop_last=True)
    assert len(sampler) == 2 == len(list(sampler))
    assert list(BlockShuffleSampler([], rank=0, world_size=2)) == []
    with pytest.raises(ValueError, match="rank 2"):
        BlockShuffleSampler([5], rank=2, world_size=2)


def test_shard_folders_stay_small_at_open_images_scale() -> None:
    # Open Images (9 M images) averages ~2,200 files per folder; 400k ids hashed for real show the
    # spread is even (no folder far above the mean), so no folder gets far past a few thousand.
    assert 9_000_000 / layout.SHARD_COUNT < 2_500
    ids = [f"{k:016x}" for k in range(400_000)]
    per_shard = Counter(layout.shard_of(i) for i in ids)
    assert len(per_shard) == layout.SHARD_COUNT
    mean = len(ids) / layout.SHARD_COUNT
    assert max(per_shard.values()) < mean + 5 * mean**0.5


def test_sharded_uri_names_the_shard_and_a_safe_file_name() -> None:
    uri = layout.sharded_uri("s3://bucket/run/saliency", "2007/000033")
    assert uri == f"s3://bucket/run/saliency/{layout.shard_of('2007/000033')}/2007__000033.png"


def test_progress_meter_rate_and_eta_from_the_first_finished_item() -> None:
    meter = ProgressMeter("stage_1 labels", total=1000, started=0.0)
    assert "0/1,000 images" in meter.line() and "ETA --" in meter.line()
    meter.update(100, 0, now=30.0)  # 30 s of start-up before the first batch finished
    meter.update(400, 3, now=40.0)
    assert meter.rate() == pytest.approx(30.0)
    assert meter.seconds_left() == pytest.approx(20.0)
    line = meter.line()
    assert "400/1,000 images (40.0%)" in line and "30.0 images/s" in line
    assert "3 errors" in line and "elapsed 40s" in line and "ETA 20s" in line


def test_progress_meter_gives_no_rate_for_blocks_arriving_milliseconds_apart() -> None:
    meter = ProgressMeter("stage_1 labels", total=8, started=0.0)
    meter.update(4, 0, now=6.000)
    meter.update(8, 0, now=6.004)
    assert "-- images/s" in meter.line()


def test_format_duration() -> None:
    assert [format_duration(s) for s in (5, 754, 7384)] == ["5s", "12m34s", "2h03m"]
    assert format_duration(float(np.nan)) == "--"
