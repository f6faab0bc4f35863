"""Every shipped config merges into cpr_d2's config (no unknown key, no wrong type) and
builds its model."""
import glob

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
