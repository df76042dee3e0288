"""The ``patchwatch`` command."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from patchwatch.flows.defaults import (DEFAULT_NAME, DEFAULT_REFIT_CRON, DEFAULT_SCORE_CRON, HOLDOUT_FRACTION,
                            THRESHOLD_QUANTILE)

def _add_model_options(parser: argparse.ArgumentParser) -> None:
    # the settings module, not the model's (torch: seconds), so that --help and a fit with nothing
    # new stay quick
    from patchwatch.anomaly.settings import (CONFIGS, DEFAULT_BACKBONE, DEFAULT_FEATURES, FeatureConfig,
                                             PatchCoreConfig)

    defaults = FeatureConfig()
    parser.add_argument("--detector", choices=sorted(CONFIGS), default=None,
                        help="anomaly detector (default: the one --auto chooses; patchcore with --no-auto)")
    parser.add_argument("--input-scale", type=float, default=None,
                        help=f"every image is resized by this factor, aspect kept (default {defaults.input_scale})")
    parser.add_argument("--context-scales", default=None,
                        help="more input scales whose features are added to each patch, comma-separated; "
                             "'' for none (default: "
                             + "; ".join(f"{name} {','.join(map(str, values.get('context_scales', ()))) or 'none'}"
                                         for name, values in DEFAULT_FEATURES.items()) + ")")
    parser.add_argument("--embed-dim", type=int, default=None,
                        help=f"patch vector length (default {defaults.embed_dim})")
    parser.add_argument("--square-side", type=int, default=None,
                        help="resize every image to this square instead (PaDiM needs one size for every "
                             "image; by default it takes the nominal images' median area, within 320x320 to "
                             "512x512, at their shared aspect, else square)")
    parser.add_argument("--backbone", default=None,
                        help=f"timm model name (default {DEFAULT_BACKBONE}, offline); others need the model hub")
    parser.add_argument("--layers", default=None,
                        help=f"timm feature stages to use, comma-separated (default {','.join(map(str, defaults.layers))})")
    parser.add_argument("--mirrors", default=None, metavar="h,v,hv",
                        help="mirror images the fit adds to each nominal image, comma-separated: h (left-right), "
                             "v (up-down), hv (both); '' for none. Only for images that look the same mirrored "
                             "(a texture, not an aligned part) (default: those --auto finds the images allow; "
                             "none with --no-auto)")
    parser.add_argument("--coreset-ratio", type=float, default=None,
                        help=f"PatchCore: fraction of the patch bank kept as memory (default {PatchCoreConfig().coreset_ratio})")
    parser.add_argument("--auto", action=argparse.BooleanOptionalAction, default=None,
                        help="choose the detector and feature settings from the nominal images themselves: "
                             "candidate configurations are compared on held-out images with synthetic defects "
                             "pasted in (a root's first fit; later fits keep the choice). The default when no "
                             "model option is given (unless $PATCHWATCH_AUTO=0); --no-auto: PatchCore's fixed "
                             "defaults")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32, help="images per work batch (default %(default)s)")
    parser.add_argument("--dask-address", default=None,
                        help="tcp://HOST:PORT of an existing Dask scheduler (default: a local cluster)")
    parser.add_argument("--workers", type=int, default=None, help="local Dask workers (default: one per core)")
    parser.add_argument("--allow-sources", default=None, metavar="PREFIX[,PREFIX]",
                        help="locations a split CSV may name besides its own folder (bucket), e.g. "
                             "/data/shared,s3://other-bucket/images; http(s):// and file:// need a prefix too")


def _add_runtime_option(parser: argparse.ArgumentParser) -> None:
    # choices spelled out here: anomaly.runtime imports torch, which the light commands avoid
    parser.add_argument("--runtime", choices=("auto", "torch", "onnxruntime", "openvino"), default=None,
                        help="what runs the backbone: auto (ONNX Runtime on CPUs: the backbone 2.2x+ faster than torch "
                             "there, torch on GPUs), torch, onnxruntime, openvino (pip install openvino). "
                             "Scores agree within 1e-4 whichever fitted or scores the model "
                             "(default: $PATCHWATCH_RUNTIME, else auto)")
    parser.add_argument("--device", default=None, metavar="auto|cpu|cuda[:N]",
                        help="where the backbone runs: auto (the first GPU torch sees, else the CPU), cpu, "
                             "cuda, cuda:N; on a GPU images of one size share forward passes, in full float32 "
                             "(default: $PATCHWATCH_DEVICE, else auto)")


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE.toml",
                        help="fit settings from a TOML file, keys named as the options (detector = \"padim\", "
                             "input_scale = 0.5, holdout_fraction = 0.1, batch_size = 16, runtime = \"torch\", ...); "
                             "options given here override it. Recorded in the version's manifest")


def _add_threshold_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--holdout-fraction", type=float, default=HOLDOUT_FRACTION,
                        help="share of nominal images held out of the memory to set the threshold (default %(default)s)")
    parser.add_argument("--threshold-quantile", type=float, default=THRESHOLD_QUANTILE,
                        help="the threshold is this quantile of the held-out images' scores (default %(default)s)")


MODEL_OPTIONS = ("backbone", "layers", "input_scale", "square_side", "embed_dim", "context_scales", "mirrors",
                 "coreset_ratio")


def auto_chosen(args) -> bool:
    """Whether this fit chooses its configuration with --auto: when asked, and by default when no
    model option is given (a user with new data gets the configuration that suits it, not the one
    tuned on MTD); never with explicit model options, which --auto refuses."""
    given = [f"--{name.replace('_', '-')}" for name in MODEL_OPTIONS if getattr(args, name, None) is not None]
    if getattr(args, "detector", None) is not None:
        given.insert(0, "--detector")
    asked = getattr(args, "auto", None)
    if asked is True and given:
        raise ValueError(f"--auto chooses the detector and feature settings itself: drop {', '.join(given)} or --auto")
    if asked is None:
        return not given and os.environ.get("PATCHWATCH_AUTO", "1") != "0"
    return bool(asked)


def _configs(args) -> tuple[dict, dict]:
    from patchwatch.anomaly.settings import PatchCoreConfig, default_features, detector_config

    def listed(text, kind):  # an option's comma-separated values
        return None if text is None else tuple(kind(x) for x in text.split(",") if x.strip())

    if auto_chosen(args):
        return None, None

    detector_name = args.detector or "patchcore"
    features = default_features(detector_name, backbone=args.backbone, layers=listed(args.layers, int),
                                input_scale=args.input_scale, square_side=args.square_side,
                                embed_dim=args.embed_dim, context_scales=listed(args.context_scales, float),
                                mirrors=listed(args.mirrors, str.strip))
    detector = detector_config(detector_name)
    if detector_name == "patchcore" and args.coreset_ratio is not None:
        detector = PatchCoreConfig(**{**detector.to_dict(), "coreset_ratio": args.coreset_ratio})
    return features.to_dict(), detector.to_dict()


def fit_parameters(args) -> dict:
    """The fit flow's parameters for a command's arguments (fit, deploy's re-fit, evaluate's fit),
    with what they resolved to and the --config file's record, for the version's manifest."""
    from .config_file import resolved_settings

    features, detector = _configs(args)
    return dict(feature_config=features, detector=args.detector or "patchcore", detector_config=detector,
                batch_size=args.batch_size, holdout_fraction=args.holdout_fraction,
                threshold_quantile=args.threshold_quantile, auto=auto_chosen(args), settings=resolved_settings(args),
                config_file=getattr(args, "config_file", None))


EXAMPLES = {
    "fit": "patchwatch fit --images data/nominal --root models/line1\n"
           "patchwatch fit --images s3://plant/split.csv --split train --root s3://plant/model",
    "score": "patchwatch score --images data/today --root models/line1 --out results/today",
    "score-new": "patchwatch score-new --archive s3://plant/archive --root s3://plant/model --results s3://plant/results",
    "models": "patchwatch models --root models/line1",
    "promote": "patchwatch promote v0003 --root models/line1",
    "deploy": "PREFECT_API_URL=http://127.0.0.1:4200/api patchwatch deploy --images s3://plant/nominal "
              "--root s3://plant/model --archive s3://plant/archive",
    "serve": "PREFECT_API_URL=http://127.0.0.1:4200/api patchwatch serve",
    "evaluate": "patchwatch evaluate ../shared/datasets/mtd/split.csv --out runs/mtd",
}
DESCRIPTION = ("patchwatch: unsupervised visual anomaly detection on image archives. Fit a model on "
               "defect-free images, score new ones; maps (Zarr) and score tables (Parquet) go to a folder or S3.")


def build_parser(model_options: bool = True) -> argparse.ArgumentParser:
    """``model_options=False``: without the model options (and torch), for :data:`LIGHT_COMMANDS`."""
    from patchwatch import __version__

    parser = argparse.ArgumentParser(prog="patchwatch", description=DESCRIPTION,
                                     epilog="'patchwatch COMMAND --help' describes a command, with an example.")
    parser.add_argument("--version", action="version", version=f"patchwatch {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="also show Dask's and Prefect's progress logs")
    common.add_argument("--debug", action="store_true", help="a failure shows its full traceback")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class Commands:  # every command gets the common options and its example as epilog
        @staticmethod
        def add_parser(name, help, **kwargs):
            return subparsers.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                         epilog="example:\n  " + EXAMPLES[name].replace("\n", "\n  "),
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         parents=[common], **kwargs)

    commands = Commands()

    fit = commands.add_parser("fit", help="fit a model on nominal images")
    fit.add_argument("--images", required=True, help="folder, split CSV, or URL of either")
    fit.add_argument("--root", required=True, help="model root: a folder or URL (s3://bucket/prefix)")
    fit.add_argument("--split", default=None, help="with a split CSV: use only this split (e.g. train)")
    fit.add_argument("--full", action="store_true",
                     help="select the coreset afresh from the whole bank instead of extending the current one")
    if model_options:
        _add_model_options(fit)
    _add_threshold_options(fit)
    _add_run_options(fit)
    _add_runtime_option(fit)
    _add_config_option(fit)

    score = commands.add_parser("score", help="score images with a fitted model")
    score.add_argument("--images", required=True, help="folder, split CSV, or URL of either")
    score.add_argument("--root", required=True, help="model root written by 'patchwatch fit'")
    score.add_argument("--out", default=None, help="results root (default ROOT/results)")
    score.add_argument("--split", default=None, help="with a split CSV: use only this split (e.g. test)")
    score.add_argument("--version", default=None, help="model version to use (default: the current one)")
    _add_run_options(score)
    _add_runtime_option(score)

    score_new = commands.add_parser("score-new", help="score what the current model has not scored yet, "
                                    "into RESULTS/nights/DATE (what the nightly scoring deployment runs)")
    score_new.add_argument("--archive", required=True, help="folder or URL of the images to watch")
    score_new.add_argument("--root", required=True, help="model root")
    score_new.add_argument("--results", required=True, help="results root (folder or URL)")
    score_new.add_argument("--night", default=None, help="partition date YYYY-MM-DD (default: today, UTC)")
    score_new.add_argument("--rescore", action="store_true",
                           help="also score again, with the current version, images only older versions scored "
                                "(default: only images no version has scored)")
    _add_run_options(score_new)
    _add_runtime_option(score_new)

    models = commands.add_parser("models", help="list the model versions under a root")
    models.add_argument("--root", required=True, help="model root")
    promote = commands.add_parser("promote", help="make VERSION the current model (roll back or forward)")
    promote.add_argument("version", help="a version listed by 'patchwatch models', e.g. v0003")
    promote.add_argument("--root", required=True, help="model root")

    deploy = commands.add_parser("deploy", help="register the nightly re-fit and scoring deployments on the "
                                 "Prefect server at PREFECT_API_URL")
    deploy.add_argument("--images", required=True, help="nominal images the nightly re-fit learns from")
    deploy.add_argument("--root", required=True, help="model root")
    deploy.add_argument("--archive", default=None, help="images the nightly scoring watches (default: --images)")
    deploy.add_argument("--results", default=None, help="results root (default ROOT/results)")
    deploy.add_argument("--name", default=DEFAULT_NAME, help="deployment name (default %(default)s)")
    deploy.add_argument("--refit-cron", default=DEFAULT_REFIT_CRON, help="re-fit schedule (default '%(default)s')")
    deploy.add_argument("--score-cron", default=DEFAULT_SCORE_CRON, help="scoring schedule (default '%(default)s')")
    deploy.add_argument("--timezone", default="UTC", help="time zone of the schedules (default %(default)s)")
    deploy.add_argument("--split", default=None, help="with a split CSV as --images: re-fit on this split only")
    deploy.add_argument("--full", action="store_true",
                        help="each re-fit selects the coreset afresh from the whole bank")
    if model_options:
        _add_model_options(deploy)
    _add_threshold_options(deploy)
    _add_run_options(deploy)  # --batch-size: both the re-fit and the scoring
    _add_runtime_option(deploy)
    _add_config_option(deploy)
    serve = commands.add_parser("serve", help="run the registered nightly deployments until stopped")
    serve.add_argument("--name", default=DEFAULT_NAME, help="deployment name given to deploy (default %(default)s)")
    _add_runtime_option(serve)

    evaluate = commands.add_parser("evaluate", help="fit on a split CSV's train rows, score its test rows, report metrics")
    evaluate.add_argument("split_csv", help="CSV with columns image,mask,label,defect_type,split")
    evaluate.add_argument("--out", default="runs/evaluate", help="output folder or URL (default %(default)s)")
    if model_options:
        _add_model_options(evaluate)
    _add_threshold_options(evaluate)
    _add_run_options(evaluate)
    _add_runtime_option(evaluate)
    _add_config_option(evaluate)
    parser.command_parsers = {"fit": fit, "deploy": deploy, "evaluate": evaluate}  # for --config
    return parser


def parse_arguments(argv: list[str], model_options: bool = True) -> argparse.Namespace:
    """The command's arguments, a --config file's settings under those given in ``argv``."""
    from .config_file import apply_config

    parser = build_parser(model_options)
    args = parser.parse_args(argv)
    return apply_config(parser, parser.command_parsers.get(args.command), argv, args)


# answered without torch, Prefect or Dask (each takes seconds to import): well under 2 s
LIGHT_COMMANDS = ("models", "promote")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # top-level options take no value
    from .config_file import ConfigFileError

    try:
        args = parse_arguments(argv, model_options=command not in LIGHT_COMMANDS)
    except ConfigFileError as error:  # before anything runs: one line, like argparse's own refusals
        print(f"patchwatch {command}: {error}", file=sys.stderr)
        return 2
    if not args.verbose:
        # Dask's INFO lines (cluster start and stop, 30-40 per command) say nothing to a user; set
        # before distributed is imported (it configures its loggers then), inherited by workers
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    else:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO")
    # INFO reaches the Prefect server (each run's logs in the UI), the terminal shows warnings
    # only: the level gates what is emitted at all, the console handler what is printed. Set
    # before Prefect is imported (it configures logging then); Dask workers inherit them.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # the ephemeral server must not try to reach the internet (telemetry)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from patchwatch.flows.runner import install_log_sanitiser, prefect_api
    from patchwatch.storage.locations import DETERMINISTIC_ERRNOS, for_log

    install_log_sanitiser()
    # `kill PID` ends the run through its finally blocks (its Prefect server and cluster stop too)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        _prepare(args)
        if args.command not in FLOW_COMMANDS or _nothing_new_to_fit(args):
            return _run(args)
        with prefect_api():
            return _run(args)
    except _expected_errors() as error:  # evaluated only when something was raised
        if args.debug:
            raise
        # a mistake in the command or its inputs: one clear line, no traceback
        print(f"patchwatch {args.command}: {type(error).__name__}: {for_log(error)}", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno not in DETERMINISTIC_ERRNOS or args.debug:
            raise
        # a full disk, a read-only store: one line naming what could not be written
        where = error.filename or " / ".join(filter(None, (getattr(args, n, None) for n in ("out", "root", "results"))))
        print(f"patchwatch {args.command}: {error.strerror or error}: {for_log(where)}", file=sys.stderr)
        return 1


def _expected_errors() -> tuple[type[BaseException], ...]:
    """A mistake in the command or its inputs (one line, no traceback). Imported here, when
    needed: the flows' modules import Prefect and torch."""
    from patchwatch.flows.deployments import NoServerError
    from patchwatch.flows.score import NothingScoredError
    from patchwatch.storage.leases import LeaseHeldError, LeaseLostError
    from patchwatch.storage.model_store import IncompatibleModelError

    return (FileNotFoundError, IncompatibleModelError, LookupError, NoServerError, ValueError, LeaseHeldError,
            LeaseLostError, NothingScoredError, PermissionError, ConnectionError)


FLOW_COMMANDS = ("fit", "score", "score-new", "evaluate")
PATH_ARGUMENTS = ("images", "root", "out", "archive", "results", "split_csv")
# locations a command reads: a local one that does not exist is named at once, before any run
INPUT_ARGUMENTS = {"fit": ("images",), "score": ("images", "root"), "score-new": ("archive", "root"),
                   "evaluate": ("split_csv",), "deploy": ("images", "archive"), "models": ("root",),
                   "promote": ("root",)}


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _prepare(args) -> None:
    """Check and settle the command's locations before anything runs: paths made absolute (Dask
    workers and deployments resolve them elsewhere), credentials in URLs refused (they would be
    recorded as flow parameters, in logs and tables: the store's own configuration holds them),
    remote stores probed once (wrong keys or a silent endpoint: one line, at once)."""
    from patchwatch.storage.images import ALLOW_SOURCES_ENV
    from patchwatch.storage.locations import absolute, check_store, has_credentials, redact

    if getattr(args, "runtime", None) is not None:
        from patchwatch.anomaly.runtime import RUNTIME_ENV
        os.environ[RUNTIME_ENV] = args.runtime  # read where the backbone runs: the workers inherit it
    if getattr(args, "device", None) is not None:
        from patchwatch.anomaly.runtime import DEVICE_ENV, resolve_device
        resolve_device(args.device)  # no such GPU here: one line now, not a failure in every task
        os.environ[DEVICE_ENV] = args.device
    if getattr(args, "allow_sources", None) is not None:
        os.environ[ALLOW_SOURCES_ENV] = args.allow_sources  # read where the listing runs (the flow)
    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if has_credentials(value):
            raise ValueError(f"--{name.replace('_', '-')} {redact(value)}: credentials in a URL are not accepted; "
                             "give them to the store (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                             "fsspec configuration)")
        setattr(args, name, absolute(value))
    for name in INPUT_ARGUMENTS.get(args.command, ()):
        value = getattr(args, name, None)
        if value and "://" not in value and not os.path.exists(value):  # URLs: check_store below
            raise FileNotFoundError(f"--{name.replace('_', '-')} {value}: no such file or folder"
                                    + ("" if name != "root" else ": give the --root a 'patchwatch fit' wrote"))
    if args.command in FLOW_COMMANDS or args.command == "deploy":
        for name in PATH_ARGUMENTS:
            if getattr(args, name, None):
                check_store(getattr(args, name))
    if args.command in ("score", "score-new"):
        from patchwatch.storage.model_store import ModelRegistry

        registry = ModelRegistry(args.root)
        version = getattr(args, "version", None)
        if version or registry.current():
            # stored settings and array shapes, before a Prefect server or a cluster starts
            registry.resolve(version)


def _nothing_new_to_fit(args) -> bool:
    """A fit that would find nothing new and change nothing: it ends without a flow run, a Prefect
    server or a cluster (with them a no-op fit took 9.5 s: bench/results/noop.md). The nightly
    re-fit deployment still records each of its runs in Prefect."""
    if args.command != "fit" or args.dask_address:
        return False
    from patchwatch.flows.root_settings import nothing_to_fit
    if not nothing_to_fit(images=args.images, root=args.root, split=args.split, full=args.full, **fit_parameters(args)):
        return False
    args.command = "fit-nothing-new"
    return True


def _run(args) -> int:
    from patchwatch.flows.report import print_summary
    from patchwatch.flows.runner import dask_cluster, run_on_dask

    if args.command == "fit":
        from patchwatch.flows.fit import fit_flow
        from patchwatch.flows.root_settings import nothing_to_fit
        from patchwatch.flows.runner import run_and_link
        parameters = dict(images=args.images, root=args.root, split=args.split, full=args.full,
                          **fit_parameters(args))
        if not args.dask_address and nothing_to_fit(**parameters):  # decided again: the flow may have begun
            summary = run_and_link(fit_flow, **parameters)
        else:
            with dask_cluster(args.dask_address, args.workers) as address:
                summary = run_on_dask(fit_flow, address, **parameters)
        print_summary("fit", {k: v for k, v in summary.items() if k != "message"})
        if summary.get("message"):
            print(summary["message"])
        _say_auto_choice(summary.get("auto"))
        if summary.get("refit"):
            print(f"model {summary['version']} is current in {args.root}; list versions: "
                  f"patchwatch models --root {args.root}")
    elif args.command == "fit-nothing-new":
        from patchwatch.storage.model_store import ModelRegistry
        version = ModelRegistry(args.root).current()
        print_summary("fit", {"root": args.root, "version": version, "refit": False, "new_images": 0})
        print(f"nothing new in {args.images}: version {version} stays current")
    elif args.command == "score":
        from patchwatch.flows.score import score_flow
        from patchwatch.storage.locations import join
        with dask_cluster(args.dask_address, args.workers) as address:
            summary = run_on_dask(score_flow, address, images=args.images, root=args.root,
                                  results=args.out or join(args.root, "results"), split=args.split,
                                  batch_size=args.batch_size, version=args.version)
        print_summary("score", summary)
        _say_results(summary)
    elif args.command == "score-new":
        from patchwatch.flows.nightly import score_new_flow
        with dask_cluster(args.dask_address, args.workers) as address:
            summary = run_on_dask(score_new_flow, address, archive=args.archive, root=args.root,
                                  results=args.results, night=args.night, batch_size=args.batch_size,
                                  rescore=args.rescore)
        print_summary("score-new", summary)
        _say_results(summary)
    elif args.command == "models":
        from patchwatch.flows.report import print_versions
        print_versions(args.root)
    elif args.command == "promote":
        from patchwatch.storage.model_store import ModelRegistry
        pointer = ModelRegistry(args.root).promote(args.version)
        print(f"current: {pointer['version']} (was {pointer['previous']})")
    elif args.command == "deploy":
        from patchwatch.flows.deployments import deploy
        from patchwatch.storage.locations import join
        # what the flows' own processes need: their cluster, and the settings the command sets as
        # environment variables for its workers (the runtime, the device, the allowed sources)
        run = {"dask_address": args.dask_address, "workers": args.workers, "batch_size": args.batch_size,
               "runtime": args.runtime, "device": args.device, "allow_sources": args.allow_sources}
        parameters = {"refit": {"images": args.images, "root": args.root, "split": args.split, "full": args.full,
                                **fit_parameters(args), **run},
                      "score": {"archive": args.archive or args.images, "root": args.root,
                                "results": args.results or join(args.root, "results"), **run}}
        for line in deploy(args.name, parameters, {"refit": args.refit_cron, "score": args.score_cron}, args.timezone):
            print(f"{line['deployment']}: {line['cron']} ({line['timezone']}), id {line['id']}")
        print(f"start the runner that executes them: patchwatch serve --name {args.name}")
    elif args.command == "serve":
        from patchwatch.flows.deployments import serve_registered
        serve_registered(args.name)
    elif args.command == "evaluate":
        from patchwatch.flows.evaluate import evaluate_flow
        from patchwatch.flows.runner import run_and_link
        from patchwatch.storage.locations import join
        summary = run_and_link(evaluate_flow, split_csv=args.split_csv, out=args.out, dask_address=args.dask_address,
                               workers=args.workers, **fit_parameters(args))
        print_summary("evaluate", summary)
        print(json.dumps(summary, indent=2))
        results = join(args.out, "results")
        print(f"results in {results}: open {summary.get('report') or join(results, 'report.html')} first (metrics, "
              f"ROC/PRO curves, per defect type, the worst images with overlays); figures: "
              f"{join(results, 'metrics.json')}; per image: {join(results, 'scores.csv')}")
    return 0


def _say_results(summary: dict) -> None:
    """Where a scoring run's results are, and what to open first."""
    table = summary.get("score_table")
    if table:
        print(f"score table: {table} ({summary.get('flagged', 0)} of {summary.get('images', 0)} images flagged;"
              f" sort by 'score', each row names its anomaly map)")
        if summary.get("report"):
            print(f"open {summary['report']} first: the most anomalous images with their overlays")
    elif "results" in summary:
        print(f"nothing new scored; results stay in {summary['results']}")


def _say_auto_choice(choice: dict | None) -> None:
    if not choice:
        return
    if choice.get("kept_from"):
        print(f"--auto: kept {choice.get('chosen', 'the configuration')} of {choice['kept_from']} "
              "(this root's bank was featurised with it; a new root chooses again)")
    else:
        print(f"--auto chose {choice['chosen']}: {choice['reason']} ({choice['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
