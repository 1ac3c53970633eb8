// Element formulas of the gated activation y = g * act(a), a = alpha * x + beta (+ residual),
// shared by the CPU kernels of masked_gate (act = relu) and bn_gate (relu or the identity).
// Generic in the value type: a Vec<T>::V in a kernel's vector body, a scalar in its tail (see
// the element loops in cpu_simd.h). Always inlined, they round as the kernel they are inlined
// into: bn_gate's kernels fuse alpha * x + beta into one multiply-add where the CPU has FMA
// (ATen's rounding), masked_gate's do not (the reference's).
#pragma once
#include "cpu_simd.h"

namespace der_fast {

// a = alpha * x + beta (+ residual), alpha and beta of the channel(s) at position at
template <bool HAS_R, typename At, typename X, typename T, typename P>
DER_ALWAYS_INLINE X preact(const At& at, X x, const T* r, const P* alpha, const P* beta) {
  X a = x * at.ch(alpha) + at.ch(beta);
  if constexpr (HAS_R) a += at.ld(r);
  return a;
}

// act(a): relu (a < 0 ? 0 : a) or the identity
template <bool RELU, typename X>
DER_ALWAYS_INLINE X gate_act(X a) {
  if constexpr (RELU) return (a < X{}) ? X{} : a;
  else return a;
}

// grad_y * d(g * act(a)) / da = grad_y * g * [a > 0] (relu) or grad_y * g
template <bool RELU, typename X, typename G>
DER_ALWAYS_INLINE X gate_grad(X a, X gy, G g) {
  if constexpr (RELU) return (a > X{}) ? gy * g : X{};
  else return gy * g;
}

}  // namespace der_fast
