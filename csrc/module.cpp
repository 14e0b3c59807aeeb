// Python module `lrfluct_fast._C`: importing it loads this library, whose static
// TORCH_LIBRARY_IMPL blocks register the CPU kernels. It exports no Python functions.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "CPU kernels of the lrfluct op namespace", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
