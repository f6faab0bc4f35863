"""A non-finite loss stops training with a message naming the iteration and the loss
term, and the last good checkpoint stays loadable."""
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase, default_argument_parser

from cpr_d2.engine import Trainer, setup_cfg
from cpr_d2.modeling.cpr import CPRNet

CONFIG = "configs/forest/cpr_R18_s8_r2.yaml"
# A checkpoint after iterations 1, 3, 5, 7; no evaluation.
TINY = ["SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
        "MODEL.CPR.CONV_CHANNELS", "64", "MODEL.CPR.NUM_CONVS", "1", "DATASETS.TEST", "()"]


def _trainer(out):
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(out)])
    cfg = setup_cfg(args, training=True)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return cfg, trainer


def _assert_loads_finite(cfg, path):
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(str(path))
    saved = torch.load(path, map_location="cpu", weights_only=False)["model"]
    state = model.state_dict()
    for name, value in saved.items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(state[name], value), name


def test_nan_loss_stops_training_and_names_iteration_and_term(tmp_path, monkeypatch):
    calls = []
    losses = CPRNet.losses

    def poisoned(self, *args, **kwargs):
        result = losses(self, *args, **kwargs)
        calls.append(None)
        if len(calls) == 5:  # iteration 4
            result["loss_cpr_neg"] = result["loss_cpr_neg"] * float("nan")
        return result

    monkeypatch.setattr(CPRNet, "losses", poisoned)
    cfg, trainer = _trainer(tmp_path)
    last = tmp_path / "model_0000003.pth"
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("non-finite loss at iteration 4: loss_cpr_neg = nan; ")
    assert f"the last good checkpoint is {last}" in message
    assert "SOLVER.BASE_LR" in message and "SOLVER.CLIP_GRADIENTS" in message
    # It stopped before the backward pass: nothing after iteration 3 was saved.
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000001.pth",
                                                              "model_0000003.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == last.name
    _assert_loads_finite(cfg, last)


class _PoisonWeights(HookBase):
    """Puts a NaN into a weight after the step of `iteration` (before the checkpoint)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            with torch.no_grad():
                next(self.trainer.model.parameters()).view(-1)[0] = float("nan")


def test_non_finite_weights_are_not_checkpointed(tmp_path):
    cfg, trainer = _trainer(tmp_path)
    trainer.register_hooks([_PoisonWeights(3)])
    trainer._hooks.insert(0, trainer._hooks.pop())  # before the checkpointer
    expected = r"not saving checkpoint 'model_0000003'.*last good checkpoint is .*model_0000001\.pth"
    with pytest.raises(FloatingPointError, match=expected):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000001.pth"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    _assert_loads_finite(cfg, tmp_path / "model_0000001.pth")
