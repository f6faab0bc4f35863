"""CPRNet learns: on blobs whose true centres are known, a short CPU training run moves
the refined points measurably closer to the centres than the coarse points were."""
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointDatasetMapper, annotations_to_point_instances

SIZE = 96


def draw_blob(img, centre, radius, rng):
    """`img` with a bright-cored disc at `centre`, and a coarse point for it: 35-75% of
    the radius away from the centre in a random direction."""
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]] + 0.5
    d = np.hypot(xs - centre[0], ys - centre[1])
    img = np.maximum(img, np.where(d < radius, 90 + 160 * (1 - d / radius), 0))
    rho, theta = rng.uniform(0.35, 0.75), rng.uniform(0, 2 * np.pi)
    return img, centre + radius * rho * np.array([np.cos(theta), np.sin(theta)])


def blob_record(image_id, img, anns):
    """An in-memory record of the grey image `img` (float) and its annotations."""
    image = np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return {"image_id": image_id, "height": img.shape[0], "width": img.shape[1],
            "annotations": anns, "image_array": image}


def blob_records(num_images, seed):
    """In-memory records: dark noisy images with three bright-cored discs each (draw_blob)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num_images):
        img = rng.normal(40, 8, (SIZE, SIZE))
        anns, centres = [], []
        while len(centres) < 3:
            r = rng.uniform(10, 14)
            c = rng.uniform(r + 2, SIZE - r - 2, 2)
            if any(np.hypot(*(c - o)) < r + ro + 4 for o, ro in centres):
                continue
            centres.append((c, r))
            img, point = draw_blob(img, c, r, rng)
            anns.append({"id": len(anns), "point": point.tolist(), "category_id": 0, "iscrowd": 0,
                         "centre": c.tolist()})
        records.append(blob_record(i, img, anns))
    return records


def mapped(records, mapper):
    out = []
    for r in records:
        image = r["image_array"]
        aug = T.AugInput(image)
        transforms = mapper.augmentations(aug)
        out.append({"image": torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1))),
                    "instances": annotations_to_point_instances(r["annotations"], transforms,
                                                                aug.image.shape[:2]),
                    "height": r["height"], "width": r["width"], "image_id": r["image_id"]})
    return out


def train_on(model, records, steps, augmentations=None):
    """`steps` Adam steps (lr 1e-3) on pairs of `records` in turn, with random flips (or
    `augmentations`)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    augmentations = [T.RandomFlip(0.5)] if augmentations is None else augmentations
    train_mapper = PointDatasetMapper(True, augmentations=augmentations, image_format="BGR")
    n = len(records)
    for step in range(steps):
        batch = mapped([records[(2 * step) % n], records[(2 * step + 1) % n]], train_mapper)
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    model.eval()


def test_refined_points_move_towards_the_true_centres():
    torch.manual_seed(0)
    np.random.seed(0)  # detectron2's random flips
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file("configs/forest/Base-forest.yaml")
    cfg.MODEL.META_ARCHITECTURE = "CPRNet"
    cfg.MODEL.SINGLE_LEVEL_FPN.STRIDE = 4
    cfg.MODEL.CPR.NUM_CLASSES = 1
    cfg.MODEL.CPR.RADIUS = 3  # 12 px rings: about the blobs' radius
    cfg.MODEL.CPR.NUM_CONVS = 2
    model = build_model(cfg)
    records = blob_records(8, seed=1)
    train_on(model, records, 150)
    test_mapper = PointDatasetMapper(False, augmentations=[], with_annotations=True)
    coarse_d, refined_d = [], []
    with torch.no_grad():
        for r, out in zip(records, model(mapped(records, test_mapper))):
            inst = out["instances"]
            centres = torch.tensor([r["annotations"][k]["centre"] for k in inst.gt_ann_index.tolist()])
            coarse_d.append((inst.coarse_points - centres).norm(dim=1))
            refined_d.append((inst.pred_points - centres).norm(dim=1))
    coarse_d, refined_d = torch.cat(coarse_d), torch.cat(refined_d)
    print(f"mean distance to the true centre: coarse {coarse_d.mean():.2f} px, "
          f"refined {refined_d.mean():.2f} px")
    assert refined_d.mean() < 0.7 * coarse_d.mean()
