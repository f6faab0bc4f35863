"""Single-level FPN backbone: a ResNet and an FPN top-down path that computes only one level.

CPRNet and P2PNet read one feature map (stride 8 in the paper). detectron2's FPN
computes p2..p6 and each level's 3x3 output conv; here only the laterals of the stages
at and below the target resolution exist, and one 3x3 output conv at the target stride.
With the same lateral and output weights, the output equals that level of detectron2's
FPN (``fuse_type="sum"``, no top block).
"""
import math
from typing import Dict

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.structures import ImageList

__all__ = [
    "normalized_images",
    "SingleLevelFPN",
    "build_single_level_fpn_backbone",
    "single_level_feature_name",
    "single_level_stages",
]

# Output stride -> the ResNet stage at that stride.
_STAGE_OF_STRIDE = {4: "res2", 8: "res3", 16: "res4", 32: "res5"}
_RESNET_STAGES = ("res2", "res3", "res4", "res5")


def _stride(cfg) -> int:
    stride = cfg.MODEL.SINGLE_LEVEL_FPN.STRIDE
    if stride not in _STAGE_OF_STRIDE:
        raise ValueError(
            f"MODEL.SINGLE_LEVEL_FPN.STRIDE must be one of {sorted(_STAGE_OF_STRIDE)}, "
            f"got {stride!r}"
        )
    return int(stride)


def single_level_feature_name(cfg) -> str:
    """Key of the backbone's one output, "p{L}" with MODEL.SINGLE_LEVEL_FPN.STRIDE = 2**L
    (p2, p3, p4 or p5)."""
    return "p{}".format(int(math.log2(_stride(cfg))))


def single_level_stages(cfg):
    """The ResNet stages the backbone reads: the one at the target stride and every deeper
    one up to res5, from high to low resolution (stride 8: ["res3", "res4", "res5"])."""
    first = _RESNET_STAGES.index(_STAGE_OF_STRIDE[_stride(cfg)])
    return list(_RESNET_STAGES[first:])


def _checked_inputs(bottom_up, in_features, out_channels, norm):
    """(in_features as a list, bottom_up's output shapes, the strides of in_features) for
    SingleLevelFPN; ValueError unless they exist and their strides double from one to
    the next, and (GroupNorm) out_channels is divisible by 32."""
    in_features = list(in_features)
    if not in_features:
        raise ValueError("SingleLevelFPN needs at least one input feature")
    shapes = bottom_up.output_shape()
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(f"bottom_up has no outputs {missing}; it has {sorted(shapes)}")
    strides = [shapes[f].stride for f in in_features]
    for lo, hi in zip(strides[:-1], strides[1:]):
        if hi != 2 * lo:
            raise ValueError(
                f"strides of {in_features} must double from one stage to the next, got "
                f"{strides} (MODEL.RESNETS.RES5_DILATION must be 1)"
            )
    if norm == "GN" and out_channels % 32:
        raise ValueError(
            f"GroupNorm(32) needs OUT_CHANNELS divisible by 32, got {out_channels}"
        )
    return in_features, shapes, strides


def _fpn_conv(in_channels, out_channels, kernel_size, use_bias, norm):
    """A kernel_size x kernel_size conv (stride 1, same padding) with `norm`, initialised
    like detectron2's FPN convs (c2_xavier_fill)."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=1,
        padding=kernel_size // 2,
        bias=use_bias,
        norm=get_norm(norm, out_channels),
    )
    weight_init.c2_xavier_fill(conv)
    return conv


class SingleLevelFPN(Backbone):
    """
    An FPN top-down path that stops at one level. Lateral 1x1 convs (with norm) map each
    input stage to ``out_channels``; from the deepest stage down, the running sum is
    upsampled 2x (nearest) and added to the next lateral; one 3x3 conv (with norm) then
    gives the output at the resolution of ``in_features[0]``.
    """

    def __init__(self, bottom_up: Backbone, in_features, out_channels: int, norm: str = ""):
        """
        Args:
            bottom_up: a backbone whose outputs include ``in_features``.
            in_features (list[str]): its stages, high to low resolution, with strides that
                double from one to the next (e.g. ["res3", "res4", "res5"]).
            out_channels: channels of the lateral convs and of the output.
            norm: norm of the lateral and output convs, as detectron2's ``get_norm``
                takes it ("GN", "BN", "", ...). With "" the convs have a bias instead.
        """
        super().__init__()
        assert isinstance(bottom_up, Backbone), type(bottom_up)
        in_features, shapes, strides = _checked_inputs(bottom_up, in_features, out_channels, norm)

        use_bias = norm == ""
        # Registered high to low resolution as fpn_lateral{stage}, like detectron2's FPN.
        lateral_convs = []
        for f, stride in zip(in_features, strides):
            conv = _fpn_conv(shapes[f].channels, out_channels, 1, use_bias, norm)
            self.add_module("fpn_lateral{}".format(int(math.log2(stride))), conv)
            lateral_convs.append(conv)
        level = int(math.log2(strides[0]))
        output_conv = _fpn_conv(out_channels, out_channels, 3, use_bias, norm)
        # Named like detectron2's FPN, so its checkpoints' weights for this level load.
        self._output_conv_name = "fpn_output{}".format(level)
        self.add_module(self._output_conv_name, output_conv)

        # Top-down order (low to high resolution); a plain list so the convs are not
        # registered twice (they are already children as fpn_lateral{stage}).
        self.lateral_convs = lateral_convs[::-1]
        self.in_features = tuple(in_features)
        self.bottom_up = bottom_up
        self._out_features = ["p{}".format(level)]
        self._out_feature_strides = {self._out_features[0]: strides[0]}
        self._out_feature_channels = {self._out_features[0]: out_channels}
        self._size_divisibility = strides[-1]

    @property
    def output_conv(self) -> Conv2d:
        """The 3x3 output conv (registered as fpn_output{L})."""
        return getattr(self, self._output_conv_name)

    @property
    def size_divisibility(self) -> int:
        """Stride of the deepest input stage (32 for res5): ImageList pads to a multiple of
        it, so every 2x upsampling lands exactly on the next lateral."""
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: images, (B, C, H, W).

        Returns:
            {"p{L}": (B, out_channels, H / 2**L, W / 2**L)}, one entry.
        """
        bottom_up_features = self.bottom_up(x)
        names = self.in_features[::-1]
        prev = self.lateral_convs[0](bottom_up_features[names[0]])
        for name, lateral_conv in zip(names[1:], self.lateral_convs[1:]):
            lateral = lateral_conv(bottom_up_features[name])
            # Nearest upsampling to the lateral's size: exactly 2x when the input is padded
            # to size_divisibility (same values as scale_factor=2), and still defined when
            # it is not (odd sizes round differently through the strided convs).
            prev = lateral + F.interpolate(prev, size=lateral.shape[-2:], mode="nearest")
        return {self._out_features[0]: self.output_conv(prev)}


@BACKBONE_REGISTRY.register()
def build_single_level_fpn_backbone(cfg, input_shape: ShapeSpec) -> SingleLevelFPN:
    """
    A ResNet (MODEL.RESNETS.*) and a one-level FPN at MODEL.SINGLE_LEVEL_FPN.STRIDE with
    MODEL.SINGLE_LEVEL_FPN.OUT_CHANNELS channels and MODEL.SINGLE_LEVEL_FPN.NORM.

    MODEL.RESNETS.OUT_FEATURES is ignored: the ResNet is built from a clone of ``cfg``
    whose OUT_FEATURES are the stages the FPN reads (see ``single_level_stages``).

    For ResNet-18/34 MODEL.RESNETS.RES2_OUT_CHANNELS must be set to 64 in the config;
    the default (256, for ResNet-50/101) raises a ValueError rather than being changed
    here, so the saved config describes the model that was built.

    MODEL.BACKBONE.FREEZE_AT (detectron2's default 2) freezes the stem and res2; set it
    to 0 when training from scratch.
    """
    stages = single_level_stages(cfg)  # validates STRIDE
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth in (18, 34) and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS != 64:
        raise ValueError(
            f"ResNet-{depth} has 64 channels at res2: set MODEL.RESNETS.RES2_OUT_CHANNELS = 64 "
            f"(got {cfg.MODEL.RESNETS.RES2_OUT_CHANNELS}; 256 is the default for ResNet-50/101)"
        )
    if cfg.MODEL.RESNETS.RES5_DILATION != 1:
        raise ValueError(
            "MODEL.RESNETS.RES5_DILATION must be 1 for the single-level FPN (res5 must have "
            f"stride 32), got {cfg.MODEL.RESNETS.RES5_DILATION}"
        )
    resnet_cfg = cfg.clone()
    resnet_cfg.defrost()
    resnet_cfg.MODEL.RESNETS.OUT_FEATURES = stages
    bottom_up = build_resnet_backbone(resnet_cfg, input_shape)
    return SingleLevelFPN(
        bottom_up,
        in_features=stages,
        out_channels=cfg.MODEL.SINGLE_LEVEL_FPN.OUT_CHANNELS,
        norm=cfg.MODEL.SINGLE_LEVEL_FPN.NORM,
    )


def normalized_images(batched_inputs, pixel_mean, pixel_std, size_divisibility):
    """The inputs' "image" tensors moved to pixel_mean's device, normalised and padded
    into one ImageList (what CPRNet and P2PNet feed their backbone)."""
    device = pixel_mean.device
    return ImageList.from_tensors(
        [(x["image"].to(device) - pixel_mean) / pixel_std for x in batched_inputs],
        size_divisibility)
