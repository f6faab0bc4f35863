#!/usr/bin/env python
"""Turn a COCO json (true boxes, optional masks) into a point json with simulated
annotator points (noise model rg-mux-muy-sx-sy, see cpr_d2/data/coarse.py).

    python tools/make_coarse.py --input instances.json --output points.json \
        [--noise rg-0-0-0.25-0.25] [--seed 0] [--use-masks | --no-masks]

The output is written atomically (a temporary file in the same folder, then
renamed), so an interrupted run leaves no partial file; the input is never
overwritten.
"""

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="COCO json with 'bbox' on every annotation")
    parser.add_argument("--output", required=True, help="point json to write")
    parser.add_argument(
        "--noise", default="rg-0-0-0.25-0.25", help="rg-mux-muy-sx-sy or rg-mu-sigma"
    )
    parser.add_argument("--seed", type=int, default=0)
    masks = parser.add_mutually_exclusive_group()
    masks.add_argument(
        "--use-masks",
        dest="use_masks",
        action="store_true",
        default=True,
        help="draw from the mask where an annotation has a segmentation (default)",
    )
    masks.add_argument(
        "--no-masks", dest="use_masks", action="store_false", help="always use the box model"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported here, after the arguments are parsed: --help answers without them.
    from cpr_d2.data.coarse import coarse_points_from_coco, parse_noise
    from cpr_d2.data.point_json import read_json
    from cpr_d2.evaluation.semantic_variance import format_table, semantic_variance_json
    from cpr_d2.utils.io import write_json_atomic

    try:
        parse_noise(args.noise)
        if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
            raise ValueError(f"--output {args.output} is the input file; refusing to overwrite it")
        coco = read_json(args.input, "input json",
                         fix="pass a COCO json with true boxes (and, optionally, masks)")
        points, report = coarse_points_from_coco(
            coco, noise=args.noise, seed=args.seed, use_masks=args.use_masks, source=args.input
        )
        write_json_atomic(points, args.output)
    except (ValueError, OSError) as e:
        print(f"make_coarse: error: {e}", file=sys.stderr)
        return 1

    print(
        f"wrote {args.output}: {len(points.get('images', []))} images, "
        f"{report.annotations} annotations"
    )
    print(report.summary())
    if report.annotations:
        try:
            print(format_table(semantic_variance_json(points, source=args.output)))
        except ValueError as e:
            print(f"semantic variance not computed: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
