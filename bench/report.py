"""Markdown tables for BENCHMARKS.md from a bench's JSON output, so no figure is copied by hand.

python bench/report.py runs/bench_quality/quality.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raysseg.engine.metrics import as_percent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_files", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.json_files:
        results = json.loads(path.read_text())
        renderer = RENDERERS.get(results.get("bench", ""))
        if renderer is None:
            raise SystemExit(f"{path}: no renderer for bench {results.get('bench')!r}")
        print(renderer(results))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def facts_line(facts: dict[str, Any]) -> str:
    return (
        f"Measured {facts['date']} at commit {facts['commit']} on {facts['machine']} "
        f"(torch {facts['torch']}): `{facts['command']}`."
    )


def quality_section(results: dict[str, Any]) -> str:
    runs = results["runs"]
    weak_names = [name for name, run in runs.items() if not run["full_supervision"]]
    headers = ["stage"]
    for name in weak_names:
        headers += [f"{name}: labels P / R / mIoU (%)", f"{name}: val mIoU (%)"]
    headers.append("full: val mIoU (%)")
    stages = runs["full"]["summary"]["stages"]
    rows = []
    for index in range(len(runs[weak_names[0]]["summary"]["stages"])):
        row: list[Any] = [index]
        for name in weak_names:
            stage = runs[name]["summary"]["stages"][index]
            labels = " / ".join(
                as_percent(stage.get(key))
                for key in ("label_precision", "label_recall", "label_miou")
            )
            row += [labels, as_percent(stage.get("val_miou"))]
        row.append(as_percent(stages[index].get("val_miou")) if index < len(stages) else "-")
        rows.append(row)
    per_stage = markdown_table(headers, rows)
    final_rows = [
        _final_row(name, run, runs["full"], results["goals"].get(name))
        for name, run in runs.items()
    ]
    finals = markdown_table(
        [
            "run",
            "val mIoU, single scale (%)",
            "val mIoU, multi-scale + flip + CRF (%)",
            "weak / full (ms + CRF)",
            "stage-1 minus stage-0 labels (points)",
            "pipeline s",
        ],
        final_rows,
    )
    return "\n\n".join([facts_line(results["facts"]), per_stage, finals])


def _final_row(
    name: str, run: dict[str, Any], full: dict[str, Any], goal: dict[str, Any] | None
) -> list[Any]:
    stages = run["summary"]["stages"]
    last_val = next((s["val_miou"] for s in reversed(stages) if "val_miou" in s), None)
    ratio = goal.get("ratio_ms_crf") if goal else None
    gain = goal.get("stage1_minus_stage0_label_miou") if goal else None
    return [
        name,
        as_percent(last_val),
        as_percent(run["summary"].get("final_miou_ms_crf")),
        f"{ratio:.2f}" if ratio is not None else "-",
        f"{100 * gain:+.2f}" if gain is not None else "-",
        f"{run['seconds']:.0f}",
    ]


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {"quality": quality_section}


if __name__ == "__main__":
    main()
