// Observer: a wrapped layer's eager observation path, with its autograd node in C++.
//
// LayerState (lrfluct_fast/nn/layer_state.py) holds one Observer per layer whose neurons are
// one dim of its output. `observe(z)` returns z itself when this forward is not a training
// observation it can take (not observing, grad mode off, z needs no gradient, another device,
// dtype, rank or width, a torch.func transform, a forward-mode dual): the Python path then
// decides, explains or raises. Otherwise it computes z's activation statistics, keeps them on
// a new node, and returns a detached alias of z whose grad_fn is that node. The node's backward
// passes dL/dz through unchanged and, while the layer is live (not paused), merges the pending
// activation statistics and dL/dz's statistics into the running state. On CPU both are the
// kernels called directly on raw buffers (no dispatcher, no tensor between them); on other
// devices the dispatched ops (batch_stats forward, accumulate_stats backward: two launches
// each on a GPU). Same counting rule and results as nn/observe.py's Python function, which
// stays the path under torch.compile, for column blocks (attention) and with a GradScaler.
#include <torch/extension.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
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

struct ObserveBackward : public torch::autograd::Node {
  std::shared_ptr<Observer> obs;
  int64_t dim = 0;
  // this forward's activation statistics: raw on CPU, tensors elsewhere
  std::unique_ptr<int64_t[]> pending_counts;  // [3, N], written whole by batch_stats_into
  std::unique_ptr<double[]> pending_moments;
  at::Tensor pending_counts_t, pending_moments_t;

  std::string name() const override { return "ObserveBackward"; }

  void release_variables() override {
    pending_counts_t.reset();
    pending_moments_t.reset();
  }

  variable_list apply(variable_list&& grads) override {
    const Observer& o = *obs;
    if (!o.live) return {grads[0]};
    at::NoGradGuard no_grad;  // statistics only: nothing here is part of a graph
    const bool act = o.act_counts.defined();
    const bool grad = o.grad_counts.defined() && grads[0].defined();
    if (o.device.is_cpu()) {
      if (act)
        merge_into(o.act_counts.data_ptr<int64_t>(), o.act_moments.data_ptr<double>(),
                   pending_counts.get(), pending_moments.get(), o.neurons);
      if (grad)  // read only, under no_grad: no detached alias needed (one TensorImpl less)
        accumulate_into(neuron_view(grads[0], dim), o.grad_counts.data_ptr<int64_t>(),
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
      accumulate.call(neuron_view(grads[0].detach(), dim), o.grad_counts, o.grad_moments,
                      opt(pending_counts_t), opt(pending_moments_t), opt(o.act_counts),
                      opt(o.act_moments));
    } else if (act) {
      static auto merge = c10::Dispatcher::singleton()
          .findSchemaOrThrow("lrfluct::merge_stats", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
      merge.call(o.act_counts, o.act_moments, pending_counts_t, pending_moments_t);
    }
    return {grads[0]};
  }
};

// functorch's transforms (grad, vmap, jvp) include this key while they run
bool in_functorch_transform() {
  return c10::impl::tls_local_dispatch_key_set().included_.has(
      c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// Nodes are held by shared_ptr up to torch 2.12 and by intrusive_ptr after.
template <typename T, typename Ptr = decltype(torch::autograd::Edge().function)>
auto make_node() {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

bool has_forward_grad(const at::Tensor& z) {
  const auto* meta = torch::autograd::impl::get_autograd_meta(z);
  return meta != nullptr && meta->fw_grad_ && !meta->fw_grad_->empty();
}

at::Tensor observe(const std::shared_ptr<Observer>& obs, const at::Tensor& z) {
  const Observer& o = *obs;
  if (!o.observing || !at::GradMode::is_enabled() || !z.requires_grad() || z.dim() != o.ndim ||
      z.device() != o.device || z.size(o.dim) != o.neurons ||
      (z.scalar_type() == at::kDouble) != o.wide || !is_float_input(z.scalar_type()) ||
      in_functorch_transform() || has_forward_grad(z)) {
    return z;  // the Python path decides
  }
  auto node = make_node<ObserveBackward>();
  node->obs = obs;
  node->dim = o.dim;
  if (o.act_counts.defined()) {
    at::NoGradGuard no_grad;
    const at::Tensor rows = neuron_view(z, o.dim);  // read only, under no_grad
    if (o.device.is_cpu()) {
      node->pending_counts.reset(new int64_t[3 * o.neurons]);  // not zeroed: all written below
      node->pending_moments.reset(new double[3 * o.neurons]);
      batch_stats_into(rows, node->pending_counts.get(), node->pending_moments.get());
    } else {
      static auto batch_stats = c10::Dispatcher::singleton()
          .findSchemaOrThrow("lrfluct::batch_stats", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
      std::tie(node->pending_counts_t, node->pending_moments_t) = batch_stats.call(rows);
    }
  }
  node->set_next_edges(torch::autograd::collect_next_edges(z));
  at::Tensor out = z.detach();  // a new tensor: in-place ops after the layer stay allowed
  torch::autograd::set_history(out, node);
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
           "z observed (a new tensor), or z itself when the Python path must decide")
      .def("set_layout", [](Observer& o, int64_t ndim, int64_t dim) { o.ndim = ndim; o.dim = dim; },
           "outputs of rank `ndim` hold the neurons in dim `dim` (0 <= dim < ndim)")
      .def_readwrite("observing", &Observer::observing)
      .def_readwrite("live", &Observer::live)
      .def_readonly("ndim", &Observer::ndim);
}

}  // namespace lrfluct
