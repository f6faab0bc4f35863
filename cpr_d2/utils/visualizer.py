"""Drawing points with detectron2's Visualizer: ground truth, coarse, refined, predicted.

detectron2's VisImage maps pixel k to [k, k+1) (imshow extent (0, W, H, 0)),
the project's coordinate convention, so points are drawn where they are.
"""
import matplotlib as mpl
import numpy as np
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer

__all__ = ["PointVisualizer", "class_color"]

_PALETTE = colormap(rgb=True, maximum=1)


def class_color(class_index, metadata=None):
    """A fixed RGB colour (0..1) per class: metadata.thing_colors when set, else a palette."""
    colors = getattr(metadata, "thing_colors", None) if metadata is not None else None
    if colors:
        return tuple(c / 255.0 for c in colors[class_index % len(colors)])
    return tuple(_PALETTE[class_index % len(_PALETTE)])


def _as_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class PointVisualizer(Visualizer):
    """A Visualizer that draws point annotations and point predictions.

    Points are drawn as filled dots in their class colour; `marker="x"` marks
    a second set (e.g. coarse points) apart from the first.
    """

    def _radius(self):
        return max(3.0, 0.007 * max(self.output.width, self.output.height)) / self.output.scale

    def draw_points(self, points, classes=None, scores=None, labels=True, color=None,
                    marker="o", alpha=0.9):
        """Draw (N, 2) points; class colours, and "name score%" labels when asked."""
        points = _as_numpy(points).reshape(-1, 2)
        classes = None if classes is None else _as_numpy(classes).astype(int)
        scores = None if scores is None else _as_numpy(scores)
        names = getattr(self.metadata, "thing_classes", None)
        r = self._radius()
        for k, (x, y) in enumerate(points):
            c = color or (class_color(classes[k], self.metadata) if classes is not None else (1, 1, 0))
            if marker == "x":
                self.draw_line([x - r, x + r], [y - r, y + r], color=c, linewidth=1.5)
                self.draw_line([x - r, x + r], [y + r, y - r], color=c, linewidth=1.5)
            else:
                self.output.ax.add_patch(mpl.patches.Circle(
                    (x, y), radius=r, fill=True, facecolor=c, edgecolor="white",
                    linewidth=0.5 * self.output.scale, alpha=alpha))
            if labels and (classes is not None or scores is not None):
                text = []
                if classes is not None:
                    text.append(names[classes[k]] if names and classes[k] < len(names) else str(classes[k]))
                if scores is not None:
                    text.append(f"{100 * scores[k]:.0f}%")
                self.draw_text(" ".join(text), (x, y - 2.5 * r), color=c,
                               font_size=self._default_font_size * 0.7)
        return self.output

    def draw_point_predictions(self, instances, score_threshold=0.0, labels=True):
        """Draw an Instances with pred_points, scores and pred_classes (a P2PNet output)."""
        keep = _as_numpy(instances.scores) >= score_threshold
        return self.draw_points(_as_numpy(instances.pred_points)[keep],
                                _as_numpy(instances.pred_classes)[keep],
                                _as_numpy(instances.scores)[keep], labels=labels)

    def draw_dataset_points(self, dataset_dict, labels=False, boxes=True):
        """Draw a dataset record's annotated points (and true boxes, thin, when present)."""
        anns = [a for a in dataset_dict.get("annotations", [])]
        if boxes:
            for a in anns:
                if "bbox" in a:
                    x, y, w, h = a["bbox"]
                    self.draw_box((x, y, x + w, y + h), edge_color=class_color(a["category_id"], self.metadata),
                                  line_style="--", alpha=0.6)
        return self.draw_points([a["point"] for a in anns], [a["category_id"] for a in anns],
                                labels=labels)

    def draw_refinement(self, coarse, refined, classes=None):
        """Arrows from coarse points (x) to refined points (dots)."""
        coarse = _as_numpy(coarse).reshape(-1, 2)
        refined = _as_numpy(refined).reshape(-1, 2)
        if len(coarse) != len(refined):
            raise ValueError(f"draw_refinement: {len(coarse)} coarse points but {len(refined)} "
                             "refined points; pass one refined point per coarse point")
        for k, ((x0, y0), (x1, y1)) in enumerate(zip(coarse, refined)):
            c = class_color(int(_as_numpy(classes)[k]), self.metadata) if classes is not None else (1, 1, 0)
            if (x0, y0) != (x1, y1):
                self.output.ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(
                    arrowstyle="->", color=c, linewidth=1.2 * self.output.scale))
        self.draw_points(coarse, classes, labels=False, marker="x")
        return self.draw_points(refined, classes, labels=False)

    def draw_regions(self, centres, radii, classes=None):
        """Each object's sampling region (adaptive CPRNet): a dashed circle of radius
        radii[k] pixels around centres[k]."""
        centres = _as_numpy(centres).reshape(-1, 2)
        radii = _as_numpy(radii).reshape(-1)
        if len(centres) != len(radii):
            raise ValueError(f"draw_regions: {len(centres)} centres but {len(radii)} radii")
        for k, ((x, y), r) in enumerate(zip(centres, radii)):
            c = class_color(int(_as_numpy(classes)[k]), self.metadata) if classes is not None else (1, 1, 0)
            self.output.ax.add_patch(mpl.patches.Circle(
                (x, y), radius=float(r), fill=False, edgecolor=c, linestyle="--",
                linewidth=0.8 * self.output.scale, alpha=0.8))
        return self.output

    def draw_bag_scores(self, bag_points, bag_scores, cmap="jet", vmax=None):
        """Each bag point as a small dot coloured by its class score, from 0 (blue) to
        `vmax` (red; default: the highest score drawn, so low-scoring bags still show
        where their peak is)."""
        points = _as_numpy(bag_points).reshape(-1, 2)
        scores = _as_numpy(bag_scores).reshape(-1)
        top = float(vmax if vmax is not None else max(scores.max(initial=0.0), 1e-6))
        self.output.ax.scatter(points[:, 0], points[:, 1], c=scores, cmap=cmap, vmin=0.0, vmax=top,
                               s=(1.5 * self._radius() * self.output.scale) ** 2, alpha=0.7,
                               linewidths=0)
        # Bag points off the image must not stretch the axes beyond it.
        self.output.ax.set_xlim(0, self.output.width)
        self.output.ax.set_ylim(self.output.height, 0)
        return self.output
