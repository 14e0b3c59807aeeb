// observe: Observe (lrfluct_fast/nn/observe.py) as a C++ autograd function, for eager mode.
// The identity on z, whose forward computes this forward's activation statistics and whose
// backward merges them and the statistics of dL/dz into the layer's running state, with no
// Python in between: a wrapped layer's fixed cost per step is the op calls, not the
// interpreter. Same results and counting rule as the Python function, which stays the path
// under torch.compile, for column blocks (attention) and with a GradScaler.
// The statistics ops are called through the dispatcher: C++ kernels on CPU, Triton on CUDA.
#include <torch/autograd.h>

#include "common.h"

namespace lrfluct {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// t as [rows, neurons]: the neuron dim moved last (a view for the last dim), the others rows.
at::Tensor neuron_rows(const at::Tensor& t, int64_t dim) {
  if (t.dim() == 1) return t.unsqueeze(0);
  const at::Tensor last = (dim == -1 || dim == t.dim() - 1) ? t : t.movedim(dim, -1);
  return last.flatten(0, -2);
}

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrfluct::batch_stats", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(x);
}

void merge_stats(const at::Tensor& counts, const at::Tensor& moments, const at::Tensor& b_counts,
                 const at::Tensor& b_moments) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrfluct::merge_stats", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&)>();
  op.call(counts, moments, b_counts, b_moments);
}

struct ObserveFunction : public torch::autograd::Function<ObserveFunction> {
  // act_*, grad_*: the layer's running state, used as `track` says (bit 0: activations,
  // bit 1: gradients; an untracked pair holds placeholders, since autograd takes no undefined
  // input); live: a 0-d bool CPU tensor, false inside Monitor.paused()
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z, int64_t dim, int64_t track,
                            const at::Tensor& act_counts, const at::Tensor& act_moments,
                            const at::Tensor& grad_counts, const at::Tensor& grad_moments,
                            const at::Tensor& live) {
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["track"] = track;
    ctx->saved_data["live"] = live;
    ctx->saved_data["state"] =
        std::vector<at::Tensor>{act_counts, act_moments, grad_counts, grad_moments};
    if (track & 1) {
      auto stats = batch_stats(neuron_rows(z.detach(), dim));
      ctx->saved_data["pending"] = std::vector<at::Tensor>{std::get<0>(stats), std::get<1>(stats)};
    }
    return z.detach();  // a new tensor: in-place ops after the layer stay allowed
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    if (ctx->saved_data["live"].toTensor().item<bool>()) {
      const auto state = ctx->saved_data["state"].toTensorVector();
      const int64_t track = ctx->saved_data["track"].toInt();
      if (track & 1) {
        const auto pending = ctx->saved_data["pending"].toTensorVector();
        merge_stats(state[0], state[1], pending[0], pending[1]);
      }
      if ((track & 2) && grad.defined()) {
        auto stats = batch_stats(neuron_rows(grad.detach(), ctx->saved_data["dim"].toInt()));
        merge_stats(state[2], state[3], std::get<0>(stats), std::get<1>(stats));
      }
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor observe(const at::Tensor& z, int64_t dim, const c10::optional<at::Tensor>& act_counts,
                   const c10::optional<at::Tensor>& act_moments,
                   const c10::optional<at::Tensor>& grad_counts,
                   const c10::optional<at::Tensor>& grad_moments, const at::Tensor& live) {
  TORCH_CHECK_VALUE(live.device().is_cpu() && live.scalar_type() == at::kBool && live.dim() == 0,
                    "live must be a 0-d bool tensor on cpu");
  TORCH_CHECK_VALUE(act_counts.has_value() == act_moments.has_value() &&
                        grad_counts.has_value() == grad_moments.has_value(),
                    "counts and moments come in pairs");
  const int64_t track = (act_counts ? 1 : 0) | (grad_counts ? 2 : 0);
  const auto get = [&](const c10::optional<at::Tensor>& t) { return t ? *t : live; };
  return ObserveFunction::apply(z, dim, track, get(act_counts), get(act_moments),
                                get(grad_counts), get(grad_moments), live);
}

}  // namespace

void register_observe(torch::Library& m) { m.impl("observe", &observe); }

}  // namespace lrfluct
