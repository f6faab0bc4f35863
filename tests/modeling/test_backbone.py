import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.fpn import FPN
from detectron2.structures import ImageList
from torch import nn

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.modeling.backbone import (
    SingleLevelFPN,
    build_single_level_fpn_backbone,
    single_level_feature_name,
    single_level_stages,
)

STRIDES = (4, 8, 16, 32)
NAMES = {4: "p2", 8: "p3", 16: "p4", 32: "p5"}
STAGES = {
    4: ["res2", "res3", "res4", "res5"],
    8: ["res3", "res4", "res5"],
    16: ["res4", "res5"],
    32: ["res5"],
}


def make_cfg(depth=18, stride=8, norm="GN", out_channels=64, resnet_norm="GN"):
    cfg = get_cpr_d2_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = resnet_norm
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.SINGLE_LEVEL_FPN.STRIDE = stride
    cfg.MODEL.SINGLE_LEVEL_FPN.OUT_CHANNELS = out_channels
    cfg.MODEL.SINGLE_LEVEL_FPN.NORM = norm
    return cfg


def build(cfg):
    return build_single_level_fpn_backbone(cfg, ShapeSpec(channels=3))


def fpn_convs(model):
    """Conv layers of the FPN part, by name (the ResNet's excluded)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not name.startswith("bottom_up.")
    }


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("stride", STRIDES)
def test_one_output_of_the_right_shape(gen, depth, stride):
    torch.manual_seed(0)
    out_channels = 32 if depth == 50 else 64
    model = build(make_cfg(depth, stride, out_channels=out_channels))
    assert isinstance(model, SingleLevelFPN)
    name = NAMES[stride]
    assert single_level_feature_name(make_cfg(depth, stride)) == name
    assert set(model.output_shape()) == {name}
    assert model.output_shape()[name] == ShapeSpec(channels=out_channels, stride=stride)
    assert model.size_divisibility == 32
    for b, h, w in [(2, 64, 96), (1, 128, 160)]:
        out = model(torch.randn(b, 3, h, w, generator=gen))
        assert set(out) == {name}
        assert out[name].shape == (b, out_channels, math.ceil(h / stride), math.ceil(w / stride))
        assert torch.isfinite(out[name]).all()


@pytest.mark.parametrize("stride", STRIDES)
def test_only_the_needed_convs_exist(stride):
    model = build(make_cfg(stride=stride))
    level = int(math.log2(stride))
    laterals = [f"fpn_lateral{k}" for k in range(level, 6)]
    assert sorted(fpn_convs(model)) == sorted(laterals + [f"fpn_output{level}"])
    assert len(fpn_convs(model)) == len(STAGES[stride]) + 1  # stride 8: 3 laterals + 1
    assert single_level_stages(make_cfg(stride=stride)) == STAGES[stride]
    # The ResNet returns exactly the stages the laterals read, whatever OUT_FEATURES said.
    assert list(model.bottom_up.output_shape()) == STAGES[stride]
    assert model.output_conv is getattr(model, f"fpn_output{level}")
    # Each conv is registered once (no duplicate parameters under a second name).
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(id(p) for p in model.parameters()))


@pytest.mark.parametrize("stride", [8, 32])
def test_equals_that_level_of_detectron2_fpn(gen, stride):
    model = build(make_cfg(stride=stride)).eval()
    ref = FPN(model.bottom_up, STAGES[stride], out_channels=64, norm="GN").eval()
    # Same names as detectron2's FPN: this level's weights load, the other levels' are
    # the only missing keys and nothing is unexpected.
    result = ref.load_state_dict(model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    level = int(math.log2(stride))
    assert all(k.startswith("fpn_output") and f"fpn_output{level}." not in k
               for k in result.missing_keys)
    x = torch.randn(2, 3, 64, 96, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[f"p{level}"], ref(x)[f"p{level}"])


def test_gradient_reaches_the_stem(gen):
    model = build(make_cfg(stride=8))
    model(torch.randn(1, 3, 64, 64, generator=gen))["p3"].square().mean().backward()
    stem_conv = model.bottom_up.stem.conv1
    assert stem_conv.weight.grad is not None and stem_conv.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_resnet_gn_depth18():
    model = build(make_cfg(depth=18, resnet_norm="GN"))
    gns = [m for m in model.bottom_up.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == 32 for m in gns)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_norm_gn_and_none():
    gn = build(make_cfg(norm="GN"))
    for name, conv in fpn_convs(gn).items():
        assert conv.bias is None, name
        assert isinstance(conv.norm, nn.GroupNorm) and conv.norm.num_groups == 32, name
    plain = build(make_cfg(norm=""))
    for name, conv in fpn_convs(plain).items():
        assert conv.bias is not None, name
        assert conv.norm is None, name
    assert not any(isinstance(m, nn.GroupNorm) for n, m in plain.named_modules()
                   if not n.startswith("bottom_up"))


def test_init_like_detectron2_fpn():
    # c2_xavier_fill: kaiming_uniform(a=1), i.e. U(+-sqrt(3 / fan_in)), and zero bias
    # (PyTorch's default init is U(+-1 / sqrt(fan_in)) with a nonzero bias).
    torch.manual_seed(0)
    for name, conv in fpn_convs(build(make_cfg(norm=""))).items():
        bound = math.sqrt(3.0 / conv.weight[0].numel())
        w = conv.weight.abs().max().item()
        assert 1.2 / math.sqrt(conv.weight[0].numel()) < w <= bound, name
        assert (conv.bias == 0).all(), name


def test_build_backbone_and_image_list(gen):
    cfg = make_cfg(stride=16)
    cfg.MODEL.BACKBONE.NAME = "build_single_level_fpn_backbone"
    model = build_backbone(cfg)
    assert isinstance(model, SingleLevelFPN)
    assert model.output_shape() == {"p4": ShapeSpec(channels=64, stride=16)}
    images = ImageList.from_tensors(
        [torch.randn(3, 50, 70, generator=gen), torch.randn(3, 33, 90, generator=gen)],
        model.size_divisibility,
    )
    assert images.tensor.shape[-2:] == (64, 96)
    assert model(images.tensor)["p4"].shape == (2, 64, 4, 6)


def test_unpadded_input_follows_the_resnet_shapes(gen):
    # Not a multiple of 32: the output has the shape of the ResNet stage it sits on.
    model = build(make_cfg(stride=8))
    x = torch.randn(1, 3, 50, 70, generator=gen)
    out = model(x)["p3"]
    assert out.shape[-2:] == model.bottom_up(x)["res3"].shape[-2:] == (7, 9)


@pytest.mark.parametrize("stride", [2, 64, 0, "8"])
def test_bad_stride(stride):
    cfg = make_cfg()
    cfg.MODEL.SINGLE_LEVEL_FPN.STRIDE = stride
    for fn in (build, single_level_feature_name, single_level_stages):
        with pytest.raises(ValueError, match=r"MODEL\.SINGLE_LEVEL_FPN\.STRIDE.*\[4, 8, 16, 32\]"):
            fn(cfg)


@pytest.mark.parametrize("depth", [18, 34])
def test_small_resnet_needs_res2_channels_64(depth):
    cfg = make_cfg(depth=depth)
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    with pytest.raises(ValueError, match=r"RES2_OUT_CHANNELS = 64"):
        build(cfg)
    assert cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 256


def test_bad_resnet_and_fpn_settings():
    cfg = make_cfg(depth=50)
    cfg.MODEL.RESNETS.RES5_DILATION = 2
    with pytest.raises(ValueError, match="RES5_DILATION"):
        build(cfg)
    with pytest.raises(ValueError, match="divisible by 32"):
        build(make_cfg(out_channels=48, norm="GN"))
    assert build(make_cfg(out_channels=48, norm="")).output_shape()["p3"].channels == 48


def test_cfg_not_modified():
    cfg = make_cfg(stride=4)
    before = cfg.dump()
    build(cfg)
    assert cfg.dump() == before
    assert cfg.MODEL.RESNETS.OUT_FEATURES == ["res4"]  # detectron2's default, untouched
