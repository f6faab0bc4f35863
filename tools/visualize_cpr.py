#!/usr/bin/env python
"""Draw what CPRNet does to annotated points: arrows from each coarse point to its
refined point over the bag-score heatmap (with adaptive regions, also each
object's last sampling disc as a dashed circle), and, given several checkpoints,
the trace of the refined points over training as an animated GIF.

    python tools/visualize_cpr.py --config-file configs/forest/cpr_R18_s8_r2.yaml \\
        --dataset forest --output output/forest/vis [--images 4] \\
        [--checkpoint a.pth --checkpoint b.pth ...]  [MODEL.WEIGHTS model_final.pth]

Draws the first --images images that have annotated objects. Writes
<output>/<image_id>_refine.png per image (from MODEL.WEIGHTS, or the
last --checkpoint) and, with two or more checkpoints, <image_id>_trace.gif.
"""
import os

from cli_args import config_parser


def parse_args(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="a registered point dataset")
    parser.add_argument("--output", required=True, help="folder for the pictures")
    parser.add_argument("--images", type=int, default=4, help="how many images to draw")
    parser.add_argument("--checkpoint", action="append", default=[], dest="checkpoints",
                        help="a checkpoint; repeat it, in training order, for the trace GIF")
    return parser.parse_args(argv)


def refine_images(model, mapper, records):
    import torch

    model.eval()
    with torch.no_grad():
        return [model([mapper(r)])[0]["instances"].to("cpu") for r in records]


def draw(image, metadata, inst, caption=None):
    from cpr_d2.utils.visualizer import PointVisualizer

    vis = PointVisualizer(image, metadata, scale=2.0)
    if inst.has("bag_points"):
        vis.draw_bag_scores(inst.bag_points, inst.bag_scores)
    if inst.has("regions"):  # adaptive CPRNet: why a small object moved little, or stayed
        vis.draw_regions(inst.region_centres, inst.regions, inst.pred_classes)
    vis.draw_refinement(inst.coarse_points, inst.pred_points, inst.pred_classes)
    if caption:
        vis.draw_text(caption, (4, 4), color="white", horizontal_alignment="left")
    return vis.output.get_image()


def main(args):
    # Imported here, after the arguments are parsed: --help answers without them.
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils as utils
    from PIL import Image

    from cpr_d2.data import PointDatasetMapper
    from cpr_d2.engine import Trainer, load_inference_weights, setup_cfg

    cfg = setup_cfg(args, output_subdir="visualize_cpr")
    cfg.defrost()
    cfg.MODEL.CPR.RETURN_BAG_SCORES = True
    cfg.freeze()
    weights = args.checkpoints or [cfg.MODEL.WEIGHTS]
    if not weights[-1]:
        raise ValueError("no model to draw: pass MODEL.WEIGHTS <checkpoint> or --checkpoint")
    # Images without annotated objects have nothing to refine: draw the first that have.
    records = [r for r in DatasetCatalog.get(args.dataset) if r.get("annotations")]
    if not records:
        raise ValueError(f"dataset {args.dataset!r} has no image with an annotated object "
                         "to draw; pass a dataset with point annotations")
    records = records[: args.images]
    metadata = MetadataCatalog.get(args.dataset)
    mapper = PointDatasetMapper(cfg, is_train=False, with_annotations=True)
    model = Trainer.build_model(cfg)
    frames = []  # per checkpoint, per image
    for path in weights:
        load_inference_weights(model, path)
        frames.append(refine_images(model, mapper, records))
    os.makedirs(args.output, exist_ok=True)
    written = []
    for k, record in enumerate(records):
        image = utils.read_image(record["file_name"], format="RGB")
        name = str(record["image_id"])
        final = draw(image, metadata, frames[-1][k])
        path = os.path.join(args.output, f"{name}_refine.png")
        Image.fromarray(final).save(path)
        written.append(path)
        if len(weights) > 1:
            gif = [Image.fromarray(draw(image, metadata, per_ckpt[k], os.path.basename(w)))
                   for w, per_ckpt in zip(weights, frames)]
            path = os.path.join(args.output, f"{name}_trace.gif")
            gif[0].save(path, save_all=True, append_images=gif[1:], duration=600, loop=0)
            written.append(path)
    print("\n".join(f"wrote {p}" for p in written))
    return written


if __name__ == "__main__":
    main(parse_args())
