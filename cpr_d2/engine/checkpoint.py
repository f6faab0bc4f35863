"""Loading trained weights for inference (evaluation, refinement, the demo), strictly.

detectron2's checkpointer loads whatever matches and only logs the rest, which is
right when fine-tuning from ImageNet weights but turns a wrong MODEL.WEIGHTS at
inference into a silently untrained model. Here every weight of the model must
come from the file.
"""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["load_inference_weights"]


def _checkpoint_state(path):
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for non-checkpoint files
        raise ValueError(f"MODEL.WEIGHTS {path} is not a checkpoint torch can read "
                         f"({type(e).__name__}: {e}); pass a model_*.pth written by "
                         "tools/train_net.py") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return data["model"]
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    raise ValueError(f"MODEL.WEIGHTS {path} holds no model weights (expected a dict with a "
                     "'model' entry, as tools/train_net.py writes)")


OPTIONAL_WEIGHTS = ("count_threshold",)


def load_inference_weights(model, path, arch=None):
    """Load `path` into `model` (eval, refinement, demo). Raises a ValueError naming the
    file when it is missing, unreadable, or does not hold every weight of the model with
    the right shape (a checkpoint of another model or config)."""
    arch = arch or type(model).__name__
    if not path:
        raise ValueError(f"MODEL.WEIGHTS is empty: pass the checkpoint of a trained {arch}, "
                         "e.g. MODEL.WEIGHTS output/.../model_final.pth")
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.WEIGHTS not found: {path}")
    if "://" not in path:
        state = _checkpoint_state(path)
        expected = model.state_dict()
        # Checkpoints from before a model carried a counting threshold load without one.
        missing = [k for k in expected if k not in state and k not in OPTIONAL_WEIGHTS]
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or wrong:
            detail = []
            if missing:
                detail.append(f"{len(missing)} of its {len(expected)} weights are missing "
                              f"(e.g. {missing[0]})")
            if wrong:
                k = wrong[0]
                detail.append(f"{len(wrong)} have another shape (e.g. {k}: "
                              f"{tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} "
                              "in the model)")
            raise ValueError(
                f"MODEL.WEIGHTS {path} does not fit this {arch}: {'; '.join(detail)}. It is a "
                "checkpoint of another model or config; pass the checkpoint trained with this "
                "config (same META_ARCHITECTURE, NUM_CLASSES, backbone and head sizes)")
    DetectionCheckpointer(model).load(path)
    return model
