// temporal_update on CPU: per-element running (count, mean, M2) of a list of tensors' values, as
// a block in the state's dtype updated by Welford every call and a float64 master that each
// block is Chan-merged into once per `flush_every` calls (state layout and the reasons:
// lrfluct_fast/ops/temporal_update.py). All tensors are validated before any state changes; the
// work is one parallel loop over the list's elements, so each thread takes an equal share
// whatever the tensors' sizes.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "common.h"

namespace lrfluct {
namespace {

constexpr int64_t kChunk = 1 << 16;  // fewest elements a thread takes
constexpr int64_t kCalls = 0, kSkipped = 1, kEscaped = 2, kFlushed = 3;  // rows of a tally
constexpr int64_t kMasterMean = 0, kMasterM2 = 1, kMasterCount = 2;     // rows of a master
constexpr int64_t kMaxFlushEvery = int64_t(1) << 24;

// |v - shift| beyond which a value escapes the block for the master (ESCAPE_ABOVE in Python).
// The float64 bound is the largest finite double: only a difference that overflowed escapes.
template <typename acc_t> constexpr acc_t escape_above();
template <> constexpr float escape_above<float>() { return 281474976710656.0f; }  // 2^48
template <> constexpr double escape_above<double>() { return std::numeric_limits<double>::max(); }

template <typename acc_t>
inline bool stays_in_block(acc_t d) {  // false for NaN and +-Inf too: they compare false
  return std::abs(d) <= escape_above<acc_t>();
}

// One tensor's state, as the loops see it.
template <typename value_t, typename acc_t>
struct State {
  const value_t* v;
  int32_t* skip;
  acc_t *mean, *m2, *shift;            // the block
  double *g_mean, *g_m2, *g_count;     // the master
};

// Chan's merge (lrfluct_fast/chan.py) of (n_b, mean_b, m2_b) into element e's master.
template <typename value_t, typename acc_t>
inline void merge_into_master(const State<value_t, acc_t>& s, int64_t e, double n_b, double mean_b,
                              double m2_b) {
  const double n_a = s.g_count[e], n = n_a + n_b;
  const double w = n_b / (n == 0 ? 1.0 : n), delta = mean_b - s.g_mean[e];
  s.g_mean[e] += delta * w;
  s.g_m2[e] += m2_b + delta * (n_a * w) * delta;
  s.g_count[e] = n;
}

struct Moved {
  int64_t skipped = 0, escaped = 0;
};

// Every case of one element: its block closed at a block start (`opens`), a non-finite value
// skipped, the first value of a block, a value escaping to the master, Welford. `held` is the
// block's count before this call. Scalar: it serves block starts, dirty tensors and the rare
// elements the vector loop leaves alone.
template <typename value_t, typename acc_t>
inline void update_element(const State<value_t, acc_t>& s, int64_t e, int64_t held, bool opens,
                           Moved& moved) {
  const acc_t x = static_cast<acc_t>(s.v[e]);
  if (opens) {
    if (held > 0)
      merge_into_master(s, e, double(held), double(s.shift[e]) + double(s.mean[e]), double(s.m2[e]));
    s.mean[e] = s.m2[e] = acc_t(0);
    held = 0;
  }
  if (!((x - x) == acc_t(0))) {  // NaN or +-Inf
    s.skip[e] += 1;
    moved.skipped += 1;
    return;
  }
  if (held == 0) {
    s.shift[e] = x;
    s.mean[e] = s.m2[e] = acc_t(0);
    return;
  }
  const acc_t d = x - s.shift[e];
  if (!stays_in_block(d)) {
    merge_into_master(s, e, double(held), double(s.shift[e]) + double(s.mean[e]), double(s.m2[e]));
    merge_into_master(s, e, 1.0, double(x), 0.0);
    s.mean[e] = s.m2[e] = acc_t(0);
    moved.escaped += 1;
    return;
  }
  const acc_t delta = d - s.mean[e];
  const acc_t mean_new = s.mean[e] + delta / static_cast<acc_t>(held + 1);
  s.m2[e] += delta * (d - mean_new);
  s.mean[e] = mean_new;
}

// The common call: a clean tensor inside a block (every element holds `held` values, its shift
// set). Branch-free in the state's dtype, so it vectorises (10x faster than double arithmetic):
// reads v, shift, mean, M2 and writes mean, M2 (24 bytes per float32 element). A non-finite or
// escaping value leaves its element as it is here and makes the result nonzero; the rare chunk
// with one finishes it in update_element.
template <typename value_t, typename acc_t>
LRFLUCT_SIMD_CLONES int welford_clean(const value_t* __restrict__ v, const acc_t* __restrict__ shift,
                                      acc_t* __restrict__ mean, acc_t* __restrict__ m2,
                                      int64_t held, int64_t e0, int64_t e1) {
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(held + 1);
  int left = 0;  // a flag in the vector's own lanes
  for (int64_t e = e0; e < e1; ++e) {
    const acc_t mean_old = mean[e];
    const acc_t diff = static_cast<acc_t>(v[e]) - shift[e];
    const bool in = stays_in_block(diff);  // false for a non-finite v too
    const acc_t d = in ? diff : mean_old;  // delta 0: the element stays as it is
    const acc_t delta = d - mean_old;
    const acc_t mean_new = mean_old + delta * inv_count;
    mean[e] = mean_new;
    m2[e] = m2[e] + delta * (d - mean_new);
    left |= !in;
  }
  return left;
}

template <typename value_t, typename acc_t>
Moved update_chunk(const State<value_t, acc_t>& s, const int64_t* tally, int64_t flush_every,
                   int64_t e0, int64_t e1) {
  const int64_t calls = tally[kCalls], in_block = calls - tally[kFlushed];
  const bool opens = in_block >= flush_every;
  const bool dirty = tally[kSkipped] + tally[kEscaped] > 0;
  Moved moved;
  if (!dirty && !opens && in_block > 0) {
    if (welford_clean(s.v, s.shift, s.mean, s.m2, in_block, e0, e1) == 0) return moved;
    for (int64_t e = e0; e < e1; ++e)
      if (!stays_in_block(static_cast<acc_t>(s.v[e]) - s.shift[e])) update_element(s, e, in_block, false, moved);
    return moved;
  }
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t held = dirty ? calls - s.skip[e] - static_cast<int64_t>(s.g_count[e]) : in_block;
    update_element(s, e, held, opens, moved);
  }
  return moved;
}

// One tensor of a validated list, as raw pointers: what a call reads of it.
struct Entry {
  at::ScalarType value_type, state_type;
  int64_t n;
  const void* v;
  int32_t* skip;
  void* moments;   // [3, n] of state_type
  double* master;  // [3, n]
  int64_t* tally;  // [4]
};

// A validated list: its entries, where each starts among the list's elements, and the tensors
// that keep the pointers valid.
struct Prepared {
  std::vector<Entry> entries;
  std::vector<int64_t> starts{0};  // entry i holds elements [starts[i], starts[i + 1])
  std::vector<at::Tensor> keep;
};

Prepared prepare(at::TensorList values, at::TensorList tallies, at::TensorList skipped,
                 at::TensorList moments, at::TensorList masters) {
  TORCH_CHECK_VALUE(!values.empty(), "values must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(tallies.size() == values.size() && skipped.size() == values.size() &&
                        moments.size() == values.size() && masters.size() == values.size(),
      "values, tallies, skipped, moments and masters must have the same length, got ",
      values.size(), ", ", tallies.size(), ", ", skipped.size(), ", ", moments.size(), ", ",
      masters.size());
  Prepared p;
  for (size_t i = 0; i < values.size(); ++i) {
    const at::Tensor &v = values[i], &m = moments[i], &g = masters[i];
    const bool ok = is_float_input(v.scalar_type()) && v.device().is_cpu() &&
        state_ok(tallies[i], {4}, {at::kLong}, v.device()) &&
        state_ok(skipped[i], v.sizes(), {at::kInt}, v.device()) &&
        m.dim() == v.dim() + 1 && m.size(0) == 3 && m.sizes().slice(1) == v.sizes() &&
        state_ok(m, m.sizes(), {at::kFloat, at::kDouble}, v.device()) &&
        state_ok(g, m.sizes(), {at::kDouble}, v.device());
    if (!ok) {  // the same checks again, to say which argument is wrong and how
      const std::string idx = "[" + std::to_string(i) + "]";
      check_float_input(("values" + idx).c_str(), v);
      check_state("tallies" + idx, tallies[i], {4}, {at::kLong}, v.device());
      check_state("skipped" + idx, skipped[i], v.sizes(), {at::kInt}, v.device());
      std::vector<int64_t> mshape{3};
      mshape.insert(mshape.end(), v.sizes().begin(), v.sizes().end());
      check_state("moments" + idx, m, mshape, {at::kFloat, at::kDouble}, v.device());
      check_state("masters" + idx, g, mshape, {at::kDouble}, v.device());
    }
    const at::Tensor cv = v.contiguous();
    p.entries.push_back({cv.scalar_type(), m.scalar_type(), cv.numel(), cv.data_ptr(),
                         skipped[i].data_ptr<int32_t>(), m.data_ptr(), g.data_ptr<double>(),
                         tallies[i].data_ptr<int64_t>()});
    p.starts.push_back(p.starts.back() + cv.numel());
    for (const at::Tensor& t : {cv, tallies[i], skipped[i], m, g}) p.keep.push_back(t);
  }
  return p;
}

Moved update_entry(const Entry& en, int64_t flush_every, int64_t e0, int64_t e1) {
  Moved moved;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, en.value_type, "temporal_update", [&] {
    using value_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(en.state_type, "temporal_update_state", [&] {
      const int64_t n = en.n;
      scalar_t* m = static_cast<scalar_t*>(en.moments);
      double* g = en.master;
      const State<value_t, scalar_t> s{static_cast<const value_t*>(en.v), en.skip,
                                       m + kMean * n, m + kM2 * n, m + kShift * n,
                                       g + kMasterMean * n, g + kMasterM2 * n, g + kMasterCount * n};
      moved = update_chunk(s, en.tally, flush_every, e0, e1);
    });
  });
  return moved;
}

// One call over a validated list; flush_every is checked here, before any state changes. The
// threads split the list's elements evenly, across tensor boundaries: fixed chunks of 65,536
// gave one thread 5 of the autoencoder list's 9. Skipped and escaped values are rare; their
// counts are added under a lock.
void update_list(const Prepared& p, int64_t flush_every) {
  TORCH_CHECK_VALUE(flush_every >= 1 && flush_every <= kMaxFlushEvery,
      "flush_every must be an integer from 1 to ", kMaxFlushEvery, ", got ", flush_every);
  const std::vector<Entry>& entries = p.entries;
  const std::vector<int64_t>& starts = p.starts;
  std::vector<Moved> entry_moved(entries.size());
  std::mutex moved_lock;
  const int64_t elements = starts.back();
  at::parallel_for(0, elements, elements < kMinParallelElements ? elements : kChunk,
                   [&](int64_t b, int64_t end) {
    size_t i = std::upper_bound(starts.begin(), starts.end(), b) - starts.begin() - 1;
    for (; b < end; ++i) {
      const int64_t e0 = b - starts[i], e1 = std::min(entries[i].n, end - starts[i]);
      b = starts[i] + e1;
      if (e0 >= e1) continue;  // an empty tensor
      const Moved moved = update_entry(entries[i], flush_every, e0, e1);
      if (moved.skipped + moved.escaped > 0) {
        std::lock_guard<std::mutex> guard(moved_lock);
        entry_moved[i].skipped += moved.skipped;
        entry_moved[i].escaped += moved.escaped;
      }
    }
  });
  // Tallies change only after every element has read them.
  for (size_t i = 0; i < entries.size(); ++i) {
    int64_t* tally = entries[i].tally;
    tally[kSkipped] += entry_moved[i].skipped;
    tally[kEscaped] += entry_moved[i].escaped;
    if (tally[kCalls] - tally[kFlushed] >= flush_every) tally[kFlushed] = tally[kCalls];
    tally[kCalls] += 1;
  }
}

void temporal_update_cpu(at::TensorList values, at::TensorList tallies, at::TensorList skipped,
                         at::TensorList moments, at::TensorList masters, int64_t flush_every) {
  update_list(prepare(values, tallies, skipped, moments, masters), flush_every);
}

// weight_mode="neuron": each neuron's RMS incoming weight, sqrt(mean of w^2 over every axis of
// w but the neurons' one), as LayerState.weight_observation computes it with torch ops, here
// in one read of w summed in double (the torch path sums in float32) and rounded once to the
// float32 the state records. w is contiguous, seen as [before, n, after]; a neuron with no
// incoming weight has no RMS (0 / 0 = nan, counted as non-finite).
struct RowRms {
  at::Tensor w, out;  // out: float32 [n]
  int64_t before = 1, n = 1, after = 1;
};

template <typename T>
LRFLUCT_SIMD_CLONES double sum_of_squares(const T* __restrict__ x, int64_t len) {
  constexpr int kLanes = 16;  // independent partial sums: the loop vectorises, 4 FMA chains
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const double v = static_cast<double>(x[i + k]);
      lanes[k] += v * v;
    }
  double total = 0.0;
  for (; i < len; ++i) total += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  for (double lane : lanes) total += lane;
  return total;
}

template <typename T>
LRFLUCT_SIMD_CLONES void add_squares(const T* __restrict__ x, double* __restrict__ acc, int64_t len) {
  for (int64_t j = 0; j < len; ++j) acc[j] += static_cast<double>(x[j]) * static_cast<double>(x[j]);
}

// Most row chunks a weight with its neurons along the last axis is cut into: a fixed cut (not
// one per thread), so the sums are the same bits whatever the thread count.
constexpr int64_t kRmsChunks = 16;

void row_rms(const RowRms& r) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.w.scalar_type(), "row_rms", [&] {
    const scalar_t* w = r.w.data_ptr<scalar_t>();
    float* out = r.out.data_ptr<float>();
    const double fan_in = double(r.before) * double(r.after);
    const auto finish = [&](int64_t j, double sum) {
      out[j] = static_cast<float>(std::sqrt(sum / fan_in));
    };
    if (r.after == 1) {  // neurons along the last axis (an embedding table's columns): rows
      // of n streamed into n double sums per chunk of rows, the chunks added in order
      const int64_t chunks = std::clamp<int64_t>(r.before * r.n / kChunk, 1, kRmsChunks);
      const int64_t rows = (r.before + chunks - 1) / chunks;
      std::vector<double> partial(chunks * r.n, 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t b = c * rows; b < std::min(r.before, (c + 1) * rows); ++b)
            add_squares(w + b * r.n, partial.data() + c * r.n, r.n);
      });
      for (int64_t j = 0; j < r.n; ++j) {
        double sum = 0.0;
        for (int64_t c = 0; c < chunks; ++c) sum += partial[c * r.n + j];
        finish(j, sum);
      }
      return;
    }
    // a contiguous run of `after` values per neuron and b (a Linear's rows): neurons split
    const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, r.before * r.after));
    at::parallel_for(0, r.n, grain, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        double sum = 0.0;
        for (int64_t b = 0; b < r.before; ++b) sum += sum_of_squares(w + (b * r.n + j) * r.after, r.after);
        finish(j, sum);
      }
    });
  });
}

// Monitor.step's CPU path (lrfluct_fast/monitor.py, _StepPlan.native_plan): a list validated
// once and kept with the parameters it reads in place. A call checks that each watched module
// attribute still holds the same parameter with the same storage and dtype (_StepPlan.valid's
// checks, on raw objects), computes the per-neuron RMS weights into their buffers (the last
// values of the list), then updates from the kept pointers: no list of tensors crosses from
// Python and no tensor is validated again.
struct TemporalPlan {
  struct Watch {
    pybind11::dict owner;  // the module's _parameters
    pybind11::str name;
    pybind11::object param;
    at::Tensor tensor;     // the parameter's own TensorImpl: `p.data = x` changes its storage
    const void* data;
    at::ScalarType dtype;
  };
  Prepared prepared;
  std::vector<Watch> watches;
  std::vector<RowRms> rms;

  bool run(int64_t flush_every) {
    for (const Watch& w : watches) {
      PyObject* now = PyDict_GetItemWithError(w.owner.ptr(), w.name.ptr());
      if (now == nullptr && PyErr_Occurred()) throw pybind11::error_already_set();
      if (now != w.param.ptr() || w.tensor.data_ptr() != w.data || w.tensor.scalar_type() != w.dtype)
        return false;
    }
    for (const RowRms& r : rms) row_rms(r);
    update_list(prepared, flush_every);
    return true;
  }
};

}  // namespace

void bind_temporal_plan(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<TemporalPlan>(m, "TemporalPlan",
      "temporal_update over a fixed list, validated once (csrc/temporal_update.cpp)")
      .def(py::init([](const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& tallies,
                       const std::vector<at::Tensor>& skipped, const std::vector<at::Tensor>& moments,
                       const std::vector<at::Tensor>& masters, const py::list& watch,
                       const py::list& rms) {
             auto plan = std::make_unique<TemporalPlan>();
             // kept pointers: a strided value would be read through a copy made here, once
             for (size_t i = 0; i < values.size(); ++i)
               TORCH_CHECK_VALUE(values[i].is_contiguous(), "TemporalPlan: values[", i,
                                 "] must be contiguous (it is read in place at every run)");
             TORCH_CHECK_VALUE(rms.size() <= values.size(), "TemporalPlan: ", rms.size(),
                               " RMS weights for ", values.size(), " values");
             const size_t first_rms = values.size() - rms.size();
             for (size_t i = 0; i < rms.size(); ++i) {
               const auto t = rms[i].cast<py::tuple>();
               RowRms r;
               r.w = t[0].cast<at::Tensor>();
               const int64_t axis = t[1].cast<int64_t>();
               r.out = t[2].cast<at::Tensor>();
               const std::string what = "TemporalPlan: rms[" + std::to_string(i) + "]";
               check_float_input((what + "'s weight").c_str(), r.w);
               TORCH_CHECK_VALUE(r.w.device().is_cpu() && r.w.is_contiguous() && r.w.dim() >= 1 &&
                                     axis >= 0 && axis < r.w.dim(),
                   what, ": needs a contiguous CPU weight of rank >= 1 and a neuron axis in it, "
                   "got ", r.w.sizes(), " on ", r.w.device(), " and axis ", axis);
               r.n = r.w.size(axis);
               for (int64_t d = 0; d < axis; ++d) r.before *= r.w.size(d);
               for (int64_t d = axis + 1; d < r.w.dim(); ++d) r.after *= r.w.size(d);
               TORCH_CHECK_VALUE(r.out.is_same(values[first_rms + i]) &&
                                     r.out.scalar_type() == at::kFloat && r.out.dim() == 1 &&
                                     r.out.size(0) == r.n,
                   what, ": its buffer must be values[", first_rms + i, "], float32 [", r.n, "]");
               plan->rms.push_back(std::move(r));
             }
             plan->prepared = prepare(values, tallies, skipped, moments, masters);
             for (py::handle item : watch) {
               const auto t = item.cast<py::tuple>();
               const at::Tensor tensor = t[2].cast<at::Tensor>();
               plan->watches.push_back({t[0].cast<py::dict>(), t[1].cast<py::str>(),
                                        py::reinterpret_borrow<py::object>(t[2]), tensor,
                                        tensor.data_ptr(), tensor.scalar_type()});
             }
             return plan;
           }),
           py::arg("values"), py::arg("tallies"), py::arg("skipped"), py::arg("moments"),
           py::arg("masters"), py::arg("watch"), py::arg("rms") = py::list(),
           "watch: (module._parameters, name, parameter) per parameter read in place; rms: "
           "(weight, neuron axis, buffer) per per-neuron RMS weight, whose buffers are the last "
           "values, in order")
      .def("run", &TemporalPlan::run, py::arg("flush_every"),
           "one temporal_update call; False (nothing updated) when a watched parameter was "
           "replaced, moved or cast");
}

void register_temporal_update(torch::Library& m) { m.impl("temporal_update", &temporal_update_cpu); }

}  // namespace lrfluct
