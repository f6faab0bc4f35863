// Argument checks of point_ap_match, shared by the CPU and CUDA kernels: a wrong
// dtype raises TypeError in Python (TORCH_CHECK_TYPE), anything else ValueError
// (TORCH_CHECK_VALUE), as the numpy reference's checks do
// (cpr_d2/layers/point_ap_match.py).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "point_ap/point_ap.h"

namespace cpr_d2 {

namespace {

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim,
                  int64_t size0, int64_t size1, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "point_ap_match: ", name, " must be ", dtype,
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, "point_ap_match: ", name, " must have ", dim,
                    " dimension(s), got shape ", t.sizes());
  TORCH_CHECK_VALUE(size0 < 0 || t.size(0) == size0, "point_ap_match: ", name, " has ",
                    t.size(0), " rows, expected ", size0);
  TORCH_CHECK_VALUE(dim < 2 || t.size(1) == size1, "point_ap_match: ", name, " must have ",
                    size1, " columns, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), "point_ap_match: ", name, " is on ",
                    t.device(), " but det_key is on ", like.device());
}

bool all_true(const at::Tensor& t) { return t.numel() == 0 || t.all().item<bool>(); }

}  // namespace

APMatchInputs prepare_point_ap_match(const at::Tensor& det_key, const at::Tensor& det_xy,
                                     const at::Tensor& det_block, const at::Tensor& gt_key,
                                     const at::Tensor& gt_xy, const at::Tensor& gt_wh,
                                     const at::Tensor& ignore, at::ArrayRef<double> taus) {
  TORCH_CHECK_VALUE(det_key.dim() == 1, "point_ap_match: det_key must be 1-D, got shape ",
                    det_key.sizes());
  TORCH_CHECK_VALUE(gt_key.dim() == 1, "point_ap_match: gt_key must be 1-D, got shape ",
                    gt_key.sizes());
  const int64_t num_dets = det_key.size(0), num_gts = gt_key.size(0);
  check_tensor(det_key, "det_key", at::kLong, 1, num_dets, 0, det_key);
  check_tensor(det_xy, "det_xy", at::kDouble, 2, num_dets, 2, det_key);
  check_tensor(det_block, "det_block", at::kLong, 1, num_dets, 0, det_key);
  check_tensor(gt_key, "gt_key", at::kLong, 1, num_gts, 0, det_key);
  check_tensor(gt_xy, "gt_xy", at::kDouble, 2, num_gts, 2, det_key);
  check_tensor(gt_wh, "gt_wh", at::kDouble, 2, num_gts, 2, det_key);
  check_tensor(ignore, "ignore", at::kBool, 2, -1, num_gts, det_key);
  TORCH_CHECK_VALUE(!taus.empty(), "point_ap_match: taus must not be empty");
  APMatchInputs in;
  in.max_tau = 0.0;
  for (const double tau : taus) {
    TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0,
                      "point_ap_match: every tau must be finite and positive, got ", tau);
    in.max_tau = std::max(in.max_tau, tau);
    in.taus.push_back(tau);
  }
  in.max_tau2 = in.max_tau * in.max_tau;

  TORCH_CHECK_VALUE(all_true(det_xy.isfinite()), "point_ap_match: det_xy must be finite");
  TORCH_CHECK_VALUE(all_true(gt_xy.isfinite()), "point_ap_match: gt_xy must be finite");
  TORCH_CHECK_VALUE(all_true(gt_wh.isfinite()) && all_true(gt_wh > 0),
                    "point_ap_match: gt_wh must be finite and positive");
  if (num_gts > 1) {
    TORCH_CHECK_VALUE(all_true(gt_key.slice(0, 1).ge(gt_key.slice(0, 0, -1))),
                      "point_ap_match: gt_key must be sorted");
  }
  if (num_dets > 0) {
    TORCH_CHECK_VALUE(det_block[0].item<int64_t>() == 0,
                      "point_ap_match: det_block must start at 0");
  }
  if (num_dets > 1) {
    const at::Tensor key_step = det_key.slice(0, 1) - det_key.slice(0, 0, -1);
    const at::Tensor block_step = det_block.slice(0, 1) - det_block.slice(0, 0, -1);
    TORCH_CHECK_VALUE(all_true(key_step.ge(0)), "point_ap_match: det_key must be sorted");
    TORCH_CHECK_VALUE(all_true(block_step.eq(0).logical_or(block_step.eq(1))),
                      "point_ap_match: det_block must number the blocks 0, 1, 2, ... in order");
    TORCH_CHECK_VALUE(all_true(key_step.eq(0).logical_or(block_step.eq(1))),
                      "point_ap_match: a tie block must not span two keys");
  }
  in.det_key = det_key.contiguous();
  in.det_xy = det_xy.contiguous();
  in.det_block = det_block.contiguous();
  in.gt_key = gt_key.contiguous();
  in.gt_xy = gt_xy.contiguous();
  in.gt_wh = gt_wh.contiguous();
  in.ignore = ignore.contiguous();
  return in;
}

}  // namespace cpr_d2
