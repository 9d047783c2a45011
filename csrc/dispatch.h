// Shared argument checks and the one dtype-dispatch macro used by every kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

// Floating inputs we accept everywhere: float32, float16, bfloat16 (fp32 accumulation).
#define COVRL_DISPATCH_FLOAT(TYPE, NAME, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, \
                                  TYPE, NAME, __VA_ARGS__)

// User-facing checks: the message names the argument and what was expected.
#define COVRL_CHECK_DEVICE(x, ref)                                                  \
  TORCH_CHECK((x).device() == (ref).device(), #x " must be on ", (ref).device(),     \
              " (the device of " #ref "), got ", (x).device())
#define COVRL_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must be a ", (d), "-D tensor, got shape ", (x).sizes())
#define COVRL_CHECK_FLOAT(x)                                                          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||   \
                  (x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kDouble, \
              #x " must be float32, float16, bfloat16 or float64, got ", (x).scalar_type())
#define COVRL_CHECK_SAME_SHAPE(x, ref)                                                  \
  TORCH_CHECK((x).sizes() == (ref).sizes(), #x " must have the shape of " #ref " ",     \
              (ref).sizes(), ", got ", (x).sizes())
