#!/usr/bin/env python
"""Export a trained P2PNet to TorchScript and ONNX, for use without detectron2.

    python tools/export_model.py --config-file configs/forest/p2p_R18_s8.yaml \\
        --output export/ [--format torchscript onnx] \\
        MODEL.WEIGHTS output/forest/p2p_R18_s8/model_final.pth

Writes to --output: p2pnet.ts (TorchScript) and/or p2pnet.onnx (ONNX, opset 17,
any batch and image size), p2pnet.json (what decoding needs: stride, anchors,
thresholds, NMS, the class names and ids, the counting threshold) and
p2p_decode.py (numpy only: prepare an image, decode the raw outputs into points).
The graph ends at the raw outputs (class logits and point offsets per cell);
p2p_decode.decode turns them into the points, scores and classes the eager
model gives. See docs/predict.md ("Exported models") for a ten-line example with
numpy and onnxruntime.
"""
import sys

from cli_args import config_parser

FORMATS = ("torchscript", "onnx")  # cpr_d2.export.EXPORT_FORMATS


def parse_args(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--output", required=True, help="folder to write the export to")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS),
                        help="what to export (default: both)")
    return parser.parse_args(argv)


def main(args):
    # Imported here, after the arguments are parsed: --help answers without them.
    import os

    from cpr_d2.engine import setup_cfg
    from cpr_d2.engine.predictor import PointPredictor
    from cpr_d2.export import export_p2pnet

    if os.path.isfile(args.output):
        raise ValueError(f"--output {args.output} is a file; give a folder")
    if "onnx" in args.format:
        try:
            import onnx  # noqa: F401  (torch.onnx.export needs it)
        except ImportError:
            raise ImportError("--format onnx needs the onnx package (pip install onnx; "
                              "tools/setup_env.sh installs it)") from None
    cfg = setup_cfg(args, output_subdir="export")
    predictor = PointPredictor(cfg)
    written = export_p2pnet(predictor, args.output, args.format)
    print("\n".join(f"wrote {p}" for p in written))
    return written


if __name__ == "__main__":
    main(parse_args())
    sys.exit(0)
