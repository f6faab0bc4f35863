"""P2PNet: losses on hand-made tensors, inference on constructed outputs, the whole model
on batches of images of different sizes, and the softmax (original P2PNet) variant."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.modeling import anchor_points, point_nms, point_vote
from cpr_d2.modeling.p2pnet import anchor_offsets
from tests.tool_loader import load_benchmark

LN2 = math.log(2)


def small_cfg(**p2p):
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file("configs/forest/Base-forest.yaml")
    cfg.MODEL.META_ARCHITECTURE = "P2PNet"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.SINGLE_LEVEL_FPN.OUT_CHANNELS = 32
    cfg.MODEL.P2PNET.NUM_CLASSES = 1
    cfg.MODEL.P2PNET.NUM_CONVS = 1
    cfg.MODEL.P2PNET.CONV_CHANNELS = 32
    for k, v in p2p.items():
        node, key = (cfg.MODEL.P2PNET.MATCHER, k[8:]) if k.startswith("MATCHER_") else \
            (cfg.MODEL.P2PNET, k)
        node[key] = v
    return cfg


def targets(points, classes, size=(64, 64)):
    inst = Instances(size)
    inst.gt_points = torch.tensor(points, dtype=torch.float32).reshape(-1, 2)
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def image_input(n, height, width, out_height=None, out_width=None, num_classes=1):
    inst = Instances((height, width))
    inst.gt_points = torch.rand(n, 2) * torch.tensor([width, height])
    inst.gt_classes = torch.randint(0, num_classes, (n,))
    return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8),
            "instances": inst, "height": out_height or height, "width": out_width or width}


def test_anchor_layout():
    assert anchor_offsets(1, 1, 8).tolist() == [[0.0, 0.0]]
    # The original P2PNet: 2 x 2 at +-s/4.
    assert anchor_offsets(2, 2, 8).tolist() == [[-2, -2], [2, -2], [-2, 2], [2, 2]]
    a = anchor_points(2, 3, 8, 1, 1)
    assert a.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert anchor_points(2, 3, 8, 2, 2).shape == (24, 2)
    assert anchor_points(2, 3, 8, 2, 2)[:4].tolist() == [[2, 2], [6, 2], [2, 6], [6, 6]]


def test_focal_and_smooth_l1_losses_by_hand():
    model = build_model(small_cfg(MATCHER_TOPK=1))
    logits = torch.zeros(1, 2, 1)  # p = 0.5 everywhere
    points = torch.tensor([[[11.0, 10.0], [30.0, 30.0]]])
    losses = model.losses(logits, points, [targets([[10, 10]], [0])])
    pos = 0.25 * 0.25 * LN2   # alpha (1 - p)^2 (-ln p)
    neg = 0.75 * 0.25 * LN2   # (1 - alpha) p^2 (-ln(1 - p))
    assert losses["loss_p2p_cls"].item() == pytest.approx(pos + neg, rel=1e-5)
    # |dx| = 1 px = 0.125 strides > beta = 1/9: 0.125 - 1/18; weight 0.5, one positive.
    assert losses["loss_p2p_point"].item() == pytest.approx(0.5 * (0.125 - 1 / 18), rel=1e-5)

    # topk = 2: both predictions are positives of the one GT.
    model = build_model(small_cfg(MATCHER_TOPK=2))
    losses = model.losses(logits, points, [targets([[10, 10]], [0])])
    assert losses["loss_p2p_cls"].item() == pytest.approx(2 * pos / 2, rel=1e-5)
    far = 2 * (20 / 8 - 1 / 18)
    assert losses["loss_p2p_point"].item() == pytest.approx(0.5 * (0.125 - 1 / 18 + far) / 2,
                                                            rel=1e-5)


def test_quality_focal_loss_is_the_focal_loss_on_hard_targets():
    from fvcore.nn import sigmoid_focal_loss

    from cpr_d2.modeling.p2pnet import quality_focal_loss

    torch.manual_seed(0)
    logits = 3 * torch.randn(50, 3)
    targets = (torch.rand(50, 3) < 0.2).float()
    for alpha, gamma in ((0.25, 2.0), (0.5, 1.0), (-1, 2.0)):
        torch.testing.assert_close(
            quality_focal_loss(logits, targets, targets > 0, alpha, gamma),
            sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="sum"))
    # A soft target: the loss of that entry is smallest, and flat, where the score equals it.
    x = torch.linspace(-4, 4, 801, requires_grad=True)
    y = torch.full_like(x, 0.3)
    per = [quality_focal_loss(x[i:i + 1], y[i:i + 1], torch.ones(1, dtype=torch.bool), 0.25,
                              2.0) for i in range(len(x))]
    best = int(torch.stack(per).argmin())
    assert x[best].sigmoid().item() == pytest.approx(0.3, abs=0.005)
    per[best].backward()
    assert abs(x.grad[best].item()) < 1e-3


def test_quality_target_scores_precise_points_higher():
    from cpr_d2.modeling.p2pnet import point_quality

    q = point_quality(torch.tensor([[10.0, 10.0], [18.0, 10.0], [10.0, 26.0]]),
                      torch.tensor([[10.0, 10.0]] * 3), 8.0)
    torch.testing.assert_close(q, torch.tensor([1.0, math.exp(-0.5), math.exp(-2.0)]))
    # In the model: the positive's target is its quality (1 px off: q = exp(-1/128)), so
    # the class loss equals the quality focal loss by hand; the point loss is unchanged.
    model = build_model(small_cfg(MATCHER_TOPK=1, QUALITY_TARGET=True))
    logits = torch.zeros(1, 2, 1)
    points = torch.tensor([[[11.0, 10.0], [30.0, 30.0]]])
    losses = model.losses(logits, points, [targets([[10, 10]], [0])])
    y = math.exp(-1 / 128)
    pos = 0.25 * (-(y * math.log(0.5) + (1 - y) * math.log(0.5))) * abs(y - 0.5) ** 2
    neg = 0.75 * 0.25 * LN2
    assert losses["loss_p2p_cls"].item() == pytest.approx(pos + neg, rel=1e-5)
    assert losses["loss_p2p_point"].item() == pytest.approx(0.5 * (0.125 - 1 / 18), rel=1e-5)
    with pytest.raises(ValueError, match="QUALITY_TARGET needs MODEL.P2PNET.CLASS_LOSS"):
        build_model(small_cfg(QUALITY_TARGET=True, CLASS_LOSS="softmax"))


def test_softmax_cross_entropy_and_l2_losses_by_hand():
    model = build_model(small_cfg(CLASS_LOSS="softmax", POINT_LOSS="l2", POINT_WEIGHT=2e-4,
                                  BACKGROUND_WEIGHT=0.5, MATCHER_CLASS_COST="prob",
                                  MATCHER_POINT_WEIGHT=0.05, MATCHER_DISTANCE="L2",
                                  MATCHER_TOPK=1))
    # One positive with logits (2, 0) (object, background); two negatives with (0, 0).
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    points = torch.tensor([[[13.0, 14.0], [40.0, 40.0], [50.0, 50.0]]])
    losses = model.losses(logits, points, [targets([[10, 10]], [0])])
    ce_pos = -math.log(math.exp(2) / (math.exp(2) + 1))
    # Weighted mean: (1 * ce_pos + 0.5 * ln 2 + 0.5 * ln 2) / (1 + 0.5 + 0.5).
    assert losses["loss_p2p_cls"].item() == pytest.approx((ce_pos + LN2) / 2, rel=1e-5)
    assert losses["loss_p2p_point"].item() == pytest.approx(2e-4 * (9 + 16), rel=1e-5)


def test_an_image_without_objects_trains():
    torch.manual_seed(0)
    model = build_model(small_cfg())
    losses = model([image_input(0, 64, 64), image_input(0, 48, 64)])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Mixed batch: the empty image's predictions are all negatives.
    losses = model([image_input(3, 64, 64), image_input(0, 48, 64)])
    assert losses["loss_p2p_point"] > 0


def test_inference_nms_threshold_and_rescaling():
    model = build_model(small_cfg(NUM_CLASSES=2, NMS_BOX_SIZE=8.0, NMS_THRESH=0.01,
                                  SCORE_THRESH=0.3))
    anchors = anchor_points(1, 4, 8.0)  # (4, 2): x = 4, 12, 20, 28
    # Scores (sigmoid) per anchor and class; the image is 16 px wide: anchors 2, 3
    # lie in the batch padding.
    probs = torch.tensor([[0.9, 0.8], [0.8, 0.1], [0.95, 0.0], [0.99, 0.0]])
    logits = torch.logit(probs)[None]
    points = torch.tensor([[[5.0, 4.0], [7.0, 4.0], [20.0, 4.0], [28.0, 4.0]]])
    out = model.inference(logits, points, anchors, [{"height": 16, "width": 32}], [(8, 16)])
    inst = out[0]["instances"]
    assert inst.image_size == (16, 32)
    # Class 0: (5, 4) 0.9 suppresses (7, 4) 0.8 (boxes overlap); class 1: (5, 4) 0.8 kept
    # (class-wise), (7, 4) 0.1 under the threshold. Rescaled x2.
    got = sorted(zip(inst.pred_classes.tolist(), inst.scores.tolist(),
                     inst.pred_points.tolist()))
    assert [(c, round(s, 4), p) for c, s, p in got] == [(0, 0.9, [10.0, 8.0]),
                                                          (1, 0.8, [10.0, 8.0])]
    # Without NMS both class-0 points stay, by decreasing score.
    model.nms_box_size = 0
    inst = model.inference(logits, points, anchors, [{"height": 8, "width": 16}], [(8, 16)])[0][
        "instances"]
    assert inst.scores.tolist() == pytest.approx([0.9, 0.8, 0.8])
    model.detections_per_image = 1
    inst = model.inference(logits, points, anchors, [{}], [(8, 16)])[0]["instances"]
    assert len(inst) == 1 and inst.image_size == (8, 16)


def test_point_nms_suppresses_by_box_overlap():
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [40.0, 0.0]])
    scores = torch.tensor([0.5, 0.9, 0.7])
    classes = torch.zeros(3, dtype=torch.int64)
    # 32 px boxes at IoU 0.01: (0, 0) overlaps (10, 0); (40, 0) overlaps (10, 0) too.
    assert point_nms(points, scores, classes, 32, 0.01).tolist() == [1]
    assert point_nms(points, scores, classes, 8, 0.01).tolist() == [1, 2, 0]
    assert point_nms(points, scores, torch.tensor([0, 1, 2]), 32, 0.01).tolist() == [1, 2, 0]


def test_point_vote_is_the_score_weighted_mean_of_its_class_within_the_radius():
    points = torch.tensor([[10.0, 10.0], [14.0, 10.0], [10.0, 16.0], [30.0, 10.0], [11.0, 10.0]])
    scores = torch.tensor([0.8, 0.4, 0.2, 0.9, 0.7])
    classes = torch.tensor([0, 0, 0, 0, 1])
    kept = torch.tensor([3, 0, 4])
    got = point_vote(points, scores, classes, kept, 6.0)
    # (30, 10) has no neighbour within 6 px; (10, 10) takes (14, 10) and (10, 16) of its
    # class (distance 4 and 6, the radius included) but not (11, 10), of class 1.
    expected = torch.tensor([[30.0, 10.0],
                             [(0.8 * 10 + 0.4 * 14 + 0.2 * 10) / 1.4,
                              (0.8 * 10 + 0.4 * 10 + 0.2 * 16) / 1.4],
                             [11.0, 10.0]])
    torch.testing.assert_close(got, expected)
    assert torch.equal(point_vote(points, scores, classes, kept, 0.0), points[kept])
    assert point_vote(points, scores, classes, kept[:0], 6.0).shape == (0, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_vote_equals_a_loop_over_the_candidates(seed):
    g = torch.Generator().manual_seed(seed)
    n = 200
    points = torch.rand(n, 2, generator=g) * 100
    scores = torch.rand(n, generator=g) * 0.9 + 0.05
    classes = torch.randint(0, 3, (n,), generator=g)
    kept = point_nms(points, scores, classes, 12.0, 0.01)
    got = point_vote(points, scores, classes, kept, 9.0)
    for row, k in zip(got.tolist(), kept.tolist()):
        sx = sy = sw = 0.0
        for j in range(n):
            dx, dy = (points[j] - points[k]).tolist()
            if classes[j] == classes[k] and math.hypot(dx, dy) <= 9.0:
                w = float(scores[j])
                sx, sy, sw = sx + w * float(points[j, 0]), sy + w * float(points[j, 1]), sw + w
        assert row == pytest.approx([sx / sw, sy / sw], abs=1e-4)


def test_inference_votes_the_kept_points():
    model = build_model(small_cfg(NMS_BOX_SIZE=8.0, SCORE_THRESH=0.3, VOTE_RADIUS=4.0)).eval()
    assert model.vote_radius == 4.0
    anchors = anchor_points(1, 4, 8.0)
    probs = torch.tensor([[0.9], [0.6], [0.2], [0.7]])
    logits = torch.logit(probs)[None]
    points = torch.tensor([[[5.0, 4.0], [8.0, 4.0], [6.0, 4.0], [28.0, 4.0]]])
    inst = model.inference(logits, points, anchors, [{}], [(8, 32)])[0]["instances"]
    # (5, 4) 0.9 suppresses (8, 4) 0.6 and takes it into its mean; (6, 4) scores under the
    # threshold and is no candidate; (28, 4) stands alone.
    torch.testing.assert_close(inst.pred_points,
                               torch.tensor([[(0.9 * 5 + 0.6 * 8) / 1.5, 4.0], [28.0, 4.0]]))
    assert inst.scores.tolist() == pytest.approx([0.9, 0.7])


def test_batch_inference_returns_every_image_in_original_pixels():
    torch.manual_seed(0)
    model = build_model(small_cfg(SCORE_THRESH=0.0, NMS_BOX_SIZE=4.0)).eval()
    batch = [image_input(0, 64, 96, 128, 192), image_input(0, 40, 40), image_input(0, 72, 50, 36, 25)]
    with torch.no_grad():
        out = model(batch)
    assert len(out) == 3
    for x, o in zip(batch, out):
        inst = o["instances"]
        assert inst.image_size == (x["height"], x["width"])
        assert len(inst) > 0
        assert (inst.pred_points[:, 0] <= x["width"]).all()
        assert (inst.pred_points[:, 1] <= x["height"]).all()
        assert (inst.pred_points >= 0).all()
    # Asked for twice the input size: the same predictions, times 2 (no NMS, whose boxes
    # are in output pixels).
    model.nms_box_size = 0
    with torch.no_grad():
        same = model([dict(batch[0], height=64, width=96)])[0]["instances"]
        double = model([batch[0]])[0]["instances"]
    torch.testing.assert_close(double.pred_points, 2 * same.pred_points)
    torch.testing.assert_close(double.scores, same.scores)


@pytest.mark.parametrize("key,value,match", [
    ("CLASS_LOSS", "bce", "CLASS_LOSS"),
    ("POINT_LOSS", "l1", "POINT_LOSS"),
    ("MATCHER_DISTANCE", "cosine", "DISTANCE"),
    ("MATCHER_TOPK", 0, "TOPK"),
    ("VOTE_RADIUS", -8.0, "VOTE_RADIUS"),
    ("VOTE_RADIUS", float("nan"), "VOTE_RADIUS"),
])
def test_bad_config_values_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(small_cfg(**{key: value}))


def test_class_out_of_range_names_the_key():
    model = build_model(small_cfg())
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        model.losses(torch.zeros(1, 2, 1), torch.zeros(1, 2, 2), [targets([[1, 1]], [3])])


def test_a_calibrated_threshold_counts_and_travels_in_the_checkpoint(tmp_path):
    from cpr_d2.engine import load_inference_weights

    model = build_model(small_cfg(SCORE_THRESH=0.05, NMS_BOX_SIZE=0))
    anchors = anchor_points(1, 3, 8.0)
    logits = torch.logit(torch.tensor([[0.9], [0.5], [0.2]]))[None]
    points = torch.tensor([[[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]]])
    out = model.inference(logits, points, anchors, [{}], [(8, 24)])[0]
    assert "count" not in out and "count_threshold" not in out  # not calibrated
    model.count_threshold.fill_(0.3)
    out = model.inference(logits, points, anchors, [{}], [(8, 24)])[0]
    assert out["count_threshold"] == pytest.approx(0.3) and out["count"] == 2
    # Saved with the weights and loaded with them.
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    fresh = build_model(small_cfg())
    assert float(fresh.count_threshold) == -1
    load_inference_weights(fresh, str(path))
    assert float(fresh.count_threshold) == pytest.approx(0.3)
    # A checkpoint from before the buffer existed still loads (no threshold).
    old = {k: v for k, v in model.state_dict().items() if k != "count_threshold"}
    torch.save({"model": old}, path)
    older = build_model(small_cfg())
    load_inference_weights(older, str(path))
    assert float(older.count_threshold) == -1


def test_a_soft_count_counts_from_the_scores_and_the_area_and_travels(tmp_path):
    from cpr_d2.engine import load_inference_weights
    from cpr_d2.modeling.postprocess import soft_count

    model = build_model(small_cfg(SCORE_THRESH=0.05, NMS_BOX_SIZE=0, COUNT_RULE="soft"))
    anchors = anchor_points(1, 3, 8.0)
    logits = torch.logit(torch.tensor([[0.9], [0.5], [0.2]]))[None]
    points = torch.tensor([[[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]]])
    model.count_threshold.fill_(0.3)
    out = model.inference(logits, points, anchors, [{}], [(8, 24)])[0]
    assert out["count_rule"] == "threshold" and out["count"] == 2  # no soft fit yet
    # 2.5 x (0.9 + 0.5 + 0.2) + 0.01 per pixel x 192 pixels = 5.92 -> 6.
    model.count_soft.copy_(torch.tensor([2.5, 0.01]))
    out = model.inference(logits, points, anchors, [{}], [(8, 24)])[0]
    assert out["count_rule"] == "soft" and out["count"] == 6
    assert out["count_threshold"] == pytest.approx(0.3)
    # 2.5 x 1.6 - 0.01 x 192 = 2.08 -> 2; a negative value counts 0.
    assert soft_count([1.6, 0.0], [192.0, 100.0], (2.5, -0.01)).tolist() == [2, 0]
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    fresh = build_model(small_cfg(COUNT_RULE="soft"))
    assert fresh.soft_coefficients() is None
    load_inference_weights(fresh, str(path))
    assert fresh.soft_coefficients() == pytest.approx((2.5, 0.01))
    # The same weights under COUNT_RULE "threshold" count with the threshold.
    plain = build_model(small_cfg())
    load_inference_weights(plain, str(path))
    assert plain.soft_coefficients() is None
    # A checkpoint from before the soft count existed still loads (none).
    old = {k: v for k, v in model.state_dict().items() if k != "count_soft"}
    torch.save({"model": old}, path)
    older = build_model(small_cfg(COUNT_RULE="soft"))
    load_inference_weights(older, str(path))
    assert older.soft_coefficients() is None
    with pytest.raises(ValueError, match="COUNT_RULE"):
        build_model(small_cfg(COUNT_RULE="sum"))


def test_duplicates_benchmark_sorts_points_by_what_they_found():
    import numpy as np

    bench = load_benchmark("p2p_duplicates")
    # Two 20 x 20 px trees centred at (20, 20) and (60, 20).
    boxes = np.array([[10.0, 10.0, 20.0, 20.0], [50.0, 10.0, 20.0, 20.0]])
    points = np.array([[21.0, 20.0],   # finds tree 0 (d 0.05)
                       [38.0, 20.0],   # 17 px from it, d 0.9 of tree 0: its duplicate
                       [62.0, 34.0],   # d 0.71 of tree 1, none found it at d <= 0.5: near
                       [58.0, 22.0],   # finds tree 1, though it scores last
                       [90.0, 90.0]])  # elsewhere
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.6])
    kinds, dup, found = bench.sort_points(points, scores, boxes)
    assert kinds.tolist() == ["found", "duplicate", "near", "found", "elsewhere"]
    assert dup.tolist() == [17.0]
    assert sorted(found.tolist()) == [0, 3]
    assert bench.nearest_other(points[[0, 3]]).tolist() == [37.0, 37.0]
    kinds, dup, found = bench.sort_points(points, scores, np.zeros((0, 4)))
    assert set(kinds) == {"elsewhere"} and len(dup) == len(found) == 0


def test_duplicates_benchmark_peaks_keep_only_local_maxima():
    from cpr_d2.modeling.p2pnet import P2PNet

    bench = load_benchmark("p2p_duplicates")
    torch.manual_seed(0)
    model = build_model(small_cfg(NUM_CLASSES=1)).eval()
    inputs = [{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}]
    plain = P2PNet._predict
    _, logits, _, _ = model._predict(inputs)
    with bench.score_peaks(P2PNet):
        _, peaked, _, _ = model._predict(inputs)
    assert P2PNet._predict is plain
    grid = logits[0, :, 0].reshape(8, 8)
    kept = peaked[0, :, 0].reshape(8, 8) > -1e3
    padded = torch.nn.functional.pad(grid, (1, 1, 1, 1), value=-float("inf"))
    local_max = torch.stack([padded[i:i + 8, j:j + 8] for i in range(3) for j in range(3)]).amax(0)
    assert torch.equal(kept, grid >= local_max) and 0 < kept.sum() < 64
    torch.testing.assert_close(peaked[0, :, 0].reshape(8, 8)[kept], grid[kept])


def test_vote_benchmark_post_processing_equals_the_models_inference():
    bench = load_benchmark("p2p_vote")
    torch.manual_seed(0)
    model = build_model(small_cfg(NUM_CLASSES=2, SCORE_THRESH=0.2)).eval()
    anchors = anchor_points(6, 8, 8.0)
    logits = torch.randn(1, len(anchors), 2)
    points = anchors[None] + 6 * torch.randn(1, len(anchors), 2)
    model.nms_box_size, model.detections_per_image, model.vote_radius = 0.0, 10 ** 9, 0.0
    candidates = model.inference(logits, points, anchors, [{}], [(48, 64)])[0]["instances"]
    for box, radius, most in ((12.0, 0.0, 100), (12.0, 8.0, 100), (20.0, 8.0, 5)):
        model.nms_box_size, model.vote_radius, model.detections_per_image = box, radius, most
        inst = model.inference(logits, points, anchors, [{}], [(48, 64)])[0]["instances"]
        got = bench.post_process([candidates], box, radius, model.nms_thresh, most)[0]
        assert 0 < len(got["points"]) == len(inst) <= most
        torch.testing.assert_close(torch.from_numpy(got["points"]).float(), inst.pred_points)
        assert got["scores"].tolist() == inst.scores.tolist()
        assert got["classes"].tolist() == inst.pred_classes.tolist()
