#!/usr/bin/env python
"""Run a trained P2PNet on images and write its points as data.

    python tools/predict.py --config-file configs/forest/p2p_R18_s8.yaml \\
        --input IMG|DIR|GLOB [IMG ...] --output points.json|points.csv \\
        [--min-score S] [--tile 2048] [--batch-size 1] \\
        MODEL.WEIGHTS output/forest/p2p_R18_s8/model_final.pth

The output's extension chooses the format:
  .json  a point json (the project's format, see cpr_d2/data/datasets/point_coco.py):
         "images" (id, file_name, width, height), "categories" (the ids and names
         the model was trained with) and one annotation per point ("point": [x, y],
         "score", "category_id"). It loads with register_point_coco(name, json,
         image_root="") as a dataset of the predicted points.
  .csv   one row per point: image,x,y,class,score (class: the class name).
Points are in the pixels of each image (x right, y down, origin at the top-left
corner of the image). Only points scoring at least --min-score are written
(default: the counting threshold the model chose on its training data,
MODEL.P2PNET.COUNT_CALIBRATION, else 0.3).

Images larger than --tile pixels on a side are predicted in overlapping tiles
(cpr_d2.engine.predictor.PointPredictor.predict_large), --batch-size tiles at a
time. --input takes files, folders (their .jpg/.jpeg/.png/.tif/.tiff/.bmp files,
sorted) and glob patterns; images are read as training reads them (16-bit and
float images scaled by INPUT.NORMALIZE, INPUT.MAX_IMAGE_PIXELS checked from the
header).

Nothing is lost when a run stops: each image's points are appended to
<output>.partial.jsonl as soon as it is done, and a rerun of the same command
skips the images found there (or in an existing output) and goes on. The output
is written atomically at the end, and the partial file removed. An image that
cannot be read is reported, the others are still done, and the exit status is 1.
"""
import json
import os
import sys

from cli_args import config_parser, hand_back_overrides

FORMATS = (".json", ".csv")


def parse_args(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders of images or glob patterns")
    parser.add_argument("--output", required=True, help="points.json or points.csv to write")
    parser.add_argument("--min-score", type=float, default=None,
                        help="write points scoring at least this (default: the model's "
                             "counting threshold when it has one, else 0.3)")
    parser.add_argument("--tile", type=int, default=2048,
                        help="larger images are predicted in tiles of at most this many pixels")
    parser.add_argument("--batch-size", type=int, default=1, help="tiles per network pass")
    args = parser.parse_args(argv)
    hand_back_overrides(args)
    if not args.input:
        parser.error("--input needs at least one image, folder or pattern")
    if args.tile < 64:
        parser.error(f"--tile must be at least 64 pixels, got {args.tile}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    return args


def check_output(output, inputs):
    """The output's format (".json" or ".csv"), after checking, before any work, that the
    file can be written (cpr_d2.utils.io.check_output_file: not a folder, not one of the
    inputs, in a folder this user can create files in) and has a known extension."""
    from cpr_d2.utils.io import check_output_file

    check_output_file(output, example="points.json", inputs=inputs,
                      inputs_are="one of the input images", inputs_fix="choose another name")
    ext = os.path.splitext(output)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"--output {output}: give a file name ending in .json (a point json) "
                         "or .csv (image,x,y,class,score)")
    return ext


def image_row(path, height, width, points, scores, classes):
    """One image's predictions, as written to the partial file."""
    return {"file_name": path, "height": int(height), "width": int(width),
            "points": [[round(float(x), 3), round(float(y), 3)] for x, y in points],
            "scores": [round(float(s), 5) for s in scores],
            "classes": [int(c) for c in classes]}


def read_done(output, partial, settings):
    """{file name: row} of the images a previous run with the same `settings` finished:
    those of an existing output json, and the complete lines of the partial file (a line
    cut short by a kill is the image being predicted then: it is done again). A previous
    run with other settings (model, score threshold, tiles) is refused."""
    done = {}
    if os.path.isfile(output):
        data = _read_json(output)
        _same_settings(output, data.get("info", {}).get("settings"), settings)
        done.update(_rows_from_json(output, data))
    if os.path.isfile(partial):
        with open(partial, encoding="utf-8") as f:
            for n, line in enumerate(f):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if n == 0:
                    _same_settings(partial, row.get("settings"), settings)
                elif "file_name" in row:
                    done[row["file_name"]] = row
    return done


def _same_settings(path, found, settings):
    if found != settings:
        differ = sorted(k for k in set(settings) | set(found or {})
                        if (found or {}).get(k) != settings.get(k))
        raise ValueError(f"{path} was written by a run with other settings ({', '.join(differ)}: "
                         f"{ {k: (found or {}).get(k) for k in differ} } then, "
                         f"{ {k: settings.get(k) for k in differ} } now); rerun with those, or "
                         "move it away to start afresh")


def _read_json(path):
    from cpr_d2.data.point_json import read_json

    return read_json(path, "--output", fix="it exists but is not a json of predictions; move "
                     "it away or choose another --output")


def _rows_from_json(path, data):
    try:
        order = {c["id"]: k for k, c in enumerate(data["categories"])}
        rows = {im["id"]: image_row(im["file_name"], im["height"], im["width"], [], [], [])
                for im in data["images"]}
        for a in data["annotations"]:
            row = rows[a["image_id"]]
            row["points"].append(a["point"])
            row["scores"].append(a["score"])
            row["classes"].append(order[a["category_id"]])
    except (KeyError, TypeError) as e:
        raise ValueError(f"--output {path} exists but is not a point json this tool wrote "
                         f"({type(e).__name__}: {e}); move it away or choose another "
                         "--output") from None
    return {row["file_name"]: row for row in rows.values()}


def write_output(output, rows, names, category_ids, settings):
    """The json or csv of `rows` (in input order), written atomically."""
    from cpr_d2.utils.io import write_json_atomic, write_text_atomic

    if output.lower().endswith(".csv"):
        import csv
        import io

        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["image", "x", "y", "class", "score"])
        for row in rows:
            for (x, y), s, c in zip(row["points"], row["scores"], row["classes"]):
                writer.writerow([row["file_name"], x, y, names[c], s])
        write_text_atomic(text.getvalue(), output)
        return
    images, annotations = [], []
    for image_id, row in enumerate(rows, start=1):
        images.append({"id": image_id, "file_name": row["file_name"], "height": row["height"],
                       "width": row["width"]})
        for (x, y), s, c in zip(row["points"], row["scores"], row["classes"]):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[c], "point": [x, y], "score": s})
    categories = [{"id": i, "name": n} for i, n in zip(category_ids, names)]
    info = {"description": "points predicted by tools/predict.py", "settings": settings}
    write_json_atomic({"info": info, "images": images, "annotations": annotations,
                       "categories": categories}, output)


def main(args):
    """Returns (rows written, [(path, reason)] of the images that could not be read)."""
    # Imported here, after the arguments are parsed: --help answers without them.
    from cpr_d2.data import image_io
    from cpr_d2.engine import setup_cfg
    from cpr_d2.engine.predictor import PointPredictor

    inputs = image_io.find_images(args.input)
    ext = check_output(args.output, [p for p, _ in inputs])
    if ext == ".csv" and os.path.exists(args.output):
        raise ValueError(f"--output {args.output} exists; a csv cannot be continued (it holds "
                         "no image sizes and no images without points): move it away, or "
                         "write .json")
    partial = args.output + ".partial.jsonl"
    cfg = setup_cfg(args, output_subdir="predict")
    predictor = PointPredictor(cfg)
    names = list(predictor.metadata.thing_classes)
    threshold = args.min_score
    if threshold is None:
        threshold = 0.3 if predictor.count_threshold is None else predictor.count_threshold
    settings = {"weights": os.path.abspath(cfg.MODEL.WEIGHTS), "min_score": float(threshold),
                "tile": args.tile}
    done = read_done(args.output, partial, settings)
    todo = [(p, explicit) for p, explicit in inputs if p not in done]
    print(f"{len(inputs)} images: {len(inputs) - len(todo)} done before, {len(todo)} to "
          f"predict; writing points scoring >= {threshold:.3g} to {args.output}")
    failed = []
    fresh = not os.path.isfile(partial) or os.path.getsize(partial) == 0
    with open(partial, "a", encoding="utf-8") as log:
        if fresh:
            log.write(json.dumps({"settings": settings}) + "\n")
        for k, (path, explicit) in enumerate(todo, start=1):
            try:
                image = image_io.read_image(path, cfg.INPUT.FORMAT, cfg.INPUT.MAX_IMAGE_PIXELS,
                                            cfg.INPUT.NORMALIZE)
            except (OSError, ValueError) as e:
                print(f"skipped {path}: {e}", file=sys.stderr)
                failed.append((path, str(e)))
                continue
            inst = predictor.predict_large(image, tile=args.tile, batch_size=args.batch_size)
            keep = inst.scores >= threshold
            row = image_row(path, *image.shape[:2], inst.pred_points[keep].tolist(),
                            inst.scores[keep].tolist(), inst.pred_classes[keep].tolist())
            log.write(json.dumps(row) + "\n")
            log.flush()
            os.fsync(log.fileno())
            done[path] = row
            print(f"[{k}/{len(todo)}] {path}: {len(row['points'])} points")
    rows = [done[p] for p, _ in inputs if p in done]
    write_output(args.output, rows, names, predictor.category_ids, settings)
    os.remove(partial)
    total = sum(len(r["points"]) for r in rows)
    print(f"wrote {args.output}: {total} points on {len(rows)} images")
    if failed:
        print(f"{len(failed)} image(s) could not be read:\n"
              + "\n".join(f"  {p}: {why}" for p, why in failed), file=sys.stderr)
    return rows, failed


if __name__ == "__main__":
    _, unreadable = main(parse_args())
    sys.exit(1 if unreadable else 0)
