"""The core never loads Ray: only raysseg.distributed (and the CLI that calls it) may."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import raysseg


def _core_modules() -> list[str]:
    names = []
    for module in pkgutil.walk_packages(raysseg.__path__, prefix="raysseg."):
        # __main__ runs the CLI when imported; cli is the Ray-aware shell.
        if module.name.startswith("raysseg.distributed") or module.name in (
            "raysseg.cli",
            "raysseg.__main__",
        ):
            continue
        names.append(module.name)
    return names


def test_core_module_list_is_not_empty() -> None:
    modules = _core_modules()
    assert "raysseg.config" in modules
    assert len(modules) > 5


def test_importing_the_core_does_not_import_ray() -> None:
    modules = _core_modules()
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    # A fresh interpreter: this test process may already hold ray from other tests.
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=240
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_cli_help_does_not_import_ray() -> None:
    script = "import sys, raysseg.cli; print('ray' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"
