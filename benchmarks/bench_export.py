"""The exported P2PNet on the CPU against the eager model: one 1024 x 1024 px image.

    python benchmarks/bench_export.py [--config-file configs/forest/p2p_R18_s8.yaml]
        [--weights model_final.pth] [--size 1024] [--repeats 5]

Eager: PointPredictor(image) (detectron2, torch). ONNX: onnxruntime on the export of
tools/export_model.py plus p2p_decode (numpy), the same image. TorchScript: the traced
network plus p2p_decode. Medians of --repeats runs after one warm-up, in one process.
Without --weights the P2PNet is untrained (the cost is the same).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import cpr_d2  # noqa: F401
from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data.classes import resolve_num_classes
from cpr_d2.engine.predictor import PointPredictor
from cpr_d2.export import export_p2pnet


def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/forest/p2p_R18_s8.yaml")
    parser.add_argument("--weights", default="")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(args.config_file)
    resolve_num_classes(cfg, training=True)
    folder = tempfile.mkdtemp(prefix="bench_export_")
    if not args.weights:
        from detectron2.modeling import build_model

        torch.manual_seed(0)
        args.weights = os.path.join(folder, "m.pth")
        torch.save({"model": build_model(cfg).state_dict()}, args.weights)
    cfg.MODEL.WEIGHTS = args.weights
    predictor = PointPredictor(cfg)
    export_p2pnet(predictor, folder)
    sys.path.insert(0, folder)
    import p2p_decode

    params = json.load(open(os.path.join(folder, "p2pnet.json")))
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    session = ort.InferenceSession(os.path.join(folder, "p2pnet.onnx"),
                                   providers=["CPUExecutionProvider"])
    traced = torch.jit.load(os.path.join(folder, "p2pnet.ts"))

    # Every view of the config (MODEL.P2PNET.TEST_FLIPS) on both sides, as the eager
    # model predicts it.
    def decoded(run):
        views = p2p_decode.prepare_views(image, params)
        outputs = [tuple(t[0] for t in run(batch)) for batch, _ in views]
        return p2p_decode.decode_views(outputs, views[0][1], params)

    def onnx_run():
        return decoded(lambda batch: session.run(None, {"image": batch}))

    def ts_run():
        def run(batch):
            with torch.no_grad():
                return tuple(t.numpy() for t in traced(torch.from_numpy(batch)))
        return decoded(run)

    eager = median_seconds(lambda: predictor(image), args.repeats)
    onnx = median_seconds(onnx_run, args.repeats)
    script = median_seconds(ts_run, args.repeats)
    print(f"{args.size} x {args.size} px, {1 + len(params.get('test_flips') or ())} view(s), "
          f"{torch.get_num_threads()} torch threads, "
          f"onnxruntime {ort.__version__}, median of {args.repeats}")
    print("| model | ms | ratio eager / this |")
    print("| --- | ---: | ---: |")
    for name, t in (("eager (PointPredictor)", eager), ("ONNX + p2p_decode", onnx),
                    ("TorchScript + p2p_decode", script)):
        print(f"| {name} | {1e3 * t:.0f} | {eager / t:.2f} |")


if __name__ == "__main__":
    main()
