"""Config keys of cpr_d2, added to a detectron2 config (never to its global defaults)."""
from detectron2.config import CfgNode as CN
__all__ = [
    "add_cpr_config",
    "add_p2pnet_config",
    "add_point_data_config",
    "add_single_level_fpn_config",
    "get_cpr_d2_cfg",
]


def add_point_data_config(cfg):
    """Keys of the point data layer (idempotent)."""
    if "POINTS_OUTSIDE_IMAGE" in cfg.DATASETS:
        return cfg
    # What loading does with annotated points that lie off their image
    # (0 <= x <= width, 0 <= y <= height fails): "warn" counts and keeps them,
    # "error" refuses the dataset.
    cfg.DATASETS.POINTS_OUTSIDE_IMAGE = "warn"
    # Point jsons the tools register before building anything, so DATASETS.TRAIN /
    # TEST can name them: a list of (name, json file, image root) triples, e.g.
    # (("trees_refined", "output/refined.json", "datasets/trees/images"),).
    cfg.DATASETS.POINT_JSONS = ()
    # Limits that turn out-of-memory crashes into clear errors, checked by the mapper
    # before an image is read (0 = no limit). An image costs about 30 bytes per pixel
    # on its way through the mapper and the backbone's first layers; each annotated
    # point costs CPRNet about 4(R+1)^2 x 2C x 4 bytes of gathered features (R = 8,
    # C = 80: 190 kB), P2PNet a row of the matching cost.
    cfg.INPUT.MAX_IMAGE_PIXELS = 100_000_000
    cfg.DATASETS.MAX_POINTS_PER_IMAGE = 10_000
    # How images of more than 8 bits per sample (16-bit PNG/TIFF, 32-bit integer and
    # float TIFF) become 0..255 (cpr_d2/data/image_io.py); 8-bit images are read
    # unchanged. "percentile": per image, the 0.5th and 99.5th percentiles map to 0 and
    # 255, clipped. "range": the type's full range (0..65535 for 16-bit; a float
    # image's min..max). NaN and inf pixels map to 0; a constant image maps to 0.
    cfg.INPUT.NORMALIZE = "percentile"

    # The point-AP evaluator (the paper's metric; docs/method.md, "Evaluation: point AP").
    cfg.TEST.POINT_AP = CN()
    # Distance thresholds on the box-normalised distance to the GT box centre.
    cfg.TEST.POINT_AP.TAUS = (0.5, 1.0, 2.0)
    # Size ranges by GT sqrt(w*h): "coco" or "tinyperson"; "" takes the
    # dataset's metadata `size_ranges`, else "coco".
    cfg.TEST.POINT_AP.SIZE_RANGES = ""
    # Detections kept per image and class; 0 takes the dataset's metadata
    # `max_dets`, else 100 (1000 suits dense datasets).
    cfg.TEST.POINT_AP.MAX_DETS = 0
    # False: the official evaluator's conventions, so numbers compare with the
    # paper's. True: drop its quirks (a perfect detector scores 1, classes
    # without GT leave the mean).
    cfg.TEST.POINT_AP.CLEAN = False
    # Counting MAE/RMSE count the detections scoring above this, unless the model
    # carries a threshold chosen on its training set (MODEL.P2PNET.COUNT_CALIBRATION).
    cfg.TEST.POINT_AP.COUNT_SCORE_THRESH = 0.5

    # Training augmentations for imagery without an "up" (cpr_d2/data/augment.py), on
    # top of detectron2's INPUT.RANDOM_FLIP; all off by default. SCALE: () or
    # (low, high), a resize by a factor drawn from [low, high] before the crop. VFLIP:
    # vertical flips. ROT90: rotations by 0/90/180/270 degrees. BRIGHTNESS, CONTRAST,
    # SATURATION: jitter intensity v in [0, 1), a factor drawn from [1 - v, 1 + v].
    # OBJECT_CROP: probability in [0, 1] that the training crop (INPUT.CROP) is placed on
    # an annotated point drawn at random (the window holds it); otherwise it is uniform.
    cfg.INPUT.POINT_AUG = CN()
    cfg.INPUT.POINT_AUG.SCALE = ()
    cfg.INPUT.POINT_AUG.VFLIP = False
    cfg.INPUT.POINT_AUG.ROT90 = False
    cfg.INPUT.POINT_AUG.BRIGHTNESS = 0.0
    cfg.INPUT.POINT_AUG.CONTRAST = 0.0
    cfg.INPUT.POINT_AUG.SATURATION = 0.0
    cfg.INPUT.POINT_AUG.OBJECT_CROP = 0.0
    return cfg


def add_single_level_fpn_config(cfg):
    """Keys of the single-level FPN backbone and the optimiser choice, shared by CPRNet
    and P2PNet (idempotent)."""
    if "SINGLE_LEVEL_FPN" in cfg.MODEL:
        return cfg
    cfg.MODEL.SINGLE_LEVEL_FPN = CN()
    # Stride of the one output level: 4, 8, 16 or 32 (ResNet res2..res5).
    cfg.MODEL.SINGLE_LEVEL_FPN.STRIDE = 8
    cfg.MODEL.SINGLE_LEVEL_FPN.OUT_CHANNELS = 256
    # Norm of the lateral and output convs ("GN" = GroupNorm(32), "" = none).
    cfg.MODEL.SINGLE_LEVEL_FPN.NORM = "GN"
    # Optimiser built by the tools: "SGD" (detectron2's, with SOLVER.MOMENTUM) or
    # "ADAM" (SOLVER.BASE_LR, SOLVER.WEIGHT_DECAY).
    cfg.SOLVER.OPTIMIZER = "SGD"
    # An exponential moving average of the weights, which replaces them at the end of
    # training (cpr_d2/engine/ema.py); off by default.
    cfg.SOLVER.EMA = CN()
    cfg.SOLVER.EMA.ENABLED = False
    cfg.SOLVER.EMA.DECAY = 0.999
    # How many of the periodic checkpoints (model_<iteration>.pth, every
    # SOLVER.CHECKPOINT_PERIOD) a run keeps on disk, the newest; older ones of the same
    # run are deleted as new ones are written. 0 keeps all (detectron2's behaviour).
    # model_final.pth is always kept.
    cfg.SOLVER.CHECKPOINT_MAX_KEEP = 0
    return cfg


def add_cpr_config(cfg):
    """Keys of CPRNet (coarse point refinement); defaults are the paper's COCO settings."""
    add_point_data_config(cfg)
    add_single_level_fpn_config(cfg)
    if "CPR" in cfg.MODEL:
        return cfg
    cfg.MODEL.CPR = CN()
    _add_cpr_model_keys(cfg)
    _add_cpr_refine_keys(cfg)
    _add_cpr_adaptive_keys(cfg)
    return cfg


def _add_cpr_model_keys(cfg):
    """MODEL.CPR: classes, bag radius, head and losses."""
    # 0: the training datasets' class count (cpr_d2.data.classes.resolve_num_classes).
    cfg.MODEL.CPR.NUM_CLASSES = 0
    # Bag radius R in rings: ring k = 1..R has 8k points at k * stride pixels
    # (R = 8 COCO, 7 DOTA, 5 SeaPerson). R * stride should be about an object's radius.
    cfg.MODEL.CPR.RADIUS = 8
    # Head: NUM_CONVS x (3x3 conv, GroupNorm(32), ReLU) at CONV_CHANNELS.
    cfg.MODEL.CPR.NUM_CONVS = 4
    cfg.MODEL.CPR.CONV_CHANNELS = 256
    # Initial foreground probability of the class logits (bias = -log((1 - p) / p)).
    cfg.MODEL.CPR.PRIOR_PROB = 0.01
    # Focal exponent gamma of the quality-focal loss FL(p, q) = -|p - q|^gamma BCE(p, q).
    cfg.MODEL.CPR.FOCAL_GAMMA = 2.0
    # Loss weights: MIL over the bag, annotated point, negatives (TinyPerson: ANN 0.25).
    cfg.MODEL.CPR.MIL_WEIGHT = 0.25
    cfg.MODEL.CPR.ANN_WEIGHT = 0.125
    cfg.MODEL.CPR.NEG_WEIGHT = 0.75


def _add_cpr_refine_keys(cfg):
    """MODEL.CPR: the refinement rule and what inference returns."""
    # Refinement: keep bag points scoring above REFINE_SCORE_THRESH and above
    # REFINE_RELATIVE_THRESH x the annotated point's score; keep the annotated
    # point if none is kept or their mean score is below REFINE_SCORE_THRESH.
    cfg.MODEL.CPR.REFINE_SCORE_THRESH = 0.1
    cfg.MODEL.CPR.REFINE_RELATIVE_THRESH = 0.5
    # Spacing of the refinement bag's rings, in strides: 1.0 = the training bag (the
    # paper); 0.5 or 0.25 sample the same disc of radius RADIUS x stride with rings
    # every half or quarter stride (R / step rings), a finer grid for small objects.
    cfg.MODEL.CPR.REFINE_RING_STEP = 1.0
    # Refinement moves a point at most this fraction of the distance to the nearest
    # other annotated point of its class (the rule of ADAPTIVE.MOVE_NEIGHBOUR_FRACTION,
    # for the paper's bag); 0 = no limit (the paper). A refinement-only key
    # (docs/cprnet.md, "A move limit for the paper's bag").
    cfg.MODEL.CPR.REFINE_MOVE_NEIGHBOUR_FRACTION = 0.0
    # The refinement bag's radius in strides; 0 = RADIUS (the paper: the training bag).
    # A refinement-only key: a larger disc lets the point of a large object travel further
    # towards its centre (docs/cprnet.md, "Stride 4 and the neighbour disc").
    cfg.MODEL.CPR.REFINE_RADIUS = 0
    # Refinement keeps only the bag points within this fraction of the distance to the
    # nearest other annotated point of the object's class (0.5: the largest disc that no
    # other object's disc of the same kind overlaps); 0 = the whole bag (the paper). A
    # refinement-only key; objects without a neighbour keep their whole bag.
    cfg.MODEL.CPR.REFINE_NEIGHBOUR_DISC = 0.0
    # Refinement averages each object's refined point over the image and these flips of
    # it ("horizontal", "vertical", "both": x -> width - x, y -> height - y, or both),
    # each view refined by the same model and mapped back; empty = one view (the paper).
    # A refinement-only key: a trained model refines again with it. The views cost one
    # forward pass each (docs/cprnet.md, "Flip-averaged refinement").
    cfg.MODEL.CPR.REFINE_FLIPS = []
    # Inference also returns each object's bag coordinates and scores (for
    # visualisation); off by default, it is N x (4R(R+1)+1) values per image.
    cfg.MODEL.CPR.RETURN_BAG_SCORES = False


def _add_cpr_adaptive_keys(cfg):
    """MODEL.CPR.ADAPTIVE: size-adaptive sampling regions (off by default)."""
    # Size-adaptive sampling regions, a cascade in the manner of CPR++ (docs/cprnet.md, "Adaptive
    # regions"). Off: the paper's CPR, unchanged. On: stage 1 is the paper's bag; the
    # points the refinement rule keeps in the refinement bag give every object a size,
    # sqrt((w + d)(h + d)) of their extent plus the sampling step d, and a radius
    # r = clip(ALPHA * size / 2, MIN_RADIUS, min(MAX_RADIUS, NEIGHBOUR_FRACTION * NN)),
    # NN = distance to the nearest other annotated point of the class. Each later stage
    # samples RINGS rings r / RINGS apart around the previous stage's refined point,
    # and re-estimates r from its own kept points. Training averages the MIL loss over
    # the stages (the annotation loss stays on the annotated point) and keeps each
    # object's own region (around its annotated and its refined point) out of the
    # negatives; refinement takes the last stage's point, never further than its
    # region from the annotated point.
    cfg.MODEL.CPR.ADAPTIVE = CN()
    cfg.MODEL.CPR.ADAPTIVE.ENABLED = False
    # Stages in all, the paper's bag included (>= 2 when enabled).
    cfg.MODEL.CPR.ADAPTIVE.STAGES = 2
    # Rings of every later stage's bag (4K(K+1)+1 points whatever the object's size).
    cfg.MODEL.CPR.ADAPTIVE.RINGS = 4
    cfg.MODEL.CPR.ADAPTIVE.ALPHA = 1.0
    # Bounds of the radius, in strides; MAX_RADIUS 0 = RADIUS (the paper's disc).
    cfg.MODEL.CPR.ADAPTIVE.MIN_RADIUS = 0.5
    cfg.MODEL.CPR.ADAPTIVE.MAX_RADIUS = 0.0
    cfg.MODEL.CPR.ADAPTIVE.NEIGHBOUR_FRACTION = 0.5
    # Weight of a regulariser that pulls each later stage's score mass together (the
    # spread of the bag's MIL weights, in units of its region, loss_cpr_var); 0 = none.
    cfg.MODEL.CPR.ADAPTIVE.VARIANCE_WEIGHT = 0.0
    # Refinement moves a point at most this fraction of the distance to the nearest other
    # annotated point of its class (and never beyond its region); 0 = the region only.
    cfg.MODEL.CPR.ADAPTIVE.MOVE_NEIGHBOUR_FRACTION = 0.0
    # Refinement moves each point this fraction of the way from the annotated point to
    # the (limited) refined point, in (0, 1]; 1 = all the way. A refinement-only key: a
    # trained model can refine again with another value (docs/cprnet.md, "Partial moves").
    cfg.MODEL.CPR.ADAPTIVE.MOVE_FRACTION = 1.0


def add_p2pnet_config(cfg):
    """Keys of the P2PNet localizer; defaults are the CPR paper's multi-class variant
    (sigmoid focal classification, SmoothL1 points, Hungarian matching with top-k).
    configs/crowd/ sets the original crowd-counting P2PNet."""
    add_point_data_config(cfg)
    add_single_level_fpn_config(cfg)
    if "P2PNET" in cfg.MODEL:
        return cfg
    cfg.MODEL.P2PNET = CN()
    _add_p2pnet_model_keys(cfg)
    _add_p2pnet_matcher_keys(cfg)
    _add_p2pnet_inference_keys(cfg)
    _add_p2pnet_count_keys(cfg)
    return cfg


def _add_p2pnet_model_keys(cfg):
    """MODEL.P2PNET: classes, anchor points, towers and losses."""
    # 0: the training datasets' class count (cpr_d2.data.classes.resolve_num_classes).
    cfg.MODEL.P2PNET.NUM_CLASSES = 0
    # Anchor points per feature cell: ROWS x COLS, spread evenly over the cell
    # (offset ((k + 0.5) / n - 0.5) * stride from its centre); 1 x 1 = the cell
    # centre, 2 x 2 = the original P2PNet's +-stride/4.
    cfg.MODEL.P2PNET.ANCHOR_ROWS = 1
    cfg.MODEL.P2PNET.ANCHOR_COLS = 1
    # Classification and regression towers: NUM_CONVS x (3x3 conv, GroupNorm(32), ReLU) each.
    cfg.MODEL.P2PNET.NUM_CONVS = 4
    cfg.MODEL.P2PNET.CONV_CHANNELS = 256
    # Classification: "focal" = C sigmoid logits per anchor point, sigmoid focal loss
    # normalised by the number of positives (bias from PRIOR_PROB);
    # "softmax" = C + 1 logits (the last is background), weighted cross-entropy
    # with BACKGROUND_WEIGHT for the background class (the original P2PNet).
    cfg.MODEL.P2PNET.CLASS_LOSS = "focal"
    cfg.MODEL.P2PNET.PRIOR_PROB = 0.01
    cfg.MODEL.P2PNET.FOCAL_ALPHA = 0.25
    cfg.MODEL.P2PNET.FOCAL_GAMMA = 2.0
    cfg.MODEL.P2PNET.BACKGROUND_WEIGHT = 0.5
    # "focal" only: train each matched prediction's score toward how close its point is,
    # exp(-d^2 / (2 stride^2)) (d in px), instead of 1, with the focal loss made for soft
    # targets (quality_focal_loss), so that a precise point outranks a rough one.
    cfg.MODEL.P2PNET.QUALITY_TARGET = False
    cfg.MODEL.P2PNET.CLASS_WEIGHT = 1.0
    # Points: predicted point = anchor + stride * offset. "smooth_l1" on the points
    # divided by the stride (beta SMOOTH_L1_BETA); "l2" = squared pixel distance (the
    # original P2PNet, with POINT_WEIGHT 2e-4). Both summed over positives / #positives.
    cfg.MODEL.P2PNET.POINT_LOSS = "smooth_l1"
    cfg.MODEL.P2PNET.SMOOTH_L1_BETA = 1.0 / 9
    cfg.MODEL.P2PNET.POINT_WEIGHT = 0.5


def _add_p2pnet_matcher_keys(cfg):
    """MODEL.P2PNET.MATCHER: the one-to-many Hungarian matching of training."""
    # Matching, per image: Hungarian on CLASS_WEIGHT x class cost + POINT_WEIGHT x
    # distance (pixels), repeated TOPK times over the still-unassigned predictions,
    # so each ground-truth point gets up to TOPK positives.
    cfg.MODEL.P2PNET.MATCHER = CN()
    # "focal": the focal loss of a positive minus that of a negative (alpha and gamma
    # as above); "prob": minus the probability of the ground-truth class.
    cfg.MODEL.P2PNET.MATCHER.CLASS_COST = "focal"
    cfg.MODEL.P2PNET.MATCHER.CLASS_WEIGHT = 2.0
    cfg.MODEL.P2PNET.MATCHER.POINT_WEIGHT = 0.1
    # Distance of the point cost: "L1" or "L2" (Euclidean).
    cfg.MODEL.P2PNET.MATCHER.DISTANCE = "L1"
    cfg.MODEL.P2PNET.MATCHER.TOPK = 5
    # Crowded images: an image whose predictions x ground truths exceed 4e6 is matched
    # on each ground truth's CANDIDATES nearest predictions only (KD-tree; sparse
    # Hungarian, scipy's min_weight_full_bipartite_matching), never building the
    # (P, G) cost matrix; smaller images are matched densely (exact). 0: always dense.
    # With 64 the total cost stays within about 1% of the dense optimum when every
    # object has TOPK or more predictions nearby; in very dense crowds more
    # candidates come closer (and take longer).
    cfg.MODEL.P2PNET.MATCHER.CANDIDATES = 64


def _add_p2pnet_inference_keys(cfg):
    """MODEL.P2PNET: inference (candidates, point NMS, points per image)."""
    # Inference: keep the TOPK_CANDIDATES best (point, class) scores above
    # SCORE_THRESH, then class-wise NMS on NMS_BOX_SIZE x NMS_BOX_SIZE pixel boxes
    # around the points (original image pixels) at IoU NMS_THRESH (NMS_BOX_SIZE 0:
    # no NMS), then at most DETECTIONS_PER_IMAGE points. VOTE_RADIUS > 0 moves each
    # kept point to the score-weighted mean of the candidates of its class within that
    # many pixels of it (the suppressed ones too); 0: the kept point as predicted.
    cfg.MODEL.P2PNET.SCORE_THRESH = 0.05
    cfg.MODEL.P2PNET.TOPK_CANDIDATES = 1000
    cfg.MODEL.P2PNET.NMS_BOX_SIZE = 32.0
    cfg.MODEL.P2PNET.NMS_THRESH = 0.01
    cfg.MODEL.P2PNET.DETECTIONS_PER_IMAGE = 100
    cfg.MODEL.P2PNET.VOTE_RADIUS = 0.0
    # Test-time flips: the image and each flip listed (out of "horizontal", "vertical",
    # "both") predicted with the NMS and vote above, each view's points mapped back, and
    # the views fused (fuse_views: a point scores the mean over the views of their best
    # score near it, 0 for a view without one); [] predicts the image as it is.
    cfg.MODEL.P2PNET.TEST_FLIPS = []


def _add_p2pnet_count_keys(cfg):
    """MODEL.P2PNET: the counting threshold's calibration."""
    # Counting threshold: "" counts with TEST.POINT_AP.COUNT_SCORE_THRESH; "train"
    # chooses it after training on the training images (the per-image counts closest
    # to the annotated ones; cpr_d2/engine/count_calibration.py), "holdout" on the share
    # COUNT_HOLDOUT of the training images, which are then kept out of training (the
    # same images for every seed). The threshold is stored in the model, so the
    # evaluator, the demo and every later user of model_final.pth count with it.
    cfg.MODEL.P2PNET.COUNT_CALIBRATION = ""
    cfg.MODEL.P2PNET.COUNT_HOLDOUT = 0.2
    # How an image is counted: "threshold", the points scoring above the threshold;
    # "soft", round(scale * the sum of the kept points' scores + per_pixel * the image's
    # area), the two coefficients fitted by least squares on the same calibration images
    # (needs COUNT_CALIBRATION). The threshold still decides which points are drawn.
    cfg.MODEL.P2PNET.COUNT_RULE = "threshold"
    # Which way the soft count's line is fitted: "inverse", the score sum to the count
    # and solved for the count (unbiased on images more crowded than the calibration
    # images); "direct", the count to the score sum (shrinks every count toward the
    # calibration images' mean; the only fit before 2026-12-07).
    cfg.MODEL.P2PNET.COUNT_SOFT_FIT = "inverse"


def get_cpr_d2_cfg():
    """detectron2's default config extended with every cpr_d2 key."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_cpr_config(cfg)
    add_p2pnet_config(cfg)
    return cfg

