"""MODEL.CHANNELS_LAST: the same CPRNet and P2PNet, weights stored channels-last, give
the default layout's losses, gradients, refined points and predictions (to rounding),
on fresh random images."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from cpr_d2.config import get_cpr_d2_cfg


def forest_cfg(config):
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.CPR.NUM_CLASSES = cfg.MODEL.P2PNET.NUM_CLASSES = 2
    cfg.MODEL.CPR.REFINE_SCORE_THRESH = 0.005  # untrained scores sit near the prior, 0.01
    cfg.MODEL.P2PNET.SCORE_THRESH = 0.0
    return cfg


def twins(config, dtype=torch.float32):
    """The config's model in both layouts, with the same (seeded) weights, in `dtype`."""
    cfg = forest_cfg(config)
    torch.manual_seed(0)
    default = build_model(cfg).to(dtype)
    cfg.MODEL.CHANNELS_LAST = True
    last = build_model(cfg).to(dtype)
    last.load_state_dict(default.state_dict())
    return default, last


def fresh_batch(seed):
    g = torch.Generator().manual_seed(seed)

    def sample(h, w, n):
        inst = Instances((h, w))
        inst.gt_points = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
        inst.gt_classes = torch.randint(0, 2, (n,), generator=g)
        inst.gt_ann_index = torch.arange(n)
        return {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
                "instances": inst, "height": h, "width": w}

    return [sample(96, 131, 9), sample(70, 85, 5)]


def close(a, b, what, rtol=1e-4, atol=1e-5):
    scale = max(a.abs().max().item(), 1e-6)
    assert torch.allclose(a, b, rtol=rtol, atol=atol * scale), \
        f"{what}: largest difference {(a - b).abs().max().item():.3g} (scale {scale:.3g})"


CONFIGS = ["configs/forest/p2p_R18_s8.yaml",
           "configs/forest/cpr_R18_s4_r4_f128_c64_4x192_disc_hflip.yaml"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_training_step_matches_the_default_layout(config, seed):
    """In float64, where the layouts' other order of sums leaves no visible rounding
    (in float32 the stem's gradients differ by up to about 0.5% after the backward pass
    through 18 GroupNorm layers)."""
    default, last = twins(config, torch.float64)
    conv = next(m for m in last.modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    batch = fresh_batch(seed)
    losses = [m.train()(batch) for m in (default, last)]
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        close(losses[0][key], losses[1][key], key, rtol=1e-10, atol=1e-12)
    for m, loss in zip((default, last), losses):
        sum(loss.values()).backward()
    for (name, p), q in zip(default.named_parameters(), last.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            close(p.grad, q.grad, f"gradient of {name}", rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("config", CONFIGS)
def test_inference_matches_the_default_layout(config):
    default, last = twins(config)
    batch = fresh_batch(2)
    with torch.no_grad():
        outs = [m.eval()(batch) for m in (default, last)]
    for a, b in zip(*outs):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        close(a.pred_points, b.pred_points, "points", atol=1e-4)
        close(a.scores, b.scores, "scores", atol=1e-4)


def test_a_non_bool_is_refused_naming_the_key():
    cfg = forest_cfg(CONFIGS[0])
    cfg.MODEL.CHANNELS_LAST = "yes"
    with pytest.raises(ValueError, match="MODEL.CHANNELS_LAST must be True or False"):
        build_model(cfg)
