// Argument handling shared by the CPU and CUDA logprob_entropy kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "dispatch.h"

namespace covrl {
namespace lpe_args {

// Outputs and accumulation: float32, or float64 for float64 logits (gradcheck).
inline at::ScalarType out_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_common(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  COVRL_CHECK_FLOAT(logits);
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) >= 1, "logits must be [..., V] with V >= 1, got shape ",
              logits.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1),
              "labels must have shape logits.shape[:-1] = ", logits.sizes().slice(0, logits.dim() - 1),
              ", got ", labels.sizes());
  COVRL_CHECK_DEVICE(labels, logits);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be a finite number > 0, got ",
              temperature);
}

// [..., V] logits as [rows, V] with unit stride along V (a view when possible).
inline at::Tensor as_rows(const at::Tensor& logits) {
  at::Tensor x = logits.reshape({-1, logits.size(-1)});
  if (x.stride(1) != 1) x = x.contiguous();
  return x;
}

// Per-row float tensors of the backward, flattened, in the accumulation dtype.
inline at::Tensor flat_acc(const at::Tensor& t, const at::Tensor& labels, const at::Tensor& logits,
                           const char* name) {
  TORCH_CHECK(t.sizes() == labels.sizes(), name, " must have the shape of labels ", labels.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == logits.device(), name, " must be on ", logits.device(), ", got ", t.device());
  return t.reshape({-1}).to(out_dtype(logits)).contiguous();
}

}  // namespace lpe_args
}  // namespace covrl
