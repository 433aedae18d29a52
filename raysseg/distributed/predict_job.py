"""`raysseg predict` at scale, as a Ray Data job.

input URIs -> [actor pool, GPU when configured] load the checkpoint once per actor, skip images
whose outputs exist, decode, multi-scale + flip model step -> CRF + atomic PNG writes, in the
actors or in separate CPU tasks as the label update places its CRFs (`refine.crf_in_actors`) ->
one small row per image (uri, name, status, error) back to the driver, never a pixel.

The per-image work is `raysseg.predict`'s, which the in-process loop runs too: both paths write
the same files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray.data
import torch

from raysseg import storage
from raysseg.config import Config, from_dict, to_dict
from raysseg.distributed.datasets import block_count, inference_pool_options
from raysseg.distributed.placement import custom_resources, require_custom_resources
from raysseg.distributed.refine import crf_in_actors
from raysseg.labels.finish import pack_arrays, unpack_arrays
from raysseg.predict import (
    PredictItem,
    PredictSummary,
    finish_item,
    load_predictor,
    predict_item,
    score_item,
)
from raysseg.progress import ProgressMeter


def predict_dataset(
    config: Config,
    checkpoint: str,
    items: Sequence[PredictItem],
    out_dir: str,
    crf: bool,
    log: Callable[[str], None] = print,
) -> PredictSummary:
    """Predict `items` on the Ray cluster this process is connected to; returns the counts.

    Progress lines go to `log` every `resources.progress_seconds` while rows arrive.
    """
    summary = PredictSummary()
    if not items:
        return summary
    if not storage.exists(checkpoint):
        # Checked here: inside the actors it would surface as one long actor-death traceback.
        raise FileNotFoundError(f"predict: checkpoint '{checkpoint}' not found")
    resources = config.resources
    fused = not crf or crf_in_actors(resources)  # without a CRF there is nothing to hand off
    require_custom_resources(resources, ["refine"] if fused else ["refine", "crf"])
    storage.makedirs(out_dir)
    config_dict = to_dict(config)
    rows = [{"uri": item.uri, "name": item.name} for item in items]
    dataset = ray.data.from_items(
        rows,
        override_num_blocks=block_count(
            len(rows), resources.refine_actors, resources.refine_batch_size
        ),
    )
    dataset = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "config_dict": config_dict,
            "checkpoint": checkpoint,
            "out_dir": out_dir,
            "crf": crf,
            "fused": fused,
        },
        **inference_pool_options(resources),
    )
    if not fused:
        dataset = dataset.map_batches(
            finish_batch,
            fn_kwargs={"config_dict": config_dict, "out_dir": out_dir, "crf": crf},
            batch_size=resources.refine_batch_size,
            num_cpus=resources.crf_cpus,
            resources=custom_resources(resources, "crf"),
            batch_format="pandas",
        )
    return _collect(dataset, len(rows), resources.progress_seconds, log)


def _collect(
    dataset: ray.data.Dataset, total: int, interval: float, log: Callable[[str], None]
) -> PredictSummary:
    summary = PredictSummary()
    meter = ProgressMeter("predict", total)
    last_line = time.perf_counter()
    for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
        for row in batch.to_dict("records"):
            summary.add(row)
        meter.update(summary.images, len(summary.errors))
        if time.perf_counter() - last_line >= interval:
            log(meter.line())
            last_line = time.perf_counter()
    return summary


class Predictor:
    """Actor: the checkpoint is loaded once, on the GPU when the actor sees one.

    `fused`: the actor also runs the CRF and writes, returning result rows; otherwise each row
    carries the decoded image and probabilities (`payload`, one `.npz` cell) to `finish_batch`.
    """

    def __init__(
        self, config_dict: dict, checkpoint: str, out_dir: str, crf: bool, fused: bool
    ) -> None:
        self.config = from_dict(config_dict)
        self.out_dir = out_dir
        self.crf = crf
        self.fused = fused
        if not torch.cuda.is_available():
            # One intra-op thread per CPU this actor reserved: with several actors (and CRF tasks)
            # on a node, torch's default of one thread per core oversubscribes the cores.
            torch.set_num_threads(max(1, int(self.config.resources.refine_cpus_per_actor)))
        self.model = load_predictor(checkpoint)

    def __call__(self, batch):  # pandas.DataFrame -> pandas.DataFrame
        import pandas as pd

        names = zip(batch["uri"], batch["name"], strict=True)
        return pd.DataFrame([self._row(PredictItem(uri, name)) for uri, name in names])

    def _row(self, item: PredictItem) -> dict[str, Any]:
        if self.fused:
            return predict_item(self.model, self.config, item, self.out_dir, self.crf)
        row, arrays = score_item(self.model, self.config, item, self.out_dir)
        return {**row, "payload": pack_arrays(**arrays) if arrays else b""}


def finish_batch(batch, config_dict: dict, out_dir: str, crf: bool):
    """CPU step: CRF + PNG writes of the rows the actors scored; the others pass through."""
    import pandas as pd

    config = from_dict(config_dict)
    rows: list[dict[str, Any]] = []
    for row in batch.to_dict("records"):
        payload = row.pop("payload", b"") or b""
        if payload:
            item = PredictItem(row["uri"], row["name"])
            row = finish_item(config, item, unpack_arrays(payload), out_dir, crf)
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["Predictor", "finish_batch", "predict_dataset"]
