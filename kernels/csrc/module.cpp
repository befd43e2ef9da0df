// The Python module `adaswitch._C_<variant>` (CMakeLists.txt builds one per CPU capability, with
// ADASWITCH_MODULE=_C_default / _C_avx2 / _C_avx512). Importing it loads this library, whose static
// initialisers register the ops (TORCH_LIBRARY_FRAGMENT(adaswitch, m) in each .cpp) as torch.ops.adaswitch.*.
// Every variant registers the same ops, so a process must load only one (adaswitch/_backend.py picks it);
// a second would fail on the duplicate TORCH_LIBRARY. No pybind11: the module only carries its
// CPU_CAPABILITY as a string.
#include <Python.h>
#include <torch/library.h>

#ifndef ADASWITCH_MODULE
#define ADASWITCH_MODULE _C
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY unknown
#endif
#define ADASWITCH_STR_(x) #x
#define ADASWITCH_STR(x) ADASWITCH_STR_(x)
#define ADASWITCH_CAT_(a, b) a##b
#define ADASWITCH_CAT(a, b) ADASWITCH_CAT_(a, b)

TORCH_LIBRARY(adaswitch, m) {}

PyMODINIT_FUNC ADASWITCH_CAT(PyInit_, ADASWITCH_MODULE)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, ADASWITCH_STR(ADASWITCH_MODULE),
                                          "adaswitch native CPU ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "CPU_CAPABILITY", ADASWITCH_STR(CPU_CAPABILITY)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
