"""Peak memory of full-resolution A_CT inference, chunked by the memory budget vs naive (whole N x N).

One fresh subprocess per case (torch's CPU allocator never gives memory back to the OS, so cases must
not share a process): build the small-backbone network, then model.forward(heads="all") + propagate of
the CAMs under torch.inference_mode, as the label update does. Peak = the kernel's resident-set
high-water mark (VmHWM) after the forward minus the resident set before it, with the mark reset to the
resident set just before (/proc/self/clear_refs): imports, weights and the input are in the baseline.
Linux only. Not ru_maxrss: it survives exec, so a case started by a large parent (pytest, gpu_check)
would take the parent's size as its own and read a smaller peak as 0. "naive" sets a budget so large
that nothing is chunked.

    python bench/memory.py --quick         # 128x96 and 160x120, seconds
    python bench/memory.py                 # 500x375 and 640x480, about a minute
    python bench/memory.py --out runs/bench_memory     # the same, figures also in memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common

SIZES = {"quick": [(128, 96), (160, 120)], "full": [(500, 375), (640, 480)]}
NAIVE_BUDGET_MB = 10**7  # so large that chunk_rows_for_budget returns N: whole matrices
DEFAULT_BUDGET_MB = 256  # ModelConfig.affinity_memory_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke)")
    parser.add_argument("--budget-mb", type=int, default=DEFAULT_BUDGET_MB)
    parser.add_argument("--out", default=None, help="also write the figures to OUT/memory.json")
    parser.add_argument("--case", nargs=3, type=int, metavar=("WIDTH", "HEIGHT", "BUDGET_MB"))
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure_case(*args.case)))
        return
    cases = []
    for width, height in SIZES["quick" if args.quick else "full"]:
        chunked = run_case(width, height, args.budget_mb)
        naive = run_case(width, height, NAIVE_BUDGET_MB)
        cases.append({"width": width, "height": height, "chunked": chunked, "naive": naive})
    print(_common.machine_line())
    print("A_CT inference (forward heads=all + CAM propagation), small backbone, CPU, one image")
    _common.print_table(
        [
            "image",
            "N",
            f"chunked ({args.budget_mb} MB) peak MiB",
            "chunk rows",
            "naive peak MiB",
            "chunked s",
            "naive s",
        ],
        [_row(case) for case in cases],
    )
    if args.out:
        settings = {"budget_mb": args.budget_mb, "naive_budget_mb": NAIVE_BUDGET_MB}
        _common.write_results(args.out, "memory", settings=settings, cases=cases)


def run_case(width: int, height: int, budget_mb: int) -> dict:
    """A fresh interpreter per case: its high-water mark holds this case's peak only."""
    command = [sys.executable, __file__, "--case", str(width), str(height), str(budget_mb)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_case(width: int, height: int, budget_mb: int) -> dict:
    import torch

    from raysseg.config import ModelConfig
    from raysseg.model.network import build_model

    torch.manual_seed(0)
    config = ModelConfig(backbone="small", num_classes=21, affinity_memory_mb=budget_mb)
    model = build_model(config).eval()
    image = torch.randn(1, 3, height, width)
    with torch.inference_mode():
        model(image[:, :, :64, :64], heads="all")  # warm-up at a tiny size: lazy allocations
    before = _reset_peak_rss_mib()
    started = time.perf_counter()
    with torch.inference_mode():
        outputs = model(image, heads="all")
        model.propagate(outputs.affinity, outputs.cam[:, :3].relu())
        seconds = time.perf_counter() - started
        # Asked under inference_mode: with gradients on, the model forms whole matrices.
        chunk_rows = model._chunk_rows(outputs.affinity, None)
    return {
        "peak_mib": _proc_status_mib("VmHWM") - before,
        "positions": outputs.affinity.num_positions,
        "chunk_rows": chunk_rows,
        "seconds": seconds,
    }


def _reset_peak_rss_mib() -> float:
    """Reset this process's VmHWM to its current resident set (clear_refs 5) and return that, MiB."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _proc_status_mib("VmRSS")


def _proc_status_mib(field: str) -> float:
    from raysseg.labels.finish import proc_status_mib

    value = proc_status_mib(field)
    if value is None:  # no fallback: ru_maxrss would measure the wrong process (above)
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return value


def _row(case: dict) -> list:
    chunked, naive = case["chunked"], case["naive"]
    return [
        f"{case['width']}x{case['height']}",
        chunked["positions"],
        chunked["peak_mib"],
        chunked["chunk_rows"],
        naive["peak_mib"],
        chunked["seconds"],
        naive["seconds"],
    ]


if __name__ == "__main__":
    main()
