// ATen-side argument checks for the fused low-rank projections (lowrank_proj_forward /
// lowrank_proj_backward, eq. 2 in docs/method.md), shared by the CPU and CUDA wrappers: one place that turns
// the tensor lists into a LowRankShape and says, naming the argument (downs[1], ups[0] ...), which
// shape, dtype or device it expected. The Python API (elr_ext/ops/lowrank_proj.py) validates user
// input first; these checks guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace elr {

// x [M, in]; downs[j] = B_j [r_j, in]; ups[j] = A_j [out_j, r_j]; h = x [B_1; ...; B_K]^T [M, R],
// whose column block j (offsets[j], ranks[j] wide) is h_j.
struct LowRankShape {
  int64_t M = 0;
  int64_t d_in = 0;
  int64_t R = 0;  // sum of the ranks
  std::vector<int64_t> ranks, outs, offsets;
  int64_t K() const { return static_cast<int64_t>(ranks.size()); }
};

inline std::string lowrank_item(const char* list, size_t j) {
  return std::string(list) + "[" + std::to_string(j) + "]";
}

// `t` (argument `name`) has the dtype and device of x.
inline void lowrank_check_like_x(const char* op, const std::string& name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
}

inline void lowrank_check_sizes(const char* op, const std::string& name, const at::Tensor& t,
                                at::IntArrayRef expected, const char* what) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, " (", what, "), got ", t.sizes());
}

// x [M, in] of a floating dtype; K >= 1 downs [r_j >= 1, in] and K ups [out_j >= 1, r_j]; x's dtype
// and device throughout.
inline LowRankShape lowrank_make_shape(const char* op, const at::Tensor& x, at::TensorList downs,
                                       at::TensorList ups) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, in] (leading dimensions flattened), got ", x.dim(), "-D ",
              x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(!downs.empty(), op, ": downs must hold at least one down-projection B_j [r_j, in], got none");
  TORCH_CHECK(ups.size() == downs.size(), op, ": ups must hold one up-projection A_j [out_j, r_j] per down: got ",
              ups.size(), " ups for ", downs.size(), " downs");
  LowRankShape s;
  s.M = x.size(0);
  s.d_in = x.size(1);
  for (size_t j = 0; j < downs.size(); ++j) {
    const at::Tensor& B = downs[j];
    const at::Tensor& A = ups[j];
    const std::string bname = lowrank_item("downs", j), aname = lowrank_item("ups", j);
    TORCH_CHECK(B.dim() == 2 && B.size(0) >= 1 && B.size(1) == s.d_in, op, ": ", bname,
                " must be [r_j, in] with r_j >= 1 and in = ", s.d_in, " (x's columns), got ", B.sizes());
    lowrank_check_like_x(op, bname, B, x);
    const int64_t r = B.size(0);
    TORCH_CHECK(A.dim() == 2 && A.size(0) >= 1 && A.size(1) == r, op, ": ", aname,
                " must be [out_j, r_j] with out_j >= 1 and r_j = ", r, " (", bname, "'s rank), got ", A.sizes());
    lowrank_check_like_x(op, aname, A, x);
    s.offsets.push_back(s.R);
    s.ranks.push_back(r);
    s.outs.push_back(A.size(0));
    s.R += r;
  }
  return s;
}

// biases: K entries, each empty (no bias) or [out_j].
inline void lowrank_check_biases(const char* op, const LowRankShape& s, const at::Tensor& x, at::TensorList biases) {
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == s.K(), op, ": biases must hold K = ", s.K(),
              " entries (an empty tensor for no bias), got ", biases.size());
  for (size_t j = 0; j < biases.size(); ++j) {
    if (biases[j].numel() == 0) continue;
    const std::string name = lowrank_item("biases", j);
    lowrank_check_sizes(op, name, biases[j], {s.outs[j]}, "[out_j], or empty for no bias");
    lowrank_check_like_x(op, name, biases[j], x);
  }
}

// lowrank_proj_backward's other inputs: grad_ys[j] [M, out_j], h [M, R], the masks of K entries.
inline void lowrank_check_backward(const char* op, const LowRankShape& s, const at::Tensor& x,
                                   at::TensorList grad_ys, const at::Tensor& h, size_t needs_ups,
                                   size_t needs_biases) {
  TORCH_CHECK(static_cast<int64_t>(grad_ys.size()) == s.K(), op, ": grad_ys must hold K = ", s.K(),
              " gradients, got ", grad_ys.size());
  for (size_t j = 0; j < grad_ys.size(); ++j) {
    const std::string name = lowrank_item("grad_ys", j);
    lowrank_check_sizes(op, name, grad_ys[j], {s.M, s.outs[j]}, "[M, out_j]");
    lowrank_check_like_x(op, name, grad_ys[j], x);
  }
  lowrank_check_sizes(op, "h", h, {s.M, s.R}, "[M, sum of the ranks], the forward's h");
  lowrank_check_like_x(op, "h", h, x);
  TORCH_CHECK(static_cast<int64_t>(needs_ups) == s.K() && static_cast<int64_t>(needs_biases) == s.K(), op,
              ": needs_ups and needs_biases must hold K = ", s.K(), " flags, got ", needs_ups, " and ", needs_biases);
}

// x on the wrapper's device type (at::kCPU or at::kCUDA).
inline void lowrank_check_device_type(const char* op, const at::Tensor& x, at::DeviceType type) {
  TORCH_CHECK(x.device().type() == type, op, ": x must be a ", c10::DeviceTypeName(type), " tensor, got ",
              x.device());
}

// Every check of lowrank_proj_forward's inputs, for the wrapper of device type `type`; the shape.
inline LowRankShape lowrank_forward_shape(const at::Tensor& x, at::TensorList downs, at::TensorList ups,
                                          at::TensorList biases, at::DeviceType type) {
  constexpr const char* op = "lowrank_proj_forward";
  const LowRankShape s = lowrank_make_shape(op, x, downs, ups);
  lowrank_check_biases(op, s, x, biases);
  lowrank_check_device_type(op, x, type);
  return s;
}

// Every check of lowrank_proj_backward's inputs, for the wrapper of device type `type`; the shape.
inline LowRankShape lowrank_backward_shape(at::TensorList grad_ys, const at::Tensor& x, const at::Tensor& h,
                                           at::TensorList downs, at::TensorList ups, size_t needs_ups,
                                           size_t needs_biases, at::DeviceType type) {
  constexpr const char* op = "lowrank_proj_backward";
  const LowRankShape s = lowrank_make_shape(op, x, downs, ups);
  lowrank_check_backward(op, s, x, grad_ys, h, needs_ups, needs_biases);
  lowrank_check_device_type(op, x, type);
  return s;
}

}  // namespace elr
