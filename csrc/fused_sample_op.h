// Shared launcher checks for the fused_sample op (CPU and CUDA registrations).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <utility>

#include "proxy_sample.h"

namespace proxykern {

using SampleTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Launcher checks every sampling op shares (proxykern::fused_sample, program_sample); the
// messages name the tensor (``name``) and the one it must match (``like_name``).

// A (batch, >= vocab) logits tensor on ``like``'s device and batch, unit column stride,
// fp32 / bf16 / fp16, as the kernels' raw view.
LogitsView logits_view(const at::Tensor& t, const std::string& name, const at::Tensor& like,
                       const char* like_name, int64_t vocab);

// A per-row parameter: 1-D of ``like``'s batch, dtype ``type``, on its device, contiguous.
template <typename T>
const T* param_ptr(const at::Tensor& t, const char* name, at::ScalarType type,
                   const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == like.size(0), name, " must be 1-D of length ",
              like.size(0), ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name,
              " is on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  return t.data_ptr<T>();
}

// The outputs (tokens, logprobs, lse, status) of ``batch`` rows on ``like``'s device, and
// their raw view.
std::pair<SampleTensors, SampleResult> sample_outputs(const at::Tensor& like, int64_t batch);

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
