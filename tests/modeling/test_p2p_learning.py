"""P2PNet learns: a short CPU training on a small synthetic two-class set (red discs and
green squares on noise) reaches point AP(tau = 0.5) >= 0.9 on its own training images."""
import numpy as np
import torch
from detectron2.data import transforms as T
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


def small_p2pnet_cfg():
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file("configs/forest/Base-forest.yaml")
    cfg.MODEL.META_ARCHITECTURE = "P2PNet"
    cfg.MODEL.P2PNET.NUM_CLASSES = 2
    cfg.MODEL.P2PNET.NUM_CONVS = 2
    cfg.MODEL.P2PNET.CONV_CHANNELS = 64
    cfg.MODEL.P2PNET.NMS_BOX_SIZE = 12.0
    return cfg


def predict(model, records):
    with torch.no_grad():
        return model(mapped(records, PointDatasetMapper(False, augmentations=[])))


def point_ap(records, outputs):
    gts = [{"boxes": np.array([a["bbox"] for a in r["annotations"]]),
            "classes": np.array([a["category_id"] for a in r["annotations"]])} for r in records]
    dets = [{"points": o["instances"].pred_points.numpy(), "scores": o["instances"].scores.numpy(),
             "classes": o["instances"].pred_classes.numpy()} for o in outputs]
    return evaluate_point_ap(gts, dets, 2, clean=True).metrics()


def test_p2pnet_reaches_ap50_on_its_training_set():
    torch.manual_seed(0)
    np.random.seed(0)  # detectron2's random flips
    model = build_model(small_p2pnet_cfg())
    records = two_class_records(8, seed=3)
    train_on(model, records, 200)
    metrics = point_ap(records, predict(model, records))
    print({k: round(v, 3) for k, v in metrics.items() if "range" not in k})
    assert metrics["AP@0.5"] >= 0.9


def test_the_recipe_converges_alike_over_seeds_and_counts_unseen_images():
    """With the forest recipe's augmentations (flips both ways, 90-degree rotations,
    colour jitter), three seeds reach nearly the same AP on unseen images, and a
    counting threshold chosen on the training images counts the unseen ones."""
    from cpr_d2.data.augment import point_augmentations
    from cpr_d2.engine.count_calibration import choose_count_threshold

    cfg = small_p2pnet_cfg()
    cfg.INPUT.POINT_AUG.VFLIP = True
    cfg.INPUT.POINT_AUG.ROT90 = True
    cfg.INPUT.POINT_AUG.BRIGHTNESS = 0.2
    cfg.INPUT.POINT_AUG.CONTRAST = 0.2
    _, after_flip = point_augmentations(cfg)
    train, unseen = two_class_records(8, seed=3), two_class_records(8, seed=11)
    aps, maes = [], []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        np.random.seed(seed)
        model = build_model(cfg)
        train_on(model, train, 200, augmentations=[T.RandomFlip(0.5)] + after_flip)
        outputs = predict(model, train)
        threshold, _ = choose_count_threshold(
            [o["instances"].scores.numpy() for o in outputs], [len(r["annotations"]) for r in train])
        unseen_outputs = predict(model, unseen)
        aps.append(point_ap(unseen, unseen_outputs)["AP@0.5"])
        maes.append(np.mean([abs(int((o["instances"].scores > threshold).sum()) - len(r["annotations"]))
                             for o, r in zip(unseen_outputs, unseen)]))
    print(f"unseen AP@0.5 per seed {[round(a, 3) for a in aps]}, counting MAE {maes}")
    assert min(aps) >= 0.8 and max(aps) - min(aps) <= 0.1
    assert max(maes) <= 0.5  # objects per image (2-4 per image)
