// The Python module modsplit._C. Its import runs the static kernel registrations of
// csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(modsplit, CPU|CUDA)). The op schemas are
// defined once, in modsplit/ops/schemas.py, so that the ops, their fake impls, autograd and the
// pure-PyTorch "torch" backend exist without this extension.
#include <Python.h>

extern "C" {
// A module with no Python functions: importing it is what registers the kernels.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
