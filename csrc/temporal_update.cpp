// temporal_update on CPU: Welford update of per-element (count, mean, M2) for a list of tensors
// in one call (state layout: lrfluct_fast/ops/temporal_update.py). Each element is shifted by
// its first finite value, so float32 state keeps the precision of fluctuations many orders
// below the value itself (weights near 0.3 moving 1e-5). All tensors are validated before any
// state changes; the work is one parallel loop over (tensor, chunk) pairs so small and large
// tensors share the threads.
#include "common.h"

namespace lrfluct {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task
constexpr int64_t kCalls = 0, kSkipped = 1;  // rows of a tally

// Arithmetic in the state's dtype: after the shift every operand is a small deviation that
// float32 carries as exactly as it is stored; this branch-free loop vectorises (10x faster
// than double arithmetic, which does not). Returns how many values were non-finite (skipped).
//
// kClean: no element of the tensor was ever skipped and this is not its first call, so every
// element's count is `calls` and its shift is set: the loop reads v, shift, mean, M2 and writes
// mean, M2 (24 bytes per float32 element), and counts the skipped values per element only in
// the rare chunk that has one. Otherwise each count is calls - skip[e] and a first observation
// sets the shift.
template <bool kClean, typename value_t, typename acc_t>
LRFLUCT_SIMD_CLONES int64_t welford_chunk(const value_t* __restrict__ v, int32_t* __restrict__ skip,
                                          acc_t* __restrict__ mean, acc_t* __restrict__ m2,
                                          acc_t* __restrict__ shift, int64_t calls, int64_t e0,
                                          int64_t e1) {
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(calls + 1);  // used when kClean
  int64_t skipped = 0;
  for (int64_t e = e0; e < e1; ++e) {
    const acc_t x = static_cast<acc_t>(v[e]);
    const bool finite = (x - x) == acc_t(0);  // false for NaN and +-Inf
    const int64_t count_before = kClean ? calls : calls - skip[e];
    const acc_t s = (!kClean && finite && count_before == 0) ? x : shift[e];
    const acc_t mean_old = mean[e];
    const acc_t d = finite ? x - s : mean_old;  // small: weights move slowly
    const acc_t delta = d - mean_old;           // 0 for a skipped value
    const acc_t mean_new = mean_old + (kClean ? delta * inv_count
                                              : delta / static_cast<acc_t>(count_before + 1));
    if (!kClean) {
      skip[e] += finite ? 0 : 1;
      shift[e] = s;
    }
    mean[e] = mean_new;
    m2[e] = m2[e] + delta * (d - mean_new);
    skipped += finite ? 0 : 1;
  }
  if (kClean && skipped > 0) {  // rare: count the skipped values per element
    for (int64_t e = e0; e < e1; ++e) {
      const acc_t x = static_cast<acc_t>(v[e]);
      skip[e] += (x - x) == acc_t(0) ? 0 : 1;
    }
  }
  return skipped;
}

template <typename value_t, typename acc_t>
int64_t update_chunk(const value_t* v, int32_t* skip, acc_t* state, int64_t n, int64_t calls,
                     bool clean, int64_t e0, int64_t e1) {
  acc_t *mean = state + kMean * n, *m2 = state + kM2 * n, *shift = state + kShift * n;
  return clean && calls > 0 ? welford_chunk<true>(v, skip, mean, m2, shift, calls, e0, e1)
                            : welford_chunk<false>(v, skip, mean, m2, shift, calls, e0, e1);
}

void temporal_update_cpu(at::TensorList values, at::TensorList tallies, at::TensorList skipped,
                         at::TensorList moments) {
  TORCH_CHECK_VALUE(!values.empty(), "values must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(tallies.size() == values.size() && skipped.size() == values.size() &&
                        moments.size() == values.size(),
      "values, tallies, skipped and moments must have the same length, got ", values.size(), ", ",
      tallies.size(), ", ", skipped.size(), ", ", moments.size());
  std::vector<at::Tensor> contiguous_values;
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (tensor index, chunk start)
  for (size_t i = 0; i < values.size(); ++i) {
    const at::Tensor &v = values[i], &m = moments[i];
    const bool ok = is_float_input(v.scalar_type()) && v.device().is_cpu() &&
        state_ok(tallies[i], {2}, {at::kLong}, v.device()) &&
        state_ok(skipped[i], v.sizes(), {at::kInt}, v.device()) &&
        m.dim() == v.dim() + 1 && m.size(0) == 3 && m.sizes().slice(1) == v.sizes() &&
        state_ok(m, m.sizes(), {at::kFloat, at::kDouble}, v.device());
    if (!ok) {  // the same checks again, to say which argument is wrong and how
      const std::string idx = "[" + std::to_string(i) + "]";
      check_float_input(("values" + idx).c_str(), v);
      check_state("tallies" + idx, tallies[i], {2}, {at::kLong}, v.device());
      check_state("skipped" + idx, skipped[i], v.sizes(), {at::kInt}, v.device());
      std::vector<int64_t> mshape{3};
      mshape.insert(mshape.end(), v.sizes().begin(), v.sizes().end());
      check_state("moments" + idx, m, mshape, {at::kFloat, at::kDouble}, v.device());
    }
    contiguous_values.push_back(v.contiguous());
    for (int64_t e = 0; e < values[i].numel(); e += kChunk) tasks.emplace_back(i, e);
  }
  std::vector<int64_t> task_skipped(tasks.size(), 0);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = tasks[t].first, e0 = tasks[t].second;
      const at::Tensor& v = contiguous_values[i];
      const int64_t n = v.numel(), e1 = std::min(n, e0 + kChunk);
      const int64_t* tally = tallies[i].data_ptr<int64_t>();
      int32_t* skip = skipped[i].data_ptr<int32_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "temporal_update", [&] {
        using value_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(moments[i].scalar_type(), "temporal_update_state", [&] {
          task_skipped[t] = update_chunk<value_t, scalar_t>(
              v.data_ptr<value_t>(), skip, moments[i].data_ptr<scalar_t>(), n, tally[kCalls],
              tally[kSkipped] == 0, e0, e1);
        });
      });
    }
  });
  // Tallies change only after every chunk has read them.
  for (size_t t = 0; t < tasks.size(); ++t)
    tallies[tasks[t].first].data_ptr<int64_t>()[kSkipped] += task_skipped[t];
  for (const at::Tensor& tally : tallies) tally.data_ptr<int64_t>()[kCalls] += 1;
}

}  // namespace

void register_temporal_update(torch::Library& m) { m.impl("temporal_update", &temporal_update_cpu); }

}  // namespace lrfluct
