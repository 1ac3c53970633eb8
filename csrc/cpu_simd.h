// CPU helpers: per-dtype load/store in the accumulation type and function multi-versioning.
//
// The hot loops are plain C++ loops over raw pointers (with `#pragma omp simd`) that GCC
// auto-vectorises. DER_CLONES compiles each of them for AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and baseline x86-64 and picks the best one when the library is loaded
// (GCC target_clones / ifunc), so the extension is both fast and portable without -march=native.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && (__GNUC__ >= 11) && \
    !defined(DER_FAST_NO_CLONES)
#define DER_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DER_CLONES
#endif

namespace der_fast {

// Accumulation / compute type: float for float, bfloat16 and half; double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};
template <>
struct Cvt<double> {
  static inline double load(double v) { return v; }
  static inline double store(double v) { return v; }
};
// bfloat16 <-> float with integer ops only (round to nearest even, NaN kept), so that the
// loops vectorise; same results as c10::BFloat16's conversions.
template <>
struct Cvt<c10::BFloat16> {
  static inline float load(c10::BFloat16 v) {
    uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static inline c10::BFloat16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = (f != f) ? 0x7FC0u : r;
    return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
  }
};
template <>
struct Cvt<c10::Half> {
  static inline float load(c10::Half v) { return static_cast<float>(v); }
  static inline c10::Half store(float f) { return c10::Half(f); }
};

}  // namespace der_fast
