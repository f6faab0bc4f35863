"""MODEL.CPR.REFINE_FLIPS: refinement averaged over the image and its flips, checked
against views flipped and refined by hand with the one-view model."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from .test_cpr_model import tiny_cprnet_cfg

ALL = ["horizontal", "vertical", "both"]


def cprnet(flips=(), adaptive=False, move_limit=0.0):
    cfg = tiny_cprnet_cfg(2, 2, channels=32)
    cfg.MODEL.CPR.REFINE_RING_STEP = 0.5
    cfg.MODEL.CPR.REFINE_SCORE_THRESH = 0.005  # untrained scores sit near the prior, 0.01
    cfg.MODEL.CPR.REFINE_FLIPS = list(flips)
    cfg.MODEL.CPR.ADAPTIVE.ENABLED = adaptive
    if adaptive:
        cfg.MODEL.CPR.ADAPTIVE.MOVE_NEIGHBOUR_FRACTION = move_limit
    else:
        cfg.MODEL.CPR.REFINE_MOVE_NEIGHBOUR_FRACTION = move_limit
    torch.manual_seed(0)
    return build_model(cfg).eval()


def fresh_batch(seed):
    """Two random images of odd sizes, one shown to the model at half its original size
    (the points are in the input's pixels, the results in the original's)."""
    g = torch.Generator().manual_seed(seed)

    def sample(h, w, n, scale):
        inst = Instances((h, w))
        inst.gt_points = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
        inst.gt_classes = torch.randint(0, 2, (n,), generator=g)
        inst.gt_ann_index = torch.arange(n)
        return {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
                "instances": inst, "height": h * scale, "width": w * scale}

    return [sample(90, 123, 7, 1), sample(61, 77, 4, 2)]


def flip_by_hand(sample, flip):
    h, w = sample["image"].shape[1:]
    inst = Instances(sample["instances"].image_size)
    for name, value in sample["instances"].get_fields().items():
        inst.set(name, value.clone())
    image = sample["image"]
    if flip in ("horizontal", "both"):
        image = image.flip(-1)
        inst.gt_points[:, 0] = w - inst.gt_points[:, 0]
    if flip in ("vertical", "both"):
        image = image.flip(-2)
        inst.gt_points[:, 1] = h - inst.gt_points[:, 1]
    return {**sample, "image": image, "instances": inst}


def unflip_by_hand(points, sample, flip):
    points = points.clone()
    if flip in ("horizontal", "both"):
        points[:, 0] = sample["width"] - points[:, 0]
    if flip in ("vertical", "both"):
        points[:, 1] = sample["height"] - points[:, 1]
    return points


def by_hand(model, data, flips, field="pred_points"):
    """Per image: the mean over the views of `field` refined by `model` (one view)."""
    views = []
    with torch.no_grad():
        for flip in ("none",) + tuple(flips):
            outs = model([flip_by_hand(s, flip) for s in data])
            views.append([unflip_by_hand(o["instances"].get(field), s, flip)
                          if field in ("pred_points", "region_centres")
                          else o["instances"].get(field) for o, s in zip(outs, data)])
    return [torch.stack(v).mean(0) for v in zip(*views)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("flips", [["horizontal"], ["vertical"], ALL])
def test_flip_average_equals_views_refined_by_hand(seed, flips):
    data = fresh_batch(seed)
    averaged = cprnet(flips)
    with torch.no_grad():
        got = [o["instances"] for o in averaged(data)]
    one_view = cprnet()
    for field in ("pred_points", "scores", "est_sizes"):
        expected = by_hand(one_view, data, flips, field)
        for inst, exp in zip(got, expected):
            torch.testing.assert_close(inst.get(field), exp.to(inst.get(field).dtype),
                                       rtol=1e-5, atol=1e-4)
    plain = [o["instances"] for o in one_view(data)]
    for inst, ref in zip(got, plain):
        # The coarse points, classes and order are those of the unflipped image.
        torch.testing.assert_close(inst.coarse_points, ref.coarse_points, rtol=0, atol=0)
        assert inst.pred_classes.tolist() == ref.pred_classes.tolist()
        assert inst.gt_ann_index.tolist() == ref.gt_ann_index.tolist()
        assert inst.refined.tolist() == (inst.pred_points != inst.coarse_points).any(1).tolist()
    # The views disagree somewhere: the average is not the one view's refinement.
    assert any(not torch.allclose(a.pred_points, b.pred_points) for a, b in zip(got, plain))


def test_flip_average_with_the_move_limit_stays_within_it():
    data = fresh_batch(3)
    limited = [o["instances"] for o in cprnet(ALL, move_limit=0.1)(data)]
    for inst, s in zip(limited, data):
        pts = s["instances"].gt_points
        nn = torch.cdist(pts, pts).fill_diagonal_(float("inf"))
        same = s["instances"].gt_classes[:, None] == s["instances"].gt_classes[None]
        nn = torch.where(same, nn, torch.full_like(nn, float("inf"))).amin(1)
        scale = s["width"] / s["image"].shape[2]
        move = (inst.pred_points - inst.coarse_points).norm(dim=1)
        assert (move <= 0.1 * nn * scale + 1e-3).all()


def test_points_no_view_moves_stay_exactly_put():
    # A point at an exact corner of a black image with a score threshold no cell reaches.
    model = cprnet(ALL)
    model.refine_score_thresh = 0.999
    data = fresh_batch(4)
    with torch.no_grad():
        got = [o["instances"] for o in model(data)]
    for inst in got:
        assert not inst.refined.any()
        torch.testing.assert_close(inst.pred_points, inst.coarse_points, rtol=0, atol=0)


def test_adaptive_regions_average_their_centres_and_radii():
    data = fresh_batch(5)
    with torch.no_grad():
        got = [o["instances"] for o in cprnet(ALL, adaptive=True)(data)]
    one_view = cprnet(adaptive=True)
    for field in ("pred_points", "region_centres", "regions"):
        for inst, exp in zip(got, by_hand(one_view, data, ALL, field)):
            torch.testing.assert_close(inst.get(field), exp, rtol=1e-5, atol=1e-4)


def test_training_ignores_the_flips():
    data = fresh_batch(6)
    torch.manual_seed(1)
    plain = cprnet().train()(data)
    torch.manual_seed(1)
    flipped = cprnet(ALL).train()(data)
    assert plain.keys() == flipped.keys()
    for key in plain:
        torch.testing.assert_close(plain[key], flipped[key], rtol=0, atol=0)


@pytest.mark.parametrize("value,match", [
    (["diagonal"], "REFINE_FLIPS takes distinct flips out of horizontal, vertical, both"),
    (["horizontal", "horizontal"], "REFINE_FLIPS takes distinct flips"),
    ("horizontal", "is a list of flips, got the string 'horizontal'"),
])
def test_bad_flips_fail_naming_the_key(value, match):
    cfg = tiny_cprnet_cfg(2, 2, channels=32)
    cfg.MODEL.CPR.REFINE_FLIPS = value
    with pytest.raises(ValueError, match=match):
        build_model(cfg)
