"""cpr_d2.engine.predictor: PointPredictor on one image and on large images in tiles."""
import numpy as np
import pytest
import torch
from detectron2.structures import Instances

from cpr_d2.engine.predictor import PointPredictor, Tile, _in_core, tile_grid
from cpr_d2.modeling.p2pnet import point_nms
from tests.model_helpers import untrained_cfg

P2P = "configs/forest/p2p_R18_s8.yaml"


def test_tile_grid_covers_the_image_and_cores_partition_it():
    tiles = tile_grid(3000, 5000, 2048)
    assert len(tiles) == 6
    for t in tiles:
        assert 0 <= t.x0 < t.x1 <= 5000 and 0 <= t.y0 < t.y1 <= 3000
        assert t.x1 - t.x0 <= 2048 and t.y1 - t.y0 <= 2048
        assert t.x0 <= t.cx0 < t.cx1 <= t.x1 and t.y0 <= t.cy0 < t.cy1 <= t.y1
    xs = sorted({(t.cx0, t.cx1) for t in tiles})
    ys = sorted({(t.cy0, t.cy1) for t in tiles})
    assert xs[0][0] == 0 and xs[-1][1] == 5000 and all(a[1] == b[0] for a, b in zip(xs, xs[1:]))
    assert ys[0][0] == 0 and ys[-1][1] == 3000 and all(a[1] == b[0] for a, b in zip(ys, ys[1:]))
    assert tile_grid(345, 416, 416) == [Tile(0, 0, 416, 345, 0.0, 0.0, 416.0, 345.0)]
    with pytest.raises(ValueError, match="overlap must be .* less than half the tile"):
        tile_grid(1000, 1000, 256, overlap=128)
    with pytest.raises(ValueError, match="tile must be a positive"):
        tile_grid(1000, 1000, 0)


class _BrightPixels:
    """A stand-in network: a point at every bright pixel of each tile it is given."""
    nms_box_size, nms_thresh, detections_per_image = 0.0, 1.0, 10 ** 9

    def __init__(self):
        self.batches = []

    def __call__(self, images):
        self.batches.append(len(images))
        out = []
        for tile in images:
            ys, xs = np.nonzero(tile[:, :, 0])
            inst = Instances(tile.shape[:2])
            inst.pred_points = torch.tensor(np.stack([xs, ys], 1) + 0.5,
                                            dtype=torch.float32).reshape(-1, 2)
            inst.scores = torch.ones(len(xs))
            inst.pred_classes = torch.zeros(len(xs), dtype=torch.int64)
            out.append(inst)
        return out


def _stand_in():
    predictor = PointPredictor.__new__(PointPredictor)
    predictor.model = _BrightPixels()
    predictor.input_format = "BGR"
    predictor._predict = predictor.model
    return predictor


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_predict_large_keeps_each_point_once(batch_size):
    """Merged over tiles, every dot of the image comes back exactly once, at its place,
    including dots in the tile overlaps; tiles go through the network batch_size at once."""
    height, width = 700, 900
    image = np.zeros((height, width, 3), np.uint8)
    rng = np.random.default_rng(0)
    dots = {(int(x), int(y))
            for x, y in zip(rng.integers(0, width, 400), rng.integers(0, height, 400))}
    # Dots at the image edges, the tile edges and the core borders (x 224, 416, 608, 738;
    # y 224, 416, 542) too.
    dots |= {(x, y) for x in (0, 191, 192, 223, 224, 255, 256, 415, 416, 643, 644, 737, 738,
                              width - 1)
             for y in (0, 223, 224, 255, 256, 443, 444, 541, 542, height - 1)}
    for x, y in dots:
        image[y, x] = 255
    predictor = _stand_in()
    merged = predictor.predict_large(image, tile=256, batch_size=batch_size, progress=False)
    assert len(tile_grid(height, width, 256)) == 20
    assert max(predictor.model.batches) == min(batch_size, 20)
    assert sum(predictor.model.batches) == 20
    found = sorted(tuple(int(v) for v in p) for p in (merged.pred_points - 0.5).round())
    assert found == sorted(dots)  # no dot lost, none twice


def test_predict_large_checks_its_image():
    with pytest.raises(ValueError, match=r"H x W x 3 uint8 image in BGR order"):
        _stand_in().predict_large(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        _stand_in().predict_large(np.zeros((300, 300, 3), np.uint8), tile=128, batch_size=0)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    """An untrained tiny P2PNet that keeps every point (score threshold 0)."""
    cfg = untrained_cfg(P2P, tmp_path_factory.mktemp("predictor") / "m.pth")
    cfg.MODEL.P2PNET.SCORE_THRESH = 0.0
    cfg.MODEL.P2PNET.DETECTIONS_PER_IMAGE = 1000
    return PointPredictor(cfg)


@pytest.fixture(scope="module")
def forest_tile():
    from detectron2.data import DatasetCatalog

    from cpr_d2.data import image_io

    record = DatasetCatalog.get("forest_test")[0]
    return image_io.read_image(record["file_name"], format="BGR")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_predict_large_equals_the_tiles_predicted_by_hand(predictor, forest_tile, one_thread):
    """The same image cut into tiles by hand, each predicted alone, its core points kept and
    the doubles removed by class-wise NMS: the same points, scores and classes."""
    image = np.ascontiguousarray(np.concatenate([forest_tile, forest_tile[:, ::-1]], 1))
    height, width = image.shape[:2]
    tiles = tile_grid(height, width, 256, overlap=32)
    assert len(tiles) > 4
    points, scores, classes = [], [], []
    for t in tiles:
        inst = predictor(np.ascontiguousarray(image[t.y0:t.y1, t.x0:t.x1]))
        p = inst.pred_points + torch.tensor([t.x0, t.y0], dtype=torch.float32)
        keep = (_in_core(p[:, 0], t.cx0, t.cx1, t.x1 == width)
                & _in_core(p[:, 1], t.cy0, t.cy1, t.y1 == height))
        points.append(p[keep])
        scores.append(inst.scores[keep])
        classes.append(inst.pred_classes[keep])
    points, scores, classes = torch.cat(points), torch.cat(scores), torch.cat(classes)
    kept = point_nms(points, scores, classes, predictor.model.nms_box_size,
                     predictor.model.nms_thresh)
    for batch_size in (1, 3):
        large = predictor.predict_large(image, tile=256, overlap=32, batch_size=batch_size)
        assert large.image_size == (height, width)
        assert len(large) == len(kept) > 0
        assert torch.allclose(large.pred_points, points[kept], atol=1e-3)
        assert torch.allclose(large.scores, scores[kept], atol=1e-5)
        assert torch.equal(large.pred_classes, classes[kept])
    # An image that fits in one tile: exactly one pass.
    whole = predictor(forest_tile)
    once = predictor.predict_large(forest_tile, tile=max(forest_tile.shape[:2]))
    assert torch.equal(once.pred_points, whole.pred_points)


def test_predictor_refuses_other_models_and_weights(tmp_path, predictor):
    cfg = predictor.cfg.clone()
    cfg.defrost()
    cfg.MODEL.META_ARCHITECTURE = "CPRNet"
    with pytest.raises(ValueError, match="PointPredictor runs P2PNet; the config builds CPRNet"):
        PointPredictor(cfg)
    cfg = predictor.cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PointPredictor(cfg)


def test_point_refiner_equals_the_model_on_the_mapped_record(tmp_path, one_thread):
    from detectron2.data import DatasetCatalog

    from cpr_d2.data import PointDatasetMapper, image_io
    from cpr_d2.engine.predictor import PointRefiner

    cpr = "configs/forest/cpr_R18_s8_r2.yaml"
    refiner = PointRefiner(untrained_cfg(cpr, tmp_path / "cpr.pth"))
    record = next(r for r in DatasetCatalog.get("forest") if r["annotations"])
    anns = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
    image = image_io.read_image(record["file_name"], format=refiner.input_format)
    got = refiner(image, [a["point"] for a in anns], [a["category_id"] for a in anns])
    mapper = PointDatasetMapper(refiner.cfg, is_train=False, with_annotations=True)
    with torch.no_grad():
        expected = refiner.model([mapper(dict(record, annotations=anns))])[0]["instances"]
    assert len(got) == len(anns) > 0
    assert torch.equal(got.pred_points, expected.pred_points)
    assert torch.equal(got.coarse_points, torch.tensor([a["point"] for a in anns],
                                                       dtype=torch.float32))
    assert torch.equal(got.gt_ann_index, torch.arange(len(anns)))
    with pytest.raises(ValueError, match="classes must be the model's class indices, 0 to 0"):
        refiner(image, [[1.0, 1.0]], [3])
    with pytest.raises(ValueError, match="2 points but 1 classes"):
        refiner(image, [[1.0, 1.0], [2.0, 2.0]], [0])
