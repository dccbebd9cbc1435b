// Shared launcher checks for the fused_sample op (CPU and CUDA registrations).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

#include "proxy_sample.h"

namespace proxykern {

using SampleTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks every argument (messages name the tensor), allocates the outputs on the
// logits' device and fills the raw views the kernels take.
struct FusedSampleArgs {
  LogitsView base, expert, anti;
  RowParams params;
  SampleResult result;
  SampleTensors outputs;
  int64_t batch, vocab;
};

FusedSampleArgs prepare_fused_sample(const at::Tensor& base, const at::Tensor& expert,
                                     const at::Tensor& anti, const at::Tensor& alpha,
                                     const at::Tensor& temperature, const at::Tensor& top_k,
                                     const at::Tensor& top_p, const at::Tensor& min_p,
                                     const at::Tensor& seed, const at::Tensor& step,
                                     int64_t vocab_size);

}  // namespace proxykern
