"""CPRNet with size-adaptive sampling regions (MODEL.CPR.ADAPTIVE): the switch, the region
estimate, the cascade's training and refinement, and the helpers of cpr_refine.py."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.modeling.cpr_refine import (kept_size, limit_move, nearest_neighbour_distance,
                                        region_radius)

from .test_cpr_model import tiny_cprnet_cfg


def cprnet(adaptive=False, radius=2, num_classes=2, refine_step=0.5, move_limit=0.0,
           **adaptive_keys):
    cfg = tiny_cprnet_cfg(num_classes, radius, channels=32)
    cfg.MODEL.CPR.REFINE_RING_STEP = refine_step
    cfg.MODEL.CPR.REFINE_MOVE_NEIGHBOUR_FRACTION = move_limit
    cfg.MODEL.CPR.REFINE_SCORE_THRESH = 0.005  # untrained scores sit near the prior, 0.01
    cfg.MODEL.CPR.ADAPTIVE.ENABLED = adaptive
    for key, value in adaptive_keys.items():
        setattr(cfg.MODEL.CPR.ADAPTIVE, key, value)
    torch.manual_seed(0)
    return build_model(cfg)


def batch():
    g = torch.Generator().manual_seed(1)

    def sample(h, w, pts, cls):
        inst = Instances((h, w))
        inst.gt_points = torch.tensor(pts, dtype=torch.float32).reshape(-1, 2)
        inst.gt_classes = torch.tensor(cls, dtype=torch.long)
        inst.gt_ann_index = torch.arange(len(cls))
        return {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
                "instances": inst, "height": h, "width": w}

    return [sample(96, 128, [[30.0, 40.0], [90.5, 20.25], [40.0, 44.0], [3.0, 90.0]],
                   [0, 1, 0, 1]),
            sample(64, 80, [[10.0, 10.0]], [1])]


# ---- the switch --------------------------------------------------------------------------

def test_off_by_default():
    assert get_cpr_d2_cfg().MODEL.CPR.ADAPTIVE.ENABLED is False
    assert cprnet().adaptive is None


def test_switched_off_the_losses_and_refined_points_are_the_papers():
    # Computed on this input by the implementation before adaptive regions existed.
    model = cprnet(adaptive=False)
    losses = model(batch())
    expected = {"loss_cpr_mil": 1.1332966089248657, "loss_cpr_ann": 0.5673390030860901,
                "loss_cpr_neg": 7.380892930086702e-05}
    for key, value in expected.items():
        assert float(losses[key]) == pytest.approx(value, rel=1e-4), key
    model.eval()
    with torch.no_grad():
        out = [o["instances"] for o in model(batch())]
    torch.testing.assert_close(out[0].pred_points, torch.tensor(
        [[25.979373931884766, 35.83519744873047], [87.58881378173828, 19.264568328857422],
         [44.3723258972168, 46.3918571472168], [3.0, 90.0]]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1].pred_points, torch.tensor(
        [[13.151671409606934, 13.127299308776855]]), atol=1e-3, rtol=0)
    assert out[0].num_kept.tolist() == [44, 27, 40, 0] and out[1].num_kept.tolist() == [54]
    assert not out[0].has("regions")


@pytest.mark.parametrize("key,value", [("STAGES", 1), ("RINGS", 0), ("ALPHA", 0.0),
                                       ("MIN_RADIUS", 3.0), ("NEIGHBOUR_FRACTION", -1.0),
                                       ("MOVE_FRACTION", 0.0), ("MOVE_FRACTION", 1.5)])
def test_bad_adaptive_keys_fail_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"MODEL.CPR.ADAPTIVE: .*{key}"):
        cprnet(adaptive=True, **{key: value})  # MIN_RADIUS 3 > MAX_RADIUS (RADIUS 2)


# ---- the region estimate -----------------------------------------------------------------

def blank_sample(points, size, original=None):
    """A black size x size image with one-class objects at `points` (N, 2), its original
    size `original` (default `size`)."""
    inst = Instances((size, size))
    inst.gt_points = points.clone()
    inst.gt_classes = torch.zeros(len(points), dtype=torch.long)
    inst.gt_ann_index = torch.arange(len(points))
    return {"image": torch.zeros(3, size, size, dtype=torch.uint8), "instances": inst,
            "height": original or size, "width": original or size}


def disc_logits(height, width, stride, discs):
    """(1, 1, H, W) class logits: p = 0.9 at cells whose centre lies in one of the
    (x, y, radius) discs, 0.001 elsewhere."""
    ys = (torch.arange(height) + 0.5) * stride
    xs = (torch.arange(width) + 0.5) * stride
    inside = torch.zeros(height, width, dtype=torch.bool)
    for x, y, r in discs:
        inside |= (xs[None] - x) ** 2 + (ys[:, None] - y) ** 2 <= r * r
    p = torch.where(inside, 0.9, 0.001)
    return torch.logit(p)[None, None]


def test_region_follows_the_blob_and_stops_at_the_neighbour():
    # Stride 8, bags out to R * s = 32 px refined every 2 px: a small blob (radius 6 px),
    # a large one (radius 26 px), and two blobs 20 px apart (radius 14 px each).
    model = cprnet(adaptive=True, radius=4, num_classes=1, refine_step=0.25).eval()
    blobs = [(40.0, 40.0, 6.0), (150.0, 60.0, 26.0), (60.0, 150.0, 14.0), (80.0, 150.0, 14.0)]
    cls_map = disc_logits(28, 28, 8.0, blobs)
    points = torch.tensor([[x + 1.0, y - 1.0] for x, y, _ in blobs])
    labels = torch.zeros(4, dtype=torch.long)
    stages = model.cascade(cls_map, points, labels, [4], torch.zeros(4, dtype=torch.long),
                           torch.tensor([[224, 224]]))
    assert len(stages) == 2 and stages[0]["region"] is None
    region = stages[1]["region"]
    small, large, crowded = region[0].item(), region[1].item(), region[2:].tolist()
    print(f"radii: small blob {small:.1f} px, large {large:.1f} px, crowded {crowded}")
    assert 4.0 <= small <= 11.0  # radius 6: the bag shrinks to the blob
    assert 20.0 <= large <= 32.0  # radius 26: up to R * s
    assert crowded == pytest.approx([10.0, 10.0])  # half the distance to the neighbour
    # The second stage centres on the first stage's refined point, near the blob centres.
    centres = torch.tensor([[x, y] for x, y, _ in blobs])
    assert ((stages[1]["centre"] - centres).norm(dim=1) < 4.0).all()


def test_refined_points_stay_within_their_region():
    model = cprnet(adaptive=True, STAGES=3).eval()
    with torch.no_grad():
        out = [o["instances"] for o in model(batch())]
    for inst in out:
        assert inst.has("regions") and inst.has("region_centres")
        moved = (inst.pred_points - inst.coarse_points).norm(dim=1)
        assert (moved <= inst.regions + 1e-4).all()
        assert (inst.regions > 0).all()
    assert out[0].refined.any()


def test_adaptive_training_reaches_every_parameter_and_differs_from_the_paper():
    paper, adaptive = cprnet(adaptive=False), cprnet(adaptive=True)
    adaptive.load_state_dict(paper.state_dict())
    losses = adaptive(batch())
    assert set(losses) == {"loss_cpr_mil", "loss_cpr_ann", "loss_cpr_neg"}
    sum(losses.values()).backward()
    missing = [n for n, p in adaptive.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    reference = paper(batch())
    # The annotation loss stays on the annotated point; MIL and negatives change.
    assert float(losses["loss_cpr_ann"]) == pytest.approx(float(reference["loss_cpr_ann"]))
    assert float(losses["loss_cpr_mil"]) != pytest.approx(float(reference["loss_cpr_mil"]))


def test_adaptive_negatives_keep_each_objects_own_region():
    model = cprnet(adaptive=True, num_classes=1)
    cls_map = torch.zeros(1, 1, 10, 10)  # stride 8: cell centres at 4, 12, ..., 76
    points = torch.tensor([[20.0, 20.0], [60.0, 60.0]])
    labels = torch.zeros(2, dtype=torch.long)
    centres = torch.tensor([[28.0, 20.0], [60.0, 60.0]])
    radii = torch.tensor([5.0, 9.0])
    kept = model._negative_logits(cls_map, points, labels, [2], [(80, 80)], (centres, radii))
    ys, xs = torch.meshgrid((torch.arange(10) + 0.5) * 8, (torch.arange(10) + 0.5) * 8,
                            indexing="ij")
    near = torch.zeros(10, 10, dtype=torch.bool)
    for (px, py), (cx, cy), r in zip(points.tolist(), centres.tolist(), radii.tolist()):
        near |= (xs - px) ** 2 + (ys - py) ** 2 < r * r
        near |= (xs - cx) ** 2 + (ys - cy) ** 2 < r * r
    assert kept.numel() == int((~near).sum())
    # Cell centres within 5 px of (20, 20) and of (28, 20): one each; within 9 px of
    # (60, 60): the centre cell and its 4 neighbours at 8 px.
    assert int(near.sum()) == 1 + 1 + 5


def test_adaptive_batch_without_objects():
    model = cprnet(adaptive=True)
    empty = batch()
    for sample in empty:
        sample["instances"] = sample["instances"][:0]
    losses = model(empty)
    assert losses["loss_cpr_mil"] == 0 and losses["loss_cpr_neg"] > 0
    model.eval()
    with torch.no_grad():
        assert [len(o["instances"]) for o in model(empty)] == [0, 0]


# ---- helpers -----------------------------------------------------------------------------

def test_kept_size_by_hand():
    coords = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [0.0, 9.0], [100.0, 100.0]],
                           [[5.0, 5.0], [6.0, 5.0], [7.0, 7.0], [8.0, 8.0]]])
    keep = torch.tensor([[True, True, True, False], [False, False, False, False]])
    size = kept_size(coords, keep, 1.0)
    assert size[0].item() == pytest.approx(math.sqrt(5.0 * 10.0))
    assert size[1].item() == 0.0


def test_nearest_neighbour_distance_per_class():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [50.0, 50.0]])
    labels = torch.tensor([0, 0, 1, 2])
    d = nearest_neighbour_distance(points, labels)
    assert d[:2].tolist() == [5.0, 5.0]  # the class-1 point at 1 px does not count
    assert math.isinf(d[2]) and math.isinf(d[3])
    assert nearest_neighbour_distance(points[:1], labels[:1]).isinf().all()


def test_region_radius_clips_in_order():
    size = torch.tensor([4.0, 20.0, 100.0, 20.0, 20.0, 0.0])
    found = torch.tensor([True, True, True, True, True, False])
    nn = torch.tensor([math.inf, math.inf, math.inf, 12.0, 2.0, math.inf])
    r = region_radius(size, found, nn, alpha=1.0, min_radius=4.0, max_radius=16.0,
                      neighbour_fraction=0.5)
    # r_min, alpha * size / 2, r_max, the neighbour bound, the neighbour bound under r_min,
    # and an object whose size is unknown (r_max).
    assert r.tolist() == [4.0, 10.0, 16.0, 6.0, 1.0, 16.0]


def test_limit_move():
    anchors = torch.tensor([[0.0, 0.0], [10.0, 10.0], [5.0, 5.0]])
    refined = torch.tensor([[6.0, 8.0], [11.0, 10.0], [5.0, 5.0]])
    out = limit_move(refined, anchors, torch.tensor([5.0, 5.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0], [11.0, 10.0], [5.0, 5.0]]))


def test_variance_regulariser_is_a_loss_term_when_weighted():
    assert "loss_cpr_var" not in cprnet(adaptive=True)(batch())
    losses = cprnet(adaptive=True, VARIANCE_WEIGHT=0.5)(batch())
    assert losses["loss_cpr_var"] > 0
    sum(losses.values()).backward()


def test_moves_stay_within_a_fraction_of_the_nearest_neighbour():
    model = cprnet(adaptive=True, MOVE_NEIGHBOUR_FRACTION=0.1).eval()
    data = batch()
    with torch.no_grad():
        inst = model(data)[0]["instances"]
    nn = nearest_neighbour_distance(data[0]["instances"].gt_points, data[0]["instances"].gt_classes)
    moved = (inst.pred_points - inst.coarse_points).norm(dim=1)
    assert (moved <= torch.minimum(0.1 * nn, inst.regions) + 1e-4).all()
    # Objects 0 and 2 (class 0) are 10.8 px apart: at most 1.08 px each.
    assert moved[0] <= 1.08 + 1e-4 and moved[2] <= 1.08 + 1e-4


def test_move_fraction_moves_each_point_that_share_of_the_way():
    # Refinement only: the same weights, refined all the way and 0.4 of the way.
    data = batch()
    with torch.no_grad():
        full = cprnet(adaptive=True, MOVE_NEIGHBOUR_FRACTION=0.3).eval()(data)
        part = cprnet(adaptive=True, MOVE_NEIGHBOUR_FRACTION=0.3, MOVE_FRACTION=0.4).eval()(data)
    for f, p in zip(full, part):
        f, p = f["instances"], p["instances"]
        step = f.pred_points - f.coarse_points
        assert step.norm(dim=1).max() > 1.0  # something moved
        torch.testing.assert_close(p.pred_points, p.coarse_points + 0.4 * step)
        assert p.refined.tolist() == f.refined.tolist()
        torch.testing.assert_close(p.regions, f.regions)


def test_the_papers_bag_with_a_move_limit_shortens_only_the_long_moves():
    data = batch()
    with torch.no_grad():
        free = cprnet().eval()(data)
        limited = cprnet(move_limit=0.1).eval()(data)
    shortened = 0
    for f, lim, inp in zip(free, limited, data):
        f, lim = f["instances"], lim["instances"]
        gt = inp["instances"]
        bound = 0.1 * nearest_neighbour_distance(gt.gt_points, gt.gt_classes)
        torch.testing.assert_close(lim.pred_points, limit_move(f.pred_points, f.coarse_points,
                                                               bound))
        moved = (f.pred_points - f.coarse_points).norm(dim=1)
        shortened += int((moved > bound + 1e-4).sum())
        assert lim.num_kept.tolist() == f.num_kept.tolist()
    assert shortened >= 2  # the limit did something: objects 0 and 2 are 10.8 px apart


def test_move_limit_keys_are_checked():
    with pytest.raises(ValueError, match="REFINE_MOVE_NEIGHBOUR_FRACTION must be >= 0"):
        cprnet(move_limit=-0.1)
    with pytest.raises(ValueError, match="ADAPTIVE.MOVE_NEIGHBOUR_FRACTION instead"):
        cprnet(adaptive=True, move_limit=0.1)


# ---- the size each refinement estimates (the trust report's size ranges) -----------------

def test_refinement_estimates_each_objects_size_from_its_kept_points():
    # A small blob (radius 6 px) and a large one (radius 14 px), sampled every 2 px out
    # to 32 px; both refinements (paper and adaptive) report a size near the diameter
    # (the kept cells of a stride-8 map, read bilinearly, fall short of the large rim).
    blobs = [(40.0, 40.0, 6.0), (150.0, 60.0, 14.0)]
    points = torch.tensor([[x + 1.0, y - 1.0] for x, y, _ in blobs])

    for adaptive in (False, True):
        model = cprnet(adaptive=adaptive, radius=4, num_classes=1, refine_step=0.25).eval()
        model.head.forward = lambda features: (disc_logits(28, 28, 8.0, blobs),
                                               torch.zeros(1, 1, 28, 28))
        with torch.no_grad():
            # original pixels: twice the input's
            inst = model([blank_sample(points, 224, original=448)])[0]["instances"]
        small, large = (inst.est_sizes / 2).tolist()  # back to input pixels
        print(f"adaptive={adaptive}: estimated sizes {small:.1f} and {large:.1f} px")
        assert 10.0 <= small <= 16.0 and 21.0 <= large <= 32.0 and large > 1.6 * small
