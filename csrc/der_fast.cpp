// der_fast._C: operator schemas (defined once, here) for the der_fast custom ops.
//
// Implementations are registered per dispatch key in other files:
//   CPU  : csrc/masked_gate.cpp, csrc/bn_gate.cpp, csrc/concat_linear_head.cpp,
//          csrc/conv3x3.cpp (CPU only: the frozen path's narrow convs)  (der_fast._C)
//   CUDA : csrc/cuda/concat_linear_head.cu                      (der_fast._C_cuda)
//          masked_gate and bn_gate on CUDA are Triton kernels registered from Python
//          (der_fast/ops/masked_gate.py, der_fast/ops/bn_gate.py).
// Fake (meta) kernels and autograd formulas are registered in Python (der_fast/ops/<op>.py).
// der_fast/ops/_library.py keeps a copy of these schema strings (used only when this extension is
// missing); tests/test_build.py checks that the two agree.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Makes `import der_fast._C` work; importing the module runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "der_fast C++ ops (CPU kernels); registers the der_fast:: operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(der_fast, m) {
  m.set_python_module("der_fast.ops");
  m.def(
      "masked_gate(Tensor x, Tensor scale, Tensor shift, Tensor? e=None, float s=1.0, "
      "Tensor? residual=None) -> Tensor");
  m.def(
      "masked_gate_backward(Tensor grad_y, Tensor y, Tensor? x, Tensor scale, Tensor? e, "
      "float s, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_gate(Tensor z, Tensor weight, Tensor bias, Tensor? mean_in, Tensor? var_in, "
      "Tensor? e, float s, Tensor? residual, bool training, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_gate_backward(Tensor grad_y, Tensor z, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor var, Tensor? e, float s, Tensor? residual, bool training, float eps, bool relu, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "concat_linear_head(Tensor[] feats, Tensor weight, Tensor? bias, "
      "Tensor? aux_weight=None, Tensor? aux_bias=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "concat_linear_head_backward(Tensor? grad_logits, Tensor? grad_aux, "
      "Tensor? grad_features, Tensor features, Tensor weight, Tensor? aux_weight, "
      "Tensor?[] feats, int[] widths, bool[4] output_mask) "
      "-> (Tensor[], Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "conv3x3_bordered(Tensor x, Tensor weight, Tensor bias, Tensor? residual=None, "
      "Tensor? gate=None, bool relu=True, int stride=1) -> Tensor");
}
