// merge_stats on CPU: in-place Chan merge of batch (count, mean, M2) into running state, with
// the integer counters added. Double state, double arithmetic on shifted means.
#include <cstring>
#include <type_traits>

#include "common.h"

namespace lrfluct {

namespace {

template <typename T>
inline void load(T& out, const void* p) { std::memcpy(&out, p, sizeof out); }

template <typename T>
inline void store(void* p, const T& v) { std::memcpy(p, &v, sizeof v); }

// Counts as doubles D, read as U. A vector goes through the exponent bits of each count's two
// 32-bit halves (AVX2 has no int64-to-double instruction): exact below 2^53, rounded to nearest
// above, as the cast that converts a single count. Counts are never negative.
template <typename D, typename U>
inline void counts_to_doubles(D& out, const int64_t* p) {
  if constexpr (std::is_same_v<D, double>) {
    out = static_cast<double>(*p);
  } else {
    U u;
    load(u, p);
    const U hi_bits = (u >> 32) | 0x4530000000000000ULL;           // 2^84 + hi * 2^32
    const U lo_bits = (u & 0xffffffffULL) | 0x4330000000000000ULL;  // 2^52 + lo
    D hi, lo;
    load(hi, &hi_bits);
    load(lo, &lo_bits);
    out = (hi - 19342813118337666422669312.0) + lo;  // hi - (2^84 + 2^52) is exact
  }
}

// Chan's merge of the batch's columns [j, j + lanes of D) into the state's moments, with
// selects only, so a vector of columns takes one path: a column with no batch observation keeps
// its moments. Written once for a vector of columns and for one column (the tail); values pass
// by reference only (no vector in a call's ABI).
template <typename D, typename U>
inline void merge_moments(double* __restrict__ moments, const int64_t* __restrict__ counts,
                          const int64_t* __restrict__ b_counts,
                          const double* __restrict__ b_moments, int64_t N, int64_t j) {
  D na, nb, mean_a, m2_a, shift_a, mean_b, m2_b, shift_b;
  counts_to_doubles<D, U>(na, counts + kCount * N + j);
  counts_to_doubles<D, U>(nb, b_counts + kCount * N + j);
  load(mean_a, moments + kMean * N + j);  // 0 while na == 0
  load(m2_a, moments + kM2 * N + j);
  load(shift_a, moments + kShift * N + j);
  load(mean_b, b_moments + kMean * N + j);
  load(m2_b, b_moments + kM2 * N + j);
  load(shift_b, b_moments + kShift * N + j);
  const D n = na + nb;
  // The state keeps its shift, or adopts the batch's while it has no observation.
  const D shift = na > 0 ? shift_a : shift_b;
  const D delta = ((shift_b - shift) + mean_b) - mean_a;
  const auto take = nb > 0;
  store(moments + kMean * N + j, D(take ? mean_a + delta * (nb / n) : mean_a));
  store(moments + kM2 * N + j, D(take ? m2_a + m2_b + delta * delta * (na * nb / n) : m2_a));
  store(moments + kShift * N + j, D(take ? shift : shift_a));
}

LRFLUCT_SIMD_CLONES void merge_columns(int64_t* __restrict__ counts, double* __restrict__ moments,
                                       const int64_t* __restrict__ b_counts,
                                       const double* __restrict__ b_moments, int64_t N,
                                       int64_t j0, int64_t j1) {
  int64_t j = j0;
#if defined(__GNUC__)
  using Doubles = Lanes<double>::type;
  constexpr int64_t kW = sizeof(Doubles) / sizeof(double);
  for (; j + kW <= j1; j += kW)
    merge_moments<Doubles, Lanes<uint64_t>::type>(moments, counts, b_counts, b_moments, N, j);
#endif
  for (; j < j1; ++j) merge_moments<double, uint64_t>(moments, counts, b_counts, b_moments, N, j);
  for (int64_t row = 0; row < 3; ++row)  // after the moments, which read the old counts
    for (int64_t k = j0; k < j1; ++k) counts[row * N + k] += b_counts[row * N + k];
}

}  // namespace

void merge_into(int64_t* counts, double* moments, const int64_t* b_counts,
                const double* b_moments, int64_t N) {
  at::parallel_for(0, N, 16384, [&](int64_t j0, int64_t j1) {
    merge_columns(counts, moments, b_counts, b_moments, N, j0, j1);
  });
}

namespace {

void merge_stats_cpu(const at::Tensor& counts, const at::Tensor& moments,
                     const at::Tensor& batch_counts, const at::Tensor& batch_moments) {
  TORCH_CHECK_VALUE(counts.dim() == 2 && counts.size(0) == 3,
                    "counts must be an int64 tensor [3, N], got shape ", counts.sizes());
  const int64_t N = counts.size(1);
  const auto device = counts.device();
  check_state("counts", counts, {3, N}, {at::kLong}, device);
  check_state("moments", moments, {3, N}, {at::kDouble}, device);
  check_state("batch_counts", batch_counts, {3, N}, {at::kLong}, device);
  check_state("batch_moments", batch_moments, {3, N}, {at::kDouble}, device);
  merge_into(counts.data_ptr<int64_t>(), moments.data_ptr<double>(),
             batch_counts.data_ptr<int64_t>(), batch_moments.data_ptr<double>(), N);
}

}  // namespace

void register_merge_stats(torch::Library& m) { m.impl("merge_stats", &merge_stats_cpu); }

}  // namespace lrfluct
