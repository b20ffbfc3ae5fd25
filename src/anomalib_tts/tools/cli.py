"""``anomalib-tts`` console command."""

import argparse
from pathlib import Path


def _demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="fit PatchCore, test it with and without refinement, print pixel F1 before/after",
        description=(
            "Fit PatchCore on an MVTec-layout category (or on a synthetic dataset generated at run time), test it "
            "with anomalib's threshold and with test-time refinement, and print the segmentation scores."
        ),
    )
    parser.add_argument("--dataset-root", type=Path, help="MVTec-layout root; omitted: generate a synthetic dataset")
    parser.add_argument("--category", default="texture", help="category folder under the root (default: texture)")
    parser.add_argument("--output", type=Path, default=Path("results/anomalib-tts-demo"), help="where results go")
    parser.add_argument(
        "--backbone",
        default="wide_resnet50_2",
        help="timm backbone of PatchCore and the refinement; when its weights cannot be fetched, the offline "
        "extra's tf_efficientnet_lite0_offline is used instead",
    )
    parser.add_argument("--layers", nargs="+", help="backbone layers (default: the usual ones for the backbone)")
    parser.add_argument("--weights", type=Path, help="local backbone state dict, for machines without network")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-sampling-ratio", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pseudo-labels", help="pseudo-label recipe (default: the callback's default)")
    return parser


def _compare_parser(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser(
        "compare",
        help="score anomalib's thresholds and test-time refinement on the same maps (YAML config: --config)",
        description="Options of python -m anomalib_tts.compare; `anomalib-tts compare --help` lists them.",
        add_help=False,  # its options, --help included, are parsed by anomalib_tts.compare
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``anomalib-tts`` command."""
    parser = argparse.ArgumentParser(prog="anomalib-tts", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    demo_parser = _demo_parser(subparsers)
    _compare_parser(subparsers)
    arguments, rest = parser.parse_known_args(argv)
    if arguments.command == "compare":
        from anomalib_tts.tools.compare import main as compare

        compare(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if arguments.command == "demo":
        from anomalib_tts.tools.demo import DemoConfig, DemoOptionError, run_demo

        config = DemoConfig(
            dataset_root=arguments.dataset_root,
            category=arguments.category,
            output=arguments.output,
            backbone=arguments.backbone,
            layers=tuple(arguments.layers) if arguments.layers else None,
            weights=arguments.weights,
            image_size=arguments.image_size,
            coreset_sampling_ratio=arguments.coreset_sampling_ratio,
            batch_size=arguments.batch_size,
            pseudo_labels=arguments.pseudo_labels,
        )
        try:
            run_demo(config)
        except DemoOptionError as error:  # raised before any work: the message is all the user needs
            demo_parser.exit(2, f"{demo_parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
