#!/usr/bin/env python
"""Print the relative semantic variance (RSV) and mean normalised distance of
the points of a point json, per object-size range; with --compare, of two
jsons (e.g. coarse vs refined, matched by annotation id) and the change in %.

    python tools/semantic_variance.py --json coarse.json [--compare refined.json]
        [--ranges "all:0:inf,<20 px:0:20,>=20 px:20:inf"] [--point-key point]
"""

import argparse
import sys

# cpr_d2.evaluation.semantic_variance.DEFAULT_SIZE_RANGES, written out so that --help
# answers before cpr_d2 (and torch) is imported; a test keeps the two equal.
DEFAULT_RANGES = (
    "all:0:inf,<12 px:0:12,12-20 px:12:20,20-32 px:20:32,>=32 px:32:inf,<20 px:0:20,>=20 px:20:inf")


def parse_ranges(text: str):
    """'name:lo:hi,...' -> ((name, lo, hi), ...); hi may be 'inf'."""
    ranges = []
    for item in text.split(","):
        parts = item.rsplit(":", 2)
        if len(parts) != 3:
            raise ValueError(f"bad range {item!r}: expected name:lo:hi")
        name, lo, hi = parts[0].strip(), float(parts[1]), float(parts[2])
        if not name or not lo < hi:
            raise ValueError(f"bad range {item!r}: expected a name and lo < hi")
        ranges.append((name, lo, hi))
    return tuple(ranges)


def _load(path):
    from cpr_d2.data.point_json import read_json

    return read_json(path)


def _skipped(counts) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items() if n) or "none"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True, help="point json with true boxes ('bbox')")
    parser.add_argument("--compare", help="second point json, matched by annotation id")
    parser.add_argument(
        "--ranges",
        default=DEFAULT_RANGES,
        help=f"size ranges by sqrt(w*h) (default {DEFAULT_RANGES!r})",
    )
    parser.add_argument("--point-key", default="point")
    parser.add_argument(
        "--include-crowd", action="store_true", help="also measure iscrowd/ignore annotations"
    )
    args = parser.parse_args(argv)
    # Imported here, after the arguments are parsed: --help answers without them.
    from cpr_d2.evaluation.semantic_variance import (
        compare_point_jsons,
        format_comparison,
        format_table,
        semantic_variance_json,
    )

    try:
        ranges = parse_ranges(args.ranges)
        options = dict(
            size_ranges=ranges, point_key=args.point_key, include_crowd=args.include_crowd
        )
        a = _load(args.json)
        if args.compare is None:
            result = semantic_variance_json(a, source=args.json, **options)
            print(
                f"{args.json}: {result.used} objects measured; skipped: {_skipped(result.skipped)}"
            )
            print(format_table(result))
            return 0
        b = _load(args.compare)
        result = compare_point_jsons(a, b, sources=(args.json, args.compare), **options)
    except (ValueError, OSError) as e:
        print(f"semantic_variance: error: {e}", file=sys.stderr)
        return 1
    print(f"a = {args.json} (skipped: {_skipped(result.skipped_a)})")
    print(f"b = {args.compare} (skipped: {_skipped(result.skipped_b)})")
    print(
        f"{result.matched} objects matched by id; "
        f"{result.only_in_a} only in a, {result.only_in_b} only in b"
    )
    print(format_comparison(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
