// The Python module `adaswitch._C`. Importing it loads this library, whose static initialisers
// register the ops (TORCH_LIBRARY_FRAGMENT(adaswitch, m) in each .cpp) as torch.ops.adaswitch.*.
// No pybind11: the module itself is empty.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(adaswitch, m) {}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "adaswitch native CPU ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
