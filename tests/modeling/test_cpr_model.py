import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from cpr_d2.config import get_cpr_d2_cfg


def tiny_cprnet_cfg(num_classes=2, radius=2, channels=64):
    """A CPRNet config small enough for unit tests (the forest base, a 1-conv head)."""
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file("configs/forest/Base-forest.yaml")
    cfg.MODEL.META_ARCHITECTURE = "CPRNet"
    cfg.MODEL.CPR.NUM_CLASSES = num_classes
    cfg.MODEL.CPR.RADIUS = radius
    cfg.MODEL.CPR.NUM_CONVS = 1
    cfg.MODEL.CPR.CONV_CHANNELS = channels
    return cfg


def tiny_cprnet(num_classes=2, radius=2):
    torch.manual_seed(0)
    return build_model(tiny_cprnet_cfg(num_classes, radius))


def sample(height, width, points, classes, out_scale=2):
    inst = Instances((height, width))
    inst.gt_points = torch.tensor(points, dtype=torch.float32).reshape(-1, 2)
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    inst.gt_ann_index = torch.arange(len(classes))
    return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8),
            "instances": inst, "height": height * out_scale, "width": width * out_scale}


def test_training_with_an_image_without_objects_reaches_every_parameter():
    model = tiny_cprnet()
    losses = model([sample(96, 128, [[30.0, 40.0], [90.0, 20.0]], [0, 1]), sample(64, 80, [], [])])
    assert set(losses) == {"loss_cpr_mil", "loss_cpr_ann", "loss_cpr_neg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0


def test_a_batch_without_any_object_trains():
    model = tiny_cprnet()
    losses = model([sample(64, 64, [], []), sample(64, 80, [], [])])
    assert losses["loss_cpr_mil"] == 0 and losses["loss_cpr_ann"] == 0
    assert losses["loss_cpr_neg"] > 0  # every cell is a negative for every class
    sum(losses.values()).backward()


def test_refinement_returns_every_object_in_original_pixels():
    model = tiny_cprnet().eval()
    points = [[30.0, 40.0], [90.0, 20.0], [10.0, 70.0]]
    with torch.no_grad():
        out = model([sample(96, 128, points, [0, 1, 1]), sample(64, 80, [], [])])
    assert len(out) == 2
    first = out[0]["instances"]
    assert first.image_size == (192, 256)
    assert torch.equal(first.coarse_points, torch.tensor(points) * 2)
    assert first.pred_points.shape == (3, 2) and first.pred_classes.tolist() == [0, 1, 1]
    assert first.gt_ann_index.tolist() == [0, 1, 2]
    # Moved points are p-weighted means of bag points: within R * stride of the annotation.
    assert ((first.pred_points - first.coarse_points).norm(dim=1) <= 2 * 8 * 2 + 1e-3).all()
    assert len(out[1]["instances"]) == 0


def test_clear_errors_for_missing_annotations_and_classes():
    model = tiny_cprnet().eval()
    with pytest.raises(ValueError, match="with_annotations=True"):
        model([{"image": torch.zeros(3, 32, 32, dtype=torch.uint8), "height": 32, "width": 32}])
    with pytest.raises(ValueError, match="MODEL.CPR.NUM_CLASSES is 2"):
        model([sample(32, 32, [[5.0, 5.0]], [4])])


def test_bag_scores_for_visualisation():
    model = tiny_cprnet(radius=1)
    model.return_bag_scores = True
    model.eval()
    with torch.no_grad():
        inst = model([sample(64, 64, [[20.0, 30.0]], [1])])[0]["instances"]
    assert inst.bag_points.shape == (1, 9, 2) and inst.bag_scores.shape == (1, 9)
    # Ring 1 at 8 px (16 px in original pixels), the annotated point last.
    assert torch.allclose(inst.bag_points[0, 0], torch.tensor([56.0, 60.0]))
    assert torch.equal(inst.bag_points[0, -1], inst.coarse_points[0])
    assert ((inst.bag_scores > 0) & (inst.bag_scores < 1)).all()


def test_finer_refinement_rings_sample_the_same_disc():
    from cpr_d2.layers import bag_coordinates, bilinear_gather_reference
    from cpr_d2.modeling.backbone import normalized_images
    from cpr_d2.modeling.cpr_refine import refine_points

    model = tiny_cprnet(radius=2)
    model.return_bag_scores = True
    model.refine_score_thresh = 0.0  # untrained scores are about the prior, 0.01
    model.eval()
    inp = sample(64, 80, [[20.0, 30.0], [60.0, 10.0], [3.0, 60.0]], [1, 1, 0], out_scale=1)
    with torch.no_grad():
        coarse = model([inp])[0]["instances"]
        model.refine_rings, model.refine_ring_spacing = 4, 4.0  # REFINE_RING_STEP = 0.5
        fine = model([inp])[0]["instances"]
        # The same by hand: the class map sampled at rings every 4 px out to 16 px.
        images = normalized_images([inp], model.pixel_mean, model.pixel_std,
                                   model.backbone.size_divisibility)
        cls_map, _ = model.head(model.backbone(images.tensor)[model.in_feature])
        pts = inp["instances"].gt_points
        coords = bag_coordinates(pts, 4, 4.0)
        logits = bilinear_gather_reference(cls_map, coords.reshape(-1, 2),
                                           torch.zeros(coords.shape[0] * coords.shape[1],
                                                       dtype=torch.int64), 8.0)
        valid = ((coords >= 0) & (coords <= torch.tensor([80.0, 64.0]))).all(-1)
        expected = refine_points(coords, valid, logits.reshape(3, 81, 2).sigmoid(), pts,
                                 inp["instances"].gt_classes, 0.0, 0.5)[0]
    assert coarse.bag_points.shape == (3, 25, 2) and fine.bag_points.shape == (3, 81, 2)
    assert (fine.bag_points - fine.coarse_points[:, None]).norm(dim=2).max() <= 16 + 1e-4
    torch.testing.assert_close(fine.pred_points, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(fine.pred_points, coarse.pred_points)


@pytest.mark.parametrize("step", [0.3, 0.0, 1.5])
def test_refine_ring_step_must_split_the_radius_into_rings(step):
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file("configs/forest/Base-forest.yaml")
    cfg.MODEL.META_ARCHITECTURE = "CPRNet"
    cfg.MODEL.CPR.NUM_CLASSES = 1
    cfg.MODEL.CPR.RADIUS = 2
    cfg.MODEL.CPR.REFINE_RING_STEP = step
    with pytest.raises(ValueError, match="REFINE_RING_STEP"):
        build_model(cfg)


def test_finer_refinement_rings_on_a_batch_without_objects():
    model = tiny_cprnet(radius=2)
    model.refine_rings, model.refine_ring_spacing = 8, 2.0
    model.eval()
    with torch.no_grad():
        out = model([sample(64, 64, [], []), sample(48, 64, [], [])])
    assert [len(o["instances"]) for o in out] == [0, 0]
