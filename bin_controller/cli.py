"""The `smartbin` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from bin_controller import __version__
from bin_controller.errors import SmartbinError

DEFAULT_MODEL = "demo"


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundle folder, or the name of one under model/ (default: demo)")
    p.add_argument("--backend", default="auto",
                   help="auto (LiteRT, then tflite-runtime, then tf.lite), litert, "
                        "tflite-runtime or tensorflow")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--backbone", default=None,
                   help="local file or folder for a bundle's downloadable backbone "
                        "(else $SMARTBIN_BACKBONE, the cache, or a download)")


def cmd_classify(args: argparse.Namespace) -> int:
    from bin_controller.classifier import Classifier

    classifier = Classifier(args.model, backend=args.backend, num_threads=args.threads,
                            top_k=args.top, backbone=args.backbone)
    failures = 0
    for image in args.images:
        try:
            p = classifier.classify_file(image)
        except SmartbinError as exc:
            failures += 1
            record = {"image": image, "error": str(exc)}
            if args.json:
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                print(f"{image}: error: {exc}", file=sys.stderr)
            continue
        record = {
            "image": image,
            "label": p.label.name,
            "label_en": p.label.name_en,
            "bin": p.label.bin,
            "confidence": round(p.confidence, 4),
            "top": [{"label": lab.name, "label_en": lab.name_en, "score": round(s, 4)}
                    for lab, s in p.top],
            "latency_ms": round(p.latency_ms, 2),
            "backend": classifier.backend,
        }
        if args.json:
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(f"{image}: {p.label.name_en or p.label.name} -> {p.label.bin} "
                  f"({p.confidence:.1%}, {p.latency_ms:.1f} ms, {classifier.backend})")
    return 1 if failures else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bin_controller import bench

    return bench.run(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from hardware_sim import cli as sim_cli

    sim_cli.configure_logging(False)
    return sim_cli.run(args)


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from bin_controller import service

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return service.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartbin", description="Smart waste bin controller")
    parser.add_argument("--version", action="version", version=f"smartbin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("classify", help="classify image files with a model bundle")
    _add_model_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--top", type=int, default=5, help="how many top labels to report")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("run", help="run the bin on its hardware")
    p.add_argument("--config", default=None, help="TOML configuration file")
    p.add_argument("--bin-id", default=None, help="override bin.id")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("simulate", help="run the whole bin on simulated hardware")
    from hardware_sim.cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("bench", help="benchmarks that print numbers")
    bench_sub = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bench_sub.add_parser("classify", help="bare invoke() against the full classify call")
    _add_model_options(b)
    b.add_argument("--image", default=None, help="JPEG to classify (default: a generated one)")
    b.add_argument("--runs", type=int, default=200, help="timed runs per row (default 200)")
    b.add_argument("--thread-counts", default="1,2", help="comma list (default 1,2)")
    b.add_argument("--backends", default=None,
                   help="comma list (default: every backend importable here)")
    b.set_defaults(func=cmd_bench)
    return parser


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

