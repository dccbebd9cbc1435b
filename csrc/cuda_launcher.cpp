// The CUDA backend's launcher: checks the tensors (fused_sample_op.cpp's checks), sizes
// and allocates the workspace on the logits' device and launches the kernels of
// cuda_kernels_*.cu on the current stream. No host sync, no allocation besides the one
// at::empty workspace (CUDA-graph safe). Compiled by the host compiler, CUDA builds only.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "cuda_sample.h"
#include "fused_sample_op.h"

#define PK_STR2(x) #x
#define PK_STR(x) PK_STR2(x)

namespace proxykern {
namespace {

bool vec_aligned(const LogitsView& v, int64_t batch) {
  const int64_t bytes = v.dtype == LogitsDtype::kFloat32 ? 4 : 2;
  return reinterpret_cast<uintptr_t>(v.data) % 16 == 0 &&
         (batch <= 1 || (v.row_stride * bytes) % 16 == 0);
}

// K1's elements per thread: the vocabulary's own (cuda_sample.h), unless the benchmark
// override PROXYKERN_CUDA_SLICE_EPT (4, 8 or 16; benchmarks/gpu_check.py's slice probe)
// forces one width for every vocabulary. Read once per process, so a process stays
// batch-invariant; not part of the API.
int slice_ept(int64_t vocab) {
  static const int forced = [] {
    const char* s = std::getenv("PROXYKERN_CUDA_SLICE_EPT");
    if (s == nullptr || *s == '\0') return 0;
    const std::string v(s);
    TORCH_CHECK(v == "4" || v == "8" || v == "16",
                "PROXYKERN_CUDA_SLICE_EPT must be 4, 8 or 16, got '", v, "'");
    return std::stoi(v);
  }();
  return forced != 0 ? forced : cuda::slice_elems_per_thread(vocab);
}

// The kernel variant (cuda_sample.h, KernelVariant): PROXYKERN_CUDA_KERNEL=v04|v05|v06|v07
// (default v04, the kernel measured on a GPU; v05 to v07 are written and compiled but
// not yet run on one, so users get them only once a device run has checked them), read
// once per process, so a process stays deterministic and batch-invariant; benchmarks
// switch it with the cuda_kernel_variant op to time the builds side by side (a CUDA graph
// keeps the variant it was captured with). Not part of the API.
cuda::KernelVariant parse_variant(const std::string& v, const char* what) {
  if (v == "v04") return cuda::KernelVariant::kV04;
  if (v == "v05") return cuda::KernelVariant::kV05;
  if (v == "v06") return cuda::KernelVariant::kV06;
  if (v == "v07") return cuda::KernelVariant::kV07;
  TORCH_CHECK(false, what, " must be 'v04', 'v05', 'v06' or 'v07', got '", v, "'");
}

std::atomic<int>& variant_slot() {
  static std::atomic<int> slot{[] {
    const char* s = std::getenv("PROXYKERN_CUDA_KERNEL");
    if (s == nullptr || *s == '\0') return static_cast<int>(cuda::KernelVariant::kV04);
    return static_cast<int>(parse_variant(s, "PROXYKERN_CUDA_KERNEL"));
  }()};
  return slot;
}

const char* variant_name(int v) {
  switch (static_cast<cuda::KernelVariant>(v)) {
    case cuda::KernelVariant::kV04: return "v04";
    case cuda::KernelVariant::kV05: return "v05";
    case cuda::KernelVariant::kV06: return "v06";
    default: return "v07";
  }
}

}  // namespace

SampleTensors fused_sample_cuda(const at::Tensor& base, const at::Tensor& expert,
                                const at::Tensor& anti, const at::Tensor& alpha,
                                const at::Tensor& temperature, const at::Tensor& top_k,
                                const at::Tensor& top_p, const at::Tensor& min_p,
                                const at::Tensor& seed, const at::Tensor& step,
                                int64_t vocab_size) {
  TORCH_CHECK(base.is_cuda(), "base must be a CUDA tensor for the cuda kernel");
  const c10::cuda::CUDAGuard guard(base.device());
  FusedSampleArgs fa = prepare_fused_sample(base, expert, anti, alpha, temperature, top_k, top_p,
                                            min_p, seed, step, vocab_size);
  if (fa.batch == 0) return fa.outputs;
  TORCH_CHECK(fa.vocab <= INT32_MAX, "vocab_size must be < 2^31 for the cuda kernel, got ",
              fa.vocab);
  const int ept = slice_ept(fa.vocab);
  const int64_t width = cuda::slice_width(ept);
  const int64_t num_slices = (fa.vocab + width - 1) / width;
  TORCH_CHECK(fa.batch * num_slices <= INT32_MAX && fa.batch <= INT32_MAX,
              "batch * ceil(vocab_size / ", width, ") must be < 2^31 for the cuda kernel");
  const int cand = cuda::cands_per_slice(ept);
  const LogitsDtype dt = fa.base.dtype;
  const bool same = fa.expert.dtype == dt && fa.anti.dtype == dt;
  const bool vec = vec_aligned(fa.base, fa.batch) && vec_aligned(fa.expert, fa.batch) &&
                   vec_aligned(fa.anti, fa.batch);
  const auto variant = static_cast<cuda::KernelVariant>(variant_slot().load());
  // v06's one-launch plan (cuda_sample.h) needs a counter per row; the kernels' launch
  // (cuda_kernels.cuh) zeroes them and applies the same rule.
  const bool fused = cuda::merge_in_slice_kernel(variant, fa.batch, num_slices, same && vec);
  // v07's spread plan (cuda_sample.h) needs a control block a row and G - 1 answer slots.
  const int spread =
      variant == cuda::KernelVariant::kV07
          ? cuda::spread_blocks(variant, fa.batch, fa.vocab,
                                at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                                same && vec)
          : 1;

  // Workspace, each part 256-byte aligned (the allocator gives 256): partials, candidates
  // (8-byte records), v06's row counters, v07's control blocks and answer slots.
  auto rounded = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t n_part = fa.batch * num_slices;
  const int64_t part_bytes = rounded(n_part * static_cast<int64_t>(sizeof(cuda::SlicePartial)));
  const int64_t cand_bytes = rounded(n_part * cand * static_cast<int64_t>(sizeof(cuda::Cand)));
  const int64_t count_bytes = fused ? rounded(fa.batch * static_cast<int64_t>(sizeof(uint32_t))) : 0;
  const int64_t ctl_bytes =
      spread > 1 ? rounded(fa.batch * static_cast<int64_t>(sizeof(cuda::SpreadCtl))) : 0;
  const int64_t slot_bytes =
      spread > 1 ? fa.batch * (spread - 1) * static_cast<int64_t>(sizeof(cuda::SpreadSlot)) : 0;
  at::Tensor workspace = at::empty({part_bytes + cand_bytes + count_bytes + ctl_bytes + slot_bytes},
                                   base.options().dtype(at::kByte));
  uint8_t* ws = workspace.data_ptr<uint8_t>();

  cuda::KernelArgs args;
  args.base = fa.base;
  args.expert = fa.expert;
  args.anti = fa.anti;
  args.params = fa.params;
  args.result = fa.result;
  args.vocab = fa.vocab;
  args.num_slices = static_cast<int32_t>(num_slices);
  args.cand_per_slice = cand;
  // F fractional bits with vocab * 2^F <= 2^62: fixed-point mass sums never overflow.
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) <= fa.vocab) ++bits;  // bit length of vocab
  args.mass_scale = std::ldexp(1.0f, 62 - bits);
  args.partials = reinterpret_cast<cuda::SlicePartial*>(ws);
  args.cands = reinterpret_cast<cuda::Cand*>(ws + part_bytes);
  uint8_t* const after_cands = ws + part_bytes + cand_bytes;
  args.counters = fused ? reinterpret_cast<uint32_t*>(after_cands) : nullptr;
  args.spread = spread;
  args.spread_ctl =
      spread > 1 ? reinterpret_cast<cuda::SpreadCtl*>(after_cands + count_bytes) : nullptr;
  args.spread_slots =
      spread > 1 ? reinterpret_cast<cuda::SpreadSlot*>(after_cands + count_bytes + ctl_bytes)
                 : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (!same) {
    err = cuda::launch_mixed(args, fa.batch, ept, variant, stream);
  } else if (dt == LogitsDtype::kFloat32) {
    err = cuda::launch_f32(args, fa.batch, vec, ept, variant, stream);
  } else if (dt == LogitsDtype::kBFloat16) {
    err = cuda::launch_bf16(args, fa.batch, vec, ept, variant, stream);
  } else {
    err = cuda::launch_f16(args, fa.batch, vec, ept, variant, stream);
  }
  C10_CUDA_CHECK(err);
  return fa.outputs;
}

std::string cuda_kernel_variant(const std::string& name) {
  const int previous = variant_slot().load();
  if (!name.empty()) {
    variant_slot().store(static_cast<int>(parse_variant(name, "cuda_kernel_variant's name")));
  }
  return variant_name(previous);
}

// Benchmarks and tests only: whether v06 runs its one-launch plan (cuda_sample.h,
// merge_in_slice_kernel) for `batch` rows of `vocab_size` columns of one dtype with
// 16-byte aligned rows (the slice width as the op would pick it). No device needed.
bool cuda_v06_one_launch(int64_t batch, int64_t vocab_size) {
  TORCH_CHECK(batch >= 0 && vocab_size > 0, "cuda_v06_one_launch: batch >= 0 and vocab_size > 0, got ",
              batch, " and ", vocab_size);
  const int64_t width = cuda::slice_width(slice_ept(vocab_size));
  return cuda::merge_in_slice_kernel(cuda::KernelVariant::kV06, batch,
                                     (vocab_size + width - 1) / width, true);
}

// Benchmarks and tests only: v07's spread (cuda_sample.h, spread_blocks) for `batch` rows
// of `vocab_size` columns of one dtype with 16-byte aligned rows on `sm_count` SMs (the
// slice width does not enter). No device needed.
int64_t cuda_v07_spread(int64_t batch, int64_t vocab_size, int64_t sm_count) {
  TORCH_CHECK(batch >= 0 && vocab_size > 0 && sm_count > 0,
              "cuda_v07_spread: batch >= 0, vocab_size > 0 and sm_count > 0, got ", batch, ", ",
              vocab_size, " and ", sm_count);
  return cuda::spread_blocks(cuda::KernelVariant::kV07, batch, vocab_size, sm_count, true);
}

int64_t cuda_kernel_version(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return cuda::kernel_image_version();
}

std::string cuda_build_archs() {
#ifdef PROXYKERN_CUDA_ARCHS
  return PK_STR(PROXYKERN_CUDA_ARCHS);
#else
  return "unknown";
#endif
}

}  // namespace proxykern
