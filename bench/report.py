"""Markdown sections for BENCHMARKS.md from the benches' JSON output, so no figure is copied by hand.

    python bench/report.py runs/bench_crf/crf.json                  # print the section
    python bench/report.py --update BENCHMARKS.md runs/bench_crf/crf.json ...

`--update` replaces, for each bench given, the block between `<!-- report: BENCH -->` and
`<!-- /report: BENCH -->` in the markdown file and leaves everything else as it was. Several JSON
files of one bench (the same script run with other flags) make one section: their rows are appended
in the order given, and the facts lines name each run's command.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from _common import finite_median

from raysseg.engine.metrics import as_percent

Results = dict[str, Any]  # one bench's JSON


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--update", type=Path, metavar="MARKDOWN", help="replace the benches' blocks in this file"
    )
    parser.add_argument("json_files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    sections = {bench: RENDERERS[bench](runs) for bench, runs in _load(args.json_files).items()}
    if args.update is None:
        print("\n\n".join(sections.values()))
        return
    # Bytes in and out: the text outside the blocks stays identical, line endings included.
    text = args.update.read_bytes().decode("utf-8")
    for bench, section in sections.items():
        text = replace_block(text, bench, section, str(args.update))
    args.update.write_bytes(text.encode("utf-8"))
    print(f"{args.update}: updated {', '.join(sections)}")


def _load(paths: Sequence[Path]) -> dict[str, list[Results]]:
    """The JSON files grouped by bench, each group in the order given."""
    grouped: dict[str, list[Results]] = {}
    for path in paths:
        results = json.loads(path.read_text())
        bench = results.get("bench")
        if bench not in RENDERERS:
            raise SystemExit(f"{path}: no renderer for bench {bench!r}")
        grouped.setdefault(bench, []).append(results)
    return grouped


def replace_block(text: str, bench: str, section: str, where: str) -> str:
    """`text` with the block of `bench` holding `section`; an error if the block is not there once."""
    start, end = f"<!-- report: {bench} -->", f"<!-- /report: {bench} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{where}: no single block '{start}' ... '{end}' for bench {bench!r}")
    head, rest = text.split(start)
    tail = rest.split(end)[1]
    return f"{head}{start}\n{section}\n{end}{tail}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def facts_line(facts: dict[str, Any]) -> str:
    return (
        f"Measured {facts['date']} at commit {facts['commit']} on {facts['machine']} "
        f"(torch {facts['torch']}): `{facts['command']}`."
    )


def _facts_lines(runs: Sequence[Results]) -> str:
    return "\n".join(facts_line(run["facts"]) for run in runs)


def _table_section(
    runs: Sequence[Results], headers: Sequence[str], rows_of: Callable[[Results], Iterable[list]]
) -> str:
    """The facts of every run, then one table with every run's rows in turn."""
    rows = [row for run in runs for row in rows_of(run)]
    return "\n\n".join([_facts_lines(runs), markdown_table(headers, rows)])


def _headers(*rows: str) -> list[str]:
    """Column names written as a markdown header row: "a | b | c" -> ["a", "b", "c"]."""
    return [header for row in rows for header in row.split(" | ")]


def _number(value: float | None, digits: int = 3, suffix: str = "") -> str:
    """A figure with `digits` decimals; "-" where a tiny run left it undefined (NaN, None)."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" + ("" if number == 1 else "s")


# ----------------------------------------------------------------------------------------------
# quality.py


def quality_section(runs: Sequence[Results]) -> str:
    return "\n\n".join(_quality_run(results) for results in runs)


def _quality_run(results: Results) -> str:
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


# ----------------------------------------------------------------------------------------------
# label_update.py and coco_projection.py

LABEL_UPDATE_RATES = _headers(
    "workers (cores) | crf_placement | serial images/s | Ray images/s (end to end)",
    "Ray steady images/s | fixed s / update",
)
LABEL_UPDATE_RATIOS = _headers(
    "case | end to end, each round | median | steady state, each round | median | goal"
)


def label_update_section(runs: Sequence[Results]) -> str:
    rates = [_rate_row(run, case) for run in runs for case in run["cases"]]
    ratios = [row for run in runs for row in _ratio_rows(run)]
    parts = [_facts_lines(runs), *(_serial_spread(run) for run in runs)]
    parts += [
        markdown_table(LABEL_UPDATE_RATES, rates),
        markdown_table(LABEL_UPDATE_RATIOS, ratios),
    ]
    return "\n\n".join(parts)


def _serial_spread(run: Results) -> str:
    """How far the 1-core serial baselines moved over the run: the noise behind each ratio."""
    rates = sorted(
        pair["serial"]["images_per_s"]
        for measured in run["rounds"]
        for group, cases in measured.items()
        if group != "free"
        for pair in cases.values()
    )
    settings = run["settings"]
    return (
        f"{_count(settings['images'], 'image')} of {settings['size']}x{settings['size']}, "
        f"{_count(settings['rounds'], 'round')}; the serial loop on 1 core, "
        f"{_count(len(rates), 'run')}: {rates[0]:.3f} to {rates[-1]:.3f} images/s."
    )


def _rate_row(run: Results, case: dict[str, Any]) -> list[str]:
    free = case["group"] == "free"  # 1 worker, Ray's own processes free to use every core
    workers = f"1 (of {run['settings']['cores']})" if free else case["group"]
    serial = _number(case["serial_images_per_s"]) + (" (1 thread)" if free else "")
    return [
        workers,
        case["crf_placement"],
        serial,
        _number(case["images_per_s"]),
        _number(case["steady_images_per_s"]),
        _number(case["fixed_s"], 1),
    ]


def _ratio_rows(run: Results) -> list[list[str]]:
    rows = []
    for group, cases in run["ratios"].items():
        for name, ratios in cases.items():
            goal = _ratio_goal(run["goals"], group, name)
            rows.append(
                [
                    _ratio_case(group, name),
                    *_ratio_cells(ratios["end_to_end"], goal),
                    *_ratio_cells(ratios["steady"], goal),
                    f">= {goal}x" if goal else "",
                ]
            )
    return rows


def _ratio_goal(goals: dict[str, float], group: str, name: str) -> float | None:
    if name == "independent":
        return None  # the ceiling without Ray: a reference, not a goal
    # The 1-worker goal holds whether or not Ray's processes have the other cores.
    return goals.get("1" if group == "free" else group)


def _ratio_case(group: str, name: str) -> str:
    if name == "independent":
        return f"{group} independent serial processes (no Ray, the ceiling)"
    if group == "free":
        return f"1 worker, Ray's processes on the other cores, `{name}`"
    plural = "s" if group != "1" else ""
    return f"{group} worker{plural}, pinned to {group} core{plural}, `{name}`"


def _ratio_cells(ratios: list[float], goal: float | None) -> list[str]:
    """Each round's ratio and their median, bold where the median meets the goal."""
    if not ratios:
        return ["", ""]  # the independent processes have no steady-state timing
    median = finite_median(ratios)
    cell = _number(median, suffix="x")
    met = goal is not None and math.isfinite(median) and median >= goal
    return [" / ".join(_number(value) for value in ratios), f"**{cell}**" if met else cell]


def coco_projection_section(runs: Sequence[Results]) -> str:
    headers = _headers(
        "from the label-update run of | approach | core-s per image @640x480",
        f"core-hours per update | core-hours for {runs[0]['stages']} updates | GPU-hours",
        "cores for < 1 h per update | 16-core nodes",
    )
    return _table_section(runs, headers, _projection_rows)


def _projection_rows(run: Results) -> list[list[str]]:
    source = run["label_update"]
    if source is None:  # example costs or costs given as arguments
        origin = run["source"]
    else:
        runs = _count(source["rounds"], "paired round")
        origin = f"{_count(source['images'], 'image')}, {runs}, {source['commit']}"
    return [
        [
            origin,
            row["approach"],
            _number(row["core_s_per_image"]),
            _number(row["core_h_per_update"], 1),
            _number(row["core_h_all_updates"], 1),
            _number(row["gpu_h"], 1) if row["gpu_h"] is not None else "not measured",
            f"{row['cores_for_one_hour']:,}",
            f"{row['nodes_of_16']:,}",
        ]
        for row in run["projections"]
    ]


# ----------------------------------------------------------------------------------------------
# ray_idle.py, parquet_read.py, crf.py, training.py, memory.py, scale.py


def ray_idle_section(runs: Sequence[Results]) -> str:
    table = _table_section(runs, _headers("process | count | CPU s | % of a core"), _idle_rows)
    return "\n\n".join([table, *(_idle_total(run) for run in runs)])


def _idle_rows(run: Results) -> list[list[Any]]:
    seconds = run["settings"]["seconds"]
    return [
        [f"`{p['kind']}`", p["count"], _number(p["cpu_s"], 2), as_percent(p["cpu_s"] / seconds)]
        for p in run["processes"]
    ]


def _idle_total(run: Results) -> str:
    settings, processes = run["settings"], run["processes"]
    used = sum(p["cpu_s"] for p in processes)
    return (
        f"All Ray processes and the driver, idle for {settings['seconds']:.0f} s on "
        f"{_count(settings['cores'], 'core')}: {sum(p['count'] for p in processes)} processes, "
        f"{used:.2f} CPU s, **{as_percent(used / settings['seconds'])} % of a core**."
    )


PARQUET_READ_HEADERS = _headers(
    "cores | raysseg `read_parquet` (V1) median s | Ray default (V2) median s | V2 / V1"
)


def parquet_read_section(runs: Sequence[Results]) -> str:
    return _table_section(runs, PARQUET_READ_HEADERS, _read_rows)


def _read_rows(run: Results) -> list[list[str]]:
    settings = run["settings"]
    v1, v2 = (finite_median(run["seconds"][reader]) for reader in ("v1", "v2"))
    cores = f"{settings['cores']} (pinned)" if settings["pin"] else str(settings["cores"])
    return [[cores, _number(v1), _number(v2), _number(v2 / v1, 1, "x")]]


CRF_HEADERS = _headers("case | raysseg ms | raw ms | overhead (%) | raysseg s/MP | raw s/MP")


def crf_section(runs: Sequence[Results]) -> str:
    return _table_section(runs, CRF_HEADERS, _crf_rows)


def _crf_rows(run: Results) -> list[list[str]]:
    megapixels = run["settings"]["megapixels"]
    rows = []
    for case in run["cases"]:
        ours, raw = case["raysseg_s"], case["raw_s"]
        iterations = f"{case['iterations']} iteration" + ("s" if case["iterations"] > 1 else "")
        overhead = ours / raw - 1.0
        rows.append(
            [
                f"{case['kind']} CRF, {case['labels']} labels / {iterations}",
                _number(1e3 * ours, 1),
                _number(1e3 * raw, 1),
                ("+" if overhead > 0 else "") + as_percent(overhead),
                f"{ours / megapixels:#.3g}",
                f"{raw / megapixels:#.3g}",
            ]
        )
    return rows


TRAINING_HEADERS = _headers(
    "workers | cores | plain torch images/s | Ray Train images/s | Ray / plain",
    "Ray end to end images/s (with start-up)",
)


def training_section(runs: Sequence[Results]) -> str:
    return _table_section(runs, TRAINING_HEADERS, _training_rows)


def _training_rows(run: Results) -> list[list[Any]]:
    pinning = "pinned" if run["settings"]["pinned"] else "not pinned"
    return [
        [
            case["workers"],
            f"{case['cores']} ({pinning})",
            _number(case["plain_images_per_s"], 1),
            _number(case["ray_images_per_s"], 1),
            _number(case["ray_images_per_s"] / case["plain_images_per_s"]),
            _number(case["ray_end_to_end_images_per_s"], 1),
        ]
        for case in run["cases"]
    ]


MEMORY_HEADERS = _headers(
    "image | N = h*w | chunked peak | rows per chunk | naive peak | chunked s | naive s"
)


def memory_section(runs: Sequence[Results]) -> str:
    return _table_section(runs, MEMORY_HEADERS, _memory_rows)


def _memory_rows(run: Results) -> list[list[Any]]:
    return [
        [
            f"{case['width']}x{case['height']}",
            case["chunked"]["positions"],
            _number(case["chunked"]["peak_mib"], 0, " MiB"),
            case["chunked"]["chunk_rows"],
            _number(case["naive"]["peak_mib"], 0, " MiB"),
            _number(case["chunked"]["seconds"], 1),
            _number(case["naive"]["seconds"], 1),
        ]
        for case in run["cases"]
    ]


SCALE_HEADERS = _headers(
    "N | images/s | driver peak RSS during the update | fullest shard folder | seconds"
)
RESUME_HEADERS = _headers(
    "N | interrupted after | rerun wrote | rerun skipped | rerun images/s (all N)",
    "driver peak RSS | worker peak private (RssAnon)",
)


def scale_section(runs: Sequence[Results]) -> str:
    """A table of the plain runs and one of the interrupted-and-rerun ones (`--resume-at`)."""
    results = [result for run in runs for result in run["results"]]
    plain = [_scale_row(r) for r in results if "resume" not in r]
    resumed = [_resume_row(r) for r in results if "resume" in r]
    parts = [_facts_lines(runs)]
    parts += [markdown_table(SCALE_HEADERS, plain)] if plain else []
    parts += [markdown_table(RESUME_HEADERS, resumed)] if resumed else []
    return "\n\n".join(parts)


def _scale_row(result: dict[str, Any]) -> list[str]:
    return [
        f"{result['n']:,}",
        _number(result["images_per_s"], 1),
        _number(result["driver_update_peak_mib"], 0, " MiB"),
        _count(result["fullest_shard_folder"], "file"),
        _number(result["seconds"], 0),
    ]


def _resume_row(result: dict[str, Any]) -> list[str]:
    resume = result["resume"]
    return [
        f"{result['n']:,}",
        f"{resume['done_before_interrupt']:,}",
        f"{resume['written']:,}",
        f"{resume['skipped']:,}",
        _number(result["images_per_s"], 1),
        _number(result["driver_update_peak_mib"], 0, " MiB"),
        _number(result["worker_peak_mib"], 0, " MiB"),
    ]


# ----------------------------------------------------------------------------------------------
# process_cpu.py

# Kinds below this share of the sampled CPU are summed into one row.
MINOR_SHARE = 0.005


def process_cpu_section(runs: Sequence[Results]) -> str:
    headers = _headers("process | count | CPU s | % of sampled")
    table = _table_section(runs, headers, _process_rows)
    return "\n\n".join([table, *(_process_total(run) for run in runs)])


def _process_rows(run: Results) -> list[list[Any]]:
    processes = run["processes"]
    sampled = sum(p["cpu_s"] for p in processes) or 1.0
    major = [p for p in processes if p["cpu_s"] >= MINOR_SHARE * sampled]
    minor = [p for p in processes if p["cpu_s"] < MINOR_SHARE * sampled]
    rows = [
        [f"`{p['kind']}`", p["count"], _number(p["cpu_s"], 0), as_percent(p["cpu_s"] / sampled)]
        for p in major
    ]
    if minor:
        cpu = sum(p["cpu_s"] for p in minor)
        count = sum(p["count"] for p in minor)
        rows.append(
            [f"{len(minor)} other kinds", count, _number(cpu, 0), as_percent(cpu / sampled)]
        )
    return rows


def _process_total(run: Results) -> str:
    processes = run["processes"]
    sampled = sum(p["cpu_s"] for p in processes)
    return (
        f"`{run['measured']}` (exit {run['returncode']}): {run['wall_s']:.0f} s wall, "
        f"{run['machine_cpu_s']:.0f} CPU s on the whole machine, {sampled:.0f} CPU s sampled in "
        f"{sum(p['count'] for p in processes)} processes it started."
    )


RENDERERS: dict[str, Callable[[Sequence[Results]], str]] = {
    "quality": quality_section,
    "label_update": label_update_section,
    "coco_projection": coco_projection_section,
    "ray_idle": ray_idle_section,
    "parquet_read": parquet_read_section,
    "crf": crf_section,
    "training": training_section,
    "memory": memory_section,
    "scale": scale_section,
    "process_cpu": process_cpu_section,
}


if __name__ == "__main__":
    main()
