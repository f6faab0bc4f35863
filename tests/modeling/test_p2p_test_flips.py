"""MODEL.P2PNET.TEST_FLIPS: P2PNet's inference on the image and its flips, the kept points
of every view mapped back and fused (fuse_views)."""
import pytest
import torch
from detectron2.modeling import build_model

from cpr_d2.modeling import fuse_views
from tests.modeling.test_p2p_model import small_cfg


def _fuse(points, scores, classes, views, num_views=2, box=16.0, max_points=100):
    return fuse_views(torch.tensor(points, dtype=torch.float32).reshape(-1, 2),
                      torch.tensor(scores, dtype=torch.float32),
                      torch.tensor(classes, dtype=torch.int64),
                      torch.tensor(views, dtype=torch.int64), num_views, box, 0.01, max_points)


def test_two_views_that_agree_make_one_point_with_their_mean_score():
    points, scores, classes = _fuse([[10, 10], [12, 10]], [0.8, 0.4], [0, 0], [0, 1])
    assert len(points) == 1
    assert scores.tolist() == pytest.approx([0.6])  # (0.8 + 0.4) / 2
    # The score-weighted mean: (0.8 * 10 + 0.4 * 12) / 1.2.
    assert points.flatten().tolist() == pytest.approx([(0.8 * 10 + 0.4 * 12) / 1.2, 10])
    assert classes.tolist() == [0]


def test_a_point_one_view_misses_scores_half_and_classes_stay_apart():
    points, scores, classes = _fuse([[10, 10], [100, 10], [10, 11]], [0.8, 0.6, 0.7],
                                    [0, 0, 1], [0, 0, 1])
    # Three groups: the two class-0 points are far apart, the class-1 point is alone in its class.
    assert scores.tolist() == pytest.approx([0.4, 0.35, 0.3])
    assert classes.tolist() == [0, 1, 0]
    assert points.flatten().tolist() == pytest.approx([10, 10, 10, 11, 100, 10])


def test_a_group_counts_each_views_best_point_once():
    # View 0 kept two points on one object (a far neighbour joins the nearest leader).
    points, scores, _ = _fuse([[10, 10], [20, 10], [11, 10]], [0.9, 0.3, 0.5], [0, 0, 0],
                              [0, 0, 1], box=32.0)
    assert scores.tolist() == pytest.approx([(0.9 + 0.5) / 2])
    assert points[0, 0].item() == pytest.approx((0.9 * 10 + 0.3 * 20 + 0.5 * 11) / 1.7)


def test_fusion_keeps_at_most_max_points_and_handles_no_points():
    points, scores, _ = _fuse([[0, 0], [50, 0], [100, 0]], [0.1, 0.3, 0.2], [0, 0, 0],
                              [0, 1, 0], max_points=2)
    assert scores.tolist() == pytest.approx([0.15, 0.1])
    assert points.tolist() == [[50, 0], [100, 0]]
    points, scores, classes = _fuse([], [], [], [])
    assert points.shape == (0, 2) and len(scores) == 0 and len(classes) == 0


def _model(flips, seed=0):
    torch.manual_seed(seed)
    model = build_model(small_cfg(TEST_FLIPS=list(flips), SCORE_THRESH=0.0, NMS_BOX_SIZE=8.0,
                                  DETECTIONS_PER_IMAGE=300))
    return model.eval()


def _sorted(inst):
    order = torch.argsort(inst.pred_points[:, 0] * 1e4 + inst.pred_points[:, 1])
    return inst.pred_points[order], inst.scores[order]


@pytest.mark.parametrize("flip, dims", [("horizontal", [-1]), ("vertical", [-2]),
                                        ("both", [-2, -1])])
def test_flip_fused_inference_of_a_flipped_image_is_the_mirror_image(flip, dims):
    """With one flip, the image and its flip give the same two views, so the fused points of
    the flipped image are those of the image, mirrored. A view mapped back to the wrong
    place breaks it (the network itself is not flip-equivariant)."""
    model = _model([flip])
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8, generator=gen)
    # Output in the pixels of a 90 x 140 original, as a resized input would be.
    inputs = {"image": image, "height": 90, "width": 140}
    with torch.no_grad():
        a = model([inputs])[0]["instances"]
        b = model([{**inputs, "image": image.flip(dims)}])[0]["instances"]
    assert len(a) > 20 and len(a) == len(b)
    mirrored = b.pred_points.clone()
    if flip in ("horizontal", "both"):
        mirrored[:, 0] = 140 - mirrored[:, 0]
    if flip in ("vertical", "both"):
        mirrored[:, 1] = 90 - mirrored[:, 1]
    b.pred_points = mirrored
    (pa, sa), (pb, sb) = _sorted(a), _sorted(b)
    torch.testing.assert_close(pa, pb, atol=1e-3, rtol=0)
    torch.testing.assert_close(sa, sb, atol=1e-6, rtol=0)


def test_flip_fused_inference_fuses_the_views_the_model_predicts_alone():
    """TEST_FLIPS ["horizontal"] = fuse_views of the model's own predictions on the image
    and on its mirror image (mapped back), batch of two images of different sizes."""
    fused_model, plain = _model(["horizontal"]), _model([])
    plain.load_state_dict(fused_model.state_dict())
    gen = torch.Generator().manual_seed(2)
    inputs = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)}
              for h, w in ((40, 57), (64, 33))]
    with torch.no_grad():
        fused = fused_model(inputs)
        views = [plain(inputs), plain([{"image": x["image"].flip([-1])} for x in inputs])]
    for k, x in enumerate(inputs):
        width = x["image"].shape[-1]
        one, two = views[0][k]["instances"], views[1][k]["instances"]
        back = two.pred_points.clone()
        back[:, 0] = width - back[:, 0]
        points, scores, classes = fuse_views(
            torch.cat([one.pred_points, back]), torch.cat([one.scores, two.scores]),
            torch.cat([one.pred_classes, two.pred_classes]),
            torch.cat([torch.zeros(len(one), dtype=torch.int64),
                       torch.ones(len(two), dtype=torch.int64)]), 2, 8.0, 0.01, 300)
        got = fused[k]["instances"]
        torch.testing.assert_close(got.pred_points, points)
        torch.testing.assert_close(got.scores, scores)
        assert got.pred_classes.tolist() == classes.tolist()
        # Fusion changes the result: the single view is not what comes out.
        assert not torch.equal(got.scores, one.scores[:len(got)])


@pytest.mark.parametrize("value, match", [
    ("horizontal", "TEST_FLIPS is a list of flips, got the string 'horizontal'"),
    (["sideways"], "TEST_FLIPS takes distinct flips out of horizontal, vertical, both"),
    (["vertical", "vertical"], "TEST_FLIPS takes distinct flips"),
])
def test_bad_test_flips_name_the_key(value, match):
    with pytest.raises(ValueError, match=match):
        build_model(small_cfg(TEST_FLIPS=value))
