// der_fast::bn_gate and der_fast::bn_gate_backward: BatchNorm (train or eval) + gate, CPU kernels.
//
//   a = alpha[c] * z + beta[c] (+ residual),  h = relu(a) (or a),  y = g[c] * h
//   alpha = weight * invstd, beta = bias - mean * alpha, invstd = 1 / sqrt(var + eps)
//   g = sigmoid(s * e) (1 without e)
//   training: mean / var = the batch statistics of z over (N, H, W) (biased variance);
//   eval:     mean / var = the running statistics given (mean_in / var_in).
//
// Backward (x_hat = (z - mean) * invstd, pos = [a > 0] or 1 without ReLU, M = N * H * W):
//   da = grad_y * g * pos, grad_residual = da, grad_bias = sum da,
//   grad_weight = sum da * x_hat, grad_e = s * g * (1 - g) * sum grad_y * h,
//   training: grad_z = weight * invstd * (da - grad_bias / M - x_hat * grad_weight / M)
//   eval:     grad_z = da * alpha.
// The pre-activation a is recomputed from z (and the residual) in the backward with the same
// arithmetic as the forward, so its ReLU mask is the forward's.
//
// Rounding (float32): the forward reproduces ATen's CPU BatchNorm + the reference's gated ReLU:
//   * NCHW: mean = float(double sum of z / M); var_sum = float(double sum of the float
//     products (z - mean) * (z - mean)); var = var_sum / float(M) in float: ATen's
//     batch_norm_cpu_collect_stats_contiguous_impl and update_stats (two passes over z).
//     channels_last: exact double statistics per block of rows merged with Chan's formula,
//     correctly rounded (ATen's channels_last kernel sums differently; not matched).
//   * invstd = float(1 / sqrt(double(var) + eps)) in training, 1 / sqrt(var + eps) in float in
//     eval, alpha = invstd * weight, beta = bias - mean * alpha and a = z * alpha + beta: ATen's
//     kernels (AVX2 / AVX-512 builds) contract the last two into fused multiply-adds, so this
//     file contracts them too ("fp-contract=fast" below; the x86-64-v3 / v4 clones have FMA,
//     the baseline clone, like ATen's DEFAULT build, has not). The rest of der_fast is built
//     with -ffp-contract=off.
//   So with NCHW input the forward is bit-identical to nn.BatchNorm2d followed by gated_relu
//   (tests/test_bn_gate.py), and the fast model's ReLU masks are the reference's.
//   * the backward's reductions are double sums of exact products (ATen: float products, float
//     sums within a plane, double across planes).
//
// Layouts: dense NCHW ("planes" of HW) or dense channels_last ("rows" of C). Every reduction
// writes one slot per (group, channel), group = sample (NCHW) or block of rows
// (channels_last), merged in a fixed order: results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_simd.h"
#include "index_math.h"

namespace der_fast {
namespace {

constexpr int64_t kGrainElems = 16384;  // below this many elements per task: stay serial

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ------------------------------------------------------------------------------------------
// argument checks (same messages as der_fast/ops/bn_gate.py:_check_bn_gate)
void check_vec(const at::Tensor& t, const at::Tensor& z, const char* op, const char* name) {
  const int64_t C = z.size(1);
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D [C] with C=", C, ", got shape ",
                    t.sizes());
  check_like(t, z, op, name, "z");
  TORCH_CHECK_VALUE(t.size(0) == C, op, ": ", name, " has ", t.size(0),
                    " channels but z has C=", C, " (z.shape=", z.sizes(), ")");
}

// Statistics (mean / var) have z's dtype, or float32 when z is float16 / bfloat16: the forward
// returns a reduced-precision z's batch statistics in float32, so that the backward recomputes
// the forward's pre-activation from the same numbers.
void check_stat(const at::Tensor& t, const at::Tensor& z, const char* op, const char* name) {
  const bool reduced = z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16;
  if (reduced && t.scalar_type() == at::kFloat) {
    const int64_t C = z.size(1);
    TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D [C] with C=", C,
                      ", got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == z.device(), op, ": ", name, " is on device ", t.device(),
                      " but z is on device ", z.device());
    TORCH_CHECK_VALUE(t.size(0) == C, op, ": ", name, " has ", t.size(0),
                      " channels but z has C=", C, " (z.shape=", z.sizes(), ")");
    return;
  }
  check_vec(t, z, op, name);
}

void check_bn_gate(const char* op, const at::Tensor& z, const at::Tensor& weight,
                   const at::Tensor& bias, const std::optional<at::Tensor>& mean,
                   const std::optional<at::Tensor>& var, const std::optional<at::Tensor>& e,
                   const std::optional<at::Tensor>& residual, bool stats_required,
                   const char* mean_name, const char* var_name) {
  TORCH_CHECK_VALUE(z.dim() == 4, op, ": z must be 4-D [N, C, H, W], got a ", z.dim(),
                    "-D tensor of shape ", z.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(z.scalar_type()), op,
                   ": z must be a floating point tensor, got dtype ", dtype_name(z.scalar_type()));
  check_vec(weight, z, op, "weight");
  check_vec(bias, z, op, "bias");
  if (stats_required)
    TORCH_CHECK_VALUE(has(mean) && has(var), op, ": ", mean_name, " and ", var_name,
                      " (the running statistics) are required when training=False");
  if (has(mean)) check_stat(*mean, z, op, mean_name);
  if (has(var)) check_stat(*var, z, op, var_name);
  if (has(e)) check_vec(*e, z, op, "e");
  if (has(residual)) {
    check_like(*residual, z, op, "residual", "z");
    TORCH_CHECK_VALUE(residual->sizes() == z.sizes(), op, ": residual has shape ",
                      residual->sizes(), " but z has shape ", z.sizes(),
                      " (they must be equal)");
  }
}

// ------------------------------------------------------------------------------------------
// Kernels. Multiply-adds are contracted here (see the header comment: ATen's rounding).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// Per-channel constants, computed in a cloned function so that beta's multiply-add is fused
// exactly where the vector kernels' are (x86-64-v3 / v4), as in ATen's kernels.
template <typename T>
DER_CLONES void channel_consts(const T* __restrict__ mean, const T* __restrict__ var,
                               const T* __restrict__ w, const T* __restrict__ b, double eps,
                               bool training, int64_t C, T* __restrict__ invstd,
                               T* __restrict__ alpha, T* __restrict__ beta) {
  for (int64_t c = 0; c < C; ++c) {
    T inv;
    if (training) {  // ATen: VarTransform<double>(var_sum / M, eps), stored as T
      const double v = static_cast<double>(var[c]);
      inv = (v != 0.0 || eps != 0.0) ? static_cast<T>(1.0 / std::sqrt(v + eps)) : T(0);
    } else {  // ATen (batch_norm_cpu_collect_linear_and_constant_terms): in T
      inv = T(1) / std::sqrt(var[c] + static_cast<T>(eps));
    }
    invstd[c] = inv;
    const T a = inv * w[c];
    alpha[c] = a;
    beta[c] = b[c] - mean[c] * a;
  }
}

// float -> two 8-lane double vectors
DER_ALWAYS_INLINE void widen(der_v16f v, der_v8d& lo, der_v8d& hi) {
  lo = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), der_v8d);
  hi = __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15),
                               der_v8d);
}

DER_ALWAYS_INLINE double hsum_d(der_v8d a) { return Vec<double>::hsum(a); }

// channels_last float kernels take 16 channels at a time in registers (the rest, and float64,
// one channel per lane of an `omp simd` loop over C).
template <typename T>
constexpr bool kChunked = std::is_same_v<T, float>;

// --- statistics: one slot per plane (NCHW) / per (row block, channel) (channels_last) -----
// NCHW, as ATen's CPU BatchNorm computes them: the double sum of z, then the double sum of
// the float products (z - mean) * (z - mean) around the mean rounded to T.
DER_ALWAYS_INLINE double plane_sum(const float* __restrict__ p, int64_t n) {
  using VT = Vec<float>;
  der_v8d a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    der_v8d l0, h0, l1, h1;
    widen(VT::load(p + i), l0, h0);
    widen(VT::load(p + i + 16), l1, h1);
    a0 += l0;
    a1 += h0;
    a2 += l1;
    a3 += h1;
  }
  for (; i + 16 <= n; i += 16) {
    der_v8d l0, h0;
    widen(VT::load(p + i), l0, h0);
    a0 += l0;
    a1 += h0;
  }
  double s = hsum_d((a0 + a2) + (a1 + a3));
  for (; i < n; ++i) s += static_cast<double>(p[i]);
  return s;
}

DER_ALWAYS_INLINE double plane_sqdev(const float* __restrict__ p, int64_t n, float m) {
  using VT = Vec<float>;
  const der_v16f mv = der_v16f{} + m;
  der_v8d a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const der_v16f d0 = VT::load(p + i) - mv, d1 = VT::load(p + i + 16) - mv;
    der_v8d l0, h0, l1, h1;
    widen(d0 * d0, l0, h0);  // float products, summed in double
    widen(d1 * d1, l1, h1);
    a0 += l0;
    a1 += h0;
    a2 += l1;
    a3 += h1;
  }
  for (; i + 16 <= n; i += 16) {
    const der_v16f d0 = VT::load(p + i) - mv;
    der_v8d l0, h0;
    widen(d0 * d0, l0, h0);
    a0 += l0;
    a1 += h0;
  }
  double q = hsum_d((a0 + a2) + (a1 + a3));
  for (; i < n; ++i) {
    const float d = p[i] - m;
    q += static_cast<double>(d * d);
  }
  return q;
}

DER_ALWAYS_INLINE double plane_sum(const double* __restrict__ p, int64_t n) {
  using VT = Vec<double>;
  der_v8d a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += VT::load(p + i);
    a1 += VT::load(p + i + 8);
    a2 += VT::load(p + i + 16);
    a3 += VT::load(p + i + 24);
  }
  for (; i + 8 <= n; i += 8) a0 += VT::load(p + i);
  double s = hsum_d((a0 + a2) + (a1 + a3));
  for (; i < n; ++i) s += p[i];
  return s;
}

DER_ALWAYS_INLINE double plane_sqdev(const double* __restrict__ p, int64_t n, double m) {
  using VT = Vec<double>;
  const der_v8d mv = der_v8d{} + m;
  der_v8d a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    der_v8d d0 = VT::load(p + i) - mv, d1 = VT::load(p + i + 8) - mv;
    der_v8d d2 = VT::load(p + i + 16) - mv, d3 = VT::load(p + i + 24) - mv;
    a0 += d0 * d0;
    a1 += d1 * d1;
    a2 += d2 * d2;
    a3 += d3 * d3;
  }
  for (; i + 8 <= n; i += 8) {
    der_v8d d0 = VT::load(p + i) - mv;
    a0 += d0 * d0;
  }
  double q = hsum_d((a0 + a2) + (a1 + a3));
  for (; i < n; ++i) {
    const double d = p[i] - m;
    q += d * d;
  }
  return q;
}

template <typename T>
DER_CLONES void sum_planes(const T* __restrict__ z, double* __restrict__ gsum, int64_t p0,
                           int64_t p1, int64_t HW) {
  for (int64_t pl = p0; pl < p1; ++pl) gsum[pl] = plane_sum(z + pl * HW, HW);
}

template <typename T>
DER_CLONES void sqdev_planes(const T* __restrict__ z, const T* __restrict__ mean,
                             double* __restrict__ gq, int64_t p0, int64_t p1, int64_t HW,
                             int64_t C) {
  for (int64_t pl = p0; pl < p1; ++pl) gq[pl] = plane_sqdev(z + pl * HW, HW, mean[pl % C]);
}

template <typename T>
DER_CLONES void stats_rows(const T* __restrict__ z, double* __restrict__ gsum,
                           double* __restrict__ gm2, double* __restrict__ wk, int64_t b0,
                           int64_t b1, int64_t R, int64_t C, int64_t B) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t r0 = b * B, r1 = std::min(R, r0 + B);
    double* __restrict__ s = gsum + b * C;
    double* __restrict__ q = gm2 + b * C;
    const double inv_n = 1.0 / static_cast<double>(r1 - r0);
    const int64_t cv = kChunked<T> ? C - C % 16 : 0;
    for (int64_t c0 = 0; c0 < cv; c0 += 16) {  // 16 channels in registers, rows in order
      der_v8d s0 = {}, s1 = {};
      for (int64_t row = r0; row < r1; ++row) {
        der_v8d l, h;
        widen(Vec<float>::load(reinterpret_cast<const float*>(z) + row * C + c0), l, h);
        s0 += l;
        s1 += h;
      }
      const der_v8d m0 = s0 * inv_n, m1 = s1 * inv_n;
      der_v8d q0 = {}, q1 = {};
      for (int64_t row = r0; row < r1; ++row) {
        der_v8d l, h;
        widen(Vec<float>::load(reinterpret_cast<const float*>(z) + row * C + c0), l, h);
        l -= m0;
        h -= m1;
        q0 += l * l;
        q1 += h * h;
      }
      Vec<double>::store(s + c0, s0);
      Vec<double>::store(s + c0 + 8, s1);
      Vec<double>::store(q + c0, q0);
      Vec<double>::store(q + c0 + 8, q1);
    }
    for (int64_t c = cv; c < C; ++c) s[c] = 0.0;
    for (int64_t row = r0; row < r1; ++row) {
      const T* __restrict__ zr = z + row * C;
#pragma omp simd
      for (int64_t c = cv; c < C; ++c) s[c] += static_cast<double>(zr[c]);
    }
    for (int64_t c = cv; c < C; ++c) {
      wk[c] = s[c] * inv_n;
      q[c] = 0.0;
    }
    for (int64_t row = r0; row < r1; ++row) {
      const T* __restrict__ zr = z + row * C;
#pragma omp simd
      for (int64_t c = cv; c < C; ++c) {
        const double d = static_cast<double>(zr[c]) - wk[c];
        q[c] += d * d;
      }
    }
  }
}

// --- forward output: y = g * act(alpha * z + beta (+ r)) ----------------------------------
template <typename T, bool HAS_R, bool RELU>
DER_CLONES void out_planes(const T* __restrict__ z, const T* __restrict__ r, T* __restrict__ y,
                           const T* __restrict__ al, const T* __restrict__ be,
                           const T* __restrict__ g, int64_t p0, int64_t p1, int64_t C,
                           int64_t HW) {
  using VT = Vec<T>;
  using V = typename VT::V;
  int64_t c = idx::plane_channel(p0, C);
  for (int64_t pl = p0; pl < p1; ++pl, c = (c + 1 == C) ? 0 : c + 1) {
    const T sa = al[c], sb = be[c], sg = g[c];
    const int64_t base = pl * HW;
    const T* __restrict__ zr = z + base;
    const T* __restrict__ rr = HAS_R ? r + base : nullptr;
    T* __restrict__ yr = y + base;
    const V zero = {};
    int64_t i = 0;
    for (; i + VT::L <= HW; i += VT::L) {
      V a = VT::load(zr + i) * sa + sb;
      if constexpr (HAS_R) a += VT::load(rr + i);
      if constexpr (RELU) a = (a < zero) ? zero : a;
      VT::store(yr + i, a * sg);
    }
    for (; i < HW; ++i) {
      T a = zr[i] * sa + sb;
      if constexpr (HAS_R) a += rr[i];
      if constexpr (RELU) a = a < T(0) ? T(0) : a;
      yr[i] = a * sg;
    }
  }
}

template <typename T, bool HAS_R, bool RELU>
DER_CLONES void out_rows(const T* __restrict__ z, const T* __restrict__ r, T* __restrict__ y,
                         const T* __restrict__ al, const T* __restrict__ be,
                         const T* __restrict__ g, int64_t r0, int64_t r1, int64_t C) {
  const int64_t cv = kChunked<T> ? C - C % 16 : 0;
  if constexpr (kChunked<T>) {
    using VT = Vec<float>;
    const der_v16f zero = {};
    for (int64_t c0 = 0; c0 < cv; c0 += 16) {
      const der_v16f alv = VT::load(al + c0), bev = VT::load(be + c0), gv = VT::load(g + c0);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t o = row * C + c0;
        der_v16f a = VT::load(z + o) * alv + bev;
        if constexpr (HAS_R) a += VT::load(r + o);
        if constexpr (RELU) a = (a < zero) ? zero : a;
        VT::store(y + o, a * gv);
      }
    }
  }
  for (int64_t row = r0; row < r1 && cv < C; ++row) {
    const int64_t base = row * C;
    const T* __restrict__ zr = z + base;
    const T* __restrict__ rr = HAS_R ? r + base : nullptr;
    T* __restrict__ yr = y + base;
#pragma omp simd
    for (int64_t c = cv; c < C; ++c) {
      T a = zr[c] * al[c] + be[c];
      if constexpr (HAS_R) a += rr[c];
      if constexpr (RELU) a = a < T(0) ? T(0) : a;
      yr[c] = a * g[c];
    }
  }
}

// --- backward pass 1: reductions [sum da | sum da * (z - mean) | sum grad_y * h] per slot,
// grad_residual = da and (eval) grad_z = da * alpha written on the way. The sums are taken in
// double from exact products of the stored values (da = grad_y * g in double): ATen sums float
// products in float within a plane, and a float sum here measured as often 2x worse as 2x
// better than ATen's, so only double accumulation is reliably at least as accurate.
struct BwdPtrs {
  const void* gy;
  const void* z;
  const void* r;
  void* gr;  // may be null
  void* gz;  // eval only (else null)
  double* s_da;
  double* s_dax;
  double* s_gyh;
};

template <bool RELU>
DER_ALWAYS_INLINE void acc_lanes(der_v8d& s_da, der_v8d& s_dax, der_v8d& s_gyh, der_v8d gy,
                                 der_v8d z, der_v8d a, der_v8d gd, der_v8d md) {
  const der_v8d zero = {};
  der_v8d da, h;
  if constexpr (RELU) {
    da = (a > zero) ? gy * gd : zero;
    h = (a < zero) ? zero : a;
  } else {
    da = gy * gd;
    h = a;
  }
  s_da += da;
  s_dax += da * (z - md);
  s_gyh += gy * h;
}

template <bool RELU>
DER_ALWAYS_INLINE void acc_vec(der_v8d* s, der_v16f gy, der_v16f z, der_v16f a, der_v8d gd,
                               der_v8d md) {
  der_v8d g0, g1, z0, z1, a0, a1;
  widen(gy, g0, g1);
  widen(z, z0, z1);
  widen(a, a0, a1);
  acc_lanes<RELU>(s[0], s[2], s[4], g0, z0, a0, gd, md);
  acc_lanes<RELU>(s[1], s[3], s[5], g1, z1, a1, gd, md);
}

template <bool RELU>
DER_ALWAYS_INLINE void acc_vec(der_v8d* s, der_v8d gy, der_v8d z, der_v8d a, der_v8d gd,
                               der_v8d md) {
  acc_lanes<RELU>(s[0], s[2], s[4], gy, z, a, gd, md);
}

template <typename T, bool HAS_R, bool RELU>
DER_CLONES void reduce_planes(const BwdPtrs& P, const T* __restrict__ al,
                              const T* __restrict__ be, const T* __restrict__ g,
                              const T* __restrict__ mean, int64_t p0, int64_t p1, int64_t C,
                              int64_t HW) {
  using VT = Vec<T>;
  using V = typename VT::V;
  const T* __restrict__ gy = static_cast<const T*>(P.gy);
  const T* __restrict__ z = static_cast<const T*>(P.z);
  const T* __restrict__ r = static_cast<const T*>(P.r);
  T* __restrict__ gr = static_cast<T*>(P.gr);
  T* __restrict__ gz = static_cast<T*>(P.gz);
  const bool wgr = gr != nullptr, wgz = gz != nullptr;
  int64_t c = idx::plane_channel(p0, C);
  for (int64_t pl = p0; pl < p1; ++pl, c = (c + 1 == C) ? 0 : c + 1) {
    const T sa = al[c], sb = be[c], sg = g[c];
    const double dg = static_cast<double>(sg), dm = static_cast<double>(mean[c]);
    const der_v8d gd = der_v8d{} + dg, md = der_v8d{} + dm;
    const int64_t base = pl * HW;
    const T* __restrict__ gyr = gy + base;
    const T* __restrict__ zr = z + base;
    const T* __restrict__ rr = HAS_R ? r + base : nullptr;
    T* __restrict__ grr = wgr ? gr + base : nullptr;
    T* __restrict__ gzr = wgz ? gz + base : nullptr;
    der_v8d acc[6] = {};
    const V zero = {};
    int64_t i = 0;
    for (; i + VT::L <= HW; i += VT::L) {
      const V zv = VT::load(zr + i);
      V a = zv * sa + sb;
      if constexpr (HAS_R) a += VT::load(rr + i);
      const V gv = VT::load(gyr + i);
      if (wgr || wgz) {
        V da;
        if constexpr (RELU) da = (a > zero) ? gv * sg : zero;
        else da = gv * sg;
        if (wgr) VT::store(grr + i, da);
        if (wgz) VT::store(gzr + i, da * sa);
      }
      acc_vec<RELU>(acc, gv, zv, a, gd, md);
    }
    double d_da = hsum_d(acc[0] + acc[1]), d_dax = hsum_d(acc[2] + acc[3]),
           d_gyh = hsum_d(acc[4] + acc[5]);
    for (; i < HW; ++i) {
      const T zv = zr[i];
      T a = zv * sa + sb;
      if constexpr (HAS_R) a += rr[i];
      const T gv = gyr[i];
      const bool pos = RELU ? a > T(0) : true;
      if (wgr) grr[i] = pos ? gv * sg : T(0);
      if (wgz) gzr[i] = (pos ? gv * sg : T(0)) * sa;
      const double gvd = static_cast<double>(gv);
      const double dad = pos ? gvd * dg : 0.0;
      const double h = (RELU && !pos) ? 0.0 : static_cast<double>(a);
      d_da += dad;
      d_dax += dad * (static_cast<double>(zv) - dm);
      d_gyh += gvd * h;
    }
    P.s_da[pl] = d_da;
    P.s_dax[pl] = d_dax;
    P.s_gyh[pl] = d_gyh;
  }
}

template <typename T, bool HAS_R, bool RELU>
DER_CLONES void reduce_rows(const BwdPtrs& P, const T* __restrict__ al, const T* __restrict__ be,
                            const T* __restrict__ g, const double* __restrict__ gd,
                            const double* __restrict__ md, double* __restrict__ blk, int64_t b0,
                            int64_t b1, int64_t R, int64_t C, int64_t B) {
  const T* __restrict__ gy = static_cast<const T*>(P.gy);
  const T* __restrict__ z = static_cast<const T*>(P.z);
  const T* __restrict__ r = static_cast<const T*>(P.r);
  T* __restrict__ gr = static_cast<T*>(P.gr);
  T* __restrict__ gz = static_cast<T*>(P.gz);
  const bool wgr = gr != nullptr, wgz = gz != nullptr;
  double* __restrict__ b_da = blk;
  double* __restrict__ b_dax = blk + C;
  double* __restrict__ b_gyh = blk + 2 * C;
  const int64_t cv = kChunked<T> ? C - C % 16 : 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t r0 = b * B, r1 = std::min(R, r0 + B);
    for (int64_t j = 0; j < 3 * C; ++j) blk[j] = 0.0;
    if constexpr (kChunked<T>) {
      using VT = Vec<float>;
      using VD = Vec<double>;
      const der_v16f zero = {};
      for (int64_t c0 = 0; c0 < cv; c0 += 16) {
        const der_v16f alv = VT::load(al + c0), bev = VT::load(be + c0), gv16 = VT::load(g + c0);
        const der_v8d gd0 = VD::load(gd + c0), gd1 = VD::load(gd + c0 + 8);
        const der_v8d md0 = VD::load(md + c0), md1 = VD::load(md + c0 + 8);
        der_v8d acc[6] = {};
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t o = row * C + c0;
          const der_v16f zv = VT::load(z + o);
          der_v16f a = zv * alv + bev;
          if constexpr (HAS_R) a += VT::load(r + o);
          const der_v16f gv = VT::load(gy + o);
          if (wgr || wgz) {
            der_v16f da;
            if constexpr (RELU) da = (a > zero) ? gv * gv16 : zero;
            else da = gv * gv16;
            if (wgr) VT::store(gr + o, da);
            if (wgz) VT::store(gz + o, da * alv);
          }
          der_v8d g0, g1, z0, z1, a0, a1;
          widen(gv, g0, g1);
          widen(zv, z0, z1);
          widen(a, a0, a1);
          acc_lanes<RELU>(acc[0], acc[2], acc[4], g0, z0, a0, gd0, md0);
          acc_lanes<RELU>(acc[1], acc[3], acc[5], g1, z1, a1, gd1, md1);
        }
        VD::store(b_da + c0, acc[0]);
        VD::store(b_da + c0 + 8, acc[1]);
        VD::store(b_dax + c0, acc[2]);
        VD::store(b_dax + c0 + 8, acc[3]);
        VD::store(b_gyh + c0, acc[4]);
        VD::store(b_gyh + c0 + 8, acc[5]);
      }
    }
    for (int64_t row = r0; row < r1 && cv < C; ++row) {
      const int64_t base = row * C;
      const T* __restrict__ gyr = gy + base;
      const T* __restrict__ zr = z + base;
      const T* __restrict__ rr = HAS_R ? r + base : nullptr;
      T* __restrict__ grr = wgr ? gr + base : nullptr;
      T* __restrict__ gzr = wgz ? gz + base : nullptr;
      if (wgr || wgz) {
#pragma omp simd
        for (int64_t c = cv; c < C; ++c) {
          T a = zr[c] * al[c] + be[c];
          if constexpr (HAS_R) a += rr[c];
          const T gv = gyr[c];
          T da;
          if constexpr (RELU) da = a > T(0) ? gv * g[c] : T(0);
          else da = gv * g[c];
          if (wgr) grr[c] = da;
          if (wgz) gzr[c] = da * al[c];
        }
      }
#pragma omp simd
      for (int64_t c = cv; c < C; ++c) {
        const T zv = zr[c];
        T a = zv * al[c] + be[c];
        if constexpr (HAS_R) a += rr[c];
        const double gv = static_cast<double>(gyr[c]);
        const double ad = static_cast<double>(a);
        double da, h;
        if constexpr (RELU) {
          da = ad > 0.0 ? gv * gd[c] : 0.0;
          h = ad < 0.0 ? 0.0 : ad;
        } else {
          da = gv * gd[c];
          h = ad;
        }
        b_da[c] += da;
        b_dax[c] += da * (static_cast<double>(zv) - md[c]);
        b_gyh[c] += gv * h;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      P.s_da[b * C + c] = b_da[c];
      P.s_dax[b * C + c] = b_dax[c];
      P.s_gyh[b * C + c] = b_gyh[c];
    }
  }
}

// --- backward pass 2 (training): grad_z = (da - gm - (z - mean) * k) * c1 -------------------
// da read from grad_residual when it was written (FROM_GR), else recomputed.
template <typename T, bool HAS_R, bool RELU, bool FROM_GR>
DER_CLONES void dz_planes(const T* __restrict__ gy, const T* __restrict__ z,
                          const T* __restrict__ r, const T* __restrict__ gr, T* __restrict__ gz,
                          const T* __restrict__ al, const T* __restrict__ be,
                          const T* __restrict__ g, const T* __restrict__ mean,
                          const T* __restrict__ c1, const T* __restrict__ gm,
                          const T* __restrict__ kx, int64_t p0, int64_t p1, int64_t C,
                          int64_t HW) {
  using VT = Vec<T>;
  using V = typename VT::V;
  int64_t c = idx::plane_channel(p0, C);
  for (int64_t pl = p0; pl < p1; ++pl, c = (c + 1 == C) ? 0 : c + 1) {
    const T sa = al[c], sb = be[c], sg = g[c], sm = mean[c], s1 = c1[c], sgm = gm[c],
            sk = kx[c];
    const int64_t base = pl * HW;
    const T* __restrict__ gyr = gy + base;
    const T* __restrict__ zr = z + base;
    const T* __restrict__ rr = HAS_R ? r + base : nullptr;
    const T* __restrict__ grr = FROM_GR ? gr + base : nullptr;
    T* __restrict__ gzr = gz + base;
    const V zero = {};
    int64_t i = 0;
    for (; i + VT::L <= HW; i += VT::L) {
      const V zv = VT::load(zr + i);
      V da;
      if constexpr (FROM_GR) {
        da = VT::load(grr + i);
      } else {
        V a = zv * sa + sb;
        if constexpr (HAS_R) a += VT::load(rr + i);
        const V gv = VT::load(gyr + i);
        if constexpr (RELU) da = (a > zero) ? gv * sg : zero;
        else da = gv * sg;
      }
      VT::store(gzr + i, (da - sgm - (zv - sm) * sk) * s1);
    }
    for (; i < HW; ++i) {
      const T zv = zr[i];
      T da;
      if constexpr (FROM_GR) {
        da = grr[i];
      } else {
        T a = zv * sa + sb;
        if constexpr (HAS_R) a += rr[i];
        const T gv = gyr[i];
        if constexpr (RELU) da = a > T(0) ? gv * sg : T(0);
        else da = gv * sg;
      }
      gzr[i] = (da - sgm - (zv - sm) * sk) * s1;
    }
  }
}

template <typename T, bool HAS_R, bool RELU, bool FROM_GR>
DER_CLONES void dz_rows(const T* __restrict__ gy, const T* __restrict__ z,
                        const T* __restrict__ r, const T* __restrict__ gr, T* __restrict__ gz,
                        const T* __restrict__ al, const T* __restrict__ be,
                        const T* __restrict__ g, const T* __restrict__ mean,
                        const T* __restrict__ c1, const T* __restrict__ gm,
                        const T* __restrict__ kx, int64_t r0, int64_t r1, int64_t C) {
  const int64_t cv = kChunked<T> ? C - C % 16 : 0;
  if constexpr (kChunked<T>) {
    using VT = Vec<float>;
    const der_v16f zero = {};
    for (int64_t c0 = 0; c0 < cv; c0 += 16) {
      const der_v16f alv = VT::load(al + c0), bev = VT::load(be + c0), gv16 = VT::load(g + c0);
      const der_v16f mv = VT::load(mean + c0), c1v = VT::load(c1 + c0), gmv = VT::load(gm + c0);
      const der_v16f kv = VT::load(kx + c0);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t o = row * C + c0;
        const der_v16f zv = VT::load(z + o);
        der_v16f da;
        if constexpr (FROM_GR) {
          da = VT::load(gr + o);
        } else {
          der_v16f a = zv * alv + bev;
          if constexpr (HAS_R) a += VT::load(r + o);
          const der_v16f gv = VT::load(gy + o);
          if constexpr (RELU) da = (a > zero) ? gv * gv16 : zero;
          else da = gv * gv16;
        }
        VT::store(gz + o, (da - gmv - (zv - mv) * kv) * c1v);
      }
    }
  }
  for (int64_t row = r0; row < r1 && cv < C; ++row) {
    const int64_t base = row * C;
    const T* __restrict__ gyr = gy + base;
    const T* __restrict__ zr = z + base;
    const T* __restrict__ rr = HAS_R ? r + base : nullptr;
    const T* __restrict__ grr = FROM_GR ? gr + base : nullptr;
    T* __restrict__ gzr = gz + base;
#pragma omp simd
    for (int64_t c = cv; c < C; ++c) {
      const T zv = zr[c];
      T da;
      if constexpr (FROM_GR) {
        da = grr[c];
      } else {
        T a = zv * al[c] + be[c];
        if constexpr (HAS_R) a += rr[c];
        const T gv = gyr[c];
        if constexpr (RELU) da = a > T(0) ? gv * g[c] : T(0);
        else da = gv * g[c];
      }
      gzr[c] = (da - gm[c] - (zv - mean[c]) * kx[c]) * c1[c];
    }
  }
}

#pragma GCC pop_options

// ------------------------------------------------------------------------------------------
// host side
template <typename T>
std::vector<T> to_vec(const at::Tensor& t) {
  auto td = t.to(std::is_same_v<T, double> ? at::kDouble : at::kFloat).contiguous();
  const T* p = td.template const_data_ptr<T>();
  return std::vector<T>(p, p + td.numel());
}

// g = sigmoid(s * e) by ATen, in e's dtype, as the reference writes it (`torch.sigmoid(s * e)`).
template <typename T>
std::vector<T> gate_values(const std::optional<at::Tensor>& e, double s, int64_t C) {
  if (!has(e)) return std::vector<T>(C, T(1));
  return to_vec<T>(at::sigmoid(e->mul(s)));
}

struct Geom {
  int64_t N, C, HW;
  bool rows;  // channels_last: rows of C; else NCHW planes of HW
  int64_t R;  // pixel rows N * HW
  int64_t B;  // rows per block (rows layout)
  int64_t nb;  // blocks
  int64_t M() const { return N * HW; }
  // reduction groups: samples (planes) or row blocks; slots are group * C + c
  int64_t groups() const { return rows ? nb : N; }
  int64_t count(int64_t gi) const { return rows ? std::min(B, R - gi * B) : HW; }
};

Geom geometry(const at::Tensor& z, bool channels_last) {
  Geom G;
  G.N = z.size(0);
  G.C = z.size(1);
  G.HW = z.size(2) * z.size(3);
  G.rows = channels_last;
  G.R = G.N * G.HW;
  // a block of rows stays in L1 for the statistics' second pass: ~32 KiB of float
  G.B = std::max<int64_t>(8, std::min<int64_t>(256, 8192 / std::max<int64_t>(1, G.C)));
  G.nb = G.rows ? idx::ceil_div(G.R, G.B) : 0;
  return G;
}

int64_t plane_grain(const Geom& G) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, G.HW)); }
int64_t row_grain(const Geom& G) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, G.C)); }
int64_t block_grain(const Geom& G) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, G.B * G.C));
}

// Batch statistics per channel: mean and biased variance, rounded to T.
// NCHW: ATen's CPU BatchNorm arithmetic (see the header): mean = T(sum / M), var_sum = T(double
// sum of T((z - mean)^2)), var = var_sum / T(M) in T. Two passes over z (the second needs the
// rounded mean); the planes' sums are merged in a fixed order.
// channels_last: per block of rows a double sum and sum of squared deviations, merged with
// Chan's formula (exact statistics, correctly rounded).
template <typename T>
void batch_stats(const Geom& G, const T* zp, std::vector<T>& mean, std::vector<T>& var) {
  const int64_t C = G.C, ng = G.groups(), M = G.M();
  mean.assign(C, T(0));
  var.assign(C, T(0));
  if (M == 0 || C == 0) return;
  std::vector<double> gsum(ng * C), gm2(ng * C);
  if (!G.rows) {
    at::parallel_for(0, G.N * C, plane_grain(G), [&](int64_t p0, int64_t p1) {
      sum_planes<T>(zp, gsum.data(), p0, p1, G.HW);
    });
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0;
      for (int64_t n = 0; n < G.N; ++n) s += gsum[n * C + c];
      mean[c] = static_cast<T>(s / static_cast<double>(M));
    }
    at::parallel_for(0, G.N * C, plane_grain(G), [&](int64_t p0, int64_t p1) {
      sqdev_planes<T>(zp, mean.data(), gm2.data(), p0, p1, G.HW, C);
    });
    for (int64_t c = 0; c < C; ++c) {
      double q = 0.0;
      for (int64_t n = 0; n < G.N; ++n) q += gm2[n * C + c];
      var[c] = static_cast<T>(q) / static_cast<T>(M);
    }
    return;
  }
  at::parallel_for(0, G.nb, block_grain(G), [&](int64_t b0, int64_t b1) {
    std::vector<double> wk(C);
    stats_rows<T>(zp, gsum.data(), gm2.data(), wk.data(), b0, b1, G.R, C, G.B);
  });
  // Chan et al.: M2 = sum_g [M2_g + n_g (mean_g - mean)^2]
  for (int64_t c = 0; c < C; ++c) {
    double s = 0.0;
    for (int64_t gi = 0; gi < ng; ++gi) s += gsum[gi * C + c];
    const double m = s / static_cast<double>(M);
    double q = 0.0;
    for (int64_t gi = 0; gi < ng; ++gi) {
      const double n = static_cast<double>(G.count(gi));
      const double d = gsum[gi * C + c] / n - m;
      q += gm2[gi * C + c] + n * d * d;
    }
    mean[c] = static_cast<T>(m);
    var[c] = static_cast<T>(q / static_cast<double>(M));
  }
}

// half / bfloat16: computed in float (the kernels are float32 / float64)
std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  if (!has(t)) return std::nullopt;
  return t->to(at::kFloat);
}

bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_gate_cpu(
    const at::Tensor& z_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& var_in,
    const std::optional<at::Tensor>& e, double s, const std::optional<at::Tensor>& residual,
    bool training, double eps, bool relu) {
  check_bn_gate("der_fast.bn_gate", z_in, weight, bias, mean_in, var_in, e, residual, !training,
                "mean_in", "var_in");
  if (!is_kernel_dtype(z_in.scalar_type())) {
    const auto dt = z_in.scalar_type();
    auto res = bn_gate_cpu(z_in.to(at::kFloat), weight.to(at::kFloat), bias.to(at::kFloat),
                           to_float(mean_in), to_float(var_in), to_float(e), s,
                           to_float(residual), training, eps, relu);
    return {std::get<0>(res).to(dt), std::get<1>(res), std::get<2>(res)};  // stats: float32
  }
  const auto fmt = kernel_format(z_in);
  const at::Tensor z = dense_as(z_in, fmt);
  const bool has_r = has(residual);
  const at::Tensor r = has_r ? dense_as(*residual, fmt) : at::Tensor();
  const auto opts = z.options();
  at::Tensor y = at::empty(z.sizes(), opts.memory_format(fmt));
  const Geom G = geometry(z, fmt == at::MemoryFormat::ChannelsLast);
  const int64_t C = G.C;
  at::Tensor mean_out = at::empty({C}, opts);
  at::Tensor var_out = at::empty({C}, opts);

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_gate_cpu", [&] {
    using T = scalar_t;
    const T* zp = z.const_data_ptr<T>();
    std::vector<T> mean(C), var(C);
    if (training) {
      batch_stats<T>(G, zp, mean, var);
    } else {
      mean = to_vec<T>(*mean_in);
      var = to_vec<T>(*var_in);
    }
    const auto w = to_vec<T>(weight);
    const auto b = to_vec<T>(bias);
    std::vector<T> inv(C), al(C), be(C);
    channel_consts<T>(mean.data(), var.data(), w.data(), b.data(), eps, training, C, inv.data(),
                      al.data(), be.data());
    const auto g = gate_values<T>(e, s, C);
    std::copy(mean.begin(), mean.end(), mean_out.mutable_data_ptr<T>());
    std::copy(var.begin(), var.end(), var_out.mutable_data_ptr<T>());
    if (z.numel() == 0) return;
    const T* rp = has_r ? r.const_data_ptr<T>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    const T *A = al.data(), *Bt = be.data(), *Gt = g.data();
    const int code = (has_r ? 2 : 0) | (relu ? 1 : 0);
    if (G.rows) {
      at::parallel_for(0, G.R, row_grain(G), [&](int64_t r0, int64_t r1) {
        switch (code) {
          case 0: out_rows<T, false, false>(zp, rp, yp, A, Bt, Gt, r0, r1, C); break;
          case 1: out_rows<T, false, true>(zp, rp, yp, A, Bt, Gt, r0, r1, C); break;
          case 2: out_rows<T, true, false>(zp, rp, yp, A, Bt, Gt, r0, r1, C); break;
          default: out_rows<T, true, true>(zp, rp, yp, A, Bt, Gt, r0, r1, C); break;
        }
      });
    } else {
      at::parallel_for(0, G.N * C, plane_grain(G), [&](int64_t p0, int64_t p1) {
        switch (code) {
          case 0: out_planes<T, false, false>(zp, rp, yp, A, Bt, Gt, p0, p1, C, G.HW); break;
          case 1: out_planes<T, false, true>(zp, rp, yp, A, Bt, Gt, p0, p1, C, G.HW); break;
          case 2: out_planes<T, true, false>(zp, rp, yp, A, Bt, Gt, p0, p1, C, G.HW); break;
          default: out_planes<T, true, true>(zp, rp, yp, A, Bt, Gt, p0, p1, C, G.HW); break;
        }
      });
    }
  });
  return {y, mean_out, var_out};
}

template <typename T, bool HAS_R, bool RELU>
void run_reduce(const Geom& G, const BwdPtrs& P, const T* al, const T* be, const T* g,
                const T* mean) {
  const int64_t C = G.C;
  if (G.rows) {
    std::vector<double> gd(g, g + C), md(mean, mean + C);
    at::parallel_for(0, G.nb, block_grain(G), [&](int64_t b0, int64_t b1) {
      std::vector<double> blk(3 * C);
      reduce_rows<T, HAS_R, RELU>(P, al, be, g, gd.data(), md.data(), blk.data(), b0, b1, G.R, C,
                                  G.B);
    });
  } else {
    at::parallel_for(0, G.N * C, plane_grain(G), [&](int64_t p0, int64_t p1) {
      reduce_planes<T, HAS_R, RELU>(P, al, be, g, mean, p0, p1, C, G.HW);
    });
  }
}

template <typename T, bool HAS_R, bool RELU, bool FROM_GR>
void run_dz(const Geom& G, const T* gy, const T* z, const T* r, const T* gr, T* gz, const T* al,
            const T* be, const T* g, const T* mean, const T* c1, const T* gm, const T* kx) {
  const int64_t C = G.C;
  if (G.rows) {
    at::parallel_for(0, G.R, row_grain(G), [&](int64_t r0, int64_t r1) {
      dz_rows<T, HAS_R, RELU, FROM_GR>(gy, z, r, gr, gz, al, be, g, mean, c1, gm, kx, r0, r1, C);
    });
  } else {
    at::parallel_for(0, G.N * C, plane_grain(G), [&](int64_t p0, int64_t p1) {
      dz_planes<T, HAS_R, RELU, FROM_GR>(gy, z, r, gr, gz, al, be, g, mean, c1, gm, kx, p0, p1,
                                         C, G.HW);
    });
  }
}

// da from grad_residual when it was written (then the residual and the ReLU no longer matter)
template <typename T>
void dispatch_dz(bool from_gr, bool has_r, bool relu, const Geom& G, const T* gy, const T* z,
                 const T* r, const T* gr, T* gz, const T* al, const T* be, const T* g,
                 const T* mean, const T* c1, const T* gm, const T* kx) {
  if (from_gr)
    run_dz<T, false, false, true>(G, gy, z, r, gr, gz, al, be, g, mean, c1, gm, kx);
  else if (has_r && relu)
    run_dz<T, true, true, false>(G, gy, z, r, gr, gz, al, be, g, mean, c1, gm, kx);
  else if (has_r)
    run_dz<T, true, false, false>(G, gy, z, r, gr, gz, al, be, g, mean, c1, gm, kx);
  else if (relu)
    run_dz<T, false, true, false>(G, gy, z, r, gr, gz, al, be, g, mean, c1, gm, kx);
  else
    run_dz<T, false, false, false>(G, gy, z, r, gr, gz, al, be, g, mean, c1, gm, kx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_gate_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& z_in, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean_t, const at::Tensor& var_t,
    const std::optional<at::Tensor>& e, double s, const std::optional<at::Tensor>& residual,
    bool training, double eps, bool relu, std::array<bool, 5> mask) {
  const char* op = "der_fast.bn_gate_backward";
  check_bn_gate(op, z_in, weight, bias, mean_t, var_t, e, residual, true, "mean", "var");
  TORCH_CHECK_VALUE(grad_y_in.sizes() == z_in.sizes(), op, ": grad_y has shape ",
                    grad_y_in.sizes(), " but z has shape ", z_in.sizes());
  check_like(grad_y_in, z_in, op, "grad_y", "z");
  TORCH_CHECK_VALUE(!mask[3] || has(e), op, ": e is required for grad_e");
  TORCH_CHECK_VALUE(!mask[4] || has(residual), op, ": residual is required for grad_residual");
  if (!is_kernel_dtype(z_in.scalar_type())) {
    const auto dt = z_in.scalar_type();
    auto res = bn_gate_backward_cpu(grad_y_in.to(at::kFloat), z_in.to(at::kFloat),
                                    weight.to(at::kFloat), bias.to(at::kFloat),
                                    mean_t.to(at::kFloat), var_t.to(at::kFloat), to_float(e), s,
                                    to_float(residual), training, eps, relu, mask);
    auto h = [dt](const at::Tensor& t) { return t.to(dt); };
    return {h(std::get<0>(res)), h(std::get<1>(res)), h(std::get<2>(res)), h(std::get<3>(res)),
            h(std::get<4>(res))};
  }
  const auto fmt = kernel_format(z_in);
  const at::Tensor z = dense_as(z_in, fmt);
  const at::Tensor gy = dense_as(grad_y_in, fmt);
  const bool has_r = has(residual);
  const at::Tensor r = has_r ? dense_as(*residual, fmt) : at::Tensor();
  const auto opts = z.options();
  const Geom G = geometry(z, fmt == at::MemoryFormat::ChannelsLast);
  const int64_t C = G.C, M = G.M();
  auto full = [&](bool ok) {
    return ok ? at::empty(z.sizes(), opts.memory_format(fmt)) : at::empty({0}, opts);
  };
  auto vec = [&](bool ok) { return ok ? at::empty({C}, opts) : at::empty({0}, opts); };
  at::Tensor gz = full(mask[0]), gw = vec(mask[1]), gb = vec(mask[2]), ge = vec(mask[3]),
             gr = full(mask[4]);
  // which sums are needed: grad_z in training needs sum da and sum da * x_hat
  const bool need_red = mask[1] || mask[2] || mask[3] || (mask[0] && training);
  const bool pass1 = need_red || mask[4] || (mask[0] && !training);
  if (!pass1) return {gz, gw, gb, ge, gr};

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_gate_backward_cpu", [&] {
    using T = scalar_t;
    const auto mean = to_vec<T>(mean_t);
    const auto var = to_vec<T>(var_t);
    const auto w = to_vec<T>(weight);
    const auto b = to_vec<T>(bias);
    std::vector<T> inv(C), al(C), be(C);
    channel_consts<T>(mean.data(), var.data(), w.data(), b.data(), eps, training, C, inv.data(),
                      al.data(), be.data());
    const auto g = gate_values<T>(e, s, C);
    const int64_t ng = G.groups();
    std::vector<double> red(3 * ng * C, 0.0);
    const T* zp = z.const_data_ptr<T>();
    const T* gyp = gy.const_data_ptr<T>();
    const T* rp = has_r ? r.const_data_ptr<T>() : nullptr;
    T* grp = mask[4] ? gr.mutable_data_ptr<T>() : nullptr;
    T* gzp = mask[0] ? gz.mutable_data_ptr<T>() : nullptr;
    if (z.numel() > 0) {
      BwdPtrs P{gyp, zp, rp, grp, training ? nullptr : gzp,
                red.data(), red.data() + ng * C, red.data() + 2 * ng * C};
      const int code = (has_r ? 2 : 0) | (relu ? 1 : 0);
      switch (code) {
        case 0: run_reduce<T, false, false>(G, P, al.data(), be.data(), g.data(), mean.data()); break;
        case 1: run_reduce<T, false, true>(G, P, al.data(), be.data(), g.data(), mean.data()); break;
        case 2: run_reduce<T, true, false>(G, P, al.data(), be.data(), g.data(), mean.data()); break;
        default: run_reduce<T, true, true>(G, P, al.data(), be.data(), g.data(), mean.data()); break;
      }
    }
    std::vector<double> s_da(C, 0.0), s_dax(C, 0.0), s_gyh(C, 0.0);
    for (int64_t gi = 0; gi < ng; ++gi)
      for (int64_t c = 0; c < C; ++c) {
        s_da[c] += red[gi * C + c];
        s_dax[c] += red[(ng + gi) * C + c];
        s_gyh[c] += red[(2 * ng + gi) * C + c];
      }
    if (mask[1]) {
      T* p = gw.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(s_dax[c] * static_cast<double>(inv[c]));
    }
    if (mask[2]) {
      T* p = gb.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(s_da[c]);
    }
    if (mask[3]) {
      T* p = ge.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) {
        const double gc = static_cast<double>(g[c]);
        p[c] = static_cast<T>(s * gc * (1.0 - gc) * s_gyh[c]);
      }
    }
    if (mask[0] && training && z.numel() > 0) {
      std::vector<T> c1(C), gm(C), kx(C);
      const double Md = static_cast<double>(M);
      for (int64_t c = 0; c < C; ++c) {
        const double iv = static_cast<double>(inv[c]);
        c1[c] = static_cast<T>(static_cast<double>(w[c]) * iv);
        gm[c] = static_cast<T>(s_da[c] / Md);
        kx[c] = static_cast<T>(s_dax[c] * iv * iv / Md);
      }
      dispatch_dz<T>(mask[4], has_r, relu, G, gyp, zp, rp, mask[4] ? grp : nullptr, gzp,
                     al.data(), be.data(), g.data(), mean.data(), c1.data(), gm.data(),
                     kx.data());
    }
  });
  return {gz, gw, gb, ge, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(der_fast, CPU, m) {
  m.impl("bn_gate", &bn_gate_cpu);
  m.impl("bn_gate_backward", &bn_gate_backward_cpu);
}

}  // namespace der_fast
