// Shared by the CPU kernels: argument checks with messages that name the argument, and the
// element loads used by every kernel. Schemas are declared in Python (lrfluct_fast/ops).
#pragma once
#include <algorithm>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

namespace lrfluct {

// Below this many elements a kernel runs on the calling thread: an OpenMP region costs a few
// microseconds on an idle machine, and milliseconds when another process holds a core the
// region waits for (measured: a 2-thread step of 8 x Linear(16, 16) took 8 ms instead of
// 0.5 ms with the other core busy).
constexpr int64_t kMinParallelElements = int64_t(1) << 16;

// Rows of the packed statistics (lrfluct_fast/ops/_library.py).
constexpr int64_t kCount = 0, kPositive = 1, kNonfinite = 2;
// moments rows: mean of (x - shift), M2, shift (the first finite value seen)
constexpr int64_t kMean = 0, kM2 = 1, kShift = 2;

inline bool is_float_input(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_float_input(const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(is_float_input(x.scalar_type()), name,
      " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be on cpu, got ", x.device());
}

inline bool state_ok(const at::Tensor& t, at::IntArrayRef shape,
                     std::initializer_list<at::ScalarType> dtypes, const at::Device& device) {
  if (t.sizes() != shape || t.device() != device || !t.is_contiguous()) return false;
  for (auto d : dtypes)
    if (t.scalar_type() == d) return true;
  return false;
}

// The messages are built only for a bad argument: a call with hundreds of tensors (a model's
// parameter list) checks each in a few comparisons.
inline void check_state(const std::string& name, const at::Tensor& t, at::IntArrayRef shape,
                        std::initializer_list<at::ScalarType> dtypes, const at::Device& device) {
  if (state_ok(t, shape, dtypes, device)) return;
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  std::string allowed;
  for (auto d : dtypes) allowed += (allowed.empty() ? "" : " or ") + std::string(c10::toString(d));
  TORCH_CHECK_VALUE(std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) != dtypes.end(),
                    name, " must have dtype ", allowed, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (it is updated in place)");
}

// The kernels behind the ops, on raw [3, N] state (counts int64, moments double), for the ops
// that combine them (accumulate_stats, observe) without intermediate tensors.
void check_batch_input(const at::Tensor& x);  // float, [R, N] or [B, N, S], on cpu
void batch_stats_into(const at::Tensor& x, int64_t* counts, double* moments);
void merge_into(int64_t* counts, double* moments, const int64_t* b_counts, const double* b_moments,
                int64_t N);
// x's batch statistics merged into a running [3, N] state (accumulate_stats.cpp).
void accumulate_into(const at::Tensor& x, int64_t* counts, double* moments);

// Each op's file registers its CPU kernel here (called by module.cpp's register_kernels).
void register_batch_stats(torch::Library& m);
void register_merge_stats(torch::Library& m);
void register_temporal_update(torch::Library& m);
void register_accumulate_stats(torch::Library& m);


// 32-byte vectors of T (GCC/Clang vector extensions), for loops the compiler does not vectorise
// by itself; each use keeps a plain loop for other compilers.
#if defined(__GNUC__)
template <typename T> struct Lanes { typedef T type __attribute__((vector_size(32))); };
#endif

// Hot loops are compiled twice, for AVX2 and for baseline x86-64, and picked at load time:
// fast on current CPUs, still portable. (The loops vectorise only with -fno-trapping-math.)
#if defined(__GNUC__) && defined(__x86_64__)
#define LRFLUCT_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LRFLUCT_SIMD_CLONES
#endif

}  // namespace lrfluct
