// The fused proxy-tuning sampler's kernel interface on raw pointers (no torch headers).
// Semantics: proxykern/reference.py. Launchers (fused_sample_op.cpp, cuda_launcher.cpp)
// check shapes, dtypes and devices before calling these.
#pragma once
#include <cstdint>

namespace proxykern {

enum class LogitsDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One (B, >= vocab) logits matrix; columns are contiguous, rows row_stride elements apart.
struct LogitsView {
  const void* data;
  int64_t row_stride;
  LogitsDtype dtype;
};

// Per-row parameters, each an array of length B (on the kernel's device).
struct RowParams {
  const float* alpha;
  const float* temperature;  // 0 = greedy
  const int64_t* top_k;      // <= 0 = all
  const float* top_p;        // >= 1 = all
  const float* min_p;        // <= 0 = all
  const int64_t* seed;
  const int64_t* step;
};

// Outputs, each an array of length B.
struct SampleResult {
  int64_t* tokens;   // -1 for a bad row
  float* logprobs;   // z'[token] - lse
  float* lse;        // logsumexp(z')
  int32_t* status;   // 0, or kStatusNonfinite | kStatusEmpty
};

constexpr int32_t kStatusNonfinite = 1;  // z holds NaN or +inf
constexpr int32_t kStatusEmpty = 2;      // every z is -inf

// Another producer of the combined logits z for the CPU kernel (the logit programs,
// program_sample_cpu.cpp): the sampling after the combination is the same code.
class LogitsSource {
 public:
  virtual ~LogitsSource() = default;
  // z (fp32, before the temperature; -inf = excluded) of columns [col, col + n) of `row`,
  // 1 <= n <= 512. Called concurrently from several threads.
  virtual void combine(int64_t row, int64_t col, int n, float* z) const = 0;
};

// CPU kernel: OpenMP across rows, and across vocabulary chunks when the batch is small.
void proxy_sample_cpu(LogitsView base, LogitsView expert, LogitsView anti, RowParams params,
                      SampleResult out, int64_t batch, int64_t vocab);

// The same kernel on z from `source` (params.alpha unused, may be null).
void sample_cpu(const LogitsSource& source, RowParams params, SampleResult out, int64_t batch,
                int64_t vocab);

}  // namespace proxykern
