// CPU helpers: per-dtype load/store in the accumulation type, function multi-versioning, and
// the element loops the kernels write their element formulas for (at the end).
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

#include "index_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && (__GNUC__ >= 11) && \
    !defined(DER_FAST_NO_CLONES)
#define DER_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DER_CLONES
#endif

#if defined(__GNUC__)
#define DER_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DER_ALWAYS_INLINE inline
#endif

// for lambdas (which cannot be declared `inline`)
#if defined(__GNUC__)
#define DER_INLINE_LAMBDA __attribute__((always_inline))
#else
#define DER_INLINE_LAMBDA
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
  static DER_ALWAYS_INLINE float load(float v) { return v; }
  static DER_ALWAYS_INLINE float store(float v) { return v; }
};
template <>
struct Cvt<double> {
  static DER_ALWAYS_INLINE double load(double v) { return v; }
  static DER_ALWAYS_INLINE double store(double v) { return v; }
};
// bfloat16 <-> float with integer ops only (round to nearest even, NaN kept), so that the
// loops vectorise; same results as c10::BFloat16's conversions.
template <>
struct Cvt<c10::BFloat16> {
  static DER_ALWAYS_INLINE float load(c10::BFloat16 v) {
    uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static DER_ALWAYS_INLINE c10::BFloat16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = (f != f) ? 0x7FC0u : r;
    return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
  }
};
template <>
struct Cvt<c10::Half> {
  static DER_ALWAYS_INLINE float load(c10::Half v) { return static_cast<float>(v); }
  static DER_ALWAYS_INLINE c10::Half store(float f) { return c10::Half(f); }
};

// ------------------------------------------------------------------------------------------
// 64-byte vectors (GCC/Clang vector extensions): 16 float or 8 double lanes in the
// accumulation type, with loads/stores from the storage type. The compiler maps them to one
// zmm (AVX-512 clone), two ymm (AVX2 clone) or four xmm (baseline). Used where
// auto-vectorisation is poor: per-plane reductions, whose horizontal sums GCC otherwise does
// as a chain of scalar adds (the dominant cost for 4x4 .. 8x8 planes).
// Vec<T>::ok is false for types without a vector path (half): callers use scalar loops.
template <typename T>
struct Vec {
  static constexpr bool ok = false;
};

typedef float der_v16f __attribute__((vector_size(64)));
typedef float der_v8f __attribute__((vector_size(32)));
typedef float der_v4f __attribute__((vector_size(16)));
typedef double der_v8d __attribute__((vector_size(64)));
typedef double der_v4d __attribute__((vector_size(32)));
typedef double der_v2d __attribute__((vector_size(16)));
typedef uint32_t der_v16u __attribute__((vector_size(64)));
typedef uint16_t der_v16h __attribute__((vector_size(32)));

// Vectors of the accumulation type itself (float, double): plain loads and stores.
template <typename E, typename VE>
struct VecOf {
  static constexpr bool ok = true;
  static constexpr int L = sizeof(VE) / sizeof(E);
  using V = VE;
  static DER_ALWAYS_INLINE V load(const E* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static DER_ALWAYS_INLINE void store(E* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};

template <>
struct Vec<float> : VecOf<float, der_v16f> {
  static DER_ALWAYS_INLINE float hsum(V a) {
    der_v8f b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    der_v4f c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
  }
};

template <>
struct Vec<double> : VecOf<double, der_v8d> {
  static DER_ALWAYS_INLINE double hsum(V a) {
    der_v4d b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    der_v2d c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
    return c[0] + c[1];
  }
};

template <>
struct Vec<c10::BFloat16> {
  static constexpr bool ok = true;
  static constexpr int L = 16;
  using V = der_v16f;
  static DER_ALWAYS_INLINE V load(const c10::BFloat16* p) {
    der_v16h h;
    std::memcpy(&h, p, sizeof(h));
    der_v16u u = __builtin_convertvector(h, der_v16u) << 16;
    V v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  }
  // round to nearest even, NaN -> quiet NaN (as Cvt<BFloat16>::store)
  static DER_ALWAYS_INLINE void store(c10::BFloat16* p, V v) {
    der_v16u u;
    std::memcpy(&u, &v, sizeof(u));
    der_v16u r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    der_v16u qnan = r * 0u + 0x7FC0u;
    r = (v != v) ? qnan : r;
    der_v16h h = __builtin_convertvector(r, der_v16h);
    std::memcpy(p, &h, sizeof(h));
  }
  static DER_ALWAYS_INLINE float hsum(V a) { return Vec<float>::hsum(a); }
};

// Software prefetch of the bytes [p + kPrefetchAhead, p + kPrefetchAhead + nbytes): streaming
// reductions over many short planes (4x4 .. 8x8) otherwise leave memory bandwidth unused
// (measured: +5..20% on a 20 MB pooling from L3).
constexpr int64_t kPrefetchAhead = 2048;
DER_ALWAYS_INLINE void prefetch_ahead(const void* p, int64_t nbytes) {
  const char* c = static_cast<const char*>(p) + kPrefetchAhead;
  for (int64_t j = 0; j < nbytes; j += 64) __builtin_prefetch(c + j);
}

// Sum of n contiguous values in the accumulation type.
template <typename T>
DER_ALWAYS_INLINE acc_t<T> sum_contig(const T* __restrict__ p, int64_t n) {
  using A = acc_t<T>;
  A s = A(0);
  int64_t i = 0;
  if constexpr (Vec<T>::ok) {
    using VT = Vec<T>;
    typename VT::V acc = {}, acc2 = {};
    for (; i + 2 * VT::L <= n; i += 2 * VT::L) {  // two chains: hides the add latency
      acc += VT::load(p + i);
      acc2 += VT::load(p + i + VT::L);
    }
    for (; i + VT::L <= n; i += VT::L) acc += VT::load(p + i);
    s = VT::hsum(acc + acc2);
  }
  for (; i < n; ++i) s += Cvt<T>::load(p[i]);
  return s;
}

// ------------------------------------------------------------------------------------------
// Element loops. A kernel's element formula is written once, generic in the position `at` it
// is applied to, and runs both on Vec<T>::L elements at a time (the vector body; its values
// are Vec<T>::V) and on one element (the scalar tail; its values are acc_t<T>):
//   at.ld(p)     the value(s) of the element-indexed tensor p at the position
//   at.st(p, v)  stores v there
//   at.ch(q)     the channel-indexed parameter q of the position's channel(s): one scalar
//                (broadcast by the vector arithmetic) or a vector of consecutive channels
// `decltype(v){}` is the zero of a value v.

// Vec<T>::L consecutive elements from i: all of channel c (ROW = false: in an NCHW plane), or
// of the channels c, c + 1, ... (ROW = true: in a channels_last row).
template <typename T, bool ROW>
struct Lanes {
  int64_t i, c;
  DER_ALWAYS_INLINE typename Vec<T>::V ld(const T* p) const { return Vec<T>::load(p + i); }
  DER_ALWAYS_INLINE void st(T* p, typename Vec<T>::V v) const { Vec<T>::store(p + i, v); }
  template <typename P>
  DER_ALWAYS_INLINE auto ch(const P* q) const {
    if constexpr (ROW) return Vec<P>::load(q + c);
    else return q[c];
  }
};
template <typename T>
using PlaneLanes = Lanes<T, false>;
template <typename T>
using RowLanes = Lanes<T, true>;

// element i, of channel c
template <typename T>
struct One {
  int64_t i, c;
  DER_ALWAYS_INLINE acc_t<T> ld(const T* p) const { return Cvt<T>::load(p[i]); }
  DER_ALWAYS_INLINE void st(T* p, acc_t<T> v) const { p[i] = Cvt<T>::store(v); }
  template <typename P>
  DER_ALWAYS_INLINE P ch(const P* q) const { return q[c]; }
};

// f(pl, c, i0, i1) for the NCHW planes pl in [p0, p1) of HW elements [i0, i1) each, channel
// c = pl % C stepped along (no division per plane).
template <typename F>
DER_ALWAYS_INLINE void each_plane(int64_t p0, int64_t p1, int64_t C, int64_t HW, F&& f) {
  int64_t c = idx::plane_channel(p0, C);
  for (int64_t pl = p0; pl < p1; ++pl, c = (c + 1 == C) ? 0 : c + 1)
    f(pl, c, pl * HW, pl * HW + HW);
}

// f(at) over the elements [i0, i1) of channel c: the whole vectors, then the tail.
template <typename T, typename F>
DER_ALWAYS_INLINE void along_plane(int64_t i0, int64_t i1, int64_t c, F&& f) {
  int64_t i = i0;
  for (; i + Vec<T>::L <= i1; i += Vec<T>::L) f(PlaneLanes<T>{i, c});
  for (; i < i1; ++i) f(One<T>{i, c});
}

// A reduction over the elements [i0, i1) of channel c: f(at, sv) adds the whole vectors into
// the vector sums sv, then f(at, s) the tail into the scalar sums s = fold(sv); returns s.
template <typename T, typename SV, typename Fold, typename F>
DER_ALWAYS_INLINE auto reduce_plane(int64_t i0, int64_t i1, int64_t c, SV sv, Fold&& fold,
                                    F&& f) {
  int64_t i = i0;
  for (; i + Vec<T>::L <= i1; i += Vec<T>::L) f(PlaneLanes<T>{i, c}, sv);
  auto s = fold(sv);
  for (; i < i1; ++i) f(One<T>{i, c}, s);
  return s;
}

// f(at) over the channels [c0, C) of the channels_last rows [r0, r1) of C channels, one at a
// time, a row at a time (an `omp simd` loop over the channels).
template <typename T, typename F>
DER_ALWAYS_INLINE void along_row_tail(int64_t r0, int64_t r1, int64_t C, int64_t c0, F&& f) {
  for (int64_t row = r0; row < r1 && c0 < C; ++row) {
    const int64_t base = row * C;
#pragma omp simd
    for (int64_t c = c0; c < C; ++c) f(One<T>{base + c, c});
  }
}

// f(at) over the channels_last rows [r0, r1) of C channels. CHUNKED: first the channels
// [0, C - C % L) as RowLanes, L = Vec<T>::L channels at a time (all rows of a chunk in turn).
template <typename T, bool CHUNKED, typename F>
DER_ALWAYS_INLINE void along_rows(int64_t r0, int64_t r1, int64_t C, F&& f) {
  const int64_t cv = CHUNKED ? C - C % Vec<T>::L : 0;
  if constexpr (CHUNKED)
    for (int64_t c0 = 0; c0 < cv; c0 += Vec<T>::L)
      for (int64_t row = r0; row < r1; ++row) f(RowLanes<T>{row * C + c0, c0});
  along_row_tail<T>(r0, r1, C, cv, f);
}

// f(at) over all elements of the planes (ROWS = false) or rows (ROWS = true) [o0, o1).
template <typename T, bool ROWS, bool CHUNKED, typename F>
DER_ALWAYS_INLINE void along(int64_t o0, int64_t o1, int64_t C, int64_t HW, F&& f) {
  if constexpr (ROWS) {
    along_rows<T, CHUNKED>(o0, o1, C, f);
  } else {
    each_plane(o0, o1, C, HW, [&](int64_t, int64_t c, int64_t i0, int64_t i1) DER_INLINE_LAMBDA {
      along_plane<T>(i0, i1, c, f);
    });
  }
}

}  // namespace der_fast
