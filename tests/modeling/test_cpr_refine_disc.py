"""The refinement-only keys MODEL.CPR.REFINE_RADIUS (a larger refinement disc than the
training bag) and MODEL.CPR.REFINE_NEIGHBOUR_DISC (keep only the bag points within a
fraction of the nearest-neighbour distance)."""
import pytest
import torch
from detectron2.modeling import build_model

from cpr_d2.modeling.cpr_refine import within_distance

from .test_cpr_adaptive import batch, blank_sample, disc_logits
from .test_cpr_model import tiny_cprnet_cfg


def cprnet(radius=2, refine_radius=0, disc=0.0, step=0.5, move_limit=0.0, num_classes=2,
           **extra):
    cfg = tiny_cprnet_cfg(num_classes, radius, channels=32)
    cfg.MODEL.CPR.REFINE_RING_STEP = step
    cfg.MODEL.CPR.REFINE_RADIUS = refine_radius
    cfg.MODEL.CPR.REFINE_NEIGHBOUR_DISC = disc
    cfg.MODEL.CPR.REFINE_MOVE_NEIGHBOUR_FRACTION = move_limit
    cfg.MODEL.CPR.REFINE_SCORE_THRESH = 0.005  # untrained scores sit near the prior, 0.01
    cfg.MODEL.CPR.RETURN_BAG_SCORES = True
    for key, value in extra.items():
        setattr(cfg.MODEL.CPR, key, value)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def refine(model, data):
    with torch.no_grad():
        return [out["instances"] for out in model(data)]


def test_within_distance_by_hand():
    coords = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]],
                           [[1.0, 1.0], [100.0, 100.0], [1.0, 1.0]]])
    anchors = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    mask = within_distance(coords, anchors, torch.tensor([5.0, float("inf")]))
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_defaults_are_the_papers_refinement():
    data = batch()
    paper = refine(cprnet(), data)
    same = refine(cprnet(refine_radius=2, disc=0.0), data)
    for a, b in zip(paper, same):
        torch.testing.assert_close(a.pred_points, b.pred_points, rtol=0, atol=0)
        assert a.num_kept.tolist() == b.num_kept.tolist()


def test_refine_radius_is_the_training_radius_at_refinement_only():
    # The same weights refine with a 4-stride disc: REFINE_RADIUS 4 on a model trained
    # with RADIUS 2 equals a model built with RADIUS 4. Training is unchanged.
    data = batch()
    wide = refine(cprnet(radius=2, refine_radius=4), data)
    built = refine(cprnet(radius=4), data)
    narrow = refine(cprnet(radius=2), data)
    for w, b, n in zip(wide, built, narrow):
        torch.testing.assert_close(w.pred_points, b.pred_points)
        torch.testing.assert_close(w.bag_points, b.bag_points)
        assert w.bag_points.shape[1] > n.bag_points.shape[1]
        reach = (w.bag_points - w.coarse_points[:, None]).norm(dim=2).amax()
        assert float(reach) == pytest.approx(4 * 8.0)  # 4 strides of 8 px
    losses = cprnet(radius=2, refine_radius=4).train()(batch())
    expected = cprnet(radius=2).train()(batch())
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key])


def test_neighbour_disc_keeps_only_the_points_near_the_own_point():
    # One large blob (p = 0.9 inside, radius 40 px) under two objects 24 px apart, one class,
    # a 32 px bag every 4 px: every bag point on the blob is kept, so the refined point is
    # the p-weighted mean of the bag points on the blob within 0.5 x 24 = 12 px of the
    # object's own point (with the disc), or of all those nearer to it than to the other
    # object (without it).
    points = torch.tensor([[92.0, 100.0], [116.0, 100.0]])

    results = {}
    for disc in (0.0, 0.5):
        model = cprnet(radius=4, disc=disc, num_classes=1)
        model.head.forward = lambda features: (disc_logits(28, 28, 8.0, [(100.0, 100.0, 40.0)]),
                                               torch.zeros(1, 1, 28, 28))
        results[disc] = refine(model, [blank_sample(points, 224)])[0]
    cut, whole = results[0.5], results[0.0]
    coords, prob = cut.bag_points, cut.bag_scores
    own = (coords - points[:, None]).norm(dim=2)
    other = (coords - points.flip(0)[:, None]).norm(dim=2)
    on_blob = prob > 0.5
    for result, keep in ((cut, on_blob & (own <= 12.0)), (whole, on_blob & (own <= other))):
        expected = (prob * keep)[..., None].mul(coords).sum(1) / (prob * keep).sum(1)[:, None]
        torch.testing.assert_close(result.pred_points, expected, rtol=1e-5, atol=1e-4)
        assert result.num_kept.tolist() == keep.sum(1).tolist()
    assert (cut.num_kept < whole.num_kept).all()
    # Each point moves towards the blob's centre, less far with the disc.
    assert ((cut.pred_points - points).norm(dim=1) < (whole.pred_points - points).norm(dim=1)).all()


@pytest.mark.parametrize("key,value,match", [
    ("REFINE_RADIUS", -1, "REFINE_RADIUS must be a whole number"),
    ("REFINE_RADIUS", 2.5, "REFINE_RADIUS must be a whole number"),
    ("REFINE_NEIGHBOUR_DISC", 1.5, r"REFINE_NEIGHBOUR_DISC must be in \[0, 1\]"),
    ("REFINE_NEIGHBOUR_DISC", -0.1, r"REFINE_NEIGHBOUR_DISC must be in \[0, 1\]"),
])
def test_bad_keys_fail_naming_the_key(key, value, match):
    cfg = tiny_cprnet_cfg(2, 2, channels=32)
    setattr(cfg.MODEL.CPR, key, value)
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_adaptive_regions_refuse_the_papers_bag_keys():
    cfg = tiny_cprnet_cfg(2, 2, channels=32)
    cfg.MODEL.CPR.ADAPTIVE.ENABLED = True
    cfg.MODEL.CPR.REFINE_NEIGHBOUR_DISC = 0.5
    with pytest.raises(ValueError, match="with MODEL.CPR.ADAPTIVE enabled leave"):
        build_model(cfg)
