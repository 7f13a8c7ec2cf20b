"""The `smartbin` command."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from bin_controller import __version__
from bin_controller.config import path_problem
from bin_controller.errors import SmartbinError

if TYPE_CHECKING:
    from bin_controller.vision.classifier import Classifier, Prediction

DEFAULT_MODEL = "demo"
COMMAND_GROUP = "smartbin.commands"
# More interpreter threads than any board has cores only adds switching; TFLite would
# start every one of them.
MAX_THREADS = 64
# Seeds as simulator.seed takes them (numpy accepts any non-negative int).
MAX_SEED = 2**31 - 1
# Option text quoted in an error up to this many characters.
SHOWN_OPTION_CHARS = 60


# ---------------------------------------------------------------------- option types
# argparse calls these on an option's text; an ArgumentTypeError becomes one line,
# "smartbin CMD: error: argument --top: ...", after the usage line, with exit code 2.


def quote(text: str) -> str:
    """Option text as an error line shows it: repr (so a NUL is visible), shortened."""
    shown = repr(text)
    return shown if len(shown) <= SHOWN_OPTION_CHARS else shown[:SHOWN_OPTION_CHARS - 3] + "..."


def _bounds(lo: float, hi: float | None, *, above: bool = False) -> str:
    def show(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"
    if hi is not None:
        return f"from {show(lo)} to {show(hi)}"
    return f"more than {show(lo)}" if above else f"of {show(lo)} or more"


def whole(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from lo (to hi)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # not a number, or more digits than Python converts
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"expected a whole number {_bounds(lo, hi)}, not {quote(text)}")
        return value
    return parse


def number(lo: float, hi: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from lo (or above it, when `above`) to hi."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > lo if above else value >= lo) and (
            hi is None or value <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(
                f"expected a number {_bounds(lo, hi, above=above)}, not {quote(text)}")
        return value
    return parse


def name_or_path(text: str) -> str:
    """An argparse type: a file name or path (or a bundle name) the system can open."""
    problem = path_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"the path {quote(text)} {problem}")
    return text


def path_arg(text: str) -> Path:
    """An argparse type: like name_or_path, as a Path."""
    return Path(name_or_path(text))


def thread_counts(text: str) -> str:
    """An argparse type: a comma list of thread counts, returned as given."""
    parse = whole(1, MAX_THREADS)
    try:
        counts = [parse(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        counts = []
    if not counts:
        raise argparse.ArgumentTypeError(f"expected thread counts such as 1,2 (each from 1 "
                                         f"to {MAX_THREADS}), not {quote(text)}")
    return ",".join(map(str, counts))


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, type=name_or_path,
                   help="bundle folder, or a name in model.dir, then shipped (default: demo)")
    p.add_argument("--backend", default="auto",
                   help="auto (LiteRT, then tflite-runtime, then tf.lite), litert, "
                        "tflite-runtime or tensorflow")
    p.add_argument("--threads", type=whole(1, MAX_THREADS), default=1,
                   help=f"interpreter threads, 1 to {MAX_THREADS} (default 1)")
    p.add_argument("--backbone", default=None, type=name_or_path,
                   help="local file or folder for a bundle's downloadable backbone "
                        "(else $SMARTBIN_BACKBONE, the cache, or a download)")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """--config and --state-dir, for commands that read the bin's state folder."""
    p.add_argument("--config", default=None, type=name_or_path, help="TOML configuration file")
    p.add_argument("--state-dir", type=path_arg, help="override bin.state_dir")


def cmd_classify(args: argparse.Namespace) -> int:
    from bin_controller.config import load_config
    from bin_controller.vision.classifier import Classifier

    classifier = Classifier(args.model, backend=args.backend, num_threads=args.threads,
                            top_k=args.top, backbone=args.backbone,
                            models_dir=load_config(None).model.dir)
    failures = 0
    for image in args.images:
        try:
            p = _classify_one(classifier, image)
        except (SmartbinError, OSError) as exc:
            failures += 1
            record = {"image": image, "error": str(exc)}
            if args.json:
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                shown = image if image.isprintable() else quote(image)
                print(f"{shown}: error: {exc}", file=sys.stderr)
            continue
        record = {
            "image": image,
            "label": p.label.name,
            "label_en": p.label.name_en,
            "bin": p.bin,
            "confidence": round(p.confidence, 4),
            "bin_confidence": round(p.bin_confidence, 4),
            "top": [{"label": lab.name, "label_en": lab.name_en, "score": round(s, 4)}
                    for lab, s in p.top],
            "latency_ms": round(p.latency_ms, 2),
            "backend": classifier.backend,
        }
        if args.json:
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(f"{image}: {p.label.name_en or p.label.name} -> {p.bin} "
                  f"({p.confidence:.1%}, {p.latency_ms:.1f} ms, {classifier.backend})")
    return 1 if failures else 0


def _classify_one(classifier: Classifier, image: str) -> Prediction:
    # A path no file call can take (a NUL, an over-long name) would raise ValueError or
    # OSError deep inside; it is this image's error, and the others still run.
    problem = path_problem(image)
    if problem:
        raise SmartbinError(f"the path {problem}")
    return classifier.classify_file(image)


def cmd_bench(args: argparse.Namespace) -> int:
    from bin_controller.tools import bench

    run: Callable[[argparse.Namespace], int] = getattr(bench, args.bench_fn)
    return run(args)


def cmd_bench_teach(args: argparse.Namespace) -> int:
    # Training code: imported only when this benchmark runs (numpy fit, dataset reader).
    from training import teach_bench

    return teach_bench.run(args)


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from bin_controller import logs, service

    logs.setup(logging.DEBUG if args.verbose else logging.INFO)
    return service.run(args)


def cmd_check(args: argparse.Namespace) -> int:
    from bin_controller.tools import check

    return check.run(args)


def cmd_camera(args: argparse.Namespace) -> int:
    from bin_controller.tools import camera_cmd

    return camera_cmd.run(args)


def cmd_monitor(args: argparse.Namespace) -> int:
    from bin_controller.tools import monitor

    return monitor.run(args)


def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        from bin_controller.dashboard import command
    except ModuleNotFoundError as exc:
        if exc.name != "aiohttp":
            raise
        raise SmartbinError("smartbin dashboard needs aiohttp: pip install "
                            "'smartbin[dashboard]'") from None

    return command.run(args)


def cmd_review(args: argparse.Namespace) -> int:
    from bin_controller.tools import review_cmd

    return review_cmd.run(args)


def seqs_arg(text: str) -> list[int]:
    """An argparse type: item numbers as 12 or 12,15,20-25."""
    from bin_controller.tools.review_cmd import parse_seqs

    return parse_seqs(text)


def _add_dashboard_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # The options live beside the command; aiohttp is imported only when it runs.
    from bin_controller.dashboard.options import add_parser

    add_parser(sub, path=name_or_path).set_defaults(func=cmd_dashboard)


def _add_review_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bin_controller.bins import BINS

    p = sub.add_parser("review", help="the photo log: list items, correct labels, export "
                                      "the site dataset")
    review_sub = p.add_subparsers(dest="review_command", required=True, metavar="WHAT")
    helps = {"list": "items, newest first, with filters and pages",
             "show": "one item, its review and its photo file",
             "label": "say what the items really were (an existing label, or a new one "
                      "with --bin)",
             "accept": "say the bin sorted the items right",
             "export": "reviewed photos as class folders that smartbin train reads"}
    for name, helptext in helps.items():
        c = review_sub.add_parser(name, help=helptext)
        _add_config_options(c)
        c.set_defaults(func=cmd_review)
        if name == "list":
            c.add_argument("--uncertain", action="store_true", help="only uncertain items "
                           "(with --failed: uncertain or failed)")
            c.add_argument("--failed", action="store_true",
                           help="only items the classifier failed on")
            c.add_argument("--unreviewed", action="store_true", help="only items not reviewed")
            c.add_argument("--label", help="only items the model or a review gave this label")
            c.add_argument("--bin", help="only items of this bin, the model's or the "
                                         "compartment reached (" + ", ".join(BINS) + ")")
            c.add_argument("--before", type=whole(1), metavar="SEQ",
                           help="items older than this seq (the next page)")
            c.add_argument("--limit", type=whole(1, 100), default=20,
                           help="items per page, 1 to 100 (default 20)")
            c.add_argument("--json", action="store_true", help="one JSON object")
        elif name == "show":
            c.add_argument("seq", type=whole(1), metavar="SEQ")
            c.add_argument("--json", action="store_true", help="one JSON object")
        elif name in ("label", "accept"):
            c.add_argument("seqs", type=seqs_arg, metavar="SEQS",
                           help="item numbers: 12 or 12,15,20-25")
            if name == "label":
                c.add_argument("label", metavar="LABEL",
                               help="a label's name (Chinese or English), or a new one")
                c.add_argument("--bin", help="the bin of a new label (" + ", ".join(BINS)
                                             + ")")
        else:
            c.add_argument("dir", type=path_arg, metavar="DIR",
                           help="new (or empty) folder to write")


def cmd_config_doc(args: argparse.Namespace) -> int:
    from bin_controller.config import example_toml, reference_markdown

    print(example_toml() if args.toml else reference_markdown(), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training import train

    if args.compare and args.method != "keras":
        raise SmartbinError("--compare goes with --method keras")
    if args.method == "keras":
        try:
            from training import keras_method
        except ImportError as exc:
            raise SmartbinError(f"--method keras needs TensorFlow: pip install -e '.[train]' "
                                f"({exc})") from exc
        return keras_method.run(args)
    hyper = train.Hyper(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        dropout=args.dropout, seed=args.seed)
    train.train_features(args.data, args.out, bin_map=args.bins, backbone=args.backbone,
                         hyper=hyper, search=not args.no_search,
                         target_accuracy=args.target_accuracy)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    report = evaluate(args.model, args.data, split=args.split, out=args.out,
                      backbone=args.backbone, backend=args.backend, shift=args.shift,
                      target_accuracy=args.target_accuracy)
    shifted = f" shifted (seed {args.shift})" if args.shift is not None else ""
    print(f"{report['model']} on {report['split']}{shifted} (n={report['n']}): top-1 "
          f"{report['top1']:.2%}, top-5 {report['top5']:.2%}, bin accuracy "
          f"{report['bin_accuracy']:.2%}, ECE {report['ece']:.2%}, latency p50 "
          f"{report['latency_ms']['p50']} ms"
          + (f"; report in {args.out}" if args.out else ""))
    print(report["calibration"]["advice"])
    return 0


def cmd_teach(args: argparse.Namespace) -> int:
    from training import teach

    return teach.run(args)


def cmd_models(args: argparse.Namespace) -> int:
    from bin_controller.tools import models_cmd

    return models_cmd.run(args)


def _add_teach_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bin_controller.bins import BINS

    p = sub.add_parser("teach", help="teach a bundle new labels from a few photos, check it "
                                     "against its base, optionally install it")
    p.add_argument("--data", type=path_arg, help="class folders of photos (like train's)")
    p.add_argument("--from-review", action="store_true",
                   help="teach from the bin's reviewed photos (base: the configured bundle)")
    p.add_argument("--base", type=name_or_path,
                   help="bundle whose labels are kept (a name or a folder; garbage120 gives "
                        "only names and bins); default with --from-review or --install: the "
                        "configured bundle")
    p.add_argument("--out", type=path_arg, help="bundle folder to write")
    p.add_argument("--name", help="the new bundle's name (default: the --out folder's name, "
                                  "else the base's)")
    p.add_argument("--bins", type=path_arg, help="JSON class folder -> bin, for folders "
                                                 "without the standard's prefix")
    p.add_argument("--backbone", type=name_or_path,
                   help="local file or folder for a downloadable backbone")
    p.add_argument("--base-data", type=path_arg,
                   help="photos the base was trained on (its split.json's test photos are "
                        "checked), or photos of its labels")
    p.add_argument("--margin", type=number(0, 100), default=2.0,
                   help="points of top-1 on the old labels the new bundle may lose "
                        "(default 2)")
    p.add_argument("--install", action="store_true",
                   help="install the accepted bundle in the models folder (model.dir)")
    p.add_argument("--keep", type=whole(1, 100), default=3,
                   help="versions of a bundle kept in the models folder (default 3)")
    p.add_argument("--seed", type=whole(0, MAX_SEED), default=0)
    p.add_argument("--config", default=None, type=name_or_path, help="TOML configuration file")
    p.add_argument("--state-dir", type=path_arg, help="override bin.state_dir")
    p.add_argument("--capture", metavar="LABEL",
                   help="photograph the item on the flap --shots times into the site's "
                        "teach data (<state dir>/captures/); with --install or --out, then "
                        "teach from the reviewed and captured photos")
    p.add_argument("--bin", choices=BINS, help="the bin of a --capture label the "
                                               "configured bundle does not know")
    p.add_argument("--shots", type=whole(1, 100), default=10,
                   help="photos per --capture (default 10)")
    p.add_argument("--interval", type=number(0, 60), default=0.3,
                   help="seconds between --capture shots (default 0.3)")
    p.add_argument("--simulate", action="store_true",
                   help="--capture with the simulator's camera and mock pins")
    p.add_argument("--item", help="on the simulator: the kind of simulated item laid on the "
                                  "flap for --capture (default: the label)")
    p.add_argument("--progress-json", action="store_true",
                   help="progress and the outcome as JSON lines on stdout (the service's "
                        "background teach reads them); messages go to stderr")
    p.add_argument("--threads", type=whole(1, 64), default=2,
                   help="threads of the backbone while the teach extracts features "
                        "(default 2)")
    p.add_argument("--nice", type=whole(0, 19), default=0,
                   help="lower the teach's CPU priority by this much (default 0)")
    p.set_defaults(func=cmd_teach)

    p = sub.add_parser("models", help="the models folder: install, list, roll back versions")
    models_sub = p.add_subparsers(dest="models_command", required=True, metavar="WHAT")
    for name, helptext in (("install", "copy a bundle in as the current version of its name"),
                           ("list", "bundles in the models folder and their versions"),
                           ("rollback", "go back to the version installed before")):
        c = models_sub.add_parser(name, help=helptext)
        _add_config_options(c)
        c.set_defaults(func=cmd_models)
        if name == "install":
            c.add_argument("bundle", type=path_arg, metavar="BUNDLE_DIR")
            c.add_argument("--keep", type=whole(1, 100), default=3,
                           help="versions kept (default 3)")
        elif name == "rollback":
            c.add_argument("name", nargs="?", metavar="NAME",
                           help="bundle name (default: the configured bundle's)")
        else:
            c.add_argument("--json", action="store_true", help="one JSON object")


def _add_target_accuracy(p: argparse.ArgumentParser) -> None:
    # 0.95: the bin accuracy the report finds a confidence threshold for, unless told.
    p.add_argument("--target-accuracy", type=number(0, 1, above=True), default=0.95,
                   help="report the confidence_threshold whose sorted items reach this bin "
                        "accuracy (default 0.95)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartbin", description="Smart waste bin controller")
    parser.add_argument("--version", action="version", version=f"smartbin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("classify", help="classify image files with a model bundle")
    _add_model_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--top", type=whole(1), default=5,
                   help="how many top labels to report (1 or more)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("run", help="run the bin on its hardware")
    p.add_argument("--config", default=None, type=name_or_path, help="TOML configuration file")
    p.add_argument("--bin-id", default=None, help="override bin.id")
    p.add_argument("--mqtt", metavar="HOST[:PORT]", help="publish to this MQTT broker")
    p.add_argument("--state-dir", type=path_arg, help="override bin.state_dir")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--simulate", action="store_true",
                   help="run the service on the simulator's pins and camera, with a person "
                        "dropping a generated item every --sim-interval seconds")
    p.add_argument("--sim-interval", type=number(0, 3600), default=2.0,
                   help="seconds between drops (0: nobody drops)")
    p.add_argument("--sim-items", type=whole(1), default=None,
                   help="stop dropping after this many")
    p.add_argument("--sim-hang-camera", type=whole(0), default=0, metavar="N",
                   help="the Nth capture never returns (to see the watchdog act)")
    p.add_argument("--sim-fast", action="store_true", help="no mechanical delays (benchmarks)")
    p.add_argument("--model", default=None, type=name_or_path, help="override model.bundle")
    p.add_argument("--backbone", default=None, type=name_or_path, help="override model.backbone")
    p.add_argument("--seed", type=whole(0, MAX_SEED), default=0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="check config, model, pins, camera, broker and disk")
    p.add_argument("--config", default=None, type=name_or_path, help="TOML configuration file")
    p.add_argument("--mqtt", metavar="HOST[:PORT]", help="check this broker instead")
    p.add_argument("--state-dir", type=path_arg, help="override bin.state_dir")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("camera", help="aim and focus the camera: snapshot, live preview file")
    camera_sub = p.add_subparsers(dest="camera_command", required=True, metavar="WHAT")
    for name, helptext in (("snapshot", "save a still as the classifier sees it (crop drawn)"),
                           ("preview", "rewrite a JPEG every --interval seconds (aiming)")):
        c = camera_sub.add_parser(name, help=helptext)
        c.add_argument("--config", default=None, help="TOML configuration file")
        c.add_argument("--state-dir", type=Path, help="override bin.state_dir")
        c.add_argument("--simulate", action="store_true",
                       help="the simulator's camera and mock pins")
        c.set_defaults(func=cmd_camera)
        if name == "snapshot":
            c.add_argument("file", metavar="FILE", help="image to write (.jpg or .png)")
            c.add_argument("--reference", action="store_true",
                           help="also keep it as the empty flap's reference for 'check'")
        else:
            c.add_argument("--out", default=None,
                           help="image to rewrite (default: <state dir>/camera-preview.jpg)")
            c.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
            c.add_argument("--seconds", type=float, default=0,
                           help="stop after this long (0: until Ctrl-C)")

    p = sub.add_parser("monitor", help="live terminal view of one bin or a fleet (MQTT)")
    p.add_argument("--host", default="localhost", help="broker HOST[:PORT]")
    p.add_argument("--port", type=whole(1, 65535), default=1883)
    p.add_argument("--bin-id", default="+", help="one bin, or + for every bin (default)")
    p.add_argument("--prefix", default="smartbin")
    p.add_argument("--seconds", type=number(0), default=0,
                   help="stop after this long (0: never)")
    p.set_defaults(func=cmd_monitor)

    _add_dashboard_parser(sub)

    _add_review_parser(sub)

    p = sub.add_parser("config-doc", help="print the configuration reference (Markdown)")
    p.add_argument("--toml", action="store_true", help="a commented example config.toml")
    p.set_defaults(func=cmd_config_doc)

    p = sub.add_parser("train", help="train a bundle from a folder of labelled photos")
    p.add_argument("--data", type=path_arg, required=True,
                   help="class subfolders, or train/ val/ test/ holding them")
    p.add_argument("--out", type=path_arg, required=True, help="bundle folder to write")
    p.add_argument("--bins", type=path_arg, help="JSON class -> bin (default: name prefixes)")
    p.add_argument("--method", choices=("features", "keras"), default="features")
    # Not argparse choices: which strategies exist depends on --arch, and a wrong pair is
    # one line from the trainer rather than argparse's usage block.
    p.add_argument("--arch", default="mobilenet_v2",
                   help="keras method: backbone, mobilenet_v2 (default) or resnet50")
    p.add_argument("--strategy", default="connect",
                   help="keras method: which layers train, the study's three per backbone: "
                        "mobilenet_v2 connect|140after|all, resnet50 connect|80after|all")
    p.add_argument("--compare", action="store_true",
                   help="keras method: train every (arch, strategy) pair on one split and "
                        "write report.json and report.md in --out, a bundle per pair")
    p.add_argument("--pairs", default=None,
                   help="with --compare: only these, e.g. resnet50:connect,mobilenet_v2:all")
    p.add_argument("--eager", action="store_true",
                   help="keras method: no graph tracing (tens of seconds per model saved "
                        "on a few images; on a real dataset the traced graph is faster)")
    p.add_argument("--bench-runs", type=whole(1), default=50,
                   help="with --compare: timed int8 runs per bundle (default 50)")
    p.add_argument("--bench-threads", default="1,2", type=thread_counts,
                   help="with --compare: interpreter thread counts timed (default 1,2)")
    p.add_argument("--backbone", type=name_or_path,
                   help="backbone file or URL (default: the official MobileNetV2 download, "
                        "or $SMARTBIN_BACKBONE)")
    p.add_argument("--weights", type=name_or_path, action="append",
                   help="keras method: imagenet (default: Keras downloads them), none "
                        "(random), FILE, or ARCH=FILE; repeat for each backbone of --compare")
    p.add_argument("--image-size", type=whole(32, 1024), default=224,
                   help="keras method: input size (the study: 224)")
    p.add_argument("--epochs", type=whole(1), default=30)
    p.add_argument("--batch-size", type=whole(1), default=16)
    p.add_argument("--lr", type=number(0, above=True), default=1e-4)
    p.add_argument("--dropout", type=number(0, 0.99), default=0.5)
    p.add_argument("--seed", type=whole(0, MAX_SEED), default=0)
    p.add_argument("--no-search", action="store_true",
                   help="features method: train only the study's head, no variants")
    _add_target_accuracy(p)
    p.set_defaults(func=cmd_train)

    _add_teach_parsers(sub)

    p = sub.add_parser("evaluate", help="measure a bundle on labelled photos")
    p.add_argument("--model", required=True, type=name_or_path)
    p.add_argument("--data", type=path_arg, required=True)
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    p.add_argument("--shift", type=whole(0, MAX_SEED), metavar="SEED",
                   help="each photo's object cut from its light backdrop and put on another "
                        "background, scale, light and JPEG (seeded): a proxy for other sites' "
                        "photos; train chooses on seeds 101, 102 of val, test seeds 1, 2")
    p.add_argument("--out", type=path_arg, help="write report.json, report.md and plots here")
    p.add_argument("--backbone", type=name_or_path)
    p.add_argument("--backend", default="auto")
    _add_target_accuracy(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="benchmarks that print numbers")
    bench_sub = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bench_sub.add_parser("classify", help="bare invoke() against the full classify call")
    _add_model_options(b)
    b.add_argument("--image", default=None, type=name_or_path,
                   help="JPEG to classify (default: a generated one)")
    b.add_argument("--runs", type=whole(1), default=200, help="timed runs per row (default 200)")
    b.add_argument("--thread-counts", default="1,2", type=thread_counts,
                   help="comma list (default 1,2)")
    b.add_argument("--backends", default=None,
                   help="comma list (default: every backend importable here)")
    b.set_defaults(func=cmd_bench, bench_fn="run")
    b = bench_sub.add_parser("store", help="items per second the store commits")
    b.add_argument("--items", type=whole(1), default=2000)
    b.add_argument("--dir", default=None, type=name_or_path,
                   help="folder on the disk to measure (default: /tmp)")
    b.set_defaults(func=cmd_bench, bench_fn="run_store")
    b = bench_sub.add_parser("service", help="start to READY, memory after many items")
    b.add_argument("--model", default="demo", type=name_or_path)
    b.add_argument("--backbone", default=None, type=name_or_path)
    b.add_argument("--items", type=whole(1), default=1000)
    b.set_defaults(func=cmd_bench, bench_fn="run_service")
    b = bench_sub.add_parser("teach", help="few-shot curve of the teach against its "
                             "baselines, and the time of a 26 x 10-photo teach")
    add_bench_teach_options(b)
    b.set_defaults(func=cmd_bench_teach)
    _add_plugin_commands(CommandTables(sub, bench_sub))
    return parser


def add_bench_teach_options(b: argparse.ArgumentParser) -> None:
    """`smartbin bench teach`'s options, also `python -m training.teach_bench`'s (here so
    that building the parser imports no training code)."""
    b.add_argument("--data", type=path_arg, required=True, help="folder of class folders")
    b.add_argument("--bins", type=name_or_path, help="class -> bin JSON file or shipped "
                   "name, e.g. trashnet (default: the class folders' bin prefixes)")
    b.add_argument("--backbone", type=name_or_path, help="MobileNetV2 .tflite file or folder")
    b.add_argument("--cache", type=path_arg, help="feature cache folder (default: smartbin's)")
    b.add_argument("--shots", default="1,5,10,20",
                   help="photos per class to teach from (default 1,5,10,20)")
    b.add_argument("--draws", type=whole(1), default=5,
                   help="random draws of the taught photos per shot (default 5)")
    b.add_argument("--seed", type=whole(0, MAX_SEED), default=0)
    b.add_argument("--views", default="auto",
                   help="views the teach learns from: auto (the teach's own: 2 to 8, more "
                        "for fewer photos) or a comma list, e.g. full,full_flip")
    b.add_argument("--ablations", action="store_true",
                   help="also logistic regression on the teach's views")
    b.add_argument("--json", type=path_arg, help="write the curve and timing as JSON")
    b.add_argument("--plot", type=path_arg, help="draw the few-shot curve as PNG (plots extra)")
    b.add_argument("--no-time", action="store_true",
                   help="skip the timed teach of 26 classes x 10 photos")
    b.add_argument("-v", "--verbose", action="store_true", help="a line per draw")


@dataclass(frozen=True)
class CommandTables:
    """Where a plugin adds its commands: `smartbin <command>` and `smartbin bench <what>`."""

    commands: argparse._SubParsersAction[argparse.ArgumentParser]
    bench: argparse._SubParsersAction[argparse.ArgumentParser]

    def add_model_options(self, parser: argparse.ArgumentParser) -> None:
        _add_model_options(parser)


def _add_plugin_commands(tables: CommandTables) -> None:
    """Commands of other packages (the simulator's `simulate`, `bench cycle`, `bench idle`),
    declared as entry points in the group `smartbin.commands`: each is a function that takes
    the CommandTables. The core CLI so never imports them until one is run."""
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        entry.load()(tables)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SmartbinError as exc:
        print(f"smartbin: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

