// accumulate_stats on CPU: x's per-neuron statistics merged into a running state, and a pending
// batch into another, with no tensor between them (lrfluct_fast/ops/accumulate_stats.py).
#include <vector>

#include "common.h"

namespace lrfluct {

// The batch's statistics go through buffers the calling thread keeps and only grows: a resize
// down and up again would zero-fill what batch_stats_into writes whole.
void accumulate_into(const at::Tensor& x, int64_t* counts, double* moments) {
  const int64_t N = x.size(1);
  thread_local std::vector<int64_t> b_counts;
  thread_local std::vector<double> b_moments;
  if (b_counts.size() < size_t(3 * N)) {
    b_counts.resize(3 * N);
    b_moments.resize(3 * N);
  }
  batch_stats_into(x, b_counts.data(), b_moments.data());
  merge_into(counts, moments, b_counts.data(), b_moments.data(), N);
}

namespace {

void accumulate_stats_cpu(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& moments,
                          const c10::optional<at::Tensor>& pending_counts,
                          const c10::optional<at::Tensor>& pending_moments,
                          const c10::optional<at::Tensor>& into_counts,
                          const c10::optional<at::Tensor>& into_moments) {
  check_batch_input(x);
  const int64_t N = x.size(1);
  const auto device = x.device();
  check_state("counts", counts, {3, N}, {at::kLong}, device);
  check_state("moments", moments, {3, N}, {at::kDouble}, device);
  const int given = pending_counts.has_value() + pending_moments.has_value() +
                    into_counts.has_value() + into_moments.has_value();
  TORCH_CHECK_VALUE(given == 0 || given == 4,
                    "pending_counts, pending_moments, into_counts and into_moments come together");
  if (given == 4) {
    check_state("pending_counts", *pending_counts, {3, N}, {at::kLong}, device);
    check_state("pending_moments", *pending_moments, {3, N}, {at::kDouble}, device);
    check_state("into_counts", *into_counts, {3, N}, {at::kLong}, device);
    check_state("into_moments", *into_moments, {3, N}, {at::kDouble}, device);
  }
  accumulate_into(x, counts.data_ptr<int64_t>(), moments.data_ptr<double>());
  if (given == 4) {
    merge_into(into_counts->data_ptr<int64_t>(), into_moments->data_ptr<double>(),
               pending_counts->data_ptr<int64_t>(), pending_moments->data_ptr<double>(), N);
  }
}

}  // namespace

void register_accumulate_stats(torch::Library& m) {
  m.impl("accumulate_stats", &accumulate_stats_cpu);
}

}  // namespace lrfluct
