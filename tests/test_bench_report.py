"""bench/report.py renders BENCHMARKS.md's tables from a bench's JSON (no figure copied by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


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


def test_quality_report_prints_every_stage_and_the_ratio(tmp_path: Path) -> None:
    results = {
        "bench": "quality",
        "facts": {
            "command": "python bench/quality.py --out runs/q",
            "commit": "abc1234",
            "date": "2026-12-01",
            "machine": "x86_64, 2 usable cores",
            "torch": "2.14.1",
        },
        "runs": {
            "weak": _run(_stages([0.39, 0.4312, 0.44], [0.13, 0.25, None]), 0.30, False, 500.0),
            "full": _run(_stages([0.5, 0.5, 0.5], [0.2, 0.4, None]), 0.40, True, 400.0),
        },
        "goals": {
            "weak": {"stage1_minus_stage0_label_miou": 0.0412, "ratio_ms_crf": 0.75},
        },
    }
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(results))
    out = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "commit abc1234" in out and "`python bench/quality.py --out runs/q`" in out
    assert "| 1 | 80.00 / 40.00 / 43.12 | 25.00 | 40.00 |" in out
    assert "| 2 | 80.00 / 40.00 / 44.00 | - | - |" in out
    assert "| weak | 25.00 | 30.00 | 0.75 | +4.12 | 500 |" in out
    assert "| full | 40.00 | 40.00 | - | - | 400 |" in out


def test_report_refuses_a_json_without_a_known_bench(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"bench": "nothing"}))
    completed = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), str(path)], capture_output=True, text=True
    )
    assert completed.returncode != 0 and "no renderer for bench 'nothing'" in completed.stderr
