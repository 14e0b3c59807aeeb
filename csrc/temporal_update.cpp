// temporal_update on CPU: Welford update of per-element (count, mean, M2) for a list of tensors
// in one call. Each element is shifted by its first finite value, so float32 state keeps the
// precision of fluctuations many orders below the value itself (weights near 0.3 moving 1e-5). All tensors are validated before any state changes; the work is one parallel
// loop over (tensor, chunk) pairs so small and large tensors share the threads.
#include "common.h"

namespace lrfluct {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task

// Arithmetic in the state's dtype: after the shift every operand is a small deviation that
// float32 carries as exactly as it is stored; this branch-free form vectorises (10x faster
// than double arithmetic, which does not).
template <typename scalar_t, typename acc_t>
LRFLUCT_SIMD_CLONES void welford_chunk(const scalar_t* __restrict__ v, int32_t* __restrict__ count,
                                       acc_t* __restrict__ mean, acc_t* __restrict__ m2,
                                       acc_t* __restrict__ shift, int64_t e0, int64_t e1) {
  for (int64_t e = e0; e < e1; ++e) {
    const acc_t x = static_cast<acc_t>(v[e]);
    const bool finite = (x - x) == acc_t(0);  // false for NaN and +-Inf
    const int32_t c_old = count[e];
    const acc_t s = (finite & (c_old == 0)) ? x : shift[e];
    const int32_t c = c_old + (finite ? 1 : 0);
    const acc_t mean_old = mean[e];
    const acc_t d = finite ? x - s : mean_old;  // small: weights move slowly
    const acc_t delta = d - mean_old;           // 0 for a skipped value
    const acc_t mean_new = mean_old + delta / static_cast<acc_t>(c > 0 ? c : 1);
    count[e] = c;
    shift[e] = s;
    mean[e] = mean_new;
    m2[e] = m2[e] + delta * (d - mean_new);
  }
}

void temporal_update_cpu(at::TensorList values, at::TensorList counts, at::TensorList moments) {
  TORCH_CHECK_VALUE(!values.empty(), "values must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(counts.size() == values.size() && moments.size() == values.size(),
      "values, counts and moments must have the same length, got ", values.size(), ", ",
      counts.size(), ", ", moments.size());
  std::vector<at::Tensor> contiguous_values;
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (tensor index, chunk start)
  for (size_t i = 0; i < values.size(); ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    check_float_input(("values" + idx).c_str(), values[i]);
    check_state("counts" + idx, counts[i], values[i].sizes(), {at::kInt}, values[i].device());
    std::vector<int64_t> mshape{3};
    mshape.insert(mshape.end(), values[i].sizes().begin(), values[i].sizes().end());
    check_state("moments" + idx, moments[i], mshape, {at::kFloat, at::kDouble}, values[i].device());
    contiguous_values.push_back(values[i].contiguous());
    for (int64_t e = 0; e < values[i].numel(); e += kChunk) tasks.emplace_back(i, e);
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = tasks[t].first, e0 = tasks[t].second;
      const at::Tensor& v = contiguous_values[i];
      const int64_t n = v.numel(), e1 = std::min(n, e0 + kChunk);
      int32_t* c = counts[i].data_ptr<int32_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "temporal_update", [&] {
        using value_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(moments[i].scalar_type(), "temporal_update_state", [&] {
          scalar_t* state = moments[i].data_ptr<scalar_t>();
          welford_chunk<value_t, scalar_t>(v.data_ptr<value_t>(), c, state + kMean * n,
                                            state + kM2 * n, state + kShift * n, e0, e1);
        });
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrfluct, CPU, m) { m.impl("temporal_update", &temporal_update_cpu); }

}  // namespace lrfluct
