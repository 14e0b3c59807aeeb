// Observer: a wrapped layer's eager observation path, in C++.
//
// LayerState (lrfluct_fast/nn/layer_state.py) holds one Observer per layer whose neurons are
// one dim of its output. `observe(z)` returns None when this forward is not a training
// observation it can take (not observing, grad mode off, z needs no gradient or has no
// grad_fn, another device, dtype, rank or width, a torch.func transform, a forward-mode dual):
// the Python path then decides, explains or raises. Otherwise it computes z's activation
// statistics, keeps them on a pre-hook of z's own autograd node (the one that made z) and
// returns the layer's output: z itself, in the plain model's graph, with no node and no tensor
// added (an alias on z's own gradient edge where z is a view: see observe()).
//
// When a backward runs that node, the hook sees the gradients it is given (dL/dz after any
// hook on z) and, while the layer is live (not paused), merges the pending activation
// statistics and dL/dz's statistics into the running state, handing the gradients on
// unchanged. A node pre-hook runs only when its node runs, as the node this path used to add
// did: torch.autograd.grad(loss, z) alone, which stops at z, counts nothing. On CPU both are
// the kernels called directly on raw buffers (no dispatcher, no tensor between them); on
// other devices the dispatched ops (batch_stats forward, accumulate_stats backward: two
// launches each on a GPU). Same counting rule and results as nn/observe.py's Python function,
// which stays the path under torch.compile, for column blocks (attention) and with a
// GradScaler; the float64 reference (baselines.py) hooks the same node the same way.
#include <torch/extension.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <memory>

#include "common.h"

namespace lrfluct {
namespace {

using torch::autograd::variable_list;

struct Observer {
  at::Tensor act_counts, act_moments, grad_counts, grad_moments;  // undefined: not tracked
  int64_t neurons = 0;
  int64_t ndim = -1, dim = 0;  // z of rank `ndim` holds the neurons in dim `dim` (-1: unknown)
  c10::Device device = c10::Device(c10::kCPU);
  bool wide = false;           // the layer was instrumented as float64
  bool observing = true;       // forwards are observed (sampling, not paused)
  bool live = true;            // backwards merge (not paused)
};

// z as [R, N] (neurons last) or [B, N, S]: a view of any contiguous tensor, z itself for the
// common [R, N] (no tensor op on the hot path).
at::Tensor neuron_view(const at::Tensor& z, int64_t dim) {
  if (z.dim() == 2 && dim == 1) return z;
  int64_t before = 1, after = 1;
  for (int64_t d = 0; d < dim; ++d) before *= z.size(d);
  for (int64_t d = dim + 1; d < z.dim(); ++d) after *= z.size(d);
  if (after == 1) return z.reshape({before, z.size(dim)});
  return z.reshape({before, z.size(dim), after});
}

struct ObserveHook : public torch::autograd::FunctionPreHook {
  std::shared_ptr<Observer> obs;
  int64_t dim = 0;
  size_t index = 0;  // z's output_nr: its gradient's place among the node's inputs
  // this forward's activation statistics: raw on CPU, tensors elsewhere
  std::unique_ptr<int64_t[]> pending_counts;  // [3, N], written whole by batch_stats_into
  std::unique_ptr<double[]> pending_moments;
  at::Tensor pending_counts_t, pending_moments_t;

  variable_list operator()(const variable_list& grads) override {
    const Observer& o = *obs;
    // no dL/dz: this backward did not reach z (another output of the node), nothing counts
    if (!o.live || index >= grads.size() || !grads[index].defined()) return grads;
    const at::Tensor& grad_z = grads[index];
    at::NoGradGuard no_grad;  // statistics only: nothing here is part of a graph
    const bool act = o.act_counts.defined();
    const bool grad = o.grad_counts.defined();
    if (o.device.is_cpu()) {
      if (act)
        merge_into(o.act_counts.data_ptr<int64_t>(), o.act_moments.data_ptr<double>(),
                   pending_counts.get(), pending_moments.get(), o.neurons);
      if (grad)  // read only, under no_grad: no detached alias needed (one TensorImpl less)
        accumulate_into(neuron_view(grad_z, dim), o.grad_counts.data_ptr<int64_t>(),
                        o.grad_moments.data_ptr<double>());
    } else if (grad) {
      static auto accumulate = c10::Dispatcher::singleton()
          .findSchemaOrThrow("lrfluct::accumulate_stats", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&)>();
      const auto opt = [act](const at::Tensor& t) {
        return act ? c10::optional<at::Tensor>(t) : c10::nullopt;
      };
      accumulate.call(neuron_view(grad_z.detach(), dim), o.grad_counts, o.grad_moments,
                      opt(pending_counts_t), opt(pending_moments_t), opt(o.act_counts),
                      opt(o.act_moments));
    } else if (act) {
      static auto merge = c10::Dispatcher::singleton()
          .findSchemaOrThrow("lrfluct::merge_stats", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
      merge.call(o.act_counts, o.act_moments, pending_counts_t, pending_moments_t);
    }
    return grads;
  }
};

// functorch's transforms (grad, vmap, jvp) include this key while they run
bool in_functorch_transform() {
  return c10::impl::tls_local_dispatch_key_set().included_.has(
      c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

bool has_forward_grad(const at::Tensor& z) {
  const auto* meta = torch::autograd::impl::get_autograd_meta(z);
  return meta != nullptr && meta->fw_grad_ && !meta->fw_grad_->empty();
}

c10::optional<at::Tensor> observe(const std::shared_ptr<Observer>& obs, const at::Tensor& z) {
  const Observer& o = *obs;
  if (!o.observing || !at::GradMode::is_enabled() || !z.requires_grad() || z.dim() != o.ndim ||
      z.device() != o.device || z.size(o.dim) != o.neurons ||
      (z.scalar_type() == at::kDouble) != o.wide || !is_float_input(z.scalar_type()) ||
      in_functorch_transform() || has_forward_grad(z)) {
    return c10::nullopt;  // the Python path decides
  }
  const auto node = z.grad_fn();
  if (!node) return c10::nullopt;  // a leaf: the Python path gives it a node of its own
  auto hook = std::make_unique<ObserveHook>();
  hook->obs = obs;
  hook->dim = o.dim;
  hook->index = z.output_nr();
  if (o.act_counts.defined()) {
    at::NoGradGuard no_grad;
    const at::Tensor rows = neuron_view(z, o.dim);  // read only, under no_grad
    if (o.device.is_cpu()) {
      hook->pending_counts.reset(new int64_t[3 * o.neurons]);  // not zeroed: all written below
      hook->pending_moments.reset(new double[3 * o.neurons]);
      batch_stats_into(rows, hook->pending_counts.get(), hook->pending_moments.get());
    } else {
      static auto batch_stats = c10::Dispatcher::singleton()
          .findSchemaOrThrow("lrfluct::batch_stats", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
      std::tie(hook->pending_counts_t, hook->pending_moments_t) = batch_stats.call(rows);
    }
  }
  node->add_pre_hook(std::move(hook));
  if (!z.is_view()) return z;
  // An in-place op on a view (ReLU(inplace=True) after a Linear on [B, T, d], whose output is a
  // view) rewrites its base's history, and the view's node would never run: the layer hands out
  // an alias whose gradient edge is z's own instead, and in-place ops rebase the alias.
  at::Tensor out = z.detach();
  torch::autograd::impl::set_gradient_edge(out, torch::autograd::impl::gradient_edge(z));
  return out;
}

}  // namespace

void bind_observer(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Observer, std::shared_ptr<Observer>>(m, "Observer",
      "A layer's eager observation path (csrc/observe.cpp); LayerState owns one.")
      .def(py::init([](int64_t neurons, c10::Device device, bool wide,
                       c10::optional<at::Tensor> act_counts, c10::optional<at::Tensor> act_moments,
                       c10::optional<at::Tensor> grad_counts, c10::optional<at::Tensor> grad_moments) {
             auto o = std::make_shared<Observer>();
             o->neurons = neurons;
             o->device = device;
             o->wide = wide;
             if (act_counts) { o->act_counts = *act_counts; o->act_moments = *act_moments; }
             if (grad_counts) { o->grad_counts = *grad_counts; o->grad_moments = *grad_moments; }
             return o;
           }),
           py::arg("neurons"), py::arg("device"), py::arg("wide"), py::arg("act_counts"),
           py::arg("act_moments"), py::arg("grad_counts"), py::arg("grad_moments"))
      .def("observe", &observe, py::arg("z"),
           "the layer's output, observed (its statistics wait on a pre-hook of z's node): z, or "
           "an alias of a view z; None when the Python path must decide")
      .def("set_layout", [](Observer& o, int64_t ndim, int64_t dim) { o.ndim = ndim; o.dim = dim; },
           "outputs of rank `ndim` hold the neurons in dim `dim` (0 <= dim < ndim)")
      .def_readwrite("observing", &Observer::observing)
      .def_readwrite("live", &Observer::live)
      .def_readonly("ndim", &Observer::ndim);
}

}  // namespace lrfluct
