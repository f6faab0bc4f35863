"""P2PNet learns: a short CPU training on a small synthetic two-class set (red discs and
green squares on noise) reaches point AP(tau = 0.5) >= 0.9 on its own training images."""
import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointDatasetMapper
from cpr_d2.evaluation import evaluate_point_ap

from .test_cpr_learning import mapped, train_on

SIZE = 96


def two_class_records(num_images, seed):
    """Images with 2-4 objects each: class 0 = red discs, class 1 = green squares (BGR
    arrays), radius/half-side 7-11 px; the point is the true centre."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    records = []
    for i in range(num_images):
        img = rng.normal(40, 10, (SIZE, SIZE, 3))
        anns, placed = [], []
        count = rng.integers(2, 5)
        while len(placed) < count:
            r = rng.uniform(7, 11)
            c = rng.uniform(r + 1, SIZE - r - 1, 2)
            if any(np.hypot(*(c - o)) < r + ro + 6 for o, ro in placed):
                continue
            placed.append((c, r))
            cls = int(rng.integers(0, 2))
            if cls == 0:
                inside = np.hypot(xs - c[0], ys - c[1]) < r
                img[inside] = (30, 30, 220)
            else:
                inside = (np.abs(xs - c[0]) < r) & (np.abs(ys - c[1]) < r)
                img[inside] = (30, 220, 30)
            anns.append({"id": len(anns), "point": c.tolist(), "category_id": cls, "iscrowd": 0,
                         "bbox": [c[0] - r, c[1] - r, 2 * r, 2 * r], "bbox_mode": BoxMode.XYWH_ABS})
        image = np.clip(img, 0, 255).astype(np.uint8)
        records.append({"image_id": i, "height": SIZE, "width": SIZE, "annotations": anns,
                        "image_array": image})
    return records


def test_p2pnet_reaches_ap50_on_its_training_set():
    torch.manual_seed(0)
    np.random.seed(0)  # detectron2's random flips
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file("configs/forest/Base-forest.yaml")
    cfg.MODEL.META_ARCHITECTURE = "P2PNet"
    cfg.MODEL.P2PNET.NUM_CLASSES = 2
    cfg.MODEL.P2PNET.NUM_CONVS = 2
    cfg.MODEL.P2PNET.CONV_CHANNELS = 64
    cfg.MODEL.P2PNET.NMS_BOX_SIZE = 12.0
    model = build_model(cfg)
    records = two_class_records(8, seed=3)
    train_on(model, records, 200)
    test_mapper = PointDatasetMapper(False, augmentations=[])
    with torch.no_grad():
        outputs = model(mapped(records, test_mapper))
    gts = [{"boxes": np.array([a["bbox"] for a in r["annotations"]]),
            "classes": np.array([a["category_id"] for a in r["annotations"]])} for r in records]
    dets = [{"points": o["instances"].pred_points.numpy(), "scores": o["instances"].scores.numpy(),
             "classes": o["instances"].pred_classes.numpy()} for o in outputs]
    metrics = evaluate_point_ap(gts, dets, 2, clean=True).metrics()
    print({k: round(v, 3) for k, v in metrics.items() if "range" not in k})
    assert metrics["AP@0.5"] >= 0.9
