// The point AP matcher (torch.ops.cpr_d2.point_ap_match): the greedy
// detection-to-GT matching of cpr_d2.evaluation.point_ap, compiled. Its Python
// wrapper and numpy reference (point_ap_match_reference) are in
// cpr_d2/layers/point_ap_match.py; the results are equal bit for bit.
//
//   point_ap_match(det_key (D,) int64, det_xy (D,2) f64, det_block (D,) int64,
//                  gt_key (G,) int64, gt_xy (G,2) f64, gt_wh (G,2) f64,
//                  ignore (R,G) bool, taus float[T])
//     -> tp (T,R,D) bool, ignore_d2 (R,D) f64
//
// Detections come in matching order: sorted by key (image and class), then by
// priority; det_block numbers the tie blocks 0, 1, 2, ... in that order (a block
// never spans two keys). GTs are sorted by key. A pair (d, g) of equal keys is a
// candidate when d2 = ((x - cx) / w)^2 + ((y - cy) / h)^2 <= max(taus)^2. For each
// tau t and size range r, the candidates with d2 <= tau_t^2 whose GT is not
// ignored in r are walked in (block, d2, det, gt) order, and a pair is accepted
// when its detection and its GT are both free: tp[t, r, d] says d was accepted.
// ignore_d2[r, d] is the least d2 of d's candidates whose GT is ignored in r
// (inf when there is none).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "point_ops/point_math.h"  // CPR_HD, mul_rn, add_rn

namespace cpr_d2 {

// d2 exactly as numpy computes it: each operation rounded on its own. No fused
// multiply-add: mul_rn / add_rn use the round-to-nearest intrinsics on the device,
// and host code is compiled with -ffp-contract=off.
CPR_HD double ap_pair_d2(double x, double y, double cx, double cy, double w, double h) {
  const double dx = (x - cx) / w;
  const double dy = (y - cy) / h;
  return add_rn(mul_rn(dx, dx), mul_rn(dy, dy));
}

// (d2, det, gt) order of two pairs: the priority order inside one tie block.
CPR_HD bool ap_pair_before(double d2_a, int64_t det_a, int64_t gt_a, double d2_b,
                              int64_t det_b, int64_t gt_b) {
  if (d2_a != d2_b) return d2_a < d2_b;
  if (det_a != det_b) return det_a < det_b;
  return gt_a < gt_b;
}

// Walks the pairs [p0, p1) of one tie block, sorted by (d2, det, gt), for one
// (tau, size range): accepts each pair within tau whose GT is not ignored and
// whose detection and GT are both free. A block of one detection stops at its
// first acceptance; the pairs are sorted by d2, so every walk stops at tau.
// `pairs` gives d2(p), det(p) and gt(p).
template <typename Pairs>
CPR_HD void ap_walk_block(int64_t p0, int64_t p1, bool single, double tau2,
                             const Pairs& pairs, const bool* ignore, bool* gt_taken, bool* tp) {
  for (int64_t p = p0; p < p1; ++p) {
    if (pairs.d2(p) > tau2) return;
    const int64_t d = pairs.det(p);
    const int64_t g = pairs.gt(p);
    if (tp[d] || ignore[g] || gt_taken[g]) continue;
    tp[d] = true;
    gt_taken[g] = true;
    if (single) return;
  }
}

// Heap sort of items [0, n) in place: `items` gives less(a, b) and swap(a, b).
// No extra memory and O(n log n) at worst, so the CUDA kernel sorts each tie
// block in its own thread with it; the CPU kernel uses it for large blocks,
// which tests it on the CPU.
template <typename Items>
CPR_HD void ap_sift_down(Items& items, int64_t root, int64_t n) {
  while (true) {
    int64_t child = 2 * root + 1;
    if (child >= n) return;
    if (child + 1 < n && items.less(child, child + 1)) ++child;
    if (!items.less(root, child)) return;
    items.swap(root, child);
    root = child;
  }
}

template <typename Items>
CPR_HD void ap_heap_sort(Items& items, int64_t n) {
  for (int64_t root = n / 2 - 1; root >= 0; --root) ap_sift_down(items, root, n);
  for (int64_t end = n - 1; end > 0; --end) {
    items.swap(0, end);
    ap_sift_down(items, 0, end);
  }
}

// ---- shared by both devices (point_ap_common.cpp) ----
struct APMatchInputs {
  at::Tensor det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore;
  std::vector<double> taus;
  double max_tau, max_tau2;  // max(taus) and its square
};
// Checks the arguments (shapes, dtypes, devices, sorted keys, consecutive blocks,
// finite coordinates, positive sizes and taus) and returns them contiguous.
APMatchInputs prepare_point_ap_match(const at::Tensor& det_key, const at::Tensor& det_xy,
                                     const at::Tensor& det_block, const at::Tensor& gt_key,
                                     const at::Tensor& gt_xy, const at::Tensor& gt_wh,
                                     const at::Tensor& ignore, at::ArrayRef<double> taus);

std::tuple<at::Tensor, at::Tensor> point_ap_match_cpu(
    const at::Tensor& det_key, const at::Tensor& det_xy, const at::Tensor& det_block,
    const at::Tensor& gt_key, const at::Tensor& gt_xy, const at::Tensor& gt_wh,
    const at::Tensor& ignore, at::ArrayRef<double> taus);

}  // namespace cpr_d2
