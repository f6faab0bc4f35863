"""Checkpoints of untrained models, for tests of the tools that load one."""
import torch


def untrained_checkpoint(config, path, seed=0):
    """Write the weights of the model `config` builds (seeded, untrained; the class count
    from the training data, as the forest configs ask) to `path`; returns `path`."""
    from detectron2.modeling import build_model

    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.data.classes import resolve_num_classes

    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(config)
    resolve_num_classes(cfg, training=True)
    torch.manual_seed(seed)
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return path


def untrained_cfg(config, path, seed=0):
    """The config `config` (class count from the training data) with MODEL.WEIGHTS an
    untrained checkpoint written to `path` (untrained_checkpoint)."""
    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.data.classes import resolve_num_classes

    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(config)
    resolve_num_classes(cfg, training=True)
    cfg.MODEL.WEIGHTS = str(untrained_checkpoint(config, path, seed))
    return cfg
