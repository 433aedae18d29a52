"""GPU check: one script that runs raysseg's CUDA paths end to end and records what each gives.

Steps, each a separate try (a failure is printed with its traceback, recorded as {"status": "failed",
"error", "traceback"} and the script goes on; every step records its seconds):
  data                 the real-pixel composite dataset (Fashion-MNIST products on real photos)
  pipeline_<backbone>  a 2-stage `run_pipeline` for efficientnet_lite0 and resnet50 on a local Ray:
                       GPU Train worker, AMP (bf16 where supported), GPU label actors + CPU CRF tasks
  label_update         one more `update_labels` (mode refine) timed, the GPU busy fraction sampled
  predict              `predict_paths` (what `raysseg predict` runs, on the device) against the CPU
  training             images/s of `train_one_epoch` in fp32, AMP and AMP + channels_last
  act_memory           peak memory of one full-resolution A_CT forward, whole against chunked
  amp_labels           bf16 against fp32 pseudo labels: pixel agreement and label mIoU against GT
  torch_compile        one `torch.compile` of the forward: its speed-up, or why it failed
The JSON (`--out DIR` -> DIR/gpu_check.json, rewritten after every step) also holds the device name,
the torch / ray versions, the command line and notes on what raysseg has no setting for.
--quick: tiny sizes, one stage, spectral saliency. On CPU "amp" runs in fp32 (raysseg autocasts on
CUDA only) and the bf16 labels come from CPU bf16 autocast; the JSON says so. The CPU smoke's time is
mostly the start-up of its four Ray Train stages (~20-25 s each on 2 busy cores).
One file of about 1,000 lines, on purpose: a device machine is lent for minutes, and this is the
one script it runs, with one command and one JSON; each step is a function of its own.

    python bench/gpu_check.py --out runs/gpu_check                            # one GPU, ~5 minutes
    python bench/gpu_check.py --device cpu --quick --out runs/gpu_check_cpu   # CPU smoke, 2-3 min
    python bench/gpu_check.py --backbones resnet50 --out runs/gpu_check_r50   # one pipeline only
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import memory
import numpy as np
import torch
from _common import run_facts

from raysseg.config import Config, ModelConfig, with_overrides
from raysseg.data import io
from raysseg.data.manifest import ManifestRows, read_manifest, write_manifest
from raysseg.data.sources import voc_records
from raysseg.data.transforms import normalize
from raysseg.engine.checkpoint import load_checkpoint, restore_model
from raysseg.engine.loop import autocast_for, make_grad_scaler, resolve_amp_dtype
from raysseg.rundir import layout

BENCH = Path(__file__).resolve().parent
BACKBONES = ("efficientnet_lite0", "resnet50")
# efficientnet_lite0 loads the ImageNet weights its package ships (offline, as the demo does);
# resnet50 has no offline weights here, so it trains from random ones (the cost is the same).
PRETRAINED = {"efficientnet_lite0": "", "resnet50": "none"}
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "n_train": 128,
        "n_val": 16,
        "size": 256,
        "batch": 8,
        "warmup_epochs": 2,
        "epochs": 1,
        "stages": 2,
        "output_stride": 8,
        "saliency": "u2netp",  # as the demo
        "cam_scales": [1.0, 0.75, 1.25],
        "eval_scales": [0.75, 1.0, 1.25],
        "crf_iterations": 10,
        "train_backbone": "resnet50",
        "train_steps": 30,
        "train_warm_steps": 5,
        "predict_images": 4,
        "agreement_images": 32,
        "memory_size": [640, 480],
        "memory_budget_mb": 256,  # model.affinity_memory_mb's default
        "compile_backbone": "resnet50",
        "compile_size": 320,
        "compile_runs": 20,
        "cpu_compile_backend": "inductor",
    },
    "quick": {
        "n_train": 8,
        "n_val": 4,
        "size": 48,
        "batch": 4,
        "warmup_epochs": 1,
        "epochs": 1,
        # One stage: every Ray Train stage costs ~25 s of start-up on 2 busy cores.
        "stages": 1,
        # OS 16 keeps the CPU smoke short (dilated convolutions are slow on CPU).
        "output_stride": 16,
        # Spectral residual: U^2-Net-P costs ~1 s per image on a busy core.
        "saliency": "spectral",
        "cam_scales": [1.0],
        "eval_scales": [1.0],
        "crf_iterations": 2,
        "train_backbone": "efficientnet_lite0",
        "train_steps": 2,
        "train_warm_steps": 1,
        "predict_images": 2,
        "agreement_images": 2,  # CPU bf16 autocast is slow without AVX512-BF16
        # Smaller than 640x480 (whole matrices there take ~15 s and 2.3 GB on CPU), with a smaller
        # budget so that the chunked case still chunks (N = 1900: 181 rows of 64 MB).
        "memory_size": [400, 300],
        "memory_budget_mb": 64,
        "compile_backbone": "small",
        "compile_size": 48,
        "compile_runs": 3,
        # Inductor's CPU code generation took ~50 s here; aot_eager still traces the forward with
        # dynamo and AOTAutograd (graph breaks and tracing errors show), without generating code.
        "cpu_compile_backend": "aot_eager",
    },
}
# What raysseg has no setting for; the JSON repeats it so a reader of the figures knows.
NOTES = [
    "no config key for channels_last: label-update actors always convert the model to "
    "channels_last on CUDA (raysseg/distributed/refine.py LabelInference.__init__); the Ray Train "
    "worker (raysseg/distributed/train.py _train_worker) and evaluation/predict never do. The "
    "training step below measures channels_last in the plain loop.",
    "no config key for the AMP dtype: optim.amp only switches AMP on; resolve_amp_dtype "
    "(raysseg/engine/loop.py) picks bf16 where torch.cuda.is_bf16_supported(), else fp16, and "
    "None (fp32) on CPU.",
    "evaluation and predict run in fp32 even with optim.amp: predict_label calls predict_probs "
    "without amp (raysseg/predict.py), and raysseg/distributed/evaluate.py _Scorer neither "
    "autocasts nor uses channels_last.",
    "raysseg predict runs its model on the GPU when one is visible (in process for a handful of "
    "images, Ray Data actors above raysseg/predict.py IN_PROCESS_MAX_IMAGES); the predict step "
    "compares its output with predict_label on the CPU.",
]


@dataclasses.dataclass(frozen=True)
class Run:
    """What every step needs: the device, the sizes, where outputs go."""

    device: torch.device
    settings: dict[str, Any]
    out: Path
    data_root: Path
    backbones: tuple[str, ...] = BACKBONES  # the pipeline steps', in order


# ----------------------------------------------------------------------------------------------
# Driver


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        # Fail before any work: a CUDA check that silently ran on CPU would prove nothing.
        print(
            "gpu_check: --device cuda, but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); run with --device cpu for the "
            "CPU smoke test",
            file=sys.stderr,
        )
        return 2
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / f"data_{settings['n_train']}_{settings['size']}"
    if args.saliency:
        settings["saliency"] = args.saliency
    run = Run(device, settings, out, data_root, tuple(args.backbones))
    results = initial_results(run, argv if argv is not None else sys.argv)
    json_path = out / "gpu_check.json"
    started = time.perf_counter()
    run_all_steps(run, results, json_path)
    results["seconds"] = round(time.perf_counter() - started, 2)
    write_json(results, json_path)
    print_summary(results, json_path)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke, CI)")
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument(
        "--backbones",
        nargs="+",
        choices=BACKBONES,
        default=list(BACKBONES),
        help="the backbones of the pipeline steps (default: all); the later steps use the first",
    )
    parser.add_argument(
        "--saliency",
        choices=("u2netp", "spectral"),
        help="saliency prior (data.saliency); default u2netp, spectral with --quick",
    )
    return parser.parse_args(argv)


def initial_results(run: Run, command: list[str]) -> dict[str, Any]:
    """Where and when it ran (the benches' shared facts), then what only a GPU check records."""
    import ray

    cuda = run.device.type == "cuda"
    return {
        **run_facts(command),
        "device": torch.cuda.get_device_name(run.device) if cuda else "cpu",
        "device_type": run.device.type,
        "bf16_supported": bool(torch.cuda.is_bf16_supported()) if cuda else None,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "ray": ray.__version__,
        "settings": run.settings,
        "notes": NOTES,
        "steps": {},
    }


def run_all_steps(run: Run, results: dict[str, Any], json_path: Path) -> None:
    """The steps in order; the Ray ones share one local Ray, shut down before the plain loops."""
    from raysseg.distributed.session import ray_session

    step = _stepper(results, json_path)
    step("data", lambda: make_data(run))
    configs: dict[str, Config] = {}
    # More logical CPUs than cores (at least 4): Ray Data reads never starve behind actor pools.
    with ray_session(num_cpus=max(4, os.cpu_count() or 1)):
        for backbone in run.backbones:
            outcome = step(f"pipeline_{backbone}", lambda b=backbone: run_one_pipeline(run, b))
            if outcome is not None:
                configs[backbone] = outcome.pop("_config")
        step("label_update", lambda: label_update(run, trained(configs)))
    step("predict", lambda: predict(run, trained(configs)))
    step("training", lambda: training_throughput(run))
    step("act_memory", lambda: act_memory(run))
    step("amp_labels", lambda: amp_label_agreement(run, trained(configs)))
    step("torch_compile", lambda: compile_check(run))


def _stepper(results: dict[str, Any], json_path: Path) -> Callable[..., dict | None]:
    def step(name: str, function: Callable[[], dict[str, Any]]) -> dict | None:
        """Run one step; record {"status", "seconds", ...}; a failure never stops the script."""
        print(f"\n===== {name}", flush=True)
        started = time.perf_counter()
        try:
            value = function()
            record = {"status": "ok", **{k: v for k, v in value.items() if not k.startswith("_")}}
        except Exception as failure:  # every step is its own try: record it and go on
            traceback.print_exc()
            value = None
            record = {
                "status": "failed",
                "error": f"{type(failure).__name__}: {failure}",
                "traceback": traceback.format_exc(),
            }
        record["seconds"] = round(time.perf_counter() - started, 2)
        results["steps"][name] = record
        write_json(results, json_path)  # after every step: a killed run keeps what it measured
        print(f"===== {name}: {record['status']} in {record['seconds']:.1f} s", flush=True)
        return value

    return step


def write_json(results: dict[str, Any], path: Path) -> None:
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(results, indent=2, default=_jsonable))
    temp.replace(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def print_summary(results: dict[str, Any], json_path: Path) -> None:
    print(f"\ndevice {results['device']}, torch {results['torch']}, ray {results['ray']}")
    for name, record in results["steps"].items():
        line = f"  {name:<32s} {record['status']:<7s} {record['seconds']:8.1f} s"
        if record["status"] == "failed":
            line += f"  {record['error'][:120]}"
        print(line)
    print(f"total {results['seconds']:.1f} s; written {json_path}")


# ----------------------------------------------------------------------------------------------
# Data and pipelines


def make_data(run: Run) -> dict[str, Any]:
    """The composite dataset under run.data_root (generated once per size; reruns reuse it)."""
    from raysseg.data.composite import fashion_mnist_dir, generate_composites

    try:
        fashion = fashion_mnist_dir()
    except FileNotFoundError as missing:
        raise FileNotFoundError(f"the composite dataset needs Fashion-MNIST: {missing}") from None
    settings = run.settings
    if not (run.data_root / "class_names.txt").is_file():  # written last by the generator
        generate_composites(
            str(run.data_root),
            n_train=settings["n_train"],
            n_val=settings["n_val"],
            size=settings["size"],
            seed=0,
            fashion_dir=str(fashion),
        )
    return {"root": str(run.data_root), "fashion_mnist": str(fashion)}


def resource_overrides(device: torch.device) -> dict[str, Any]:
    """GPU: one GPU Train worker; two half-GPU label actors with the CRFs in CPU tasks.

    CPU: the same placement ("tasks") with CPU actors, so the quick run covers the same code path.
    """
    if device.type == "cuda":
        return {
            "resources.use_gpu": True,
            "resources.gpus_per_worker": 1.0,
            "resources.cpus_per_worker": 2.0,
            "data.num_workers": 2,
            "resources.refine_actors": 2,
            "resources.refine_gpus_per_actor": 0.5,
            "resources.refine_cpus_per_actor": 1.0,
            "resources.refine_batch_size": 8,
            "resources.crf_cpus": 1.0,
            "resources.crf_placement": "tasks",
            "resources.progress_seconds": 5.0,
        }
    return {
        "resources.use_gpu": False,
        "resources.cpus_per_worker": 1.0,
        "data.num_workers": 0,
        "resources.refine_actors": 1,
        "resources.refine_gpus_per_actor": 0.0,
        "resources.refine_cpus_per_actor": 1.0,
        "resources.refine_batch_size": 4,
        "resources.crf_cpus": 1.0,
        "resources.crf_placement": "tasks",
        "resources.progress_seconds": 5.0,
    }


def pipeline_config(run: Run, backbone: str) -> Config:
    """The demo's config (raysseg.distributed.demo.demo_config) at this check's sizes."""
    from raysseg.distributed.demo import demo_config

    settings = run.settings
    extra = {
        "run_dir": str(run.out / f"pipeline_{backbone}"),
        "data.root": str(run.data_root),
        "data.saliency": settings["saliency"],
        "data.crop_size": settings["size"],
        "model.backbone": backbone,
        "model.output_stride": settings["output_stride"],
        "model.pretrained": PRETRAINED[backbone],
        "optim.amp": True,
        "optim.batch_size": settings["batch"],
        "optim.warmup_epochs": settings["warmup_epochs"],
        "optim.epochs": settings["epochs"],
        "stages.count": settings["stages"],
        "labels.cam_scales": settings["cam_scales"],
        "eval.scales": settings["eval_scales"],
        "eval.crf_iterations": settings["crf_iterations"],
        **resource_overrides(run.device),
    }
    return demo_config(str(run.out), quick=True, extra=extra)


def run_one_pipeline(run: Run, backbone: str) -> dict[str, Any]:
    """A fresh 2-stage pipeline run (an old run directory would be resumed, not rerun)."""
    from raysseg.distributed.pipeline import run_pipeline
    from raysseg.rundir.markers import read_result
    from raysseg.rundir.steps import plan_steps

    _require_data(run)
    config = pipeline_config(run, backbone)
    shutil.rmtree(config.run_dir, ignore_errors=True)
    summary = run_pipeline(config)
    steps = {}
    for planned in plan_steps(config, full_supervision=False):
        result = read_result(config.run_dir, planned)
        steps[planned.name] = {
            k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "epoch"
        }
    return {
        "backbone": backbone,
        "pretrained": PRETRAINED[backbone] or "packaged ImageNet weights",
        "run_dir": config.run_dir,
        "amp_dtype": str(resolve_amp_dtype(run.device, config.optim.amp, None)),
        "label_miou_per_stage": [row.get("label_miou") for row in summary["stages"]],
        "val_miou_per_stage": [row.get("val_miou") for row in summary["stages"]],
        "final_miou_ms_crf": summary.get("final_miou_ms_crf"),
        "steps": steps,
        "_config": config,
    }


def _require_data(run: Run) -> None:
    if not (run.data_root / "class_names.txt").is_file():
        raise RuntimeError(f"needs the dataset of step 'data' in {run.data_root}, which is missing")


def trained(configs: dict[str, Config]) -> Config:
    """The config of the first pipeline that finished (its final checkpoint serves later steps)."""
    if configs:
        return next(iter(configs.values()))  # insertion order: the order the pipelines ran
    raise RuntimeError("needs a checkpoint of a pipeline step, and every pipeline step failed")


def final_checkpoint(config: Config) -> str:
    from raysseg.rundir.steps import step_checkpoint, train_step

    return step_checkpoint(config.run_dir, train_step(config.stages.count - 1))


# ----------------------------------------------------------------------------------------------
# Label update with GPU actors and CPU CRF tasks


class GpuSampler:
    """Samples the GPU's utilisation (NVML: % of time a kernel ran) in a thread while work runs."""

    def __init__(self, device: torch.device, interval: float = 0.2) -> None:
        self.device = device
        self.interval = interval
        self.samples: list[float] = []
        self.reason = ""
        self.read = self._reader()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)

    def _reader(self) -> Callable[[], float] | None:
        if self.device.type != "cuda":
            self.reason = "device is cpu"
            return None
        try:
            torch.cuda.utilization(self.device)  # needs pynvml (nvidia-ml-py)
            return lambda: float(torch.cuda.utilization(self.device))
        except Exception as failure:  # ModuleNotFoundError without pynvml, NVML errors
            self.reason = f"torch.cuda.utilization: {type(failure).__name__}: {failure}"
        return self._ray_pynvml_reader()

    def _ray_pynvml_reader(self) -> Callable[[], float] | None:
        # Ray vendors pynvml for its GPU detection: a fallback when nvidia-ml-py is not installed.
        try:
            from ray._private.thirdparty import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self._nvml_index())
            pynvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception as failure:
            self.reason += f"; ray's vendored pynvml: {type(failure).__name__}: {failure}"
            return None
        self.reason += "; read through ray's vendored pynvml instead"
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _nvml_index(self) -> int:
        # NVML numbers every GPU of the machine; torch only the visible ones.
        index = self.device.index or 0
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        return int(visible[index]) if index < len(visible) and visible[index].isdigit() else index

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self.read())
            except Exception as failure:  # keep what was sampled; say why it stopped
                self.reason += f"; sampling stopped: {type(failure).__name__}: {failure}"
                return

    def __enter__(self) -> GpuSampler:
        if self.read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        if self.read is None or not self.samples:
            return {"available": False, "reason": self.reason or "no samples taken"}
        return {
            "available": True,
            "samples": len(self.samples),
            "interval_s": self.interval,
            "busy_fraction": statistics.fmean(self.samples) / 100.0,
            "nonzero_fraction": sum(s > 0 for s in self.samples) / len(self.samples),
            "max_util_percent": max(self.samples),
            "note": (
                "NVML utilisation: share of time a kernel ran, device-wide; start-up and "
                "shutdown of the actors are inside the window"
                + (f" ({self.reason})" if self.reason else "")
            ),
        }


def label_update(run: Run, config: Config) -> dict[str, Any]:
    """One timed refine update of the training images into a fresh folder, GPU busy sampled."""
    import ray

    from raysseg.distributed.refine import update_labels

    folder = run.out / "label_update"
    shutil.rmtree(folder, ignore_errors=True)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    with GpuSampler(run.device) as sampler:
        summary = update_labels(
            config,
            mode="refine",
            checkpoint=final_checkpoint(config),
            in_manifest=layout.dataset_manifest(config.run_dir, "train"),
            labels_root=str(folder / "labels"),
            out_manifest=str(folder / "manifest"),
            errors_path=str(folder / "errors"),
            # The pipeline's cache: the prior saliency is not recomputed, as in a real stage.
            saliency_cache=layout.saliency_cache(config.run_dir),
            name="gpu_check labels",
            log=log,
        )
    if summary["errors"]:
        raise RuntimeError(f"{summary['errors']} image(s) failed: {summary.get('first_error')}")
    steady = _last_rate(lines)
    resources = config.resources
    return {
        "backbone": config.model.backbone,
        "images": summary["images"],
        "images_per_s": summary["images"] / summary["seconds"],
        "images_per_s_note": "end to end: actor start-up and checkpoint loads included",
        "steady_images_per_s": steady,
        "progress_line": lines[-1] if lines else "",
        "refine_actors": resources.refine_actors,
        "refine_gpus_per_actor": resources.refine_gpus_per_actor,
        "crf_placement": resources.crf_placement,
        "cluster_gpus": ray.cluster_resources().get("GPU", 0.0),
        "worker_peak_private_mb": summary.get("worker_peak_private_mb"),
        "gpu_busy": sampler.summary(),
    }


def _last_rate(lines: list[str]) -> float | None:
    """The ProgressMeter's rate (counted from the first finished image) of the last line."""
    for line in reversed(lines):
        match = re.search(r"([0-9.]+) images/s", line)
        if match:
            return float(match.group(1))
    return None


# ----------------------------------------------------------------------------------------------
# Predict


def predict(run: Run, config: Config) -> dict[str, Any]:
    """`predict_paths` (raysseg predict, on the GPU when visible) on val images, then the same
    images with `predict_label` on the CPU: seconds per image on each, pixel agreement."""
    from raysseg.predict import predict_label, predict_paths

    records = list(
        itertools.islice(voc_records(str(run.data_root), "val"), run.settings["predict_images"])
    )
    if not records:
        raise RuntimeError(f"no val images in {run.data_root}")
    checkpoint = final_checkpoint(config)
    out_dir = run.out / "predict"
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    written = predict_paths(config, checkpoint, [r.image_uri for r in records], str(out_dir))
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "images": written,
        "predict_paths_device": "cuda" if torch.cuda.is_available() else "cpu",
        "predict_paths_s_per_image": seconds / max(1, written),
    }
    if run.device.type != "cuda":
        result["cpu_pass"] = "skipped: predict_paths already ran on the cpu"
        return result
    model = restore_model(load_checkpoint(checkpoint)).eval()  # on the CPU
    agree, pixels, cpu_seconds = 0, 0, 0.0
    for record in records:
        image = io.read_image(record.image_uri)
        started = time.perf_counter()
        label = predict_label(model, image, config, multiscale=True, crf=True)
        cpu_seconds += time.perf_counter() - started
        written_label = io.read_label(str(out_dir / f"{Path(record.image_uri).stem}.png"))
        agree += int((label == written_label).sum())
        pixels += label.size
    result.update(
        cpu_s_per_image=cpu_seconds / len(records),
        device_vs_cpu_pixel_agreement=agree / pixels,
    )
    return result


# ----------------------------------------------------------------------------------------------
# Training throughput: fp32 against AMP (and AMP + channels_last) in the plain epoch function


def gt_manifest(data_root: Path, folder: Path) -> str:
    """Training rows whose pseudo labels are the GT masks (saliency = foreground): the training
    cost does not depend on the labels, and no pipeline step is needed first."""
    rows = []
    for record in voc_records(str(data_root), "train"):
        mask = io.read_label(record.mask_uri)
        sal_uri = str(folder / "gt_saliency" / f"{record.image_id}.png")
        foreground = ((mask > 0) & (mask != 255)).astype(np.float32)
        io.write_png_atomic(sal_uri, io.saliency_to_uint8(foreground))
        rows.append(
            dataclasses.replace(record, seg_label_uri=record.mask_uri, sal_label_uri=sal_uri)
        )
    path = str(folder / "manifest")
    write_manifest(rows, path)
    return path


def training_batches(config: Config, manifest: str, count: int) -> list[dict[str, Any]]:
    """`count` collated training batches, decoded once: the timed loop measures the model, not
    the JPEG decoding of a one-process loader."""
    from raysseg.data.dataset import build_stage_dataset, build_train_loader

    records = ManifestRows(manifest)
    dataset = build_stage_dataset(records, "train", config.data, config.model.num_classes, 0)
    loader, sampler = build_train_loader(
        dataset,
        records.group_sizes(),
        batch_size=config.optim.batch_size,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
    )
    batches: list[dict[str, Any]] = []
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        batches.extend(itertools.islice(loader, count - len(batches)))
        if len(batches) >= count or epoch > count:
            return batches


def training_throughput(run: Run) -> dict[str, Any]:
    _require_data(run)
    settings = run.settings
    folder = run.out / "training"
    shutil.rmtree(folder, ignore_errors=True)
    config = with_overrides(
        pipeline_config(run, settings["train_backbone"]), {"model.pretrained": "none"}
    )
    manifest = gt_manifest(run.data_root, folder)
    batches = training_batches(
        config, manifest, settings["train_warm_steps"] + settings["train_steps"]
    )
    variants = {"fp32": (False, False), "amp": (True, False), "amp_channels_last": (True, True)}
    result: dict[str, Any] = {
        "backbone": settings["train_backbone"],
        "output_stride": config.model.output_stride,
        "crop": config.data.crop_size,
        "batch": config.optim.batch_size,
        "steps": settings["train_steps"],
    }
    for name, (amp, channels_last) in variants.items():
        result[name] = train_variant(config, batches, run.device, amp, channels_last, settings)
    result["amp_speedup"] = result["amp"]["images_per_s"] / result["fp32"]["images_per_s"]
    return result


def train_variant(
    config: Config,
    batches: list[dict[str, Any]],
    device: torch.device,
    amp: bool,
    channels_last: bool,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """images/s of `train_one_epoch` after a few untimed warm-up steps (allocator, cuDNN)."""
    from raysseg.engine.loop import train_one_epoch
    from raysseg.engine.optim import build_optimizer
    from raysseg.model.network import build_model

    torch.manual_seed(0)
    model = build_model(config.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batches = [_channels_last_batch(b) for b in batches]
    optimizer = build_optimizer(model, config.optim)
    scaler = make_grad_scaler(device, amp)
    warm, timed = batches[: settings["train_warm_steps"]], batches[settings["train_warm_steps"] :]

    def epoch(loader: list[dict[str, Any]]) -> dict[str, float]:
        # mode "train" (the default): every head, on the GT-derived labels.
        return train_one_epoch(
            model, optimizer, None, loader, device, config.loss, scaler=scaler, amp=amp
        )

    epoch(warm)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    metrics = epoch(timed)
    dtype = resolve_amp_dtype(device, amp, None)
    record = {
        "images_per_s": metrics["images_per_s"],
        "images": metrics["images"],
        "loss": metrics.get("total"),
        "autocast_dtype": str(dtype) if dtype else "float32",
        "channels_last": channels_last,
    }
    if amp and dtype is None:
        record["note"] = "amp: CUDA only (resolve_amp_dtype returns None on CPU: this ran in fp32)"
    if device.type == "cuda":
        record["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return record


def _channels_last_batch(batch: dict[str, Any]) -> dict[str, Any]:
    # .to(device) keeps the strides, so the images reach the GPU in channels_last already.
    return {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}


# ----------------------------------------------------------------------------------------------
# A_CT memory at full resolution, whole against chunked


def act_memory(run: Run) -> dict[str, Any]:
    width, height = run.settings["memory_size"]
    budget_mb = run.settings["memory_budget_mb"]
    if run.device.type == "cuda":
        return cuda_act_memory(run.device, width, height, budget_mb)
    return cpu_act_memory(width, height, budget_mb)


def cuda_act_memory(
    device: torch.device, width: int, height: int, budget_mb: int
) -> dict[str, Any]:
    """torch.cuda.max_memory_allocated of forward(heads="all") + CAM propagation, as the label
    update runs it: no grad, eval, resnet50 at OS 8 with 21 classes (random weights: the cost
    does not depend on them), in fp32 and under the update's autocast."""
    from raysseg.model.network import build_model

    torch.manual_seed(0)
    config = ModelConfig(
        backbone="resnet50",
        output_stride=8,
        pretrained="none",
        num_classes=21,
        affinity_memory_mb=budget_mb,
    )
    model = build_model(config).to(device).eval().to(memory_format=torch.channels_last)
    image = torch.randn(1, 3, height, width, device=device)
    dtype = resolve_amp_dtype(device, True, None)
    result: dict[str, Any] = {
        "image": f"{width}x{height}",
        "backbone": "resnet50 (OS 8)",
        "budget_mb": budget_mb,
        "method": "torch.cuda.max_memory_allocated above what was allocated before the forward",
    }
    for precision, autocast_dtype in (("fp32", None), ("amp", dtype)):
        for case in ("whole", "chunked"):
            result[f"{precision}_{case}"] = _cuda_forward_peak(
                model, image, device, autocast_dtype, whole=case == "whole"
            )
    result["chunked_over_whole_fp32"] = (
        result["fp32_chunked"]["peak_mib"] / result["fp32_whole"]["peak_mib"]
    )
    return result


def _cuda_forward_peak(
    model: torch.nn.Module,
    image: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    whole: bool,
) -> dict[str, Any]:
    with torch.inference_mode(), autocast_for(device, dtype):
        # Untimed, unmeasured: cuDNN / allocator set-up at this size, and N = h * w of its features.
        positions = int(np.prod(model.backbone(image).shape[2:]))
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        outputs = model(image, heads="all", chunk_rows=positions if whole else None)
        model.propagate(
            outputs.affinity, outputs.cam[:, :3].relu(), chunk_rows=positions if whole else None
        )
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        rows = positions if whole else model._chunk_rows(outputs.affinity, None)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del outputs
    return {
        "peak_mib": peak / 2**20,
        "positions": positions,
        "chunk_rows": rows,
        "seconds": seconds,
        "autocast_dtype": str(dtype) if dtype else "float32",
    }


def cpu_act_memory(width: int, height: int, budget_mb: int) -> dict[str, Any]:
    """bench/memory.py's measurement: peak RSS of a fresh process per case (small backbone)."""
    cases = {"chunked": budget_mb, "whole": 10**7}  # a budget so large that nothing is chunked
    result: dict[str, Any] = {
        "image": f"{width}x{height}",
        "backbone": "small (bench/memory.py --case)",
        "budget_mb": budget_mb,
        "method": "VmHWM growth of a fresh process; torch.cuda peak memory needs CUDA",
    }
    for case, budget_mb in cases.items():
        result[f"fp32_{case}"] = memory.run_case(width, height, budget_mb)
    return result


# ----------------------------------------------------------------------------------------------
# bf16 against fp32 pseudo labels


def amp_label_agreement(run: Run, config: Config) -> dict[str, Any]:
    """The same checkpoint and images through the update's model step in fp32 and under autocast,
    each finished by the same CRF + fusion; pixel agreement and label mIoU against the GT masks."""
    from raysseg.engine.metrics import LabelQuality
    from raysseg.labels.saliency import build_saliency
    from raysseg.labels.update import finalize_labels, infer_label_maps

    device = run.device
    dtype = resolve_amp_dtype(device, True, None)
    note = ""
    if dtype is None:
        # raysseg never autocasts on CPU; bf16 CPU autocast still shows what bf16 does to labels.
        dtype = torch.bfloat16
        note = (
            "amp: CUDA only in raysseg (resolve_amp_dtype -> None on CPU); this compares CPU "
            "bf16 autocast"
        )
    model = restore_model(load_checkpoint(final_checkpoint(config))).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # as the label-update actors run it
    prior = build_saliency(config.data, cache_dir=layout.saliency_cache(config.run_dir))
    records = _records_with_masks(config, run.settings["agreement_images"])
    # As the label-update actors call it (labels.propagate_cams is a newer, optional setting).
    propagate = getattr(config.labels, "propagate_cams", True)
    options = {} if propagate else {"propagate_cams": False}
    classes = config.model.num_classes
    quality = {"fp32": LabelQuality(classes), "amp": LabelQuality(classes)}
    agree = pixels = 0
    cam_diff = sal_diff = 0.0
    for record in records:
        image = io.read_image(record.image_uri)
        tensor = normalize(image).to(device)
        maps = {"fp32": infer_label_maps(model, tensor, record.labels, **options)}
        with autocast_for(device, dtype):
            maps["amp"] = infer_label_maps(model, tensor, record.labels, **options)
        saliency = prior(image, record.image_id)
        labels = {
            name: finalize_labels(
                image, m["cams"], m["sal_prob"], saliency, record.labels, config.labels
            )[0]
            for name, m in maps.items()
        }
        gt = io.read_label(record.mask_uri)
        for name, label in labels.items():
            quality[name].update(label, gt)
        agree += int((labels["fp32"] == labels["amp"]).sum())
        pixels += gt.size
        cam_diff = max(
            cam_diff, float(np.abs(maps["fp32"]["cams"] - maps["amp"]["cams"]).max(initial=0))
        )
        sal_diff = max(
            sal_diff, float(np.abs(maps["fp32"]["sal_prob"] - maps["amp"]["sal_prob"]).max())
        )
    fp32, amp = quality["fp32"].compute(), quality["amp"].compute()
    return {
        "backbone": config.model.backbone,
        "images": len(records),
        "autocast_dtype": str(dtype),
        "note": note,
        "pixel_agreement": agree / pixels,
        "label_miou_fp32": fp32["miou"],
        "label_miou_amp": amp["miou"],
        "label_miou_difference": amp["miou"] - fp32["miou"],
        "max_abs_cam_difference": cam_diff,
        "max_abs_saliency_difference": sal_diff,
    }


def _records_with_masks(config: Config, count: int) -> list[Any]:
    manifest = layout.dataset_manifest(config.run_dir, "train")
    rows = (r for r in read_manifest(manifest) if r.mask_uri and r.labels)
    records = list(itertools.islice(rows, count))
    if not records:
        raise RuntimeError(f"no training image with a GT mask and labels in {manifest}")
    return records


# ----------------------------------------------------------------------------------------------
# torch.compile


def compile_check(run: Run) -> dict[str, Any]:
    """Eager against torch.compile'd eval forward (heads="all"); speed-up or the reason it failed.

    A compile failure is a finding, not a failed step: it is recorded under "compile" with its
    traceback, so the step's status says whether the check itself ran.
    """
    from raysseg.model.network import build_model

    settings = run.settings
    device = run.device
    size = settings["compile_size"]
    torch.manual_seed(0)
    backbone = settings["compile_backbone"]
    config = ModelConfig(
        backbone=backbone,
        output_stride=8,
        pretrained="none" if backbone != "small" else "",
        num_classes=21,
        small_width=16,
    )
    model = build_model(config).to(device).eval()
    image = torch.randn(1, 3, size, size, device=device)
    eager_s, eager_out = _timed_forward(model, image, device, settings["compile_runs"])
    backend = "inductor" if device.type == "cuda" else settings["cpu_compile_backend"]
    result: dict[str, Any] = {
        "backbone": backbone,
        "image": f"{size}x{size}",
        "backend": backend,
        "eager_s": eager_s,
    }
    try:
        compiled = torch.compile(model, backend=backend)
        started = time.perf_counter()
        _forward(compiled, image, device)
        result["compile_s"] = time.perf_counter() - started
        compiled_s, compiled_out = _timed_forward(compiled, image, device, settings["compile_runs"])
    except Exception as failure:  # the finding: why torch.compile does not work here
        traceback.print_exc()
        result["compile"] = {
            "status": "failed",
            "error": f"{type(failure).__name__}: {failure}"[:2000],
            "traceback": traceback.format_exc()[-6000:],
        }
        return result
    result.update(
        compile={"status": "ok"},
        compiled_s=compiled_s,
        speedup=eager_s / compiled_s,
        max_abs_difference=float((eager_out - compiled_out).abs().max()),
    )
    return result


def _forward(model: torch.nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        out = model(image, heads="all").seg_refined.float()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def _timed_forward(
    model: torch.nn.Module, image: torch.Tensor, device: torch.device, runs: int
) -> tuple[float, torch.Tensor]:
    """Median seconds of `runs` forwards after one untimed one, and the last output."""
    out = _forward(model, image, device)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        out = _forward(model, image, device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


if __name__ == "__main__":
    sys.exit(main())
