"""Triton kernels of der_fast, one op per file (installed as the subpackage der_fast.kernels).

Importing this package does not import triton; the modules in it do.
  masked_gate  forward/backward of der_fast.masked_gate (CUDA implementation of the op)
  bn_gate      forward/backward of der_fast.bn_gate (BatchNorm + gate; CUDA implementation)
  _common      what they share: @triton.jit helpers, layouts, launches
"""
