"""Evaluation: the point-AP metric and its detectron2 evaluator, semantic variance, and
statistics over seeds and test images."""
from .evaluator import PointAPEvaluator, build_point_evaluator, load_point_ground_truth
from .point_ap import PointAPResult, evaluate_point_ap
from .seed_stats import BootstrapResult, aggregate_seeds, mean_std, paired_bootstrap_ap
from .semantic_variance import compare_point_jsons, semantic_variance, semantic_variance_json

__all__ = [
    "BootstrapResult",
    "PointAPEvaluator",
    "PointAPResult",
    "aggregate_seeds",
    "build_point_evaluator",
    "compare_point_jsons",
    "evaluate_point_ap",
    "load_point_ground_truth",
    "mean_std",
    "paired_bootstrap_ap",
    "semantic_variance",
    "semantic_variance_json",
]
