"""The driver's console filter: Ray's known-harmless C++ lines leave fd 2, nothing else does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# A driver writing to fd 2 the ways a Ray driver does: raw C++ lines (the line Ray's core prints
# for every Ray Data actor pool, ray-project/ray#57733), Python's stderr, an inheriting child.
SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys
    from raysseg.distributed.session import HARMLESS_DRIVER_LINES, stderr_without

    ACTOR_LINE = (
        b"[2026-12-01 21:43:43,319 E 622 1592] core_worker.cc:2465: Actor with class name: "
        b"'MapWorker(MapBatches(LabelInference))' and ID: '902b' has constructor arguments in "
        b"the object store and max_restarts > 0. If the arguments in the object store go out "
        b"of scope or are lost, the actor restart will fail.\\n"
    )
    os.write(2, b"before\\n")
    with stderr_without(HARMLESS_DRIVER_LINES):
        os.write(2, b"first\\n" + ACTOR_LINE)
        print("a Python warning", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'from a child\\\\n')"])
        os.write(2, b"E core_worker.cc:1: a real error\\nno newline at the end")
    os.write(2, b"\\nafter\\n")
    """
)


def test_stderr_filter_drops_only_the_harmless_lines_keeps_order_and_restores_fd_2() -> None:
    repo = str(Path(__file__).resolve().parents[1])
    driver = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, cwd=repo, timeout=60, check=True
    )
    assert driver.stderr.decode() == (
        "before\nfirst\na Python warning\nfrom a child\nE core_worker.cc:1: a real error\n"
        "no newline at the end\nafter\n"
    )
