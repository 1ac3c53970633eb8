// der_fast._C: the Python module of the C++ CPU kernels of the der_fast custom ops.
//
// The operator schemas are defined once, in Python (der_fast/ops/_library.py:SCHEMAS), before
// this module is imported; the C++ files only register kernels per dispatch key:
//   CPU  : csrc/masked_gate.cpp, csrc/bn_gate.cpp, csrc/concat_linear_head.cpp,
//          csrc/conv3x3_bordered.cpp (CPU only: the frozen path's narrow convs)  (der_fast._C)
//   CUDA : csrc/cuda/concat_linear_head.cu                      (der_fast._C_cuda)
//          masked_gate and bn_gate on CUDA are Triton kernels registered from Python
//          (der_fast/ops/masked_gate.py, der_fast/ops/bn_gate.py).
// Fake (meta) kernels and autograd formulas are registered in Python (der_fast/ops/<op>.py).
#include <Python.h>

extern "C" {
// Makes `import der_fast._C` work; importing the module runs the static kernel registrations
// of the other files.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "der_fast C++ ops (CPU kernels); registers CPU kernels for the der_fast:: operators", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
