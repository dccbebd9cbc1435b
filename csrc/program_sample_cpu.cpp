// CPU kernel, launcher and registration of proxykern::program_sample: a logit program
// (proxykern/programs.py) over N = 2..8 logit inputs, fused with the op's sampling.
//
// Semantics: proxykern/reference.py's program_logits (combination, exclusion, plausibility
// mask) and sample_logits_reference (everything after). Layers:
//   mask pass   (only with a mask) one read of the mask input L_r: per row max L_r and
//               whether L_r holds NaN / +inf (such a row is not masked, as program_mask).
//   combine     a LogitsSource for the fused op's CPU kernel (proxy_sample_cpu.cpp): each
//               512-column block of z is made from the N inputs in registers / L1, never
//               written out. The scan, filters, keys, logprobs and lse are that kernel's.
// Exactness: the combination is the reference's, operation for operation, in fp32 with no
// contraction (-ffp-contract=off): linear z = ((c_0 L_0 + c_1 L_1) + c_2 L_2) + ...;
// difference z = L_b + s (L_e - L_a) (the fused op's own expression). The mask compares
// (L_r[v] - max) < log_a in fp32, log_a = torch.log(a) computed by the caller.
#include <omp.h>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_math.h"
#include "fused_sample_op.h"
#include "program_sample.h"
#include "proxy_sample.h"

namespace proxykern {
namespace {

using cpu::f32x16;
using cpu::i32x16;
using cpu::kInf;
using cpu::kVecLanes;
using cpu::load16;
using cpu::select;
using cpu::splat16;

constexpr int kBlock = 512;                   // the CPU kernel's block (LogitsSource contract)
constexpr int64_t kMaskChunk = 8192;          // columns per work item of the mask pass
constexpr int64_t kMinParallelWork = 65536;   // as proxy_sample_cpu.cpp

// ------------------------------------------------------------------------------ loading

// fp32 values of columns [col, col + n) of a row: the input itself when it is fp32,
// else `buf` after conversion (exact: bf16 / fp16 -> fp32).
PK_INLINE const float* fp32_block(const LogitsView& v, int64_t row, int64_t col, int n,
                                  float* buf) {
  const int64_t offset = row * v.row_stride + col;  // int64: may pass 2^31
  switch (v.dtype) {
    case LogitsDtype::kFloat32:
      return static_cast<const float*>(v.data) + offset;
    case LogitsDtype::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(v.data) + offset;
      for (int i = 0; i < n; ++i) buf[i] = cpu::bf16_to_float(src[i]);
      return buf;
    }
    case LogitsDtype::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(v.data) + offset;
      for (int i = 0; i < n; ++i) buf[i] = cpu::fp16_to_float(src[i]);
      return buf;
    }
  }
  return buf;
}

bool same_view(const LogitsView& a, const LogitsView& b) {
  return a.data == b.data && a.row_stride == b.row_stride && a.dtype == b.dtype;
}

// ------------------------------------------------------------------------------ mask pass

struct MaskPartial {
  float max;
  int32_t bad;  // NaN or +inf seen
};

// Max (NaN ignored) and NaN/+inf of columns [begin, end) of the mask input.
PK_MULTIVERSION
MaskPartial mask_partial(const LogitsView& v, int64_t row, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock], padded[kBlock];
  f32x16 best = splat16(-kInf);
  i32x16 bad = splat16(0);
  const f32x16 inf = splat16(kInf);
  for (int64_t col = begin; col < end; col += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - col));
    const float* x = fp32_block(v, row, col, n, buf);
    if (n < kBlock) {
      std::memcpy(padded, x, sizeof(float) * n);
      for (int i = n; i < kBlock; ++i) padded[i] = -kInf;
      x = padded;
    }
    for (int i = 0; i < kBlock; i += kVecLanes) {
      const f32x16 u = load16(x + i);
      best = u > best ? u : best;  // NaN never wins
      bad |= (u != u) | (u == inf);
    }
  }
  MaskPartial r{-kInf, 0};
  for (int l = 0; l < kVecLanes; ++l) {
    r.max = best[l] > r.max ? best[l] : r.max;
    r.bad |= bad[l];
  }
  return r;
}

// Per row: the max of L_r (0 when it is -inf: every token is then excluded anyway) and the
// effective log_a (-inf for a row that is not masked: nothing is below it).
void mask_pass(const ProgramSpec& ps, int64_t batch, int64_t vocab, std::vector<float>& row_max,
               std::vector<float>& row_log_a) {
  const int64_t n_chunks = (vocab + kMaskChunk - 1) / kMaskChunk, items = batch * n_chunks;
  std::vector<MaskPartial> parts(items);
  const LogitsView& v = ps.inputs[ps.mask_input];
  const bool parallel = !omp_in_parallel() && omp_get_max_threads() > 1 &&
                        batch * vocab >= kMinParallelWork;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t r = it / n_chunks, c = it % n_chunks;
    parts[it] = mask_partial(v, r, c * kMaskChunk, std::min(vocab, (c + 1) * kMaskChunk));
  }
  row_max.resize(batch);
  row_log_a.resize(batch);
  for (int64_t r = 0; r < batch; ++r) {
    float m = -kInf;
    int32_t bad = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      m = std::max(m, parts[r * n_chunks + c].max);
      bad |= parts[r * n_chunks + c].bad;
    }
    row_max[r] = m == -kInf ? 0.0f : m;
    row_log_a[r] = bad ? -kInf : ps.mask_log_a[r];
  }
}

// ------------------------------------------------------------------------------ combine

// z of columns [col, col + n) of a row, n <= kBlock. mask_log_a > -inf: drop tokens with
// (L_r - mask_max) < mask_log_a.
PK_MULTIVERSION
void combine_program(const ProgramSpec& ps, float mask_max, float mask_log_a, int64_t row,
                     int64_t col, int n, float* z) {
  alignas(64) float buf[3][kBlock];
  alignas(64) int32_t ex[kBlock];
  const float* coef = ps.coefficients + row * ps.coefficient_stride;
  const int r = mask_log_a > -kInf ? ps.mask_input : -1;
  if (ps.mode == ProgramMode::kLinear) {
    for (int k = 0; k < ps.n_inputs; ++k) {
      const float* x = fp32_block(ps.inputs[k], row, col, n, buf[0]);
      const float c = coef[k];
      if (k == 0) {
        for (int i = 0; i < n; ++i) {
          ex[i] = x[i] == -kInf;
          z[i] = c * x[i];
        }
      } else {
        for (int i = 0; i < n; ++i) {
          ex[i] |= x[i] == -kInf;
          z[i] = z[i] + c * x[i];
        }
      }
      if (k == r) {
        for (int i = 0; i < n; ++i) ex[i] |= (x[i] - mask_max) < mask_log_a;
      }
    }
  } else {
    const float* b = fp32_block(ps.inputs[0], row, col, n, buf[0]);
    const float* e = same_view(ps.inputs[1], ps.inputs[0])
                         ? b : fp32_block(ps.inputs[1], row, col, n, buf[1]);
    const float* a = fp32_block(ps.inputs[2], row, col, n, buf[2]);
    const float s = coef[0];
    for (int i = 0; i < n; ++i) {  // combine_block's expression
      const float d = e[i] - a[i];
      z[i] = b[i] + s * d;
      ex[i] = (b[i] == -kInf) | (e[i] == -kInf) | (a[i] == -kInf);
    }
    if (r >= 0) {
      const float* x = r == 0 ? b : (r == 1 ? e : a);
      for (int i = 0; i < n; ++i) ex[i] |= (x[i] - mask_max) < mask_log_a;
    }
  }
  for (int i = 0; i < n; ++i) z[i] = select(ex[i] != 0, -kInf, z[i]);
}

class ProgramSource final : public LogitsSource {
 public:
  ProgramSource(const ProgramSpec& ps, const float* mask_max, const float* mask_log_a)
      : ps_(ps), mask_max_(mask_max), mask_log_a_(mask_log_a) {}

  void combine(int64_t row, int64_t col, int n, float* z) const override {
    const bool masked = mask_max_ != nullptr;
    combine_program(ps_, masked ? mask_max_[row] : 0.0f, masked ? mask_log_a_[row] : -kInf, row,
                    col, n, z);
  }

 private:
  const ProgramSpec& ps_;
  const float* mask_max_;
  const float* mask_log_a_;
};

}  // namespace

void program_sample_cpu(const ProgramSpec& program, RowParams params, SampleResult out,
                        int64_t batch, int64_t vocab) {
  if (batch <= 0 || vocab <= 0) return;
  std::vector<float> row_max, row_log_a;
  if (program.mask_input >= 0) mask_pass(program, batch, vocab, row_max, row_log_a);
  const ProgramSource source(program, program.mask_input >= 0 ? row_max.data() : nullptr,
                             program.mask_input >= 0 ? row_log_a.data() : nullptr);
  sample_cpu(source, params, out, batch, vocab);
}

// ------------------------------------------------------------------------------ launcher

namespace {

SampleTensors program_sample_cpu_op(const at::TensorList inputs, const at::Tensor& coefficients,
                                    int64_t mode, int64_t mask_input,
                                    const at::Tensor& mask_log_a, const at::Tensor& temperature,
                                    const at::Tensor& top_k, const at::Tensor& top_p,
                                    const at::Tensor& min_p, const at::Tensor& seed,
                                    const at::Tensor& step, int64_t vocab_size) {
  const int64_t n = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(n >= kProgramMinInputs && n <= kProgramMaxInputs, "inputs: a program reads ",
              kProgramMinInputs, "..", kProgramMaxInputs, " tensors, got ", n);
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (linear) or 1 (difference), got ", mode);
  TORCH_CHECK(mode == 0 || n == 3, "difference mode takes 3 inputs (base, expert, anti), got ", n);
  TORCH_CHECK(mask_input >= -1 && mask_input < n, "mask_input must be -1 or in [0, ", n,
              "), got ", mask_input);
  TORCH_CHECK(vocab_size >= 1, "vocab_size must be >= 1, got ", vocab_size);
  const at::Tensor& first = inputs[0];
  TORCH_CHECK(first.dim() == 2, "inputs[0] must be 2-D (batch, vocab), got ", first.dim(), "-D");
  TORCH_CHECK(first.device().is_cpu(), "inputs must be CPU tensors for the cpu kernel");
  const int64_t batch = first.size(0);

  ProgramSpec ps{};
  for (int64_t i = 0; i < n; ++i) {
    ps.inputs[i] = logits_view(inputs[i], "inputs[" + std::to_string(i) + "]", first,
                               "inputs[0]", vocab_size);
  }
  ps.n_inputs = static_cast<int>(n);
  ps.mode = static_cast<ProgramMode>(mode);
  const int64_t n_coef = mode == 0 ? n : 1;
  TORCH_CHECK(coefficients.dim() == 2 && coefficients.size(0) == batch &&
                  coefficients.size(1) >= n_coef,
              "coefficients must be (", batch, ", ", mode == 0 ? n : 1,
              mode == 0 ? ")" : "+) (s in column 0)", ", got shape ", coefficients.sizes());
  TORCH_CHECK(coefficients.scalar_type() == at::kFloat, "coefficients must be float32, got ",
              coefficients.scalar_type());
  TORCH_CHECK(coefficients.device().is_cpu(), "coefficients must be a CPU tensor");
  TORCH_CHECK(coefficients.size(1) <= 1 || coefficients.stride(1) == 1,
              "coefficients must have unit column stride");
  ps.coefficients = coefficients.data_ptr<float>();
  ps.coefficient_stride = coefficients.stride(0);
  ps.mask_input = static_cast<int>(mask_input);
  ps.mask_log_a = mask_input >= 0
                      ? param_ptr<float>(mask_log_a, "mask_log_a", at::kFloat, first, "inputs[0]")
                      : nullptr;
  const RowParams params{
      nullptr,
      param_ptr<float>(temperature, "temperature", at::kFloat, first, "inputs[0]"),
      param_ptr<int64_t>(top_k, "top_k", at::kLong, first, "inputs[0]"),
      param_ptr<float>(top_p, "top_p", at::kFloat, first, "inputs[0]"),
      param_ptr<float>(min_p, "min_p", at::kFloat, first, "inputs[0]"),
      param_ptr<int64_t>(seed, "seed", at::kLong, first, "inputs[0]"),
      param_ptr<int64_t>(step, "step", at::kLong, first, "inputs[0]"),
  };
  auto [outputs, out] = sample_outputs(first, batch);
  if (batch > 0) program_sample_cpu(ps, params, out, batch, vocab_size);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(proxykern, m) {
  m.def(
      "program_sample(Tensor[] inputs, Tensor coefficients, int mode, int mask_input, "
      "Tensor mask_log_a, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
      "Tensor seed, Tensor step, int vocab_size) "
      "-> (Tensor tokens, Tensor logprobs, Tensor lse, Tensor status)");
}

TORCH_LIBRARY_IMPL(proxykern, CPU, m) { m.impl("program_sample", &program_sample_cpu_op); }

}  // namespace proxykern
