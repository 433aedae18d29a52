"""bench/report.py renders BENCHMARKS.md's tables from a bench's JSON (no figure copied by hand).

The renderers run in this process (bench/report.py loaded from its file): one interpreter start per
case would cost seconds each.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# report.py imports the benches' _common, as it does when run as `python bench/report.py`.
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _facts(command: str) -> dict[str, str]:
    return {
        "command": command,
        "commit": "abc1234",
        "date": "2026-12-01",
        "machine": "x86_64, 2 usable cores",
        "torch": "2.14.1",
    }


def _write(folder: Path, results: dict[str, Any]) -> Path:
    path = folder / f"{results['bench']}_{len(list(folder.iterdir()))}.json"
    path.write_text(json.dumps(results))
    return path


def _stages(label_mious: list[float], vals: list[float | None]) -> list[dict]:
    rows = []
    for stage, (miou, val) in enumerate(zip(label_mious, vals, strict=True)):
        row = {"stage": stage, "label_precision": 0.8, "label_recall": 0.4, "label_miou": miou}
        if val is not None:
            row["val_miou"] = val
        rows.append(row)
    return rows


def _run(stages: list[dict], final: float, full: bool, seconds: float) -> dict:
    summary = {"stages": stages, "final_miou_ms_crf": final}
    return {
        "full_supervision": full,
        "propagate_cams": False,
        "seconds": seconds,
        "summary": summary,
    }


def test_quality_report_prints_every_stage_and_the_ratio(tmp_path: Path, capsys) -> None:
    results = {
        "bench": "quality",
        "facts": _facts("python bench/quality.py --out runs/q"),
        "runs": {
            "weak": _run(_stages([0.39, 0.4312, 0.44], [0.13, 0.25, None]), 0.30, False, 500.0),
            "full": _run(_stages([0.5, 0.5, 0.5], [0.2, 0.4, None]), 0.40, True, 400.0),
        },
        "goals": {
            "weak": {"stage1_minus_stage0_label_miou": 0.0412, "ratio_ms_crf": 0.75},
        },
    }
    report.main([str(_write(tmp_path, results))])
    out = capsys.readouterr().out
    assert "commit abc1234" in out and "`python bench/quality.py --out runs/q`" in out
    assert "| 1 | 80.00 / 40.00 / 43.12 | 25.00 | 40.00 |" in out
    assert "| 2 | 80.00 / 40.00 / 44.00 | - | - |" in out
    assert "| weak | 25.00 | 30.00 | 0.75 | +4.12 | 500 |" in out
    assert "| full | 40.00 | 40.00 | - | - | 400 |" in out


def test_report_refuses_a_json_without_a_known_bench(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no renderer for bench 'nothing'"):
        report.main([str(_write(tmp_path, {"bench": "nothing"}))])


def _pair(serial: float, case: float) -> dict:
    return {"serial": {"images_per_s": serial}, "case": {"images_per_s": case}}


def test_label_update_rates_ratios_and_goals() -> None:
    case = {"images_per_s": 2.5, "steady_images_per_s": 2.75, "fixed_s": 4.04}
    results = {
        "facts": _facts("python bench/label_update.py --placements actors"),
        "settings": {"images": 96, "size": 256, "rounds": 2, "cores": 2},
        "cases": [
            {"group": "1", "crf_placement": "actors", "serial_images_per_s": 3.0, **case},
            {"group": "free", "crf_placement": "actors", "serial_images_per_s": 3.3, **case},
        ],
        "ratios": {
            "1": {"actors": {"end_to_end": [0.8, 0.7], "steady": [0.96, 1.0]}},
            "2": {"independent": {"end_to_end": [1.9, 2.1], "steady": []}},
        },
        "goals": {"1": 0.95, "2": 1.8},
        "rounds": [
            {"1": {"actors": _pair(2.9, 2.0)}, "free": {"actors": _pair(9.0, 1.0)}},
            {"1": {"actors": _pair(3.1, 2.0)}, "free": {"actors": _pair(1.0, 1.0)}},
        ],
    }
    out = report.label_update_section([results])
    assert "`python bench/label_update.py --placements actors`" in out
    # The spread counts the 1-core baselines only, not the free-daemons case's.
    assert "2 rounds; the serial loop on 1 core, 2 runs: 2.900 to 3.100 images/s." in out
    assert "| 1 | actors | 3.000 | 2.500 | 2.750 | 4.0 |" in out
    assert "| 1 (of 2) | actors | 3.300 (1 thread) | 2.500 | 2.750 | 4.0 |" in out
    row = "| 1 worker, pinned to 1 core, `actors` | 0.800 / 0.700 | 0.750x | 0.960 / 1.000 |"
    assert row + " **0.980x** | >= 0.95x |" in out  # bold: the median meets the goal
    assert "| 2 independent serial processes (no Ray, the ceiling) | 1.900 / 2.100 | 2.000x" in out
    assert "| 2.000x |  |  |  |" in out  # no steady timing and no goal for the ceiling


def test_coco_projection_names_the_label_update_run() -> None:
    projection = {
        "approach": "Ray label update",
        "core_s_per_image": 1.5744,
        "core_h_per_update": 36.21,
        "core_h_all_updates": 144.84,
        "gpu_h": None,
        "cores_for_one_hour": 37,
        "nodes_of_16": 3,
    }
    results = {
        "facts": _facts("python bench/coco_projection.py --from-json x.json"),
        "source": "measured (x.json)",
        "label_update": {"images": 96, "rounds": 3, "commit": "7875966"},
        "stages": 4,
        "projections": [projection],
    }
    out = report.coco_projection_section([results])
    assert "| core-hours for 4 updates |" in out
    row = "| 96 images, 3 paired rounds, 7875966 | Ray label update | 1.574 | 36.2 | 144.8 |"
    assert row + " not measured | 37 | 3 |" in out


def test_ray_idle_rows_and_total() -> None:
    results = {
        "facts": _facts("python bench/ray_idle.py"),
        "settings": {"cores": 1, "seconds": 20.0},
        "processes": [
            {"kind": "raylet", "count": 1, "cpu_s": 1.0},
            {"kind": "gcs_server", "count": 2, "cpu_s": 0.4},
        ],
    }
    out = report.ray_idle_section([results])
    assert "| `raylet` | 1 | 1.00 | 5.00 |" in out and "| `gcs_server` | 2 | 0.40 | 2.00 |" in out
    assert "20 s on 1 core: 3 processes, 1.40 CPU s, **7.00 % of a core**" in out


def _read_run(pin: int, cores: int, v1: list[float], v2: list[float]) -> dict:
    return {
        "facts": _facts(f"python bench/parquet_read.py --pin {pin}"),
        "settings": {"rows": 10_000, "repeats": 3, "pin": pin, "cores": cores},
        "seconds": {"v1": v1, "v2": v2},
    }


def test_parquet_read_appends_the_rows_of_each_run() -> None:
    unpinned = _read_run(0, 2, [0.1, 0.12, 0.5], [1.0, 1.2, 0.9])
    pinned = _read_run(1, 1, [0.2, 0.1, 0.3], [3.0, 2.0, 2.2])
    out = report.parquet_read_section([unpinned, pinned])
    lines = out.splitlines()
    assert "`python bench/parquet_read.py --pin 0`" in lines[0]
    assert "`python bench/parquet_read.py --pin 1`" in lines[1]
    assert out.index("| 2 | 0.120 | 1.000 | 8.3x |") < out.index(
        "| 1 (pinned) | 0.200 | 2.200 | 11.0x |"
    )


def test_crf_cells_in_ms_percent_and_seconds_per_megapixel() -> None:
    cases = [
        {"kind": "saliency", "labels": 2, "iterations": 1, "raysseg_s": 0.099, "raw_s": 0.1},
        {"kind": "inference", "labels": 21, "iterations": 10, "raysseg_s": 0.56, "raw_s": 0.5},
    ]
    results = {"facts": _facts("python bench/crf.py"), "settings": {"megapixels": 0.25}}
    out = report.crf_section([{**results, "cases": cases}])
    assert "| saliency CRF, 2 labels / 1 iteration | 99.0 | 100.0 | -1.00 | 0.396 | 0.400 |" in out
    assert (
        "| inference CRF, 21 labels / 10 iterations | 560.0 | 500.0 | +12.00 | 2.24 | 2.00 |" in out
    )


def test_training_rows_say_whether_the_run_was_pinned() -> None:
    def run(pinned: bool, workers: int, cores: int) -> dict:
        case = {
            "workers": workers,
            "cores": cores,
            "plain_images_per_s": 40.0,
            "ray_images_per_s": 42.0,
            "ray_end_to_end_images_per_s": 15.54,
        }
        settings = {"pinned": pinned}
        return {"facts": _facts("python bench/training.py"), "settings": settings, "cases": [case]}

    out = report.training_section([run(True, 1, 1), run(False, 1, 2)])
    assert "| 1 | 1 (pinned) | 40.0 | 42.0 | 1.050 | 15.5 |" in out
    assert "| 1 | 2 (not pinned) | 40.0 | 42.0 | 1.050 | 15.5 |" in out


def test_memory_peaks_in_mib() -> None:
    chunked = {"peak_mib": 320.4, "positions": 2961, "chunk_rows": 470, "seconds": 1.94}
    naive = {"peak_mib": 1443.6, "positions": 2961, "chunk_rows": 2961, "seconds": 2.26}
    case = {"width": 500, "height": 375, "chunked": chunked, "naive": naive}
    out = report.memory_section([{"facts": _facts("python bench/memory.py"), "cases": [case]}])
    assert "| 500x375 | 2961 | 320 MiB | 470 | 1,444 MiB | 1.9 | 2.3 |" in out


def test_scale_puts_resumed_runs_in_their_own_table() -> None:
    plain = {
        "n": 100_000,
        "images_per_s": 45.61,
        "driver_update_peak_mib": 783.2,
        "fullest_shard_folder": 46,
        "seconds": 2191.3,
    }
    resumed = {**plain, "n": 2000, "images_per_s": 38.46, "worker_peak_mib": 412.0}
    resumed["resume"] = {"done_before_interrupt": 1024, "written": 900, "skipped": 1100}
    runs = [
        {"facts": _facts("python bench/scale.py"), "results": [plain]},
        {"facts": _facts("python bench/scale.py --resume-at 0.5"), "results": [resumed]},
    ]
    out = report.scale_section(runs)
    assert "| 100,000 | 45.6 | 783 MiB | 46 files | 2,191 |" in out
    assert "| 2,000 | 1,024 | 900 | 1,100 | 38.5 | 783 MiB | 412 MiB |" in out
    assert "| 2,000 | 38.5 |" not in out


MARKDOWN = (
    "# Benchmarks\r\n\nIntro, with a CRLF line.\n\n"
    "<!-- report: crf -->\nold crf table\n<!-- /report: crf -->\n\n"
    "Between the blocks.\n\n"
    "<!-- report: memory -->\nold memory table\n<!-- /report: memory -->\nThe end.\n"
)


def _crf_json(folder: Path) -> Path:
    case = {"kind": "saliency", "labels": 2, "iterations": 1, "raysseg_s": 0.1, "raw_s": 0.1}
    results = {"bench": "crf", "facts": _facts("python bench/crf.py"), "cases": [case]}
    return _write(folder, {**results, "settings": {"megapixels": 0.25}})


def test_update_replaces_one_block_and_leaves_the_rest_byte_identical(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_bytes(MARKDOWN.encode())
    crf = _crf_json(tmp_path)
    report.main(["--update", str(markdown), str(crf)])
    section = report.crf_section([json.loads(crf.read_text())])
    start, end = "<!-- report: crf -->\n", "\n<!-- /report: crf -->"
    head, tail = MARKDOWN.split(start)[0], MARKDOWN.split(end)[1]
    assert markdown.read_bytes() == f"{head}{start}{section}{end}{tail}".encode()
    assert "old memory table" in tail and "old crf table" not in markdown.read_text()


def test_update_refuses_a_bench_without_a_block(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    without = MARKDOWN.replace("crf", "other").encode()
    markdown.write_bytes(without)
    with pytest.raises(SystemExit, match=r"BENCHMARKS\.md: no single block .* for bench 'crf'"):
        report.main(["--update", str(markdown), str(_crf_json(tmp_path))])
    assert markdown.read_bytes() == without
