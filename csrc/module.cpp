// Python module `lrfluct_fast._C`: `register_kernels()` registers the CPU kernels of the
// `lrfluct` namespace, whose schemas Python declared (lrfluct_fast/ops); `Observer` is a
// layer's eager observation path (observe.cpp), `TemporalPlan` Monitor.step's weight update
// (temporal_update.cpp). Registration is an explicit call, not a static
// initializer, so a build whose kernels no longer match the schemas (an extension built from
// another version of the sources) raises ImportError and leaves nothing registered, where a
// static registration would abort the interpreter.
#include <torch/extension.h>

#include <memory>

#include "common.h"

namespace lrfluct {
void bind_observer(pybind11::module& m);       // observe.cpp
void bind_temporal_plan(pybind11::module& m);  // temporal_update.cpp
}  // namespace lrfluct

namespace {

std::unique_ptr<torch::Library> g_kernels;  // alive while the kernels stay registered

void register_kernels() {
  if (g_kernels) return;
  try {
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "lrfluct",
                                                c10::DispatchKey::CPU, __FILE__, __LINE__);
    lrfluct::register_batch_stats(*lib);
    lrfluct::register_merge_stats(*lib);
    lrfluct::register_accumulate_stats(*lib);
    lrfluct::register_temporal_update(*lib);
    g_kernels = std::move(lib);
  } catch (const c10::Error& e) {  // the library is gone: the kernels it registered too
    throw pybind11::import_error(e.what_without_backtrace());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of the lrfluct op namespace, the eager observation path, the step's weight update";
  m.def("register_kernels", &register_kernels,
        "Register the CPU kernels of the lrfluct ops (idempotent); ImportError if they do not "
        "match the declared schemas.");
  lrfluct::bind_observer(m);
  lrfluct::bind_temporal_plan(m);
}
