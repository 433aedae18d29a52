"""Dense CRF: raysseg's wrappers vs the raw pydensecrf calls on the same inputs; cost per megapixel.

- saliency CRF (label update): 2 labels, 1 iteration — `raysseg.labels.crf.saliency_crf` vs the same
  unary computed by hand + DenseCRF2D / pairwise terms / inference.
- inference CRF (test-time post-processing): K labels, 10 iterations — `dense_crf` vs
  `unary_from_softmax` + the same library calls; K = the present classes (bg + 2) and all 21 VOC classes.
Each figure is the median of `--repeats` runs, interleaved so machine noise hits both sides alike.

    python bench/crf.py --quick          # 64x48, seconds
    python bench/crf.py                  # 500x375 (a typical VOC image), about a minute
    python bench/crf.py --out runs/bench_crf     # the same, figures also in runs/bench_crf/crf.json
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import _common
import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from raysseg.labels.crf import PROB_CLIP, dense_crf, saliency_crf

SETTINGS = {
    "quick": {"width": 64, "height": 48, "repeats": 3},
    "full": {"width": 500, "height": 375, "repeats": 7},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the figures to OUT/crf.json")
    args = parser.parse_args()
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    image, rng = _inputs(settings["height"], settings["width"])
    settings["megapixels"] = settings["height"] * settings["width"] / 1e6
    cases = [_case_saliency(image, rng, settings["repeats"])]
    for labels in (3, 21):
        cases.append(_case_dense(image, rng, labels, settings["repeats"]))
    print(_common.machine_line())
    print(
        f"dense CRF on {settings['width']}x{settings['height']} ({settings['megapixels']:.3f} MP), "
        "one core"
    )
    _common.print_table(
        ["case", "raysseg ms", "raw ms", "overhead %", "raysseg s/MP", "raw s/MP"],
        [_row(case, settings["megapixels"]) for case in cases],
    )
    if args.out:
        _common.write_results(args.out, "crf", settings=settings, cases=cases)


def _inputs(height: int, width: int) -> tuple[np.ndarray, np.random.Generator]:
    """A smooth image with a few flat regions: CRF cost does not depend on content, only on size."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height, :width]
    return np.ascontiguousarray(image), rng


def _median_pair(
    ours: Callable[[], object], raw: Callable[[], object], repeats: int
) -> tuple[float, float]:
    ours(), raw()  # warm caches and lazy imports
    ours_s, raw_s = [], []
    for _ in range(repeats):
        ours_s.append(_common.timed(ours)[1])
        raw_s.append(_common.timed(raw)[1])
    return statistics.median(ours_s), statistics.median(raw_s)


def _case_saliency(image: np.ndarray, rng: np.random.Generator, repeats: int) -> dict:
    sal = rng.random(image.shape[:2], dtype=np.float32)
    ours, raw = _median_pair(
        lambda: saliency_crf(image, sal), lambda: _raw_saliency(image, sal), repeats
    )
    return _case("saliency", 2, 1, ours, raw)


def _raw_saliency(image: np.ndarray, sal: np.ndarray, tau: float = 1.05) -> np.ndarray:
    """What a user would write by hand: the METHOD.md unary, then the library calls (defaults of
    saliency_crf: gauss 3/3, bilateral 60/5/5, 1 iteration)."""
    height, width = sal.shape
    fg = np.clip(sal, PROB_CLIP, 1.0 - PROB_CLIP).reshape(1, -1)
    probs = np.concatenate([1.0 - fg, fg])
    unary = np.ascontiguousarray(-np.log(probs) / (tau / (1.0 + np.exp(-probs))), np.float32)
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=60, srgb=5, rgbim=image, compat=5)
    return np.asarray(crf.inference(1)).reshape(2, height, width)[1]


def _case_dense(image: np.ndarray, rng: np.random.Generator, labels: int, repeats: int) -> dict:
    logits = rng.random((labels, *image.shape[:2]), dtype=np.float32) * 4
    probs = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    ours, raw = _median_pair(
        lambda: dense_crf(image, probs), lambda: _raw_dense(image, probs), repeats
    )
    return _case("inference", labels, 10, ours, raw)


def _raw_dense(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The library's own recipe (defaults of dense_crf: gauss 4/3, bilateral 83/5/3, 10 iterations)."""
    labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(unary_from_softmax(probs, clip=PROB_CLIP))
    crf.addPairwiseGaussian(sxy=4, compat=3)
    crf.addPairwiseBilateral(sxy=83, srgb=5, rgbim=image, compat=3)
    return np.asarray(crf.inference(10)).reshape(labels, height, width)


def _case(kind: str, labels: int, iterations: int, ours: float, raw: float) -> dict:
    """One case's medians in seconds, as crf.json holds them."""
    return {
        "kind": kind,
        "labels": labels,
        "iterations": iterations,
        "raysseg_s": ours,
        "raw_s": raw,
    }


def _row(case: dict, megapixels: float) -> list:
    ours, raw = case["raysseg_s"], case["raw_s"]
    name = f"{case['kind']}, {case['labels']} labels / {case['iterations']} iter"
    overhead = 100.0 * (ours / raw - 1.0)
    return [name, 1e3 * ours, 1e3 * raw, overhead, ours / megapixels, raw / megapixels]


if __name__ == "__main__":
    main()
