// batch_stats on CPU: per-column finite count, mean, M2, positive count and non-finite count of
// a [R, N] (or [B, N, S]) tensor, in one pass over it, as float64 moments.
//
// Design: each column is shifted by its first finite value (returned as the SHIFT row, so the
// moments stay relative to it; see lrfluct_fast/ops/_library.py), then sum(d) and sum(d^2) of the
// shifted values d are accumulated in double (after 8-row tiles summed pairwise in float).
// Shifted sums over row chunks with the same shift simply add, so the tensor is cut into (row
// chunk x column block) tasks for the threads and reduced at the end; the shift keeps
// M2 = sum(d^2) - sum(d)^2/n free of cancellation for data far from zero (mean 1e4, std 1).
// Each task first runs a clean pass that takes every value as finite (no mask, no count); only
// a block whose sums come out non-finite is read again with the mask. Activations and gradients
// are almost always finite, so each input byte is read once. A contiguous conv output [B, N, S]
// is read in place, as B x N runs of S values summed in vector lanes (accumulate_run), not
// copied to rows.
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace lrfluct {
namespace {

// Columns per task. Whole rows of up to 8192 columns stream contiguously (a narrower block
// reads a short run per row at a large stride, which defeats the hardware prefetcher: 512
// columns ran 1.6x slower on 4096x4096); the 4 x 8192 double accumulators (256 KiB) sit in L2.
constexpr int64_t kBlockCols = 8192;
// With too few rows to give every thread a chunk of at least 256 rows, the columns are split
// further, down to blocks of this many (1 KiB runs of float32 per row).
constexpr int64_t kMinBlockCols = 256;

struct Sums {  // per-column partial sums of one row chunk, all in double (counts exact < 2^53)
  double* __restrict__ s1; double* __restrict__ s2;
  double* __restrict__ count; double* __restrict__ positive;
};

// Where element (row r, column j) of the [R, N] rows view lies: a [R, N] tensor (S == 1), or a
// contiguous [B, N, S] one whose rows are r = b * S + s (a conv output), read in place.
struct Layout {
  int64_t R, N, S;
  int64_t at(int64_t r, int64_t j) const {
    return S == 1 ? r * N + j : (r / S) * N * S + j * S + r % S;
  }
};

// One step of the accumulation for one column: U rows' contributions, summed pairwise in float
// (double for double input) and then added to the double accumulators, or written to them for
// the first step of a task (kInit: the partial sums need no zero-fill). The shifted values are
// exact in float near the shift, and a pairwise tile of 8 adds at most 3 float roundings to a
// term, as many as a sequential tile of 4, at half the accumulator traffic.
//
// kMasked: non-finite values are skipped and the finite ones counted. Without it (the clean
// pass) every value is taken as finite, which saves the mask and the count; a non-finite value
// then makes s1 or s2 non-finite, which is how the caller sees that it must redo the block
// masked.
// The masked pass computes in double: it also serves blocks whose float squares overflowed
// (data beyond ~1e19), and double holds the squares of any float32 value.
//
// tile_sums: the sums of U rows of one column from row r, as a balanced tree of pairs, built
// depth first so few values are live at once. Both are inlined whole, or the column loops do
// not vectorise (with half-precision loads they exceed GCC's inlining budget).
template <typename T>
struct Tile {
  T s1, s2, count, positive;
};

template <int U, bool kMasked, typename compute_t, typename scalar_t>
[[gnu::always_inline]] inline Tile<compute_t> tile_sums(const scalar_t* __restrict__ x, int64_t N, int64_t r, int64_t j,
                                 compute_t sj) {
  if constexpr (U == 1) {
    const compute_t v = static_cast<compute_t>(x[r * N + j]);
    if constexpr (kMasked) {
      const bool finite = (v - v) == compute_t(0);  // false for NaN and +-Inf
      const compute_t d = finite ? v - sj : compute_t(0);
      return {d, d * d, finite ? compute_t(1) : compute_t(0),
              (finite & (v > compute_t(0))) ? compute_t(1) : compute_t(0)};
    } else {
      const compute_t d = v - sj;
      return {d, d * d, compute_t(1), v > compute_t(0) ? compute_t(1) : compute_t(0)};
    }
  } else {
    const Tile<compute_t> a = tile_sums<U / 2, kMasked>(x, N, r, j, sj);
    const Tile<compute_t> b = tile_sums<U / 2, kMasked>(x, N, r + U / 2, j, sj);
    return {a.s1 + b.s1, a.s2 + b.s2, a.count + b.count, a.positive + b.positive};
  }
}

template <int U, bool kMasked, bool kInit, typename scalar_t>
[[gnu::always_inline]] inline void accumulate_column(const scalar_t* __restrict__ x, int64_t N, int64_t r, int64_t j,
                              const double* __restrict__ shift, Sums out) {
  using compute_t =
      std::conditional_t<kMasked || std::is_same_v<scalar_t, double>, double, float>;
  const compute_t sj = static_cast<compute_t>(shift[j]);  // exact: the shift is an input value
  const Tile<compute_t> t = tile_sums<U, kMasked>(x, N, r, j, sj);
  if (kInit) {
    out.s1[j] = t.s1; out.s2[j] = t.s2; out.positive[j] = t.positive;
    if (kMasked) out.count[j] = t.count;
  } else {
    out.s1[j] += t.s1; out.s2[j] += t.s2; out.positive[j] += t.positive;
    if (kMasked) out.count[j] += t.count;
  }
}

// Rows are streamed (contiguous loads), eight at a time so each accumulator is loaded and
// stored once per eight rows; the loop over columns vectorises. The first step writes the
// task's partial sums (the count row too, when masked), so they need no zero-fill.
template <bool kMasked, typename scalar_t>
LRFLUCT_SIMD_CLONES void accumulate_rows(const scalar_t* __restrict__ x, int64_t N, int64_t r0,
                                         int64_t r1, int64_t c0, int64_t c1,
                                         const double* __restrict__ shift, Sums out) {
  constexpr int kRows = 8;
  int64_t r = r0;
  if (r + kRows <= r1) {
    for (int64_t j = c0; j < c1; ++j)
      accumulate_column<kRows, kMasked, true>(x, N, r, j, shift, out);
    r += kRows;
  } else if (r < r1) {
    for (int64_t j = c0; j < c1; ++j) accumulate_column<1, kMasked, true>(x, N, r, j, shift, out);
    r += 1;
  } else {  // no row
    for (double* row : {out.s1, out.s2, out.count, out.positive})
      std::fill(row + c0, row + c1, 0.0);
  }
  for (; r + kRows <= r1; r += kRows)
    for (int64_t j = c0; j < c1; ++j)
      accumulate_column<kRows, kMasked, false>(x, N, r, j, shift, out);
  for (; r < r1; ++r)
    for (int64_t j = c0; j < c1; ++j) accumulate_column<1, kMasked, false>(x, N, r, j, shift, out);
}

// One task: rows [r0, r1) of columns [c0, c1), written to the chunk's partial sums. The clean
// pass runs first; a block whose sums come out non-finite (it holds a NaN or Inf, or squares
// overflow float) is redone masked.
template <typename scalar_t>
void accumulate_block(const scalar_t* x, int64_t N, int64_t r0, int64_t r1, int64_t c0,
                      int64_t c1, const double* shift, Sums out) {
  accumulate_rows<false>(x, N, r0, r1, c0, c1, shift, out);
  bool clean = true;
  for (int64_t j = c0; j < c1; ++j) clean &= std::isfinite(out.s1[j] + out.s2[j]);
  if (clean) {
    std::fill(out.count + c0, out.count + c1, static_cast<double>(r1 - r0));
    return;
  }
  accumulate_rows<true>(x, N, r0, r1, c0, c1, shift, out);
}

// A [B, N, S] tensor is read as B x N contiguous runs of S values, run (b, j) holding column
// j's rows b * S .. b * S + S - 1. A run is summed in one 32-byte vector of lanes (8 float or
// 4 double; GCC/Clang vector extensions, a plain loop elsewhere), in tiles of kTile values
// per lane added to double lanes: at most 3 float roundings per term, as accumulate_column's.
template <bool kMasked, typename scalar_t>
LRFLUCT_SIMD_CLONES void accumulate_run(const scalar_t* __restrict__ x, int64_t S, double shift,
                                        Sums out, int64_t j) {
  using compute_t =
      std::conditional_t<kMasked || std::is_same_v<scalar_t, double>, double, float>;
  const compute_t sj = static_cast<compute_t>(shift);
  double a1 = 0, a2 = 0, ac = 0, ap = 0;
  int64_t s = 0;
#if defined(__GNUC__)
  using V = typename Lanes<compute_t>::type;
  constexpr int kW = 32 / sizeof(compute_t), kTile = 4;
  double d1[kW] = {}, d2[kW] = {}, dc[kW] = {}, dp[kW] = {};
  const V zero = {}, one = zero + compute_t(1), sv = zero + sj;
  for (; s + kW * kTile <= S; s += kW * kTile) {
    V t1 = zero, t2 = zero, tc = zero, tp = zero;
    for (int u = 0; u < kTile; ++u) {
      V v;
      if constexpr (std::is_same_v<scalar_t, compute_t>) {
        std::memcpy(&v, x + s + u * kW, sizeof(V));
      } else {
        for (int k = 0; k < kW; ++k) v[k] = static_cast<compute_t>(x[s + u * kW + k]);
      }
      if constexpr (kMasked) {
        const auto finite = (v - v) == zero;  // false for NaN and +-Inf
        const V d = finite ? v - sv : zero;
        t1 += d; t2 += d * d;
        tc += finite ? one : zero;
        tp += (finite && v > zero) ? one : zero;
      } else {
        const V d = v - sv;
        t1 += d; t2 += d * d;
        tp += v > zero ? one : zero;
      }
    }
    for (int k = 0; k < kW; ++k) {
      d1[k] += t1[k]; d2[k] += t2[k]; dp[k] += tp[k];
      if (kMasked) dc[k] += tc[k];
    }
  }
  for (int k = 0; k < kW; ++k) { a1 += d1[k]; a2 += d2[k]; ac += dc[k]; ap += dp[k]; }
#endif
  for (; s < S; ++s) {
    const compute_t v = static_cast<compute_t>(x[s]);
    const bool finite = !kMasked || (v - v) == compute_t(0);
    const compute_t d = finite ? v - sj : compute_t(0);
    a1 += d; a2 += static_cast<double>(d) * d;
    ac += finite ? 1.0 : 0.0;
    ap += finite && v > compute_t(0) ? 1.0 : 0.0;
  }
  out.s1[j] += a1; out.s2[j] += a2; out.positive[j] += ap;
  if (kMasked) out.count[j] += ac;
}

// One task of a [B, N, S] tensor: batches [b0, b1) of columns [c0, c1), clean pass first as in
// accumulate_block.
template <typename scalar_t>
void accumulate_runs(const scalar_t* x, const Layout& at_, int64_t b0, int64_t b1, int64_t c0,
                     int64_t c1, const double* shift, Sums out) {
  const int64_t N = at_.N, S = at_.S;
  for (double* row : {out.s1, out.s2, out.count, out.positive}) std::fill(row + c0, row + c1, 0.0);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t j = c0; j < c1; ++j)
      accumulate_run<false>(x + (b * N + j) * S, S, shift[j], out, j);
  bool clean = true;
  for (int64_t j = c0; j < c1; ++j) clean &= std::isfinite(out.s1[j] + out.s2[j]);
  if (clean) {
    std::fill(out.count + c0, out.count + c1, static_cast<double>((b1 - b0) * S));
    return;
  }
  for (double* row : {out.s1, out.s2, out.count, out.positive}) std::fill(row + c0, row + c1, 0.0);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t j = c0; j < c1; ++j)
      accumulate_run<true>(x + (b * N + j) * S, S, shift[j], out, j);
}

// Each column's shift: its first finite value (0 for a column with none). Row 0 is almost always
// finite: it is checked in one vectorised pass and taken whole; only otherwise is each column
// searched.
template <typename scalar_t>
LRFLUCT_SIMD_CLONES void first_finite(const scalar_t* x, const Layout& at_, double* shift) {
  const int64_t N = at_.N;
  if (at_.S == 1 && at_.R > 0) {
    int nonfinite = 0;  // an int OR, which vectorises (a bool AND does not)
    for (int64_t j = 0; j < N; ++j) {
      const double v = static_cast<double>(x[j]);
      shift[j] = v;
      nonfinite |= !((v - v) == 0.0);  // NaN and +-Inf
    }
    if (!nonfinite) return;
  }
  const int64_t grain = at_.R * N < kMinParallelElements ? N : 1024;
  at::parallel_for(0, N, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      shift[j] = 0.0;
      for (int64_t r = 0; r < at_.R; ++r) {
        const double v = static_cast<double>(x[at_.at(r, j)]);
        if (std::isfinite(v)) { shift[j] = v; break; }
      }
    }
  });
}

// Column j again, for float64 data whose squares overflow double: two passes on values shifted
// and scaled by a power of two (exact) that keeps them below 2. M2 comes out inf only when the
// true M2 exceeds double.
template <typename scalar_t>
void scaled_column(const scalar_t* x, const Layout& at_, int64_t j, double shift,
                   double n, double* mean_shifted, double* m2) {
  const int64_t R = at_.R;
  double big = std::abs(shift);
  for (int64_t r = 0; r < R; ++r) {
    const double v = static_cast<double>(x[at_.at(r, j)]);
    if (std::isfinite(v)) big = std::max(big, std::abs(v));
  }
  const double sc = big > 0 ? std::ldexp(1.0, -std::ilogb(big) - 1) : 1.0;
  double s1 = 0;
  for (int64_t r = 0; r < R; ++r) {
    const double v = static_cast<double>(x[at_.at(r, j)]);
    if (std::isfinite(v)) s1 += v * sc - shift * sc;
  }
  const double mean = s1 / n;
  double s2 = 0;
  for (int64_t r = 0; r < R; ++r) {
    const double v = static_cast<double>(x[at_.at(r, j)]);
    if (std::isfinite(v)) s2 += (v * sc - shift * sc - mean) * (v * sc - shift * sc - mean);
  }
  *mean_shifted = mean / sc;
  *m2 = s2 / sc / sc;
}

// Columns [j0, j1) of the output from the row chunks' partial sums (added into chunk 0's, in
// chunk order), with no branch, so the loops vectorise. A column whose sums overflowed is then
// redone by the caller.
LRFLUCT_SIMD_CLONES void finish_columns(double* __restrict__ partial, int64_t row_chunks,
                                        int64_t R, int64_t N, int64_t j0, int64_t j1,
                                        const double* __restrict__ shift,
                                        int64_t* __restrict__ counts,
                                        double* __restrict__ moments) {
  for (int64_t c = 1; c < row_chunks; ++c)
    for (int64_t row = 0; row < 4; ++row)
      for (int64_t j = j0; j < j1; ++j) partial[row * N + j] += partial[(c * 4 + row) * N + j];
  for (int64_t j = j0; j < j1; ++j) {
    const double s1 = partial[j], s2 = partial[N + j], n = partial[2 * N + j];
    const double mean_shifted = s1 / std::max(n, 1.0);  // s1 and the shift are 0 where n is 0
    moments[kMean * N + j] = mean_shifted;
    moments[kM2 * N + j] = std::max(0.0, s2 - s1 * mean_shifted);
    moments[kShift * N + j] = shift[j];
  }
  for (int64_t j = j0; j < j1; ++j) {  // apart: double to int64 does not vectorise before AVX-512
    const int64_t n = static_cast<int64_t>(partial[2 * N + j]);
    counts[kCount * N + j] = n;
    counts[kPositive * N + j] = static_cast<int64_t>(partial[3 * N + j]);
    counts[kNonfinite * N + j] = R - n;
  }
}

// Per-call scratch: a buffer kept by the calling thread and reused (no allocation and no page
// faults on the hot path) up to kKeptDoubles, a fresh one beyond (a 50257-wide head).
class Scratch {
 public:
  explicit Scratch(size_t n) {
    constexpr size_t kKeptDoubles = size_t(1) << 16;  // 512 KiB
    thread_local std::vector<double> kept;
    if (n > kKeptDoubles) {
      own_.resize(n);
      data_ = own_.data();
      return;
    }
    if (kept.size() < n) kept.resize(n);
    data_ = kept.data();
  }
  double* data() const { return data_; }

 private:
  std::vector<double> own_;
  double* data_;
};

template <typename scalar_t>
void batch_stats_kernel(const scalar_t* x, const Layout& at_, int64_t* counts, double* moments) {
  const int64_t R = at_.R, N = at_.N, S = at_.S;
  if (N == 0) return;  // no column: nothing to compute, and no task to size

  // Tasks: (row chunk x column block). Rows [R, N]: chunks of rows. Runs [B, N, S]: chunks of
  // whole batches (a run is contiguous whatever the column block).
  const int64_t want_tasks = R * N < kMinParallelElements ? 1 : 2 * at::get_num_threads();
  const int64_t units = S == 1 ? R : R / S, min_unit = S == 1 ? 256 : (256 + S - 1) / S;
  const int64_t wide_blocks = S == 1 ? (N + kBlockCols - 1) / kBlockCols : 1;
  const int64_t row_chunks = std::max<int64_t>(1, std::min<int64_t>(
      (want_tasks + wide_blocks - 1) / wide_blocks, (units + min_unit - 1) / min_unit));
  const int64_t min_block = S == 1 ? kMinBlockCols : 1;
  const int64_t blocks_wanted = std::max(wide_blocks, std::min(
      (want_tasks + row_chunks - 1) / row_chunks, (N + min_block - 1) / min_block));
  const int64_t align = S == 1 ? 64 : 1;  // whole cache lines of a row
  const int64_t block_cols = ((N + blocks_wanted - 1) / blocks_wanted + align - 1) / align * align;
  const int64_t col_blocks = (N + block_cols - 1) / block_cols;
  const int64_t chunk_units = (units + row_chunks - 1) / row_chunks;

  const Scratch scratch((1 + 4 * row_chunks) * N);
  double* const shift = scratch.data();
  double* const partial = shift + N;  // [row_chunks][4][N], each task writes its part whole
  first_finite(x, at_, shift);

  at::parallel_for(0, row_chunks * col_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / col_blocks, block = t % col_blocks;
      double* base = partial + chunk * 4 * N;
      Sums out{base, base + N, base + 2 * N, base + 3 * N};
      const int64_t c0 = block * block_cols, c1 = std::min(N, c0 + block_cols);
      const int64_t u0 = chunk * chunk_units, u1 = std::min(units, u0 + chunk_units);
      if (S == 1) accumulate_block(x, N, u0, u1, c0, c1, shift, out);
      else accumulate_runs(x, at_, u0, u1, c0, c1, shift, out);
    }
  });

  at::parallel_for(0, N, R * N < kMinParallelElements ? N : 2048, [&](int64_t j0, int64_t j1) {
    finish_columns(partial, row_chunks, R, N, j0, j1, shift, counts, moments);
    for (int64_t j = j0; j < j1; ++j) {
      // (a sum that overflows only in float64 is a needless redo: rare and still right)
      if (std::isfinite(partial[j] + partial[N + j])) continue;
      scaled_column(x, at_, j, shift[j], double(counts[kCount * N + j]), &moments[kMean * N + j],
                    &moments[kM2 * N + j]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& x) {
  check_batch_input(x);
  const int64_t N = x.size(1);
  at::Tensor counts = at::empty({3, N}, x.options().dtype(at::kLong));
  at::Tensor moments = at::empty({3, N}, x.options().dtype(at::kDouble));
  batch_stats_into(x, counts.data_ptr<int64_t>(), moments.data_ptr<double>());
  return {counts, moments};
}

}  // namespace

void check_batch_input(const at::Tensor& x) {
  check_float_input("x", x);
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3,
      "x must be a 2-D tensor [rows, neurons] or a 3-D [batch, neurons, rest], got ", x.dim(), "-D");
}

void batch_stats_into(const at::Tensor& x_in, int64_t* counts, double* moments) {
  // [B, N, S]: as a [B * S, N] view when its strides allow one (channels-last, S == 1); read in
  // place as runs of S values when S fills a vector tile (bench/RESULTS.md: 2.6-55x faster than
  // the copy at S = 64-4096, one thread); short runs (S < kMinRun) are copied to rows, which
  // measured faster than summing them (S = 16: 3.9 vs 2.6 GB/s).
  constexpr int64_t kMinRun = 32;
  at::Tensor x = x_in;
  Layout at_{x_in.size(0), x_in.size(1), 1};
  if (x_in.dim() == 3) {
    const int64_t B = x_in.size(0), N = x_in.size(1), S = x_in.size(2);
    const at::Tensor rows = x_in.transpose(1, 2);
    const bool view = rows.stride(2) == 1 && rows.stride(1) == N && rows.stride(0) == S * N;
    if (S == 1 || view || S < kMinRun) {
      x = rows.reshape({B * S, N});  // a view, or a copy of short runs
      at_ = Layout{B * S, N, 1};
    } else {
      x = x_in.contiguous();
      at_ = Layout{B * S, N, S};
    }
  }
  x = x.contiguous();  // a no-op but for strided [R, N] input
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_stats", [&] {
    batch_stats_kernel<scalar_t>(x.data_ptr<scalar_t>(), at_, counts, moments);
  });
}

void register_batch_stats(torch::Library& m) { m.impl("batch_stats", &batch_stats_cpu); }

}  // namespace lrfluct
