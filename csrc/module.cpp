// Python module `lrfluct_fast._C`: `register_kernels()` registers the CPU kernels of the
// `lrfluct` namespace, whose schemas Python declared (lrfluct_fast/ops). Registration is an
// explicit call, not a static initializer, so a build whose kernels no longer match the
// schemas (an extension built from another version of the sources) raises ImportError and
// leaves nothing registered, where a static registration would abort the interpreter.
#include <Python.h>

#include <memory>

#include "common.h"

namespace {

std::unique_ptr<torch::Library> g_kernels;  // alive while the kernels stay registered
std::unique_ptr<torch::Library> g_composite;  // observe: its own autograd, on every device

PyObject* register_kernels(PyObject*, PyObject*) {
  if (g_kernels) Py_RETURN_NONE;
  try {
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "lrfluct",
                                                c10::DispatchKey::CPU, __FILE__, __LINE__);
    lrfluct::register_batch_stats(*lib);
    lrfluct::register_merge_stats(*lib);
    lrfluct::register_temporal_update(*lib);
    auto composite = std::make_unique<torch::Library>(
        torch::Library::IMPL, "lrfluct", c10::DispatchKey::CompositeImplicitAutograd, __FILE__,
        __LINE__);
    lrfluct::register_observe(*composite);
    g_kernels = std::move(lib);
    g_composite = std::move(composite);
  } catch (const c10::Error& e) {  // the libraries are gone: the kernels they registered too
    PyErr_SetString(PyExc_ImportError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"register_kernels", register_kernels, METH_NOARGS,
     "Register the CPU kernels of the lrfluct ops (idempotent); ImportError if they do not "
     "match the declared schemas."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "CPU kernels of the lrfluct op namespace", -1, methods};
  return PyModule_Create(&module_def);
}
}
