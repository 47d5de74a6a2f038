// Op schemas of the modsplit library. Implementations are registered per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) impls and autograd from Python (modsplit/ops).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing modsplit._C runs the static registrations below; it holds no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(modsplit, m) {
  // Masks: int32 [*, O, ceil(R/32)], bit j (LSB first) of word w keeps flat column 32*w + j.
  m.def("topk_mask(Tensor scores, float density) -> Tensor");
  m.def("multi_topk_mask(Tensor scores, float density) -> Tensor");
  m.def("pack_mask(Tensor mask, int batch_dims=0) -> Tensor");
  m.def("unpack_mask(Tensor packed, SymInt[] shape) -> Tensor");

  m.def("masked_linear(Tensor x, Tensor weight, Tensor packed, Tensor? bias=None) -> Tensor");
  m.def(
      "masked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "multi_masked_linear(Tensor x, Tensor weight, Tensor packed, Tensor? bias=None, "
      "bool shared_input=False) -> Tensor");
  m.def(
      "multi_masked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, "
      "bool shared_input, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor packed, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "masked_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "multi_masked_conv2d(Tensor x, Tensor weight, Tensor packed, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "multi_masked_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}
