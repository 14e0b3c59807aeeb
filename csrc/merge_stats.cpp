// merge_stats on CPU: in-place Chan merge of batch (count, mean, M2) into running state, with
// the integer counters added. Double state, double arithmetic on shifted means.
#include "common.h"

namespace lrfluct {

void merge_into(int64_t* counts, double* moments, const int64_t* b_counts,
                const double* b_moments, int64_t N) {
  at::parallel_for(0, N, 16384, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const double na = static_cast<double>(counts[kCount * N + j]);
      const double nb = static_cast<double>(b_counts[kCount * N + j]);
      const double n = na + nb;
      if (nb > 0) {
        // The state keeps its shift, or adopts the batch's while it has no observation.
        const double shift = na > 0 ? moments[kShift * N + j] : b_moments[kShift * N + j];
        const double mean_a = moments[kMean * N + j];  // 0 while na == 0
        const double mean_b = (b_moments[kShift * N + j] - shift) + b_moments[kMean * N + j];
        const double delta = mean_b - mean_a;
        moments[kMean * N + j] = mean_a + delta * (nb / n);
        moments[kM2 * N + j] = moments[kM2 * N + j] + b_moments[kM2 * N + j] +
                               delta * delta * (na * nb / n);
        moments[kShift * N + j] = shift;
      }
      for (int64_t row = 0; row < 3; ++row) counts[row * N + j] += b_counts[row * N + j];
    }
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
