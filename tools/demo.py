#!/usr/bin/env python
"""Run a trained model on images or a video and draw what it finds.

    python tools/demo.py --config-file configs/forest/p2p_R18_s8.yaml \\
        --input IMG|DIR|GLOB [IMG ...] [--video FILE] [--output DIR] \\
        [--confidence-threshold 0.3] [--max-size 2048] \\
        MODEL.WEIGHTS output/forest/p2p_R18_s8/model_final.pth

    python tools/demo.py --config-file configs/forest/cpr_R18_s8_r2.yaml \\
        [--input IMG ...] [--json points.json --image-root images/] [--max-images 8] \\
        MODEL.WEIGHTS output/forest/cpr_R18_s8_r2/model_final.pth

P2PNet configs: every predicted point scoring at least --confidence-threshold is
drawn with its class name and score (default: the counting threshold the model
chose on its training images, MODEL.P2PNET.COUNT_CALIBRATION, else 0.3), and
each image's count is printed, with the model's soft count
(MODEL.P2PNET.COUNT_RULE "soft") for an image predicted in one pass. Images
larger than --max-size pixels on a side are predicted in overlapping tiles of
at most --max-size pixels; each tile
keeps only the points of its core (the overlap is split half-way between
neighbouring tiles), so every point comes from exactly one tile. --video FILE
writes <output>/<stem>_points.mp4.

CPRNet configs refine annotated points, so the images need points: those of
--json/--image-root, else of the config's DATASETS.TEST[0]. --input picks images
of that dataset: files on disk (matched by path, else by file name) or file names
and glob patterns of its images; without --input its first --max-images annotated
images are drawn. Arrows go from the coarse (x) to the refined (dot) points.

--input takes files, folders (their .jpg/.jpeg/.png/.tif/.tiff/.bmp files, sorted)
and glob patterns. Unreadable files found in a folder or by a pattern are reported
and skipped (the exit status is then 1); an unreadable file named explicitly is an
error. Each picture is written atomically to <output>/<stem>.png (default output:
OUTPUT_DIR/demo); an output that would replace an input is refused.

Config overrides (KEY VALUE ...) go last; those following --input are recognised
by their upper-case dotted key (e.g. MODEL.WEIGHTS).
"""
import sys

from cli_args import config_parser, hand_back_overrides


def parse_args(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--input", nargs="+", default=[],
                        help="image files, folders of images or glob patterns")
    parser.add_argument("--video", help="a video file to run P2PNet on, frame by frame")
    parser.add_argument("--output", help="folder for the pictures (default: OUTPUT_DIR/demo)")
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help="draw P2PNet points scoring at least this (default: the model's "
                             "counting threshold when it has one, else 0.3)")
    parser.add_argument("--max-size", type=int, default=2048,
                        help="larger images are predicted in tiles of at most this many pixels")
    parser.add_argument("--json", help="CPRNet: a point json with the points to refine")
    parser.add_argument("--image-root", help="CPRNet: folder of the images of --json")
    parser.add_argument("--max-images", type=int, default=8,
                        help="CPRNet without --input: how many images of the dataset to draw")
    args = parser.parse_args(argv)
    hand_back_overrides(args)
    if bool(args.json) != bool(args.image_root):
        parser.error("--json and --image-root go together")
    if args.max_size < 1:
        parser.error(f"--max-size must be positive, got {args.max_size}")
    if args.max_images < 1:
        parser.error(f"--max-images must be positive, got {args.max_images}")
    return args


def main(args):
    """The pictures written; raises demo_core.DemoError when some inputs could not be
    drawn."""
    # Imported here, after the arguments are parsed: --help answers without torch.
    from demo_core import run

    return run(args)


if __name__ == "__main__":
    arguments = parse_args()
    from demo_core import DemoError

    try:
        main(arguments)
    except DemoError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
