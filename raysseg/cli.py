"""`raysseg` command line. Ray is imported only inside the subcommands that run on Ray."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from raysseg.config import PRESETS, Config, ConfigError, describe_keys, dump_yaml, load_config
from raysseg.errors import InputError, find_input_error


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (sections model, data, optim, ...)")
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=args.overrides, preset=args.preset)


def _load_for_ray(args: argparse.Namespace) -> Config:
    """The config of a command that runs on Ray, checked before it joins or starts a cluster.

    A job with a wrong config must fail in seconds with the key named, not after the cluster has
    scaled up GPU nodes. Only cheap checks: a local data.root must exist where the driver runs
    (the job's working directory for relative paths); URIs are left to the run, as checking them
    needs credentials and network.
    """
    config = _load(args)
    root = config.data.root
    if not root:
        raise ConfigError("config key 'data.root': not set (the dataset folder, a path or URI)")
    if "://" not in root and not os.path.isdir(root):
        raise ConfigError(
            f"config key 'data.root': '{root}' is not a directory (working directory: {os.getcwd()})"
        )
    return config


def _cmd_config(args: argparse.Namespace) -> int:
    if args.keys:
        for key, type_name, default in describe_keys():
            print(f"{key:34s} {type_name:6s} {default!r}")
        return 0
    print(dump_yaml(_load(args)), end="")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from raysseg.data.synth import generate_synthetic

    generate_synthetic(args.out, n_train=args.n, n_val=args.n_val, size=args.size, seed=args.seed)
    print(f"wrote a synthetic VOC-layout dataset to {args.out} ({args.n} train, {args.n_val} val)")
    return 0


def _cmd_composite(args: argparse.Namespace) -> int:
    from raysseg.data.composite import generate_composites

    generate_composites(args.out, n_train=args.n, n_val=args.n_val, size=args.size, seed=args.seed)
    print(
        f"wrote a real-pixel VOC-layout dataset (Fashion-MNIST products on photos) to {args.out} "
        f"({args.n} train, {args.n_val} val)"
    )
    return 0


def _load_for_training(args: argparse.Namespace) -> Config:
    """`_load_for_ray` plus the weights choice: a run on random weights only when asked for."""
    from raysseg.model.weights import check_pretrained

    config = _load_for_ray(args)
    check_pretrained(config.model)
    return config


def _cmd_pipeline(args: argparse.Namespace) -> int:
    config = _load_for_training(args)  # before importing Ray: config errors come first
    from raysseg.distributed.pipeline import run_pipeline
    from raysseg.distributed.session import ray_session

    with ray_session(address=args.address, num_cpus=args.num_cpus, verbose=args.verbose):
        run_pipeline(config, full_supervision=args.full_supervision)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    config = _load_for_training(args)  # before importing Ray: config errors come first
    from raysseg.distributed.pipeline import run_single_step
    from raysseg.distributed.session import ray_session
    from raysseg.rundir.steps import train_step

    with ray_session(address=args.address, num_cpus=args.num_cpus, verbose=args.verbose):
        run_single_step(config, train_step(args.stage))
    return 0


def _cmd_refine(args: argparse.Namespace) -> int:
    config = _load_for_ray(args)  # before importing Ray: config errors come first
    from raysseg.distributed.pipeline import run_single_step
    from raysseg.distributed.session import ray_session
    from raysseg.rundir.steps import refine_step

    with ray_session(address=args.address, num_cpus=args.num_cpus, verbose=args.verbose):
        run_single_step(config, refine_step(args.stage))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from raysseg.tuning.space import load_space

    # Config and space are checked before Ray starts: a wrong key fails in seconds, no trial runs.
    config = _load_for_training(args)
    space = load_space(args.space, config)
    if args.trials < 1:
        raise ConfigError(f"--trials: need at least 1, got {args.trials}")
    from raysseg.distributed.session import ray_session
    from raysseg.distributed.tune import run_campaign

    with ray_session(address=args.address, num_cpus=args.num_cpus, verbose=args.verbose):
        run_campaign(config, space, trials=args.trials)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    config = _load_for_ray(args)  # before importing Ray: config errors come first
    from raysseg.distributed.evaluate import evaluate_checkpoint
    from raysseg.distributed.session import ray_session

    with ray_session(address=args.address, num_cpus=args.num_cpus, verbose=args.verbose):
        result = evaluate_checkpoint(
            config, args.checkpoint, multiscale=not args.single_scale, crf=not args.no_crf
        )
    print(result["table"])
    print(f"mIoU {100 * result['miou']:.2f}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from raysseg.predict import IN_PROCESS_MAX_IMAGES, plan_items, predict_local

    config = _load(args)  # no data.root: predict reads only its inputs
    items = plan_items(args.inputs, args.out)  # missing inputs and name clashes fail here
    crf = config.eval.crf and not args.no_crf
    ray_module = sys.modules.get("ray")  # looked up, not imported: a small run never loads Ray
    joining = (
        args.address is not None
        or "RAY_ADDRESS" in os.environ
        or (ray_module is not None and ray_module.is_initialized())
    )
    if len(items) <= IN_PROCESS_MAX_IMAGES and not joining:
        summary = predict_local(config, args.checkpoint, items, args.out, crf)
    else:
        from raysseg.distributed.predict_job import predict_dataset
        from raysseg.distributed.session import ray_session

        with ray_session(address=args.address, num_cpus=args.num_cpus, verbose=args.verbose):
            summary = predict_dataset(config, args.checkpoint, items, args.out, crf)
    shown = 20  # error lines printed; each names its file
    for error in summary.errors[:shown]:
        print(f"raysseg predict: {error}", file=sys.stderr)
    if len(summary.errors) > shown:
        print(f"raysseg predict: ... and {len(summary.errors) - shown} more", file=sys.stderr)
    print(summary.line(args.out))
    return 1 if summary.errors else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from raysseg.distributed.demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick, num_cpus=args.num_cpus, verbose=args.verbose)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from collections import Counter

    from raysseg import storage
    from raysseg.verify import verify_run

    if not storage.is_dir(args.run_dir):
        print(f"raysseg verify: run directory '{args.run_dir}' does not exist", file=sys.stderr)
        return 2
    tally: Counter = Counter()
    problems = 0
    for problem in verify_run(args.run_dir, tally):
        print(problem)
        problems += 1
    checked = ", ".join(f"{count} {what}" for what, count in sorted(tally.items()))
    print(f"verify {args.run_dir}: {problems} problem(s); checked {checked or 'nothing'}")
    return 1 if problems else 0


def _cmd_weights_inspect(args: argparse.Namespace) -> int:
    from raysseg.model.builder import inspect_weights
    from raysseg.model.weights import WeightsError, describe_inspection

    try:
        weights, match = inspect_weights(
            args.file, args.backbone, output_stride=args.output_stride, small_width=args.small_width
        )
    except FileNotFoundError as error:
        print(f"raysseg weights inspect: {error}", file=sys.stderr)
        return 2
    except WeightsError as error:  # unreadable, corrupt or truncated: a load would fail too
        print(f"raysseg weights inspect: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a backbone / output stride combination that does not exist
        print(f"raysseg weights inspect: {error}", file=sys.stderr)
        return 2
    print(describe_inspection(weights, match))
    return 0 if match.ok else 1


def _add_dataset_arguments(parser: argparse.ArgumentParser, n: int, n_val: int, size: int) -> None:
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=n, help="training images")
    parser.add_argument("--n-val", type=int, default=n_val, help="validation images")
    parser.add_argument("--size", type=int, default=size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="Ray address (default: auto / local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's own output (workers, Ray Data's progress dumps) on the console",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysseg",
        description="AuxSegNet weakly supervised semantic segmentation on Ray.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an input error too"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="print the resolved config (or all keys)")
    _add_config_arguments(config)
    config.add_argument("--keys", action="store_true", help="list every key, type and default")
    config.set_defaults(run=_cmd_config)

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write a synthetic VOC-layout dataset")
    _add_dataset_arguments(synth, n=400, n_val=100, size=96)
    synth.set_defaults(run=_cmd_synth)
    composite = data_commands.add_parser(
        "composite", help="write the demo's real-pixel VOC-layout dataset (no download)"
    )
    _add_dataset_arguments(composite, n=240, n_val=60, size=128)
    composite.set_defaults(run=_cmd_composite)

    pipeline = commands.add_parser("pipeline", help="warm-up + all stages; rerun to resume")
    _add_config_arguments(pipeline)
    _add_ray_arguments(pipeline)
    pipeline.add_argument(
        "--full-supervision",
        action="store_true",
        help="baseline: train on the ground-truth masks instead of pseudo labels",
    )
    pipeline.set_defaults(run=_cmd_pipeline)

    for name, handler, text in (
        ("train", _cmd_train, "one training stage of a run (resumes from its checkpoint)"),
        ("refine", _cmd_refine, "the label update after one stage"),
    ):
        sub = commands.add_parser(name, help=text)
        _add_config_arguments(sub)
        _add_ray_arguments(sub)
        sub.add_argument("--stage", type=int, required=True)
        sub.set_defaults(run=handler)

    tune = commands.add_parser(
        "tune", help="hyper-parameter campaign (Ray Tune + Optuna); rerun to resume"
    )
    _add_config_arguments(tune)
    _add_ray_arguments(tune)
    tune.add_argument("--space", required=True, help="search space YAML (jobs/tune_space.yaml)")
    tune.add_argument("--trials", type=int, required=True, help="trials in all (finished count)")
    tune.set_defaults(run=_cmd_tune)

    evaluate = commands.add_parser("evaluate", help="val mIoU of a checkpoint (multi-scale + CRF)")
    _add_config_arguments(evaluate)
    _add_ray_arguments(evaluate)
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--single-scale", action="store_true")
    evaluate.add_argument("--no-crf", action="store_true")
    evaluate.set_defaults(run=_cmd_evaluate)

    predict = commands.add_parser(
        "predict", help="images, folders or URI prefixes -> palette PNGs + overlays (Ray Data)"
    )
    _add_config_arguments(predict)
    _add_ray_arguments(predict)
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument(
        "--inputs", nargs="+", required=True, help="image files, folders, URI prefixes"
    )
    predict.add_argument("--out", required=True, help="output folder (path or URI)")
    predict.add_argument("--no-crf", action="store_true")
    predict.set_defaults(run=_cmd_predict)

    verify = commands.add_parser(
        "verify", help="check a run directory: labels, sizes, ranges, checkpoints, config"
    )
    verify.add_argument("run_dir", help="the run directory (path or URI)")
    verify.set_defaults(run=_cmd_verify)

    weights = commands.add_parser("weights", help="backbone weights files")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    inspect = weights_commands.add_parser(
        "inspect", help="how a weights file fits a backbone: matched, missing, unexpected keys"
    )
    inspect.add_argument("file", help="weights file (path or URI): .pth / .pt / .params")
    # Names are checked by build_backbone (exit 2 naming the known ones): one list of them.
    inspect.add_argument("--backbone", required=True, help="resnet38d, resnet50, small, ...")
    inspect.add_argument("--output-stride", type=int, default=8, choices=(8, 16))
    inspect.add_argument("--small-width", type=int, default=64, help="width of backbone 'small'")
    inspect.set_defaults(run=_cmd_weights_inspect)

    demo = commands.add_parser("demo", help="real-pixel data, local Ray, 2-stage pipeline, report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    demo.add_argument("--num-cpus", type=int, default=None)
    demo.add_argument("--verbose", action="store_true", help="also print Ray's own output")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as error:
        # Bad input (config, data, weights, checkpoint, resources) is one line naming what to
        # fix, also when a Ray worker raised it; anything else keeps its traceback.
        found = find_input_error(error)
        if found is None or args.debug:
            raise
        print(f"raysseg: {_error_kind(found)}: {found}", file=sys.stderr)
        print("raysseg: (raysseg --debug ... shows the traceback)", file=sys.stderr)
        return 2


def _error_kind(error: InputError) -> str:
    """'ConfigError' -> 'config error', 'DataError' -> 'data error', ..."""
    name = type(error).__name__.removesuffix("Error")
    return f"{name.lower()} error"


if __name__ == "__main__":
    sys.exit(main())
