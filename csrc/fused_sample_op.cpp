// Op schema, launcher checks and the CPU registration of proxykern::fused_sample.
#include "fused_sample_op.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace proxykern {

LogitsView logits_view(const at::Tensor& t, const std::string& name, const at::Tensor& like,
                       const char* like_name, int64_t vocab) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (batch, vocab), got ", t.dim(), "-D");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name,
              " is on ", like.device());
  TORCH_CHECK(t.size(0) == like.size(0), name, " has batch ", t.size(0), " but ", like_name,
              " has ", like.size(0));
  TORCH_CHECK(t.size(1) >= vocab, name, " has ", t.size(1), " columns, fewer than vocab_size ",
              vocab);
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit column stride");
  LogitsDtype dtype;
  switch (t.scalar_type()) {
    case at::kFloat: dtype = LogitsDtype::kFloat32; break;
    case at::kBFloat16: dtype = LogitsDtype::kBFloat16; break;
    case at::kHalf: dtype = LogitsDtype::kFloat16; break;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return LogitsView{t.data_ptr(), t.stride(0), dtype};
}

std::pair<SampleTensors, SampleResult> sample_outputs(const at::Tensor& like, int64_t batch) {
  const auto options = like.options();
  at::Tensor tokens = at::empty({batch}, options.dtype(at::kLong));
  at::Tensor logprobs = at::empty({batch}, options.dtype(at::kFloat));
  at::Tensor lse = at::empty({batch}, options.dtype(at::kFloat));
  at::Tensor status = at::empty({batch}, options.dtype(at::kInt));
  return {SampleTensors{tokens, logprobs, lse, status},
          SampleResult{tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                       lse.data_ptr<float>(), status.data_ptr<int32_t>()}};
}

FusedSampleArgs prepare_fused_sample(const at::Tensor& base, const at::Tensor& expert,
                                     const at::Tensor& anti, const at::Tensor& alpha,
                                     const at::Tensor& temperature, const at::Tensor& top_k,
                                     const at::Tensor& top_p, const at::Tensor& min_p,
                                     const at::Tensor& seed, const at::Tensor& step,
                                     int64_t vocab_size) {
  TORCH_CHECK(base.dim() == 2, "base must be 2-D (batch, vocab), got ", base.dim(), "-D");
  TORCH_CHECK(vocab_size >= 1, "vocab_size must be >= 1, got ", vocab_size);
  FusedSampleArgs args;
  args.batch = base.size(0);
  args.vocab = vocab_size;
  args.base = logits_view(base, "base", base, "base", vocab_size);
  args.expert = logits_view(expert, "expert", base, "base", vocab_size);
  args.anti = logits_view(anti, "anti", base, "base", vocab_size);
  args.params = RowParams{
      param_ptr<float>(alpha, "alpha", at::kFloat, base, "base"),
      param_ptr<float>(temperature, "temperature", at::kFloat, base, "base"),
      param_ptr<int64_t>(top_k, "top_k", at::kLong, base, "base"),
      param_ptr<float>(top_p, "top_p", at::kFloat, base, "base"),
      param_ptr<float>(min_p, "min_p", at::kFloat, base, "base"),
      param_ptr<int64_t>(seed, "seed", at::kLong, base, "base"),
      param_ptr<int64_t>(step, "step", at::kLong, base, "base"),
  };
  std::tie(args.outputs, args.result) = sample_outputs(base, args.batch);
  return args;
}

namespace {

SampleTensors fused_sample_cpu(const at::Tensor& base, const at::Tensor& expert,
                               const at::Tensor& anti, const at::Tensor& alpha,
                               const at::Tensor& temperature, const at::Tensor& top_k,
                               const at::Tensor& top_p, const at::Tensor& min_p,
                               const at::Tensor& seed, const at::Tensor& step,
                               int64_t vocab_size) {
  TORCH_CHECK(base.device().is_cpu(), "base must be a CPU tensor for the cpu kernel");
  FusedSampleArgs a = prepare_fused_sample(base, expert, anti, alpha, temperature, top_k, top_p,
                                           min_p, seed, step, vocab_size);
  if (a.batch > 0) {
    proxy_sample_cpu(a.base, a.expert, a.anti, a.params, a.result, a.batch, a.vocab);
  }
  return a.outputs;
}

}  // namespace

TORCH_LIBRARY(proxykern, m) {
  m.def(
      "fused_sample(Tensor base, Tensor expert, Tensor anti, Tensor alpha, Tensor temperature, "
      "Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed, Tensor step, int vocab_size) "
      "-> (Tensor tokens, Tensor logprobs, Tensor lse, Tensor status)");
}

TORCH_LIBRARY_IMPL(proxykern, CPU, m) { m.impl("fused_sample", &fused_sample_cpu); }

}  // namespace proxykern
