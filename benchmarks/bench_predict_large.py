"""PointPredictor.predict_large on a survey-sized image: time and peak memory.

    python benchmarks/bench_predict_large.py [--size 10000] [--tile 2048] [--batch-size 1]
        [--config-file configs/forest/p2p_R18_s8.yaml] [--weights model_final.pth]

The image (--size x --size px, RGB) is the forest test tiles repeated, built in
memory. Without --weights the P2PNet is untrained (the cost is the same). Prints
the tiles, the seconds, and the process's peak resident memory (ru_maxrss) before
the prediction (the image and the model) and after it.
"""
import argparse
import resource
import time

import numpy as np
import torch

import cpr_d2  # noqa: F401
from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import image_io
from cpr_d2.data.classes import resolve_num_classes
from cpr_d2.engine.predictor import PointPredictor, tile_grid


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def survey_image(size):
    """A size x size BGR image tiled with the forest test tiles, filled in place (no
    intermediate copies, so the peak before predicting is the image, the model and
    torch)."""
    from detectron2.data import DatasetCatalog

    tiles = [image_io.read_image(r["file_name"], format="BGR")
             for r in DatasetCatalog.get("forest_test")]
    image = np.empty((size, size, 3), np.uint8)
    k = 0
    for y in range(0, size, min(t.shape[0] for t in tiles)):
        x = 0
        while x < size:
            t = tiles[k % len(tiles)]
            k += 1
            h, w = min(t.shape[0], size - y), min(t.shape[1], size - x)
            image[y:y + h, x:x + w] = t[:h, :w]
            x += w
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/forest/p2p_R18_s8.yaml")
    parser.add_argument("--weights", default="")
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(args.config_file)
    resolve_num_classes(cfg, training=True)
    if not args.weights:
        from detectron2.modeling import build_model

        import tempfile

        torch.manual_seed(0)
        args.weights = tempfile.mkstemp(suffix=".pth")[1]
        torch.save({"model": build_model(cfg).state_dict()}, args.weights)
    cfg.MODEL.WEIGHTS = args.weights
    predictor = PointPredictor(cfg)
    image = survey_image(args.size)
    tiles = len(tile_grid(args.size, args.size, args.tile))
    before = peak_mib()
    print(f"{args.size} x {args.size} px image ({image.nbytes / 2**20:.0f} MiB), {tiles} tiles "
          f"of {args.tile} px, batch {args.batch_size}, {torch.get_num_threads()} threads; "
          f"peak memory before predicting: {before:.0f} MiB")
    start = time.perf_counter()
    inst = predictor.predict_large(image, tile=args.tile, batch_size=args.batch_size,
                                   progress=True)
    seconds = time.perf_counter() - start
    print(f"predict_large: {len(inst)} points in {seconds:.1f} s ({tiles / seconds:.2f} tiles/s); "
          f"peak memory {peak_mib():.0f} MiB (the process, image and model included)")


if __name__ == "__main__":
    main()
