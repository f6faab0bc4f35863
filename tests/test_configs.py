"""Every shipped config merges into cpr_d2's config (no unknown key, no wrong type) and
builds its model; the paper configs follow the official runs' lr per image and
schedule."""
import glob
import math
import re

import pytest
import torch
from detectron2.modeling import build_model

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data.classes import class_count_key, resolve_num_classes

CONFIGS = sorted(p for p in glob.glob("configs/**/*.yaml", recursive=True)
                 if not p.split("/")[-1].startswith("Base-"))


def test_the_configs_are_found():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_its_model(path):
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    node, _ = class_count_key(cfg)
    if node.NUM_CLASSES == 0:  # from the training data (the forest configs)
        resolve_num_classes(cfg, training=True)
        assert node.NUM_CLASSES == 1
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    if cfg.MODEL.META_ARCHITECTURE == "P2PNet":
        c = cfg.MODEL.P2PNET
        logits_per_cell = c.ANCHOR_ROWS * c.ANCHOR_COLS * (
            c.NUM_CLASSES + (c.CLASS_LOSS == "softmax"))
        assert model.head.cls_logits.out_channels == logits_per_cell
    else:
        assert model.head.cls_logits.out_channels == cfg.MODEL.CPR.NUM_CLASSES
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- paper runs

# What the official runs used, as each paper config's header cites them (the authors'
# code, ucas-vg/PointTinyBenchmark; the crowd config: the original P2PNet's train.py):
# lr and images per step; epochs and the epochs after which the lr drops; warmup
# iterations and start factor; the training images (None: not stated). None for the
# schedule: the file's schedule is its own. The forest configs are this project's own.
OFFICIAL = {
    "configs/COCO/cpr_R50_s8_1x.yaml": dict(
        lr=0.01, batch=64, epochs=12, drops=(8, 11), warmup=(500, 0.001), images=118287),
    "configs/COCO/p2p_R50_s8_1x.yaml": dict(
        lr=1e-4, batch=64, epochs=12, drops=(8, 11), warmup=(500, 1 / 3), images=118287),
    # 4 images per step by the run's name; its command line says 2 (the file's header).
    "configs/DOTA/cpr_R50_s8_1x.yaml": dict(
        lr=1e-4, batch=4, epochs=12, drops=(8, 11), warmup=(500, 0.001), images=None),
    "configs/DOTA/p2p_R50_s16_1x.yaml": dict(
        lr=1e-4, batch=8, epochs=12, drops=(8, 11), warmup=(500, 1 / 3), images=None),
    "configs/SeaPerson/cpr_R50_s4_1x.yaml": dict(
        lr=0.05, batch=8, epochs=6, drops=(4, 5), warmup=(500, 0.001), images=None),
    "configs/SeaPerson/p2p_R50_s4_1x.yaml": dict(
        lr=1e-4, batch=8, epochs=12, drops=(8, 11), warmup=(500, 1 / 3), images=None),
    "configs/crowd/p2pnet_original_R50_s8.yaml": dict(
        lr=1e-4, batch=8, epochs=None, drops=None, warmup=None, images=None),
}
PAPER_CONFIGS = sorted(OFFICIAL)


def _merged(path):
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(path)
    return cfg


def _stated_training_images(path):
    """The training set size the file's header states ("training images: N"), or None."""
    with open(path) as f:
        found = re.findall(r"^#\s*training images:\s*(\d+)", f.read(), re.MULTILINE)
    assert len(found) <= 1, f"{path} states its training set size more than once"
    return int(found[0]) if found else None


def test_every_paper_config_has_its_official_run():
    own = [p for p in CONFIGS if p.startswith("configs/forest/")]
    assert sorted(set(CONFIGS) - set(own)) == PAPER_CONFIGS


@pytest.mark.parametrize("path", PAPER_CONFIGS)
def test_lr_per_image_is_the_official_runs(path):
    """The linear scaling rule: lr / images per step as in the official run."""
    run, solver = OFFICIAL[path], _merged(path).SOLVER
    assert solver.BASE_LR / solver.IMS_PER_BATCH == pytest.approx(run["lr"] / run["batch"],
                                                                 rel=1e-12)


@pytest.mark.parametrize("path", PAPER_CONFIGS)
def test_warmup_covers_the_official_runs_images(path):
    run, solver = OFFICIAL[path], _merged(path).SOLVER
    if run["warmup"] is None:
        pytest.skip("the original has no warmup; this file's is its own")
    iters, factor = run["warmup"]
    assert solver.WARMUP_METHOD == "linear"
    assert solver.WARMUP_ITERS * solver.IMS_PER_BATCH == iters * run["batch"]
    assert solver.WARMUP_FACTOR == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("path", PAPER_CONFIGS)
def test_schedule_is_the_official_epochs(path):
    """MAX_ITER x IMS_PER_BATCH covers the official epochs of the training set the file
    states (at most one more iteration per epoch), and the lr drops after the official
    epochs; where the file states no size, the drops are at the official share of
    MAX_ITER."""
    run, solver = OFFICIAL[path], _merged(path).SOLVER
    images = _stated_training_images(path)
    assert images == run["images"]
    if run["drops"] is None:
        pytest.skip("the original's schedule does not translate; this file's is its own")
    epochs, batch = run["epochs"], solver.IMS_PER_BATCH
    if images is None:
        assert tuple(solver.STEPS) == tuple(solver.MAX_ITER * e / epochs for e in run["drops"])
        return
    for iters, e in zip((solver.MAX_ITER, *solver.STEPS), (epochs, *run["drops"])):
        assert e * images <= iters * batch < e * (images + batch), (iters, e)
    assert solver.MAX_ITER == epochs * math.ceil(images / batch)
    assert tuple(solver.STEPS) == tuple(e * math.ceil(images / batch) for e in run["drops"])
