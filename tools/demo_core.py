"""What tools/demo.py does once its arguments are parsed (run that; see its --help).

Kept apart from the command so that `demo.py --help` answers before torch and
detectron2 are imported."""
import fnmatch
import glob
import os
import sys
import uuid

import numpy as np

import cpr_d2  # noqa: F401,I001  (first: registers datasets and models, quiets fvcore)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils

from cpr_d2.data import image_io, register_point_coco
from cpr_d2.engine import setup_cfg
from cpr_d2.engine.predictor import PointPredictor, PointRefiner, model_metadata, tile_grid
from cpr_d2.utils.io import save_image_atomic
from cpr_d2.utils.visualizer import PointVisualizer

ARCHITECTURES = ("P2PNet", "CPRNet")


class DemoError(RuntimeError):
    """Some inputs could not be drawn; `written` lists what was, `failed` (path, reason)."""

    def __init__(self, message, written, failed):
        super().__init__(message)
        self.written = written
        self.failed = failed


# ---------------------------------------------------------------------------- inputs, outputs

def output_paths(inputs, output_dir, suffix=".png"):
    """<output_dir>/<stem><suffix> per input; refuses to replace an input or to write two
    inputs to one file."""
    sources = {os.path.realpath(p): p for p in inputs}
    outputs, taken = [], {}
    for path in inputs:
        out = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + suffix)
        real = os.path.realpath(out)
        if real in sources:
            raise ValueError(f"--output {output_dir}: writing {out} would overwrite the input "
                             f"{sources[real]}; choose another --output folder")
        if real in taken:
            raise ValueError(f"{taken[real]} and {path} would both be drawn to {out}; "
                             "give them different names or draw them separately")
        taken[real] = path
        outputs.append(out)
    return outputs


def read_image(path, image_format, max_pixels=image_io.DEFAULT_MAX_PIXELS,
               normalize="percentile"):
    """An HWC uint8 image in `image_format`, read as training reads it
    (cpr_d2.data.image_io.read_image): grey, RGBA and palette files converted, 16-bit and
    float images scaled to 0..255 by `normalize` (INPUT.NORMALIZE). An image of more than
    `max_pixels` pixels (INPUT.MAX_IMAGE_PIXELS; 0 = no limit) is refused from its header,
    before it is decoded; the error says to raise the limit with a config override on the
    command line (e.g. INPUT.MAX_IMAGE_PIXELS 400000000). Images within the limit but
    larger than --max-size are predicted in tiles. Errors name the file."""
    return image_io.read_image(path, format=image_format, max_pixels=max_pixels,
                               normalize=normalize)


def check_headers(paths, max_pixels=image_io.DEFAULT_MAX_PIXELS):
    """Refuse, from their headers alone, the files read_image would refuse before decoding
    (missing, not an image, more than `max_pixels` pixels): run on the inputs named
    explicitly, whose errors are fatal, before the model is loaded."""
    for path in paths:
        width, height, _ = image_io.image_header(path)
        image_io.check_pixel_limit(path, width, height, max_pixels)


def write_image(rgb, path):
    """Write an RGB array as PNG atomically (a kill never leaves a partial file)."""
    save_image_atomic(np.ascontiguousarray(rgb), path)
    return path


# ---------------------------------------------------------------------------- prediction
# (cpr_d2.engine.predictor.PointPredictor: the whole image, or tiles for large images)

def _tiling_note(name, height, width, max_size):
    """Says when an image is predicted in tiles; returns how many."""
    count = len(tile_grid(height, width, max_size))
    if count > 1:
        print(f"{name}: {width}x{height} px > --max-size {max_size}, predicted in {count} tiles")
    return count


def draw_predictions(rgb, metadata, instances, threshold):
    vis = PointVisualizer(rgb, metadata)
    return vis.draw_point_predictions(instances, score_threshold=threshold,
                                      labels=True).get_image()


# ---------------------------------------------------------------------------- the runs

def _skip(path, error, failed):
    print(f"skipped {path}: {error}", file=sys.stderr)
    failed.append((path, str(error)))


def run_p2p_images(cfg, predictor, inputs, output_dir, args):
    written, failed = [], []
    outputs = output_paths([p for p, _ in inputs], output_dir)
    metadata = model_metadata(cfg)
    for (path, explicit), out in zip(inputs, outputs):
        try:
            image = read_image(path, cfg.INPUT.FORMAT, cfg.INPUT.MAX_IMAGE_PIXELS,
                               cfg.INPUT.NORMALIZE)
        except (OSError, ValueError) as e:
            if explicit:
                raise
            _skip(path, e, failed)
            continue
        height, width = image.shape[:2]
        tiles = _tiling_note(path, height, width, args.max_size)
        instances = predictor.predict_large(image, tile=args.max_size)
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        written.append(write_image(
            draw_predictions(rgb, metadata, instances, args.confidence_threshold), out))
        count = int((instances.scores >= args.confidence_threshold).sum())
        # The soft count was fitted on whole training images: not for a tiled image.
        soft = None if tiles > 1 else predictor.count(instances)
        print(f"wrote {out}: {count} points scoring >= {args.confidence_threshold:.3g}"
              + ("" if soft is None else f"; soft count {soft}"))
    return written, failed


def _frame_to_format(frame_bgr, image_format):
    if image_format == "BGR":
        return frame_bgr
    if image_format == "RGB":
        return np.ascontiguousarray(frame_bgr[:, :, ::-1])
    raise ValueError(f"--video needs INPUT.FORMAT 'BGR' or 'RGB', got '{image_format}'")


def run_p2p_video(cfg, predictor, path, output_dir, args):
    """Draw P2PNet's points on every frame of `path`; writes <output>/<stem>_points.mp4."""
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--video {path}: no such file")
    out = output_paths([path], output_dir, suffix="_points.mp4")[0]
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"--video {path}: cannot open it as a video")
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else 25.0
    metadata = model_metadata(cfg)
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, f".{uuid.uuid4().hex[:8]}.tmp.mp4")
    writer, frames = None, 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            height, width = frame.shape[:2]
            if frames == 0:
                _tiling_note(path, height, width, args.max_size)
            instances = predictor.predict_large(_frame_to_format(frame, cfg.INPUT.FORMAT),
                                                tile=args.max_size, progress=False)
            drawn = draw_predictions(frame[:, :, ::-1], metadata, instances,
                                     args.confidence_threshold)
            if writer is None:
                writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (width, height))
                if not writer.isOpened():
                    raise RuntimeError(f"cannot write the video {out} (codec mp4v)")
            writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
            frames += 1
        if writer is not None:
            writer.release()
            writer = None
        if frames == 0:
            raise ValueError(f"--video {path}: no frame could be read")
        os.replace(tmp, out)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {out} ({frames} frames)")
    return out


_NEEDS_POINTS = ("CPRNet refines annotated points: pass --json POINTS.json --image-root DIR "
                 "with the points of the image(s)")


def _cpr_dataset(cfg, args):
    """(dataset name, temporary?) holding the points to refine."""
    if args.json:
        name = f"demo_{uuid.uuid4().hex[:8]}"
        register_point_coco(name, args.json, args.image_root)
        return name, True
    if cfg.DATASETS.TEST:
        return cfg.DATASETS.TEST[0], False
    raise ValueError(f"{_NEEDS_POINTS} (or set DATASETS.TEST to a point dataset)")


def _annotated(record):
    return any(not a.get("iscrowd", 0) for a in record.get("annotations", []))


def _select_records(records, patterns, name, max_images):
    """([(record, explicit)], failed): the annotated records of `patterns`, which are
    files, folders or globs on disk (matched to the dataset by path, else by file
    name) or file names / globs of the dataset's images; without patterns the first
    `max_images` annotated records."""
    if not patterns:
        return [(r, False) for r in records if _annotated(r)][:max_images], []
    by_path = {os.path.realpath(r["file_name"]): r for r in records}
    by_name = {}
    for r in records:
        by_name.setdefault(os.path.basename(r["file_name"]), r)
    chosen, failed, seen = [], [], set()

    def add(record, explicit):
        if id(record) not in seen:
            seen.add(id(record))
            chosen.append((record, explicit))

    for pattern in patterns:
        on_disk = os.path.exists(pattern) or (
            glob.has_magic(pattern) and any(os.path.isfile(f) for f in glob.glob(pattern)))
        if on_disk:
            for path, explicit in image_io.find_images([pattern]):
                record = by_path.get(os.path.realpath(path)) or by_name.get(os.path.basename(path))
                if record is None or not _annotated(record):
                    error = f"{path}: no point annotations in dataset '{name}'; {_NEEDS_POINTS}"
                    if explicit:
                        raise ValueError(error)
                    _skip(path, error, failed)
                    continue
                add(record, explicit)
            continue
        matches = [r for r in records if _annotated(r) and (
            fnmatch.fnmatchcase(os.path.basename(r["file_name"]), pattern)
            or fnmatch.fnmatchcase(r["file_name"], pattern))]
        if not matches:
            raise ValueError(f"--input {pattern}: no such file, and no annotated image of "
                             f"dataset '{name}' has that name; {_NEEDS_POINTS}")
        for record in matches:
            add(record, not glob.has_magic(pattern))
    return chosen, failed


def select_cpr_records(cfg, args):
    """([(record, explicit)], metadata, failed): the images whose points CPRNet refines."""
    name, temporary = _cpr_dataset(cfg, args)
    try:
        records = DatasetCatalog.get(name)
        metadata = model_metadata(cfg, name)
    finally:
        if temporary:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    chosen, failed = _select_records(records, args.input, name, args.max_images)
    return chosen, metadata, failed


def run_cpr(cfg, refiner, chosen, outputs, metadata):
    written, failed = [], []
    for (record, explicit), out in zip(chosen, outputs):
        try:
            image = read_image(record["file_name"], cfg.INPUT.FORMAT, cfg.INPUT.MAX_IMAGE_PIXELS,
                               cfg.INPUT.NORMALIZE)
        except (OSError, ValueError) as e:
            if explicit:
                raise
            _skip(record["file_name"], e, failed)
            continue
        anns = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
        inst = refiner(image, [a["point"] for a in anns], [a["category_id"] for a in anns])
        vis = PointVisualizer(utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT), metadata)
        drawn = vis.draw_refinement(inst.coarse_points, inst.pred_points,
                                    inst.pred_classes).get_image()
        written.append(write_image(drawn, out))
        print(f"wrote {out}")
    return written, failed


def run(args):
    """tools/demo.py with its parsed arguments: the pictures written (raises DemoError
    when some inputs could not be drawn)."""
    cfg = setup_cfg(args, output_subdir="demo")
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in ARCHITECTURES:
        raise ValueError(f"{args.config_file} builds {arch}; the demo runs {ARCHITECTURES}")
    cpr = arch == "CPRNet"
    if cpr and args.video:
        raise ValueError("--video runs P2PNet; CPRNet needs annotated points per image")
    if not cpr and not (args.input or args.video):
        raise ValueError("nothing to draw: pass --input IMG|DIR|GLOB [...] or --video FILE")
    output_dir = args.output or cfg.OUTPUT_DIR
    # Inputs and outputs are checked before the model is loaded.
    if cpr:
        chosen, metadata, failed = select_cpr_records(cfg, args)
        outputs = output_paths([r["file_name"] for r, _ in chosen], output_dir)
        check_headers([r["file_name"] for r, explicit in chosen if explicit],
                      cfg.INPUT.MAX_IMAGE_PIXELS)
    else:
        inputs, failed = image_io.find_images(args.input), []
        output_paths([p for p, _ in inputs], output_dir)
        check_headers([p for p, explicit in inputs if explicit], cfg.INPUT.MAX_IMAGE_PIXELS)
    if cpr:
        written, more = run_cpr(cfg, PointRefiner(cfg), chosen, outputs, metadata)
    else:
        predictor = PointPredictor(cfg)
        if args.confidence_threshold is None:
            calibrated = predictor.count_threshold
            args.confidence_threshold = 0.3 if calibrated is None else calibrated
            if calibrated is not None:
                print(f"drawing and counting points scoring >= {calibrated:.3g}, the threshold "
                      "this model chose on its training images")
        written, more = run_p2p_images(cfg, predictor, inputs, output_dir, args) if inputs \
            else ([], [])
        if args.video:
            written.append(run_p2p_video(cfg, predictor, args.video, output_dir, args))
    failed += more
    if failed:
        lines = "\n".join(f"  {p}: {reason}" for p, reason in failed)
        raise DemoError(f"{len(failed)} input(s) could not be drawn:\n{lines}", written, failed)
    return written
